"""MALMEN: the solve is the ridge least-squares solution (both forms), training
back-propagates through it with the right adjoint, the untrained editor on one token is
a scaled gradient step, training raises validation edit success, checkpoints reload."""

import pytest
import torch

from editdecay.editing.hypernet import capture_factors, train_hypernet
from editdecay.editing.malmen import MALMEN, MALMENHyperParams, malmen_hparams, solve_shift

import hypernets
from hypernets import FAST, tiny

tok, facts = hypernets.tok, hypernets.facts  # the shared synthetic facts (module-scoped fixtures)


@pytest.mark.parametrize("n", [5, 40])  # fewer rows than key dimensions (dual form) and more (primal)
def test_solve_equals_direct_least_squares(n):
    """ΔWᵀ = (KᵀK + e^λ I)⁻¹KᵀD is the least-squares solution of [K; √α I] X = [D; 0]."""
    g = torch.Generator().manual_seed(n)
    d_in, d_out, alpha = 12, 7, 0.37
    k = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    d = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    shift = solve_shift(k, d, alpha)
    assert (shift.full is None) == (n < d_in)  # low rank when n < d_in
    a = torch.cat([k, alpha**0.5 * torch.eye(d_in, dtype=torch.float64)])
    b = torch.cat([d, torch.zeros(d_in, d_out, dtype=torch.float64)])
    direct = torch.linalg.lstsq(a, b).solution  # [d_in, d_out]
    torch.testing.assert_close(shift.matrix().T, direct, rtol=1e-9, atol=1e-10)
    # the same through MALMEN.shifts in float32 with a learned λ
    normal = torch.linalg.solve(k.T @ k + alpha * torch.eye(d_in, dtype=torch.float64), k.T @ d)
    torch.testing.assert_close(normal, direct, rtol=1e-9, atol=1e-10)


def test_backprop_through_the_solve_matches_the_reference_adjoint():
    """Autograd through the solve equals MALMEN's hand-written meta-gradient:
    ∂L/∂D = K S⁻¹G, ∂L/∂λ = −e^λ⟨S⁻¹G, X⟩ for L = ⟨X, G⟩, S = KᵀK + e^λ I."""
    g = torch.Generator().manual_seed(0)
    for n in (6, 30):
        k = torch.randn(n, 10, generator=g, dtype=torch.float64)
        d = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
        lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        grad_x = torch.randn(10, 4, generator=g, dtype=torch.float64)
        x = solve_shift(k, d, lam.exp()).matrix().T
        (x * grad_x).sum().backward()
        s = k.T @ k + lam.exp() * torch.eye(10, dtype=torch.float64)
        mat = torch.linalg.solve(s, grad_x)
        torch.testing.assert_close(d.grad, k @ mat)
        torch.testing.assert_close(lam.grad, -lam.exp() * (mat * x).sum())


def test_untrained_malmen_on_one_token_is_a_scaled_gradient_step(tok, facts):
    """One target token, identity network: d = −lr‖k‖²δ and the solve gives
    ΔW = −lr ‖k‖²/(‖k‖² + e^λ) δkᵀ, i.e. the gradient step shrunk by the ridge term."""
    model = tiny()
    ed = MALMEN(MALMENHyperParams(layers=[2], edit_lr=0.05, lambda_init=1.5))
    ed.prepare(model)
    name = ed.module_names[0]
    fact = facts[3]  # single-token target
    f, _ = capture_factors(model, tok, [fact], [name], token="ans")
    k, delta = f[name].keys[0], f[name].grads[0]
    assert len(f[name].keys) == 1
    kk = float(k @ k)
    expect = -0.05 * kk / (kk + torch.exp(torch.tensor(1.5)).item()) * torch.outer(delta, k)
    res = ed.edit(model, tok, [fact])
    # deltas are (W + ΔW) − W in float32: rounding at the scale of W
    torch.testing.assert_close(res.deltas[name + ".weight"], expect, rtol=1e-4, atol=1e-7)
    assert float(expect.abs().max()) > 1e-4
    res.restore(model)


def test_training_raises_validation_edit_success_and_checkpoint_reloads(tmp_path, tok, facts):
    from editdecay.editing import get_editor

    model = tiny()
    ed = MALMEN(MALMENHyperParams(**{**FAST, "modules": ["mlp_out"]}))
    report = train_hypernet(ed, model, tok, facts[:40], facts[40:], tmp_path / "ck", progress=False)
    assert report.best["es"] >= report.baseline["es"] + 0.2, report.curve
    assert ed.net.log_lambda.grad is not None  # λ is trained through the solve
    again = get_editor("malmen", model=model, checkpoint=tmp_path / "ck")
    best = MALMEN(ed.hparams)
    best.prepare(model)
    from safetensors.torch import load_file

    best.net.load_state_dict(load_file(str(tmp_path / "ck" / "hypernet.safetensors")))
    for reqs in (facts[41:42], facts[42:50]):  # a single edit and a batch solved jointly
        a = best.edit(model, tok, reqs)
        a.restore(model)
        b = again.edit(model, tok, reqs)
        b.restore(model)
        for n in a.deltas:
            assert torch.equal(a.deltas[n], b.deltas[n]), n
        assert b.edited_layers(model) == [1, 2]


def test_presets_and_derived():
    from editdecay.editing import get_editor
    from editdecay.editing.hparams import presets

    for name in presets("malmen"):
        malmen_hparams(preset=name)
    hp, _ = malmen_hparams(preset="gpt2-xl@seed000")
    assert hp.layers == list(range(42, 48)) and hp.modules == ["mlp_out"] and hp.token == "ans"
    hp, _ = malmen_hparams(preset="llama3-8b@seed000")
    assert hp.layers == list(range(26, 32))
    ed = get_editor("malmen", model=tiny())
    assert ed.hparams.layers == [0, 1, 2] and ed.preset_info["preset"] == "derived"


@pytest.mark.model
def test_untrained_malmen_edits_the_embedded_model(embedded, cf_facts10):
    """The derived preset (blocks 24–29, down_proj) edits SmolLM2 and restores bit-exactly."""
    from editdecay.editing import get_editor

    model, tok = embedded
    ed = get_editor("malmen", model=model)
    assert ed.hparams.layers == [24, 25, 26, 27, 28, 29]
    params = dict(model.named_parameters())
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(24, 30)]
    before = {n: params[n].detach().clone() for n in names}
    res = ed.edit(model, tok, cf_facts10[:3])
    assert sorted(res.deltas) == sorted(names) and res.edited_layers(model) == list(range(24, 30))
    assert all(float(d.abs().max()) > 0 for d in res.deltas.values())
    res.restore(model)
    for n in names:
        assert torch.equal(params[n], before[n]), n


def test_many_edits_stream_through_the_normal_equations(tok, facts):
    """Editing in chunks switches to accumulating KᵀK and KᵀD once there are more rows
    than key dimensions; the shift equals the solve over all rows at once."""
    model = tiny()
    ed = MALMEN(MALMENHyperParams(layers=[1], token="all", edit_lr=0.05, batch_size=7))
    ed.prepare(model)
    name = ed.module_names[0]
    reqs = facts[:40]
    f, _ = capture_factors(model, tok, reqs, [name], token="all")
    assert len(f[name].keys) > 64  # the down projection's input width of the tiny model
    with torch.no_grad():
        direct = ed.shifts(f)[name].matrix()
    res = ed.edit(model, tok, reqs)
    res.restore(model)
    assert res.info["rows"][name] == len(f[name].keys)
    torch.testing.assert_close(res.deltas[name + ".weight"], direct, rtol=1e-3, atol=1e-6)
