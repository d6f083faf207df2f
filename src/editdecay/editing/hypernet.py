"""The shared core of the hypernetwork editors (MEND, MALMEN).

Both editors read the same two factors at each edit module (a linear map W, stored
(out, in) here whatever the checkpoint's orientation): the module's input ``x`` (the
*key*) and the gradient ``δ`` of the edit loss with respect to its output (the
*value gradient*), at the target tokens (``token: ans``) or at every real token
(``token: all``). Their plain gradient is ∇W = Σ δ xᵀ. A small per-shape network
maps (x, δ) to pseudo-factors (x̃, δ̃); the editors differ only in how those become a
weight shift (``mend.py``: ΔW = −lr Σ δ̃ x̃ᵀ; ``malmen.py``: a least-squares solve
over all edits at once).

This module holds everything else:

- :func:`edit_module_names`, :func:`capture_factors`: hooks that read (x, δ) per
  edit module for a batch of requests in one forward/backward pass. The edit loss of
  a request is the mean NLL of its target tokens (teacher-forced, ``split_target``);
  the losses of a batch are summed, so a request's factors do not depend on what it
  is batched with.
- :class:`RunningNorm`, :class:`ResidualBlock`, :class:`FactorNet`,
  :class:`HyperNet`: one network per weight shape over the concatenation [x, δ],
  standardised by running statistics of the training factors (Welford, float64),
  residual low-rank blocks with per-module scale/shift (MEND's ``IDMLP`` with
  ``shared: true``; MALMEN's ``MALMENBlock``), identity-initialised; one learned edit
  learning rate per module (and MALMEN's λ). With ``denormalize`` (default) the
  network's output is mapped back through the statistics, so an untrained network
  returns the raw factors exactly and the untrained editor is a plain gradient step.
  (The references feed the *standardised* factors forward; ``denormalize: false``
  reproduces that, which the paper presets use with the papers' learning rates.)
- :class:`HypernetEditor`: ``edit`` (capture → shifts → W += ΔW via snapshot /
  ``finish_edit``, bit-exact restore), checkpoints as ``hypernet.safetensors`` +
  ``config.json``.
- :func:`train_hypernet`: the training loop. One step on a batch of ``train_batch``
  training facts, edited in independent groups of ``group_size`` (1: single edits, as
  MEND's reference; MALMEN's reference edits its whole batch at once), all rows
  (rewrite, paraphrase and neighbourhood prompts) in one padded batch:
  (1) one forward/backward: the edit factors (rewrite prompt → target_new), the
  pre-edit distribution at the neighbourhood answers, and the outputs of the blocks
  below the lowest edit block, recorded; (2) ΔW per group without gradient, applied
  through forward hooks (x ↦ Wx + ΔW x, each group's rows its own shift) in a second
  pass that replays the recorded lower blocks (they do not depend on ΔW) and computes
  only the blocks from the lowest edit block on, and the gradient G of
  ``cedit``·NLL(target_new | paraphrases [and the rewrite prompt]) +
  ``cloc``·KL(p_pre ‖ p_post at the neighbourhood answers) with respect to ΔW (kept in
  low-rank form where it is); (3) ΔW recomputed with gradient from the cached factors
  and ⟨ΔW, G⟩ back-propagated into the network (and through MALMEN's solve). This
  two-stage scheme is MALMEN's (``editor/base.py``); it equals back-propagating the
  meta-loss through the edit, without holding the language model's graph and the
  network's together.
  A validation curve (ES/PS/NS of single edits on held-out facts) is computed every
  ``eval_every`` steps, starting with the untrained network; the best network by
  ``early_stop`` is kept, training stops after ``patience`` validations without
  improvement; optimizer, step, sampler and RNG state are saved for ``--resume``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EditdecayError
from ..evaluate.metrics import split_target
from ..facts.record import FactRecord
from ..models.arch import get_arch
from .base import EditResult, RequestLog, finish_edit, restore_params, snapshot
from .core import _pad
from .hparams import from_dict, load_preset

log = logging.getLogger(__name__)

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


# --- edit modules and factors ----------------------------------------------------------

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


@dataclass
class Factors:
    """(x, δ) rows of one edit module: ``keys`` [n, d_in], ``grads`` [n, d_out] (fp32)
    and ``owner`` [n], the request each row belongs to."""

    keys: torch.Tensor
    grads: torch.Tensor
    owner: torch.Tensor

    def select(self, requests: Sequence[int]) -> "Factors":
        """The rows of the given requests (renumbered 0.. in that order)."""
        parts, owners = [], []
        for new, r in enumerate(requests):
            idx = (self.owner == r).nonzero()[:, 0]
            parts.append(idx)
            owners.append(torch.full((len(idx),), new, dtype=torch.long, device=idx.device))
        idx = torch.cat(parts)
        return Factors(self.keys[idx], self.grads[idx], torch.cat(owners))


@dataclass
class Shift:
    """A weight shift ΔW (out, in): ``left @ right`` (low rank: [d_out, r] @ [r, d_in])
    or ``full``. Applied as x ↦ ΔW x without forming ΔW when low rank."""

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    full: torch.Tensor | None = None

    def matrix(self) -> torch.Tensor:
        return self.full if self.full is not None else self.left @ self.right

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        cast = lambda t: t.to(x.device, x.dtype)  # noqa: E731
        if self.full is not None:
            return F.linear(x, cast(self.full))
        return F.linear(F.linear(x, cast(self.right)), cast(self.left))

    def tensors(self) -> list[torch.Tensor]:
        return [self.full] if self.full is not None else [self.left, self.right]

    def leaves(self) -> "Shift":
        """Detached copies that require grad (stage 2 of training)."""
        f = lambda t: None if t is None else t.detach().clone().requires_grad_(True)  # noqa: E731
        return Shift(f(self.left), f(self.right), f(self.full))


@dataclass
class _Batch:
    """Teacher-forced rows: ids/mask [R, T] (right padding), the positions whose next
    token is a target token (``row``, ``col``, ``tgt``) and each row's input length."""

    ids: torch.Tensor
    mask: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    tgt: torch.Tensor
    lengths: list[int]

    @property
    def n_rows(self) -> int:
        return len(self.lengths)


def _batch(pairs: Sequence[tuple[list[int], list[int]]], pad: int, device) -> _Batch:
    rows, cols, tgts, lengths = [], [], [], []
    for r, (c, t) in enumerate(pairs):
        rows += [r] * len(t)
        cols += range(len(c) - 1, len(c) + len(t) - 1)
        tgts += list(t)
        lengths.append(len(c) + len(t) - 1)
    ids, mask = _pad([list(c) + list(t)[:-1] for c, t in pairs], pad, device)
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return _Batch(ids, mask, as_t(rows), as_t(cols), as_t(tgts), lengths)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _device(model: nn.Module) -> torch.device:
    return model.get_output_embeddings().weight.device


def _target_logprobs(model: nn.Module, b: _Batch) -> torch.Tensor:
    """Log-probabilities [P, V] (fp32) at the target positions of ``b`` (logits only there)."""
    hidden = model.base_model(input_ids=b.ids, attention_mask=b.mask, use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[b.row, b.col]).float().log_softmax(-1)


def _row_mean(values: torch.Tensor, row: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row mean of a per-target-position quantity [P] -> [n_rows]."""
    counts = torch.bincount(row, minlength=n_rows).clamp_min(1).to(values.dtype)
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, row, values) / counts


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; flags and modes restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, was in modes:
            m.training = was


@contextlib.contextmanager
def shifted(model: nn.Module, groups: Sequence[dict[str, Shift]], row_group: torch.Tensor | None = None) -> Iterator[None]:
    """Run the model as if W ← W + ΔW at the named modules, through forward hooks
    (x ↦ module(x) + ΔW x): weights untouched, gradients flow into the shifts.
    ``groups[g]`` applies to the batch rows with ``row_group == g`` (all rows when
    ``row_group`` is None and there is one group)."""
    if row_group is None and len(groups) != 1:
        raise ValueError("several shift groups need row_group")
    rows = None if row_group is None else [(row_group == g).nonzero()[:, 0] for g in range(len(groups))]
    names = sorted({n for grp in groups for n in grp})
    handles = []

    def make(name: str):
        def hook(mod, args, out):
            x = args[0]
            if rows is None:
                return out + groups[0][name].apply(x)
            add = torch.zeros_like(out)
            for g, idx in enumerate(rows):
                if name in groups[g] and len(idx):
                    add = add.index_add(0, idx, groups[g][name].apply(x[idx]))
            return out + add
        return hook

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(make(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def _lowest_block(model: nn.Module, module_names: Sequence[str]) -> int:
    spec = get_arch(model)
    return min(spec.block_of(n) for n in module_names)


@contextlib.contextmanager
def _record_prefix(model: nn.Module, n_blocks: int) -> Iterator[list]:
    """Record the outputs of blocks 0..n_blocks-1 of the next forward (for replay)."""
    blocks = get_arch(model).get_blocks(model)
    outs: list = [None] * n_blocks
    handles = []
    for i in range(n_blocks):
        def hook(mod, args, out, i=i):
            outs[i] = out
        handles.append(blocks[i].register_forward_hook(hook))
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _replay_prefix(model: nn.Module, outs: list) -> Iterator[None]:
    """Blocks 0..len(outs)-1 return their recorded outputs instead of computing: the
    blocks below the lowest edit block do not depend on the shifts, so a second pass
    over the same batch only computes the blocks from there on."""
    blocks = get_arch(model).get_blocks(model)
    saved = []
    try:
        for i, out in enumerate(outs):
            saved.append(blocks[i].__dict__.get("forward"))
            blocks[i].forward = lambda *a, _out=out, **k: _out
        yield
    finally:
        for i, old in enumerate(saved):
            if old is None:
                del blocks[i].forward
            else:
                blocks[i].forward = old


def _capture(model: nn.Module, b: _Batch, edit_rows: Sequence[int], module_names: Sequence[str], token: str,
             ) -> tuple[dict[str, Factors], torch.Tensor, torch.Tensor]:
    """One forward/backward over batch ``b``: the loss is the sum over ``edit_rows`` of
    each row's mean target NLL; returns the factors per module (``owner`` = index into
    ``edit_rows``), each edit row's NLL, and the detached log-probabilities [P, V] at
    every target position of ``b``. Call inside :func:`frozen`."""
    device = b.ids.device
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make(name: str):
        def hook(mod, args, out):
            if not out.requires_grad:  # the lowest edit module: the graph starts here
                out = out.detach().requires_grad_(True)
            got[name] = (args[0].detach(), out)
            return out
        return hook

    handles = [model.get_submodule(n).register_forward_hook(make(n)) for n in module_names]
    try:
        with torch.enable_grad():
            logp = _target_logprobs(model, b)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in module_names if n not in got]
    if missing:
        raise EditdecayError(f"edit module(s) {', '.join(missing)} were not called in the forward pass")
    owner_of = torch.full((b.n_rows,), -1, dtype=torch.long, device=device)
    owner_of[torch.tensor(list(edit_rows), dtype=torch.long, device=device)] = torch.arange(len(edit_rows), device=device)
    pos_owner = owner_of[b.row]
    mine = pos_owner >= 0
    nll = -logp[mine].gather(1, b.tgt[mine, None])[:, 0]
    per = _row_mean(nll, pos_owner[mine], len(edit_rows))
    outs = [got[n][1] for n in module_names]
    d_outs = torch.autograd.grad(per.sum(), outs, allow_unused=True)
    if token == "ans":
        r_idx, c_idx = b.row[mine], b.col[mine]
    else:
        r_idx = torch.tensor([r for r in edit_rows for _ in range(b.lengths[r])], dtype=torch.long, device=device)
        c_idx = torch.tensor([c for r in edit_rows for c in range(b.lengths[r])], dtype=torch.long, device=device)
    owners = owner_of[r_idx]
    factors = {}
    for n, out, d in zip(module_names, outs, d_outs):
        at = got[n][0].device  # the module's device (models spread over several GPUs)
        x = got[n][0][r_idx.to(at), c_idx.to(at)].float().to(device)
        g = torch.zeros(len(r_idx), out.shape[-1], device=device) if d is None \
            else d[r_idx.to(at), c_idx.to(at)].float().to(device)
        if token == "all":  # positions that carry no gradient (MEND skips them too)
            keep = (g != 0).any(-1) & (x != 0).any(-1)
            factors[n] = Factors(x[keep], g[keep], owners[keep])
        else:
            factors[n] = Factors(x, g, owners)
    return factors, per.detach(), logp.detach()


def capture_factors(model: nn.Module, tokenizer, requests: Sequence[FactRecord], module_names: Sequence[str], *,
                    token: str = "all", batch_size: int = 32) -> tuple[dict[str, Factors], list[float]]:
    """(x, δ) at each edit module for the edit loss of every request (rewrite prompt →
    target_new), in batches of ``batch_size``; model in eval mode, its parameters and
    gradients untouched. Returns the factors per module (rows of all requests,
    ``owner`` = request index) and each request's pre-edit target NLL."""
    if token not in TOKENS:
        raise ValueError(f"token must be one of {', '.join(TOKENS)}, got {token!r}")
    pairs = [split_target(tokenizer, r.text, r.target_new) for r in requests]
    parts: dict[str, list[Factors]] = {n: [] for n in module_names}
    losses: list[float] = []
    with frozen(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            b = _batch(chunk, _pad_id(tokenizer), _device(model))
            f, per, _ = _capture(model, b, range(len(chunk)), module_names, token)
            for n in module_names:
                parts[n].append(Factors(f[n].keys, f[n].grads, f[n].owner + start))
            losses += per.cpu().tolist()
    factors = {n: Factors(torch.cat([p.keys for p in ps]), torch.cat([p.grads for p in ps]),
                          torch.cat([p.owner for p in ps])) for n, ps in parts.items()}
    return factors, losses


# --- the network -----------------------------------------------------------------------

class RunningNorm(nn.Module):
    """Per-dimension running mean/std (Welford, float64 buffers); identity before two
    samples have been seen."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        if len(x) == 0:
            return
        n_a, n_b = self.count.clone(), float(len(x))
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        delta = mean_b - self.mean
        n = n_a + n_b
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta**2 * n_a * n_b / n
        self.count.copy_(n)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) in fp32; (0, 1) before two samples. Dimensions whose std is below
        1e-6 of the largest are floored there."""
        if float(self.count) < 2:
            return torch.zeros_like(self.mean, dtype=torch.float32), torch.ones_like(self.mean, dtype=torch.float32)
        std = (self.m2 / (self.count - 1)).sqrt()
        std = std.clamp_min(max(float(std.max()) * 1e-6, 1e-30))
        return self.mean.float(), std.float()


class ResidualBlock(nn.Module):
    """y ↦ y + scale_m ⊙ relu(y A B + b) + shift_m (MALMEN's block; MEND's ``LRLinear``
    with per-module scale/shift). B = 0, shift = 0, scale = 1 at init: the identity.
    ``clamp`` rather than ``relu`` so that the gradient at 0 is not 0 (as MEND)."""

    def __init__(self, size: int, rank: int, n_modules: int, generator: torch.Generator) -> None:
        super().__init__()
        r = min(rank, size)
        self.A = nn.Parameter(torch.randn(size, r, generator=generator))
        self.B = nn.Parameter(torch.zeros(r, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Parameter(torch.ones(n_modules, size))
        self.shift = nn.Parameter(torch.zeros(n_modules, size))

    def forward(self, y: torch.Tensor, idx: int) -> torch.Tensor:
        h = ((y @ self.A) @ self.B + self.bias).clamp(min=0)
        return y + self.scale[idx] * h + self.shift[idx]


class FactorNet(nn.Module):
    """The network of one weight shape (d_in, d_out): standardise [x, δ], residual
    blocks, optionally map back; returns (x̃, δ̃)."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modules: int, generator: torch.Generator) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.norm = RunningNorm(d_in + d_out)
        self.blocks = nn.ModuleList([ResidualBlock(d_in + d_out, rank, n_modules, generator) for _ in range(n_blocks)])

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, idx: int, denormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self.norm.stats()
        z = (torch.cat([keys, grads], -1) - mean) / std
        for blk in self.blocks:
            z = blk(z, idx)
        if denormalize:
            z = z * std + mean
        return z[:, : self.d_in], z[:, self.d_in :]


def shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class HyperNet(nn.Module):
    """One :class:`FactorNet` per weight shape, shared by the modules of that shape
    (each with its own scale/shift index); a learned edit learning rate per module and,
    with ``with_lambda``, a learned log-regulariser λ per module (MALMEN)."""

    def __init__(self, shapes: Sequence[tuple[int, int]], rank: int, n_blocks: int, edit_lr: float, *,
                 with_lambda: bool = False, lambda_init: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        counts: dict[str, int] = {}
        self.slots: list[tuple[str, int]] = []
        for s in self.shapes:
            k = shape_key(s)
            self.slots.append((k, counts.get(k, 0)))
            counts[k] = counts.get(k, 0) + 1
        self.nets = nn.ModuleDict({k: FactorNet(*map(int, k.split("x")), rank, n_blocks, c, g) for k, c in counts.items()})
        self.lr = nn.Parameter(torch.full((len(self.shapes),), float(edit_lr)))
        self.log_lambda = nn.Parameter(torch.full((len(self.shapes),), float(lambda_init))) if with_lambda else None

    def factors(self, i: int, keys: torch.Tensor, grads: torch.Tensor, denormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-factors (x̃, δ̃) of module ``i``."""
        k, idx = self.slots[i]
        return self.nets[k](keys, grads, idx, denormalize)

    def observe(self, i: int, keys: torch.Tensor, grads: torch.Tensor) -> None:
        """Update the running statistics of module ``i``'s shape network."""
        self.nets[self.slots[i][0]].norm.update(torch.cat([keys, grads], -1))

    def network_parameters(self) -> list[nn.Parameter]:
        return list(self.nets.parameters())

    def rate_parameters(self) -> list[nn.Parameter]:
        return [self.lr] + ([self.log_lambda] if self.log_lambda is not None else [])


# --- the editor ------------------------------------------------------------------------

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


class HypernetEditor:
    """An editor driven by a (trained or identity) hypernetwork. Subclasses implement
    :meth:`shifts`; set ``name``, ``hparams_cls`` and ``with_lambda``."""

    name: str = "hypernet"
    hparams_cls: type = HypernetHyperParams
    with_lambda: bool = False

    def __init__(self, hparams: HypernetHyperParams | None = None) -> None:
        self.hparams = hparams or self.hparams_cls()
        self.net: HyperNet | None = None
        self.module_names: list[str] = []
        self.checkpoint_config: dict | None = None
        self._loaded = False

    # -- structure -----------------------------------------------------------------------
    def lambda_init(self) -> float:
        return 0.0

    def prepare(self, model: nn.Module) -> HyperNet:
        """Build the network for ``model`` (and load the checkpoint, once)."""
        names = edit_module_names(model, self.hparams)
        shapes = [module_shape(model, n) for n in names]
        if self.net is None or names != self.module_names or shapes != self.net.shapes:
            hp = self.hparams
            self.net = HyperNet(shapes, hp.rank, hp.n_blocks, hp.edit_lr, with_lambda=self.with_lambda,
                                lambda_init=self.lambda_init(), seed=hp.seed).to(_device(model))
            self.module_names = names
            self._loaded = False
        if self.hparams.checkpoint and not self._loaded:
            self._load_weights(self.hparams.checkpoint, model)
        return self.net

    def _load_weights(self, path: str | Path, model: nn.Module) -> None:
        from safetensors.torch import load_file

        cfg = read_checkpoint_config(path, self.name)
        saved = [m["name"] for m in cfg["modules"]]
        if saved != self.module_names:
            raise EditdecayError(f"{path}: trained for modules {saved}, this model's are {self.module_names}")
        shapes = [tuple(m["shape"]) for m in cfg["modules"]]
        if shapes != self.net.shapes:
            raise EditdecayError(f"{path}: trained for module shapes {shapes}, this model's are {self.net.shapes}")
        from ..models.loading import model_identity

        ident = model_identity(model)
        if cfg.get("model", {}).get("identity") not in (None, ident):
            log.warning("%s: trained on model %s, editing %s", path, cfg["model"]["identity"], ident)
        state = load_file(str(Path(path).expanduser() / WEIGHTS_FILE), device=str(_device(model)))
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EditdecayError(f"{path}: weights do not fit the network ({str(e).splitlines()[0]})") from None
        self.checkpoint_config = cfg
        self._loaded = True

    # -- the method -----------------------------------------------------------------------
    def shifts(self, factors: dict[str, Factors], *, lr_scale: float = 1.0) -> dict[str, Shift]:
        """ΔW per module from the captured factors of the requests edited together;
        differentiable in the network's parameters."""
        raise NotImplementedError

    def accumulate(self, acc: dict | None, factors: dict[str, Factors], lr_scale: float) -> dict:
        """Fold one chunk of requests' factors into ``acc`` (editing many requests in
        bounded memory); the default keeps the factors and :meth:`finish` calls
        :meth:`shifts` on all of them."""
        acc = acc if acc is not None else {n: [] for n in factors}
        for n, f in factors.items():
            acc[n].append(f)
        return acc

    def finish(self, acc: dict, lr_scale: float) -> dict[str, torch.Tensor]:
        """Dense ΔW (out, in) per module from :meth:`accumulate`'s state."""
        merged = {n: Factors(torch.cat([f.keys for f in fs]), torch.cat([f.grads for f in fs]),
                             torch.cat([f.owner for f in fs])) for n, fs in acc.items()}
        return {n: sh.matrix() for n, sh in self.shifts(merged, lr_scale=lr_scale).items()}

    # -- editing ----------------------------------------------------------------------------
    def edit(self, model: nn.Module, tokenizer, requests: list[FactRecord], *, steps_factor: int = 1) -> EditResult:
        """Edit all ``requests`` at once: factors captured in chunks of ``batch_size``,
        one shift per module. ``steps_factor`` (protocol single's verify retries) scales
        the edit learning rate."""
        if not requests:
            raise ValueError(f"{self.name}.edit needs at least one request")
        if not isinstance(steps_factor, int) or steps_factor < 1:
            raise ValueError(f"steps_factor must be an integer >= 1, got {steps_factor!r}")
        t0 = time.perf_counter()
        net = self.prepare(model)
        if not self.hparams.checkpoint and not getattr(self, "_warned", False):
            log.warning("%s: no checkpoint: the network is untrained (identity; the edit is a plain gradient "
                        "step); train one with 'editdecay train-editor'", self.name)
            self._warned = True
        spec = get_arch(model)
        names = [n + ".weight" for n in self.module_names]
        originals = snapshot(model, names)
        hp = self.hparams
        losses: list[float] = []
        rows = dict.fromkeys(self.module_names, 0)
        try:
            acc = None
            for start in range(0, len(requests), hp.batch_size):
                chunk = requests[start : start + hp.batch_size]
                factors, chunk_losses = capture_factors(model, tokenizer, chunk, self.module_names,
                                                        token=hp.token, batch_size=hp.batch_size)
                losses += chunk_losses
                for n, f in factors.items():
                    rows[n] += len(f.keys)
                    factors[n] = Factors(f.keys, f.grads, f.owner + start)
                with torch.no_grad():
                    acc = self.accumulate(acc, factors, float(steps_factor))
            with torch.no_grad():
                deltas = self.finish(acc, float(steps_factor))
                for name, d in deltas.items():
                    w = spec.weight_out_in(model.get_submodule(name))
                    w.add_(d.to(w.device, w.dtype))
        except BaseException:
            restore_params(model, originals)
            raise
        logs = [RequestLog(r.case_id, steps=1, loss=l, losses=[l]) for r, l in zip(requests, losses)]
        info = {"modules": list(self.module_names), "lr_scale": steps_factor,
                "edit_lr": [float(v) for v in net.lr.detach().cpu()],
                "shift_norms": {n: float(d.norm()) for n, d in deltas.items()},
                "checkpoint": hp.checkpoint, "rows": rows}
        return finish_edit(model, self.name, requests, originals, time.perf_counter() - t0, logs, info)

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, path: str | Path, model: nn.Module, extra: dict | None = None) -> None:
        """Write ``hypernet.safetensors`` and ``config.json`` into ``path``."""
        from safetensors.torch import save_file

        from ..models.loading import model_identity

        if self.net is None:
            raise RuntimeError("nothing to save: the network was never built (call prepare(model))")
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        _atomic(p / WEIGHTS_FILE, lambda t: save_file(_state_tensors(self.net), str(t)))
        cfg = {
            "format": FORMAT, "method": self.name,
            "hparams": {**dataclasses.asdict(self.hparams), "checkpoint": None},
            "model": {"identity": model_identity(model), "model_type": getattr(model.config, "model_type", None),
                      "name_or_path": getattr(model.config, "_name_or_path", None)},
            "modules": [{"name": n, "shape": list(s)} for n, s in zip(self.module_names, self.net.shapes)],
            **(extra or {}),
        }
        _atomic(p / CONFIG_FILE, lambda t: t.write_text(json.dumps(cfg, indent=2)))


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


# --- validation ------------------------------------------------------------------------

def _score_pairs(tokenizer, fact: FactRecord) -> tuple[list[tuple[list[int], list[int]]], dict[str, list[int]]]:
    pairs: list[tuple[list[int], list[int]]] = []
    slots: dict[str, list[int]] = {}

    def add(key: str, prompt: str, target: str) -> None:
        slots.setdefault(key, []).append(len(pairs))
        pairs.append(split_target(tokenizer, prompt, target))

    add("es_new", fact.text, fact.target_new)
    cf = fact.metric != "zsre" and fact.target_true is not None
    if cf:
        add("es_true", fact.text, fact.target_true)
    for p in fact.paraphrases:
        add("ps_new", p, fact.target_new)
        if cf:
            add("ps_true", p, fact.target_true)
    for nb in fact.neighborhood:
        add("ns_ans", nb.prompt, nb.target)
        if cf:
            add("ns_new", nb.prompt, fact.target_new)
    return pairs, slots


def _metrics(slots: dict[str, list[int]], lp: list[float], acc: list[float]) -> dict[str, float | None]:
    """ES/PS/NS of one fact from its rows' mean log-probabilities and token accuracies."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    if "es_true" in slots:
        return {"es": float(lp[slots["es_new"][0]] > lp[slots["es_true"][0]]),
                "ps": mean([float(lp[a] > lp[t]) for a, t in zip(slots.get("ps_new", []), slots.get("ps_true", []))]),
                "ns": mean([float(lp[a] > lp[n]) for a, n in zip(slots.get("ns_ans", []), slots.get("ns_new", []))])}
    return {"es": acc[slots["es_new"][0]], "ps": mean([acc[i] for i in slots.get("ps_new", [])]),
            "ns": mean([acc[i] for i in slots.get("ns_ans", [])])}


@torch.no_grad()
def score_edits(model: nn.Module, tokenizer, facts: Sequence[FactRecord], shifts: Sequence[dict[str, Shift]],
                *, max_rows: int = 64) -> list[dict[str, float | None]]:
    """ES/PS/NS of each fact on the model shifted by its own ``shifts[i]`` (hooks,
    weights untouched; several facts per forward), by the definitions of
    :func:`~editdecay.evaluate.metrics.score_facts`: CounterFact compares
    P = exp(−mean token NLL) of the new and true targets; zsRE (or no true target)
    uses teacher-forced token accuracy."""
    out: list[dict[str, float | None]] = []
    prepared = [_score_pairs(tokenizer, f) for f in facts]
    i = 0
    with frozen(model):
        while i < len(facts):
            j, n_rows = i, 0
            while j < len(facts) and (j == i or n_rows + len(prepared[j][0]) <= max_rows):
                n_rows += len(prepared[j][0])
                j += 1
            pairs, groups = [], []
            for g, k in enumerate(range(i, j)):
                pairs += prepared[k][0]
                groups += [g] * len(prepared[k][0])
            b = _batch(pairs, _pad_id(tokenizer), _device(model))
            row_group = torch.tensor(groups, device=b.ids.device)
            with shifted(model, shifts[i:j], row_group):
                logp = _target_logprobs(model, b)
            lp = _row_mean(logp.gather(1, b.tgt[:, None])[:, 0], b.row, b.n_rows).tolist()
            acc = _row_mean((logp.argmax(-1) == b.tgt).float(), b.row, b.n_rows).tolist()
            at = 0
            for k in range(i, j):
                n = len(prepared[k][0])
                out.append(_metrics(prepared[k][1], lp[at : at + n], acc[at : at + n]))
                at += n
            i = j
    return out


def validate(editor: HypernetEditor, model: nn.Module, tokenizer, facts: Sequence[FactRecord]) -> dict[str, float]:
    """Mean ES/PS/NS of single edits of ``facts`` (each edit applied alone, through hooks)."""
    editor.prepare(model)
    factors, _ = capture_factors(model, tokenizer, facts, editor.module_names,
                                 token=editor.hparams.token, batch_size=editor.hparams.batch_size)
    with torch.no_grad():
        shifts = [editor.shifts({n: f.select([i]) for n, f in factors.items()}) for i in range(len(facts))]
    rows = score_edits(model, tokenizer, facts, shifts)
    out = {}
    for k in ("es", "ps", "ns"):
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


def _val_score(metrics: dict[str, float], key: str) -> float:
    vals = [metrics[k] for k in key.split("+") if not math.isnan(metrics[k])]
    return sum(vals) / len(vals) if vals else math.nan


# --- training --------------------------------------------------------------------------

@dataclass
class TrainReport:
    """What :func:`train_hypernet` did (also in the checkpoint's ``config.json``)."""

    steps: int
    stop_reason: str
    seconds: float
    curve: list[dict]
    best: dict
    baseline: dict
    n_train: int
    n_val: int
    out: str
    resumed_from: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _StepRows:
    """The rows of one training batch: per fact its rewrite row (the edit), its
    generalisation rows and its locality rows, all in one padded batch."""

    batch: _Batch
    edit_rows: list[int]
    gen_rows: list[int]
    loc_rows: list[int]
    fact_of_row: list[int]


def _step_rows(tokenizer, facts: Sequence[FactRecord], on_rewrite: bool, device) -> _StepRows:
    pairs: list[tuple[list[int], list[int]]] = []
    edit_rows, gen_rows, loc_rows, fact_of = [], [], [], []

    def add(pair, i: int) -> int:
        pairs.append(pair)
        fact_of.append(i)
        return len(pairs) - 1

    for i, f in enumerate(facts):
        r = add(split_target(tokenizer, f.text, f.target_new), i)
        edit_rows.append(r)
        if on_rewrite or not f.paraphrases:
            gen_rows.append(r)
        gen_rows += [add(split_target(tokenizer, p, f.target_new), i) for p in f.paraphrases]
        loc_rows += [add(split_target(tokenizer, nb.prompt, nb.target), i) for nb in f.neighborhood]
    return _StepRows(_batch(pairs, _pad_id(tokenizer), device), edit_rows, gen_rows, loc_rows, fact_of)


def _rows_mask(b: _Batch, rows: Sequence[int]) -> torch.Tensor:
    sel = torch.zeros(b.n_rows, dtype=torch.bool, device=b.ids.device)
    sel[torch.tensor(list(rows), dtype=torch.long, device=b.ids.device)] = True
    return sel[b.row]


def train_step(editor: HypernetEditor, model: nn.Module, tokenizer, facts: Sequence[FactRecord],
               opt: torch.optim.Optimizer) -> dict[str, float]:
    """One meta-training step on ``facts`` (see the module docstring): the facts are
    edited in independent groups of ``group_size``; returns the losses."""
    hp = editor.hparams
    net = editor.net
    device = _device(model)
    s = _step_rows(tokenizer, facts, hp.train_on_rewrite, device)
    b = s.batch
    groups = [list(range(i, min(i + hp.group_size, len(facts)))) for i in range(0, len(facts), hp.group_size)]
    group_of_fact = [g for g, grp in enumerate(groups) for _ in grp]
    row_group = torch.tensor([group_of_fact[f] for f in s.fact_of_row], device=device)
    lowest = _lowest_block(model, editor.module_names)
    with frozen(model):
        # stage 1: factors of the edits, pre-edit distribution, blocks below the edits
        with _record_prefix(model, lowest) as prefix:
            factors, _, logp_pre = _capture(model, b, s.edit_rows, editor.module_names, hp.token)
        for i, n in enumerate(editor.module_names):
            net.observe(i, factors[n].keys, factors[n].grads)
        by_group = [{n: f.select(grp) for n, f in factors.items()} for grp in groups]
        with torch.no_grad():
            leaves = [{n: sh.leaves() for n, sh in editor.shifts(fg).items()} for fg in by_group]
        # stage 2: the meta-loss on the edited model, its gradient with respect to ΔW
        with torch.enable_grad(), _replay_prefix(model, prefix), shifted(model, leaves, row_group):
            logp = _target_logprobs(model, b)
        gen = _rows_mask(b, s.gen_rows)
        nll = -logp.gather(1, b.tgt[:, None])[:, 0]
        per_row = _row_mean(torch.where(gen, nll, torch.zeros_like(nll)), b.row, b.n_rows)
        l_edit = per_row[torch.tensor(s.gen_rows, device=device)].mean()
        if s.loc_rows:
            loc = _rows_mask(b, s.loc_rows)
            ref = logp_pre[loc]
            l_loc = (ref.exp() * (ref - logp[loc])).sum(-1).mean()  # KL(p_pre || p_post), mean over positions
        else:
            l_loc = torch.zeros((), device=device)
        loss = hp.cedit * l_edit + hp.cloc * l_loc
        flat = [t for grp in leaves for sh in grp.values() for t in sh.tensors()]
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    # stage 3: back-propagate <ΔW(θ), G> into the network (through MALMEN's solve)
    opt.zero_grad(set_to_none=True)
    with torch.enable_grad():
        again = [t for fg in by_group for sh in editor.shifts(fg).values() for t in sh.tensors()]
        meta = sum((t * g).sum() for t, g in zip(again, grads) if g is not None and t.requires_grad)
        if isinstance(meta, torch.Tensor) and meta.requires_grad:
            meta.backward()
    params = [p for grp in opt.param_groups for p in grp["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm))
    if math.isfinite(grad_norm):
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
        log.warning("%s: non-finite meta-gradient; step skipped", editor.name)
    return {"loss": float(loss.detach()), "loss_edit": float(l_edit.detach()), "loss_loc": float(l_loc.detach()),
            "grad_norm": grad_norm}


def make_optimizer(editor: HypernetEditor) -> torch.optim.Optimizer:
    hp = editor.hparams
    return torch.optim.Adam([{"params": editor.net.network_parameters(), "lr": hp.meta_lr},
                             {"params": editor.net.rate_parameters(), "lr": hp.lr_lr}])


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> dict:
    """Optimizer tensors to safetensors; returns the JSON-able rest."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors, meta = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().clone()
            else:
                meta.setdefault(str(pid), {})[k] = v
    _atomic(path, lambda t: save_file(tensors, str(t)))
    return {"param_groups": sd["param_groups"], "scalars": meta}


def _load_optimizer(opt: torch.optim.Optimizer, path: Path, meta: dict, device) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path), device=str(device))
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, vals in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(vals)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class _Sampler:
    """Epochs of seeded permutations of the training indices; resumable."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.pos = 0
        self.epoch = 0

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
                self.pos = 0
                self.epoch += 1
            take = min(k - len(out), len(self.order) - self.pos)
            out += self.order[self.pos : self.pos + take]
            self.pos += take
        return out

    def state(self) -> dict:
        st = self.rng.getstate()
        return {"n": self.n, "order": self.order, "pos": self.pos, "epoch": self.epoch,
                "rng": [st[0], list(st[1]), st[2]]}

    def load(self, d: dict) -> None:
        if d["n"] != self.n:
            raise EditdecayError(f"cannot resume: the training set has {self.n} facts, the saved state {d['n']}")
        self.order, self.pos, self.epoch = list(d["order"]), int(d["pos"]), int(d["epoch"])
        self.rng.setstate((d["rng"][0], tuple(d["rng"][1]), d["rng"][2]))


def _facts_hash(facts: Sequence[FactRecord]) -> str:
    from ..facts.record import facts_hash

    return facts_hash(list(facts))


def train_hypernet(
    editor: HypernetEditor, model: nn.Module, tokenizer, train_facts: Sequence[FactRecord],
    val_facts: Sequence[FactRecord], out: str | Path, *, resume: bool = False, progress: bool = True,
    extra_config: dict | None = None,
) -> TrainReport:
    """Train ``editor``'s network on ``train_facts``, validating on ``val_facts``; the
    best network is written to ``out`` (``hypernet.safetensors`` + ``config.json``) and
    the resumable state to ``out/train_state/``."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    hp = editor.hparams
    if hp.checkpoint:
        raise EditdecayError(f"{editor.name}: training starts from an identity network; "
                             "to continue a run use --resume with its output directory")
    if not train_facts:
        raise EditdecayError("no training facts")
    if not val_facts:
        raise EditdecayError("no validation facts")
    out = Path(out)
    state_dir = out / STATE_DIR
    net = editor.prepare(model)
    opt = make_optimizer(editor)
    sampler = _Sampler(len(train_facts), hp.seed)
    data_id = {"train": _facts_hash(train_facts), "val": _facts_hash(val_facts),
               "n_train": len(train_facts), "n_val": len(val_facts)}
    curve: list[dict] = []
    best: dict = {}
    step, bad, seconds = 0, 0, 0.0
    resumed_from = None
    window: list[dict] = []
    if (state_dir / "state.json").exists():
        if not resume:
            raise EditdecayError(f"{out} holds a training run; pass --resume to continue it or choose another --out")
        st = json.loads((state_dir / "state.json").read_text())
        saved_hp = dict(st["hparams"])
        mine = dataclasses.asdict(hp)
        diff = [k for k in mine if k not in ("steps", "max_minutes", "patience", "eval_every", "save_every")
                and mine[k] != saved_hp.get(k)]
        if st["method"] != editor.name or diff:
            raise EditdecayError(f"cannot resume {out}: hyperparameters differ ({', '.join(diff) or 'method'})")
        if st["data"] != data_id:
            raise EditdecayError(f"cannot resume {out}: the training or validation facts differ from the saved run")
        net.load_state_dict(load_file(str(state_dir / "last.safetensors"), device=str(_device(model))), strict=True)
        _load_optimizer(opt, state_dir / "optimizer.safetensors", st["optimizer"], _device(model))
        sampler.load(st["sampler"])
        torch.set_rng_state(load_file(str(state_dir / "rng.safetensors"))["torch"])
        step, bad, seconds = st["step"], st["bad"], st["seconds"]
        curve, best, window = st["curve"], st["best"], st.get("window", [])
        resumed_from = step
        log.info("%s: resuming %s at step %d", editor.name, out, step)
    elif resume:
        log.info("%s: nothing to resume in %s; starting afresh", editor.name, out)

    def save_state() -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        _atomic(state_dir / "last.safetensors", lambda t: save_file(_state_tensors(net), str(t)))
        _atomic(state_dir / "rng.safetensors", lambda t: save_file({"torch": torch.get_rng_state()}, str(t)))
        opt_meta = _save_optimizer(opt, state_dir / "optimizer.safetensors")
        st = {"method": editor.name, "hparams": dataclasses.asdict(hp), "data": data_id, "step": step, "bad": bad,
              "seconds": seconds, "curve": curve, "best": best, "window": window, "optimizer": opt_meta,
              "sampler": sampler.state()}
        _atomic(state_dir / "state.json", lambda t: t.write_text(json.dumps(st)))

    def save_best(stop_reason: str | None) -> None:
        extra = {"trained_steps": best.get("step"), "preset": getattr(editor, "preset_info", {}).get("preset"),
                 "best": best, "curve": curve, "baseline": curve[0] if curve else None,
                 "stop_reason": stop_reason, "seconds": seconds, "data": data_id, **(extra_config or {})}
        if best_state is not None:
            cur = _state_tensors(net)
            net.load_state_dict(best_state)
            editor.save(out, model, extra)
            net.load_state_dict(cur)
        else:
            editor.save(out, model, extra)

    def run_validation() -> bool:
        """Validate, update best; True when the network improved."""
        nonlocal bad, best_state
        t = time.perf_counter()
        m = validate(editor, model, tokenizer, val_facts)
        means = {k: (sum(w[k] for w in window) / len(window) if window else None)
                 for k in ("loss", "loss_edit", "loss_loc")}
        row = {"step": step, **m, "score": _val_score(m, hp.early_stop), "train": means,
               "seconds": round(seconds, 2), "val_seconds": round(time.perf_counter() - t, 2)}
        curve.append(row)
        window.clear()
        improved = not best or row["score"] > best["score"]
        if improved:
            best.clear()
            best.update({k: row[k] for k in ("step", "es", "ps", "ns", "score")})
            best_state = _state_tensors(net)
            bad = 0
        else:
            bad += 1
        log.info("%s step %d: val es %.3f ps %.3f ns %.3f (best step %d)", editor.name, step,
                 m["es"], m["ps"], m["ns"], best["step"])
        return improved

    best_state: dict | None = None
    if resumed_from is not None and (out / WEIGHTS_FILE).exists():
        best_state = {k: v.to(_device(model)) for k, v in load_file(str(out / WEIGHTS_FILE)).items()}
    t_start = time.perf_counter() - seconds
    stop_reason = "max_steps"
    if not curve:
        run_validation()
        save_best(None)
        save_state()
    bar = tqdm(total=hp.steps, initial=step, desc=f"train {editor.name}", unit="step", disable=not progress)
    try:
        while step < hp.steps:
            if hp.patience and bad >= hp.patience:
                stop_reason = "early_stop"
                break
            if hp.max_minutes is not None and seconds >= hp.max_minutes * 60:
                stop_reason = "time"
                break
            batch = [train_facts[i] for i in sampler.take(hp.train_batch)]
            losses = train_step(editor, model, tokenizer, batch, opt)
            window.append(losses)
            step += 1
            seconds = time.perf_counter() - t_start
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", val=f"{curve[-1]['score']:.2f}")
            validated = False
            if step % hp.eval_every == 0 or step == hp.steps:
                run_validation()
                seconds = time.perf_counter() - t_start
                save_best(None)
                validated = True
            if validated or step % hp.save_every == 0:
                save_state()
    finally:
        bar.close()
    if curve[-1]["step"] != step:
        run_validation()
        seconds = time.perf_counter() - t_start
    save_best(stop_reason)
    save_state()
    report = TrainReport(step, stop_reason, seconds, curve, dict(best), curve[0], len(train_facts), len(val_facts),
                         str(out), resumed_from)
    return report
