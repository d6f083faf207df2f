"""MEMIT (Meng et al., 2023): mass editing spread over several MLP output projections.

Target vectors z are optimised once, at the residual stream after the LAST edit block
(core :func:`~editdecay.editing.core.optimise_targets`, point 'block'). Then, for each
edit layer l in order, on the model as already updated by the earlier layers:

    K  = template-averaged keys of the requests at layer l            [d_k, n]
    R  = (Z − current output of the last edit block) / (layers left)   [d, n]
    ΔW_l = R Kᵀ (λC + K Kᵀ)⁻¹                                         (applied at once)

With one layer and one fact this is, by Sherman–Morrison, the ROME direction C⁻¹k
scaled by kᵀC⁻¹k / (λ + kᵀC⁻¹k). :class:`~editdecay.editing.alphaedit.AlphaEdit`
differs only in the per-layer solve.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..facts.record import FactRecord
from ..models.arch import get_arch
from .base import EditResult, finish_edit, restore_params, snapshot
from .core import (KEY_AVERAGES, TEMPLATE_SOURCES, LocateEditor, check_choice as _check_choice, module_io_at,
                   plain_positions, template_keys)
from .hparams import from_dict, load_preset
from .registry import register_editor

log = logging.getLogger(__name__)


@dataclass
class MEMITHyperParams:
    """MEMIT hyperparameters (defaults: GPT-J reference values, layers aside)."""

    layers: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 7], metadata={"help": "Edit blocks, consecutive, 0-based."})
    v_num_grad_steps: int = field(default=25, metadata={"help": "Step cap of the target-vector optimisation."})
    v_lr: float = field(default=0.5, metadata={"help": "Adam learning rate of δ."})
    v_weight_decay: float = field(default=0.5, metadata={"help": "Weight of ‖δ‖/‖h‖² in the loss."})
    clamp_norm_factor: float = field(default=0.75, metadata={"help": "‖δ‖ ≤ factor·‖h‖ after each step."})
    kl_factor: float = field(default=0.0625, metadata={"help": "Weight of KL(p_cur‖p_init) on '{} is a'."})
    loss_threshold: float = field(default=5e-2, metadata={"help": "Stop optimising a request below this loss."})
    mom2_update_weight: float = field(default=15000.0, metadata={"help": "λ, the weight of C in λC + KKᵀ."})
    context_template_length_params: list[list[int]] = field(
        default_factory=lambda: [[10, 5]], metadata={"help": "(tokens, count) of sampled context prefixes."})
    key_average: str = field(default="types", metadata={"help": "'types': keys averaged within each template type, then across types "
                                                                 "(kmeng01/memit compute_ks; the plain prompt weighs 1/2); 'flat': one mean over all templates."})
    context_template_source: str = field(default="seed_words", metadata={"help": "Sampling start of the context prefixes: "
                                                                              "'seed_words' (MEMIT reference) or 'eos'."})
    cache_prefix: bool = field(default=True, metadata={"help": "Run the δ-independent prompt prefix once into a KV cache (speed only)."})
    verify: bool = field(default=False, metadata={"help": "Protocol single: retry failed edits with 2× and 4× steps, else drop."})
    seed: int = field(default=0, metadata={"help": "Seed of the context-template sampling."})
    stats_corpus: str | None = field(default=None, metadata={"help": "Text corpus for C (path); None: the offline default."})
    stats_token_multiple: int = field(default=20, metadata={"help": "Tokens for C, as a multiple of d_k."})
    stats_max_length: int = field(default=256, metadata={"help": "Maximum tokens per corpus chunk for C."})

    def __post_init__(self) -> None:
        if not self.layers or any(not isinstance(x, int) or x < 0 for x in self.layers):
            raise ValueError(f"layers must be a non-empty list of non-negative block indices, got {self.layers!r}")
        if sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be increasing and distinct, got {self.layers!r}")
        _check_choice("key_average", self.key_average, KEY_AVERAGES)
        _check_choice("context_template_source", self.context_template_source, TEMPLATE_SOURCES)


def derive_multilayer(model: nn.Module) -> dict:
    """MEMIT/AlphaEdit layers and λ for a model without a preset (the stated rule):
    5 consecutive blocks ending at the ROME layer + 2; λ = 15000·d_k/16384."""
    spec = get_arch(model)
    n = spec.num_blocks(model)
    rome_layer = min(n - 1, round(0.17 * n))
    last = min(n - 1, rome_layer + 2)
    layers = list(range(max(0, last - 4), last + 1))
    d_k = spec.weight_out_in(model.get_submodule(spec.rewrite_module_name(layers[0]))).shape[1]
    lam = round(15000 * d_k / 16384, 1)
    return {"layers": layers, "mom2_update_weight": lam,
            "rule": f"layers end at round(0.17*{n})+2 = {last}; lambda = 15000*{d_k}/16384 = {lam}"}


class MEMIT(LocateEditor):
    """MEMIT editor; ``covariance(model, tok, layer)`` returns C (float64)."""

    name = "memit"
    hparams_cls = MEMITHyperParams
    derived: dict = {}
    """Extra hyperparameter values of the derived preset (see :func:`multilayer_hparams`)."""

    def edit(self, model: nn.Module, tokenizer, requests: list[FactRecord], *, steps_factor: int = 1) -> EditResult:
        """Edit all ``requests`` at once."""
        spec = get_arch(model)
        hp = self.hparams
        t0 = time.perf_counter()
        names = [spec.rewrite_module_name(l) + ".weight" for l in hp.layers]
        originals = snapshot(model, names)
        templates = self.templates(model, tokenizer)
        covs = self.covariances(model, tokenizer, hp.layers)
        info: dict = {"layers": list(hp.layers), "updates": []}
        try:
            z, _, logs = self.optimise(model, tokenizer, requests, templates,
                                       self.target_config(hp.layers[-1], "block", steps_factor))
            z = z.double()
            texts, positions = plain_positions(tokenizer, requests)
            for i, layer in enumerate(hp.layers):
                k = template_keys(model, tokenizer, requests, templates[1:], layer, self.key_groups())[0].double()  # [n, d_k]
                _, cur = module_io_at(model, tokenizer, spec.block_name(hp.layers[-1]), texts, positions)
                resid = (z - cur.double()) / (len(hp.layers) - i)  # [n, d]
                module = model.get_submodule(spec.rewrite_module_name(layer))
                c = covs[layer].to(k.device)
                upd = self.layer_update(i, layer, k.T, resid.T, c)  # (d_out, d_k)
                w = spec.weight_out_in(module)
                with torch.no_grad():
                    w.add_(upd.to(w.dtype))
                info["updates"].append({"layer": layer, "keys": k.float().cpu(), "resid": resid.float().cpu()})
            self.after_edit(model, tokenizer, requests, templates)
        except BaseException:
            restore_params(model, originals)
            raise
        return finish_edit(model, self.name, requests, originals, time.perf_counter() - t0, logs, info)

    def layer_update(self, i: int, layer: int, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """ΔW_l = R Kᵀ(λC + KKᵀ)⁻¹ (keys [d_k, n], resid [d, n], float64)."""
        lam = self.hparams.mom2_update_weight
        adj = torch.linalg.solve(lam * cov + keys @ keys.T, keys)  # (λC + KKᵀ)⁻¹K
        return resid @ adj.T

    def after_edit(self, model, tokenizer, requests, templates) -> None:
        """Hook for editors that remember past edits (AlphaEdit)."""


def multilayer_hparams(method: str, editor_cls, preset: str | None, overrides: dict | None, model: nn.Module | None):
    """Resolve MEMIT/AlphaEdit hyperparameters: preset, else derived from ``model``
    (the layer/λ rule plus the editor class's ``derived`` values); then overrides."""
    cls = editor_cls.hparams_cls
    if preset:
        base, info = load_preset(method, preset), {"preset": preset}
    elif model is not None:
        d = {**derive_multilayer(model), **editor_cls.derived}
        base = {k: v for k, v in d.items() if k != "rule"}
        info = {"preset": "derived", **d}
        log.info("%s: derived hyperparameters: %s", method, d)
    else:
        base, info = {}, {"preset": "default"}
    return from_dict(cls, {**base, **(overrides or {})}, where=f"{method} hyperparameters ({info['preset']})"), info


register_editor("memit", cls=MEMIT, hparams=MEMITHyperParams,
                resolve=lambda preset, overrides, model: multilayer_hparams("memit", MEMIT, preset, overrides, model))
