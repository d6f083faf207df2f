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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

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


PROBE_MODES = ("greedy", "masked_argmax")


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced score of a target continuation."""

    logprobs: tuple[float, ...]
    """log p of each target token given the context and the target tokens before it."""
    argmax: tuple[bool, ...]
    """Whether each target token is the model's argmax at its position."""

    @property
    def mean_nll(self) -> float:
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def token_accuracy(self) -> float:
        return sum(self.argmax) / len(self.argmax)


@dataclass(frozen=True)
class ProbeResult:
    prompt: str
    top: list[TopToken]
    """Top-k raw next tokens at the first position."""
    first_non_stop: GreedyToken
    extra: Any = None
    """What ``at_decision`` returned for this prompt (None if not given or capped)."""


def carrier_sequences(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[list[list[int]], list[list[int]]]:
    """The fewest ``context + target`` sequences that score every pair by teacher forcing,
    and per sequence the pairs read off it. A pair ``(c, t)`` is read off a sequence that
    starts with ``c + t[:-1]``: longer targets are placed first, shorter ones of the same
    context join the first sequence that already holds their prefix."""
    seqs: list[list[int]] = []
    readers: list[list[int]] = []
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i in sorted(range(len(pairs)), key=lambda i: -len(pairs[i][1])):
        c, t = tuple(pairs[i][0]), tuple(pairs[i][1])
        need = list(c + t[:-1])
        for s in by_ctx.get(c, ()):
            if seqs[s][: len(need)] == need:
                readers[s].append(i)
                break
        else:
            by_ctx.setdefault(c, []).append(len(seqs))
            seqs.append(list(c + t))
            readers.append([i])
    return seqs, readers


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
        progress: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.progress = progress
        self.stopwords = load_stopwords() if stopwords is None else stopwords
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.stop_mask = stop_token_mask(tokenizer, self.vocab_size, self.stopwords)

    # --- encoding and forward -----------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt (tokenizer defaults, no padding)."""
        return [list(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    def _batches(self, seqs: Sequence[Sequence[int]], desc: str = "") -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(indices, ids, mask, lengths)``: right-padded batches of similar length
        (a progress bar on stderr when ``desc`` is given and there are many batches)."""
        device = self.model.get_output_embeddings().weight.device
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        starts = range(0, len(order), self.batch_size)
        show = bool(desc) and self.progress and len(starts) >= 8
        for start in tqdm(starts, desc=desc, unit="batch", disable=not show, leave=False):
            idx = order[start : start + self.batch_size]
            lengths = torch.tensor([len(seqs[i]) for i in idx])
            if int(lengths.min()) == 0:
                raise ValueError("cannot probe an empty prompt")
            ids = torch.full((len(idx), int(lengths.max())), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            yield idx, ids.to(device), mask.to(device), lengths.to(device)

    @torch.inference_mode()
    def score_targets(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, share: bool = True) -> list["TargetScore"]:
        """Teacher-forced scores of each ``(context_ids, target_ids)`` pair: per target
        token its log-probability and whether it is the argmax. One forward per batch;
        only target positions go through the unembedding. Pairs share a sequence where
        they can: a target is read off any sequence that starts with its context and all
        of its tokens but the last (so a fact's true and new single-token objects cost one
        sequence, not two); ``share=False``: one sequence per pair."""
        for j, (c, t) in enumerate(pairs):
            if not c or not t:
                raise ValueError(f"pair {j}: context and target must be non-empty")
        if share:
            seqs, readers = carrier_sequences(pairs)
        else:
            seqs, readers = [list(c) + list(t) for c, t in pairs], [[i] for i in range(len(pairs))]
        out: list[TargetScore | None] = [None] * len(pairs)
        unembed = self.model.get_output_embeddings()
        for idx, ids, mask, _ in self._batches(seqs, desc="score targets"):
            rows, cols, tgts, order = [], [], [], []
            for r, s in enumerate(idx):
                for i in readers[s]:
                    n_ctx, n_tgt = len(pairs[i][0]), len(pairs[i][1])
                    rows += [r] * n_tgt
                    cols += range(n_ctx - 1, n_ctx + n_tgt - 1)
                    tgts += list(pairs[i][1])
                    order.append(i)
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            h = hidden[torch.tensor(rows, device=ids.device), torch.tensor(cols, device=ids.device)]
            logp = unembed(h).float().log_softmax(-1)
            t = torch.tensor(tgts, device=ids.device)
            lp = logp.gather(1, t[:, None])[:, 0].tolist()
            ok = (logp.argmax(-1) == t).tolist()
            pos = 0
            for i in order:
                n = len(pairs[i][1])
                out[i] = TargetScore(tuple(lp[pos : pos + n]), tuple(ok[pos : pos + n]))
                pos += n
        return out  # type: ignore[return-value]

    def top_k(self, prompts: Sequence[str], k: int = 5) -> list[list[TopToken]]:
        """The ``k`` most probable next tokens of each prompt."""
        return [r.top for r in self.probe(prompts, k)]

    def first_non_stop(self, prompts: Sequence[str], mode: str = "greedy") -> list[GreedyToken]:
        """The first non-stop token of each prompt (``greedy`` or ``masked_argmax``)."""
        return [r.first_non_stop for r in self.probe(prompts, 0, mode=mode)]

    @torch.inference_mode()
    def probe(
        self,
        prompts: Sequence[str],
        k: int = 5,
        *,
        mode: str = "greedy",
        at_decision: Callable[[int, torch.Tensor], Any] | None = None,
        seqs: Sequence[Sequence[int]] | None = None,
    ) -> list[ProbeResult]:
        """Top-k next tokens and the first non-stop token of each prompt.

        ``mode``: ``greedy`` (decode on through stop tokens) or ``masked_argmax``
        (argmax over non-stop tokens at the first position). Greedy steps after the
        first feed one token per prompt through the batch's KV cache (the prompt is
        never recomputed) and stop as soon as no prompt of the batch still runs.
        ``at_decision(i, probs)``, if given, is called with prompt ``i``'s full
        next-token distribution at the position where its first non-stop token was
        decided (not for capped prompts); its results land in ``ProbeResult.extra``.
        ``seqs`` overrides the tokenisation of ``prompts``.
        """
        if mode not in PROBE_MODES:
            raise ValueError(f"unknown probe mode {mode!r}: use one of {', '.join(PROBE_MODES)}")
        seqs = self.encode(prompts) if seqs is None else [list(x) for x in seqs]
        tops: list[list[TopToken]] = [[] for _ in seqs]
        decided: list[GreedyToken | None] = [None] * len(seqs)
        extra: list[Any] = [None] * len(seqs)
        unembed = self.model.get_output_embeddings()
        stop_mask = self.stop_mask.to(unembed.weight.device)
        for idx, ids, mask, lengths in self._batches(seqs, desc=f"probe ({mode})"):
            rows = torch.arange(len(idx), device=ids.device)
            out = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=mode == "greedy")
            probs = unembed(out.last_hidden_state[rows, lengths - 1]).float().softmax(-1)
            if k > 0:
                p, t = probs.topk(min(k, probs.shape[-1]), dim=-1)
                for r, i in enumerate(idx):
                    tids = t[r].tolist()
                    texts = self.tokenizer.batch_decode([[j] for j in tids])
                    tops[i] = [TopToken(j, x, float(q)) for j, x, q in zip(tids, texts, p[r].tolist())]
            if mode == "masked_argmax":
                choice = probs.masked_fill(stop_mask, -1.0).argmax(-1).tolist()
                for r, (i, tok_id) in enumerate(zip(idx, choice)):
                    decided[i] = GreedyToken(tok_id, self.tokenizer.decode([tok_id]), 1, False)
                    if at_decision is not None:
                        extra[i] = at_decision(i, probs[r])
                continue
            prefix: list[list[int]] = [[] for _ in idx]
            running = set(range(len(idx)))
            pad = ids[0, 0].new_tensor(self.tokenizer.pad_token_id or 0)
            for step in range(1, self.max_steps + 1):
                arg = probs.argmax(-1).tolist()
                for r in sorted(running):
                    if stop_mask[arg[r]]:
                        prefix[r].append(arg[r])
                    else:
                        running.discard(r)
                        i = idx[r]
                        decided[i] = GreedyToken(arg[r], self.tokenizer.decode([arg[r]]), step, False, tuple(prefix[r]))
                        if at_decision is not None:
                            extra[i] = at_decision(i, probs[r])
                if not running or step == self.max_steps:
                    break
                # one more token per prompt through the cache (finished rows feed a pad, ignored)
                nxt = torch.stack([ids.new_tensor(prefix[r][-1]) if r in running else pad for r in range(len(idx))])
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = (lengths + step - 1)[:, None]
                out = self.model.base_model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                                            past_key_values=out.past_key_values, use_cache=True)
                probs = unembed(out.last_hidden_state[:, -1]).float().softmax(-1)
            for r in running:
                decided[idx[r]] = GreedyToken(None, "", len(prefix[r]), True, tuple(prefix[r]))
        return [ProbeResult(p, t, g, e) for p, t, g, e in zip(prompts, tops, decided, extra)]
