"""Grid expansion: each grid point of a :class:`StudySpec` resolves to a *config* (the
settings that determine its results); a :class:`Trial` is one distinct config, keyed by
the SHA-256 of its canonical JSON (:func:`config_hash`); :func:`stage_seed` derives the
per-stage seeds."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .schema import (
    AXES,
    NONE,
    EditorSettings,
    StudySpec,
    _editor_hparams_cls,
    _editor_names,
    _json_value,
)
from .validate import _At, _build, _coerce_fields, _dc_fields

log = logging.getLogger("editdecay.study.spec")

#: Version of the trial-config layout; part of every config (and so of every key).
CONFIG_VERSION = 1
#: Trial kinds in plan order (baselines first).
KINDS = ("base", "zero-edit", "edit-only", "edit+ft")
#: The PreserveConfig fields each preserve method reads.
PRESERVE_FIELDS = {"anchor": ("mu",), "replay": ("rho", "replay_batch"), "distill": ("rho", "replay_batch")}


# --- hashing --------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, UTF-8, tuples as lists."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def config_hash(config: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of ``config`` (a trial's key)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def stage_seed(seed: int, stage: str) -> int:
    """A 31-bit seed for one stage (``select``, ``edit``, ``finetune``, …) of a trial
    with replicate seed ``seed``. Derived from (seed, stage) only — not from the trial
    key — so that an edited model and its zero-edit baseline see the same fine-tuning
    data order."""
    h = hashlib.sha256(f"editdecay/{seed}/{stage}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


# --- trials ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """The resumable unit: a whole trial (``unit_id`` ``""``) or, under protocol
    ``single``, one edited fact of it (``unit_id`` = the fact's case id)."""

    trial_key: str
    unit_id: str = ""


@dataclass(frozen=True, eq=False)
class Trial:
    """One distinct config of the grid. ``points`` are the grid points it stands for
    (several when baselines are shared); ``axes`` the trial's axis values with the ones
    that do not matter to it set to None. Treat ``config`` as read-only."""

    key: str
    config: dict[str, Any]
    axes: dict[str, Any]
    points: tuple[dict[str, Any], ...]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Trial) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def config_hash(self) -> str:
        """Same as ``key``: SHA-256 of the canonical config JSON."""
        return self.key

    @property
    def short(self) -> str:
        return self.key[:12]

    @property
    def kind(self) -> str:
        """``base`` (no edit, no fine-tuning), ``zero-edit``, ``edit-only`` or ``edit+ft``."""
        edit, ft = self.config["edit"] is not None, self.config["finetune"] is not None
        return KINDS[2 * edit + ft]

    @property
    def per_fact(self) -> bool:
        """Units are facts (protocol ``single`` with edits)."""
        return self.config["edit"] is not None and self.config["edit"]["protocol"] == "single"

    @property
    def n_edits(self) -> int:
        return 0 if self.config["edit"] is None else int(self.config["edit"]["n_edits"])

    @property
    def unit_count(self) -> int:
        return self.n_edits if self.per_fact else 1

    def units(self, case_ids: Sequence[str] | None = None) -> list[Unit]:
        """The trial's units; under protocol ``single`` pass the edit set's case ids."""
        if not self.per_fact:
            return [Unit(self.key, "")]
        if case_ids is None:
            raise ValueError(f"trial {self.short} (protocol single): pass the case ids of its edit facts")
        if "" in case_ids:
            raise ValueError("case ids must be non-empty")
        return [Unit(self.key, str(c)) for c in case_ids]

    def stage_seed(self, stage: str) -> int:
        """:func:`stage_seed` of this trial's replicate seed."""
        return stage_seed(int(self.config["seed"]), stage)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "axes": self.axes, "points": list(self.points),
                "unit_count": self.unit_count, "config": self.config}


# --- expansion ------------------------------------------------------------------------------
def _matches(rule: Mapping[str, tuple[Any, ...]], point: Mapping[str, Any]) -> bool:
    return all(point[a] in vals for a, vals in rule.items())


class _Presets:
    """Preset files read once per expansion (a per-call cache, not module state)."""

    def __init__(self) -> None:
        self._ft: dict[str, dict[str, Any]] | None = None
        self._editor: dict[tuple[str, str], dict[str, Any]] = {}

    def finetune(self) -> dict[str, dict[str, Any]]:
        if self._ft is None:
            from ...finetune.presets import finetune_presets

            self._ft = finetune_presets()
        return self._ft

    def editor(self, method: str, name: str) -> dict[str, Any]:
        if (method, name) not in self._editor:
            from ...editing.hparams import load_preset

            self._editor[method, name] = load_preset(method, name)
        return self._editor[method, name]


def _editor_config(spec: StudySpec, point: Mapping[str, Any], method: str, at: _At, pr: _Presets) -> dict[str, Any]:
    """Preset, hyperparameters and layers of ``method`` at ``point`` (validated)."""
    st = spec.editors.get(method, EditorSettings())
    preset, hp, src = st.preset, dict(st.hparams), at / "editors" / method
    for i, rule in enumerate(spec.overrides):
        if method in rule.editors and _matches(rule.when, point):
            r = rule.editors[method]
            if "preset" in r:
                preset, src = r["preset"], (at / "overrides")[i] / "editors" / method
            hp.update(r["hparams"])
    if point["edit_layers"] is not None:
        hp["layers"] = list(point["edit_layers"])
    hp.setdefault("seed", stage_seed(point["seed"], "edit"))
    cls = _editor_hparams_cls(method)
    if "seed" not in _dc_fields(cls):
        hp.pop("seed")
    base = pr.editor(method, preset) if preset else {}
    _build(cls, {**base, **hp}, src, f" (editor {method}, model {point['model']})")
    return {"editor": method, "preset": preset, "hparams": dict(sorted(hp.items()))}


def _finetune_config(spec: StudySpec, point: Mapping[str, Any], at: _At, pr: _Presets) -> dict[str, Any]:
    from ...finetune.presets import FinetunePreset

    task, method = point["task"], point["ft_method"]
    fs = spec.finetune
    tpl, tpl_at = fs.preset, at / "finetune" / "preset"
    values: dict[str, Any] = dict(fs.overrides)
    if fs.stop is not None:
        values["stop"] = list(fs.stop)
    layers = [(fs.per_task.get(task), at / "finetune" / "per_task" / task),
              (fs.per_method.get(method), at / "finetune" / "per_method" / method)]
    layers += [(r.finetune, (at / "overrides")[i] / "finetune")
               for i, r in enumerate(spec.overrides) if r.finetune and _matches(r.when, point)]
    for vals, where in layers:
        if not vals:
            continue
        vals = dict(vals)
        if "preset" in vals:
            tpl, tpl_at = vals.pop("preset"), where / "preset"
        values.update(vals)
    try:
        name = tpl.format(task=task, method=method)
    except (KeyError, IndexError, ValueError):
        tpl_at.fail(f"{tpl!r}: only the placeholders {{task}} and {{method}} are known")
    available = pr.finetune()
    if name not in available:
        shown = f"{name!r}" if name == tpl else f"{tpl!r} gives {name!r} for task {task}, method {method}, which"
        tpl_at.fail(f"{shown} is not one of {', '.join(sorted(available))}")
    params = {k: v for k, v in available[name].items() if k != "source"}
    params.update(values)
    params["task"], params["method"] = task, method
    if spec.probes.every is not None:
        params["eval_every"], params["eval_every_epochs"] = spec.probes.every, None
    elif spec.probes.every_epochs is not None:
        params["eval_every"], params["eval_every_epochs"] = None, spec.probes.every_epochs
    if "seed" not in values:
        params["seed"] = stage_seed(point["seed"], "finetune")
    if fs.budget:  # one run to the largest point, probed at every point, no early stop
        unit, points = fs.budget
        params["stop"] = []
        if unit == "steps":
            params["max_steps"], params["epochs"] = max(points), None
        if spec.probes.every is None and spec.probes.every_epochs is None:
            params["eval_every"], params["eval_every_epochs"] = (max(points) if unit == "steps" else 10**9), None
    pre = _build(FinetunePreset, _coerce_fields(FinetunePreset, params, at / "finetune"), at / "finetune",
                 f" (preset {name}, task {task}, method {method})")
    resolved = json.loads(canonical_json(pre.to_dict()))
    out = {"task": task, "method": method, "policy": point["layer_policy"], "preset": name,
           "params": resolved, "data": fs.data.get(task)}
    if fs.hygiene:  # only when on, so that existing trial keys stay as they were
        out["hygiene"] = True
    if fs.budget:  # likewise
        unit, points = fs.budget
        out["budget"] = {"unit": unit, "at": list(points)}
    return out


def _point_config(spec: StudySpec, point: Mapping[str, Any], at: _At, pr: _Presets) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, axes-that-matter) of one grid point."""
    zero = point["editor"] == NONE or point["n_edits"] == 0
    no_ft = point["ft_method"] == NONE
    sel = spec.selection
    n_edit = sel.n_edit if sel.n_edit is not None else max(spec.axes["n_edits"])
    selection = {"n_edit": n_edit, "n_intrinsic": sel.n_intrinsic, "margin": sel.margin, "mode": sel.mode,
                 "seed": sel.seed, "filter": sel.filter}
    axes = {a: _json_value(a, v) for a, v in point.items()}
    edit = None
    if zero:
        data = {"datasets": [spec.datasets[n].to_dict() for n in spec.axes["dataset"]], "selection": selection}
        axes.update(dataset=None, editor=NONE, n_edits=0, protocol=None, edit_layers=None)
    else:
        data = {**spec.datasets[point["dataset"]].to_dict(), "selection": selection}
        proto = point["protocol"]
        layers = None if point["edit_layers"] is None else list(point["edit_layers"])
        edit = {**_editor_config(spec, point, point["editor"], at, pr), "layers": layers,
                "protocol": proto.split(":")[0], "batch_size": int(proto.split(":")[1]) if ":" in proto else None,
                "n_edits": point["n_edits"]}
    ft = None
    if no_ft:
        axes.update(task=None, layer_policy=None, preserve=None)
    else:
        ft = _finetune_config(spec, point, at, pr)
        method = point["preserve"]
        if zero or method == NONE:  # nothing to preserve: the trial is plain fine-tuning
            axes["preserve"] = NONE if not zero else None
        else:
            if method == "freeze-edited" and point["layer_policy"] != "all":
                (at / "axes" / "preserve").fail(
                    f"'freeze-edited' is the layer policy non-edited: it cannot combine with layer_policy "
                    f"{point['layer_policy']!r} (exclude {{preserve: freeze-edited, layer_policy: {point['layer_policy']}}})")
            own = PRESERVE_FIELDS.get(method, ())  # only the method's own settings enter its key
            ft["preserve"] = {"method": method, **{k: v for k, v in sorted(spec.finetune.preserve.items()) if k in own}}
        if zero and point["layer_policy"] in ("edited", "non-edited"):
            lf = spec.finetune.layers_from
            if lf is None:
                (at / "finetune" / "layers_from").fail(
                    f"layer policy {point['layer_policy']!r} on the zero-edit baseline needs the blocks of an editor: "
                    f"one of {', '.join(n for n in _editor_names() if n != NONE)} (or exclude "
                    f"{{editor: none, layer_policy: {point['layer_policy']}}})")
            ec = _editor_config(spec, point, lf, at, pr)
            ft["layers_from"] = {"editor": lf, "preset": ec["preset"], "layers": ec["hparams"].get("layers")}
            axes["edit_layers"] = _json_value("edit_layers", point["edit_layers"])
    evaluate: dict[str, Any] = {"probe": {"mode": spec.probes.mode, "prob": spec.probes.prob,
                                          "token_categories": spec.probes.token_categories,
                                          "top_k": spec.probes.top_k}}
    final = "finetuned" if ft else "edited" if edit else "base"
    ds = spec.downstream
    if ds is not None:
        applicable = {"base", final} | ({"edited"} if edit else set()) | ({"finetuned"} if ft else set())
        stages = [final if s == "final" else s for s in ds.stages]
        stages = [s for s in dict.fromkeys(stages) if s in applicable]
        evaluate["downstream"] = {"tasks": list(ds.tasks), "mode": ds.mode, "limit": ds.limit, "stages": stages,
                                  "data_dir": ds.data_dir, **dict(sorted(ds.options.items()))} if stages else None
    else:
        evaluate["downstream"] = None
    dr = spec.drift
    evaluate["drift"] = ({"prompts": dr.prompts, "position": dr.position, "limit": dr.limit}
                         if dr is not None and (edit or ft) else None)
    if spec.reedit is not None and edit and ft:  # only when set, so that existing trial keys stay as they were
        evaluate["reedit"] = dict(spec.reedit)
    config = {"version": CONFIG_VERSION, "model": point["model"], "seed": point["seed"], "data": data,
              "edit": edit, "finetune": ft, "evaluate": evaluate}
    return json.loads(canonical_json(config)), axes


def expand(spec: StudySpec) -> list[Trial]:
    """The trials of ``spec``: the axis product minus ``exclude`` matches, merged by key.

    Deterministic order: by kind (base, zero-edit, edit-only, edit+ft), then by the first
    grid point (axes in :data:`AXES` order, values in spec order)."""
    at = _At(spec.source)
    pr = _Presets()
    groups: dict[str, list[Any]] = {}
    used = [False] * len(spec.exclude)
    for i, values in enumerate(itertools.product(*(spec.axes[a] for a in AXES))):
        point = dict(zip(AXES, values))
        hit = [j for j, r in enumerate(spec.exclude) if _matches(r, point)]
        for j in hit:
            used[j] = True
        if hit:
            continue
        config, axes = _point_config(spec, point, at, pr)
        key = config_hash(config)
        if key not in groups:
            groups[key] = [i, config, axes, []]
        groups[key][3].append({a: _json_value(a, v) for a, v in point.items()})
    for j, u in enumerate(used):
        if not u:
            log.warning("%s: exclude[%d] matches no grid point", spec.source, j)
    trials = [Trial(k, g[1], g[2], tuple(g[3])) for k, g in groups.items()]
    order = {k: g[0] for k, g in groups.items()}
    return sorted(trials, key=lambda t: (KINDS.index(t.kind), order[t.key]))
