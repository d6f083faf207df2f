"""Factor capture: the (x, δ) hooks at the edit modules, the weight shifts applied
through forward hooks, and the record/replay of the blocks below the edits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import EditdecayError
from ...evaluate.metrics import split_target
from ...facts.record import FactRecord
from ...models.arch import get_arch
from ...torch_utils import device_of, pad, pad_id
from .params import TOKENS


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


def _batch(pairs: Sequence[tuple[list[int], list[int]]], pad_token: int, device) -> _Batch:
    rows, cols, tgts, lengths = [], [], [], []
    for r, (c, t) in enumerate(pairs):
        rows += [r] * len(t)
        cols += range(len(c) - 1, len(c) + len(t) - 1)
        tgts += list(t)
        lengths.append(len(c) + len(t) - 1)
    ids, mask = pad([list(c) + list(t)[:-1] for c, t in pairs], pad_token, device)
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return _Batch(ids, mask, as_t(rows), as_t(cols), as_t(tgts), lengths)


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
            # on the output head's device, where the target positions are read (models over several GPUs)
            b = _batch(chunk, pad_id(tokenizer), device_of(model.get_output_embeddings()))
            f, per, _ = _capture(model, b, range(len(chunk)), module_names, token)
            for n in module_names:
                parts[n].append(Factors(f[n].keys, f[n].grads, f[n].owner + start))
            losses += per.cpu().tolist()
    factors = {n: Factors(torch.cat([p.keys for p in ps]), torch.cat([p.grads for p in ps]),
                          torch.cat([p.owner for p in ps])) for n, ps in parts.items()}
    return factors, losses
