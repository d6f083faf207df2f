"""Named fine-tuning presets (``presets.yaml``): the seeds' downstream settings
(``seed000-*``, ``seed001-*``) and CPU presets for the embedded model (``cpu-*``).

A preset fixes the task, method, optimiser, batch, schedule and stopping rules; every
value can be overridden. Schedules may be given in epochs (``epochs``,
``eval_every_epochs``): they resolve to steps once the task's training-set size is
known (:meth:`FinetunePreset.schedule`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import yaml

from ..editing.hparams import from_dict
from ..errors import EditdecayError
from ..models.arch import ArchSpec
from .methods import FinetuneConfig
from .trainer import TrainConfig


@dataclass
class FinetunePreset:
    """Everything a fine-tuning run needs besides the model, data and layer policy."""

    task: str = field(default="unstructured", metadata={"help": "Downstream task."})
    method: str = field(default="lora", metadata={"help": "full | lora | dora."})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=8, metadata={"help": "Examples per optimiser step."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "Examples per forward (gradient accumulation = batch/micro)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimiser steps at most (else from epochs)."})
    epochs: float | None = field(default=None, metadata={"help": "Epochs at most, when max_steps is not given."})
    eval_every: int | None = field(default=None, metadata={"help": "Evaluate and probe every N steps."})
    eval_every_epochs: float | None = field(default=None, metadata={"help": "Evaluate every this fraction of an epoch."})
    stop: list[str] = field(default_factory=list, metadata={"help": "Stopping rules, OR-combined with max_steps."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast, fp32 master weights."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Activation checkpointing."})
    r: int = field(default=8, metadata={"help": "LoRA/DoRA rank."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA/DoRA alpha."})
    dropout: float = field(default=0.05, metadata={"help": "LoRA/DoRA dropout."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Adapted leaf modules; 'llm-adapters' = q,k,v,up,down of the architecture; None = all linear projections."})
    n_train: int | None = field(default=None, metadata={"help": "Training examples (None: all)."})
    n_val: int | None = field(default=None, metadata={"help": "Validation examples."})
    block_size: int | None = field(default=None, metadata={"help": "Tokens per block (unstructured)."})
    cutoff: int | None = field(default=None, metadata={"help": "Tokens per example (other tasks)."})
    seed: int = field(default=0, metadata={"help": "Seed for data order and dropout."})

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise EditdecayError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size

    def schedule(self, n_train_examples: int) -> tuple[int, int]:
        """``(max_steps, eval_every)`` in optimiser steps for a training set of this size."""
        per_epoch = max(1, n_train_examples // self.batch_size)
        steps = self.max_steps or (math.ceil(self.epochs * per_epoch) if self.epochs else 100)
        every = self.eval_every or (max(1, round(self.eval_every_epochs * per_epoch)) if self.eval_every_epochs else 20)
        return steps, every

    def train_config(self, n_train_examples: int) -> TrainConfig:
        steps, every = self.schedule(n_train_examples)
        return TrainConfig(lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, grad_accum=self.batch_size // self.micro,
                           max_steps=steps, eval_every=every, stop=list(self.stop), max_grad_norm=self.max_grad_norm,
                           seed=self.seed, bf16=self.bf16, gradient_checkpointing=self.gradient_checkpointing)

    def finetune_config(self, policy: str, spec: ArchSpec | None = None) -> FinetuneConfig:
        targets = self.target_modules
        if targets == "llm-adapters":
            if spec is None:
                raise EditdecayError("target_modules 'llm-adapters' needs the model's architecture")
            targets = llm_adapters_targets(spec)
        elif isinstance(targets, str):
            targets = [targets]
        return FinetuneConfig(method=self.method, policy=policy, r=self.r, alpha=self.alpha, dropout=self.dropout,
                              target_modules=targets)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def llm_adapters_targets(spec: ArchSpec) -> list[str]:
    """LLM-Adapters' LoRA targets q, k, v, up, down in this architecture's names:
    the attention input projections (fused where the family fuses them), the MLP's last
    input projection (up, not gate) and its output projection."""
    return [*spec.attn_proj[:-1], spec.mlp_in[-1], spec.mlp_out]


def finetune_presets() -> dict[str, dict[str, Any]]:
    """All presets by name (with their ``source`` notes)."""
    return yaml.safe_load(files("editdecay.finetune").joinpath("presets.yaml").read_text(encoding="utf-8"))


def get_preset(name: str, **overrides: Any) -> FinetunePreset:
    """A named preset with ``overrides`` (None values are ignored)."""
    all_ = finetune_presets()
    if name not in all_:
        raise EditdecayError(f"unknown fine-tuning preset {name!r}: available {', '.join(sorted(all_))}")
    values = {k: v for k, v in all_[name].items() if k != "source"}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(FinetunePreset, values, f"fine-tuning preset {name}")
