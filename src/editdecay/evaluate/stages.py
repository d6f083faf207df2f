"""Edit metrics across stages from per-fact binary success vectors (seed 001).

- EFR (Eq. 1) = Pr(fine-tuned fails | edit succeeded); emergence = Pr(fine-tuned
  succeeds | edit failed).
- ΔES = ES_edited − ES_finetuned in points; decrease rate = (E_ed − E_ed_ft)/E_ed.
- Transitions (Table 4): stable (1→1), erased (1→0), emergent (0→1), impossible (0→0).

``None`` in a vector marks an undefined outcome: the pair is skipped and counted in
``n_undefined``. Rates with a zero denominator are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from ..errors import EditdecayError
from .significance import Interval, rate_ci

Outcome = bool | None


class Transition(StrEnum):
    """Per-fact transition from the edited to the fine-tuned model."""

    STABLE = "stable"  # success -> success
    ERASED = "erased"  # success -> fail
    EMERGENT = "emergent"  # fail -> success
    IMPOSSIBLE = "impossible"  # fail -> fail


TRANSITIONS: tuple[str, ...] = tuple(t.value for t in Transition)


@dataclass(frozen=True)
class Rate:
    """``numerator / denominator`` (NaN when the denominator is 0)."""

    value: float
    numerator: int
    denominator: int
    n_undefined: int = 0

    def ci(self, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Interval:
        """Bootstrap interval over the ``denominator`` Bernoulli outcomes."""
        outcomes = [True] * self.numerator + [False] * (self.denominator - self.numerator)
        iv = rate_ci(outcomes, n_boot=n_boot, level=level, seed=seed)
        return Interval(iv.estimate, iv.low, iv.high, iv.n, self.n_undefined, level)


def _rate(numerator: int, denominator: int, n_undefined: int = 0) -> Rate:
    value = numerator / denominator if denominator else math.nan
    return Rate(value, numerator, denominator, n_undefined)


def _pairs(
    edited: Sequence[Outcome], finetuned: Sequence[Outcome]
) -> tuple[list[tuple[bool, bool]], int]:
    """Defined (edited, finetuned) pairs and the number skipped."""
    if len(edited) != len(finetuned):
        raise EditdecayError(
            f"outcome vectors differ in length: edited {len(edited)}, finetuned {len(finetuned)}")
    pairs = [(bool(e), bool(f)) for e, f in zip(edited, finetuned) if e is not None and f is not None]
    return pairs, len(edited) - len(pairs)


def efr(edited: Sequence[Outcome], finetuned: Sequence[Outcome]) -> Rate:
    """Edit forgetting rate (seed 001 Eq. 1): Pr(fine-tuned fails | edit succeeded)."""
    pairs, n_undef = _pairs(edited, finetuned)
    after = [f for e, f in pairs if e]
    return _rate(sum(not f for f in after), len(after), n_undef)


def emergence(edited: Sequence[Outcome], finetuned: Sequence[Outcome]) -> Rate:
    """Pr(fine-tuned succeeds | edit failed)."""
    pairs, n_undef = _pairs(edited, finetuned)
    after = [f for e, f in pairs if not e]
    return _rate(sum(after), len(after), n_undef)


def _paired_means(
    a: float | Sequence[float | bool | None], b: float | Sequence[float | bool | None]
) -> tuple[float, float]:
    """Scalars as they are; two equal-length sequences averaged over pairs where both are
    defined (None/NaN skipped). NaN when nothing is defined."""
    scalar_a, scalar_b = np.ndim(a) == 0, np.ndim(b) == 0
    if scalar_a != scalar_b:
        raise EditdecayError("pass both values as scalars or both as per-fact sequences")
    if scalar_a:
        return float(a), float(b)  # type: ignore[arg-type]
    if len(a) != len(b):
        raise EditdecayError(f"per-fact sequences differ in length: {len(a)} and {len(b)}")

    def ok(v) -> bool:
        return v is not None and not math.isnan(float(v))

    keep = [(float(x), float(y)) for x, y in zip(a, b) if ok(x) and ok(y)]
    if not keep:
        return math.nan, math.nan
    return sum(x for x, _ in keep) / len(keep), sum(y for _, y in keep) / len(keep)


def delta_es(
    es_edited: float | Sequence[float | bool | None],
    es_ft: float | Sequence[float | bool | None],
) -> float:
    """ΔES = ES_edited − ES_finetuned in points (fractions × 100); inputs are rates in
    [0, 1] or paired per-fact sequences."""
    e, f = _paired_means(es_edited, es_ft)
    return 100.0 * (e - f)


def decrease_rate(
    e_ed: float | Sequence[float | bool | None], e_ed_ft: float | Sequence[float | bool | None]
) -> float:
    """(E_ed − E_ed_ft) / E_ed; NaN when E_ed is 0 or undefined."""
    e, f = _paired_means(e_ed, e_ed_ft)
    if math.isnan(e) or e == 0:
        return math.nan
    return (e - f) / e


def _transition(e: bool, f: bool) -> str:
    if e:
        return Transition.STABLE.value if f else Transition.ERASED.value
    return Transition.EMERGENT.value if f else Transition.IMPOSSIBLE.value


def transitions(edited: Sequence[Outcome], finetuned: Sequence[Outcome]) -> list[str | None]:
    """Per-fact transition name (see :class:`Transition`); None where undefined."""
    _pairs(edited, finetuned)  # length check
    return [None if e is None or f is None else _transition(bool(e), bool(f))
            for e, f in zip(edited, finetuned)]


def transition_table(
    fact_ids: Sequence[str | int],
    edited: Sequence[Outcome],
    finetuned: Sequence[Outcome],
    outputs: Mapping[str, Sequence[str]] | None = None,
    examples_per_class: int = 3,
) -> dict:
    """Seed 001 Table 4: counts, fractions (of defined facts) and up to
    ``examples_per_class`` example rows per transition, in fact order.

    Each example row is ``{"fact_id": ..., <stage>: <greedy output>, ...}`` with one key
    per entry of ``outputs`` (e.g. ``base``, ``edited``, ``finetuned``).
    """
    labels = transitions(edited, finetuned)
    if len(fact_ids) != len(labels):
        raise EditdecayError(f"{len(fact_ids)} fact ids for {len(labels)} outcomes")
    outputs = dict(outputs or {})
    for stage, outs in outputs.items():
        if len(outs) != len(labels):
            raise EditdecayError(f"outputs[{stage!r}] has {len(outs)} entries for {len(labels)} facts")
    counts = {t: 0 for t in TRANSITIONS}
    examples: dict[str, list[dict]] = {t: [] for t in TRANSITIONS}
    for i, label in enumerate(labels):
        if label is None:
            continue
        counts[label] += 1
        if len(examples[label]) < examples_per_class:
            row: dict = {"fact_id": fact_ids[i]}
            row.update({stage: outs[i] for stage, outs in outputs.items()})
            examples[label].append(row)
    n = sum(counts.values())
    return {
        "n": n,
        "n_undefined": len(labels) - n,
        "counts": counts,
        "fractions": {t: (c / n if n else math.nan) for t, c in counts.items()},
        "examples": examples,
    }


def stage_summary(
    per_stage: Mapping[str, Sequence[Outcome]],
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict]:
    """Per stage (any name: ``base``, ``edited``, ``step:20``, ...): success ``rate``,
    bootstrap ``low``/``high``, ``successes``, ``n`` (defined) and ``n_undefined``."""
    summary: dict[str, dict] = {}
    for stage, outcomes in per_stage.items():
        iv = rate_ci(outcomes, n_boot=n_boot, level=level, seed=seed)
        summary[stage] = {
            "rate": iv.estimate,
            "low": iv.low,
            "high": iv.high,
            "level": level,
            "successes": round(iv.estimate * iv.n) if iv.n else 0,
            "n": iv.n,
            "n_undefined": iv.n_undefined,
        }
    return summary
