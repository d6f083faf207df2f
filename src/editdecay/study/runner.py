"""Run a study: every pending unit of the spec's grid, results into the store.

A unit (a whole trial, or one fact under protocol ``single``) runs on a worker that
holds the loaded models, fact selections and task data (:class:`Worker`): probe the
base model, edit, probe, fine-tune with fact probes at every evaluation, probe, then the
optional downstream and drift analyses; the model is restored to its pristine weights
afterwards. The unit's rows are returned as :class:`~editdecay.study.store.UnitRows`
and written by the driver in one transaction, so a unit killed at any point leaves
nothing and reruns on resume. Failures are recorded with their error and do not stop
the study.

Executors: ``local`` (one worker in this process) and ``ray`` (``max_parallel`` Ray
actors, each a worker with the spec's CPU/GPU requests; the driver writes results).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..editing.base import restore_params
from ..editing.core import TargetCache
from ..errors import EditdecayError
from ..facts.record import FactRecord
from .spec import DOWNSTREAM_OPTIONS, StudySpec
from .store import CurvePoint, DownstreamRow, DriftRow, FactRow, MetricRow, Store, TransitionRow, UnitRows

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


# --- the worker: models, selections and task data held across units ---------------------------
@dataclass
class _Loaded:
    model: torch.nn.Module
    tokenizer: Any
    pristine: dict[str, torch.Tensor]


@dataclass
class FactSets:
    """The facts a unit probes: the edit set (may be empty) and the intrinsic sets per
    dataset."""

    edit: list[FactRecord]
    intrinsic: dict[str, list[FactRecord]]
    dataset: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    """Selection statistics per dataset (seed 000 Table 3)."""


class Worker:
    """Executes units; keeps loaded models, fact selections, tasks and base metrics.

    ``base_dir`` resolves the spec's relative paths; ``device`` places models;
    ``edit_cache`` (a folder) keeps every computed edit on disk (:class:`EditCache`), so a
    later run or another study with the same edit loads it instead of editing again.
    """

    def __init__(self, base_dir: str | Path = ".", device: str | None = None, progress: bool = True,
                 edit_cache: str | Path | None = None) -> None:
        self.base_dir = Path(base_dir)
        self.edit_cache = Path(edit_cache).expanduser() if edit_cache is not None else None
        self.device = device
        self.progress = progress
        self._models: dict[str, _Loaded] = {}
        self._facts: dict[str, list[FactRecord]] = {}
        self._selections: dict[str, Any] = {}
        self._tasks: dict[str, Any] = {}
        self._base_metrics: dict[str, dict[str, float]] = {}
        self._edits: dict[str, tuple] = {}
        self._targets = TargetCache()  # z steps shared by editors with the same settings (MEMIT, AlphaEdit)
        self._scores: dict[str, tuple] = {}  # stage scores of weights seen before (the base model, a cached edit)

    # resources ---------------------------------------------------------------------------
    def model(self, name: str) -> _Loaded:
        if name not in self._models:
            from ..models import load_model

            m, tok = load_model(name, device=self.device)
            pristine = {k: v.detach().clone() for k, v in m.state_dict().items()}
            self._models[name] = _Loaded(m, tok, pristine)
        return self._models[name]

    def reset(self, name: str) -> None:
        """Pristine weights back (bit-exact), everything frozen, eval mode."""
        ld = self._models[name]
        ld.model.load_state_dict(ld.pristine)
        for p in ld.model.parameters():
            p.requires_grad_(False)
        ld.model.eval()

    def _path(self, p: str | None) -> Path | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    def facts(self, src: dict[str, Any]) -> list[FactRecord]:
        from ..facts.datasets import load_facts

        key = repr(sorted(src.items()))
        if key not in self._facts:
            path = self._path(src.get("path"))
            fmt = src.get("format") or "auto"
            if fmt == "builtin" or (path is None and src.get("dataset") == "builtin"):
                facts = load_facts("", format="builtin")
            elif path is None:
                raise EditdecayError(f"dataset {src.get('dataset')!r} has no path")
            else:
                facts = load_facts(path, format=fmt, zsre_preset=src.get("zsre_preset") or "memit")
            self._facts[key] = facts
        return self._facts[key]

    def selection(self, model_name: str, src: dict[str, Any], sel: dict[str, Any]):
        """Edit and intrinsic sets of one dataset (confidence-filtered unless
        ``filter`` is false), cached per (model, dataset, settings)."""
        from ..facts.selection import Selection, select_facts, split_sets

        key = repr((model_name, sorted(src.items()), sorted(sel.items())))
        if key not in self._selections:
            ld = self.model(model_name)
            facts = self.facts(src)
            n_edit = int(sel.get("n_edit") or 0)
            n_int = int(sel.get("n_intrinsic") or 0)
            if sel.get("filter", True):
                s = select_facts(ld.model, ld.tokenizer, facts, n_edit=n_edit, n_intrinsic=n_int,
                                 margin=sel.get("margin", 0.1), mode=sel.get("mode", "greedy"), seed=sel.get("seed", 0))
            else:
                e, i = split_sets(facts, n_edit, n_int, sel.get("seed", 0))
                s = Selection(e, i, {"filter": False, "n_total": len(facts)})
            self._selections[key] = s
        return self._selections[key]

    def fact_sets(self, cfg: dict[str, Any], unit_id: str) -> FactSets:
        data, model_name = cfg["data"], cfg["model"]
        if "datasets" in data:  # zero-edit / base: the intrinsic sets of every dataset
            sels = {d["dataset"]: self.selection(model_name, d, data["selection"]) for d in data["datasets"]}
            return FactSets([], {k: v.intrinsic for k, v in sels.items()}, stats={k: v.stats for k, v in sels.items()})
        src = {k: data[k] for k in ("dataset", "path", "format", "zsre_preset")}
        s = self.selection(model_name, src, data["selection"])
        edit = list(s.edit[: cfg["edit"]["n_edits"]]) if cfg.get("edit") else []
        if unit_id:
            edit = [f for f in edit if f.case_id == unit_id]
            if not edit:
                raise EditdecayError(f"unit {unit_id!r}: no such fact in the trial's edit set")
        return FactSets(edit, {data["dataset"]: list(s.intrinsic)}, data["dataset"], {data["dataset"]: s.stats})

    def unit_ids(self, cfg: dict[str, Any]) -> list[str]:
        """Case ids of a ``single`` trial's units."""
        return [f.case_id for f in self.fact_sets(cfg, "").edit]

    def task(self, model_name: str, ft: dict[str, Any], exclude: Sequence[FactRecord], edited: Sequence[FactRecord]):
        """The fine-tuning task of ``ft`` (cached); ``exclude``: facts kept out of the
        structured task's training facts; with ``hygiene``, documents mentioning an
        ``edited`` fact are dropped (per fact under single; seed 000 §4.1)."""
        from ..finetune.tasks import load_task

        p = ft["params"]
        hygiene = sorted(f.case_id for f in edited) if ft.get("hygiene") and edited else None
        key = repr((model_name, ft["task"], ft.get("data"), p.get("n_train"), p.get("n_val"), p.get("cutoff"),
                    p.get("block_size"), p.get("seed"), sorted(f.case_id for f in exclude), hygiene)), hygiene is not None
        if key not in self._tasks:
            filtered = [k for k in self._tasks if k[1]]
            if hygiene is not None and len(filtered) >= 8:  # a filtered copy per fact under single: keep the latest few
                del self._tasks[filtered[0]]
            ld = self.model(model_name)
            self.reset(model_name)
            data = self._path(ft.get("data"))
            self._tasks[key] = load_task(ft["task"], ld.tokenizer, data, model=ld.model, n_train=p.get("n_train"),
                                         n_val=p.get("n_val"), cutoff=p.get("cutoff"),
                                         block_size=p.get("block_size") or 128, seed=p.get("seed", 0),
                                         exclude_facts=list(exclude), hygiene_facts=list(edited) if hygiene else None)
        return key, self._tasks[key]

    def base_metrics(self, model_name: str, task_key: tuple, task) -> dict[str, float]:
        """The unedited model's validation metrics on the task (loss<base-Δ)."""
        if task_key not in self._base_metrics:
            self.reset(model_name)
            ld = self.model(model_name)
            self._base_metrics[task_key] = {k: float(v) for k, v in task.evaluate(task.wrap(ld.model)).items()}
        return self._base_metrics[task_key]

    # the unit ----------------------------------------------------------------------------
    def run_unit(self, cfg: dict[str, Any], unit_id: str = "") -> UnitRows:
        """Execute one unit and return its rows (nothing is written here)."""
        name = cfg["model"]
        ld = self.model(name)
        self.reset(name)
        try:
            return self._run(cfg, unit_id, ld)
        finally:
            self.reset(name)

    def _run(self, cfg: dict[str, Any], unit_id: str, ld: _Loaded) -> UnitRows:
        from ..editing import get_editor

        t0 = time.perf_counter()
        model, tok = ld.model, ld.tokenizer
        sets = self.fact_sets(cfg, unit_id)
        probe_cfg = cfg["evaluate"]["probe"]
        rows = _Rows(sets)
        info: dict[str, Any] = {"n_edit": len(sets.edit), "n_intrinsic": {k: len(v) for k, v in sets.intrinsic.items()}}
        if len(sets.stats) == 1:
            info["selection"] = next(iter(sets.stats.values()))  # Selection.stats (seed 000 Table 3)
        else:
            info["selections"] = sets.stats
        ds = cfg["evaluate"].get("downstream")
        ds_stages = set(ds.get("stages", [])) if ds else set()
        skey = repr((cfg["model"], sets.dataset, [f.case_id for f in sets.edit],
                     {k: [f.case_id for f in v] for k, v in sets.intrinsic.items()}, sorted(probe_cfg.items())))
        base_scores = rows.stage("base", model, tok, probe_cfg, memo=self._scores, key=("base", skey))
        if "base" in ds_stages:
            rows.downstream(model, tok, ds, self._path(ds.get("data_dir")), "base")
        edited_layers: list[int] | None = None
        drift_states: dict[str, torch.Tensor] = {}
        drift_cfg = cfg["evaluate"].get("drift")
        drift_prompts = _drift_prompts(sets, drift_cfg) if drift_cfg else []
        if drift_cfg:
            drift_states["base"] = _states(model, tok, drift_prompts, drift_cfg)

        edit = cfg.get("edit")
        edited_scores = None
        if edit:
            overrides = dict(edit.get("hparams") or {})
            if overrides.get("checkpoint"):  # a trained MEND/MALMEN network, relative to the spec's folder
                overrides["checkpoint"] = str(self._path(overrides["checkpoint"]))
            if edit.get("layers"):
                overrides["layers"] = list(edit["layers"])
            ekey = edit_key(cfg, [f.case_id for f in sets.edit])
            disk = None  # the on-disk cache, consulted only for an edit this worker has not made
            if ekey not in self._edits and self.edit_cache is not None:
                disk = EditCache(self.edit_cache, ekey, model)
                if (hit := disk.load()) is not None:
                    self._edits[ekey] = hit
                    info["edit_cache"] = str(disk.path)
            if ekey in self._edits:  # the same edit as an earlier trial (edit-only and edit+ft share it)
                deltas, edited_layers, dropped, secs, preset_name = self._edits[ekey]
                restore_params(model, deltas)  # the edit's parameter values, bit-exact
            else:
                editor = get_editor(edit["editor"], preset=edit.get("preset"), overrides=overrides, model=model)
                if hasattr(editor, "target_cache"):
                    editor.target_cache = self._targets
                te, reused0 = time.perf_counter(), self._targets.reused_seconds
                edited_layers, dropped = _apply_edit(editor, model, tok, sets.edit, edit, probe_cfg.get("mode", "greedy"))
                reused = self._targets.reused_seconds - reused0
                if reused:  # the z step came from an earlier editor's: its time still counts as this edit's cost
                    info["targets_reused_seconds"] = round(reused, 2)
                secs = time.perf_counter() - te + reused
                preset_name = getattr(editor, "preset_info", {}).get("preset")
                self._edits[ekey] = (_changed(model, ld.pristine), edited_layers, dropped, secs, preset_name)
                if disk is not None:
                    disk.save(self._edits[ekey])
            info.update(edited_layers=edited_layers, dropped=dropped, edit_seconds=round(secs, 2), editor_preset=preset_name)
            rows.metric("edit_seconds", secs, stage="edited")
            edited_scores = rows.stage("edited", model, tok, probe_cfg, memo=self._scores, key=("edited", skey, ekey))
            if "edited" in ds_stages:
                rows.downstream(model, tok, ds, self._path(ds.get("data_dir")), "edited")
            if drift_cfg:
                drift_states["edited"] = _states(model, tok, drift_prompts, drift_cfg)

        ft = cfg.get("finetune")
        final_model = model
        result = None
        if ft:
            from ..finetune.callbacks import FactProbe
            from ..finetune.presets import FinetunePreset
            from ..finetune.run import finetune

            intrinsic_all = [f for fs in sets.intrinsic.values() for f in fs]
            task_key, task = self.task(cfg["model"], ft, sets.edit + intrinsic_all, sets.edit)
            base = self.base_metrics(cfg["model"], task_key, task)
            if task.info.get("hygiene"):
                info["hygiene"] = {k: v for k, v in task.info["hygiene"].items() if k != "words"}
            if edit:  # loading the task and base metrics reset the weights: apply the edit again
                restore_params(model, self._edits[ekey][0])
            params = {k: (tuple(v) if k == "betas" else v) for k, v in ft["params"].items()}
            preset = FinetunePreset(**params)
            layers = edited_layers
            if ft.get("layers_from"):
                lf = ft["layers_from"]
                layers = list(lf.get("layers") or get_editor(lf["editor"], preset=lf.get("preset"), model=model).hparams.layers)
            budget = ft.get("budget") or {}
            probe = FactProbe(model, tok, sets.edit, intrinsic_all, pool=intrinsic_all + sets.edit,
                              mode=probe_cfg.get("mode", "greedy"), top_k=probe_cfg.get("top_k", 3),
                              scores=bool(budget), prob=probe_cfg.get("prob", "mean"))
            preserve = None
            if ft.get("preserve"):
                from ..finetune.preserve import PreserveConfig

                preserve = PreserveConfig(**ft["preserve"])
            result = finetune(model, tok, task, preset, policy=ft["policy"], edited=layers, probe=probe,
                              base_metrics=base, progress=self.progress, budget=budget.get("at", ()),
                              budget_unit=budget.get("unit", "steps"), preserve=preserve, edit_facts=sets.edit)
            if budget:
                info["budget"] = {**budget, "evaluations": probe.calls, "tokens_at": result.log.tokens_at}
            rows.training(result, sets)
            info.update(stop_reason=result.log.stop_reason, steps=result.log.steps, blocks=result.blocks,
                        n_trainable=len(result.log.trainable))
            final_model = result.lm
            ft_scores = rows.stage("finetuned", final_model, tok, probe_cfg)
            if "finetuned" in ds_stages:
                rows.downstream(final_model, tok, ds, self._path(ds.get("data_dir")), "finetuned")
            rows.transitions(base_scores, edited_scores if edit else base_scores, ft_scores)
            if drift_cfg:
                drift_states["edited_finetuned" if edit else "finetuned"] = _states(final_model, tok, drift_prompts, drift_cfg)

        if drift_cfg and len(drift_states) > 1:
            from ..evaluate.activations import drift_from_states

            rows.drift(drift_from_states(drift_states, position=drift_cfg.get("position", "last")), len(drift_prompts))
        rd = cfg["evaluate"].get("reedit")
        if rd and edit and result is not None:
            lm = result.merged()  # final_model is result.lm
            result = None  # the adapters are merged: the weights are restored by run_unit
            info["reedit"] = _reedit(lm, tok, sets.edit, edit, rd, overrides, probe_cfg.get("mode", "greedy"))
            rows.metric("reedit_seconds", info["reedit"]["reedit"]["seconds"], stage="reedited")
            if info["reedit"]["scratch"] is not None:
                rows.metric("scratch_seconds", info["reedit"]["scratch"]["seconds"], stage="reedited")
        if result is not None and hasattr(result.model, "unload"):
            result.model.unload()  # take the adapters out: the worker's model is plain again
        rows.metric("seconds", time.perf_counter() - t0)
        return rows.finish(info)


def _reedit(model, tok, facts: list[FactRecord], edit: dict[str, Any], rd: dict[str, Any], overrides: dict[str, Any],
            mode: str) -> dict[str, Any]:
    """The re-edit stage: the decayed edits re-applied to the fine-tuned model (the same
    editor and settings unless ``rd["editor"]`` names another), against editing every
    fact from scratch (:func:`~editdecay.editing.protocols.reedit`)."""
    from ..editing import get_editor
    from ..editing.protocols import reedit

    name = rd.get("editor") or edit["editor"]
    same = name == edit["editor"]
    editor = get_editor(name, preset=edit.get("preset") if same else None, overrides=overrides if same else {},
                        model=model)
    doc, _ = reedit(editor, model, tok, facts, batch_size=edit.get("batch_size"), mode=mode,
                    scratch=rd.get("scratch", True))
    return {"editor": name, **doc}


def _apply_edit(editor, model, tok, facts: list[FactRecord], edit: dict[str, Any], mode: str) -> tuple[list[int], list[str]]:
    """Apply the unit's edit (kept in the model). ``single`` retries with 2×/4× steps when
    the editor's ``verify`` is on (:func:`~editdecay.editing.protocols.edit_with_retries`;
    a fact that never passes keeps its last attempt and is listed as dropped);
    ``sequential`` applies batches in turn."""
    from ..editing.protocols import edit_with_retries

    protocol = edit["protocol"]
    if protocol == "single":
        verify = getattr(getattr(editor, "hparams", None), "verify", False)
        res, post, _, _ = edit_with_retries(editor, model, tok, facts[0], verify=verify, mode=mode)
        return res.edited_layers(model), [] if not verify or post.retained_new else [facts[0].case_id]
    size = edit.get("batch_size") or len(facts)
    layers: set[int] = set()
    for i in range(0, len(facts), size):
        layers |= set(editor.edit(model, tok, facts[i : i + size]).edited_layers(model))
    return sorted(layers), []


def edit_key(cfg: dict[str, Any], case_ids: Sequence[str]) -> str:
    """What identifies a trial's edit (the in-memory and the on-disk edit caches): the
    model, the edit settings and the facts."""
    return repr((cfg["model"], sorted(cfg["edit"].items()), list(case_ids)))


class EditCache:
    """One edit on disk: the changed parameters (safetensors) and what the runner records
    about the edit (edited layers, dropped facts, seconds, preset), under
    ``root/edits/<sha256 of the edit's settings, its facts, the model's identity (see
    :func:`~editdecay.models.loading.model_identity`) and the editdecay version>``.
    Written atomically, so an interrupted run leaves no half-written entry."""

    def __init__(self, root: Path, ekey: str, model) -> None:
        from .. import __version__
        from ..models.loading import model_identity

        h = hashlib.sha256(repr((ekey, model_identity(model), __version__)).encode()).hexdigest()[:24]
        self.path = root / "edits" / h

    def load(self) -> tuple | None:
        if not (self.path / "meta.json").exists():
            return None
        from safetensors.torch import load_file

        meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        deltas = load_file(str(self.path / "params.safetensors"))
        log.info("edit loaded from %s", self.path)
        return deltas, meta["edited_layers"], meta["dropped"], meta["seconds"], meta["preset"]

    def save(self, entry: tuple) -> None:
        if self.path.exists():
            return
        from safetensors.torch import save_file

        from ..cache import atomic_dir

        deltas, edited_layers, dropped, secs, preset_name = entry
        with atomic_dir(self.path) as tmp:
            save_file({k: v.contiguous() for k, v in deltas.items()}, str(tmp / "params.safetensors"))
            (tmp / "meta.json").write_text(json.dumps({"edited_layers": edited_layers, "dropped": dropped,
                                                       "seconds": secs, "preset": preset_name}), encoding="utf-8")


def _changed(model, pristine: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the parameters that differ from the pristine weights (an applied edit)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not torch.equal(p.detach(), pristine[n])}


def _drift_prompts(sets: FactSets, drift: dict[str, Any]) -> list[str]:
    which = drift.get("prompts", "edit")
    facts = list(sets.edit) if which in ("edit", "both") else []
    if which in ("intrinsic", "both") or not facts:
        facts += [f for fs in sets.intrinsic.values() for f in fs]
    return [f.text for f in facts[: drift.get("limit") or None]]


def _states(model, tok, prompts: list[str], drift: dict[str, Any]) -> torch.Tensor:
    from ..evaluate.activations import block_states

    return block_states(model, tok, prompts, position="last", batch_size=drift.get("batch_size", 16))


@dataclass
class _Rows:
    """Collects a unit's rows."""

    sets: FactSets
    facts: list[FactRow] = field(default_factory=list)
    curves: list[CurvePoint] = field(default_factory=list)
    metrics: list[MetricRow] = field(default_factory=list)
    trans: list[TransitionRow] = field(default_factory=list)
    down: list[DownstreamRow] = field(default_factory=list)
    drifts: list[DriftRow] = field(default_factory=list)

    def metric(self, name: str, value: float | None = None, text: str | None = None, stage: str = "") -> None:
        self.metrics.append(MetricRow(name, value, text, stage))

    def stage(self, stage: str, model, tok, probe: dict[str, Any], memo: dict | None = None,
              key: tuple | None = None) -> dict[str, Any]:
        """Score every fact on ``model``: ES/PS/NS, success and retention of the edit
        set; retention of the intrinsic sets. Returns the per-fact scores. With ``memo``,
        the scores of weights already scored under ``key`` (deterministic) are reused."""
        from ..evaluate.metrics import score_facts

        mode, prob = probe.get("mode", "greedy"), probe.get("prob", "mean")
        if memo is not None and key in memo:
            edit_sc, intrinsic_sc = memo[key]
        else:
            edit_sc = score_facts(model, tok, self.sets.edit, mode=mode, prob=prob) if self.sets.edit else None
            intrinsic_sc = {ds: score_facts(model, tok, facts, mode=mode, prob=prob)
                            for ds, facts in self.sets.intrinsic.items()}
            if memo is not None:
                memo[key] = (edit_sc, intrinsic_sc)
        out: dict[str, Any] = {}
        if edit_sc is not None:
            sc = edit_sc
            out["edit"] = sc.facts
            for f in sc.facts:
                for metric in ("es", "ps", "ns"):
                    self.facts.append(FactRow(f.case_id, "edit", stage, metric, getattr(f, metric), None, self.sets.dataset))
                self.facts.append(FactRow(f.case_id, "edit", stage, "success", float(f.success), f.first_non_stop, self.sets.dataset))
                self.facts.append(FactRow(f.case_id, "edit", stage, "retained", float(f.retained_new), f.first_non_stop, self.sets.dataset))
                if f.margin is not None:
                    self.facts.append(FactRow(f.case_id, "edit", stage, "margin", f.margin, None, self.sets.dataset))
                if f.retained_true is not None:
                    self.facts.append(FactRow(f.case_id, "edit", stage, "retained_true", float(f.retained_true), None, self.sets.dataset))
            for k, v in sc.summary().items():
                if isinstance(v, float):
                    self.metric(f"edit_{k}", v, stage=stage)
        for ds, sc in intrinsic_sc.items():
            out.setdefault("intrinsic", []).extend(sc.facts)
            for f in sc.facts:
                v = None if f.retained_true is None else float(f.retained_true)
                self.facts.append(FactRow(f.case_id, "intrinsic", stage, "retained", v, f.first_non_stop, ds))
            self.metric(f"intrinsic_retention[{ds}]", sc.retention_true, stage=stage)
        return out

    def training(self, result, sets: FactSets) -> None:
        log = result.log
        for i, loss in enumerate(log.train_loss, start=1):
            self.curves.append(CurvePoint("train_loss", i, loss))
        for v in log.val:
            for k, x in v.items():
                if k != "step":
                    self.curves.append(CurvePoint(f"val_{k}", v["step"], x))
        intrinsic = [f for fs in sets.intrinsic.values() for f in fs]
        datasets = [ds for ds, fs in sets.intrinsic.items() for _ in fs]
        for step, tokens in log.tokens_at.items():
            self.curves.append(CurvePoint("tokens", step, float(tokens)))
        for p in log.probes:
            step = p["step"]
            for f, sc in zip(sets.edit, p.get("scores", [])):
                for metric in ("es", "ps", "ns", "success", "margin"):
                    if sc[metric] is not None:
                        self.facts.append(FactRow(f.case_id, "edit", f"step:{step}", metric, float(sc[metric]), None,
                                                  sets.dataset))
            for key in ("retention_new", "retention_true", "edit_reverted"):
                if key in p:
                    self.curves.append(CurvePoint(key, step, p[key]))
            for side, masses in p.get("categories", {}).items():
                for cat, x in masses.items():
                    if cat != "n":
                        self.curves.append(CurvePoint(f"mass_{side}_{cat}", step, x))
            for f, ok in zip(sets.edit, p.get("per_fact", {}).get("edit", [])):
                self.facts.append(FactRow(f.case_id, "edit", f"step:{step}", "retained", float(ok), None, sets.dataset))
            for f, ds, ok in zip(intrinsic, datasets, p.get("per_fact", {}).get("intrinsic", [])):
                self.facts.append(FactRow(f.case_id, "intrinsic", f"step:{step}", "retained", float(ok), None, ds))
            for top in p.get("top", []):
                self.facts.append(FactRow(top["case_id"], "edit", f"step:{step}", "top_k", None, json.dumps(top["tokens"]), sets.dataset))
        self.metric("steps", log.steps, stage="finetuned")
        self.metric("stop_reason", None, log.stop_reason, stage="finetuned")
        self.metric("finetune_seconds", log.seconds, stage="finetuned")
        self.metric("trainable_params", len(log.trainable), stage="finetuned")
        for k, v in result.base_metrics.items():
            self.metric(f"base_val_{k}", v, stage="base")

    def transitions(self, base: dict[str, Any], edited: dict[str, Any], ft: dict[str, Any]) -> None:
        from ..evaluate.stages import transitions

        if not self.sets.edit:
            return
        labels = transitions([f.success for f in edited["edit"]], [f.success for f in ft["edit"]])
        for f, b, e, t, lab in zip(self.sets.edit, base["edit"], edited["edit"], ft["edit"], labels):
            self.trans.append(TransitionRow(f.case_id, lab, b.first_non_stop, e.first_non_stop, t.first_non_stop, self.sets.dataset))

    def downstream(self, model, tok, ds: dict[str, Any], data_dir: Path | None, stage: str) -> None:
        from ..evaluate.downstream import evaluate_downstream

        if data_dir is None:
            raise EditdecayError("downstream.data_dir is required (the LLM-Adapters commonsense test files)")
        opts = {k: ds[k] for k in DOWNSTREAM_OPTIONS if k in ds}  # the spec's evaluator options (flat in the config)
        res = evaluate_downstream(model, tok, list(ds["tasks"]), data_dir, mode=ds.get("mode", "gen"),
                                  limit=ds.get("limit"), batch_size=ds.get("batch_size", 16), progress=False, **opts)
        for name, r in res.to_dict()["tasks"].items():
            self.down.append(DownstreamRow(stage, name, ds.get("mode", "gen"), r.get("accuracy"), r.get("n"),
                                           r.get("correct"), r.get("parse_rate"), r.get("seconds")))

    def drift(self, res, n_prompts: int) -> None:
        for pair, curve in res.norms.items():
            for b, x in enumerate(curve.tolist()):
                self.drifts.append(DriftRow(pair, "distance", b, x, n_prompts))
        for pair, curve in res.cosines.items():
            for b, x in enumerate(curve.tolist()):
                self.drifts.append(DriftRow(pair, "cosine", b, x, n_prompts))

    def finish(self, info: dict[str, Any]) -> UnitRows:
        return UnitRows(facts=self.facts, curves=self.curves, downstream=self.down, drift=self.drifts,
                        transitions=self.trans, metrics=self.metrics, info=info)


# --- the driver -----------------------------------------------------------------------------------
@dataclass
class RunSummary:
    study_id: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def _units(store: Store, study_id: int, worker_ids: Callable[[dict], list[str]]) -> Iterator[tuple[str, dict, str]]:
    for t in store.pending_trials(study_id):
        units = t.units
        if units is None:
            units = worker_ids(t.config)
            store.set_units(t.key, units)
            units = [u for u in units if not store.is_done(t.key, u)]
        for u in units:
            yield t.key, t.config, u


def run_study(spec: StudySpec, db: str | Path, *, executor: str = "local", max_parallel: int = 1,
              ray_address: str | None = None, device: str | None = None, progress: bool = True,
              edit_cache: str | Path | None = None) -> RunSummary:
    """Run every unit of ``spec`` that is not done in ``db``; returns counts. ``edit_cache``:
    a folder where edits are kept and looked up (:class:`EditCache`)."""
    if executor not in EXECUTORS:
        raise EditdecayError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    store = Store(db)
    store.init_schema()
    sid = store.register_study(spec.name, spec.raw)
    store.upsert_trials(sid, spec.expand())
    summary = RunSummary(sid)
    t0 = time.perf_counter()
    base_dir = spec.base_dir or Path(".")
    if executor == "local":
        worker = Worker(base_dir, device=device, progress=progress, edit_cache=edit_cache)
        pending = list(_units(store, sid, worker.unit_ids))
        bar = tqdm(pending, desc=f"study {spec.name}", unit="unit", disable=not progress)
        for key, cfg, unit in bar:
            bar.set_postfix_str(f"{key[:8]}{'/' + unit if unit else ''}")
            store.mark_running(key, unit)
            tu = time.perf_counter()
            try:
                rows = worker.run_unit(cfg, unit)
            except Exception as e:  # noqa: BLE001 - recorded, the study goes on
                _failed(store, summary, key, unit, e)
                continue
            store.write_unit(key, unit, rows, seconds=time.perf_counter() - tu, provenance=_provenance(cfg))
            summary.done += 1
    else:
        _run_ray(spec, store, sid, summary, base_dir, max_parallel, ray_address, device, progress, edit_cache)
    summary.seconds = time.perf_counter() - t0
    store.close()
    return summary


def _failed(store: Store, summary: RunSummary, key: str, unit: str, e: BaseException) -> None:
    msg = f"{type(e).__name__}: {e}"
    log.error("unit %s/%s failed: %s\n%s", key[:12], unit, msg, "".join(traceback.format_exception(e)))
    store.mark_failed(key, unit, msg)
    summary.failed += 1
    summary.errors.append(f"{key[:12]}{'/' + unit if unit else ''}: {msg}")


def _provenance(cfg: dict[str, Any]) -> dict[str, Any]:
    import platform

    from .. import __version__

    return {"editdecay": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "model": cfg.get("model"), "device": "cuda" if torch.cuda.is_available() else "cpu"}


def _run_ray(spec: StudySpec, store: Store, sid: int, summary: RunSummary, base_dir: Path, max_parallel: int,
             ray_address: str | None, device: str | None, progress: bool, edit_cache: str | Path | None = None) -> None:
    try:
        import ray
    except ImportError:
        raise EditdecayError("the ray executor needs Ray: pip install 'editdecay[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
                 **({} if ray_address else {"num_cpus": max(1, int(math.ceil(spec.resources.cpus * max_parallel)))}))
    opts: dict[str, Any] = {"num_cpus": spec.resources.cpus, "num_gpus": spec.resources.gpus}
    if spec.resources.memory_gb:
        opts["memory"] = int(spec.resources.memory_gb * 2**30)
    actor_cls = ray.remote(**opts)(_RayWorker)
    cache = str(edit_cache) if edit_cache is not None else None
    actors = [actor_cls.remote(str(base_dir), device, cache) for _ in range(max(1, max_parallel))]
    ids_worker = Worker(base_dir, device=device, progress=False)  # single-protocol unit ids (selection on the driver)
    pending = list(_units(store, sid, ids_worker.unit_ids))
    del ids_worker
    bar = tqdm(total=len(pending), desc=f"study {spec.name} (ray)", unit="unit", disable=not progress)
    inflight: dict[Any, tuple[str, str, float]] = {}
    free = list(actors)
    queue = list(pending)
    while queue or inflight:
        while queue and free:
            key, cfg, unit = queue.pop(0)
            actor = free.pop()
            store.mark_running(key, unit)
            ref = actor.run.remote(cfg, unit)
            inflight[ref] = (key, unit, time.perf_counter(), actor)
        ready, _ = ray.wait(list(inflight), num_returns=1)
        ref = ready[0]
        key, unit, tu, actor = inflight.pop(ref)
        free.append(actor)
        try:
            rows = ray.get(ref)
        except Exception as e:  # noqa: BLE001
            _failed(store, summary, key, unit, e)
        else:
            store.write_unit(key, unit, rows, seconds=time.perf_counter() - tu, provenance=_provenance({}))
            summary.done += 1
        bar.update(1)
    bar.close()


class _RayWorker:
    """A Ray actor around :class:`Worker` (models stay loaded across its units)."""

    def __init__(self, base_dir: str, device: str | None, edit_cache: str | None = None) -> None:
        self.worker = Worker(base_dir, device=device, progress=False, edit_cache=edit_cache)

    def run(self, cfg: dict[str, Any], unit: str) -> UnitRows:
        return self.worker.run_unit(cfg, unit)

