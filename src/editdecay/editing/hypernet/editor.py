"""The hypernetwork editor (capture → shifts → W += ΔW) and its checkpoints."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import EditdecayError
from ...facts.record import FactRecord
from ...models.arch import get_arch
from ...torch_utils import device_of
from ..base import EditResult, RequestLog, finish_edit, restore_params, snapshot
from .capture import Factors, Shift, capture_factors
from .nets import HyperNet
from .params import (
    CONFIG_FILE, FORMAT, WEIGHTS_FILE, HypernetHyperParams, edit_module_names, module_shape, read_checkpoint_config,
)

log = logging.getLogger(__package__)  # the package's logger, as before the split


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
                                lambda_init=self.lambda_init(), seed=hp.seed).to(device_of(model.get_output_embeddings()))
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
        from ...models.loading import model_identity

        ident = model_identity(model)
        if cfg.get("model", {}).get("identity") not in (None, ident):
            log.warning("%s: trained on model %s, editing %s", path, cfg["model"]["identity"], ident)
        state = load_file(str(Path(path).expanduser() / WEIGHTS_FILE), device=str(device_of(model.get_output_embeddings())))
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

        from ...models.loading import model_identity

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
