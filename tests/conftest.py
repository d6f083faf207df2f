"""Shared fixtures: the embedded model (loaded once per session), tiny random models of
every registered architecture, and the shared offline data directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (CI fails early if it is missing)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def selection_cache(tmp_path_factory) -> Path:
    """A cache root shared by the tests that run the confidence filter on the built-in
    facts: the first computes it from scratch, the others hit it. Model weights come
    from the user's cache (linked in), so pointing $EDITDECAY_CACHE here stays cheap."""
    from editdecay.cache import cache_root

    root = tmp_path_factory.mktemp("editdecay-cache")
    models = cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(models, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32 on CPU.

    Tests must not modify its weights (or must restore them exactly).
    """
    from editdecay import load_model

    torch.manual_seed(0)
    return load_model(device="cpu")


TINY_CONFIGS = {
    "gpt2": lambda: __import__("transformers").GPT2Config(
        n_layer=3, n_embd=32, n_head=4, n_inner=64, vocab_size=101, n_positions=64, bos_token_id=1, eos_token_id=1),
    "gptj": lambda: __import__("transformers").GPTJConfig(
        n_layer=3, n_embd=32, n_head=4, n_inner=64, rotary_dim=4, vocab_size=101, n_positions=64, bos_token_id=1, eos_token_id=1),
    "gpt_neox": lambda: __import__("transformers").GPTNeoXConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        vocab_size=101, max_position_embeddings=64, bos_token_id=1, eos_token_id=1),
    "llama": lambda: __import__("transformers").LlamaConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=1),
    "mistral": lambda: __import__("transformers").MistralConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=101, max_position_embeddings=64, bos_token_id=1, eos_token_id=1),
    "qwen2": lambda: __import__("transformers").Qwen2Config(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=101, max_position_embeddings=64, bos_token_id=1, eos_token_id=1),
    "qwen3": lambda: __import__("transformers").Qwen3Config(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, vocab_size=101, max_position_embeddings=64, bos_token_id=1, eos_token_id=1),
}


def make_tiny_model(model_type: str, seed: int = 0, **config):
    """A tiny randomly initialised causal LM of ``model_type`` (no downloads);
    ``config`` overrides config fields (e.g. ``initializer_range``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = TINY_CONFIGS[model_type]()
    for k, v in config.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


@pytest.fixture(scope="session")
def target_cache():
    """One TargetCache for the session: MEMIT and AlphaEdit tests on the same weights,
    facts and target settings share the optimised z (the study runner's reuse)."""
    from editdecay.editing.core import TargetCache

    return TargetCache()


@pytest.fixture(scope="session")
def cf_facts10(embedded, shared_data, selection_cache):
    """10 confidence-filtered CounterFact facts (distinct subjects) for edit tests."""
    from editdecay.facts.datasets import load_facts
    from editdecay.facts.selection import confidence_filter

    model, tok = embedded
    pool = load_facts(shared_data / "counterfact" / "counterfact-val.json")[:400]
    passed = [f for f, o in zip(pool, confidence_filter(model, tok, pool, cache_dir=selection_cache)) if o.passed]
    facts = list({f.subject: f for f in passed}.values())[:10]
    assert len(facts) == 10
    return facts
