"""The fine-tuning loop: AdamW, gradient accumulation, periodic evaluation, stopping
rules combined by OR (always with ``max_steps``), and probe callbacks recorded as curves.

Stopping rules (strings): ``loss<τ`` (validation loss below τ), ``loss<base-Δ``
(below the unedited model's validation loss on the same set minus Δ; pass
``base_loss``), ``acc>τ`` (validation accuracy above τ). The first rule that fires at
an evaluation is recorded as ``stop_reason``; otherwise it is ``max_steps``.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import EditdecayError
from .preserve import Preserver

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StopRule:
    """One stopping rule: ``metric`` ('loss' or 'acc'), comparison and threshold."""

    text: str
    metric: str
    below: bool
    value: float
    relative_to_base: bool = False

    @classmethod
    def parse(cls, text: str) -> "StopRule":
        t = text.replace(" ", "")
        if m := re.fullmatch(r"loss<base-([0-9.eE+-]+)", t):
            return cls(text, "loss", True, float(m.group(1)), True)
        if m := re.fullmatch(r"loss<([0-9.eE+-]+)", t):
            return cls(text, "loss", True, float(m.group(1)))
        if m := re.fullmatch(r"acc>([0-9.eE+-]+)", t):
            return cls(text, "acc", False, float(m.group(1)))
        raise EditdecayError(f"unknown stopping rule {text!r}: use loss<τ, loss<base-Δ or acc>τ")

    def fires(self, metrics: dict[str, float], base_loss: float | None) -> bool:
        v = metrics.get(self.metric)
        if v is None or not math.isfinite(v):
            return False
        if self.relative_to_base:
            if base_loss is None:
                raise EditdecayError(f"stopping rule {self.text!r} needs the base model's validation loss")
            return v < base_loss - self.value
        return v < self.value if self.below else v > self.value


@dataclass
class TrainConfig:
    """Optimiser and loop settings."""

    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_steps: int = field(default=100, metadata={"help": "Optimiser steps at most."})
    eval_every: int = field(default=20, metadata={"help": "Evaluate (and probe) every N steps."})
    stop: list[str] = field(default_factory=list, metadata={"help": "Stopping rules, OR-combined."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping (None: off)."})
    seed: int = field(default=0, metadata={"help": "Seed for dropout and data order."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for forward/backward; weights and optimiser state stay fp32 (master weights). GPU only in practice: bf16 matmul on CPU is very slow."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute block activations in the backward pass (less memory, ~30% more time)."})
    eval_at: tuple[int, ...] = field(default=(), metadata={"help": "Also evaluate (and probe) after these optimiser steps: a fine-tuning budget probed in one run."})
    eval_at_tokens: tuple[int, ...] = field(default=(), metadata={"help": "Also evaluate at the first step whose training tokens reach each of these counts; training stops at the first evaluation past the largest ('budget')."})

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.eval_every < 1 or self.grad_accum < 1:
            raise EditdecayError("max_steps, eval_every and grad_accum must be >= 1")
        if any(int(b) < 1 for b in (*self.eval_at, *self.eval_at_tokens)):
            raise EditdecayError("budget points (eval_at, eval_at_tokens) must be >= 1")
        self.eval_at = tuple(sorted({int(b) for b in self.eval_at}))
        self.eval_at_tokens = tuple(sorted({int(b) for b in self.eval_at_tokens}))
        self.rules = [StopRule.parse(s) for s in self.stop]


@dataclass
class TrainLog:
    steps: int = 0
    stop_reason: str = "max_steps"
    trainable: list[str] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens_at: dict[int, int] = field(default_factory=dict)
    """Training tokens seen at each evaluation's step."""
    eval_seconds: float = 0.0
    """Part of ``seconds`` spent in evaluation and probes."""
    tokens: int = 0

    def to_json(self) -> dict:
        return {"steps": self.steps, "stop_reason": self.stop_reason, "trainable": self.trainable,
                "val": self.val, "probes": self.probes, "tokens_at": self.tokens_at}


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token loss over positions whose label is not -100."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def train(
    model: nn.Module,
    batches: Iterator[Batch],
    cfg: TrainConfig,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]],
    probes: list[Callable[[nn.Module, int], dict[str, Any]]] = (),
    base_loss: float | None = None,
    trainable: list[str] | None = None,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = lm_loss,
    progress: bool = True,
    preserver: Preserver | None = None,
) -> TrainLog:
    """Train the parameters with ``requires_grad`` until a rule fires or ``max_steps``.

    ``evaluate(model)`` returns validation metrics ({"loss", "acc"?}); each probe
    ``probe(model, step)`` returns a dict stored in ``TrainLog.probes``. Evaluation
    and probes run at step 0 and every ``eval_every`` steps (and at the last step).
    ``preserver`` (:class:`~editdecay.finetune.preserve.Preserver`) turns each
    micro-batch's task loss into the loss trained and wraps every optimiser step."""
    preserver = preserver if preserver is not None else Preserver()  # the base class changes nothing
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EditdecayError("nothing to train: no parameter requires grad")
    if cfg.bf16 and any(p.dtype != torch.float32 for p in params):
        raise EditdecayError("bf16 autocast keeps fp32 master weights: load the model in float32")
    device = params[0].device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    if cfg.gradient_checkpointing:
        _checkpointing(model, enable=True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    tlog = TrainLog(trainable=list(trainable or []))
    t0 = time.perf_counter()

    def evaluate_at(step: int) -> bool:
        te = time.perf_counter()
        try:
            return _evaluate_at(step)
        finally:
            tlog.eval_seconds += time.perf_counter() - te

    def _evaluate_at(step: int) -> bool:
        was = model.training
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in evaluate(model).items()}
        tlog.val.append({"step": step, **metrics})
        tlog.tokens_at[step] = tlog.tokens
        for probe in probes:
            tlog.probes.append({"step": step, **probe(model, step)})
        model.train(was)
        for rule in cfg.rules:
            if rule.fires(metrics, base_loss):
                tlog.stop_reason = rule.text
                return True
        return False

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        stopped = evaluate_at(0)
        model.train()
        bar = tqdm(total=None if cfg.eval_at_tokens else cfg.max_steps, desc="fine-tune", unit="step",
                   disable=not progress, leave=False)
        step = 0
        token_points = list(cfg.eval_at_tokens)
        while not stopped and step < cfg.max_steps:
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                with autocast:
                    loss = preserver.loss(model, loss_fn(model, batch).float()) / cfg.grad_accum
                loss.backward()
                total += float(loss.detach())
                tlog.tokens += int(batch["attention_mask"].sum())
            if not math.isfinite(total):
                raise EditdecayError(f"fine-tuning diverged: loss {total} at step {step + 1}")
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            preserver.before_step(model)
            opt.step()
            preserver.after_step(model)
            step += 1
            tlog.train_loss.append(total)
            bar.update(1)
            reached = False
            while token_points and tlog.tokens >= token_points[0]:
                token_points.pop(0)
                reached = True
            if step % cfg.eval_every == 0 or step == cfg.max_steps or step in cfg.eval_at or reached:
                stopped = evaluate_at(step)
                if reached and not token_points and not stopped:
                    tlog.stop_reason, stopped = "budget", True
        bar.close()
        model.eval()
    if cfg.gradient_checkpointing:
        _checkpointing(model, enable=False)
    tlog.steps = step
    tlog.seconds = time.perf_counter() - t0
    return tlog


def _checkpointing(model: nn.Module, enable: bool) -> None:
    """Switch non-reentrant activation checkpointing of the transformers model inside
    ``model`` (works with frozen embeddings and adapters); transformers >= 5 calls it
    activation checkpointing, older versions gradient checkpointing."""
    for kind in ("activation", "gradient"):
        for m in model.modules():
            if hasattr(type(m), f"{kind}_checkpointing_enable"):
                if enable:
                    getattr(m, f"{kind}_checkpointing_enable")(**{f"{kind}_checkpointing_kwargs": {"use_reentrant": False}})
                else:
                    getattr(m, f"{kind}_checkpointing_disable")()
                return
    raise EditdecayError(f"{type(model).__name__} does not support activation checkpointing")
