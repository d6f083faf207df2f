"""Fine-tuning methods and layer policies.

Layer policies select **transformer blocks** (0-based):

- ``all``: every block, plus embeddings, final norm and LM head;
- ``threshold:t``: blocks t … L−1;
- ``window:c,w``: blocks c−⌊w/2⌋ … c+⌈w/2⌉−1, clipped to the model;
- ``edited`` / ``non-edited``: the blocks an edit touched, or the others (for an
  unedited model pass the blocks of a named editor: seed 001's ``layers_from``).

Embeddings, final norm and LM head are trained only under ``all`` (with ``full``); tied
weights are one tensor with one decision. ``full`` trains every parameter of the
selected blocks; ``lora``/``dora`` (peft) adapt the linear projections of the selected
blocks (the ArchSpec's LoRA targets unless given; GPT-2's Conv1D via fan_in_fan_out)
with the base weights frozen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..errors import EditdecayError
from ..models.arch import get_arch

METHODS = ("full", "lora", "dora")
POLICY_FORMS = "all | threshold:t | window:c,w | edited | non-edited"


def resolve_policy(policy: str, n_blocks: int, edited: list[int] | None = None) -> list[int]:
    """The sorted block indices a policy selects."""
    p = policy.strip().lower()
    if p == "all":
        return list(range(n_blocks))
    if p in ("edited", "non-edited"):
        if edited is None:
            raise EditdecayError(f"layer policy {policy!r} needs the edited blocks (for an unedited model: layers_from a named editor)")
        bad = [b for b in edited if not 0 <= b < n_blocks]
        if bad:
            raise EditdecayError(f"layer policy {policy!r}: edited blocks {bad} are outside 0..{n_blocks - 1}")
        sel = sorted(set(edited))
        return sel if p == "edited" else [b for b in range(n_blocks) if b not in sel]
    m = re.fullmatch(r"threshold:(\d+)", p)
    if m:
        t = int(m.group(1))
        if t >= n_blocks:
            raise EditdecayError(f"layer policy {policy!r}: threshold {t} leaves no block of {n_blocks}")
        return list(range(t, n_blocks))
    m = re.fullmatch(r"window:(\d+),(\d+)", p)
    if m:
        c, w = int(m.group(1)), int(m.group(2))
        if w < 1:
            raise EditdecayError(f"layer policy {policy!r}: the window width must be >= 1")
        lo, hi = max(0, c - w // 2), min(n_blocks - 1, c + (w + 1) // 2 - 1)
        if lo > hi:
            raise EditdecayError(f"layer policy {policy!r}: the window lies outside 0..{n_blocks - 1}")
        return list(range(lo, hi + 1))
    raise EditdecayError(f"unknown layer policy {policy!r}: use {POLICY_FORMS}")


@dataclass
class FinetuneConfig:
    """How to fine-tune: method, layer policy and adapter settings."""

    method: str = field(default="lora", metadata={"help": "full | lora | dora."})
    policy: str = field(default="all", metadata={"help": POLICY_FORMS})
    r: int = field(default=8, metadata={"help": "LoRA/DoRA rank."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA/DoRA scaling alpha."})
    dropout: float = field(default=0.05, metadata={"help": "LoRA/DoRA dropout."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Leaf module names to adapt (default: the architecture's)."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EditdecayError(f"unknown fine-tuning method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.r < 1:
            raise EditdecayError("LoRA rank r must be >= 1")


def prepare_model(model: nn.Module, cfg: FinetuneConfig, edited: list[int] | None = None) -> tuple[nn.Module, list[str], list[int]]:
    """Make exactly the parameters the method and policy select trainable.

    Returns ``(model, trainable parameter names, selected blocks)``; for LoRA/DoRA the
    model is the peft wrapper (merge it before measuring the base architecture)."""
    spec = get_arch(model)
    n = spec.num_blocks(model)
    blocks = resolve_policy(cfg.policy, n, edited)
    if cfg.method == "full":
        head = {spec.unembed_name(model), spec.final_norm, *spec.embeddings}
        train_all = cfg.policy.strip().lower() == "all"
        for name, p in model.named_parameters():  # shared (tied) tensors appear once
            b = spec.block_of(name)
            mod = name.rsplit(".", 1)[0]
            p.requires_grad_(b in blocks if b is not None else (train_all and mod in head))
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        return model, names, blocks
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    lcfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules or spec.lora_targets),
        layers_to_transform=blocks, layers_pattern=spec.blocks.rsplit(".", 1)[-1],
        fan_in_fan_out=spec.conv1d, use_dora=cfg.method == "dora", bias="none",
    )
    peft_model = get_peft_model(model, lcfg)
    names = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    return peft_model, names, blocks
