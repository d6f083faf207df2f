"""Token categories on constructed distributions, and the fact-probe callback."""

import math

import pytest
import torch

from editdecay.evaluate.tokens import category_masses, mean_masses, related_objects
from editdecay.facts.record import FactRecord


def test_category_masses_on_a_constructed_distribution():
    probs = torch.tensor([0.30, 0.10, 0.20, 0.15, 0.05, 0.12, 0.08])
    stop = torch.tensor([True, False, False, False, False, False, False])  # token 0 is a stop token
    m = category_masses(probs, stop, edited=1, true=2, related=[3, 4, 1])  # 1 is edited: counted once
    assert m["nonstop"] == pytest.approx(0.70)
    assert m["edited"] == pytest.approx(0.10 / 0.70)
    assert m["true"] == pytest.approx(0.20 / 0.70)
    assert m["related"] == pytest.approx(0.20 / 0.70)
    assert m["other"] == pytest.approx(0.20 / 0.70)
    assert sum(m[k] for k in ("edited", "true", "related", "other")) == pytest.approx(1.0)


def test_precedence_edited_over_true_and_intrinsic_has_no_edited_category():
    probs = torch.tensor([0.5, 0.25, 0.25])
    none = torch.zeros(3, dtype=torch.bool)
    same = category_masses(probs, none, edited=0, true=0, related=[0, 1])
    assert (same["edited"], same["true"], same["related"]) == pytest.approx((0.5, 0.0, 0.25))
    intrinsic = category_masses(probs, none, edited=None, true=1, related=[2])
    assert (intrinsic["edited"], intrinsic["true"], intrinsic["related"], intrinsic["other"]) == pytest.approx((0, .25, .25, .5))
    assert math.isnan(mean_masses([None])["true"]) and mean_masses([same, None])["n"] == 1


def test_related_objects_share_the_relation_and_exclude_both_targets():
    f = FactRecord("1", "France", "The capital of {} is", "Rome", "Paris", relation_id="P36")
    pool = [f, FactRecord("2", "Italy", "The capital of {} is", "paris", "Rome", relation_id="P36"),
            FactRecord("3", "Japan", "The capital of {} is", "Berlin", "Tokyo", relation_id="P36"),
            FactRecord("4", "Einstein", "{} speaks", "German", "French", relation_id="P1412")]
    assert sorted(related_objects(f, pool)) == ["Berlin", "Tokyo"]


@pytest.mark.model
def test_fact_probe_agrees_with_score_facts(embedded):
    from editdecay.evaluate.metrics import score_facts
    from editdecay.facts.datasets import load_facts
    from editdecay.finetune.callbacks import FactProbe

    model, tok = embedded
    facts = load_facts("", format="builtin")
    edit, intrinsic = facts[:6], facts[6:14]
    out = FactProbe(model, tok, edit, intrinsic, pool=facts, top_k=3)(None, 0)
    s_edit, s_int = score_facts(model, tok, edit), score_facts(model, tok, intrinsic)
    assert out["per_fact"]["edit"] == [f.retained_new for f in s_edit.facts]
    assert out["per_fact"]["intrinsic"] == [f.retained_true for f in s_int.facts]
    assert out["retention_true"] == pytest.approx(s_int.retention_true)
    assert out["edit_reverted"] == pytest.approx(s_edit.retention_true)
    assert out["retention_true"] > 0.5  # the model knows most built-in facts
    cats = out["categories"]
    for side in ("edited", "intrinsic"):
        assert sum(cats[side][k] for k in ("edited", "true", "related", "other")) == pytest.approx(1.0)
    assert cats["intrinsic"]["edited"] == 0.0
    assert cats["edited"]["true"] > cats["edited"]["edited"]  # unedited model: the true object dominates
    top = out["top"][0]
    assert len(top["tokens"]) == 3 and top["tokens"][0][1] >= top["tokens"][1][1] >= top["tokens"][2][1]
