"""Default covariance provider for editors: second-moment statistics of a corpus,
cached on disk (see :mod:`editdecay.editing.stats`)."""

from __future__ import annotations

import torch
from torch import nn


def default_covariance(
    model: nn.Module, tokenizer, layer: int, *, corpus: str | None = None, token_multiple: int = 20,
    max_length: int = 256, cache_dir=None,
) -> torch.Tensor:
    """C = E[kkᵀ] of ``layer``'s rewrite-module keys over ``corpus`` (a path; None: the
    offline default), ``token_multiple``·d_k tokens, cached."""
    return default_covariances(model, tokenizer, [layer], corpus=corpus, token_multiple=token_multiple,
                               max_length=max_length, cache_dir=cache_dir)[layer]


def default_covariances(
    model: nn.Module, tokenizer, layers: list[int], *, corpus: str | None = None, token_multiple: int = 20,
    max_length: int = 256, cache_dir=None,
) -> dict[int, torch.Tensor]:
    """:func:`default_covariance` for several layers in one corpus pass."""
    from .corpus import Corpus
    from .stats import StatsCache, second_moments

    c = Corpus.from_path(corpus) if corpus else Corpus.offline_default()
    return second_moments(model, tokenizer, layers, c, token_multiple=token_multiple, max_length=max_length,
                          cache=StatsCache(cache_dir))
