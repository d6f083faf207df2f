"""MEND (Mitchell et al., 2022): a gradient-transform network over the rank-one
factors of each edit module's gradient.

For an edit module W (out, in) the gradient of the edit loss is ∇W = Σ_t δ_t x_tᵀ over
the token positions t (x: the module's input, δ: the gradient at its output). A
network per weight shape maps (x_t, δ_t) to (x̃_t, δ̃_t) and the edit is

    W ← W − lr_W · Σ_t δ̃_t x̃_tᵀ

with lr_W a learned per-module edit learning rate. Several requests are edited in one
pass: each request's factors come from its own loss, and the update is the sum of the
per-request updates (MEND's batching). The network, its statistics, training (edit
NLL on paraphrases + locality KL) and checkpoints are in :mod:`.hypernet`.

Differences from the reference (eric-mitchell/mend ``algs/mend.py``, EasyEdit
``trainer/algs/MEND.py``), deliberate:

- Sign: the references add ``lr · g̃`` (the learned lr absorbs the sign); this module
  subtracts, so a positive lr with an untrained network is a gradient-descent step.
- ``denormalize`` (default): the network's output is mapped back through the running
  statistics, so the untrained network gives the raw factors (a plain gradient step);
  the references use the standardised factors themselves (``denormalize: false``, as
  the paper presets here, with the papers' ``edit_lr``).
- One network over the concatenation [x, δ] per shape with per-module scale/shift:
  the references' ``combine: true, shared: true`` configuration (their default).
- The edit loss of a batch is the sum of per-request mean target NLLs (the reference:
  one token mean over the batch), so factors do not depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .hypernet import Factors, HypernetEditor, HypernetHyperParams, Shift, derive_from_preset, resolve_hparams
from .registry import register_editor


@dataclass
class MENDHyperParams(HypernetHyperParams):
    """MEND hyperparameters (defaults: the ``smollm2-135m@cpu`` preset, layers aside)."""

    modules: list[str] = field(default_factory=lambda: ["mlp_in", "mlp_out"], metadata={"help": "Edit modules per block: roles 'mlp_in'/'mlp_out' or paths relative to a block (references: every MLP projection)."})
    token: str = field(default="all", metadata={"help": "Where factors are read: 'all' real tokens (the reference) or 'ans' (target positions)."})


class MEND(HypernetEditor):
    """MEND editor: ΔW = −lr Σ δ̃ x̃ᵀ per edit module."""

    name = "mend"
    hparams_cls = MENDHyperParams
    with_lambda = False

    def shifts(self, factors: dict[str, Factors], *, lr_scale: float = 1.0) -> dict[str, Shift]:
        """ΔW (out, in) = −lr · Σ_t δ̃_t x̃_tᵀ for each module (sum over all rows), kept
        as the low-rank product (−lr·δ̃ᵀ) x̃."""
        net = self.net
        out = {}
        for i, name in enumerate(self.module_names):
            f = factors[name]
            kt, dt = net.factors(i, f.keys, f.grads, self.hparams.denormalize)
            out[name] = Shift(left=-(net.lr[i] * lr_scale) * dt.T, right=kt)
        return out

    def accumulate(self, acc: dict | None, factors: dict[str, Factors], lr_scale: float) -> dict:
        """Requests add up: keep the running sum of ΔW per module (bounded memory)."""
        acc = acc if acc is not None else {}
        for name, sh in self.shifts(factors, lr_scale=lr_scale).items():
            acc[name] = acc[name] + sh.matrix() if name in acc else sh.matrix()
        return acc

    def finish(self, acc: dict, lr_scale: float) -> dict:
        return acc


def derive_mend(model: nn.Module) -> dict:
    """MEND for a model without a preset: the last 3 blocks (the references' choice for
    GPT-2 XL, GPT-J and Llama), every MLP projection; the ``derived`` preset otherwise."""
    return derive_from_preset("mend", model, 3)


def mend_hparams(preset: str | None = None, overrides: dict | None = None, model: nn.Module | None = None):
    """Resolve hyperparameters: a checkpoint (``overrides['checkpoint']``), a preset,
    or derived from ``model``; then overrides."""
    return resolve_hparams("mend", MENDHyperParams, preset, overrides, model, derive_mend)


register_editor("mend", cls=MEND, hparams=MENDHyperParams, resolve=mend_hparams, checkpoint=True)
