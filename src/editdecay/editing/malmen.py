"""MALMEN (Tan et al., 2024): massive editing as a least-squares problem over the
pseudo-factors of all edits at once.

For each edit module W (out, in) the keys K [n, d_in] (the module's inputs) and value
gradients [n, d_out] of all requests' target tokens (``token: ans``) go through the
per-shape network to pseudo-keys k̃ and pseudo-value-gradients δ̃. Each row asks for
the value change

    d_i = −lr_W · (k_i · k̃_i) · δ̃_i          (what the rank-one step −lr δ̃ k̃ᵀ does to k_i)

and the shift is the ridge least-squares fit over all rows together, in the issue's
(in, out) orientation

    ΔWᵀ = argmin_X ‖K X − D‖² + e^λ ‖X‖² = (KᵀK + e^λ I)⁻¹ Kᵀ D

with a learned per-module lr_W and λ (the references' ``lr``, ``lamda``). The solve is
in float64; with fewer rows than key dimensions it uses the equal dual form
Kᵀ(KKᵀ + e^λ I)⁻¹D. Training back-propagates the meta-loss through the solve (the
two-stage scheme in :mod:`.hypernet`, as MALMEN's ``editor/base.py``).

Differences from the reference (ChenmienTan/malmen ``editor/malmen.py``, ``nets.py``;
EasyEdit ``trainer/algs/MALMEN.py``), deliberate:

- ``denormalize`` (default): pseudo-factors are mapped back through the running
  statistics, so the untrained network with λ → −∞ is a per-token gradient step solved
  jointly; the references use standardised pseudo-factors (``denormalize: false``, the
  paper presets here with the papers' ``lr``).
- Training back-propagates with autograd through ``torch.linalg.solve`` instead of the
  hand-written adjoint (``lamda_grad``/``value_diffs_grad``): the same gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .hypernet import Factors, HypernetEditor, HypernetHyperParams, Shift, derive_from_preset, resolve_hparams
from .registry import register_editor


@dataclass
class MALMENHyperParams(HypernetHyperParams):
    """MALMEN hyperparameters (defaults: the ``smollm2-135m@cpu`` preset, layers aside)."""

    modules: list[str] = field(default_factory=lambda: ["mlp_out"], metadata={"help": "Edit modules per block (reference: the MLP output projection)."})
    token: str = field(default="ans", metadata={"help": "Where factors are read: 'ans' (target positions, the reference) or 'all'."})
    lambda_init: float = field(default=0.0, metadata={"help": "Initial λ of the ridge term e^λ I (reference: 0)."})


def solve_shift(keys: torch.Tensor, values: torch.Tensor, alpha: torch.Tensor | float) -> Shift:
    """The ridge least-squares shift X = (KᵀK + αI)⁻¹ KᵀD [d_in, d_out] for keys K
    [n, d_in] and value changes D [n, d_out], returned as ΔW = Xᵀ (out, in), in float64.
    With n < d_in it is the equal dual form Kᵀ(KKᵀ + αI)⁻¹D, kept low rank
    (ΔW = [(KKᵀ + αI)⁻¹D]ᵀ K); otherwise the d_in × d_in system. Differentiable in D
    and α."""
    k = keys.double()
    d = values.double()
    a = alpha.double() if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha), dtype=torch.float64, device=k.device)
    n, d_in = k.shape
    if n < d_in:
        eye = torch.eye(n, dtype=torch.float64, device=k.device)
        coef = torch.linalg.solve(k @ k.T + a * eye, d)  # [n, d_out]
        return Shift(left=coef.T, right=k)
    eye = torch.eye(d_in, dtype=torch.float64, device=k.device)
    return Shift(full=torch.linalg.solve(k.T @ k + a * eye, k.T @ d).T)


class MALMEN(HypernetEditor):
    """MALMEN editor: ΔW from a ridge least-squares solve over all edits' pseudo-factors."""

    name = "malmen"
    hparams_cls = MALMENHyperParams
    with_lambda = True

    def lambda_init(self) -> float:
        return float(self.hparams.lambda_init)

    def value_diffs(self, i: int, f: Factors, lr_scale: float = 1.0) -> torch.Tensor:
        """D [n, d_out]: d_i = −lr · (k_i · k̃_i) · δ̃_i for module ``i``."""
        net = self.net
        kt, dt = net.factors(i, f.keys, f.grads, self.hparams.denormalize)
        coef = -(net.lr[i] * lr_scale) * (f.keys * kt).sum(-1, keepdim=True)
        return coef * dt

    def shifts(self, factors: dict[str, Factors], *, lr_scale: float = 1.0) -> dict[str, Shift]:
        """ΔW (out, in) = [(KᵀK + e^λ I)⁻¹ Kᵀ D]ᵀ for each module, over all rows at once."""
        net = self.net
        out = {}
        for i, name in enumerate(self.module_names):
            f = factors[name]
            sh = solve_shift(f.keys, self.value_diffs(i, f, lr_scale), net.log_lambda[i].exp())
            cast = lambda t: None if t is None else t.to(f.keys.dtype)  # noqa: E731
            out[name] = Shift(cast(sh.left), cast(sh.right), cast(sh.full))
        return out

    def accumulate(self, acc: dict | None, factors: dict[str, Factors], lr_scale: float) -> dict:
        """Keep each module's keys and value changes while there are fewer rows than key
        dimensions; beyond that only KᵀK and KᵀD (float64), so that many edits fit."""
        acc = acc if acc is not None else {}
        for i, name in enumerate(self.module_names):
            f = factors[name]
            k, d = f.keys.double(), self.value_diffs(i, f, lr_scale).double()
            a = acc.setdefault(name, {"keys": [], "diffs": [], "rows": 0, "gram": None, "kd": None})
            a["rows"] += len(k)
            if a["gram"] is None and a["rows"] < k.shape[1]:
                a["keys"].append(k)
                a["diffs"].append(d)
                continue
            if a["gram"] is None:
                old_k, old_d = torch.cat(a["keys"] + [k[:0]]), torch.cat(a["diffs"] + [d[:0]])
                a["gram"], a["kd"] = old_k.T @ old_k, old_k.T @ old_d
                a["keys"], a["diffs"] = [], []
            a["gram"] += k.T @ k
            a["kd"] += k.T @ d
        return acc

    def finish(self, acc: dict, lr_scale: float) -> dict[str, torch.Tensor]:
        out = {}
        for i, name in enumerate(self.module_names):
            a = acc[name]
            alpha = self.net.log_lambda[i].exp().double()
            if a["gram"] is None:
                sh = solve_shift(torch.cat(a["keys"]), torch.cat(a["diffs"]), alpha)
                out[name] = sh.matrix().float()
            else:
                eye = torch.eye(a["gram"].shape[0], dtype=torch.float64, device=a["gram"].device)
                out[name] = torch.linalg.solve(a["gram"] + alpha * eye, a["kd"]).T.float()
        return out


def derive_malmen(model: nn.Module) -> dict:
    """MALMEN for a model without a preset: the last 6 blocks' MLP output projections
    (seed 000: GPT-2 XL 42–47 of 48, Llama3-8B 26–31 of 32); the ``derived`` preset
    otherwise."""
    return derive_from_preset("malmen", model, 6)


def malmen_hparams(preset: str | None = None, overrides: dict | None = None, model: nn.Module | None = None):
    """Resolve hyperparameters: a checkpoint (``overrides['checkpoint']``), a preset,
    or derived from ``model``; then overrides."""
    return resolve_hparams("malmen", MALMENHyperParams, preset, overrides, model, derive_malmen)


register_editor("malmen", cls=MALMEN, hparams=MALMENHyperParams, resolve=malmen_hparams, checkpoint=True)
