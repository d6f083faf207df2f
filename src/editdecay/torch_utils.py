"""Small torch helpers shared by the editors, the evaluators and the fine-tuning tasks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists: ``(ids, attention_mask)``, both ``[len(seqs), longest]``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(list(s))
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0 (padded
    positions are masked, so the choice never reaches a real position's output)."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's (first) parameters."""
    return next(module.parameters()).device
