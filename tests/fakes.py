"""A bigram language model with hand-set next-token probabilities, for tests whose
expected values are computed by hand. Word-level tokenizer (whitespace), no BOS."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<eos>", "<unk>", *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    tok.padding_side = "right"
    return tok


class _Base(nn.Module):
    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False, **_):
        return SimpleNamespace(last_hidden_state=self.table[input_ids], past_key_values=None)


class BigramLM(nn.Module):
    """Next-token distribution depends only on the last token: ``probs[last][next]``.

    ``probs`` maps a word to {next word: probability}; the remaining mass is spread
    uniformly over all other tokens.
    """

    def __init__(self, tok, probs: dict[str, dict[str, float]]) -> None:
        super().__init__()
        vocab = tok.get_vocab()
        v = len(vocab)
        table = torch.zeros(v, v)
        for w, nxt in probs.items():
            row = torch.full((v,), 0.0)
            rest = 1.0 - sum(nxt.values())
            others = [i for i in range(v) if i not in {vocab[n] for n in nxt}]
            for i in others:
                row[i] = rest / len(others)
            for n, p in nxt.items():
                row[vocab[n]] = p
            table[vocab[w]] = row.clamp_min(1e-12).log()
        for i in range(v):
            if table[i].abs().sum() == 0:  # unspecified: uniform
                table[i] = torch.full((v,), -torch.log(torch.tensor(float(v))))
        self.base_model = _Base(table)
        self.head = nn.Linear(v, v, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(v))
        self.config = SimpleNamespace(model_type="bigram", _name_or_path="bigram")

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def capital_lm():
    """(model, tokenizer) of the hand-set bigram model used by the metric and selection
    tests: after 'is' p(the)=.5, p(Paris)=.3, p(London)=.15; after 'the' p(London)=.7,
    p(Paris)=.2, p(city)=.1; after 'speaks' p(French)=.6, p(English)=.25."""
    tok = word_tokenizer("The capital of France is the city Paris London Rome , Germany speaks French English".split())
    model = BigramLM(tok, {
        "is": {"the": 0.5, "Paris": 0.3, "London": 0.15},
        "the": {"London": 0.7, "Paris": 0.2, "city": 0.1},
        "speaks": {"French": 0.6, "English": 0.25},
    })
    return model, tok


def spd(d: int, seed: int = 0) -> torch.Tensor:
    """A random symmetric positive-definite float64 matrix (a stand-in covariance)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
