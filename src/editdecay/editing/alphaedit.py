"""AlphaEdit (Fang et al., 2025): MEMIT's layer loop with the update projected onto the
null space of the preserved keys.

P = projector onto the eigenvectors of C whose eigenvalue is below
``nullspace_threshold``. For each edit layer (keys K [d_k, n], residual R [d, n]):

    X  = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ,   ΔW = Xᵀ          (α = ``L2``)

so ΔW k₀ = 0 exactly for any k₀ with P k₀ = 0. K_p K_pᵀ accumulates the keys of past
edits (computed after each edit) in this editor object, across sequential batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .core import template_keys
from .memit import MEMIT, MEMITHyperParams, multilayer_hparams
from .registry import register_editor

log = logging.getLogger(__name__)


@dataclass
class AlphaEditHyperParams(MEMITHyperParams):
    nullspace_threshold: float = field(default=2e-2, metadata={"help": "Eigenvalues of C below this span the null space."})
    L2: float = field(default=10.0, metadata={"help": "α, the ridge term of the solve."})
    nullspace_target: float | None = field(
        default=None, metadata={"help": "If set, choose the threshold so this fraction of the dimensions is null."})
    nullspace_fallback: float | None = field(
        default=None, metadata={"help": "If the absolute threshold gives a null space outside 30%-95% of the "
                                        "dimensions, use this fraction instead (derived presets: 0.7)."})


class AlphaEdit(MEMIT):
    """AlphaEdit editor. ``key_memory[layer]`` = Σ K_p K_pᵀ of the edits made so far."""

    name = "alphaedit"
    hparams_cls = AlphaEditHyperParams
    derived = {"nullspace_fallback": 0.7}
    """Derived preset: the absolute threshold unless its null space is outside 30-95%, else 70%."""

    def __init__(self, hparams=None, covariance=None) -> None:
        super().__init__(hparams, covariance)
        self._proj: dict[int, torch.Tensor] = {}
        self.nullspace_dims: dict[int, int] = {}
        self.nullspace_info: dict[int, dict] = {}
        self.key_memory: dict[int, torch.Tensor] = {}

    def projector(self, layer: int, cov: torch.Tensor) -> torch.Tensor:
        """P for ``layer`` (computed once per editor object). How its dimension was
        chosen is kept in ``nullspace_info[layer]`` (and in every edit result's
        ``info["nullspace"]``): ``rule`` is 'absolute' (the reference: eigenvalues of
        the *mean* second moment below ``nullspace_threshold``), 'target'
        (``nullspace_target``) or 'fallback' (``nullspace_fallback`` fired because the
        absolute threshold gave a null space outside 30-95%; not in ``AlphaEdit_main``,
        logged as a warning)."""
        if layer not in self._proj:
            evals, evecs = torch.linalg.eigh(cov)
            hp = self.hparams
            threshold = hp.nullspace_threshold
            target, rule = hp.nullspace_target, "absolute" if hp.nullspace_target is None else "target"
            abs_frac = float((evals < threshold).double().mean())
            if target is None and hp.nullspace_fallback is not None and not 0.3 <= abs_frac <= 0.95:
                target, rule = hp.nullspace_fallback, "fallback"
                log.warning("AlphaEdit layer %d: threshold %.3g gives a null space of %.0f%% of the dimensions; "
                            "using the fallback %.0f%% (not in the reference implementation)",
                            layer, threshold, 100 * abs_frac, 100 * target)
            if target is not None:  # the k smallest eigenvalues (eigh sorts ascending; ties split by index)
                k = max(1, int(round(target * len(evals))))
                small = torch.arange(len(evals), device=evals.device) < k
                threshold = float(evals[k - 1])
            else:
                small = evals < threshold
            u = evecs[:, small]
            self._proj[layer] = u @ u.T
            self.nullspace_dims[layer] = int(small.sum())
            self.nullspace_info[layer] = {"dims": int(small.sum()), "d_k": len(evals), "fraction": float(small.double().mean()),
                                          "threshold": float(threshold), "absolute_fraction": abs_frac, "rule": rule}
            log.info("AlphaEdit layer %d: null space %d of %d dims (threshold %.3g, %s)", layer, int(small.sum()),
                     len(evals), threshold, rule)
        return self._proj[layer]

    def edit(self, model, tokenizer, requests, *, steps_factor: int = 1):
        res = super().edit(model, tokenizer, requests, steps_factor=steps_factor)
        res.info["nullspace"] = {l: dict(self.nullspace_info[l]) for l in self.hparams.layers if l in self.nullspace_info}
        return res

    def layer_update(self, i, layer, keys, resid, cov):
        p = self.projector(layer, cov)
        d_k = keys.shape[0]
        mem = self.key_memory.get(layer, torch.zeros(d_k, d_k, dtype=keys.dtype, device=keys.device))
        a = p @ (keys @ keys.T + mem) + self.hparams.L2 * torch.eye(d_k, dtype=keys.dtype, device=keys.device)
        x = torch.linalg.solve(a, p @ keys @ resid.T)  # (d_k, d)
        return x.T

    def after_edit(self, model, tokenizer, requests, templates) -> None:
        for layer in self.hparams.layers:
            k = template_keys(model, tokenizer, requests, templates[1:], layer, self.key_groups())[0].double().T
            prev = self.key_memory.get(layer)
            kk = k @ k.T
            self.key_memory[layer] = kk if prev is None else prev + kk.to(prev.device)


register_editor("alphaedit", cls=AlphaEdit, hparams=AlphaEditHyperParams,
                resolve=lambda preset, overrides, model: multilayer_hparams("alphaedit", AlphaEdit, preset, overrides, model))
