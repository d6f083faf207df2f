"""Edit-preserving fine-tuning: keep the edited modules' outputs at the edited keys.

A locate-then-edit method (ROME, MEMIT, AlphaEdit) writes a fact as a new value
v* = (W + ΔW) k* of the rewrite module (the MLP output projection) at the subject key k*
(its input at the subject's last token). Fine-tuning that changes W k* erodes the fact.
The methods (``--preserve-edits METHOD``, study axis ``preserve``):

- ``anchor``: add μ · mean over keys of ‖W' k − v*‖² (v* measured before fine-tuning)
  to the loss, on every edited block's rewrite module. μ = 0 is plain fine-tuning.
- ``nullspace``: after every optimiser step, project the step of each edited rewrite
  module onto the orthogonal complement of the keys' span: ΔW ← ΔW (I − Q Qᵀ), Q an
  orthonormal basis of the keys. W' k = W k then holds exactly (not only to first order:
  projecting the *gradient* would not survive Adam's per-coordinate scaling or weight
  decay); the module's bias, if it trains, is held. For LoRA the adapter's input side is projected, A ← A (I − Q Qᵀ), so
  B A k = 0; for DoRA the magnitude re-normalisation makes it approximate. AlphaEdit's
  idea applied to fine-tuning.
- ``replay``: mix the edit prompts and paraphrases, each followed by its new object,
  into the training loss at rate ρ: loss = (1 − ρ) · task + ρ · replay (target tokens).
- ``distill``: (1 − ρ) · task + ρ · cross-entropy to the *edited model's* next-token
  distributions (its top ``DISTILL_TOPK`` tokens and the rest as one, measured before
  fine-tuning) on the edit prompts and paraphrases (every target position, teacher-forced
  with the new object) and on the facts' neighbourhood prompts (the answer position).
  Replay's hard targets teach the relation's prompts the new objects in general; the
  neighbourhood half holds the other subjects of the same relations where the edited
  model had them. Each step takes ``replay_batch`` edit rows (as replay) and as many
  neighbourhood rows. The neighbourhood prompts are NS's prompts: NS of a distilled run
  measures what was trained on.
- ``freeze-edited``: seed 000's mitigation — the layer policy ``non-edited``.

The keys are measured on the edited model from the edited facts: the rewrite prompt
and each paraphrase that contains the subject, at the subject's last token, for every
edited block (so they cover what the probes ask, not only the editor's own k*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..errors import EditdecayError
from ..facts.record import FactRecord
from ..models.arch import get_arch

PRESERVE_METHODS = ("none", "anchor", "nullspace", "replay", "distill", "freeze-edited")
DISTILL_TOPK = 64
"""distill: the edited model's distribution is kept as its top this-many tokens."""


@dataclass
class PreserveConfig:
    """How fine-tuning preserves edits."""

    method: str = field(default="none", metadata={"help": "none | anchor | nullspace | replay | distill | freeze-edited."})
    mu: float = field(default=1.0, metadata={"help": "anchor: weight μ of the mean squared drift ‖W'k − v*‖² of the edited modules' outputs at the edited keys."})
    rho: float = field(default=0.1, metadata={"help": "replay, distill: share ρ of the loss given to the edit prompts and paraphrases (distill: and the neighbourhood prompts) (0 < ρ < 1)."})
    replay_batch: int = field(default=4, metadata={"help": "replay, distill: edit examples per optimiser step (distill: as many neighbourhood prompts besides)."})

    def __post_init__(self) -> None:
        if self.method not in PRESERVE_METHODS:
            raise EditdecayError(f"unknown preserve method {self.method!r}: use one of {', '.join(PRESERVE_METHODS)}")
        if self.mu < 0:
            raise EditdecayError(f"preserve mu must be >= 0, got {self.mu}")
        if not 0 < self.rho < 1:
            raise EditdecayError(f"preserve rho must be in (0, 1), got {self.rho}")


def key_prompts(facts: Sequence[FactRecord]) -> list[FactRecord]:
    """One record per prompt whose key is kept: the rewrite prompt and each paraphrase
    containing the subject (as a template with ``{}`` at the subject's last mention)."""
    out = []
    for f in facts:
        out.append(f)
        for p in f.paraphrases:
            i = p.rfind(f.subject)
            if i >= 0:
                out.append(FactRecord(f.case_id, f.subject, p[:i] + "{}" + p[i + len(f.subject):], f.target_new))
    return out


def edit_keys(model: nn.Module, tokenizer, facts: Sequence[FactRecord], blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Keys [n, d_k] of each block's rewrite module at the facts' subjects (fp32)."""
    from ..editing.core import subject_keys

    return subject_keys(model, tokenizer, key_prompts(facts), blocks)


def _lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Preserver:
    """Hooks the trainer calls: ``loss`` (the step's total loss from the task loss),
    ``before_step`` and ``after_step`` (around each optimiser step)."""

    def loss(self, model: nn.Module, task_loss: torch.Tensor) -> torch.Tensor:
        return task_loss

    def before_step(self, model: nn.Module) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        pass


class Anchor(Preserver):
    """μ · mean_k ‖W' k − v*‖² over the edited rewrite modules."""

    def __init__(self, model: nn.Module, keys: dict[int, torch.Tensor], mu: float) -> None:
        spec = get_arch(_lm(model))
        self.mu = mu
        self.items = []
        with torch.no_grad():
            for b, k in keys.items():
                mod = _lm(model).get_submodule(spec.rewrite_module_name(b))
                k = k.to(next(mod.parameters()).device)
                self.items.append((mod, k, _eval_forward(mod, k).detach()))

    def loss(self, model, task_loss):
        pen = sum(((_eval_forward(mod, k) - v) ** 2).sum(-1).mean() for mod, k, v in self.items)
        return task_loss + self.mu * pen


def _eval_forward(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's output with dropout off (no random numbers drawn)."""
    was = mod.training
    mod.eval()
    try:
        return mod(x)
    finally:
        mod.train(was)


class NullSpace(Preserver):
    """Project each step of the edited rewrite modules off the keys' span."""

    def __init__(self, model: nn.Module, keys: dict[int, torch.Tensor]) -> None:
        spec = get_arch(_lm(model))
        self.targets = []  # (parameter, Q [d_in, r] fp64, Conv1D layout, is a LoRA A)
        for b, k in keys.items():
            mod = _lm(model).get_submodule(spec.rewrite_module_name(b))
            q, s, _ = torch.linalg.svd(k.double().T, full_matrices=False)
            q = q[:, : int((s > s[0] * 1e-6).sum())]
            lora = getattr(mod, "lora_A", None)
            is_a = lora is not None and len(lora) > 0
            w = next(iter(lora.values())).weight if is_a else mod.weight  # A is (r, in) also for Conv1D
            if w.requires_grad:
                self.targets.append((w, q.to(w.device), spec.conv1d and not is_a, is_a))
            bias = getattr(getattr(mod, "base_layer", mod), "bias", None)
            if bias is not None and bias.requires_grad:  # a bias shift moves every output: held
                self.targets.append((bias, None, False, False))
        self.prev: list[torch.Tensor] = []
        with torch.no_grad():  # LoRA: A k = 0 from the start (B = 0 there, so the model is unchanged)
            for w, q, conv, is_a in self.targets:
                if is_a:
                    w.copy_(_project(w.double(), q, conv).to(w.dtype))

    def before_step(self, model):
        self.prev = [w.detach().clone() for w, *_ in self.targets]

    def after_step(self, model):
        with torch.no_grad():
            for (w, q, conv, _), w0 in zip(self.targets, self.prev):
                if q is None:
                    w.copy_(w0)
                    continue
                step = (w - w0).double()
                w.copy_((w0.double() + _project(step, q, conv)).to(w.dtype))


def _project(m: torch.Tensor, q: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """m (I − Q Qᵀ) on the input side: m is (·, in), or (in, ·) for Conv1D weights."""
    if conv1d:
        return m - q @ (q.T @ m)
    return m - (m @ q) @ q.T


def _edit_rows(tokenizer, facts: Sequence[FactRecord]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, new-object ids) of every fact's rewrite prompt and paraphrases."""
    from ..evaluate.metrics import split_target

    return [split_target(tokenizer, prompt, f.target_new) for f in facts for prompt in (f.text, *f.paraphrases)]


def _cycle(rows: list, at: int, n: int) -> tuple[list, int]:
    """``n`` rows from position ``at`` on, wrapping round, and the next position."""
    return [rows[(at + i) % len(rows)] for i in range(n)], (at + n) % max(len(rows), 1)


class Replay(Preserver):
    """(1 − ρ) · task loss + ρ · LM loss of the edit prompts' new objects."""

    def __init__(self, model: nn.Module, tokenizer, facts: Sequence[FactRecord], rho: float, batch: int) -> None:
        self.rho, self.batch, self.at = rho, batch, 0
        self.rows = _edit_rows(tokenizer, facts)
        if not self.rows:
            raise EditdecayError("replay needs edited facts")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.lm = model  # the language model (a task wrapper such as a classification head is bypassed)
        self.device = next(model.parameters()).device

    def next_batch(self) -> dict[str, torch.Tensor]:
        from ..editing.core import _pad

        rows, self.at = _cycle(self.rows, self.at, self.batch)
        ids, mask = _pad([[*p, *t] for p, t in rows], self.pad, self.device)  # right padding: positions from 0
        labels = torch.full_like(ids, -100)
        for i, (p, t) in enumerate(rows):
            labels[i, len(p): len(p) + len(t)] = torch.tensor(list(t))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model, task_loss):
        b = self.next_batch()
        r = self.lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        return (1 - self.rho) * task_loss + self.rho * r


class Distill(Preserver):
    """(1 − ρ) · task loss + ρ · cross-entropy to the edited model's next-token
    distributions (top k and the rest) on the edit prompts, paraphrases and
    neighbourhood prompts."""

    def __init__(self, model: nn.Module, tokenizer, facts: Sequence[FactRecord], rho: float, batch: int) -> None:
        self.rho, self.batch = rho, batch
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.lm = model
        self.device = next(model.parameters()).device
        # (ids, positions whose next-token distribution is kept): every target token, teacher-forced
        edit = [([*p, *t[:-1]], list(range(len(p) - 1, len(p) + len(t) - 1))) for p, t in _edit_rows(tokenizer, facts)]
        neigh = []
        for nb in (nb for f in facts for nb in f.neighborhood):
            ids = list(tokenizer(nb.prompt.rstrip())["input_ids"])  # as split_target tokenises a prompt
            if ids:
                neigh.append((ids, [len(ids) - 1]))
        if not edit:
            raise EditdecayError("distill needs edited facts")
        self.edit = self._teach(edit)
        self.neigh = self._teach(neigh) if neigh else []
        self.at_edit = self.at_neigh = 0

    def _teach(self, rows):
        """Each row with the edited model's top-k probabilities at its positions."""
        out = []
        was = self.lm.training
        self.lm.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(rows), 16):
                    chunk = rows[i : i + 16]
                    logits = self._logits(chunk)
                    for (ids, pos), lg in zip(chunk, logits):
                        p, top = lg.float().softmax(-1).topk(min(DISTILL_TOPK, lg.shape[-1] - 1), dim=-1)
                        out.append((ids, pos, top, torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp_min(0)], -1)))
        finally:
            self.lm.train(was)
        return out

    def _logits(self, rows) -> list[torch.Tensor]:
        from ..editing.core import _pad

        ids, mask = _pad([r[0] for r in rows], self.pad, self.device)  # right padding: positions from 0
        logits = self.lm(input_ids=ids, attention_mask=mask).logits
        return [logits[i, r[1]] for i, r in enumerate(rows)]

    def loss(self, model, task_loss):
        e, self.at_edit = _cycle(self.edit, self.at_edit, min(self.batch, len(self.edit)))
        nb, self.at_neigh = _cycle(self.neigh, self.at_neigh, min(self.batch, len(self.neigh)))
        rows = e + nb
        ce = []
        for (ids, pos, top, p), lg in zip(rows, self._logits([(r[0], r[1]) for r in rows])):
            ce.append(-(p * coarse_log_probs(lg.float(), top)).sum(-1))
        return (1 - self.rho) * task_loss + self.rho * torch.cat(ce).mean()


def coarse_log_probs(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """log q of the ``top`` tokens and, last, of all the others together ([n, k + 1]):
    the cross-entropy to a teacher's coarse distribution is least where q equals it."""
    lse = logits.logsumexp(-1, keepdim=True)
    lq = logits.gather(-1, top) - lse
    rest = torch.log(-torch.expm1((lq.logsumexp(-1, keepdim=True)).clamp_max(-1e-7)))
    return torch.cat([lq, rest], -1)


def make_preserver(cfg: PreserveConfig, model: nn.Module, tokenizer, facts: Sequence[FactRecord],
                   blocks: Sequence[int]) -> Preserver | None:
    """The trainer hooks of ``cfg`` for the (prepared, possibly peft-wrapped) ``model``;
    None for ``none`` and ``freeze-edited`` (a layer policy, not a hook)."""
    if cfg.method in ("none", "freeze-edited"):
        return None
    if not facts:
        raise EditdecayError(f"preserve method {cfg.method!r} needs the edited facts")
    if cfg.method == "replay":
        return Replay(model, tokenizer, facts, cfg.rho, cfg.replay_batch)
    if cfg.method == "distill":
        return Distill(model, tokenizer, facts, cfg.rho, cfg.replay_batch)
    if not blocks:
        raise EditdecayError(f"preserve method {cfg.method!r} needs the edited blocks: fine-tune a model saved by "
                             "'editdecay edit --save-model' (it records them) or name an editor's layers (layers_from)")
    with torch.no_grad():
        keys = edit_keys(_lm(model), tokenizer, facts, blocks)
    return Anchor(model, keys, cfg.mu) if cfg.method == "anchor" else NullSpace(model, keys)
