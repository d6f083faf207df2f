"""Fidelity of the locate-then-edit core to the reference implementations (issue 20):
MEMIT's type-averaged keys, ROME's end-of-text context templates, AlphaEdit's null-space
record, the target split at the prompt boundary, the prefix KV cache."""

import logging

import pytest
import torch

from editdecay.editing import AlphaEdit, AlphaEditHyperParams, MEMIT, MEMITHyperParams, ROMEHyperParams
from editdecay.editing.core import (TargetConfig, context_templates, module_io_at, optimise_targets, subject_last_index,
                                    fill, template_groups, template_keys)
from editdecay.evaluate.metrics import split_target
from editdecay.facts.record import FactRecord
from editdecay.models.arch import get_arch

from conftest import make_tiny_model
from fakes import spd, word_tokenizer

WORDS = ("The capital of France is Paris London Rome Germany Berlin a city in Europe Italy speaks French English "
         "Therefore Because I You we they it was and so").split()
REQS = [FactRecord("fr", "France", "The capital of {}", target_new="London", target_true="Paris"),
        FactRecord("de", "Germany", "The capital of {} is", target_new="Rome", target_true="Berlin"),
        FactRecord("it", "Italy", "{} speaks", target_new="English", target_true="French")]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


def _per_template_keys(model, tok, req, templates, layer):
    spec = get_arch(model)
    texts, pos = [], []
    for t in ["{}", *templates]:
        text, end = fill(t, req.prompt, req.subject)
        texts.append(text)
        pos.append(subject_last_index(tok, text, end))
    return module_io_at(model, tok, spec.rewrite_module_name(layer), texts, pos)[0].double()


def test_memit_keys_average_within_then_across_template_types(tok):
    model = make_tiny_model("llama", initializer_range=0.3)
    templates = context_templates(model, tok, [[4, 5]], seed=0)
    assert len(templates) == 6 and template_groups([[4, 5]]) == [1, 5]
    per = _per_template_keys(model, tok, REQS[0], templates[1:], 1)
    assert torch.linalg.matrix_rank(per) == 6  # one distinct key per template
    k_types = template_keys(model, tok, REQS[:1], templates[1:], 1, groups=[1, 5])[0][0].double()
    assert torch.allclose(k_types, 0.5 * per[0] + 0.5 * per[1:].mean(0), atol=1e-6)
    k_flat = template_keys(model, tok, REQS[:1], templates[1:], 1)[0][0].double()
    assert torch.allclose(k_flat, per.mean(0), atol=1e-6)  # ROME's compute_u: the flat mean
    assert not torch.allclose(k_types, k_flat, atol=1e-4)
    # the MEMIT editor solves with the type-averaged keys by default
    c = spd(64)
    hp = MEMITHyperParams(layers=[1], context_template_length_params=[[4, 5]], v_num_grad_steps=2,
                          mom2_update_weight=2.0)
    editor = MEMIT(hp, covariance=lambda m, t, l: c)
    editor._templates = templates
    res = editor.edit(model, tok, REQS[:1])
    assert torch.allclose(res.info["updates"][0]["keys"][0].double(), k_types, atol=1e-5)
    res.restore(model)
    with pytest.raises(ValueError, match="key_average"):
        MEMITHyperParams(key_average="median")


def test_rome_samples_context_templates_from_end_of_text(tok, monkeypatch):
    assert ROMEHyperParams().context_template_source == "eos"
    assert MEMITHyperParams().context_template_source == "seed_words"
    model = make_tiny_model("gpt2")
    starts = []
    real = model.generate

    def spy(ids, **kw):
        starts.append(ids[0].tolist())
        return real(ids, **kw)

    monkeypatch.setattr(model, "generate", spy)
    out = context_templates(model, tok, [[5, 10], [10, 10]], seed=0, source="eos")
    assert len(out) == 21 and out[0] == "{}" and all(t.endswith(". {}") for t in out[1:])
    assert starts == [[tok.eos_token_id]] * 2  # one call per length, all from the end-of-text token
    assert not any("<eos>" in t for t in out)  # the start token is not part of the prefix
    starts.clear()
    context_templates(model, tok, [[10, 5]], seed=0, source="seed_words")
    assert [tok.decode(s) for s in starts] == ["The", "Therefore", "Because", "I", "You"]


def test_alphaedit_records_how_the_null_space_was_chosen(tok, caplog):
    model = make_tiny_model("llama", initializer_range=0.3)
    evals = torch.cat([torch.full((32,), 1e-3), torch.full((32,), 1.0)]).double()
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    c = q @ torch.diag(evals) @ q.T
    base = dict(layers=[1], context_template_length_params=[[3, 2]], v_num_grad_steps=2)
    ed = AlphaEdit(AlphaEditHyperParams(**base), covariance=lambda m, t, l: c)
    res = ed.edit(model, tok, REQS[:1])
    info = res.info["nullspace"][1]
    assert info["rule"] == "absolute" and info["dims"] == 32 and info["fraction"] == 0.5
    res.restore(model)
    # all eigenvalues below the threshold: the fallback fires, is logged and recorded
    ed = AlphaEdit(AlphaEditHyperParams(**base, nullspace_fallback=0.7), covariance=lambda m, t, l: c * 1e-3)
    with caplog.at_level(logging.WARNING, logger="editdecay.editing.alphaedit"):
        res = ed.edit(model, tok, REQS[:1])
    info = res.info["nullspace"][1]
    assert info["rule"] == "fallback" and info["absolute_fraction"] == 1.0 and info["dims"] == round(0.7 * 64)
    assert any("fallback" in r.getMessage() for r in caplog.records)
    res.restore(model)


class _MergingTokenizer:
    """Greedy longest match over a tiny vocabulary with one token across a space."""

    vocab = ["is P", "is", " Paris", " ", "P", "a", "r", "i", "s", "The", " city"]

    def __call__(self, text):
        ids, i = [], 0
        while i < len(text):
            tid = max((j for j, v in enumerate(self.vocab) if text.startswith(v, i)), key=lambda j: len(self.vocab[j]))
            ids.append(tid)
            i += len(self.vocab[tid])
        return {"input_ids": ids}


def test_split_target_resplits_a_trailing_space_and_refuses_merges(tok):
    ctx, tgt = split_target(tok, "The capital of France is", "Paris")
    assert tok.decode(tgt) == "Paris" and ctx == tok("The capital of France is")["input_ids"]
    assert split_target(tok, "The capital of France is ", "Paris") == (ctx, tgt)
    merging = _MergingTokenizer()
    assert split_target(merging, "The city", "Paris")[1] == [2]
    with pytest.raises(ValueError, match="merges tokens across their boundary"):
        split_target(merging, "The cityis", "Paris")  # "is" + " P..." would become "is P"


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gpt_neox", "qwen2"])
def test_prefix_cache_matches_full_forwards_with_left_padded_prefixes(model_type, tok):
    # subjects at different depths give left-padded prefixes of different lengths in one chunk
    model = make_tiny_model(model_type, initializer_range=0.3)
    templates = ["{}", "The city was Paris and so it was. {}", "I. {}"]
    cfg = TargetConfig(layer=1, steps=6, weight_decay=0.1, clamp_norm_factor=100.0, loss_threshold=0.0)
    outs = {}
    for cached in (True, False):
        z, h, logs = optimise_targets(model, tok, REQS, templates, TargetConfig(**{**cfg.__dict__, "cache_prefix": cached}))
        outs[cached] = (z, h, [lg.losses for lg in logs])
    (z1, h1, l1), (z0, h0, l0) = outs[True], outs[False]
    assert torch.allclose(h1, h0, atol=1e-5)
    assert torch.allclose(torch.tensor(l1), torch.tensor(l0), rtol=1e-4, atol=1e-5)
    assert torch.allclose(z1, z0, rtol=1e-4, atol=1e-5)
    assert l1[0][-1] < l1[0][0]  # it optimises
