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
from .memit import MEMIT, MEMITHyperParams

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
        self.key_memory: dict[int, torch.Tensor] = {}

    def projector(self, layer: int, cov: torch.Tensor) -> torch.Tensor:
        """P for ``layer`` (computed once per editor object; its dimension is logged)."""
        if layer not in self._proj:
            evals, evecs = torch.linalg.eigh(cov)
            hp = self.hparams
            threshold = hp.nullspace_threshold
            target = hp.nullspace_target
            if target is None and hp.nullspace_fallback is not None:
                frac = float((evals < threshold).double().mean())
                if not 0.3 <= frac <= 0.95:
                    target = hp.nullspace_fallback
            if target is not None:
                k = max(1, int(round(target * len(evals))))
                threshold = float(evals[k - 1]) * (1 + 1e-9) if k < len(evals) else float("inf")
            small = evals < threshold
            u = evecs[:, small]
            self._proj[layer] = u @ u.T
            self.nullspace_dims[layer] = int(small.sum())
            log.info("AlphaEdit layer %d: null space %d of %d dims (threshold %.3g)", layer, int(small.sum()), len(evals), threshold)
        return self._proj[layer]

    def layer_update(self, i, layer, keys, resid, cov):
        p = self.projector(layer, cov)
        d_k = keys.shape[0]
        mem = self.key_memory.get(layer, torch.zeros(d_k, d_k, dtype=keys.dtype, device=keys.device))
        a = p @ (keys @ keys.T + mem) + self.hparams.L2 * torch.eye(d_k, dtype=keys.dtype, device=keys.device)
        x = torch.linalg.solve(a, p @ keys @ resid.T)  # (d_k, d)
        return x.T

    def after_edit(self, model, tokenizer, requests, templates) -> None:
        for layer in self.hparams.layers:
            k = template_keys(model, tokenizer, requests, templates[1:], layer)[0].double().T
            prev = self.key_memory.get(layer)
            kk = k @ k.T
            self.key_memory[layer] = kk if prev is None else prev + kk.to(prev.device)
