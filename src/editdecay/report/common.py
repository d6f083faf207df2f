"""What every report section builds on: the section objects (:class:`Section`, :class:`Table`,
:class:`Figure`) and the small helpers that format rates, pick trials and label fine-tuning."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..evaluate.significance import (
    Interval,
)
from .data import (
    NAN_INTERVAL,
    StudyData,
    TrialInfo,
    defined,
    fmt,
    fmt_pct,
    mean_ci,
)

log = logging.getLogger(__name__)

MAX_PANELS = 12
MAX_EXAMPLE_TRIALS = 4


# --- section objects ------------------------------------------------------------------------------
@dataclass
class Table:
    """A table of formatted cells."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    """A PNG figure (``name`` becomes the file stem)."""

    name: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    """One report section. ``source`` names the reference-card item it regenerates;
    ``missing`` says what the study lacks (and which spec axes would produce it)."""

    id: str
    title: str
    source: str = ""
    markdown: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    missing: str | None = None
    error: str | None = None

    @property
    def has_data(self) -> bool:
        return bool(self.figures or self.tables)


def _no_data(sid: str, title: str, source: str, missing: str, markdown: str = "") -> Section:
    return Section(sid, title, source, markdown, missing=missing)


# --- helpers ------------------------------------------------------------------------------------
def _arrow(a: Interval | None, b: Interval | None, *, pct: bool = False) -> str:
    """``a → b (n=…)``, or just ``a`` when ``b`` is undefined."""
    f = fmt_pct if pct else fmt
    if not defined(b):
        return f(a)
    if not defined(a):
        return "— → " + f(b)
    n = f"n={b.n}" if a.n == b.n else f"n={a.n}→{b.n}"
    return f"{f(a, n=False)} → {f(b, n=False)} ({n})"


def _edit_rate(d: StudyData, t: TrialInfo, stage: str, metric: str = "retained") -> Interval:
    return d.rate(t.key, "edit", metric, stage) if t.has_edit else NAN_INTERVAL


def _triple(iv: Interval, scale: float = 1.0) -> tuple[float, float, float] | None:
    return (iv.estimate * scale, iv.low * scale, iv.high * scale) if defined(iv) else None


def _bool_list(vals: Sequence[float | None]) -> list[bool | None]:
    return [None if v is None else bool(v >= 0.5) for v in vals]


def _ft_label(t: TrialInfo) -> str:
    return f"{t.ft_method}/{t.policy} on {t.task}" if t.has_ft else "no FT"


def _sorted_edit(trials: Sequence[TrialInfo]) -> list[TrialInfo]:
    order = {"none": 0}
    return sorted(trials, key=lambda t: (t.model, str(t.dataset), t.editor, t.n_edits, order.get(t.ft_method, 1),
                                         t.ft_method, str(t.policy), str(t.task)))


def _prefer(trials: Sequence[TrialInfo], editor: str | None = None, task: str | None = None) -> list[TrialInfo]:
    """``trials`` with those of the preferred editor/task first (stable)."""
    return sorted(trials, key=lambda t: ((editor is not None and t.editor != editor)
                                         + (task is not None and t.task != task)))


def _policy_num(policy: str | None, prefix: str) -> tuple[int, int] | None:
    if not policy or not policy.startswith(prefix + ":"):
        return None
    parts = [int(x) for x in policy.split(":")[1].split(",")]
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def _steps_subset(steps: list[int], limit: int = 40) -> list[int]:
    if len(steps) <= limit:
        return steps
    idx = np.unique(np.linspace(0, len(steps) - 1, limit).round().astype(int))
    return [steps[i] for i in idx]


def _rate_iv(d: StudyData, k: int, n: int) -> Interval:
    """Interval of k successes in n (as :func:`~editdecay.evaluate.significance.rate_ci`)."""
    return mean_ci([1.0] * k + [0.0] * (n - k), n_boot=d.n_boot, seed=d.seed)


def _ranges(blocks: Sequence[int]) -> str:
    """``0-2,8-29`` for a block list; ``—`` when empty."""
    bs = sorted(set(blocks))
    if not bs:
        return "—"
    runs, start = [], bs[0]
    for prev, cur in zip(bs, [*bs[1:], None]):
        if cur is None or cur != prev + 1:
            runs.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ",".join(runs)


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest finite value, -1 when there is none."""
    best, idx = -math.inf, -1
    for i, v in enumerate(values):
        if v is not None and not math.isnan(v) and v > best:
            best, idx = v, i
    return idx


def _units_ci(d: StudyData, values: Sequence[float]) -> Interval:
    """Mean over units with a bootstrap interval when there are several."""
    if len(values) > 1:
        return mean_ci(list(values), n_boot=d.n_boot, seed=d.seed)
    if len(values) == 1:
        return Interval(values[0], math.nan, math.nan, 1)
    return NAN_INTERVAL
