"""One fine-tuning run: a task, a preset, a layer policy, probes — the function the CLI
and the study runner call.

>>> task = load_task("unstructured", tok)
>>> res = finetune(model, tok, task, get_preset("cpu-unstructured"), policy="non-edited",
...                edited=[5], probe=FactProbe(model, tok, edit_facts, intrinsic_facts))
>>> res.log.stop_reason, res.log.probes[-1]["retention_new"]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import EditdecayError
from ..facts.record import FactRecord
from ..models.arch import get_arch
from .methods import prepare_model
from .preserve import PreserveConfig, make_preserver
from .presets import FinetunePreset
from .trainer import TrainConfig, TrainLog, train


@dataclass
class FinetuneResult:
    """The fine-tuned model (peft wrapper for LoRA/DoRA), its log and provenance."""

    model: nn.Module
    module: nn.Module
    """What was trained: ``model`` or the task's wrapper around it (classification head)."""
    log: TrainLog
    blocks: list[int]
    base_metrics: dict[str, float]
    preset: dict[str, Any]
    task_info: dict[str, Any] = field(default_factory=dict)
    preserve: dict[str, Any] | None = None
    """The :class:`~editdecay.finetune.preserve.PreserveConfig` used, if any."""

    @property
    def lm(self) -> nn.Module:
        """The language model with the fine-tuned weights or adapters in place."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def merged(self) -> nn.Module:
        """The language model with LoRA/DoRA adapters merged into its weights (in place,
        the wrapper is gone after); a fully fine-tuned model as it is."""
        return self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.lm

    def to_json(self) -> dict[str, Any]:
        return {**self.log.to_json(), "blocks": self.blocks, "base": self.base_metrics, "preset": self.preset,
                "task": self.task_info, "seconds": round(self.log.seconds, 2), "tokens": self.log.tokens,
                **({"preserve": self.preserve} if self.preserve is not None else {})}


BUDGET_UNITS = ("steps", "tokens")


def budget_config(cfg: TrainConfig, budget: Sequence[int], unit: str = "steps") -> TrainConfig:
    """``cfg`` probing at every point of ``budget`` and ending at its largest."""
    if unit not in BUDGET_UNITS:
        raise EditdecayError(f"unknown budget unit {unit!r}: use one of {', '.join(BUDGET_UNITS)}")
    points = tuple(int(b) for b in budget)
    if unit == "steps":
        return replace(cfg, max_steps=max(points), eval_at=points)
    return replace(cfg, max_steps=10**9, eval_at_tokens=points)  # the token budget ends the run


def finetune(
    model: nn.Module,
    tokenizer,
    task,
    preset: FinetunePreset,
    *,
    policy: str = "all",
    edited: list[int] | None = None,
    probe: Callable[[nn.Module, int], dict[str, Any]] | None = None,
    base_model: nn.Module | None = None,
    base_metrics: dict[str, float] | None = None,
    progress: bool = True,
    preserve: PreserveConfig | None = None,
    edit_facts: Sequence[FactRecord] = (),
    budget: Sequence[int] = (),
    budget_unit: str = "steps",
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``task`` (see :mod:`editdecay.finetune.tasks`).

    ``base_model`` (the unedited model) supplies the reference validation loss of
    ``loss<base-Δ`` rules (or pass its ``base_metrics`` when already measured);
    without either the starting model's is used. ``probe`` runs at every evaluation
    (e.g. a :class:`~editdecay.finetune.callbacks.FactProbe`). ``preserve`` keeps the
    edits of ``edit_facts`` in the ``edited`` blocks (:mod:`editdecay.finetune.preserve`).

    ``budget``: a fine-tuning budget axis probed in this one run — ``probe`` and the
    validation metrics run after each of these optimiser steps (``budget_unit`` "steps")
    or once each count of training tokens is reached ("tokens"); training ends at the
    largest point, and the preset's periodic evaluations and stopping rules still apply.
    """
    cfg = preset.train_config(len(task.train))
    if budget:
        cfg = budget_config(cfg, budget, budget_unit)
    base_metrics = dict(base_metrics or {})
    if not base_metrics and (any(r.relative_to_base for r in cfg.rules) or base_model is not None):
        ref = base_model if base_model is not None else model
        base_metrics = {k: float(v) for k, v in task.evaluate(task.wrap(ref)).items()}
    if preserve is not None and preserve.method == "freeze-edited":
        if policy != "all":
            raise EditdecayError(f"preserve 'freeze-edited' is the layer policy non-edited: it cannot combine with policy {policy!r}")
        policy = "non-edited"
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(preset.seed)  # adapters and heads start the same for the same seed, whatever ran before
        tuned, names, blocks = prepare_model(model, preset.finetune_config(policy, get_arch(model)), edited)
        module = task.wrap(tuned)
    preserver = make_preserver(preserve, tuned, tokenizer, edit_facts, edited or []) if preserve is not None else None
    names += [f"head.{n}" for n, p in getattr(module, "head", nn.Identity()).named_parameters() if p.requires_grad]
    t0 = time.perf_counter()
    log = train(module, task.batches(preset.micro, seed=preset.seed, device=device), cfg,
                evaluate=task.evaluate, probes=[probe] if probe is not None else [],
                base_loss=base_metrics.get("loss"), trainable=names, loss_fn=task.loss, progress=progress,
                preserver=preserver)
    log.seconds = time.perf_counter() - t0
    return FinetuneResult(tuned, module, log, blocks, base_metrics, preset.to_dict(), task.describe(),
                          asdict(preserve) if preserve is not None else None)
