"""Hyperparameters, constants, preset resolution and edit modules of the hypernetwork
editors; also the validated reading of a checkpoint's ``config.json``."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import EditdecayError
from ...models.arch import get_arch
from ..hparams import from_dict, load_preset

log = logging.getLogger(__package__)  # the package's logger, as before the split

FORMAT = "editdecay-hypernet/1"
WEIGHTS_FILE = "hypernet.safetensors"
CONFIG_FILE = "config.json"
STATE_DIR = "train_state"
ROLES = ("mlp_in", "mlp_out")
TOKENS = ("ans", "all")
EARLY_STOP = ("es", "es+ps", "es+ps+ns")
#: Fields that fix a network's structure: a checkpoint's values cannot be overridden.
STRUCTURAL = ("layers", "modules", "rank", "n_blocks", "denormalize", "token")


# --- hyperparameters -------------------------------------------------------------------

@dataclass
class HypernetHyperParams:
    """Hyperparameters shared by MEND and MALMEN: the network, its edits, its training.
    Defaults: the CPU preset's values (``smollm2-135m@cpu``) apart from ``layers`` and
    ``max_minutes``."""

    layers: list[int] = field(default_factory=lambda: [0], metadata={"help": "Blocks whose edit modules are edited (0-based)."})
    modules: list[str] = field(default_factory=lambda: ["mlp_out"], metadata={"help": "Edit modules per block: roles 'mlp_in' (every MLP input projection) / 'mlp_out' (the down projection), or module paths relative to a block (e.g. 'mlp.up_proj')."})
    rank: int = field(default=128, metadata={"help": "Rank of each residual block's low-rank linear map (references: 1920)."})
    n_blocks: int = field(default=2, metadata={"help": "Residual blocks per shape network (MEND IDMLP n_hidden=1 -> 2; MALMEN n_blocks 2)."})
    edit_lr: float = field(default=1e-2, metadata={"help": "Initial value of the learned per-module edit learning rate."})
    denormalize: bool = field(default=True, metadata={"help": "Map the network's output back through the running statistics (untrained network = raw factors = a gradient step); false: use the standardised pseudo-factors as the references do."})
    token: str = field(default="all", metadata={"help": "Where factors are read: 'ans' (target-token positions) or 'all' (every real token)."})
    batch_size: int = field(default=32, metadata={"help": "Requests per forward pass when capturing factors (editing and validation)."})
    checkpoint: str | None = field(default=None, metadata={"help": "Directory of a trained network (hypernet.safetensors + config.json); None: untrained (identity) network."})
    verify: bool = field(default=False, metadata={"help": "Protocol single: check each edit with the retention probe and retry with 2x and 4x the edit learning rate, else drop."})
    # training
    steps: int = field(default=500, metadata={"help": "Training steps at most (one step = one batch of train_batch edits)."})
    train_batch: int = field(default=8, metadata={"help": "Facts per training step (MEND: batch_size x accumulate_bs; MALMEN: n_edits x batches)."})
    group_size: int = field(default=1, metadata={"help": "Facts edited together in one shift during training (1: independent single edits, MEND's batch_size 1; MALMEN trains on its n_edits at once)."})
    meta_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the shape networks."})
    lr_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the edit learning rates (and MALMEN's lambda)."})
    cedit: float = field(default=0.1, metadata={"help": "Weight of the edit (generalisation) NLL in the training loss."})
    cloc: float = field(default=1.0, metadata={"help": "Weight of the locality KL in the training loss."})
    train_on_rewrite: bool = field(default=True, metadata={"help": "Include the rewrite prompt itself in the edit NLL (else paraphrases only; facts without paraphrases always use it)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the network's gradient norm to this."})
    eval_every: int = field(default=50, metadata={"help": "Validate every N steps (and at step 0 and at the end)."})
    n_val: int = field(default=20, metadata={"help": "Validation facts (held out, distinct subjects)."})
    early_stop: str = field(default="es+ps+ns", metadata={"help": "Validation score kept best / early-stopped on: 'es', 'es+ps' or 'es+ps+ns' (mean of those)."})
    patience: int = field(default=4, metadata={"help": "Stop after this many validations without improvement (0: never)."})
    save_every: int = field(default=50, metadata={"help": "Save the resumable training state every N steps (and at each validation)."})
    max_minutes: float | None = field(default=None, metadata={"help": "Stop training after this many minutes of training time (None: no limit)."})
    seed: int = field(default=0, metadata={"help": "Seed of the network initialisation and the training order."})

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")

        def positive(name: str, zero: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v >= 0 if zero else v > 0)
            if not ok:
                raise ValueError(f"{name} must be a {'non-negative' if zero else 'positive'} number, got {v!r}")

        if not self.layers or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in self.layers):
            raise ValueError(f"layers must be a non-empty list of non-negative block indices, got {self.layers!r}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct, got {self.layers!r}")
        if not self.modules or any(not isinstance(m, str) or not m for m in self.modules):
            raise ValueError(f"modules must be a non-empty list of roles ({', '.join(ROLES)}) or module paths, got {self.modules!r}")
        if self.token not in TOKENS:
            raise ValueError(f"token must be one of {', '.join(TOKENS)}, got {self.token!r}")
        if self.early_stop not in EARLY_STOP:
            raise ValueError(f"early_stop must be one of {', '.join(EARLY_STOP)}, got {self.early_stop!r}")
        for name in ("rank", "n_blocks", "batch_size", "steps", "train_batch", "group_size", "eval_every", "n_val", "save_every"):
            positive_int(name)
        positive_int("patience", 0)
        for name in ("meta_lr", "lr_lr", "max_grad_norm"):
            positive(name)
        for name in ("cedit", "cloc"):
            positive(name, zero=True)
        if not (isinstance(self.edit_lr, (int, float)) and math.isfinite(self.edit_lr)):
            raise ValueError(f"edit_lr must be a finite number, got {self.edit_lr!r}")
        if self.max_minutes is not None:
            positive("max_minutes")


def resolve_hparams(method: str, cls: type, preset: str | None, overrides: dict | None,
                    model: nn.Module | None, derive: Callable[[nn.Module], dict]) -> tuple[Any, dict]:
    """Hyperparameters: a checkpoint's (``overrides['checkpoint']``), else a named
    preset, else derived from ``model`` by ``derive``; then ``overrides``.
    A checkpoint's structural fields cannot be overridden."""
    overrides = dict(overrides or {})
    ckpt = overrides.get("checkpoint")
    if ckpt:
        if preset:
            raise EditdecayError(f"{method}: a preset ({preset!r}) and a checkpoint ({ckpt}) are exclusive: "
                                 "the checkpoint carries its hyperparameters")
        cfg = read_checkpoint_config(ckpt, method)
        base = dict(cfg["hparams"])
        clash = [k for k in STRUCTURAL if k in overrides and overrides[k] != base.get(k)]
        if clash:
            raise EditdecayError(f"{method}: {', '.join(clash)} fixed by the checkpoint {ckpt} "
                                 f"({', '.join(f'{k}={base.get(k)!r}' for k in clash)}) cannot be overridden")
        info = {"preset": f"checkpoint:{ckpt}", "trained_steps": cfg.get("trained_steps"),
                "source_preset": cfg.get("preset")}
    elif preset:
        base, info = load_preset(method, preset), {"preset": preset}
    elif model is not None:
        d = derive(model)
        base = {k: v for k, v in d.items() if k != "rule"}
        info = {"preset": "derived", **d}
        log.info("%s: derived hyperparameters: %s", method, d)
    else:
        base, info = {}, {"preset": "default"}
    hp = from_dict(cls, {**base, **overrides}, where=f"{method} hyperparameters ({info['preset']})")
    return hp, info


def derive_from_preset(method: str, model: nn.Module, n_last: int) -> dict:
    """The ``derived`` preset of ``presets/<method>.yaml`` with ``layers`` = the last
    ``n_last`` blocks of ``model`` (the references edit the last blocks)."""
    n = get_arch(model).num_blocks(model)
    values = load_preset(method, "derived")
    layers = list(range(max(0, n - n_last), n))
    return {**values, "layers": layers,
            "rule": f"preset 'derived' of presets/{method}.yaml; layers = the last {len(layers)} of {n} blocks"}


# --- edit modules ----------------------------------------------------------------------

def edit_module_names(model: nn.Module, hp: HypernetHyperParams) -> list[str]:
    """Full paths of the edit modules, block by block in the order of ``hp.modules``."""
    spec = get_arch(model)
    n = spec.num_blocks(model)
    out: list[str] = []
    for layer in hp.layers:
        if layer >= n:
            raise EditdecayError(f"edit block {layer} is out of range: the model has {n} blocks")
        for m in hp.modules:
            rels = list(spec.mlp_in) if m == "mlp_in" else [spec.mlp_out] if m == "mlp_out" else [m]
            for rel in rels:
                name = spec.module_name(layer, rel)
                try:
                    mod = model.get_submodule(name)
                except AttributeError:
                    raise EditdecayError(f"no module {rel!r} in block {layer} ({spec.name} architecture); "
                                         f"use a role ({', '.join(ROLES)}) or a path relative to a block") from None
                if not isinstance(getattr(mod, "weight", None), torch.Tensor) or mod.weight.dim() != 2:
                    raise EditdecayError(f"edit module {name} has no 2-d weight")
                if name not in out:
                    out.append(name)
    return out


def module_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """(d_in, d_out) of an edit module."""
    w = get_arch(model).weight_out_in(model.get_submodule(name))
    return int(w.shape[1]), int(w.shape[0])


# --- checkpoint config -------------------------------------------------------------------

def read_checkpoint_config(path: str | Path, method: str | None = None) -> dict:
    """A checkpoint's ``config.json`` (validated: format and, if given, method)."""
    p = Path(path).expanduser()
    cfg_path = p / CONFIG_FILE
    if not cfg_path.is_file() or not (p / WEIGHTS_FILE).is_file():
        raise EditdecayError(f"{p}: not an editor checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE}; "
                             "train one with 'editdecay train-editor')")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise EditdecayError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("format") != FORMAT:
        raise EditdecayError(f"{cfg_path}: unknown checkpoint format {cfg.get('format')!r} (expected {FORMAT})")
    if method is not None and cfg.get("method") != method:
        raise EditdecayError(f"{p}: a {cfg.get('method')} checkpoint, not {method}")
    return cfg
