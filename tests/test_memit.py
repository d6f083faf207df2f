"""MEMIT and AlphaEdit: the math of their solves, key memory, protocols, real edits."""

import pytest
import torch

from editdecay.editing import AlphaEdit, AlphaEditHyperParams, MEMIT, MEMITHyperParams, get_editor
from editdecay.editing.protocols import run_batch
from editdecay.facts.record import FactRecord
from editdecay.models.arch import get_arch

from conftest import make_tiny_model
from fakes import spd, word_tokenizer

WORDS = "The capital of France is Paris London Rome Germany Berlin a city in Europe Italy speaks French English".split()
REQS = [FactRecord("fr", "France", "The capital of {}", target_new="London", target_true="Paris"),
        FactRecord("de", "Germany", "The capital of {}", target_new="Rome", target_true="Berlin"),
        FactRecord("it", "Italy", "The language of {}", target_new="English", target_true="French"),
        FactRecord("eu", "Europe", "A city in {}", target_new="Berlin", target_true="Paris")]
TINY = dict(context_template_length_params=[[3, 2]], v_num_grad_steps=30, v_weight_decay=0.0,
            clamp_norm_factor=100.0, mom2_update_weight=2.0)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


def _weight(model, layer):
    spec = get_arch(model)
    return spec.weight_out_in(model.get_submodule(spec.rewrite_module_name(layer))).detach().double().clone()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_memit_one_layer_one_fact_is_scaled_rome_direction(model_type, tok):
    model = make_tiny_model(model_type, initializer_range=0.3)
    c = spd(64)
    lam = 2.0
    editor = MEMIT(MEMITHyperParams(layers=[1], **{**TINY, "mom2_update_weight": lam}), covariance=lambda m, t, l: c)
    before = _weight(model, 1)
    res = editor.edit(model, tok, REQS[:1])
    dw = _weight(model, 1) - before
    upd = res.info["updates"][0]
    k, r = upd["keys"][0].double(), upd["resid"][0].double()
    cik = torch.linalg.solve(c, k)
    rome = torch.outer(r, cik) / (k @ cik)  # ROME's update for key k and residual r (consistent keys)
    scale = (k @ cik) / (lam + k @ cik)  # Sherman–Morrison
    assert torch.allclose(dw, scale * rome, rtol=1e-4, atol=1e-6 * rome.abs().max())
    assert res.edited_layers(model) == [1]


def test_memit_spreads_residual_over_layers_in_order(tok):
    model = make_tiny_model("llama", initializer_range=0.3)
    editor = MEMIT(MEMITHyperParams(layers=[0, 1, 2], **TINY), covariance=lambda m, t, l: spd(64, l))
    res = editor.edit(model, tok, REQS)
    ups = res.info["updates"]
    assert [u["layer"] for u in ups] == [0, 1, 2]
    # the residual left for the last layer is smaller than the first one's share times 3
    assert ups[-1]["resid"].norm() < 3 * ups[0]["resid"].norm()
    assert res.edited_layers(model) == [0, 1, 2]
    from editdecay import Prober

    got = [g.token.strip() for g in Prober(model, tok).first_non_stop([r.text for r in REQS])]
    assert sum(g == r.target_new for g, r in zip(got, REQS)) >= 3


def test_alphaedit_update_vanishes_on_preserved_keys(tok):
    model = make_tiny_model("llama", initializer_range=0.3)
    c = spd(64)
    hp = AlphaEditHyperParams(layers=[1, 2], nullspace_target=0.6, **TINY)
    editor = AlphaEdit(hp, covariance=lambda m, t, l: c)
    before = {l: _weight(model, l) for l in (1, 2)}
    editor.edit(model, tok, REQS[:2])
    for layer in (1, 2):
        p = editor._proj[layer]
        assert editor.nullspace_dims[layer] == round(0.6 * 64)
        x = torch.randn(64, dtype=torch.float64)
        k0 = x - p @ x  # P k0 = 0: a direction of the preserved keys
        dw = _weight(model, layer) - before[layer]
        assert dw.norm() > 1e-3
        assert (dw @ k0).norm() < 1e-5 * dw.norm() * k0.norm()


def test_alphaedit_nullspace_fallback_rule():
    evals = torch.cat([torch.linspace(1e-4, 1e-3, 10), torch.linspace(0.5, 1.5, 90)]).double()
    c = torch.diag(evals)
    hp = dict(layers=[1], nullspace_threshold=2e-2, nullspace_fallback=0.7)
    ed = AlphaEdit(AlphaEditHyperParams(**hp))
    ed.projector(1, c)
    assert ed.nullspace_dims[1] == 70  # 10% < 30% at the absolute threshold: fall back to 70%
    ed = AlphaEdit(AlphaEditHyperParams(**{**hp, "nullspace_threshold": 2.0}))
    ed.projector(1, c)
    assert ed.nullspace_dims[1] == 70  # 100% > 95%: fall back too
    evals[:50] = torch.linspace(1e-4, 1e-3, 50).double()
    ed = AlphaEdit(AlphaEditHyperParams(**hp))
    ed.projector(1, torch.diag(evals))
    assert ed.nullspace_dims[1] == 50  # inside 30-95%: the absolute threshold stands


def test_alphaedit_key_memory_grows_across_sequential_batches(tok):
    model = make_tiny_model("llama", initializer_range=0.3)
    editor = AlphaEdit(AlphaEditHyperParams(layers=[1, 2], nullspace_target=0.6, **TINY),
                       covariance=lambda m, t, l: spd(64))
    res = run_batch(editor, model, tok, REQS, batch_size=2)
    assert res.protocol == "sequential" and len(res.results) == 2
    traces = {l: float(torch.trace(editor.key_memory[l])) for l in (1, 2)}
    first = AlphaEdit(editor.hparams, covariance=lambda m, t, l: spd(64))
    res.restore(model)
    first.edit(model, tok, REQS[:2])
    for l in (1, 2):
        assert traces[l] > float(torch.trace(first.key_memory[l])) > 0


def test_batch_and_sequential_protocols_accumulate_and_restore(tok):
    model = make_tiny_model("llama", initializer_range=0.3)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    editor = MEMIT(MEMITHyperParams(layers=[1, 2], **TINY), covariance=lambda m, t, l: spd(64))
    seq = run_batch(editor, model, tok, REQS, batch_size=1)
    assert seq.protocol == "sequential" and len(seq.results) == 4
    # each batch was applied on top of the previous one
    w1 = seq.results[1].originals[get_arch(model).rewrite_module_name(1) + ".weight"]
    assert not torch.equal(w1, base[get_arch(model).rewrite_module_name(1) + ".weight"])
    seq.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    batch = run_batch(editor, model, tok, REQS)
    assert batch.protocol == "batch" and len(batch.results) == 1
    doc = batch.to_json("test")
    assert doc["n_facts"] == 4 and doc["edited_layers"] == [1, 2]
    batch.restore(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_alphaedit_reuses_memits_targets_only_on_the_same_weights(tok, monkeypatch):
    import editdecay.editing.core as core

    calls = []
    real = core.optimise_targets
    monkeypatch.setattr(core, "optimise_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make_tiny_model("llama", initializer_range=0.3)
    cov = lambda m, t, l: spd(64, l)
    hp = dict(layers=[1, 2], nullspace_target=0.6, **TINY)
    plain = AlphaEdit(AlphaEditHyperParams(**hp), covariance=cov).edit(model, tok, REQS[:2])
    want = {k: v.clone() for k, v in model.state_dict().items()}
    plain.restore(model)
    cache = core.TargetCache()
    memit = MEMIT(MEMITHyperParams(**{k: v for k, v in hp.items() if k != "nullspace_target"}), covariance=cov)
    memit.target_cache = cache
    memit.edit(model, tok, REQS[:2]).restore(model)
    calls.clear()
    alpha = AlphaEdit(AlphaEditHyperParams(**hp), covariance=cov)
    alpha.target_cache = cache
    alpha.edit(model, tok, REQS[:2])
    assert calls == [] and cache.reused_seconds > 0  # MEMIT's z, not a new optimisation
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k  # the same edit as without the cache
    # on other weights (the edited model) or other facts the z step runs again
    alpha.edit(model, tok, REQS[:2])
    alpha.edit(model, tok, REQS[2:3])
    assert len(calls) == 2


def test_presets():
    assert get_editor("memit", preset="gpt2-xl@reference").hparams.layers == [13, 14, 15, 16, 17]
    ll = get_editor("memit", preset="llama3.1-8b@seed001").hparams
    assert ll.layers == [3, 4, 5, 6, 7] and ll.clamp_norm_factor == 4 and ll.v_weight_decay == 1e-3
    assert get_editor("alphaedit", preset="llama3-8b@reference").hparams.L2 == 10
    model = make_tiny_model("llama")
    ed = get_editor("memit", model=model)
    assert ed.hparams.layers == [0, 1, 2] and ed.hparams.mom2_update_weight == round(15000 * 64 / 16384, 1)
    assert get_editor("alphaedit", model=model).hparams.nullspace_fallback == 0.7


def _inspect_real_edit(model, tok, res, layers, facts):
    """Forensics on a real MEMIT edit (issue 18): the edited blocks and no other, 10
    edits, the edited facts ranked above built-in decoys; unedit restores the base."""
    import copy

    from editdecay.facts.datasets import load_facts
    from editdecay.forensics import inspect_models, unedit

    base = copy.deepcopy(model)
    for r in reversed(res.results):
        r.restore(base)
    decoys = [f for f in load_facts("", format="builtin") if f.subject not in {g.subject for g in facts}][:20]
    ins = inspect_models(base, model, tok, facts + decoys, answers=False)
    assert ins.edited_blocks == list(layers) and ins.n_edits == len(facts)
    assert {f.case_id for f in ins.facts[: len(facts)]} == {f.case_id for f in facts}
    suspect = copy.deepcopy(model)
    unedit(suspect, ins)
    for (n, p), q in zip(base.named_parameters(), suspect.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=n)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_batch_edit_on_filtered_counterfact(method, embedded, cf_facts10, target_cache):
    """Out of the box (derived presets) on the embedded model: efficacy ≥ 0.9. AlphaEdit
    reuses MEMIT's target values (same weights, facts and target settings)."""
    model, tok = embedded
    editor = get_editor(method, model=model)
    editor.target_cache = target_cache
    name = get_arch(model).rewrite_module_name(editor.hparams.layers[0]) + ".weight"
    before = dict(model.named_parameters())[name].detach().clone()
    res = run_batch(editor, model, tok, cf_facts10)
    doc = res.to_json("derived")
    if method == "memit":
        _inspect_real_edit(model, tok, res, editor.hparams.layers, cf_facts10)
    res.restore(model)
    assert torch.equal(dict(model.named_parameters())[name], before)
    assert doc["pre"]["es"] <= 0.1
    assert doc["post"]["es"] >= 0.9 and doc["post"]["retention_new"] >= 0.8
    assert doc["post"]["ns"] >= doc["pre"]["ns"] - 0.10, doc["ns_drop"]  # locality (issue 20)
    assert doc["edited_layers"] == editor.hparams.layers
    if method == "alphaedit":  # the absolute threshold 2e-2 gives 75-88% here, inside 30-95%: kept
        assert all(0.3 <= d / 1536 <= 0.95 for d in editor.nullspace_dims.values())
