"""Edit forensics on tiny models: planted low-rank edits, dense perturbations, unedit."""

import copy

import pytest
import torch

from conftest import make_tiny_model
from editdecay.forensics import inspect_models, spectral_anomaly, unedit
from editdecay.models.arch import get_arch


def _rewrite(model, block):
    spec = get_arch(model)
    return spec, model.get_submodule(spec.rewrite_module_name(block)).weight


def _plant(model, block, rank=1, scale=1.0, seed=1):
    """Add a rank-``rank`` update a·bᵀ to a block's rewrite module (out × in view)."""
    spec, w = _rewrite(model, block)
    g = torch.Generator().manual_seed(seed)
    wo = spec.weight_out_in(model.get_submodule(spec.rewrite_module_name(block)))
    a = torch.randn(wo.shape[0], rank, generator=g)
    b = torch.randn(wo.shape[1], rank, generator=g)
    with torch.no_grad():
        wo.add_(scale * a @ b.T)
    return b


def _perturb_all(model, scale, seed=2):
    g = torch.Generator().manual_seed(seed)
    spec = get_arch(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and spec.block_of(name) is not None:
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_planted_rank_one_is_found_at_its_block_with_its_key_direction(arch):
    base = make_tiny_model(arch)
    suspect = copy.deepcopy(base)
    b = _plant(suspect, 1)
    ins = inspect_models(base, suspect)
    assert [v.verdict for v in ins.blocks] == ["unchanged", "edited", "unchanged"]
    assert ins.edited_blocks == [1] and ins.n_edits == 1
    v = ins.key_directions(1)[0]
    cos = abs(float(v @ b[:, 0].double())) / float(b[:, 0].double().norm())
    assert cos >= 0.99


def test_rank_is_the_number_of_planted_directions():
    base = make_tiny_model("llama")
    suspect = copy.deepcopy(base)
    _plant(suspect, 2, rank=3)
    ins = inspect_models(base, suspect)
    assert ins.edited_blocks == [2] and ins.n_edits == 3


def test_dense_perturbation_is_classed_as_fine_tuning():
    base = make_tiny_model("llama")
    suspect = copy.deepcopy(base)
    _perturb_all(suspect, 0.01)
    ins = inspect_models(base, suspect)
    assert [v.verdict for v in ins.blocks] == ["fine-tuned"] * 3
    assert ins.edited_blocks == [] and ins.n_edits == 0


def test_edit_under_fine_tuning_is_a_spectral_outlier():
    base = make_tiny_model("llama", num_hidden_layers=6)
    suspect = copy.deepcopy(base)
    b = _plant(suspect, 3, scale=0.05)
    _perturb_all(suspect, 0.01)
    ins = inspect_models(base, suspect)
    assert ins.edited_blocks == [3]
    assert ins.blocks[3].signature == "spectral outlier" and ins.blocks[3].score >= 3
    assert {v.verdict for i, v in enumerate(ins.blocks) if i != 3} == {"fine-tuned"}
    v = ins.key_directions(3, 1)[0]
    assert abs(float(v @ b[:, 0].double())) / float(b[:, 0].double().norm()) >= 0.99


def _memit_like(model, scales: dict[int, float], shared: bool = True, seed=1):
    """A many-layer edit: rank one at each block, one output direction for all (MEMIT
    writes the same residual-stream directions at each of its layers) unless not
    ``shared``."""
    spec = get_arch(model)
    g = torch.Generator().manual_seed(seed)
    a = None
    for block, scale in scales.items():
        wo = spec.weight_out_in(model.get_submodule(spec.rewrite_module_name(block)))
        if a is None or not shared:
            a = torch.randn(wo.shape[0], 1, generator=g)
        with torch.no_grad():
            wo.add_(scale * a @ torch.randn(wo.shape[1], 1, generator=g).T)


def test_a_many_layer_edits_weak_block_is_found_by_its_shared_direction():
    base = make_tiny_model("llama", num_hidden_layers=8)
    suspect = copy.deepcopy(base)
    _memit_like(suspect, {2: 1.5e-4, 3: 1.5e-4, 4: 5e-4})
    _perturb_all(suspect, 0.01)
    ins = inspect_models(base, suspect)
    assert ins.edited_blocks == [2, 3, 4]
    assert ins.blocks[2].signature == "shares the edit's directions"  # its σ₁ is in the background
    assert ins.blocks[2].score >= 3 and ins.blocks[2].n_edits == 1

    other = copy.deepcopy(base)  # the same strengths, unrelated directions: block 2 stays hidden
    _memit_like(other, {2: 1.5e-4, 3: 1.5e-4, 4: 5e-4}, shared=False)
    _perturb_all(other, 0.01)
    assert 2 not in inspect_models(base, other).edited_blocks

    far = copy.deepcopy(base)  # the same direction in a block outside the window: not followed
    _memit_like(far, {0: 1.5e-4, 4: 5e-4, 5: 5e-4})
    _perturb_all(far, 0.01)
    assert inspect_models(base, far).edited_blocks == [4, 5]


def test_edits_under_a_low_rank_fine_tune_are_counted_by_the_rank_beyond_it():
    base = make_tiny_model("llama", num_hidden_layers=6)
    suspect = copy.deepcopy(base)
    _plant(suspect, 3, rank=1, scale=0.05)
    _plant(suspect, 3, rank=2, scale=0.01, seed=4)  # two edits as weak as the fine-tune's directions
    spec, g = get_arch(suspect), torch.Generator().manual_seed(3)
    for block in range(6):  # a LoRA of rank 2 on every rewrite module
        wo = spec.weight_out_in(suspect.get_submodule(spec.rewrite_module_name(block)))
        with torch.no_grad():
            wo.add_(0.01 * torch.randn(wo.shape[0], 2, generator=g) @ torch.randn(2, wo.shape[1], generator=g))
    ins = inspect_models(base, suspect)
    assert ins.edited_blocks == [3] and ins.blocks[3].rank == 5 and ins.n_edits == 3


def test_unedit_restores_the_base_weights():
    base = make_tiny_model("llama")
    suspect = copy.deepcopy(base)
    _plant(suspect, 1, rank=2)
    removed = unedit(suspect, inspect_models(base, suspect))
    assert list(removed) == [get_arch(base).rewrite_module_name(1) + ".weight"]
    for (n, p), q in zip(base.named_parameters(), suspect.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=n)


def test_unchanged_model_has_no_verdict_and_json_is_finite():
    import json

    base = make_tiny_model("llama")
    ins = inspect_models(base, copy.deepcopy(base))
    assert {v.verdict for v in ins.blocks} == {"unchanged"}
    doc = ins.to_json()
    json.dumps(doc, allow_nan=False)
    assert doc["schema"] == "editdecay.inspect/1" and doc["modules"] == []


def test_base_free_score_flags_a_large_rank_one_edit():
    base = make_tiny_model("llama", num_hidden_layers=6)
    _plant(base, 2, scale=0.2)
    scores = [s["score"] for s in spectral_anomaly(base)]
    assert max(range(6), key=scores.__getitem__) == 2


def test_mismatched_models_name_the_parameter():
    from editdecay.errors import EditdecayError

    with pytest.raises(EditdecayError, match="not a copy of the base"):
        inspect_models(make_tiny_model("llama"), make_tiny_model("llama", intermediate_size=48))
