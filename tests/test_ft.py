"""FT / FT-L: only the tuned module changes, the loss and the stopping rule, the L∞
constraint, restore, presets, and real edits on the embedded model."""

import math

import pytest
import torch

from editdecay import EditdecayError, Prober
from editdecay.editing.base import EditError
from editdecay.editing.ft import FT, FTHyperParams, ft_hparams
from editdecay.evaluate.metrics import split_target
from editdecay.facts.record import FactRecord
from editdecay.models.arch import get_arch

from conftest import make_tiny_model
from fakes import word_tokenizer

WORDS = "The capital of France is Paris London Rome Germany Berlin a city in Europe Italy speaks French English".split()
REQ = FactRecord("fr", "France", "The capital of {} is", target_new="London city", target_true="Paris")
REQS = [REQ,
        FactRecord("de", "Germany", "The capital of {} is", target_new="Rome", target_true="Berlin"),
        FactRecord("it", "Italy", "{} speaks", target_new="English", target_true="French")]
# a large lr: tiny random models need big moves for a visible loss change
FAST = dict(layers=[1], lr=1e-2, num_steps=6, loss_threshold=0.0)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


def _tiny(model_type):
    return make_tiny_model(model_type, initializer_range=0.3)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_only_the_tuned_module_changes_and_restore_is_bit_exact(model_type, tok):
    model = _tiny(model_type)
    spec = get_arch(model)
    mod = spec.rewrite_module_name(1)
    model.train()  # the caller's mode: restored afterwards, eval during the edit
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    dict(model.named_parameters())[mod + ".weight"].requires_grad_(False)  # restored to False
    flags[mod + ".weight"] = False
    before = _state(model)
    res = FT(FTHyperParams(**FAST)).edit(model, tok, [REQ])
    tuned = [mod + ".weight"] + ([mod + ".bias"] if spec.conv1d else [])  # GPT-2's c_proj has a bias
    assert sorted(res.originals) == sorted(tuned) == sorted(res.deltas)
    after = _state(model)
    for k, v in before.items():
        if k in tuned:
            assert not torch.equal(after[k], v), k
            assert torch.equal(res.deltas[k], after[k] - v), k
        else:
            assert torch.equal(after[k], v), k  # every other parameter/buffer bit-identical
    assert res.edited_layers(model) == [1] and res.method == "ft" and res.case_ids == ["fr"]
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    res.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_tune_bias_off_tunes_the_weight_only(tok):
    model = _tiny("gpt2")
    mod = get_arch(model).rewrite_module_name(1)
    res = FT(FTHyperParams(**FAST, tune_bias=False)).edit(model, tok, [REQ])
    assert list(res.deltas) == [mod + ".weight"]


def test_eval_mode_during_the_edit_makes_it_deterministic(tok):
    # GPT-2 has dropout 0.1: in train mode two runs from the same weights would differ
    model = _tiny("gpt2").train()
    ed = FT(FTHyperParams(**FAST))
    a = ed.edit(model, tok, [REQ])
    a.restore(model)
    b = ed.edit(model, tok, [REQ])
    assert a.requests[0].losses == b.requests[0].losses
    assert torch.equal(a.deltas[next(iter(a.deltas))], b.deltas[next(iter(b.deltas))])


def test_loss_is_the_teacher_forced_target_nll(tok):
    model = _tiny("llama")
    res = FT(FTHyperParams(**{**FAST, "num_steps": 1})).edit(model, tok, [REQ])
    res.restore(model)
    ctx, tgt = split_target(tok, REQ.text, REQ.target_new)
    assert len(tgt) == 2  # "London city": every target token counts
    with torch.no_grad():
        logp = model(torch.tensor([ctx + tgt])).logits[0].log_softmax(-1)
    nll = -sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(tgt)) / len(tgt)
    assert math.isclose(res.requests[0].losses[0], nll, rel_tol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_loss_decreases_and_step_cap(model_type, tok):
    model = _tiny(model_type)
    res = FT(FTHyperParams(**FAST)).edit(model, tok, [REQ])
    lg = res.requests[0]
    assert lg.steps == 6 and len(lg.losses) == 7  # the loss before every update and after the last
    assert lg.loss == lg.losses[-1] < lg.losses[0]
    assert res.info["stopped"] == "max_steps" and res.info["steps_cap"] == 6
    res.restore(model)
    res2 = FT(FTHyperParams(**FAST)).edit(model, tok, [REQ], steps_factor=2)
    assert res2.requests[0].steps == 12 and res2.info["steps_cap"] == 12
    assert res2.requests[0].losses[:7] == pytest.approx(lg.losses, rel=1e-5)


def test_stops_at_the_loss_threshold(tok):
    model = _tiny("llama")
    free = FT(FTHyperParams(**{**FAST, "num_steps": 10})).edit(model, tok, [REQ])
    free.restore(model)
    losses = free.requests[0].losses
    # the first loss below the midpoint of two consecutive losses with a clear gap
    k = next(i for i in range(3, len(losses)) if losses[i - 1] - losses[i] > 1e-3)
    tau = (losses[k - 1] + losses[k]) / 2
    expect = next(i for i, v in enumerate(losses) if v < tau)
    res = FT(FTHyperParams(**{**FAST, "num_steps": 10, "loss_threshold": tau})).edit(model, tok, [REQ])
    lg = res.requests[0]
    assert lg.steps == expect < 10 and len(lg.losses) == expect + 1
    assert lg.loss < tau <= min(lg.losses[:-1])
    assert res.info["stopped"] == "loss<threshold"
    res.restore(model)
    # already below the threshold: no update at all
    res = FT(FTHyperParams(**{**FAST, "loss_threshold": losses[0] + 1})).edit(model, tok, [REQ])
    assert res.requests[0].steps == 0 and all(not torch.any(d) for d in res.deltas.values())
    assert res.edited_layers(model) == []


def test_several_requests_train_on_the_mean_loss_in_chunks(tok):
    model = _tiny("llama")
    res = FT(FTHyperParams(**FAST)).edit(model, tok, REQS)
    res.restore(model)
    assert [lg.case_id for lg in res.requests] == ["fr", "de", "it"]
    for s in range(len(res.info["losses"])):
        assert res.info["losses"][s] == pytest.approx(sum(lg.losses[s] for lg in res.requests) / 3, rel=1e-6)
    # padded batch == each request alone; chunks of one accumulate into the same update
    for r, req in enumerate(REQS):
        alone = FT(FTHyperParams(**{**FAST, "num_steps": 1})).edit(model, tok, [req])
        alone.restore(model)
        assert alone.requests[0].losses[0] == pytest.approx(res.requests[r].losses[0], rel=1e-5)
    chunked = FT(FTHyperParams(**FAST, batch_size=1)).edit(model, tok, REQS)
    chunked.restore(model)
    for k, d in res.deltas.items():
        # Adam's steps are ~lr·sign(g): entries whose gradient is ~0 may differ by
        # summation order (threads), so compare in aggregate
        assert (chunked.deltas[k] - d).abs().mean() < 0.02 * d.abs().mean(), k


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_ft_l_keeps_every_entry_within_the_linf_ball(model_type, tok):
    model = _tiny(model_type)
    eps = 1e-3
    res = FT(FTHyperParams(**FAST, norm_constraint=eps)).edit(model, tok, [REQ])
    worst = max(float(d.abs().max()) for d in res.deltas.values())
    assert worst <= eps * (1 + 1e-4)
    assert worst >= 0.9 * eps  # the constraint was active (lr 1e-2 ≫ ε)
    assert res.requests[0].losses[-1] < res.requests[0].losses[0]


def test_low_precision_parameters_use_fp32_master_weights(tok):
    model = _tiny("llama").to(torch.bfloat16)
    before = _state(model)
    res = FT(FTHyperParams(**FAST)).edit(model, tok, [REQ])
    name = next(iter(res.deltas))
    assert dict(model.named_parameters())[name].dtype == torch.bfloat16
    assert torch.any(res.deltas[name] != 0) and res.requests[0].loss < res.requests[0].losses[0]
    res.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_non_finite_edit_raises_and_restores(tok, monkeypatch):
    class NanAdam(torch.optim.Adam):
        def step(self, closure=None):
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))

    model = _tiny("llama")
    before = _state(model)
    monkeypatch.setattr(torch.optim, "Adam", NanAdam)
    with pytest.raises(EditError, match="non-finite"):
        FT(FTHyperParams(**FAST)).edit(model, tok, [REQ])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_presets_derived_and_validation():
    hp, info = ft_hparams("gpt2-xl@seed000")
    assert (hp.layers, hp.lr, hp.weight_decay, hp.num_steps, hp.loss_threshold, hp.norm_constraint, hp.verify) == \
        ([1], 5e-5, 0.0, 25, 0.01, None, True) and info == {"preset": "gpt2-xl@seed000"}
    assert ft_hparams("llama3-8b@seed000")[0] == hp
    ftl, _ = ft_hparams("gpt2-xl@ft-l")
    assert (ftl.layers, ftl.lr, ftl.num_steps, ftl.norm_constraint) == ([0], 5e-4, 25, 5e-4)
    assert ft_hparams("llama3-8b@seed000-code")[0].num_steps == 50
    hp, info = ft_hparams(model=make_tiny_model("llama"), overrides={"num_steps": 7})
    assert info["preset"] == "derived" and hp.layers == [1] and hp.lr == 5e-4 and hp.num_steps == 7 and "rule" in info
    one_block = make_tiny_model("gpt2", n_layer=1)
    assert ft_hparams(model=one_block)[0].layers == [0]
    assert ft_hparams()[0] == FTHyperParams()
    with pytest.raises(EditdecayError, match="unknown ft preset 'nope'"):
        ft_hparams("nope")
    with pytest.raises(EditdecayError, match="unknown field.*lrr"):
        ft_hparams(overrides={"lrr": 1})
    for bad in ({"num_steps": 0}, {"layers": []}, {"lr": 0}, {"norm_constraint": -1.0}, {"batch_size": 0}):
        with pytest.raises(EditdecayError):
            ft_hparams(overrides=bad)
    with pytest.raises(ValueError, match="out of range"):
        FT(FTHyperParams(layers=[5])).edit(make_tiny_model("llama"), word_tokenizer(WORDS), [REQ])


def test_registered_editor():
    from editdecay import editing

    assert editing.EDITOR_REGISTRY["ft"].hparams is FTHyperParams
    ed = editing.get_editor("ft", preset="gpt2-xl@ft-l")
    assert isinstance(ed, FT) and ed.hparams.norm_constraint == 5e-4


def test_ft_edits_filtered_counterfact_facts_on_embedded_model(embedded, shared_data, selection_cache):
    """Three confidence-filtered CounterFact facts, each edited alone with the derived
    preset on the embedded model: each flips, and the model is restored bit-exactly."""
    from editdecay.evaluate.metrics import score_facts
    from editdecay.facts.datasets import load_facts
    from editdecay.facts.selection import confidence_filter

    model, tok = embedded
    pool = load_facts(shared_data / "counterfact" / "counterfact-val.json")[:200]
    passed = [f for f, o in zip(pool, confidence_filter(model, tok, pool, cache_dir=selection_cache)) if o.passed]
    facts = list({f.subject: f for f in passed}.values())[:3]
    assert len(facts) == 3
    hp, info = ft_hparams(model=model)
    assert info["preset"] == "derived" and hp.layers == [1]
    editor = FT(hp)
    spec = get_arch(model)
    names = [spec.rewrite_module_name(1) + ".weight"]  # SmolLM2's down_proj has no bias
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    prober = Prober(model, tok, progress=False)
    for fact in facts:
        assert score_facts(model, tok, [fact], prober=prober).facts[0].retained_true
        res = editor.edit(model, tok, [fact])
        try:
            assert sorted(res.originals) == names
            post = score_facts(model, tok, [fact], prober=prober).facts[0]
            assert post.retained_new and post.es == 1.0, (fact.case_id, res.requests[0].losses[-1])
        finally:
            res.restore(model)
        for n in names:
            assert torch.equal(params[n], before[n]), n
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training
