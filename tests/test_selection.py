import pytest

from editdecay.evaluate.probes import Prober
from editdecay.facts.record import FactRecord
from editdecay.facts.selection import SelectionError, confidence_filter, select_facts, split_sets

from fakes import capital_lm


@pytest.fixture(scope="module")
def lm():
    return capital_lm()


FACTS = [
    FactRecord("paris", "France", "The capital of {} is", target_new="London", target_true="Paris"),
    FactRecord("french", "Germany", "{} speaks", target_new="English", target_true="French"),
    FactRecord("london", "Rome", "The capital of {} is", target_new="Paris", target_true="London"),
]


def test_confidence_filter_by_hand(lm, tmp_path):
    model, tok = lm
    out = confidence_filter(model, tok, FACTS, margin=0.1, mode="greedy", cache_dir=tmp_path)
    # paris: greedy decides 'London' after 'the' -> fails
    # french: decided French, .6 - .25 = .35 >= .1 -> passes
    # london: decided after 'the': p(London) .7 - p(Paris) .2 = .5 -> passes
    assert [o.passed for o in out] == [False, True, True]
    assert out[1].p_true == pytest.approx(0.6) and out[1].p_second == pytest.approx(0.25)
    assert out[2].p_true == pytest.approx(0.7) and out[2].p_second == pytest.approx(0.2)
    strict = confidence_filter(model, tok, FACTS, margin=0.4, mode="greedy", cache_dir=tmp_path)
    assert [o.passed for o in strict] == [False, False, True]
    masked = confidence_filter(model, tok, FACTS, margin=0.1, mode="masked_argmax", cache_dir=tmp_path)
    # paris: masked argmax at position 1 is Paris, but p(the)=.5 > .3 -> margin < 0
    # london: masked argmax is Paris != London
    assert [o.passed for o in masked] == [False, True, False]
    assert masked[0].p_true == pytest.approx(0.3) and masked[0].p_second == pytest.approx(0.5)


def test_filter_cache_hit_skips_the_model(lm, tmp_path, monkeypatch):
    model, tok = lm
    first = confidence_filter(model, tok, FACTS, cache_dir=tmp_path)

    def boom(*a, **k):
        raise AssertionError("model probed despite a cache hit")

    monkeypatch.setattr(Prober, "probe", boom)
    assert confidence_filter(model, tok, FACTS, cache_dir=tmp_path) == first
    with pytest.raises(AssertionError, match="despite"):  # another margin is another key
        confidence_filter(model, tok, FACTS, margin=0.2, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="despite"):  # another dataset too
        confidence_filter(model, tok, FACTS[:2], cache_dir=tmp_path)


def _synthetic(n_rel=12, per_rel=10):
    facts = []
    for r in range(n_rel):
        for i in range(per_rel):
            facts.append(FactRecord(f"{r}-{i}", f"subj{r}-{i % 7}", "{} rel", target_new=f"o{r}-{(i + 1) % 4}",
                                    target_true=f"o{r}-{i % 4}", relation_id=f"P{r}"))
    return facts


def test_split_sets_are_disjoint_and_seeded():
    facts = _synthetic()
    edit, intr = split_sets(facts, 10, 20, seed=3)
    assert len(edit) == 10 and len(intr) == 20
    subjects = [f.subject.lower() for f in edit + intr]
    assert len(set(subjects)) == len(subjects)
    assert not ({f.relation_id for f in edit} & {f.relation_id for f in intr})
    objs = lambda fs: {o.lower() for f in fs for o in (f.target_true, f.target_new)}
    assert not (objs(edit) & objs(intr))
    assert split_sets(facts, 10, 20, seed=3) == (edit, intr)
    assert split_sets(facts, 10, 20, seed=4) != (edit, intr)


def test_split_sets_error_says_how_many_fit():
    facts = _synthetic(n_rel=2, per_rel=4)
    with pytest.raises(SelectionError, match=r"only 8 facts passed .* edit and .* intrinsic facts fit, but 5 and 5"):
        split_sets(facts, 5, 5)


def test_select_facts_error_names_pass_count(lm, tmp_path):
    model, tok = lm
    with pytest.raises(SelectionError, match=r"only 2 of 3 facts pass the confidence filter"):
        select_facts(model, tok, FACTS, n_edit=1, n_intrinsic=2, cache_dir=tmp_path)
    sel = select_facts(model, tok, FACTS[1:], n_edit=1, n_intrinsic=1, cache_dir=tmp_path)
    assert sel.stats["n_passed"] == 2 and sel.stats["pass_rate"] == 1.0
    assert {f.case_id for f in sel.edit + sel.intrinsic} == {"french", "london"}
    assert sel.stats["edit"]["n"] == 1 and 0 < sel.stats["edit"]["mean_p_true"] <= 1


def test_builtin_selection_on_embedded_model(embedded, selection_cache):
    from editdecay.evaluate.metrics import score_facts
    from editdecay.facts.datasets import load_facts

    model, tok = embedded
    facts = load_facts("", format="builtin")
    sel = select_facts(model, tok, facts, n_edit=50, n_intrinsic=100, cache_dir=selection_cache)
    st = sel.stats
    assert st["n_total"] == len(facts) >= 300 and st["n_passed"] >= 60
    assert st["edit"]["mean_p_true"] - st["edit"]["mean_p_second"] >= 0.1
    # every selected fact is retained (true target) by the same probe: filter and probe agree
    scores = score_facts(model, tok, sel.edit[:16] + sel.intrinsic[:16])
    assert scores.retention_true == 1.0 and scores.retention_new == 0.0
    assert not ({f.relation_id for f in sel.edit} & {f.relation_id for f in sel.intrinsic})
