"""ROME (Meng et al., 2022): a rank-one update of one MLP output projection.

For a request with template-averaged key k* (input of the rewrite module at the
subject's last token, averaged over context templates) and target value
v* = h + δ (the optimised output of the rewrite module there):

    u = C⁻¹k* / ‖C⁻¹k*‖          (C = E[kkᵀ]; u = k*/‖k*‖ without mom2_adjustment)
    Λ = (v* − W k) / (k · u)      (k, W k: key and output on the plain prompt)
    ΔW = Λ uᵀ                     (rank one; ΔW x = 0 whenever (C⁻¹k*)ᵀ x = 0)

``consistent_keys`` (r-ROME) uses k* for k, so that (W + ΔW) k* = v* exactly.
Several requests are applied one after another, each on the already-edited model,
as in the reference implementation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..facts.record import FactRecord
from ..models.arch import get_arch
from .base import EditResult, RequestLog, finish_edit, restore_params, snapshot
from .core import TEMPLATE_SOURCES, LocateEditor, TargetCache, check_choice, template_keys
from .hparams import from_dict, load_preset
from .registry import register_editor

log = logging.getLogger(__name__)

@dataclass
class ROMEHyperParams:
    """ROME hyperparameters (defaults: the GPT-2 XL reference preset, layer aside)."""

    layers: list[int] = field(default_factory=lambda: [5], metadata={"help": "Block(s) whose MLP output projection is rewritten (0-based)."})
    v_num_grad_steps: int = field(default=20, metadata={"help": "Step cap of the target-vector optimisation."})
    v_lr: float = field(default=0.5, metadata={"help": "Adam learning rate of δ."})
    v_weight_decay: float = field(default=0.5, metadata={"help": "Weight of ‖δ‖/‖h‖² in the loss."})
    clamp_norm_factor: float = field(default=4.0, metadata={"help": "‖δ‖ ≤ factor·‖h‖ after each step."})
    kl_factor: float = field(default=0.0625, metadata={"help": "Weight of KL(p_cur‖p_init) on '{} is a'."})
    loss_threshold: float = field(default=5e-2, metadata={"help": "Stop optimising when the loss is below this ('until: loss<τ')."})
    mom2_adjustment: bool = field(default=True, metadata={"help": "Use C⁻¹k* (else k*) as the update's row direction."})
    consistent_keys: bool = field(default=False, metadata={"help": "r-ROME: use the template-averaged key k* everywhere."})
    context_template_length_params: list[list[int]] = field(
        default_factory=lambda: [[5, 10], [10, 10]], metadata={"help": "(tokens, count) of sampled context prefixes."})
    context_template_source: str = field(default="eos", metadata={"help": "Sampling start of the context prefixes: 'eos' "
                                                                       "(kmeng01/rome get_context_templates) or 'seed_words' (MEMIT's)."})
    cache_prefix: bool = field(default=True, metadata={"help": "Run the δ-independent prompt prefix once into a KV cache (speed only)."})
    verify: bool = field(default=False, metadata={"help": "Check each edit with the retention probe; retry with 2× and 4× the steps, else drop."})
    seed: int = field(default=0, metadata={"help": "Seed of the context-template sampling."})
    stats_corpus: str | None = field(default=None, metadata={"help": "Text corpus for C (path); None: the offline default."})
    stats_token_multiple: int = field(default=20, metadata={"help": "Tokens for C, as a multiple of the key width d_k."})
    stats_max_length: int = field(default=256, metadata={"help": "Maximum tokens per corpus chunk for C."})

    def __post_init__(self) -> None:
        if not self.layers or any(not isinstance(x, int) or x < 0 for x in self.layers):
            raise ValueError(f"layers must be a non-empty list of non-negative block indices, got {self.layers!r}")
        if self.v_num_grad_steps < 1:
            raise ValueError("v_num_grad_steps must be >= 1")
        check_choice("context_template_source", self.context_template_source, TEMPLATE_SOURCES)


def derive_rome_hparams(model: nn.Module) -> tuple[ROMEHyperParams, dict]:
    """Hyperparameters for a model without a preset, by the stated rule:
    layer = round(0.17·L), the GPT-2 XL reference values otherwise."""
    n = get_arch(model).num_blocks(model)
    layer = min(n - 1, round(0.17 * n))
    derived = {"layers": [layer], "rule": f"layer = round(0.17 * {n} blocks) = {layer}"}
    log.info("ROME: derived hyperparameters for %s: %s", getattr(model.config, "model_type", "?"), derived)
    return ROMEHyperParams(layers=[layer]), derived


def rome_hparams(preset: str | None = None, overrides: dict | None = None, model: nn.Module | None = None) -> tuple[ROMEHyperParams, dict]:
    """Resolve hyperparameters: a named preset, else derived from ``model``; then overrides."""
    if preset:
        base = load_preset("rome", preset)
        info = {"preset": preset}
    elif model is not None:
        hp, info = derive_rome_hparams(model)
        base = {"layers": hp.layers}
        info = {"preset": "derived", **info}
    else:
        base, info = {}, {"preset": "default"}
    return from_dict(ROMEHyperParams, {**base, **(overrides or {})}, where=f"rome hyperparameters ({info['preset']})"), info


class ROME(LocateEditor):
    """ROME editor. ``covariance(model, tok, layer)`` returns C = E[kkᵀ] (float64);
    by default the second-moment statistics of ``hparams.stats_corpus``, cached on disk."""

    name = "rome"
    hparams_cls = ROMEHyperParams

    # --- editing ----------------------------------------------------------------------
    def edit(self, model: nn.Module, tokenizer, requests: list[FactRecord], *, steps_factor: int = 1) -> EditResult:
        """Apply each request in turn (rank-one update per request and layer)."""
        spec = get_arch(model)
        hp = self.hparams
        t0 = time.perf_counter()
        names = [spec.rewrite_module_name(layer) + ".weight" for layer in sorted(set(hp.layers))]
        originals = snapshot(model, names)
        logs: list[RequestLog] = []
        info: dict = {"layers": sorted(set(hp.layers)), "updates": []}
        templates = self.templates(model, tokenizer)
        if hp.mom2_adjustment:
            self.covariances(model, tokenizer, sorted(set(hp.layers)))  # one corpus pass for all layers
        try:
            for req in tqdm(requests, desc="rome edits", unit="fact", leave=False, disable=len(requests) < 2):
                for layer in sorted(set(hp.layers)):
                    rlog, upd = self._edit_one(model, tokenizer, req, layer, templates, steps_factor)
                    logs.append(rlog)
                    info["updates"].append(upd)
        except BaseException:
            restore_params(model, originals)
            raise
        return finish_edit(model, self.name, requests, originals, time.perf_counter() - t0, logs, info)

    def prefetch_targets(self, model: nn.Module, tokenizer, requests: list[FactRecord]) -> None:
        """Optimise the target vectors of ``requests`` on the current weights in one
        batched loop, for the one-fact edits that follow (protocol ``single``) to reuse;
        sets up a :class:`TargetCache` if the editor has none. With several layers only
        the first layer's z are fetched (the later ones depend on the earlier updates)."""
        if self.target_cache is None:
            self.target_cache = TargetCache()
        layer = sorted(set(self.hparams.layers))[0]
        self.target_cache.prefetch(model, tokenizer, requests, self.templates(model, tokenizer),
                                   self.target_config(layer, "mlp_out"))

    def _edit_one(self, model, tokenizer, req: FactRecord, layer: int, templates: list[str], steps_factor: int):
        hp = self.hparams
        spec = get_arch(model)
        module = model.get_submodule(spec.rewrite_module_name(layer))
        k_star, k_plain, out_plain = template_keys(model, tokenizer, [req], templates[1:], layer)
        k_star, k_plain, out_plain = k_star[0].double(), k_plain[0].double(), out_plain[0].double()
        if hp.mom2_adjustment:
            c = self.covariances(model, tokenizer, [layer])[layer].to(k_star.device)
            u = torch.linalg.solve(c, k_star)
        else:
            u = k_star.clone()
        u = u / u.norm()
        z, _, (rlog,) = self.optimise(model, tokenizer, [req], templates, self.target_config(layer, "mlp_out", steps_factor))
        v_star = z[0].double()
        w = spec.weight_out_in(module)  # (out, in) view
        if hp.consistent_keys:
            k = k_star
            bias = module.bias.double() if getattr(module, "bias", None) is not None else 0.0
            cur = w.detach().double() @ k_star + bias
        else:
            k, cur = k_plain, out_plain
        denom = torch.dot(k, u)
        right = (v_star - cur) / denom
        upd = torch.outer(right, u)
        with torch.no_grad():
            w.add_(upd.to(w.dtype))
        return rlog, {"case_id": req.case_id, "layer": layer, "u": u.float().cpu(), "right": right.float().cpu(),
                      "v_star": v_star.float().cpu(), "k_star": k_star.float().cpu(), "k": k.float().cpu()}


register_editor("rome", cls=ROME, hparams=ROMEHyperParams, resolve=rome_hparams)
