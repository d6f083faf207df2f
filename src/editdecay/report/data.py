"""A study database read into tidy per-trial summaries with bootstrap intervals.

:class:`StudyData` wraps a :class:`~editdecay.study.Store` (read only) and answers the
questions the report's sections ask: a trial's per-fact outcomes at a stage (averaged
per fact over units, so protocol ``single`` — one unit per edited fact, the intrinsic
set probed on every per-fact model — and ``batch`` read alike), rates with their
95% bootstrap interval and n, paired statistics (ΔES, decrease rate) with paired
bootstrap intervals, downstream accuracies pooled over units, drift per block, curves
per probe step. Every interval is an :class:`~editdecay.evaluate.significance.Interval`
(estimate, low, high, n, n_undefined); undefined values are skipped and counted.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EditdecayError
from ..evaluate.significance import Interval, bootstrap_ci
from ..study.spec import AXES, NONE
from ..study.store import Store

NAN_INTERVAL = Interval(math.nan, math.nan, math.nan, 0)


class ReportError(EditdecayError):
    """The database cannot be reported on (missing file, unknown study)."""


# --- trials ----------------------------------------------------------------------------------
@dataclass
class TrialInfo:
    """One trial of the database with its parsed config, axes and units."""

    key: str
    kind: str
    status: str
    config: dict[str, Any]
    axes: dict[str, Any]
    n_units: int | None
    units: list[dict[str, Any]]
    """``unit_id``, ``status``, ``error`` and parsed ``info`` of each registered unit."""
    error: str | None = None
    studies: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def short(self) -> str:
        return self.key[:8]

    @property
    def model(self) -> str:
        return str(self.config.get("model") or self.axes.get("model") or "")

    @property
    def model_short(self) -> str:
        return Path(self.model.rstrip("/")).name or self.model

    @property
    def has_edit(self) -> bool:
        return self.config.get("edit") is not None

    @property
    def has_ft(self) -> bool:
        return self.config.get("finetune") is not None

    @property
    def editor(self) -> str:
        return str((self.config.get("edit") or {}).get("editor") or NONE)

    @property
    def n_edits(self) -> int:
        return int((self.config.get("edit") or {}).get("n_edits") or 0)

    @property
    def protocol(self) -> str | None:
        e = self.config.get("edit")
        if not e:
            return None
        return e["protocol"] + (f":{e['batch_size']}" if e.get("batch_size") else "")

    @property
    def dataset(self) -> str | None:
        return (self.config.get("data") or {}).get("dataset") if self.has_edit else None

    @property
    def datasets(self) -> list[str]:
        """Datasets whose facts the trial probes (zero-edit trials probe every dataset's intrinsic set)."""
        data = self.config.get("data") or {}
        if "datasets" in data:
            return [d["dataset"] for d in data["datasets"]]
        return [data["dataset"]] if data.get("dataset") else []

    @property
    def dataset_format(self) -> str:
        data = self.config.get("data") or {}
        return str(data.get("format") or "")

    @property
    def task(self) -> str | None:
        return (self.config.get("finetune") or {}).get("task")

    @property
    def ft_method(self) -> str:
        return str((self.config.get("finetune") or {}).get("method") or NONE)

    @property
    def policy(self) -> str | None:
        return (self.config.get("finetune") or {}).get("policy")

    @property
    def preserve(self) -> str:
        """The edit-preserving method of the fine-tuning (``none``: plain)."""
        return str(((self.config.get("finetune") or {}).get("preserve") or {}).get("method") or NONE)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed") or 0)

    @property
    def edit_layers(self) -> str:
        """The edit_layers axis as written (``default``, ``3-7``, ``1,3``)."""
        v = self.axes.get("edit_layers")
        if v is None or v == "default":
            return "default"
        ls = [int(x) for x in v]
        if len(ls) > 1 and ls == list(range(ls[0], ls[-1] + 1)):
            return f"{ls[0]}-{ls[-1]}"
        return ",".join(map(str, ls))

    @property
    def edited_layers(self) -> list[int]:
        """Blocks the edit touched (from the units' info), else the configured layers,
        else (zero-edit with ``layers_from``) the named editor's layers."""
        got: set[int] = set()
        for u in self.units:
            got |= {int(b) for b in (u["info"] or {}).get("edited_layers") or []}
        if got:
            return sorted(got)
        e = self.config.get("edit") or {}
        if e.get("layers"):
            return sorted(int(b) for b in e["layers"])
        lf = (self.config.get("finetune") or {}).get("layers_from") or {}
        return sorted(int(b) for b in lf.get("layers") or [])

    @property
    def final_stage(self) -> str:
        return "finetuned" if self.has_ft else "edited" if self.has_edit else "base"

    @property
    def dropped(self) -> int:
        """Edited facts whose edit did not verify (kept and counted by the runner)."""
        return sum(len((u["info"] or {}).get("dropped") or []) for u in self.units)

    @property
    def done_units(self) -> int:
        return sum(u["status"] == "done" for u in self.units)

    def edit_key(self) -> tuple:
        """What determines the edited model (grouping across fine-tuning settings)."""
        return (self.model, self.dataset, self.editor, self.edit_layers, self.n_edits, self.protocol, self.seed)

    def ft_key(self) -> tuple:
        return (self.task, self.ft_method, self.policy)


def _norm(s: Any) -> str:
    """Lower-case alphanumerics only (``Meta-Llama-3-8B`` → ``metallama38b``)."""
    return re.sub(r"[^a-z0-9]", "", str(s).lower())


def name_matches(value: str | None, patterns: Iterable[str]) -> bool:
    """Whether ``value`` contains any pattern, compared on lower-case alphanumerics."""
    v = _norm(value or "")
    return bool(v) and any(_norm(p) in v for p in patterns)


def varying_axes(trials: Sequence[TrialInfo]) -> set[str]:
    """Axes with more than one value (ignoring the ones a trial does not use)."""
    out = set()
    edit_axes = ("dataset", "edit_layers", "n_edits", "protocol")
    for a in AXES:
        vals = {json.dumps(t.axes.get(a), sort_keys=True) for t in trials if t.axes.get(a) is not None
                and (a not in edit_axes or t.has_edit)}
        if len(vals) > 1:
            out.add(a)
    return out


def axes_but(t: TrialInfo, axis: str) -> tuple:
    """The trial's axis values except ``axis`` (hashable): trials equal on it differ only in ``axis``."""
    return tuple(sorted((k, repr(v)) for k, v in t.axes.items() if k != axis))


def trial_label(t: TrialInfo, vary: set[str]) -> str:
    """A short human label naming the trial's varying axes (editor and FT always)."""
    if t.kind == "base":
        parts = ["base model"]
        if "model" in vary:
            parts.append(t.model_short)
        if "seed" in vary:
            parts.append(f"seed={t.seed}")
        return " · ".join(parts)
    parts = []
    if "model" in vary:
        parts.append(t.model_short)
    if t.has_edit:
        if "dataset" in vary:
            parts.append(str(t.dataset))
        parts.append(t.editor)
        if "edit_layers" in vary and t.edit_layers != "default":
            parts.append(f"L{t.edit_layers}")
        if "n_edits" in vary:
            parts.append(f"n={t.n_edits}")
        if "protocol" in vary:
            parts.append(str(t.protocol))
    else:
        parts.append("no edit")
    if t.has_ft:
        ft = t.ft_method
        if "layer_policy" in vary or t.policy != "all":
            ft += f"/{t.policy}"
        if "task" in vary:
            ft += f" on {t.task}"
        if t.preserve != NONE:
            ft += f" +{t.preserve}"
        parts.append(ft)
    else:
        parts.append("no FT")
    if "seed" in vary:
        parts.append(f"seed={t.seed}")
    return " · ".join(parts)


# --- intervals -------------------------------------------------------------------------------
def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


#: Above this many resampled values (n × n_boot) an interval is computed the cheap way
#: (see :func:`mean_ci`); below it exactly as :func:`~editdecay.evaluate.significance.rate_ci`.
BOOT_BUDGET = 20_000_000


def mean_ci(values: Sequence[float | None], *, n_boot: int = 10_000, seed: int = 0) -> Interval:
    """Mean with a percentile-bootstrap 95% interval (None/NaN skipped and counted).

    Equal to :func:`~editdecay.evaluate.significance.rate_ci` while n × n_boot stays
    within :data:`BOOT_BUDGET`. Beyond it (thousands of facts): binary outcomes draw the
    resampled success counts from Binomial(n, p) — the exact distribution of a
    bootstrap resample's count — and other values use fewer resamples (≥ 1,000).
    """
    vals = list(values)
    defined_vals = _finite(vals)
    n = len(defined_vals)
    if n * n_boot <= BOOT_BUDGET:
        return bootstrap_ci(vals, np.mean, n_boot=n_boot, seed=seed)
    n_undef = len(vals) - n
    arr = np.asarray(defined_vals)
    if np.isin(arr, (0.0, 1.0)).all():
        p = float(arr.mean())
        draws = np.random.default_rng(seed).binomial(n, p, size=n_boot) / n
        lo, hi = np.quantile(draws, [0.025, 0.975])
        return Interval(p, float(lo), float(hi), n, n_undef)
    iv = bootstrap_ci(defined_vals, np.mean, n_boot=max(1000, BOOT_BUDGET // n), seed=seed)
    return Interval(iv.estimate, iv.low, iv.high, n, n_undef)


def paired_ci(a: Sequence[float | None], b: Sequence[float | None], fn: Callable[[np.ndarray, np.ndarray], Any], *,
              n_boot: int = 10_000, seed: int = 0) -> Interval:
    """``fn(mean(a), mean(b))`` over facts defined on both sides, with a paired
    percentile-bootstrap interval (facts resampled together; resamples where ``fn``
    is undefined, e.g. a decrease rate with E_ed = 0, are left out)."""
    x = np.array([math.nan if v is None else float(v) for v in a])
    y = np.array([math.nan if v is None else float(v) for v in b])
    if x.size != y.size:
        raise ValueError(f"paired values differ in length: {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n, n_undef = int(x.size), int(keep.size - keep.sum())
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, n_undef)
    with np.errstate(divide="ignore", invalid="ignore"):
        est = float(fn(x.mean(), y.mean()))
        rng = np.random.default_rng(seed)
        n_boot = min(n_boot, max(1000, BOOT_BUDGET // n))
        rows = max(1, 4_000_000 // n)
        draws = []
        for start in range(0, n_boot, rows):
            idx = rng.integers(0, n, size=(min(rows, n_boot - start), n))
            draws.append(np.asarray(fn(x[idx].mean(axis=1), y[idx].mean(axis=1)), dtype=float))
    boot = np.concatenate(draws)
    boot = boot[np.isfinite(boot)]
    if math.isnan(est) or boot.size == 0:
        return Interval(est, math.nan, math.nan, n, n_undef)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return Interval(est, float(lo), float(hi), n, n_undef)


def delta_points(e: Any, f: Any) -> Any:
    """ΔES in points from two rates in [0, 1]."""
    return 100.0 * (e - f)


def decrease(e: Any, f: Any) -> Any:
    """Decrease rate (E_ed − E_ed_ft)/E_ed (NaN where E_ed = 0)."""
    e, f = np.asarray(e, dtype=float), np.asarray(f, dtype=float)
    return np.where(e == 0, np.nan, (e - f) / np.where(e == 0, 1.0, e))


def drop(a: Any, b: Any) -> Any:
    """The fall from stage a to stage b, a − b (e.g. NS unedited − NS edited)."""
    return np.asarray(a, dtype=float) - np.asarray(b, dtype=float)


@dataclass(frozen=True)
class TaskAccuracy:
    """A downstream task's accuracy pooled over a trial's units."""

    task: str
    mode: str
    correct: int
    n: int
    parse_rate: float | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else math.nan


def _acc_draws(tasks: Sequence[TaskAccuracy], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap draws of the mean accuracy over tasks (each task's items resampled:
    a binomial draw is the bootstrap distribution of a Bernoulli mean)."""
    draws = np.zeros(n_boot)
    for t in tasks:
        draws += rng.binomial(t.n, t.accuracy, size=n_boot) / t.n
    return draws / len(tasks)


def accuracy_ci(tasks: Sequence[TaskAccuracy], *, n_boot: int = 10_000, seed: int = 0) -> Interval:
    """Mean accuracy over tasks (unweighted, as seed 001 T6) with a bootstrap interval
    resampling items within each task; n = items."""
    tasks = [t for t in tasks if t.n > 0]
    if not tasks:
        return NAN_INTERVAL
    est = float(np.mean([t.accuracy for t in tasks]))
    draws = _acc_draws(tasks, n_boot, np.random.default_rng(seed))
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return Interval(est, float(lo), float(hi), sum(t.n for t in tasks))


def accuracy_diff_ci(ref: Sequence[TaskAccuracy], other: Sequence[TaskAccuracy], *, n_boot: int = 10_000,
                     seed: int = 0) -> Interval:
    """(mean accuracy of ``ref`` − mean of ``other``) in points over their common tasks,
    with independent bootstrap draws of both; n = items of ``other``."""
    common = sorted({t.task for t in ref if t.n} & {t.task for t in other if t.n})
    if not common:
        return NAN_INTERVAL
    r = [t for t in ref if t.task in common]
    o = [t for t in other if t.task in common]
    est = 100.0 * (np.mean([t.accuracy for t in r]) - np.mean([t.accuracy for t in o]))
    rng = np.random.default_rng(seed)
    d = 100.0 * (_acc_draws(r, n_boot, rng) - _acc_draws(o, n_boot, rng))
    lo, hi = np.quantile(d, [0.025, 0.975])
    return Interval(float(est), float(lo), float(hi), sum(t.n for t in o))


# --- formatting --------------------------------------------------------------------------------
def defined(iv: Interval | None) -> bool:
    return iv is not None and iv.n > 0 and not math.isnan(iv.estimate)


def fmt(iv: Interval | None, *, scale: float = 1.0, digits: int = 2, n: bool = True) -> str:
    """``0.70 [0.40, 0.90] n=10``; ``—`` when undefined."""
    if not defined(iv):
        return "—" + (f" (n=0, {iv.n_undefined} undefined)" if iv is not None and iv.n_undefined else "")
    e, lo, hi = iv.estimate * scale, iv.low * scale, iv.high * scale
    s = f"{e:.{digits}f}"
    if not (math.isnan(lo) or math.isnan(hi)):
        s += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    if n:
        s += f" n={iv.n}"
        if iv.n_undefined:
            s += f" (+{iv.n_undefined} undef.)"
    return s


def fmt_pct(iv: Interval | None, *, digits: int = 1, n: bool = True) -> str:
    """A rate in percent: ``96.0 [91.0, 100.0] n=50``."""
    return fmt(iv, scale=100.0, digits=digits, n=n)


def fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "—"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


# --- the study -----------------------------------------------------------------------------------
class StudyData:
    """Read access to one study database with cached per-trial aggregates.

    ``study``: a study name (latest of that name) or id; None takes every trial in the
    database (each study's trials in plan order, then any others). ``n_boot``/``seed``:
    bootstrap settings shared by every interval of the report (deterministic).
    """

    def __init__(self, db: str | os.PathLike | Store, *, study: str | int | None = None, n_boot: int = 10_000,
                 seed: int = 0) -> None:
        if isinstance(db, Store):
            self.store = db
        else:
            path = Path(db)
            if not path.is_file():
                raise ReportError(f"{path}: no such study database")
            self.store = Store(path)
        self.n_boot, self.seed = n_boot, seed
        self.studies = self.store.studies()
        self.trials = self._load_trials(study)
        self._by_key = {t.key: t for t in self.trials}
        vary = varying_axes(self.trials)
        labels: Counter[str] = Counter()
        for t in self.trials:
            t.label = trial_label(t, vary)
            labels[t.label] += 1
        for t in self.trials:  # equal labels (e.g. differing only in settings off the axes): add the key
            if labels[t.label] > 1:
                t.label += f" [{t.short}]"
        self.vary = vary
        self._facts: dict[tuple[str, str, str], dict[str, dict[tuple[str, str], list[tuple[float | None, str | None]]]]] = {}
        self._ci: dict[tuple, Interval] = {}

    def close(self) -> None:
        self.store.close()

    # trials -------------------------------------------------------------------------------------
    def _load_trials(self, study: str | int | None) -> list[TrialInfo]:
        names = {s["id"]: s["name"] for s in self.studies}
        if study is not None:
            sid = study if isinstance(study, int) else self.store.study_id(str(study))
            if sid is None and str(study).isdigit():  # an id given as text (the CLI's --study 2)
                sid = int(study)
            if sid is None or sid not in names:
                known = ", ".join(sorted(set(names.values()))) or "none"
                raise ReportError(f"{self.store.path}: no study {study!r} (studies: {known})")
            ordered = [(sid, r) for r in self.store.trials(sid)]
        else:
            ordered = [(s["id"], r) for s in self.studies for r in self.store.trials(s["id"])]
            seen = {r["key"] for _, r in ordered}
            ordered += [(None, r) for r in self.store.trials() if r["key"] not in seen]
        out: dict[str, TrialInfo] = {}
        for sid, r in ordered:
            if r["key"] in out:
                if sid is not None:
                    out[r["key"]].studies.append(names[sid])
                continue
            units = []
            for u in self.store.units(r["key"]):
                info = json.loads(u["info_json"]) if u.get("info_json") else {}
                units.append({"unit_id": u["unit_id"], "status": u["status"], "error": u["error"], "info": info})
            out[r["key"]] = TrialInfo(key=r["key"], kind=r["kind"], status=r["status"], config=r["config"] or {},
                                      axes=r["axes"] or {}, n_units=r["n_units"], units=units, error=r["error"],
                                      studies=[names[sid]] if sid is not None else [])
        kinds = ("base", "zero-edit", "edit-only", "edit+ft")
        return sorted(out.values(), key=lambda t: kinds.index(t.kind) if t.kind in kinds else len(kinds))

    def trial(self, key: str) -> TrialInfo:
        return self._by_key[key]

    def of_kind(self, *kinds: str) -> list[TrialInfo]:
        return [t for t in self.trials if t.kind in kinds]

    def base_trial(self, t: TrialInfo) -> TrialInfo | None:
        """The no-edit, no-fine-tune trial of the same model and seed."""
        for b in self.of_kind("base"):
            if b.model == t.model and b.seed == t.seed:
                return b
        return None

    def zero_edit_for(self, t: TrialInfo) -> TrialInfo | None:
        """The zero-edit trial with the same model, seed and fine-tuning (task, method, policy)."""
        for z in self.of_kind("zero-edit"):
            if z.model == t.model and z.seed == t.seed and z.ft_key() == t.ft_key():
                return z
        return None

    def edit_only_for(self, t: TrialInfo) -> TrialInfo | None:
        """The edit-only trial with the same edit."""
        for e in self.of_kind("edit-only"):
            if e.edit_key() == t.edit_key():
                return e
        return None

    def reference_for(self, t: TrialInfo) -> TrialInfo | None:
        """The trial an edited/fine-tuned trial is compared with for downstream
        degradation: zero-edit with the same FT for edit+ft, else the base model."""
        if t.kind == "edit+ft":
            return self.zero_edit_for(t)
        if t.kind in ("edit-only", "zero-edit"):
            return self.base_trial(t)
        return None

    # fact outcomes ------------------------------------------------------------------------------
    def _fact_rows(self, key: str, fact_set: str, metric: str):
        k = (key, fact_set, metric)
        if k not in self._facts:
            by_stage: dict[str, dict[tuple[str, str], list[tuple[float | None, str | None]]]] = defaultdict(
                lambda: defaultdict(list))
            cur = self.store.conn.execute(
                "SELECT stage, dataset, case_id, value, output FROM fact_outcomes WHERE trial_key = ? AND "
                "fact_set = ? AND metric = ? ORDER BY rowid", (key, fact_set, metric))
            for stage, ds, case, value, output in cur:
                by_stage[stage][(ds, case)].append((value, output))
            self._facts[k] = by_stage
        return self._facts[k]

    def facts(self, key: str, fact_set: str, metric: str, stage: str, dataset: str | None = None) -> dict[str, float | None]:
        """Per fact (``dataset/case`` id → value averaged over units; None if undefined everywhere)."""
        out: dict[str, float | None] = {}
        for (ds, case), vals in self._fact_rows(key, fact_set, metric).get(stage, {}).items():
            if dataset is not None and ds != dataset:
                continue
            xs = _finite(v for v, _ in vals)
            out[f"{ds}/{case}"] = sum(xs) / len(xs) if xs else None
        return out

    def outputs(self, key: str, fact_set: str, metric: str, stage: str) -> dict[str, str | None]:
        """Per fact the ``output`` column of the first unit that has one."""
        out: dict[str, str | None] = {}
        for (ds, case), vals in self._fact_rows(key, fact_set, metric).get(stage, {}).items():
            out[f"{ds}/{case}"] = next((o for _, o in vals if o is not None), None)
        return out

    def stages(self, key: str, fact_set: str, metric: str) -> list[str]:
        return list(self._fact_rows(key, fact_set, metric))

    def probe_steps(self, key: str, fact_set: str = "edit", metric: str = "retained") -> list[int]:
        """Optimiser steps with ``step:N`` probe rows, ascending."""
        return sorted(int(s.split(":")[1]) for s in self.stages(key, fact_set, metric) if s.startswith("step:"))

    def rate(self, key: str, fact_set: str, metric: str, stage: str, dataset: str | None = None) -> Interval:
        """Mean of a per-fact metric at a stage with its bootstrap interval and n (facts)."""
        k = ("rate", key, fact_set, metric, stage, dataset)
        if k not in self._ci:
            vals = list(self.facts(key, fact_set, metric, stage, dataset).values())
            self._ci[k] = mean_ci(vals, n_boot=self.n_boot, seed=self.seed) if vals else NAN_INTERVAL
        return self._ci[k]

    def has(self, key: str, fact_set: str, metric: str, stage: str) -> bool:
        return bool(self._fact_rows(key, fact_set, metric).get(stage))

    def paired(self, key: str, fact_set: str, metric: str, stage_a: str, stage_b: str
               ) -> tuple[list[str], list[float | None], list[float | None]]:
        """(fact ids, values at ``stage_a``, values at ``stage_b``) over facts probed at both."""
        return _pair(self.facts(key, fact_set, metric, stage_a), self.facts(key, fact_set, metric, stage_b))

    def paired_trials(self, key_a: str, key_b: str, fact_set: str, metric: str, stage: str
                      ) -> tuple[list[str], list[float | None], list[float | None]]:
        """(fact ids, values in trial ``key_a``, values in trial ``key_b``) at one stage over
        the facts both trials probed (e.g. one edit set under two fine-tunings)."""
        return _pair(self.facts(key_a, fact_set, metric, stage), self.facts(key_b, fact_set, metric, stage))

    def paired_stat(self, key: str, metric: str, fn: Callable, stage_a: str = "edited", stage_b: str = "finetuned",
                    fact_set: str = "edit") -> Interval:
        """``fn`` of the two stages' means with a paired bootstrap interval (cached by ``fn`` name)."""
        k = ("paired", key, fact_set, metric, stage_a, stage_b, getattr(fn, "__name__", repr(fn)))
        if k not in self._ci:
            _, a, b = self.paired(key, fact_set, metric, stage_a, stage_b)
            self._ci[k] = paired_ci(a, b, fn, n_boot=self.n_boot, seed=self.seed) if a else NAN_INTERVAL
        return self._ci[k]

    def intrinsic(self, t: TrialInfo, stage: str, dataset: str | None = None) -> Interval:
        """Intrinsic retention (true targets) at a stage; per-fact means over the units'
        models under protocol ``single``."""
        return self.rate(t.key, "intrinsic", "retained", stage, dataset)

    # curves and metrics -----------------------------------------------------------------------
    def curve(self, key: str, name: str) -> dict[int, list[float]]:
        """Step → the units' values of a named curve (NULLs skipped)."""
        out: dict[int, list[float]] = defaultdict(list)
        for step, value in self.store.conn.execute(
                "SELECT step, value FROM curves WHERE trial_key = ? AND name = ? ORDER BY step, rowid", (key, name)):
            if value is not None:
                out[int(step)].append(float(value))
        return dict(out)

    def curve_names(self, key: str) -> set[str]:
        return {r[0] for r in self.store.conn.execute("SELECT DISTINCT name FROM curves WHERE trial_key = ?", (key,))}

    def metric_rows(self, key: str, name: str, stage: str | None = None) -> list[dict[str, Any]]:
        where = {"name": name} | ({} if stage is None else {"stage": stage})
        return self.store.metrics(key, **where)

    def stop_summary(self, t: TrialInfo) -> str:
        """``max_steps (30 steps)`` or, over several units, ``max_steps ×3 (steps 2–4)``."""
        if not t.has_ft:
            return "—"
        reasons = Counter(r["text"] or "?" for r in self.metric_rows(t.key, "stop_reason"))
        steps = [r["value"] for r in self.metric_rows(t.key, "steps") if r["value"] is not None]
        if not reasons:
            return "—"
        if sum(reasons.values()) == 1:
            (reason,) = reasons
            return reason + (f" ({int(steps[0])} steps)" if steps else "")
        s = ", ".join(f"{r} ×{n}" for r, n in reasons.most_common())
        if steps:
            lo, hi = int(min(steps)), int(max(steps))
            s += f" (steps {lo}–{hi})" if lo != hi else f" ({lo} steps)"
        return s

    # downstream, drift, transitions, artefacts -----------------------------------------------------
    def downstream(self, t: TrialInfo, stage: str | None = None) -> list[TaskAccuracy]:
        """Task accuracies of the trial's final model (``stage`` None: rows of stage
        ``final`` or the trial's final stage), pooled over units."""
        want = {stage} if stage else {"final", t.final_stage}
        pooled: dict[tuple[str, str], list[Any]] = {}
        for r in self.store.downstream(t.key):
            if r["stage"] not in want:
                continue
            n = int(r["n"] or 0)
            correct = r["correct"] if r["correct"] is not None else (
                round(r["accuracy"] * n) if r["accuracy"] is not None else None)
            if correct is None or n == 0:
                continue
            p = pooled.setdefault((r["task"], r["mode"]), [0, 0, []])
            p[0] += int(correct)
            p[1] += n
            if r["parse_rate"] is not None:
                p[2].append(float(r["parse_rate"]))
        return [TaskAccuracy(task, mode, c, n, (sum(pr) / len(pr)) if pr else None)
                for (task, mode), (c, n, pr) in sorted(pooled.items())]

    def drift(self, key: str) -> dict[tuple[str, str], dict[int, list[float]]]:
        """(measure, pair) → block → the units' mean values."""
        out: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in self.store.drift(key):
            if r["value"] is not None:
                out[(r["measure"], r["pair"])][int(r["block"])].append(float(r["value"]))
        return {k: dict(v) for k, v in out.items()}

    def drift_prompts(self, key: str) -> int:
        row = self.store.conn.execute(
            "SELECT SUM(n) FROM (SELECT unit_id, MAX(n_prompts) AS n FROM drift WHERE trial_key = ? GROUP BY unit_id)",
            (key,)).fetchone()
        return int(row[0] or 0)

    def transitions(self, key: str) -> list[dict[str, Any]]:
        return self.store.transitions(key)

    def artefacts(self, kind: str) -> list[dict[str, Any]]:
        rows = self.store.rows("artefacts", kind=kind)
        for r in rows:
            r["meta"] = json.loads(r["meta_json"]) if r.get("meta_json") else {}
        return rows

    def unit_info(self, t: TrialInfo, name: str) -> list[Any]:
        return [u["info"][name] for u in t.units if name in (u["info"] or {})]


def binary(values: Iterable[float | None]) -> list[bool | None]:
    """Per-fact outcomes as booleans (≥ 0.5; a value averaged over units counts by majority), None kept."""
    return [None if v is None else v >= 0.5 for v in values]


def _pair(a: Mapping[str, float | None], b: Mapping[str, float | None]
          ) -> tuple[list[str], list[float | None], list[float | None]]:
    ids = [i for i in a if i in b]
    return ids, [a[i] for i in ids], [b[i] for i in ids]


def group_by(trials: Iterable[TrialInfo], key: Callable[[TrialInfo], Any]) -> dict[Any, list[TrialInfo]]:
    """Trials grouped by ``key`` (insertion order kept)."""
    out: dict[Any, list[TrialInfo]] = {}
    for t in trials:
        out.setdefault(key(t), []).append(t)
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std, n) of the finite values (NaN when empty; std 0 for one)."""
    xs = _finite(values)
    if not xs:
        return math.nan, math.nan, 0
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd, len(xs)


def summarize(mapping: Mapping[str, Interval]) -> dict[str, dict[str, float]]:
    """Intervals as plain dicts (for machine-readable section records)."""
    return {k: {"estimate": v.estimate, "low": v.low, "high": v.high, "n": v.n} for k, v in mapping.items()}
