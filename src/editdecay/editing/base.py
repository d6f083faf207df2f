"""Editor protocol, edit results and bit-exact restore."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import EditdecayError
from ..facts.record import FactRecord
from ..models.arch import get_arch


class EditError(EditdecayError):
    """An edit failed (non-finite values, bad request); the model was restored."""


@dataclass
class RequestLog:
    """What the editor did for one request."""

    case_id: str
    steps: int = 0
    """Optimisation steps taken (updates applied)."""
    loss: float = math.nan
    """Final loss of the target-vector optimisation."""
    losses: list[float] = field(default_factory=list)
    delta_norm: float = math.nan
    """Norm of the optimised residual/MLP-output shift δ."""


@dataclass
class EditResult:
    """The outcome of one ``Editor.edit`` call.

    ``originals`` holds a copy of every touched parameter before the edit (restore
    copies them back, bit-exact); ``deltas`` holds each parameter's total change, kept
    for analysis.
    """

    method: str
    case_ids: list[str]
    originals: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]
    seconds: float
    requests: list[RequestLog] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def edited_layers(self, model: nn.Module) -> list[int]:
        """Blocks containing a parameter whose delta is non-zero."""
        spec = get_arch(model)
        out = set()
        for name, d in self.deltas.items():
            b = spec.block_of(name)
            if b is not None and bool(torch.any(d != 0)):
                out.add(b)
        return sorted(out)

    def restore(self, model: nn.Module) -> None:
        """Copy the original values back into the model (bit-exact)."""
        restore_params(model, self.originals)


class Editor(Protocol):
    """A knowledge editor: applies requests to a model in place."""

    name: str

    def edit(self, model: nn.Module, tokenizer, requests: list[FactRecord]) -> EditResult:
        """Apply all ``requests`` at once; the returned result can restore the model."""
        ...


def snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the named parameters."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def restore_params(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in originals.items():
            params[n].copy_(v)


def finish_edit(model: nn.Module, method: str, requests: list[FactRecord], originals: dict[str, torch.Tensor],
                seconds: float, logs: list[RequestLog], info: dict | None = None) -> EditResult:
    """Compute deltas, check for non-finite weights (restoring and raising if any)."""
    params = dict(model.named_parameters())
    deltas = {}
    for n, orig in originals.items():
        cur = params[n].detach()
        if not torch.isfinite(cur).all():
            restore_params(model, originals)
            raise EditError(f"{method}: the edit produced non-finite values in {n}; the model was restored")
        deltas[n] = (cur - orig).clone()
    return EditResult(method, [r.case_id for r in requests], originals, deltas, seconds, logs, info or {})
