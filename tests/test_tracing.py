"""Causal tracing: known answers on tiny models, one fact on the embedded model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from fakes import word_tokenizer

from editdecay.evaluate.tracing import (
    effect_plot,
    heatmap,
    noise_scale,
    restoration_probs,
    suggest_edit_layers,
    trace,
    trace_facts,
    window_layers,
)
from editdecay.facts.record import FactRecord

WORDS = ["the", "eiffel", "tower", "is", "located", "in", "city", "of", "paris", "big", "red", "dog", "sat", "on", "a", "mat"]
PROMPT = "the {} is located in the city of"
SUBJECT = "eiffel tower"


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama", num_hidden_layers=4, initializer_range=0.2)


def test_window_rule_matches_rome():
    assert window_layers(0, 10, 30) == list(range(5))
    assert window_layers(12, 10, 30) == list(range(7, 17))
    assert window_layers(29, 10, 30) == list(range(24, 30))
    assert window_layers(3, 1, 30) == [3]
    assert window_layers(3, 3, 30) == [2, 3, 4]
    with pytest.raises(ValueError):
        window_layers(3, 0, 30)


def test_zero_noise_restores_nothing_to_restore(tiny, tok):
    res = trace(tiny, tok, PROMPT, SUBJECT, noise=0.0, n_samples=2)
    assert res.corrupted_prob == pytest.approx(res.clean_prob, abs=1e-6)
    for kind in ("overall", "mlp", "attn"):
        assert res.scores[kind].shape == (9, 4)
        np.testing.assert_allclose(res.scores[kind], res.clean_prob, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gptj", "gpt_neox", "qwen2"])
def test_full_restoration_gives_the_clean_prediction(model_type, tok):
    tiny = make_tiny_model(model_type, initializer_range=0.2)  # 3 blocks
    res = trace(tiny, tok, PROMPT, SUBJECT, n_samples=4, noise=3.0, kinds=("overall",), tokens="last")
    assert abs(res.corrupted_prob - res.clean_prob) > 1e-3  # the noise does change p(answer)
    s, e = res.subject_range
    assert (s, e) == (1, 3) and res.tokens[s:e] == ["eiffel", "tower"]
    # the final block's output at the last token is all the unembedding sees
    assert res.scores["overall"][-1, -1] == pytest.approx(res.clean_prob, abs=1e-5)
    assert np.isnan(res.scores["overall"][:-1]).all()
    everything = [[(t, layer) for t in range(9) for layer in range(3)]]
    for kind in ("overall", "mlp", "attn"):
        probs, clean, corrupted = restoration_probs(tiny, tok, PROMPT, SUBJECT, [[], *everything], kind=kind,
                                                    n_samples=4, noise=3.0)
        assert clean == pytest.approx(res.clean_prob) and corrupted == pytest.approx(res.corrupted_prob)
        assert probs[0] == pytest.approx(corrupted, abs=1e-6)
        if kind == "overall":
            assert probs[1] == pytest.approx(clean, abs=1e-5)


def test_tokens_before_the_subject_and_batching(tiny, tok):
    a = trace(tiny, tok, PROMPT, SUBJECT, n_samples=3, noise=2.0, seed=1, batch_rows=200)
    b = trace(tiny, tok, PROMPT, SUBJECT, n_samples=3, noise=2.0, seed=1, batch_rows=3)  # one restoration a forward
    for kind in a.scores:
        np.testing.assert_allclose(a.scores[kind], b.scores[kind], atol=1e-6)
        np.testing.assert_allclose(a.scores[kind][0], a.corrupted_prob)  # "the" precedes the subject
    # the corruption is seeded
    c = trace(tiny, tok, PROMPT, SUBJECT, n_samples=3, noise=2.0, seed=2, kinds=("overall",), tokens="last")
    assert c.corrupted_prob != pytest.approx(a.corrupted_prob, abs=1e-9)
    # restoring one block output at the last token = that cell of the trace
    probs, *_ = restoration_probs(tiny, tok, PROMPT, SUBJECT, [[(8, 2)]], n_samples=3, noise=2.0, seed=1)
    assert probs[0] == pytest.approx(a.scores["overall"][8, 2], abs=1e-6)
    # window 10 on 4 layers restores every MLP at the token: same for each layer
    assert np.ptp(a.scores["mlp"][2]) < 1e-6
    d = a.to_json()
    json.dumps(d, allow_nan=False)
    assert d["scores"]["overall"][0][0] == pytest.approx(a.corrupted_prob) and d["window"] == {"overall": 1, "mlp": 10, "attn": 10}


def test_target_and_noise_scale(tiny, tok):
    sigma = noise_scale(tiny)
    assert sigma == pytest.approx(3 * float(tiny.get_input_embeddings().weight.detach().std()))
    res = trace(tiny, tok, PROMPT, SUBJECT, target="paris", kinds=("overall",), tokens="last", n_samples=2)
    assert res.answer == "paris" and res.answer_id == tok.convert_tokens_to_ids("paris")
    assert res.noise == pytest.approx(sigma)


def test_trace_facts_and_figures(tiny, tok, tmp_path):
    facts = [
        FactRecord(case_id="1", subject=SUBJECT, prompt=PROMPT, target_new="mat"),
        ("the {} sat on a", "big red dog"),
        ("a mat is in the city of", "mat", "paris"),
    ]
    res = trace_facts(tiny, tok, facts, n_samples=2, progress=False)
    assert set(res.effects) == {"overall", "mlp", "attn"} and res.effects["mlp"].shape == (3, 4)
    assert res.answers[2] == "paris" and res.texts[0] == "the eiffel tower is located in the city of"
    single = trace(tiny, tok, PROMPT, SUBJECT, n_samples=2, tokens="subject_last")
    np.testing.assert_allclose(res.effects["overall"][0], single.effect("overall")[2], atol=1e-6)
    assert set(res.peak_layers()) == {"overall", "mlp", "attn"}
    json.dumps(res.to_json(), allow_nan=False)
    last = trace_facts(tiny, tok, facts[:1], n_samples=2, position="last", kinds=("overall",), progress=False)
    assert last.effects["overall"][0, -1] == pytest.approx(last.clean_probs[0] - last.corrupted_probs[0], abs=1e-5)
    for f, path in [(heatmap, tmp_path / "h.png"), (effect_plot, tmp_path / "e.png")]:
        out = f(single if f is heatmap else res, path)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suggest_edit_layers():
    curve = np.array([0.0, 0.1, 0.3, 0.5, 0.9, 0.4, 0.35, 0.0, 0.0, 0.0])
    assert suggest_edit_layers(curve, n=5) == (4, [2, 3, 4, 5, 6])
    assert suggest_edit_layers(curve, n=1) == (4, [4])
    assert suggest_edit_layers(curve, n=3) == (4, [3, 4, 5])
    assert suggest_edit_layers([1.0, 0.5, 0.2, 0.0], n=2) == (0, [0, 1])  # clipped at the first layer
    assert suggest_edit_layers([0.0, 0.2, 0.5, 1.0], n=3) == (3, [1, 2, 3])  # and at the last
    assert suggest_edit_layers([0.0, 1.0], n=5) == (1, [0, 1])
    assert suggest_edit_layers([5.0, 0.1, 0.3, 0.2, 0.0, 0.1], n=2, min_layer=1) == (2, [2, 3])
    assert suggest_edit_layers([5.0, 0.1, 0.3], n=5, min_layer=1) == (2, [1, 2])


def test_embedded_eiffel_tower(embedded):
    model, tok = embedded
    torch.manual_seed(0)
    res = trace(model, tok, "The Eiffel Tower is located in the city of", "The Eiffel Tower", kinds=("overall",),
                tokens="last", n_samples=3)
    assert res.answer == " Paris" and res.subject_range == (0, 4)
    assert res.corrupted_prob < res.clean_prob - 0.1
    assert res.scores["overall"][-1, -1] == pytest.approx(res.clean_prob, abs=1e-5)
