"""Study specs: YAML → typed, validated settings → a grid of trials.

A spec names axes (model × dataset × editor × edit layers × n_edits × protocol × task ×
fine-tuning method × layer policy × seed); the grid is their product minus ``exclude``
rules. Each grid point resolves to a *config*: the settings that determine its results
(editor preset and hyperparameters, fine-tuning preset with overrides, selection,
evaluation). A :class:`Trial` is one distinct config; its ``key`` is the SHA-256 of the
config's canonical JSON, so grid points whose results cannot differ share one trial:

- editor ``none`` (or ``n_edits: 0``) is the zero-edit baseline: n_edits is 0 and the
  protocol, edit layers and editor settings drop out; the dataset drops out too (seed
  001: zero-edit settings are identical across datasets) — the trial probes the
  intrinsic sets of every dataset on the axis;
- ``ft_method: none`` is the no-fine-tune baseline: task and layer policy drop out.

Errors are one line naming the file, the field path and the allowed values::

    demo.yaml: axes.ft_method[1]: 'lorra' is not one of full, lora, dora, none

See ``docs/study-store.md`` for the YAML format and ``examples/demo.yaml``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

from ..errors import EditdecayError

log = logging.getLogger(__name__)

#: Version of the trial-config layout; part of every config (and so of every key).
CONFIG_VERSION = 1
#: Axes in grid order (the product varies the last axis fastest).
AXES = ("model", "dataset", "editor", "edit_layers", "n_edits", "protocol", "task", "ft_method", "layer_policy", "seed",
        "preserve")
#: Fine-tuning tasks.
TASKS = ("unstructured", "structured", "classification", "sft", "commonsense", "hotpotqa")
NONE = "none"
BUILTIN_DATASET = "builtin"
POLICY_FORMS = "all, threshold:t, window:c,w, edited, non-edited"
DOWNSTREAM_STAGES = ("final", "base", "edited", "finetuned")
#: Evaluator options of a ``downstream:`` block (``DownstreamConfig`` fields; part of the keys when given).
DOWNSTREAM_OPTIONS = ("num_beams", "max_new_tokens", "prompt_style", "response_prefix", "ll_norm", "ll_target",
                      "ll_context")
DRIFT_PROMPTS = ("edit", "intrinsic", "both")
#: Trial kinds in plan order (baselines first).
KINDS = ("base", "zero-edit", "edit-only", "edit+ft")
#: The PreserveConfig fields each preserve method reads.
PRESERVE_FIELDS = {"anchor": ("mu",), "replay": ("rho", "replay_batch")}
_KEYS = {
    "top": ("name", "description", "axes", "exclude", "datasets", "selection", "editors", "finetune", "overrides",
            "probes", "downstream", "drift", "resources", "reedit"),
    "dataset": ("path", "format", "zsre_preset"),
    "selection": ("n_edit", "n_intrinsic", "margin", "mode", "seed", "filter"),
    "editor": ("preset", "hparams"),
    "finetune": ("preset", "overrides", "stop", "per_task", "per_method", "layers_from", "data", "hygiene",
                 "budget", "preserve"),
    "rule": ("when", "editors", "finetune"),
    "probes": ("every", "every_epochs", "mode", "prob", "token_categories", "top_k"),
    "downstream": ("tasks", "mode", "limit", "stages", "data_dir", "batch_size", *DOWNSTREAM_OPTIONS),
    "drift": ("prompts", "position", "limit", "batch_size"),
    "reedit": ("editor", "scratch"),
    "resources": ("cpus", "gpus", "memory_gb"),
}


class SpecError(EditdecayError):
    """A study spec is malformed; the message names the file and the field path."""


# --- validation helpers ---------------------------------------------------------------------
@dataclass(frozen=True)
class _At:
    """A position in the spec (file label and field path) for error messages."""

    src: str
    path: str = ""

    def __truediv__(self, key: object) -> _At:
        return _At(self.src, f"{self.path}.{key}" if self.path else str(key))

    def __getitem__(self, i: int) -> _At:
        return _At(self.src, f"{self.path}[{i}]")

    def fail(self, msg: str) -> NoReturn:
        raise SpecError(f"{self.src}: {self.path}: {msg}" if self.path else f"{self.src}: {msg}")


def _mapping(v: Any, at: _At, known: Sequence[str] | None = None) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        at.fail(f"expected a mapping, got {type(v).__name__} {v!r}")
    bad = [k for k in v if not isinstance(k, str)]
    if bad:
        at.fail(f"keys must be strings, got {bad[0]!r}")
    if known is not None:
        unknown = sorted(set(v) - set(known))
        if unknown:
            at.fail(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return dict(v)


def _as_list(v: Any, at: _At) -> list[Any]:
    if isinstance(v, (list, tuple)):
        if not v:
            at.fail("expected at least one value")
        return list(v)
    if isinstance(v, Mapping):
        at.fail(f"expected a value or a list of values, got a mapping {dict(v)!r}")
    return [v]


def _str(v: Any, at: _At) -> str:
    if not isinstance(v, str) or not v.strip():
        at.fail(f"expected a non-empty string, got {v!r}")
    return v.strip()


def _choice(v: Any, at: _At, allowed: Sequence[str], lower: bool = True) -> str:
    s = v.strip().lower() if lower and isinstance(v, str) else v
    if s not in allowed:
        at.fail(f"{v!r} is not one of {', '.join(allowed)}")
    return s


def _int(v: Any, at: _At, minimum: int | None = None) -> int:
    out: int | None = None
    if isinstance(v, bool):
        pass
    elif isinstance(v, int):
        out = v
    elif isinstance(v, float) and v.is_integer():
        out = int(v)
    elif isinstance(v, str):
        try:
            f = float(v.replace("_", ""))
            out = int(f) if f.is_integer() else None
        except ValueError:
            out = None
    if out is None:
        at.fail(f"expected an integer, got {v!r}")
    if minimum is not None and out < minimum:
        at.fail(f"expected an integer >= {minimum}, got {out}")
    return out


def _float(v: Any, at: _At, minimum: float | None = None) -> float:
    out: float | None = None
    if isinstance(v, bool):
        pass
    elif isinstance(v, (int, float)):
        out = float(v)
    elif isinstance(v, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            out = float(v)
        except ValueError:
            out = None
    if out is None or not math.isfinite(out):
        at.fail(f"expected a number, got {v!r}")
    if minimum is not None and out < minimum:
        at.fail(f"expected a number >= {minimum}, got {out}")
    return out


def _bool(v: Any, at: _At) -> bool:
    if not isinstance(v, bool):
        at.fail(f"expected true or false, got {v!r}")
    return v


def _opt(v: Any, conv, at: _At, *args):
    return None if v is None else conv(v, at, *args)


def _dc_fields(cls: type) -> dict[str, str]:
    """Field name → annotation text of a dataclass (annotations are strings here)."""
    return {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)) for f in fields(cls)}


def _coerce_fields(cls: type, values: Mapping[str, Any], at: _At, forbidden: Sequence[str] = ()) -> dict[str, Any]:
    """Check keys against the dataclass ``cls`` and coerce numbers by annotation, so that
    ``1e-5`` (a YAML string) and ``1`` for a float field hash like ``1e-05`` and ``1.0``."""
    types = _dc_fields(cls)
    known = [k for k in types if k not in forbidden]
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k not in known:
            (at / k).fail(f"unknown field; known: {', '.join(sorted(known))}")
        t = types[k].replace(" ", "")
        if v is None:
            out[k] = None
        elif t in ("float", "float|None"):
            out[k] = _float(v, at / k)
        elif t in ("int", "int|None"):
            out[k] = _int(v, at / k)
        elif t in ("bool", "bool|None"):
            out[k] = _bool(v, at / k)
        elif t == "tuple[float,float]":
            vs = _as_list(v, at / k)
            out[k] = [_float(x, (at / k)[i]) for i, x in enumerate(vs)]
        else:
            out[k] = v
    return out


def _build(cls: type, values: Mapping[str, Any], at: _At, context: str = "") -> Any:
    """Construct the dataclass (its ``__post_init__`` validates); errors name ``at``."""
    from ..editing.hparams import from_dict

    try:
        return from_dict(cls, dict(values), "x")
    except EditdecayError as e:
        msg = str(e).removeprefix("x: ")
        at.fail(f"{msg}{context}")


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


# --- axis values ----------------------------------------------------------------------------
def _editor_names() -> tuple[str, ...]:
    from ..editing import EDITORS

    return (NONE, *sorted(EDITORS))


def _ft_methods() -> tuple[str, ...]:
    from ..finetune.methods import METHODS

    return (*METHODS, NONE)


def _parse_layers(v: Any, at: _At) -> tuple[int, ...] | None:
    """``default`` → None; ``5``, ``[3, 4]``, ``"3-7"``, ``"1,3"`` → sorted block tuple."""
    if isinstance(v, str):
        s = v.strip().lower()
        if s == "default":
            return None
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", s)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                at.fail(f"{v!r}: empty block range")
            return tuple(range(lo, hi + 1))
        if re.fullmatch(r"\d+(\s*,\s*\d+)*", s):
            return tuple(sorted({int(x) for x in s.split(",")}))
        at.fail(f"{v!r} is not one of default, a block index, a range a-b, a list of block indices")
    if isinstance(v, (list, tuple)):
        if not v:
            at.fail("expected at least one block index")
        return tuple(sorted({_int(x, at[i], 0) for i, x in enumerate(v)}))
    return (_int(v, at, 0),)


def layers_label(layers: Sequence[int] | None) -> str:
    """``default``, ``5``, ``3-7`` or ``1,3`` for a block list."""
    if layers is None:
        return "default"
    ls = list(layers)
    if len(ls) > 1 and ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}-{ls[-1]}"
    return ",".join(map(str, ls))


def _parse_protocol(v: Any, at: _At) -> str:
    allowed = ("single", "batch", "sequential:B")
    s = _str(v, at).lower().replace(" ", "")
    if s in ("single", "batch"):
        return s
    if s == "sequential":
        at.fail("'sequential' needs a batch size: write sequential:B (e.g. sequential:100)")
    m = re.fullmatch(r"sequential:(\d+)", s)
    if m and int(m.group(1)) >= 1:
        return f"sequential:{int(m.group(1))}"
    at.fail(f"{v!r} is not one of {', '.join(allowed)}")


def _parse_policy(v: Any, at: _At) -> str:
    s = _str(v, at).lower().replace(" ", "")
    if s in ("all", "edited", "non-edited") or re.fullmatch(r"threshold:\d+", s) or re.fullmatch(r"window:\d+,\d+", s):
        if s.startswith("window:") and int(s.split(",")[1]) < 1:
            at.fail(f"{v!r}: the window width must be >= 1")
        return s
    at.fail(f"{v!r} is not one of {POLICY_FORMS}")


def _axis_value(axis: str, v: Any, at: _At, datasets: Sequence[str]) -> Any:
    """Canonical value of one axis entry (validated)."""
    if axis == "model":
        return _str(v, at)
    if axis == "dataset":
        name = _str(v, at)
        if name not in datasets:
            at.fail(f"{v!r} is not one of {', '.join(datasets)} (declare other datasets under datasets:)")
        return name
    if axis == "editor":
        return _choice(v, at, _editor_names())
    if axis == "edit_layers":
        return _parse_layers(v, at)
    if axis == "n_edits":
        return _int(v, at, 0)
    if axis == "protocol":
        return _parse_protocol(v, at)
    if axis == "task":
        return _choice(v, at, TASKS)
    if axis == "ft_method":
        return _choice(v, at, _ft_methods())
    if axis == "layer_policy":
        return _parse_policy(v, at)
    if axis == "seed":
        return _int(v, at, 0)
    if axis == "preserve":
        from ..finetune.preserve import PRESERVE_METHODS

        return _choice(v, at, PRESERVE_METHODS)
    raise AssertionError(axis)


def _json_value(axis: str, v: Any) -> Any:
    return (list(v) if v is not None else "default") if axis == "edit_layers" else v


# --- settings -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset axis value comes from (paths as written, relative to the spec)."""

    name: str
    path: str | None = None
    format: str = "auto"
    zsre_preset: str = "memit"

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.name, "path": self.path, "format": self.format, "zsre_preset": self.zsre_preset}


@dataclass(frozen=True)
class SelectionSettings:
    """Edit/intrinsic selection (:func:`editdecay.facts.selection.select_facts`). A trial
    with ``n_edits`` n edits the first n facts of the edit set. ``n_edit`` None: the
    largest n_edits on the grid. ``filter`` false skips the confidence filter (seed 001)."""

    n_edit: int | None = None
    n_intrinsic: int = 100
    margin: float = 0.1
    mode: str = "greedy"
    seed: int = 0
    filter: bool = True


@dataclass(frozen=True)
class EditorSettings:
    """Preset (None: derived from the model) and hyperparameter overrides of one editor."""

    preset: str | None = None
    hparams: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning preset and overrides. ``preset`` may use ``{task}`` and ``{method}``
    (``cpu-{task}``, ``seed001-{task}-{method}``); ``per_task``/``per_method`` values are
    preset fields (plus ``preset``); ``stop`` replaces the preset's rules; ``layers_from``
    names the editor whose blocks ``edited``/``non-edited`` mean on the zero-edit
    baseline; ``data`` maps a task to its training data (None: the task's default);
    ``hygiene`` drops training documents that mention the unit's edited facts (seed 000
    §4.1: per fact under protocol ``single``); ``budget`` is a fine-tuning budget axis
    probed in one run per trial: ``[steps, ...]`` or ``{tokens: [...]}`` — facts (with
    ES/PS/NS and margin) are probed at every point, training ends at the largest, and
    the preset's stopping rules are off (a curve needs every point)."""

    preset: str = "cpu-{task}"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] | None = None
    per_task: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    per_method: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    layers_from: str | None = None
    data: Mapping[str, str | None] = field(default_factory=dict)
    hygiene: bool = False
    budget: tuple[str, tuple[int, ...]] | None = None
    """(unit, points): "steps" or "tokens", ascending."""
    preserve: Mapping[str, Any] = field(default_factory=dict)
    """Settings of the ``preserve`` axis's methods (PreserveConfig fields: mu, rho, replay_batch)."""


@dataclass(frozen=True)
class OverrideRule:
    """Settings applied to the grid points that match ``when`` (a partial axis
    assignment): editor presets/hparams and fine-tuning fields (later rules win)."""

    when: Mapping[str, tuple[Any, ...]]
    editors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    finetune: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProbeSettings:
    """Fact probes: schedule during fine-tuning (``every`` N steps or ``every_epochs``;
    None: the preset's evaluation schedule), retention mode, CounterFact probability,
    token categories and top-k tokens."""

    every: int | None = None
    every_epochs: float | None = None
    mode: str = "greedy"
    prob: str = "mean"
    token_categories: bool = True
    top_k: int = 3


@dataclass(frozen=True)
class DownstreamSettings:
    """Downstream accuracy (:func:`editdecay.evaluate.downstream.evaluate_downstream`).
    ``stages``: ``final`` (the trial's last model) and/or base, edited, finetuned."""

    tasks: tuple[str, ...]
    mode: str = "gen"
    limit: int | None = None
    stages: tuple[str, ...] = ("final",)
    data_dir: str | None = None
    batch_size: int = 16
    options: Mapping[str, Any] = field(default_factory=dict)
    """Other :class:`~editdecay.evaluate.downstream.DownstreamConfig` fields."""


@dataclass(frozen=True)
class DriftSettings:
    """Activation drift on the edit and/or intrinsic prompts."""

    prompts: str = "edit"
    position: str = "last"
    limit: int | None = None
    batch_size: int = 16


@dataclass(frozen=True)
class Resources:
    """Resources requested per unit (Ray task options)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float | None = None


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


# --- the spec -------------------------------------------------------------------------------
@dataclass
class StudySpec:
    """A validated study spec (see the module docstring and ``docs/study-store.md``)."""

    name: str
    axes: dict[str, tuple[Any, ...]]
    exclude: tuple[dict[str, tuple[Any, ...]], ...] = ()
    datasets: dict[str, DatasetSource] = field(default_factory=dict)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    editors: dict[str, EditorSettings] = field(default_factory=dict)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    overrides: tuple[OverrideRule, ...] = ()
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    downstream: DownstreamSettings | None = None
    drift: DriftSettings | None = None
    reedit: Mapping[str, Any] | None = None
    """Re-edit stage after fine-tuning: ``{"editor": name | None (the trial's), "scratch": bool}``."""
    resources: Resources = field(default_factory=Resources)
    description: str = ""
    source: str = "spec"
    """Label used in error messages (the file path)."""
    base_dir: Path | None = None
    """Directory that relative paths are resolved against (the spec file's)."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    # construction ---------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> StudySpec:
        """Read and validate a spec file; relative paths inside resolve against its folder."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpecError(f"{path}: no such file") from None
        except yaml.YAMLError as e:
            raise SpecError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        return cls.from_dict(data, str(path), base_dir=p.resolve().parent, default_name=p.stem)

    @classmethod
    def from_dict(cls, d: Any, where: str = "spec", *, base_dir: str | Path | None = None,
                  default_name: str = "study") -> StudySpec:
        """Validate a spec mapping; ``where`` labels error messages. The grid is expanded
        once, so preset and hyperparameter errors surface here too."""
        at = _At(where)
        d = _mapping(d, at, _KEYS["top"])
        name = _str(d["name"], at / "name") if d.get("name") is not None else default_name
        description = str(d.get("description") or "")
        datasets = _parse_datasets(d.get("datasets"), at / "datasets")
        ds_names = (BUILTIN_DATASET, *sorted(k for k in datasets if k != BUILTIN_DATASET))
        axes = _parse_axes(d.get("axes"), at / "axes", ds_names)
        datasets = {n: datasets.get(n, DatasetSource(n, None, "builtin")) for n in axes["dataset"]}
        spec = cls(
            name=name,
            axes=axes,
            exclude=tuple(_parse_when(r, (at / "exclude")[i], ds_names)
                          for i, r in enumerate(_list_of(d.get("exclude"), at / "exclude"))),
            datasets=datasets,
            selection=_parse_selection(d.get("selection"), at / "selection", axes),
            editors=_parse_editors(d.get("editors"), at / "editors"),
            finetune=_parse_finetune(d.get("finetune"), at / "finetune"),
            overrides=tuple(_parse_rule(r, (at / "overrides")[i], ds_names)
                            for i, r in enumerate(_list_of(d.get("overrides"), at / "overrides"))),
            probes=_parse_probes(d.get("probes"), at / "probes"),
            downstream=_parse_downstream(d.get("downstream"), at / "downstream"),
            drift=_parse_drift(d.get("drift"), at / "drift"),
            reedit=_parse_reedit(d.get("reedit"), at / "reedit"),
            resources=_parse_resources(d.get("resources"), at / "resources"),
            description=description,
            source=where,
            base_dir=Path(base_dir) if base_dir is not None else None,
            raw=json.loads(json.dumps(d, sort_keys=True, default=str)),
        )
        expand(spec)  # surfaces errors that depend on combinations (presets, policies)
        return spec

    # use ----------------------------------------------------------------------------------
    @property
    def spec_hash(self) -> str:
        """SHA-256 of the spec mapping as given (canonical JSON)."""
        return config_hash(self.raw)

    def expand(self) -> list[Trial]:
        """:func:`expand` of this spec."""
        return expand(self)

    def resolve_path(self, p: str | Path) -> Path:
        """A path from the spec, resolved against the spec file's folder."""
        q = Path(p).expanduser()
        return q if q.is_absolute() or self.base_dir is None else self.base_dir / q

    def grid_size(self) -> int:
        """Grid points before exclusion and merging."""
        return math.prod(len(v) for v in self.axes.values())


def _list_of(v: Any, at: _At) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        at.fail(f"expected a list, got {type(v).__name__}")
    return v


def _parse_datasets(v: Any, at: _At) -> dict[str, DatasetSource]:
    from ..facts.datasets import FORMATS, ZSRE_PRESETS

    out = {}
    for name, entry in _mapping(v, at).items():
        e = _mapping(entry, at / name, _KEYS["dataset"])
        fmt = _choice(e.get("format", "auto"), at / name / "format", FORMATS)
        path = _opt(e.get("path"), _str, at / name / "path")
        if path is None and fmt != "builtin":
            (at / name / "path").fail(f"required for format {fmt} (only format builtin needs no path)")
        out[name] = DatasetSource(name, path, fmt, _choice(e.get("zsre_preset", "memit"), at / name / "zsre_preset",
                                                           ZSRE_PRESETS))
    return out


def _parse_axes(v: Any, at: _At, datasets: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    from ..models.embedded import DEFAULT_MODEL

    raw = _mapping(v, at, AXES)
    defaults = {"model": DEFAULT_MODEL, "dataset": BUILTIN_DATASET, "editor": NONE, "edit_layers": "default",
                "n_edits": 0, "protocol": "batch", "task": "unstructured", "ft_method": NONE, "layer_policy": "all",
                "seed": 0, "preserve": NONE}
    axes: dict[str, tuple[Any, ...]] = {}
    for axis in AXES:
        vals = _as_list(raw.get(axis, defaults[axis]), at / axis) if axis in raw else [defaults[axis]]
        canon = [_axis_value(axis, x, (at / axis)[i] if isinstance(raw.get(axis), list) else at / axis, datasets)
                 for i, x in enumerate(vals)]
        axes[axis] = tuple(dict.fromkeys(canon))
    if "n_edits" not in raw and any(e != NONE for e in axes["editor"]):
        (at / "n_edits").fail("required when an editor other than none is on the grid")
    return axes


def _parse_when(v: Any, at: _At, datasets: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    rule = _mapping(v, at, AXES)
    if not rule:
        at.fail(f"an empty rule would match every grid point; name some of: {', '.join(AXES)}")
    out = {}
    for axis, vals in rule.items():
        lst = _as_list(vals, at / axis)
        out[axis] = tuple(_axis_value(axis, x, (at / axis)[i] if isinstance(vals, list) else at / axis, datasets)
                          for i, x in enumerate(lst))
    return out


def _parse_selection(v: Any, at: _At, axes: Mapping[str, tuple[Any, ...]]) -> SelectionSettings:
    from ..evaluate.probes import PROBE_MODES

    d = _mapping(v, at, _KEYS["selection"])
    s = SelectionSettings(
        n_edit=_opt(d.get("n_edit"), _int, at / "n_edit", 0),
        n_intrinsic=_int(d.get("n_intrinsic", 100), at / "n_intrinsic", 0),
        margin=_float(d.get("margin", 0.1), at / "margin"),
        mode=_choice(d.get("mode", "greedy"), at / "mode", PROBE_MODES),
        seed=_int(d.get("seed", 0), at / "seed", 0),
        filter=_bool(d.get("filter", True), at / "filter"),
    )
    largest = max(axes["n_edits"])
    if s.n_edit is not None and s.n_edit < largest:
        (at / "n_edit").fail(f"{s.n_edit} is smaller than the largest n_edits on the grid ({largest})")
    return s


def _editor_hparams_cls(method: str) -> type:
    from ..editing import EDITOR_REGISTRY

    return EDITOR_REGISTRY[method].hparams


def _parse_editor_entry(method: str, v: Any, at: _At, partial: bool = False) -> dict[str, Any]:
    from ..editing.hparams import presets

    d = _mapping(v, at, _KEYS["editor"])
    out: dict[str, Any] = {}
    if "preset" in d or not partial:
        p = _opt(d.get("preset"), _str, at / "preset")
        if p is not None:
            available = sorted(presets(method))
            if p not in available:
                (at / "preset").fail(f"{p!r} is not one of {', '.join(available) or '(no presets)'}")
        out["preset"] = p
    hp = _mapping(d.get("hparams"), at / "hparams")
    out["hparams"] = _coerce_fields(_editor_hparams_cls(method), hp, at / "hparams")
    return out


def _parse_editors(v: Any, at: _At) -> dict[str, EditorSettings]:
    names = [n for n in _editor_names() if n != NONE]
    out = {}
    for method, entry in _mapping(v, at).items():
        m = _choice(method, at, names)
        e = _parse_editor_entry(m, entry, at / method)
        out[m] = EditorSettings(e["preset"], e["hparams"])
    return out


def _preset_fields(values: Any, at: _At, allow_preset: bool = True) -> dict[str, Any]:
    from ..finetune.presets import FinetunePreset

    d = _mapping(values, at)
    out: dict[str, Any] = {}
    if "preset" in d:
        if not allow_preset:
            (at / "preset").fail("set the preset with finetune.preset, per_task or per_method")
        out["preset"] = _str(d.pop("preset"), at / "preset")
    out.update(_coerce_fields(FinetunePreset, d, at, forbidden=("task", "method")))
    if "stop" in out:
        out["stop"] = _stop_rules(out["stop"], at / "stop")
    return out


def _stop_rules(v: Any, at: _At) -> list[str]:
    from ..finetune.trainer import StopRule

    rules = [] if v is None else v if isinstance(v, list) else [v]
    out = []
    for i, r in enumerate(rules):
        try:
            StopRule.parse(_str(r, at[i]))
        except SpecError:
            raise
        except EditdecayError:
            at[i].fail(f"{r!r} is not one of loss<τ, loss<base-Δ, acc>τ")
        out.append(r.strip())
    return out


def _parse_finetune(v: Any, at: _At) -> FinetuneSettings:
    d = _mapping(v, at, _KEYS["finetune"])
    methods = [m for m in _ft_methods() if m != NONE]
    per_task = {}
    for t, vals in _mapping(d.get("per_task"), at / "per_task").items():
        per_task[_choice(t, at / "per_task", TASKS)] = _preset_fields(vals, at / "per_task" / t)
    per_method = {}
    for m, vals in _mapping(d.get("per_method"), at / "per_method").items():
        per_method[_choice(m, at / "per_method", methods)] = _preset_fields(vals, at / "per_method" / m)
    lf = d.get("layers_from")
    if lf is not None:
        lf = _choice(lf, at / "layers_from", [n for n in _editor_names() if n != NONE])
    data = {}
    for t, p in _mapping(d.get("data"), at / "data").items():
        data[_choice(t, at / "data", TASKS)] = _opt(p, _str, at / "data" / t)
    return FinetuneSettings(
        preset=_str(d.get("preset", "cpu-{task}"), at / "preset"),
        overrides=_preset_fields(d.get("overrides"), at / "overrides", allow_preset=False),
        stop=tuple(_stop_rules(d["stop"], at / "stop")) if d.get("stop") is not None else None,
        per_task=per_task,
        per_method=per_method,
        layers_from=lf,
        data=data,
        hygiene=_bool(d.get("hygiene", False), at / "hygiene"),
        budget=_parse_budget(d.get("budget"), at / "budget"),
        preserve=_parse_preserve(d.get("preserve"), at / "preserve"),
    )


def _parse_preserve(v: Any, at: _At) -> dict[str, Any]:
    from ..finetune.preserve import PreserveConfig

    d = _mapping(v, at)
    vals = _coerce_fields(PreserveConfig, d, at, forbidden=("method",))
    _build(PreserveConfig, {**vals, "method": "anchor"}, at)
    return vals


def _parse_budget(v: Any, at: _At) -> tuple[str, tuple[int, ...]] | None:
    """``[s1, s2, ...]`` (optimiser steps) or ``{steps: [...]}`` / ``{tokens: [...]}``."""
    if v is None:
        return None
    unit = "steps"
    if isinstance(v, dict):
        d = _mapping(v, at, ("steps", "tokens"))
        if len(d) != 1:
            at.fail("give one of steps: [...] or tokens: [...]")
        ((unit, v),) = d.items()
        at = at / unit
    points = [_int(x, at[i], minimum=1) for i, x in enumerate(_as_list(v, at))]
    if not points:
        at.fail("a budget needs at least one point")
    if len(set(points)) != len(points):
        at.fail(f"budget points repeat: {points}")
    return unit, tuple(sorted(points))


def _parse_rule(v: Any, at: _At, datasets: Sequence[str]) -> OverrideRule:
    d = _mapping(v, at, _KEYS["rule"])
    if "when" not in d:
        (at / "when").fail("required (a partial axis assignment, e.g. {model: gpt2-xl})")
    when = _parse_when(d["when"], at / "when", datasets)
    names = [n for n in _editor_names() if n != NONE]
    editors = {}
    for method, entry in _mapping(d.get("editors"), at / "editors").items():
        m = _choice(method, at / "editors", names)
        editors[m] = _parse_editor_entry(m, entry, at / "editors" / method, partial=True)
    return OverrideRule(when, editors, _preset_fields(d.get("finetune"), at / "finetune"))


def _parse_probes(v: Any, at: _At) -> ProbeSettings:
    from ..evaluate.probes import PROBE_MODES

    d = _mapping(v, at, _KEYS["probes"])
    p = ProbeSettings(
        every=_opt(d.get("every"), _int, at / "every", 1),
        every_epochs=_opt(d.get("every_epochs"), _float, at / "every_epochs"),
        mode=_choice(d.get("mode", "greedy"), at / "mode", PROBE_MODES),
        prob=_choice(d.get("prob", "mean"), at / "prob", ("mean", "joint")),
        token_categories=_bool(d.get("token_categories", True), at / "token_categories"),
        top_k=_int(d.get("top_k", 3), at / "top_k", 0),
    )
    if p.every is not None and p.every_epochs is not None:
        at.fail("give every (steps) or every_epochs, not both")
    if p.every_epochs is not None and p.every_epochs <= 0:
        (at / "every_epochs").fail(f"expected a positive fraction of an epoch, got {p.every_epochs}")
    return p


def _parse_downstream(v: Any, at: _At) -> DownstreamSettings | None:
    if v is None or v is False:
        return None
    from ..evaluate.downstream import MODES, DownstreamConfig, canonical_task
    from ..evaluate.downstream import TASKS as DS_TASKS

    d = _mapping(v, at, _KEYS["downstream"])
    if "tasks" not in d:
        (at / "tasks").fail(f"required: all, or a list of {', '.join(DS_TASKS)}")
    tasks_v = d["tasks"]
    if isinstance(tasks_v, str) and tasks_v.strip().lower() == "all":
        tasks = DS_TASKS
    else:
        names = []
        for i, t in enumerate(_as_list(tasks_v, at / "tasks")):
            a = (at / "tasks")[i] if isinstance(tasks_v, list) else at / "tasks"
            try:
                names.append(canonical_task(_str(t, a)))
            except SpecError:
                raise
            except EditdecayError:
                a.fail(f"{t!r} is not one of {', '.join(DS_TASKS)} (or an alias)")
        tasks = tuple(dict.fromkeys(names))
    stages_v = d.get("stages", ["final"])
    stages = tuple(dict.fromkeys(
        _choice(s, (at / "stages")[i] if isinstance(stages_v, list) else at / "stages", DOWNSTREAM_STAGES)
        for i, s in enumerate(_as_list(stages_v, at / "stages"))))
    opts = {k: d[k] for k in DOWNSTREAM_OPTIONS if k in d}
    opts = _coerce_fields(DownstreamConfig, opts, at)
    mode = _choice(d.get("mode", "gen"), at / "mode", MODES)
    limit = _opt(d.get("limit"), _int, at / "limit", 1)
    batch = _int(d.get("batch_size", 16), at / "batch_size", 1)
    _build(DownstreamConfig, {"mode": mode, "limit": limit, "batch_size": batch, **opts}, at)
    return DownstreamSettings(tasks, mode, limit, stages, _opt(d.get("data_dir"), _str, at / "data_dir"), batch, opts)


def _parse_drift(v: Any, at: _At) -> DriftSettings | None:
    if v is None or v is False:
        return None
    from ..evaluate.activations import POSITIONS

    d = {} if v is True else _mapping(v, at, _KEYS["drift"])
    return DriftSettings(
        prompts=_choice(d.get("prompts", "edit"), at / "prompts", DRIFT_PROMPTS),
        position=_choice(d.get("position", "last"), at / "position", POSITIONS),
        limit=_opt(d.get("limit"), _int, at / "limit", 1),
        batch_size=_int(d.get("batch_size", 16), at / "batch_size", 1),
    )


def _parse_reedit(v: Any, at: _At) -> dict[str, Any] | None:
    """``reedit: {editor: null, scratch: true}`` (``true`` for the defaults): after
    fine-tuning, re-apply the decayed edits (and time editing every fact from scratch)."""
    if v is None or v is False:
        return None
    d = {} if v is True else _mapping(v, at, _KEYS["reedit"])
    editor = d.get("editor")
    if editor is not None:
        editor = _choice(editor, at / "editor", [n for n in _editor_names() if n != NONE])
    return {"editor": editor, "scratch": _bool(d.get("scratch", True), at / "scratch")}


def _parse_resources(v: Any, at: _At) -> Resources:
    d = _mapping(v, at, _KEYS["resources"])
    return Resources(cpus=_float(d.get("cpus", 1), at / "cpus", 0), gpus=_float(d.get("gpus", 0), at / "gpus", 0),
                     memory_gb=_opt(d.get("memory_gb"), _float, at / "memory_gb", 0))


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
            from ..finetune.presets import finetune_presets

            self._ft = finetune_presets()
        return self._ft

    def editor(self, method: str, name: str) -> dict[str, Any]:
        if (method, name) not in self._editor:
            from ..editing.hparams import load_preset

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
    from ..finetune.presets import FinetunePreset

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


# --- cost -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Rough CPU seconds per unit of work, measured loosely on the embedded SmolLM2-135M
    (fp32, 2 CPU cores). They scale roughly with parameter count: multiply by ~50 for a
    7B model on a CPU, divide by ~20–100 on a GPU. Estimates, not promises."""

    edit_s: Mapping[str, float] = field(default_factory=lambda: {"rome": 8.0, "ft": 3.0, "memit": 5.1,
                                                                  "alphaedit": 4.9, "mend": 0.3, "malmen": 0.3})
    """Seconds per edited fact (target optimisation dominates; batched editors share it). MEMIT
    and AlphaEdit measured on 100 CounterFact facts in one batch (511 s and 494 s)."""
    edit_default_s: float = 8.0
    stats_pass_s: float = 60.0
    """One second-moment pass for a (model, editor, layers) set; cached across trials."""
    ft_step_s: Mapping[str, float] = field(default_factory=lambda: {"lora": 1.2, "dora": 1.8, "full": 1.6})
    """Seconds per optimiser step of a task of short padded examples (structured facts,
    classification, SFT, QA: the tokens per step depend on the data); fits the measured
    seed000/seed001 CPU specs."""
    ft_fixed_s: Mapping[str, float] = field(default_factory=lambda: {"lora": 0.40, "dora": 0.6, "full": 1.49})
    ft_token_s: Mapping[str, float] = field(default_factory=lambda: {"lora": 0.0084, "dora": 0.0126, "full": 0.0074})
    """Packed text (``unstructured``): a step costs ``ft_fixed_s + ft_token_s × batch ×
    block``. Measured by a bare loop here: LoRA 2.55 s at 4 × 64 tokens and 9.01 s at 8 × 128;
    full 3.38 s and 9.06 s (DoRA assumed 1.5 × LoRA)."""
    probe_fact_s: float = 0.03
    """Seconds to probe one fact at one stage (retention, ES/PS/NS, categories)."""
    budget_probe_fact_s: float = 0.076
    """Seconds per fact at one budget point (retention plus each edited fact's ES/PS/NS and
    margin): measured 22.8 s for 100 edited + 200 intrinsic facts (benchmarks/budget_probe.py)."""
    select_fact_s: float = 0.032
    """Seconds per candidate fact of the confidence filter (one greedy probe)."""
    select_candidates: int = 10_000
    """Candidates assumed per filtered selection (CounterFact's edit file; measured 320 s)."""
    downstream_item_s: Mapping[str, float] = field(default_factory=lambda: {"gen": 0.4, "ll": 0.08})
    downstream_default_items: int = 1000
    """Items per task assumed when ``limit`` is unset."""
    drift_prompt_s: float = 0.02
    epoch_examples: int = 1000
    """Training examples assumed when a schedule is in epochs and ``n_train`` is unset."""


def _ft_steps(params: Mapping[str, Any], cm: CostModel) -> tuple[int, int]:
    """(max steps, evaluations) of a fine-tuning config."""
    per_epoch = max(1, (params.get("n_train") or cm.epoch_examples) // max(1, params.get("batch_size") or 1))
    steps = params.get("max_steps") or (math.ceil(params["epochs"] * per_epoch) if params.get("epochs") else 100)
    every = params.get("eval_every") or (max(1, round(params["eval_every_epochs"] * per_epoch))
                                         if params.get("eval_every_epochs") else 20)
    return int(steps), int(steps) // int(every) + 1


def _step_s(ft: Mapping[str, Any], cm: CostModel) -> float:
    """Seconds per optimiser step of a fine-tuning config (packed text: from its tokens)."""
    m, p = ft["method"], ft["params"]
    if ft.get("task") == "unstructured":
        tokens = (p.get("batch_size") or 1) * (p.get("block_size") or 128)
        return cm.ft_fixed_s.get(m, max(cm.ft_fixed_s.values())) + tokens * cm.ft_token_s.get(m, max(cm.ft_token_s.values()))
    return cm.ft_step_s.get(m, max(cm.ft_step_s.values()))


def _budget_steps(ft: Mapping[str, Any], cm: CostModel) -> tuple[int, int] | None:
    """(steps, evaluations) of a fine-tuning budget axis (tokens: at the task's tokens per step)."""
    b = ft.get("budget")
    if not b:
        return None
    p = ft["params"]
    if b["unit"] == "steps":
        steps = max(b["at"])
    else:
        per_step = (p.get("batch_size") or 1) * (p.get("block_size") or p.get("cutoff") or 128)
        steps = math.ceil(max(b["at"]) / per_step)
    every = p.get("eval_every") or steps
    return steps, len(b["at"]) + 1 + (steps // every if every < steps else 0)


def estimate_cost(trials: Iterable[Trial], cost_model: CostModel | None = None) -> dict[str, Any]:
    """Counts and rough CPU seconds of running ``trials``.

    Counts: ``trials``, ``units``, ``edited_facts`` (facts edited, summed over trials),
    ``edit_calls`` (editor invocations: one per fact under single, per batch otherwise;
    trials that share an edit — same model, facts and editor settings — share its calls
    and seconds, as the runner reuses it),
    ``stats_passes`` (distinct second-moment passes, cached), ``finetune_runs`` (one per
    unit that fine-tunes: under single one per fact), ``finetune_steps`` (at most),
    ``downstream_evals`` (model × task evaluations) and ``downstream_items``,
    ``probe_evals`` (fact × stage probes, including the probes during fine-tuning),
    ``selection_probes`` (candidates of the confidence filter, once per model and data).
    ``cpu_seconds`` splits the estimate per unit class (select, edit, stats, finetune, probe,
    downstream, drift) with the assumptions of ``cost_model`` (:class:`CostModel`)."""
    cm = cost_model or CostModel()
    c = dict.fromkeys(("trials", "units", "edited_facts", "edit_calls", "finetune_runs", "finetune_steps",
                       "downstream_evals", "downstream_items", "probe_evals", "drift_runs",
                       "selection_probes"), 0)
    secs = dict.fromkeys(("select", "edit", "stats", "finetune", "probe", "downstream", "drift"), 0.0)
    selections: set[str] = set()
    stats: set[str] = set()
    edits: set[str] = set()
    by_kind = dict.fromkeys(KINDS, 0)
    for t in trials:
        cfg = t.config
        c["trials"] += 1
        by_kind[t.kind] += 1
        units = t.unit_count
        c["units"] += units
        edit, ft, ev = cfg["edit"], cfg["finetune"], cfg["evaluate"]
        sel = cfg["data"]["selection"]
        n_sets = len(cfg["data"].get("datasets", [None]))
        n_probe = t.n_edits + sel["n_intrinsic"] * n_sets  # facts probed per stage
        stages = 1 + (edit is not None) + (ft is not None)
        if edit is not None:
            n = edit["n_edits"]
            c["edited_facts"] += n
            ekey = canonical_json([cfg["model"], cfg["data"], edit])
            if ekey not in edits:  # the runner reuses an edit for every trial that shares it
                edits.add(ekey)
                c["edit_calls"] += n if edit["protocol"] == "single" else math.ceil(n / (edit["batch_size"] or n))
                secs["edit"] += n * cm.edit_s.get(edit["editor"], cm.edit_default_s)
            if edit["editor"] != "ft":
                stats.add(canonical_json([cfg["model"], edit["editor"], edit["preset"], edit["layers"]]))
            if edit["protocol"] == "single":  # each fact's model probes the fact and the intrinsic set
                n_probe = units * (1 + sel["n_intrinsic"] * n_sets)
        probes = n_probe * stages
        if sel.get("filter", True):  # filter outcomes are cached per model, dataset, margin and mode
            for src in cfg["data"].get("datasets", [cfg["data"]]):
                skey = canonical_json([cfg["model"], [src.get(k) for k in ("dataset", "path", "format")],
                                       sel.get("margin"), sel.get("mode")])
                if skey not in selections:
                    selections.add(skey)
                    c["selection_probes"] += cm.select_candidates
                    secs["select"] += cm.select_candidates * cm.select_fact_s
        secs["probe"] += probes * cm.probe_fact_s
        if ft is not None:
            budget = _budget_steps(ft, cm)
            steps, evals = budget or _ft_steps(ft["params"], cm)
            c["finetune_runs"] += units
            c["finetune_steps"] += units * steps
            secs["finetune"] += units * steps * _step_s(ft, cm)
            probes += n_probe * evals  # a budget point also scores each edited fact
            secs["probe"] += n_probe * evals * (cm.budget_probe_fact_s if budget else cm.probe_fact_s)
        c["probe_evals"] += probes
        ds = ev.get("downstream")
        if ds:
            evals = units * len(ds["stages"]) * len(ds["tasks"])
            items = evals * (ds["limit"] or cm.downstream_default_items)
            c["downstream_evals"] += evals
            c["downstream_items"] += items
            secs["downstream"] += items * cm.downstream_item_s.get(ds["mode"], max(cm.downstream_item_s.values()))
        if ev.get("drift"):
            c["drift_runs"] += units
            n_prompts = ev["drift"]["limit"] or (t.n_edits or sel["n_intrinsic"])
            secs["drift"] += units * 4 * n_prompts * cm.drift_prompt_s
    c["stats_passes"] = len(stats)
    secs["stats"] = len(stats) * cm.stats_pass_s
    secs = {k: round(v, 1) for k, v in secs.items()}
    return {**c, "by_kind": by_kind, "cpu_seconds": {**secs, "total": round(sum(secs.values()), 1)},
            "assumptions": "CPU seconds on the embedded SmolLM2-135M (fp32, 2 cores); fine-tuning at max_steps "
                           "(stop rules can end runs earlier); scale with model size; "
                           "see editdecay.study.spec.CostModel"}


def _hms(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_plan(spec: StudySpec, trials: Sequence[Trial], cost: Mapping[str, Any] | None = None) -> str:
    """A plain-text plan: one row per trial (key prefix, kind, axes, units, merged grid
    points), then the cost estimate (for ``editdecay plan``)."""
    cost = cost or estimate_cost(trials)
    cols = ("#", "key", "kind", "model", "dataset", "editor", "n", "protocol", "layers", "task", "ft", "policy",
            "seed", "units", "points")

    def cell(v: Any) -> str:
        return "-" if v is None else layers_label(v) if isinstance(v, list) else str(v)

    rows = []
    for i, t in enumerate(trials, 1):
        a = t.axes
        model = str(a["model"])
        model = model if len(model) <= 28 else "…" + model[-27:]
        rows.append((str(i), t.short, t.kind, model, cell(a["dataset"]), a["editor"], str(a["n_edits"]),
                     cell(a["protocol"]), cell(a["edit_layers"]), cell(a["task"]), a["ft_method"],
                     cell(a["layer_policy"]), str(a["seed"]), str(t.unit_count), str(len(t.points))))
    widths = [max(len(c), *(len(r[j]) for r in rows)) if rows else len(c) for j, c in enumerate(cols)]
    fmt = "  ".join(f"{{:{'>' if c in ('#', 'n', 'seed', 'units', 'points') else '<'}{w}}}"
                    for c, w in zip(cols, widths))
    excluded = spec.grid_size() - sum(len(t.points) for t in trials)
    merged = sum(len(t.points) for t in trials) - len(trials)
    lines = [(f"study {spec.name}: {len(trials)} trials from {spec.grid_size()} grid points "
              f"({excluded} excluded, {merged} merged into shared baselines)"),
             fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    k = cost["by_kind"]
    cs = cost["cpu_seconds"]
    lines += [
        "",
        f"kinds: {k['base']} base, {k['zero-edit']} zero-edit, {k['edit-only']} edit-only, {k['edit+ft']} edit+ft",
        (f"work: {cost['units']} units; {cost['edited_facts']} edited facts in {cost['edit_calls']} editor calls "
         f"({cost['stats_passes']} second-moment passes); {cost['finetune_runs']} fine-tuning runs "
         f"(<= {cost['finetune_steps']} steps); {cost['downstream_evals']} downstream evaluations "
         f"({cost['downstream_items']} items); {cost['probe_evals']} fact probes; {cost['drift_runs']} drift runs"),
        "estimated CPU time: " + ", ".join(f"{n} {_hms(cs[n])}" for n in ("select", "edit", "stats", "finetune", "probe",
                                                                            "downstream", "drift") if cs[n])
        + f"; total {_hms(cs['total'])} ({cost['assumptions']})",
        f"resources per unit: {spec.resources.cpus:g} CPU, {spec.resources.gpus:g} GPU"
        + (f", {spec.resources.memory_gb:g} GB" if spec.resources.memory_gb else ""),
        *precision_lines(trials),
    ]
    return "\n".join(lines)


def precision_lines(trials: Sequence[Trial]) -> list[str]:
    """The expected 95% interval of each rate the trials report, from its n (worst case
    p = 0.5), and the n that ±0.10 needs."""
    from ..evaluate.significance import interval_halfwidth, n_for_halfwidth

    ns: dict[str, set[int]] = {"edited (ES, PS, NS, retention, EFR)": set(), "intrinsic retention": set()}
    for t in trials:
        sel = t.config["data"]["selection"]
        if t.n_edits:
            ns["edited (ES, PS, NS, retention, EFR)"].add(t.n_edits)
        if sel.get("n_intrinsic"):
            ns["intrinsic retention"].add(int(sel["n_intrinsic"]))
    out = []
    for rate, values in ns.items():
        for n in sorted(values):
            w = interval_halfwidth(n)
            flag = "" if w <= 0.10 else f"  (wider than ±0.10: n >= {n_for_halfwidth(0.10)} gives ±0.10)"
            out.append(f"  {rate}: n={n} per trial -> 95% interval about ±{w:.3f}{flag}")
    return ["precision (95% interval half-width of a rate, worst case p=0.5):", *out] if out else []


__all__ = [
    "AXES", "CONFIG_VERSION", "KINDS", "TASKS", "CostModel", "DatasetSource", "DownstreamSettings", "DriftSettings",
    "EditorSettings", "FinetuneSettings", "OverrideRule", "ProbeSettings", "Resources", "SelectionSettings",
    "SpecError", "StudySpec", "Trial", "Unit", "canonical_json", "config_hash", "estimate_cost", "expand",
    "format_plan", "layers_label", "precision_lines", "stage_seed",
]
