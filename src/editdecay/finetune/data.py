"""Unstructured text for fine-tuning: packed token blocks, a seeded endless batch
stream, and a validation set sampled from the training blocks (seed 000)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import torch


def pack_blocks(tokenizer, texts: Iterable[str], block_size: int) -> list[list[int]]:
    """Concatenate the documents (EOS between them) and cut blocks of ``block_size``."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t)["input_ids"]
        if eos is not None:
            stream.append(eos)
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def split_validation(blocks: list[list[int]], n_val: int, seed: int = 0) -> list[list[int]]:
    """A fixed sample of the training blocks (seed 000: validation sampled from train)."""
    rng = random.Random(seed)
    return rng.sample(blocks, min(n_val, len(blocks)))


def to_batch(blocks: list[list[int]], device=None) -> dict[str, torch.Tensor]:
    ids = torch.tensor(blocks, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def batch_stream(blocks: list[list[int]], batch_size: int, seed: int = 0, device=None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (reshuffled each epoch, seeded)."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(blocks)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield to_batch([blocks[j] for j in order[i : i + batch_size]], device)


@torch.no_grad()
def eval_loss(model, blocks: list[list[int]], batch_size: int = 8, device=None) -> float:
    """Mean token loss over the blocks."""
    total, n = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        b = to_batch(blocks[i : i + batch_size], device)
        out = model(**b)
        k = b["input_ids"].numel() - b["input_ids"].shape[0]
        total += float(out.loss) * k
        n += k
    return total / max(n, 1)
