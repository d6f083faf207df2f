"""Batched next-token probes.

Everything here runs one forward per batch of prompts: prompts are tokenised with the
tokenizer's defaults (BOS as the tokenizer adds it), sorted by length, right-padded,
and read at each prompt's last real token (explicit lengths, never the pad id). Only
the final hidden state at those positions goes through the unembedding.

The greedy "first non-stop token" (retention probe, seed 000 Eq. 1, mode ``greedy``):
take the argmax next token; while it is a stop token (see
:mod:`editdecay.facts.stopwords`) append it and decode on, re-batching only the prompts
still running, for at most ``max_steps`` tokens in all; reaching the cap is flagged.
Special tokens (EOS, chat markers) are never stop tokens: they end the search.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..facts.stopwords import is_stop_text, load_stopwords


@dataclass(frozen=True)
class TopToken:
    """One entry of a next-token top-k list."""

    id: int
    token: str
    prob: float


@dataclass(frozen=True)
class GreedyToken:
    """The first non-stop token of greedy decoding."""

    id: int | None
    """Token id, or None when the step cap was reached."""
    token: str
    """Decoded token text ('' when capped)."""
    steps: int
    """Tokens decoded, the non-stop one included (1 = the first token was non-stop)."""
    capped: bool
    """True when ``max_steps`` tokens were all stop tokens."""
    stop_prefix: tuple[int, ...] = ()
    """Stop tokens appended before the non-stop one."""


@dataclass(frozen=True)
class ProbeResult:
    prompt: str
    top: list[TopToken]
    first_non_stop: GreedyToken


def stop_token_mask(tokenizer, vocab_size: int, words: frozenset[str] | None = None) -> torch.Tensor:
    """Boolean mask over the vocabulary: True for stop tokens (special tokens: False)."""
    words = load_stopwords() if words is None else words
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    special = set(tokenizer.all_special_ids)
    for i, t in enumerate(texts):
        if i not in special and is_stop_text(t, words):
            mask[i] = True
    return mask


class Prober:
    """Batched next-token probes for one model and tokenizer.

    >>> prober = Prober(model, tok)
    >>> prober.probe(["The capital of France is"], k=3)[0].first_non_stop.token
    ' Paris'
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        batch_size: int = 32,
        max_steps: int = 8,
        stopwords: frozenset[str] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.stopwords = load_stopwords() if stopwords is None else stopwords
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.stop_mask = stop_token_mask(tokenizer, self.vocab_size, self.stopwords)

    # --- encoding and forward -----------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt (tokenizer defaults, no padding)."""
        return [list(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    @torch.inference_mode()
    def last_logits(self, seqs: Sequence[Sequence[int]]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield ``(indices, logits)`` per batch: fp32 next-token logits [b, V] of
        ``seqs[indices]`` at their last token. Batches group similar lengths."""
        device = self.model.get_output_embeddings().weight.device
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            lengths = torch.tensor([len(seqs[i]) for i in idx])
            if int(lengths.min()) == 0:
                raise ValueError("cannot probe an empty prompt")
            width = int(lengths.max())
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            hidden = self._final_hidden(ids.to(device), mask.to(device))
            last = hidden[torch.arange(len(idx), device=device), (lengths - 1).to(device)]
            logits = self.model.get_output_embeddings()(last).float()
            yield idx, logits

    def _final_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final (normed) hidden states [b, t, d] from the base model."""
        out = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.last_hidden_state

    # --- probes ---------------------------------------------------------------------------
    def top_k(self, prompts: Sequence[str], k: int = 5) -> list[list[TopToken]]:
        """The ``k`` most probable next tokens of each prompt."""
        return [r.top for r in self.probe(prompts, k)]

    def first_non_stop(self, prompts: Sequence[str]) -> list[GreedyToken]:
        """The first non-stop token of greedy decoding for each prompt."""
        return [r.first_non_stop for r in self.probe(prompts, 0)]

    def probe(self, prompts: Sequence[str], k: int = 5) -> list[ProbeResult]:
        """Top-k next tokens and the greedy first non-stop token, one pass per step."""
        seqs = self.encode(prompts)
        tops: list[list[TopToken]] = [[] for _ in seqs]
        greedy: list[GreedyToken | None] = [None] * len(seqs)
        running: dict[int, list[int]] = {}  # prompt index -> stop tokens appended so far
        for idx, logits in self.last_logits(seqs):
            if k > 0:
                probs = logits.softmax(-1)
                p, t = probs.topk(min(k, probs.shape[-1]), dim=-1)
                for r, i in enumerate(idx):
                    ids = t[r].tolist()
                    texts = self.tokenizer.batch_decode([[j] for j in ids])
                    tops[i] = [TopToken(j, s, float(q)) for j, s, q in zip(ids, texts, p[r].tolist())]
            self._greedy_step(idx, logits, running, greedy)
        step = 1
        while running and step < self.max_steps:
            step += 1
            keys = list(running)
            ext = [seqs[i] + running[i] for i in keys]
            for idx, logits in self.last_logits(ext):
                self._greedy_step([keys[j] for j in idx], logits, running, greedy)
        for i, prefix in running.items():
            greedy[i] = GreedyToken(None, "", len(prefix), True, tuple(prefix))
        return [ProbeResult(p, t, g) for p, t, g in zip(prompts, tops, greedy)]

    def _greedy_step(self, idx: list[int], logits: torch.Tensor, running: dict, greedy: list) -> None:
        arg = logits.argmax(-1).tolist()
        for i, tok_id in zip(idx, arg):
            prefix = running.get(i, [])
            if self.stop_mask[tok_id]:
                running[i] = prefix + [tok_id]
            else:
                running.pop(i, None)
                text = self.tokenizer.decode([tok_id])
                greedy[i] = GreedyToken(tok_id, text, len(prefix) + 1, False, tuple(prefix))
