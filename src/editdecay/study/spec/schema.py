"""The schema of the study YAML: one dataclass per settings block, each parsing (and
validating) its block with ``parse``. A block's keys are its fields (:func:`yaml_keys`),
its defaults the fields' defaults, and each field's ``help`` metadata documents its key
(rendered into ``docs/study-store.md`` by :mod:`editdecay.study.spec.docs`)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ...errors import EditdecayError
from .validate import (
    SpecError,
    _as_list,
    _At,
    _bool,
    _build,
    _choice,
    _coerce_fields,
    _float,
    _int,
    _list_of,
    _mapping,
    _opt,
    _str,
    field_defaults,
    yaml_keys,
)

if TYPE_CHECKING:
    from .expand import Trial

from ...finetune.tasks import TASKS  # noqa: E402 - the task registry's live view (one source of truth)
NONE = "none"
BUILTIN_DATASET = "builtin"
POLICY_FORMS = "all, threshold:t, window:c,w, edited, non-edited"
DOWNSTREAM_STAGES = ("final", "base", "edited", "finetuned")
#: Evaluator options of a ``downstream:`` block (``DownstreamConfig`` fields; part of the keys when given).
DOWNSTREAM_OPTIONS = ("num_beams", "max_new_tokens", "prompt_style", "response_prefix", "ll_norm", "ll_target",
                      "ll_context")
DRIFT_PROMPTS = ("edit", "intrinsic", "both")


def _help(text: str, **meta: Any) -> dict[str, Any]:
    """Field metadata: the key's help text (and e.g. ``keys``, ``doc_default``)."""
    return {"help": text, **meta}


# --- axis values ----------------------------------------------------------------------------
def _editor_names() -> tuple[str, ...]:
    from ...editing import EDITORS

    return (NONE, *sorted(EDITORS))


def _ft_methods() -> tuple[str, ...]:
    from ...finetune.methods import METHODS

    return (*METHODS, NONE)


def _editor_hparams_cls(method: str) -> type:
    from ...editing import EDITOR_REGISTRY

    return EDITOR_REGISTRY[method].hparams


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
        from ...finetune.preserve import PRESERVE_METHODS

        return _choice(v, at, PRESERVE_METHODS)
    raise AssertionError(axis)


def _json_value(axis: str, v: Any) -> Any:
    return (list(v) if v is not None else "default") if axis == "edit_layers" else v


# --- settings -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axes:
    """The ``axes:`` block: the axes in grid order (the product varies the last axis
    fastest), each a value or a list of values, with the default used when it is absent.
    :meth:`parse` gives the spec's ``axes`` (axis → tuple of canonical values)."""

    model: str | None = field(default=None, metadata=_help(
        "`load_model` names or paths", doc_default="the embedded model"))
    dataset: str = field(default=BUILTIN_DATASET, metadata=_help(
        "`builtin`, or names declared under `datasets:`"))
    editor: str = field(default=NONE, metadata=_help(
        "none | ft | rome | memit | alphaedit | mend | malmen; `none` is the zero-edit baseline"))
    edit_layers: str = field(default="default", metadata=_help(
        'default (the preset\'s) | a block `5` | a range `"3-7"` | a list `"1,3"` or `[[3, 4, 5]]`'))
    n_edits: int = field(default=0, metadata=_help(
        "integers >= 0 (required when an editor other than none is on the grid); 0 is the zero-edit baseline"))
    protocol: str = field(default="batch", metadata=_help("single | batch | sequential:B"))
    task: str = field(default="unstructured", metadata=_help(
        "fine-tuning task: " + " | ".join(TASKS)))
    ft_method: str = field(default=NONE, metadata=_help(
        "full | lora | dora | none; `none` is the no-fine-tune baseline"))
    layer_policy: str = field(default="all", metadata=_help(
        "blocks fine-tuned: all | threshold:t | window:c,w | edited | non-edited"))
    seed: int = field(default=0, metadata=_help("replicate seed(s); per-stage seeds derive from it (`stage_seed`)"))
    preserve: str = field(default=NONE, metadata=_help(
        "edit preservation during fine-tuning (`editdecay.finetune.preserve` methods; settings under "
        "`finetune.preserve`)"))

    @classmethod
    def parse(cls, v: Any, at: _At, datasets: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """Axis → tuple of distinct canonical values (defaults for absent axes)."""
        from ...models.embedded import DEFAULT_MODEL

        raw = _mapping(v, at, AXES)
        defaults = {**field_defaults(cls), "model": DEFAULT_MODEL}
        axes: dict[str, tuple[Any, ...]] = {}
        for axis in AXES:
            vals = _as_list(raw.get(axis, defaults[axis]), at / axis) if axis in raw else [defaults[axis]]
            canon = [_axis_value(axis, x, (at / axis)[i] if isinstance(raw.get(axis), list) else at / axis, datasets)
                     for i, x in enumerate(vals)]
            axes[axis] = tuple(dict.fromkeys(canon))
        if "n_edits" not in raw and any(e != NONE for e in axes["editor"]):
            (at / "n_edits").fail("required when an editor other than none is on the grid")
        return axes

    @staticmethod
    def parse_when(v: Any, at: _At, datasets: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """A partial axis assignment (``exclude`` entries, ``overrides[].when``)."""
        rule = _mapping(v, at, AXES)
        if not rule:
            at.fail(f"an empty rule would match every grid point; name some of: {', '.join(AXES)}")
        out = {}
        for axis, vals in rule.items():
            lst = _as_list(vals, at / axis)
            out[axis] = tuple(_axis_value(axis, x, (at / axis)[i] if isinstance(vals, list) else at / axis, datasets)
                              for i, x in enumerate(lst))
        return out


#: Axes in grid order (the product varies the last axis fastest).
AXES = yaml_keys(Axes)


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset axis value comes from (paths as written, relative to the spec)."""

    name: str = field(metadata=_help("the dataset axis value (the entry's key under `datasets:`)", keys=()))
    path: str | None = field(default=None, metadata=_help(
        "file or folder, relative to the spec file (required unless the format is builtin)"))
    format: str = field(default="auto", metadata=_help("`editdecay.facts.datasets` format; auto detects it"))
    zsre_preset: str = field(default="memit", metadata=_help("zsRE variant (format zsre)"))

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.name, "path": self.path, "format": self.format, "zsre_preset": self.zsre_preset}

    @classmethod
    def parse(cls, name: str, v: Any, at: _At) -> DatasetSource:
        """One ``datasets:`` entry (``at`` names it)."""
        from ...facts.datasets import FORMATS, ZSRE_PRESETS

        df = field_defaults(cls)
        e = _mapping(v, at, yaml_keys(cls))
        fmt = _choice(e.get("format", df["format"]), at / "format", FORMATS)
        path = _opt(e.get("path"), _str, at / "path")
        if path is None and fmt != "builtin":
            (at / "path").fail(f"required for format {fmt} (only format builtin needs no path)")
        return cls(name, path, fmt, _choice(e.get("zsre_preset", df["zsre_preset"]), at / "zsre_preset", ZSRE_PRESETS))

    @classmethod
    def parse_all(cls, v: Any, at: _At) -> dict[str, DatasetSource]:
        """The ``datasets:`` block: name → source."""
        return {name: cls.parse(name, entry, at / name) for name, entry in _mapping(v, at).items()}


@dataclass(frozen=True)
class SelectionSettings:
    """Edit/intrinsic selection (:func:`editdecay.facts.selection.select_facts`). A trial
    with ``n_edits`` n edits the first n facts of the edit set. ``n_edit`` None: the
    largest n_edits on the grid. ``filter`` false skips the confidence filter (seed 001)."""

    n_edit: int | None = field(default=None, metadata=_help(
        "size of the edit set (null: the largest n_edits on the grid); a trial edits its first n_edits facts"))
    n_intrinsic: int = field(default=100, metadata=_help("size of the intrinsic (unedited) set"))
    margin: float = field(default=0.1, metadata=_help("confidence margin of the filter"))
    mode: str = field(default="greedy", metadata=_help("probe of the filter: greedy | masked_argmax"))
    seed: int = field(default=0, metadata=_help("seed of the selection"))
    filter: bool = field(default=True, metadata=_help("false: no confidence filter (seed 001)"))

    @classmethod
    def parse(cls, v: Any, at: _At, axes: Mapping[str, tuple[Any, ...]]) -> SelectionSettings:
        """The ``selection:`` block (``n_edit`` checked against the grid's ``axes``)."""
        from ...evaluate.probes import PROBE_MODES

        df = field_defaults(cls)
        d = _mapping(v, at, yaml_keys(cls))
        s = cls(
            n_edit=_opt(d.get("n_edit"), _int, at / "n_edit", 0),
            n_intrinsic=_int(d.get("n_intrinsic", df["n_intrinsic"]), at / "n_intrinsic", 0),
            margin=_float(d.get("margin", df["margin"]), at / "margin"),
            mode=_choice(d.get("mode", df["mode"]), at / "mode", PROBE_MODES),
            seed=_int(d.get("seed", df["seed"]), at / "seed", 0),
            filter=_bool(d.get("filter", df["filter"]), at / "filter"),
        )
        largest = max(axes["n_edits"])
        if s.n_edit is not None and s.n_edit < largest:
            (at / "n_edit").fail(f"{s.n_edit} is smaller than the largest n_edits on the grid ({largest})")
        return s


@dataclass(frozen=True)
class EditorSettings:
    """Preset (None: derived from the model) and hyperparameter overrides of one editor."""

    preset: str | None = field(default=None, metadata=_help(
        "an editor preset, e.g. `llama3.1-8b@seed001` (null: derived from the model)"))
    hparams: Mapping[str, Any] = field(default_factory=dict, metadata=_help(
        "hyperparameter overrides (fields of the editor's hparams class)"))

    @classmethod
    def parse_entry(cls, method: str, v: Any, at: _At, partial: bool = False) -> dict[str, Any]:
        """``{"preset": ..., "hparams": {...}}`` of one editor entry; ``partial`` (an
        override rule's entry) leaves ``preset`` out when the entry does not give it."""
        from ...editing.hparams import presets

        d = _mapping(v, at, yaml_keys(cls))
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

    @classmethod
    def parse(cls, method: str, v: Any, at: _At) -> EditorSettings:
        """One ``editors:`` entry of editor ``method``."""
        e = cls.parse_entry(method, v, at)
        return cls(e["preset"], e["hparams"])

    @classmethod
    def parse_all(cls, v: Any, at: _At) -> dict[str, EditorSettings]:
        """The ``editors:`` block: editor → settings."""
        names = [n for n in _editor_names() if n != NONE]
        out = {}
        for method, entry in _mapping(v, at).items():
            m = _choice(method, at, names)
            out[m] = cls.parse(m, entry, at / method)
        return out


def _preset_fields(values: Any, at: _At, allow_preset: bool = True) -> dict[str, Any]:
    from ...finetune.presets import FinetunePreset

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
    from ...finetune.trainer import StopRule

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


def _parse_preserve(v: Any, at: _At) -> dict[str, Any]:
    from ...finetune.preserve import PreserveConfig

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

    preset: str = field(default="cpu-{task}", metadata=_help(
        "a fine-tuning preset name; `{task}` and `{method}` are filled in (e.g. `seed001-{task}-{method}`)"))
    overrides: Mapping[str, Any] = field(default_factory=dict, metadata=_help(
        "`FinetunePreset` fields, for every trial (e.g. `{epochs: 2}`)"))
    stop: tuple[str, ...] | None = field(default=None, metadata=_help(
        'stop rules (loss<τ, loss<base-Δ, acc>τ; OR-combined with max_steps), replacing the preset\'s; '
        'e.g. `["loss<base-0.3", "acc>0.9"]`'))
    per_task: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, metadata=_help(
        "task → preset fields (and `preset`) for that task's trials"))
    per_method: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, metadata=_help(
        "fine-tuning method → preset fields (and `preset`) for that method's trials"))
    layers_from: str | None = field(default=None, metadata=_help(
        "the editor whose blocks `edited`/`non-edited` mean on the zero-edit baseline"))
    data: Mapping[str, str | None] = field(default_factory=dict, metadata=_help(
        "task → training data path (null: the task's default)"))
    hygiene: bool = field(default=False, metadata=_help(
        "true: drop training documents mentioning the unit's edited facts (seed 000 §4.1: per fact under "
        "protocol single; counts in the unit's info)"))
    budget: tuple[str, tuple[int, ...]] | None = field(default=None, metadata=_help(
        "a budget axis probed in one run per trial: `[steps, ...]` or `{tokens: [...]}`; training ends at the "
        "largest point and the stop rules are off"))
    """(unit, points): "steps" or "tokens", ascending."""
    preserve: Mapping[str, Any] = field(default_factory=dict, metadata=_help(
        "settings of the `preserve` axis's methods (`PreserveConfig` fields: mu, rho, replay_batch)"))
    """Settings of the ``preserve`` axis's methods (PreserveConfig fields: mu, rho, replay_batch)."""

    @classmethod
    def parse(cls, v: Any, at: _At) -> FinetuneSettings:
        """The ``finetune:`` block."""
        df = field_defaults(cls)
        d = _mapping(v, at, yaml_keys(cls))
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
        return cls(
            preset=_str(d.get("preset", df["preset"]), at / "preset"),
            overrides=_preset_fields(d.get("overrides"), at / "overrides", allow_preset=False),
            stop=tuple(_stop_rules(d["stop"], at / "stop")) if d.get("stop") is not None else None,
            per_task=per_task,
            per_method=per_method,
            layers_from=lf,
            data=data,
            hygiene=_bool(d.get("hygiene", df["hygiene"]), at / "hygiene"),
            budget=_parse_budget(d.get("budget"), at / "budget"),
            preserve=_parse_preserve(d.get("preserve"), at / "preserve"),
        )


@dataclass(frozen=True)
class OverrideRule:
    """Settings applied to the grid points that match ``when`` (a partial axis
    assignment): editor presets/hparams and fine-tuning fields (later rules win)."""

    when: Mapping[str, tuple[Any, ...]] = field(metadata=_help(
        "a partial axis assignment, a value or a list of values per axis (e.g. `{model: gpt2-xl}`)"))
    editors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, metadata=_help(
        "editor → `preset` and/or `hparams`, as under `editors:`"))
    finetune: Mapping[str, Any] = field(default_factory=dict, metadata=_help(
        "preset fields (and `preset`), as under `finetune.per_task`"))

    @classmethod
    def parse(cls, v: Any, at: _At, datasets: Sequence[str]) -> OverrideRule:
        """One ``overrides:`` entry (``datasets``: the declared dataset names)."""
        d = _mapping(v, at, yaml_keys(cls))
        if "when" not in d:
            (at / "when").fail("required (a partial axis assignment, e.g. {model: gpt2-xl})")
        when = Axes.parse_when(d["when"], at / "when", datasets)
        names = [n for n in _editor_names() if n != NONE]
        editors = {}
        for method, entry in _mapping(d.get("editors"), at / "editors").items():
            m = _choice(method, at / "editors", names)
            editors[m] = EditorSettings.parse_entry(m, entry, at / "editors" / method, partial=True)
        return cls(when, editors, _preset_fields(d.get("finetune"), at / "finetune"))


@dataclass(frozen=True)
class ProbeSettings:
    """Fact probes: schedule during fine-tuning (``every`` N steps or ``every_epochs``;
    None: the preset's evaluation schedule), retention mode, CounterFact probability,
    token categories and top-k tokens."""

    every: int | None = field(default=None, metadata=_help(
        "probe every N fine-tuning steps (null, and no every_epochs: the preset's schedule)"))
    every_epochs: float | None = field(default=None, metadata=_help(
        "probe every this fraction of an epoch (instead of every)"))
    mode: str = field(default="greedy", metadata=_help("retention probe: greedy | masked_argmax"))
    prob: str = field(default="mean", metadata=_help("CounterFact P(x|p): mean | joint"))
    token_categories: bool = field(default=True, metadata=_help(
        "record the probability mass of the token categories (edited, true, related, other)"))
    top_k: int = field(default=3, metadata=_help("top-k next tokens recorded per probe"))

    @classmethod
    def parse(cls, v: Any, at: _At) -> ProbeSettings:
        """The ``probes:`` block."""
        from ...evaluate.probes import PROBE_MODES

        df = field_defaults(cls)
        d = _mapping(v, at, yaml_keys(cls))
        p = cls(
            every=_opt(d.get("every"), _int, at / "every", 1),
            every_epochs=_opt(d.get("every_epochs"), _float, at / "every_epochs"),
            mode=_choice(d.get("mode", df["mode"]), at / "mode", PROBE_MODES),
            prob=_choice(d.get("prob", df["prob"]), at / "prob", ("mean", "joint")),
            token_categories=_bool(d.get("token_categories", df["token_categories"]), at / "token_categories"),
            top_k=_int(d.get("top_k", df["top_k"]), at / "top_k", 0),
        )
        if p.every is not None and p.every_epochs is not None:
            at.fail("give every (steps) or every_epochs, not both")
        if p.every_epochs is not None and p.every_epochs <= 0:
            (at / "every_epochs").fail(f"expected a positive fraction of an epoch, got {p.every_epochs}")
        return p


@dataclass(frozen=True)
class DownstreamSettings:
    """Downstream accuracy (:func:`editdecay.evaluate.downstream.evaluate_downstream`).
    ``stages``: ``final`` (the trial's last model) and/or base, edited, finetuned."""

    tasks: tuple[str, ...] = field(metadata=_help(
        "`all`, or a list of task names or aliases (boolq, arc-e, obqa, ...)"))
    mode: str = field(default="gen", metadata=_help(
        "gen (generate, then parse the answer) | ll (log-likelihood of each option)"))
    limit: int | None = field(default=None, metadata=_help("first N items per task (null: all)"))
    stages: tuple[str, ...] = field(default=("final",), metadata=_help(
        "final (the trial's last model) | base | edited | finetuned"))
    data_dir: str | None = field(default=None, metadata=_help("folder of the task data"))
    batch_size: int = field(default=16, metadata=_help("runtime only (not part of trial keys)"))
    options: Mapping[str, Any] = field(default_factory=dict, metadata=_help(
        "`DownstreamConfig` options (part of the keys when given); ll_context: prompt | cloze (the bare "
        "question, for small models)", keys=DOWNSTREAM_OPTIONS, doc_default="the evaluator's"))
    """Other :class:`~editdecay.evaluate.downstream.DownstreamConfig` fields."""

    @classmethod
    def parse(cls, v: Any, at: _At) -> DownstreamSettings | None:
        """The ``downstream:`` block (None when absent or false)."""
        if v is None or v is False:
            return None
        from ...evaluate.downstream import MODES, DownstreamConfig, canonical_task
        from ...evaluate.downstream import TASKS as DS_TASKS

        df = field_defaults(cls)
        d = _mapping(v, at, yaml_keys(cls))
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
        stages_v = d.get("stages", list(df["stages"]))
        stages = tuple(dict.fromkeys(
            _choice(s, (at / "stages")[i] if isinstance(stages_v, list) else at / "stages", DOWNSTREAM_STAGES)
            for i, s in enumerate(_as_list(stages_v, at / "stages"))))
        opts = {k: d[k] for k in DOWNSTREAM_OPTIONS if k in d}
        opts = _coerce_fields(DownstreamConfig, opts, at)
        mode = _choice(d.get("mode", df["mode"]), at / "mode", MODES)
        limit = _opt(d.get("limit"), _int, at / "limit", 1)
        batch = _int(d.get("batch_size", df["batch_size"]), at / "batch_size", 1)
        _build(DownstreamConfig, {"mode": mode, "limit": limit, "batch_size": batch, **opts}, at)
        return cls(tasks, mode, limit, stages, _opt(d.get("data_dir"), _str, at / "data_dir"), batch, opts)


@dataclass(frozen=True)
class DriftSettings:
    """Activation drift on the edit and/or intrinsic prompts."""

    prompts: str = field(default="edit", metadata=_help("edit | intrinsic | both"))
    position: str = field(default="last", metadata=_help("token position: last | subject_last"))
    limit: int | None = field(default=None, metadata=_help("first N prompts (null: all)"))
    batch_size: int = field(default=16, metadata=_help("runtime only (not part of trial keys)"))

    @classmethod
    def parse(cls, v: Any, at: _At) -> DriftSettings | None:
        """The ``drift:`` block (None when absent or false; ``true``: the defaults)."""
        if v is None or v is False:
            return None
        from ...evaluate.activations import POSITIONS

        df = field_defaults(cls)
        d = {} if v is True else _mapping(v, at, yaml_keys(cls))
        return cls(
            prompts=_choice(d.get("prompts", df["prompts"]), at / "prompts", DRIFT_PROMPTS),
            position=_choice(d.get("position", df["position"]), at / "position", POSITIONS),
            limit=_opt(d.get("limit"), _int, at / "limit", 1),
            batch_size=_int(d.get("batch_size", df["batch_size"]), at / "batch_size", 1),
        )


@dataclass(frozen=True)
class ReeditSettings:
    """Re-edit stage after fine-tuning: re-apply the decayed edits (and time editing
    every fact from scratch)."""

    editor: str | None = field(default=None, metadata=_help("the re-editing editor (null: the trial's)"))
    scratch: bool = field(default=True, metadata=_help("also time editing every fact from scratch"))

    def to_dict(self) -> dict[str, Any]:
        return {"editor": self.editor, "scratch": self.scratch}

    @classmethod
    def parse(cls, v: Any, at: _At) -> ReeditSettings | None:
        """``reedit: {editor: null, scratch: true}`` (``true`` for the defaults; None when
        absent or false)."""
        if v is None or v is False:
            return None
        df = field_defaults(cls)
        d = {} if v is True else _mapping(v, at, yaml_keys(cls))
        editor = d.get("editor")
        if editor is not None:
            editor = _choice(editor, at / "editor", [n for n in _editor_names() if n != NONE])
        return cls(editor, _bool(d.get("scratch", df["scratch"]), at / "scratch"))


@dataclass(frozen=True)
class Resources:
    """Resources requested per unit (Ray task options)."""

    cpus: float = field(default=1.0, metadata=_help("CPUs per unit"))
    gpus: float = field(default=0.0, metadata=_help("GPUs per unit (fractions share a GPU)"))
    memory_gb: float | None = field(default=None, metadata=_help("memory per unit in GB (null: no request)"))

    @classmethod
    def parse(cls, v: Any, at: _At) -> Resources:
        """The ``resources:`` block."""
        df = field_defaults(cls)
        d = _mapping(v, at, yaml_keys(cls))
        return cls(cpus=_float(d.get("cpus", df["cpus"]), at / "cpus", 0),
                   gpus=_float(d.get("gpus", df["gpus"]), at / "gpus", 0),
                   memory_gb=_opt(d.get("memory_gb"), _float, at / "memory_gb", 0))


# --- the spec -------------------------------------------------------------------------------
@dataclass
class StudySpec:
    """A validated study spec (see the package docstring and ``docs/study-store.md``)."""

    name: str = field(metadata=_help("the study's name", doc_default="the file name without .yaml"))
    description: str = field(default="", kw_only=True, metadata=_help("free text"))
    axes: dict[str, tuple[Any, ...]] = field(metadata=_help(
        "the grid's axes (`axes:` below)", doc_default="each axis's default"))
    exclude: tuple[dict[str, tuple[Any, ...]], ...] = field(default=(), metadata=_help(
        "partial axis assignments (a value or a list of values each, as written on the axes); the grid points "
        "they match are dropped"))
    datasets: dict[str, DatasetSource] = field(default_factory=dict, metadata=_help(
        "name → source of dataset axis values (`datasets.NAME` below; builtin needs none)"))
    selection: SelectionSettings = field(default_factory=SelectionSettings, metadata=_help(
        "fact selection (`selection:` below)"))
    editors: dict[str, EditorSettings] = field(default_factory=dict, metadata=_help(
        "editor → preset and hparams (`editors.EDITOR` below)"))
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings, metadata=_help(
        "fine-tuning presets and overrides (`finetune:` below)"))
    overrides: tuple[OverrideRule, ...] = field(default=(), metadata=_help(
        "rules for the grid points matching `when` (`overrides[]` below; later rules win)"))
    probes: ProbeSettings = field(default_factory=ProbeSettings, metadata=_help(
        "fact probes during fine-tuning (`probes:` below)"))
    downstream: DownstreamSettings | None = field(default=None, metadata=_help(
        "downstream accuracy (`downstream:` below; absent: none)"))
    drift: DriftSettings | None = field(default=None, metadata=_help(
        "activation drift (`drift:` below; `true`: the defaults; absent: none)"))
    resources: Resources = field(default_factory=Resources, metadata=_help(
        "per unit (Ray task options; `resources:` below); not part of trial keys"))
    reedit: Mapping[str, Any] | None = field(default=None, metadata=_help(
        "re-edit stage after fine-tuning (`reedit:` below; `true`: the defaults; absent: none)"))
    """Re-edit stage after fine-tuning: ``{"editor": name | None (the trial's), "scratch": bool}``."""
    source: str = field(default="spec", metadata=_help("label used in error messages (the file path)", keys=()))
    """Label used in error messages (the file path)."""
    base_dir: Path | None = field(default=None, metadata=_help(
        "directory that relative paths are resolved against (the spec file's)", keys=()))
    """Directory that relative paths are resolved against (the spec file's)."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, metadata=_help(
        "the spec mapping as given (JSON-normalised)", keys=()))

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
        from .expand import expand

        at = _At(where)
        d = _mapping(d, at, yaml_keys(cls))
        name = _str(d["name"], at / "name") if d.get("name") is not None else default_name
        description = str(d.get("description") or "")
        datasets = DatasetSource.parse_all(d.get("datasets"), at / "datasets")
        ds_names = (BUILTIN_DATASET, *sorted(k for k in datasets if k != BUILTIN_DATASET))
        axes = Axes.parse(d.get("axes"), at / "axes", ds_names)
        datasets = {n: datasets.get(n, DatasetSource(n, None, "builtin")) for n in axes["dataset"]}
        # parsed in this order so that the first error reported stays the same
        exclude = tuple(Axes.parse_when(r, (at / "exclude")[i], ds_names)
                        for i, r in enumerate(_list_of(d.get("exclude"), at / "exclude")))
        selection = SelectionSettings.parse(d.get("selection"), at / "selection", axes)
        editors = EditorSettings.parse_all(d.get("editors"), at / "editors")
        finetune = FinetuneSettings.parse(d.get("finetune"), at / "finetune")
        overrides = tuple(OverrideRule.parse(r, (at / "overrides")[i], ds_names)
                          for i, r in enumerate(_list_of(d.get("overrides"), at / "overrides")))
        probes = ProbeSettings.parse(d.get("probes"), at / "probes")
        downstream = DownstreamSettings.parse(d.get("downstream"), at / "downstream")
        drift = DriftSettings.parse(d.get("drift"), at / "drift")
        reedit = ReeditSettings.parse(d.get("reedit"), at / "reedit")
        resources = Resources.parse(d.get("resources"), at / "resources")
        spec = cls(
            name=name,
            axes=axes,
            exclude=exclude,
            datasets=datasets,
            selection=selection,
            editors=editors,
            finetune=finetune,
            overrides=overrides,
            probes=probes,
            downstream=downstream,
            drift=drift,
            reedit=None if reedit is None else reedit.to_dict(),
            resources=resources,
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
        from .expand import config_hash

        return config_hash(self.raw)

    def expand(self) -> list[Trial]:
        """:func:`expand` of this spec."""
        from .expand import expand

        return expand(self)

    def resolve_path(self, p: str | Path) -> Path:
        """A path from the spec, resolved against the spec file's folder."""
        q = Path(p).expanduser()
        return q if q.is_absolute() or self.base_dir is None else self.base_dir / q

    def grid_size(self) -> int:
        """Grid points before exclusion and merging."""
        return math.prod(len(v) for v in self.axes.values())


#: The settings blocks of a spec in document order: (YAML path, "" for the top level; dataclass).
BLOCKS: tuple[tuple[str, type], ...] = (
    ("", StudySpec), ("axes", Axes), ("datasets.NAME", DatasetSource), ("selection", SelectionSettings),
    ("editors.EDITOR", EditorSettings), ("finetune", FinetuneSettings), ("overrides[]", OverrideRule),
    ("probes", ProbeSettings), ("downstream", DownstreamSettings), ("drift", DriftSettings),
    ("reedit", ReeditSettings), ("resources", Resources),
)

