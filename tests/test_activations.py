"""Activation drift: block states against hand computations, drift of known perturbations."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from fakes import word_tokenizer
from torch import nn

from editdecay.evaluate.activations import (
    block_states,
    drift,
    merged,
    subject_token_range,
)
from editdecay.models.arch import get_arch

WORDS = ["the", "eiffel", "tower", "is", "located", "in", "city", "of", "paris", "big", "red", "dog", "sat", "on", "a", "mat"]
PROMPTS = ["the eiffel tower is located in the city of", "the big red dog sat on", "a mat", "the dog is red"]
SUBJECTS = ["eiffel tower", "big red dog", "mat", "dog"]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


def manual_states(model: nn.Module, tok, prompts, positions=None) -> torch.Tensor:
    """Block outputs by hand: output_hidden_states, one prompt at a time, with the final
    norm removed so that the last entry is the last block's raw output."""
    m = copy.deepcopy(model)
    spec = get_arch(m)
    parent, name = spec.final_norm.rsplit(".", 1)
    setattr(m.get_submodule(parent), name, nn.Identity())
    out = []
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p)["input_ids"]])
        pos = ids.shape[1] - 1 if positions is None else positions[i]
        with torch.no_grad():
            hs = m(input_ids=ids, output_hidden_states=True).hidden_states
        out.append(torch.stack([h[0, pos] for h in hs[1:]]))
    return torch.stack(out)


def perturb(model: nn.Module, block: int, seed: int, scale: float = 0.5) -> nn.Module:
    m = copy.deepcopy(model)
    spec = get_arch(m)
    w = m.get_submodule(spec.rewrite_module_name(block)).weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w.add_(scale * torch.randn(w.shape, generator=g))
    return m


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gptj", "gpt_neox", "qwen2"])
def test_block_states_equal_hidden_states(model_type, tok):
    model = make_tiny_model(model_type)
    got = block_states(model, tok, PROMPTS, batch_size=3)  # mixed lengths, right padding
    assert got.shape == (len(PROMPTS), 3, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, manual_states(model, tok, PROMPTS), atol=1e-5, rtol=1e-5)


def test_subject_last_position(tok):
    model = make_tiny_model("llama")
    templates = ["the {} is located in the city of", "{} sat on", "a {}", "the {} is red"]
    got = block_states(model, tok, templates, position="subject_last", subjects=SUBJECTS)
    texts = [t.replace("{}", s) for t, s in zip(templates, SUBJECTS)]
    assert [subject_token_range(tok, t, s)[1:] for t, s in zip(texts, SUBJECTS)] == [(1, 3), (0, 3), (1, 2), (1, 2)]
    torch.testing.assert_close(got, manual_states(model, tok, texts, [2, 2, 1, 1]), atol=1e-5, rtol=1e-5)
    # full texts containing the subject work the same as templates
    torch.testing.assert_close(block_states(model, tok, texts, position="subject_last", subjects=SUBJECTS), got)
    with pytest.raises(ValueError):
        block_states(model, tok, texts, position="subject_last")


def test_identical_models_zero_drift(tok):
    model = make_tiny_model("llama")
    twin = copy.deepcopy(model)
    res = drift(model, twin, model, copy.deepcopy(model), tokenizer=tok, prompts=PROMPTS)
    assert set(res.norms) == {"edited_vs_base", "finetuned_vs_base", "edited_finetuned_vs_edited"}
    assert set(res.cosines) == {"ed_ft", "edft_ft", "edft_ed"}
    for v in [*res.norms.values(), *res.norms_per_prompt.values(), *res.normalised().values()]:
        assert np.all(v == 0)
    for v in [*res.cosines.values(), *res.cosines_per_prompt.values()]:
        assert np.all(np.isfinite(v)) and np.all(v == 0)
    json.dumps(res.to_json(per_prompt=True), allow_nan=False)


def test_drift_matches_manual_computation(tok):
    base = make_tiny_model("llama", num_hidden_layers=4)
    edited = perturb(base, 1, seed=1)
    finetuned = perturb(base, 2, seed=2)
    edited_ft = perturb(edited, 2, seed=3)
    res = drift(base, edited, finetuned, edited_ft, tokenizer=tok, prompts=PROMPTS, batch_size=2)
    h = {k: manual_states(m, tok, PROMPTS).double()
         for k, m in [("b", base), ("e", edited), ("f", finetuned), ("ef", edited_ft)]}
    d_ed, d_ft, d_edft = h["e"] - h["b"], h["f"] - h["b"], h["ef"] - h["e"]
    for key, d in [("edited_vs_base", d_ed), ("finetuned_vs_base", d_ft), ("edited_finetuned_vs_edited", d_edft)]:
        np.testing.assert_allclose(res.norms_per_prompt[key], d.norm(dim=-1).numpy(), atol=1e-5)
        np.testing.assert_allclose(res.norms[key], d.norm(dim=-1).mean(0).numpy(), atol=1e-5)
    # blocks before the perturbed one do not move at all
    assert np.all(res.norms["edited_vs_base"][:1] == 0) and np.all(res.norms["edited_vs_base"][1:] > 0)
    assert np.all(res.norms["finetuned_vs_base"][:2] == 0) and np.all(res.norms["edited_finetuned_vs_edited"][:2] == 0)

    def cos(a, b):
        return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)).mean(0).numpy()

    np.testing.assert_allclose(res.cosines["ed_ft"], cos(d_ed, d_ft), atol=1e-5)
    np.testing.assert_allclose(res.cosines["edft_ft"], cos(d_edft, d_ft), atol=1e-5)
    np.testing.assert_allclose(res.cosines["edft_ed"], cos(d_edft, d_ed), atol=1e-5)
    assert np.all(res.cosines["ed_ft"][:2] == 0)  # Δft = 0 there
    norm = res.normalised()["edited_vs_base"]
    assert norm.max() == pytest.approx(1.0) and np.argmax(norm) == np.argmax(res.norms["edited_vs_base"])
    # precomputed states give the same result; pairs needing a missing model are left out
    states = {k: block_states(m, tok, PROMPTS) for k, m in [("b", base), ("e", edited), ("ef", edited_ft)]}
    part = drift(states["b"], states["e"], None, states["ef"])
    assert set(part.norms) == {"edited_vs_base", "edited_finetuned_vs_edited"} and set(part.cosines) == {"edft_ed"}
    np.testing.assert_allclose(part.cosines["edft_ed"], res.cosines["edft_ed"], atol=1e-6)
    with pytest.raises(ValueError):
        drift(base, edited, None, None, tokenizer=tok, prompts=PROMPTS)


def test_peft_model_is_measured_merged(tok):
    from peft import LoraConfig, get_peft_model

    base = make_tiny_model("llama")
    plain = block_states(base, tok, PROMPTS)
    torch.manual_seed(5)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    by_hand = copy.deepcopy(peft_model).merge_and_unload()
    got = block_states(peft_model, tok, PROMPTS)
    torch.testing.assert_close(got, block_states(by_hand, tok, PROMPTS), atol=1e-5, rtol=1e-5)
    assert (got - plain).norm() > 1e-3  # the adapters do change the states
    after = peft_model.state_dict()  # the input is neither merged nor otherwise modified
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert merged(base) is base
    res = drift(base, base, peft_model, tokenizer=tok, prompts=PROMPTS)
    np.testing.assert_allclose(res.norms["finetuned_vs_base"], (got - plain).double().norm(dim=-1).mean(0).numpy(),
                               atol=1e-5)
