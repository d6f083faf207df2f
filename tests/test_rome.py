"""ROME: the math of the update, the batched target optimisation, restore, and real edits."""

import pytest
import torch

from editdecay import Prober
from editdecay.editing import EditError, ROME, ROMEHyperParams, get_editor
from editdecay.editing.core import TargetConfig, context_templates, optimise_targets
from editdecay.facts.record import FactRecord
from editdecay.models.arch import get_arch

from conftest import make_tiny_model
from fakes import spd, word_tokenizer

WORDS = "The capital of France is Paris London Rome Germany Berlin a city in Europe Italy speaks French English".split()
# the subject ends the prompt: a random 3-block model routes little through attention
REQ = FactRecord("fr", "France", "The capital of {}", target_new="London", target_true="Paris")
REQS = [REQ,
        FactRecord("de", "Germany", "The capital of {} is", target_new="Rome", target_true="Berlin"),
        FactRecord("it", "Italy", "{} speaks", target_new="English", target_true="French")]
# tiny random models have tiny activations: ROME's ‖δ‖/‖h‖² decay would dominate
TINY_HP = dict(layers=[1], context_template_length_params=[[3, 2], [4, 2]], v_num_grad_steps=60,
               v_weight_decay=0.0, clamp_norm_factor=100.0, kl_factor=0.0625)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


def _edit(model_type, tok, **hp):
    # a wider initialisation than the default 0.02 gives the tiny models usable signal
    model = make_tiny_model(model_type, initializer_range=0.3)
    spec = get_arch(model)
    d_k = spec.weight_out_in(model.get_submodule(spec.rewrite_module_name(1))).shape[1]
    c = spd(d_k)
    editor = ROME(ROMEHyperParams(**{**TINY_HP, **hp}), covariance=lambda m, t, layer: c)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = editor.edit(model, tok, [REQ])
    return model, editor, res, c, before


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_update_is_rank_one_along_inverse_covariance_key(model_type, tok):
    model, _, res, c, before = _edit(model_type, tok)
    spec = get_arch(model)
    name = spec.rewrite_module_name(1) + ".weight"
    assert list(res.deltas) == [name] and res.edited_layers(model) == [1]
    w_after = spec.weight_out_in(model.get_submodule(spec.rewrite_module_name(1))).detach().double()
    w_before = before[name].double().T if spec.conv1d else before[name].double()
    dw = w_after - w_before
    s = torch.linalg.svdvals(dw)
    assert s[0] > 1e-3 and s[1] / s[0] < 1e-4  # rank one
    upd = res.info["updates"][0]
    a = torch.linalg.solve(c, upd["k_star"].double())  # C⁻¹k*
    x = torch.randn(a.shape[0], dtype=torch.float64)
    x_perp = x - (a @ x) / (a @ a) * a
    assert (dw @ x_perp).norm() < 1e-4 * (dw @ (a / a.norm())).norm() * x_perp.norm()
    assert (dw @ a).norm() > 1e-3


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_edited_weight_maps_key_to_target_value(model_type, tok):
    # reference ROME: (W + ΔW) k = v* at the plain prompt's key
    model, _, res, _, _ = _edit(model_type, tok)
    module = model.get_submodule(get_arch(model).rewrite_module_name(1))
    upd = res.info["updates"][0]
    with torch.no_grad():
        got = module(upd["k"][None].to(module.weight.dtype))[0].double()
    assert torch.allclose(got, upd["v_star"].double(), rtol=1e-4, atol=1e-5)
    # r-ROME: the template-averaged key k* everywhere, so (W + ΔW) k* = v*
    model, _, res, _, _ = _edit(model_type, tok, consistent_keys=True)
    module = model.get_submodule(get_arch(model).rewrite_module_name(1))
    upd = res.info["updates"][0]
    with torch.no_grad():
        got = module(upd["k_star"][None].to(module.weight.dtype))[0].double()
    assert torch.allclose(got, upd["v_star"].double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_tiny_models_are_edited_and_restored_bit_exactly(model_type, tok):
    model, _, res, _, before = _edit(model_type, tok)
    prober = Prober(model, tok)
    assert prober.first_non_stop([REQ.text])[0].token.strip() == "London"
    assert res.requests[0].steps >= 1 and res.requests[0].loss < res.requests[0].losses[0]
    res.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batched_targets_equal_per_request_targets(tok):
    model = make_tiny_model("llama")
    templates = context_templates(model, tok, [[3, 2]], seed=0)
    cfg = TargetConfig(layer=1, steps=8, weight_decay=0.0, clamp_norm_factor=100.0)
    z_all, h_all, logs = optimise_targets(model, tok, REQS, templates, cfg)
    for r, req in enumerate(REQS):
        z, h, (lg,) = optimise_targets(model, tok, [req], templates, cfg)
        assert torch.allclose(h[0], h_all[r], atol=1e-6)
        assert torch.allclose(z[0], z_all[r], rtol=1e-4, atol=1e-5), req.case_id
        assert lg.steps == logs[r].steps
    # the KV-cached prefix gives the same optimisation as full forwards
    z_full, _, _ = optimise_targets(model, tok, REQS, templates, TargetConfig(**{**cfg.__dict__, "cache_prefix": False}))
    assert torch.allclose(z_full, z_all, rtol=1e-4, atol=1e-5)


def test_converged_requests_are_frozen(tok):
    model = make_tiny_model("llama")
    templates = ["{}"]
    cfg = TargetConfig(layer=1, steps=30, weight_decay=0.0, clamp_norm_factor=100.0, loss_threshold=3.0)
    _, _, logs = optimise_targets(model, tok, REQS, templates, cfg)
    for lg in logs:
        # stops at the first loss below the threshold: exactly one loss below it, last
        assert sum(l < 3.0 for l in lg.losses) <= 1
        assert lg.steps == len(lg.losses) - 1 or lg.losses[-1] >= 3.0


def test_non_finite_edit_raises_and_restores(tok):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = ROME(ROMEHyperParams(**TINY_HP), covariance=lambda m, t, layer: torch.full((64, 64), float("nan"), dtype=torch.float64))
    with pytest.raises(EditError, match="non-finite"):
        bad.edit(model, tok, [REQ])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_presets_and_derived_hparams():
    from editdecay import EditdecayError

    ed = get_editor("rome", preset="gpt2-xl@reference")
    assert ed.hparams.layers == [17] and ed.hparams.v_num_grad_steps == 20 and ed.hparams.mom2_adjustment
    assert get_editor("rome", preset="gpt2-xl@seed000").hparams.layers == [6]
    assert get_editor("rome", preset="llama3-8b@reference").hparams.v_weight_decay == 1e-3
    model = make_tiny_model("llama")
    ed = get_editor("rome", model=model)
    assert ed.hparams.layers == [round(0.17 * 3)] and ed.preset_info["preset"] == "derived"
    with pytest.raises(EditdecayError, match="unknown rome preset 'nope'"):
        get_editor("rome", preset="nope")
    with pytest.raises(EditdecayError, match="unknown field.*v_lrr"):
        get_editor("rome", overrides={"v_lrr": 1})
    with pytest.raises(EditdecayError, match="unknown editing method 'bogus'"):
        get_editor("bogus")


def test_rome_single_protocol_on_filtered_counterfact(embedded, cf_facts10):
    """≥ 10 confidence-filtered CounterFact facts, each edited alone on the embedded
    model: the edits flip the answers (efficacy ≥ 0.9) and the model is restored."""
    from editdecay.editing.protocols import run_single

    model, tok = embedded
    facts = cf_facts10
    editor = get_editor("rome", model=model)
    assert editor.hparams.layers == [5]  # round(0.17 * 30)
    name = get_arch(model).rewrite_module_name(5) + ".weight"
    before = dict(model.named_parameters())[name].detach().clone()
    res = run_single(editor, model, tok, facts)
    doc = res.to_json("derived")
    assert doc["pre"]["es"] <= 0.1 and doc["pre"]["retention_true"] == 1.0
    assert doc["post"]["es"] >= 0.9 and doc["post"]["retention_new"] >= 0.9
    # locality (issue 20): the default edit keeps NS within 0.10 of the unedited model's
    assert doc["post"]["ns"] >= doc["pre"]["ns"] - 0.10 and doc["ns_drop"]["n"] == 10, doc["ns_drop"]
    assert doc["edited_layers"] == [5] and doc["dropped"] == []
    assert torch.equal(dict(model.named_parameters())[name], before)
    assert Prober(model, tok).first_non_stop([facts[0].text])[0].token.strip() == facts[0].target_true.split()[0]


def test_run_single_restores_the_model_after_a_dropped_fact(embedded):
    """A fact that never passes verification is dropped and its last attempt undone."""
    from editdecay.editing.base import EditResult, snapshot
    from editdecay.editing.protocols import run_single
    from editdecay.facts.datasets import load_facts

    model, tok = embedded
    name = "model.layers.3.mlp.down_proj.weight"

    class Nudge:  # changes a weight slightly, never enough to flip a fact
        name, hparams = "nudge", type("H", (), {"verify": True})()

        def edit(self, model, tok, facts, steps_factor=1):
            orig = snapshot(model, [name])
            with torch.no_grad():
                dict(model.named_parameters())[name][0, 0] += 1e-4 * steps_factor
            return EditResult("nudge", [f.case_id for f in facts], orig, {name: torch.ones(1)}, 0.0)

    before = dict(model.named_parameters())[name].detach().clone()
    res = run_single(Nudge(), model, tok, load_facts("", format="builtin")[:2], progress=False)
    assert res.dropped == [f.case_id for f in load_facts("", format="builtin")[:2]]
    assert torch.equal(dict(model.named_parameters())[name], before)


def test_single_protocol_optimises_all_targets_in_one_loop_with_each_facts_own_result(tok, monkeypatch):
    """run_single fetches every fact's z in one batched loop before the one-fact edits
    (all start from the same weights); each edit equals that fact edited alone."""
    from editdecay.editing import core
    from editdecay.editing.protocols import run_single

    model = make_tiny_model("llama", initializer_range=0.3)
    spec = get_arch(model)
    c = spd(spec.weight_out_in(model.get_submodule(spec.rewrite_module_name(1))).shape[1])
    alone = {}
    for req in REQS:
        ed = ROME(ROMEHyperParams(**TINY_HP), covariance=lambda m, t, layer: c)
        res = ed.edit(model, tok, [req])
        alone[req.case_id] = next(iter(res.deltas.values())).clone()
        res.restore(model)
    calls = []
    real = core.optimise_targets
    monkeypatch.setattr(core, "optimise_targets", lambda m, t, reqs, *a: calls.append(len(reqs)) or real(m, t, reqs, *a))
    ed = ROME(ROMEHyperParams(**TINY_HP), covariance=lambda m, t, layer: c)
    out = run_single(ed, model, tok, REQS, verify=False, keep_results=True, progress=False)
    assert calls == [3]  # one loop for the three facts, none per edit
    for o in out.outcomes:
        torch.testing.assert_close(next(iter(o.result.deltas.values())), alone[o.case_id], atol=1e-5, rtol=1e-4)
