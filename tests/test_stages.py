"""EFR, emergence, ΔES, decrease rate, transitions and stage summaries on hand-built
outcome vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from editdecay.errors import EditdecayError
from editdecay.evaluate.stages import (
    TRANSITIONS, Rate, Transition, decrease_rate, delta_es, efr, emergence, stage_summary,
    transition_table, transitions,
)

EDITED = [1, 1, 1, 0, 0]
FT = [1, 0, 0, 1, 0]


def _b(xs):
    return [None if x is None else bool(x) for x in xs]


def test_efr_and_emergence_known_values():
    r = efr(_b(EDITED), _b(FT))
    assert (r.numerator, r.denominator) == (2, 3)
    assert r.value == pytest.approx(2 / 3)
    em = emergence(_b(EDITED), _b(FT))
    assert (em.numerator, em.denominator) == (1, 2)
    assert em.value == pytest.approx(0.5)


def test_efr_is_not_its_complement():
    # all edits survive: EFR 0; all fail after FT: EFR 1
    assert efr([True, True], [True, True]).value == 0.0
    assert efr([True, True, False], [False, False, True]).value == 1.0
    assert emergence([True, False, False], [False, False, False]).value == 0.0


def test_rates_undefined_are_nan():
    r = efr([False, False], [True, False])  # no successful edit
    assert math.isnan(r.value) and r.denominator == 0
    em = emergence([True, True], [True, False])  # no failed edit
    assert math.isnan(em.value)
    iv = r.ci()
    assert iv.n == 0 and math.isnan(iv.low)


def test_none_entries_are_skipped_and_counted():
    edited = [True, True, None, True, False, False]
    ft = [True, False, True, None, True, False]
    r = efr(edited, ft)
    assert (r.numerator, r.denominator, r.n_undefined) == (1, 2, 2)
    assert emergence(edited, ft).n_undefined == 2
    assert r.ci().n_undefined == 2


def test_length_mismatch_raises():
    with pytest.raises(EditdecayError, match="length"):
        efr([True], [True, False])
    with pytest.raises(EditdecayError):
        transitions([True, False], [True])


def test_rate_ci_is_bootstrap_over_conditioned_outcomes():
    edited = [True] * 50 + [False] * 10
    ft = [False] * 25 + [True] * 25 + [True] * 10
    r = efr(edited, ft)
    assert r.value == 0.5 and r.denominator == 50
    iv = r.ci(seed=0)
    assert iv.n == 50 and iv.estimate == 0.5
    assert iv.low < 0.5 < iv.high
    assert iv.half_width == pytest.approx(0.14, abs=0.03)
    assert r.ci(seed=0) == iv


def test_rate_dataclass():
    r = Rate(0.25, 1, 4)
    assert r.n_undefined == 0 and r.ci().estimate == 0.25


def test_delta_es_points():
    assert delta_es(0.967, 0.60) == pytest.approx(36.7)
    assert delta_es(0.5, 0.7) == pytest.approx(-20.0)
    # per-fact sequences: pairs with an undefined side are skipped
    assert delta_es([1, 1, 1, 0, None], [1, 0, 0, 1, 0]) == pytest.approx(100 * (3 / 4 - 2 / 4))
    assert math.isnan(delta_es([None], [1.0]))
    with pytest.raises(EditdecayError):
        delta_es(0.5, [1, 0])


def test_decrease_rate():
    assert decrease_rate(0.8, 0.6) == pytest.approx(0.25)
    assert decrease_rate(0.5, 0.75) == pytest.approx(-0.5)
    assert math.isnan(decrease_rate(0.0, 0.0))
    assert math.isnan(decrease_rate(0.0, 0.3))
    assert decrease_rate(np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0, 0.0])) == \
        pytest.approx((0.5 - 0.25) / 0.5)


def test_transitions_known_values():
    labels = transitions(_b(EDITED), _b(FT))
    assert labels == ["stable", "erased", "erased", "emergent", "impossible"]
    assert labels[0] == Transition.STABLE and TRANSITIONS == (
        "stable", "erased", "emergent", "impossible")
    assert transitions([True, None], [None, False]) == [None, None]


def test_transition_table_counts_fractions_examples():
    ids = ["f0", "f1", "f2", "f3", "f4", "f5"]
    edited = _b(EDITED) + [None]
    ft = _b(FT) + [True]
    outputs = {
        "base": [f"b{i}" for i in range(6)],
        "edited": [f"e{i}" for i in range(6)],
        "finetuned": [f"t{i}" for i in range(6)],
    }
    table = transition_table(ids, edited, ft, outputs, examples_per_class=1)
    assert table["counts"] == {"stable": 1, "erased": 2, "emergent": 1, "impossible": 1}
    assert table["n"] == 5 and table["n_undefined"] == 1
    assert table["fractions"]["erased"] == pytest.approx(0.4)
    assert sum(table["fractions"].values()) == pytest.approx(1.0)
    assert table["examples"]["erased"] == [
        {"fact_id": "f1", "base": "b1", "edited": "e1", "finetuned": "t1"}]
    assert table["examples"]["impossible"][0]["fact_id"] == "f4"
    full = transition_table(ids, edited, ft, outputs)
    assert [row["fact_id"] for row in full["examples"]["erased"]] == ["f1", "f2"]


def test_transition_table_without_outputs_and_empty():
    table = transition_table([0, 1], [True, False], [True, True])
    assert table["examples"]["stable"] == [{"fact_id": 0}]
    empty = transition_table([0], [None], [True])
    assert empty["n"] == 0 and all(math.isnan(v) for v in empty["fractions"].values())
    with pytest.raises(EditdecayError):
        transition_table([0], [True, False], [True, True])
    with pytest.raises(EditdecayError, match="outputs"):
        transition_table([0, 1], [True, False], [True, True], {"base": ["x"]})


def test_stage_summary():
    per_stage = {
        "base": [False] * 50,
        "edited": [True] * 45 + [False] * 5,
        "step:20": [True] * 25 + [False] * 24 + [None],
        "finetuned": [True] * 20 + [False] * 30,
    }
    s = stage_summary(per_stage, n_boot=2000)
    assert list(s) == list(per_stage)
    assert s["base"]["rate"] == 0.0 and s["base"]["low"] == s["base"]["high"] == 0.0
    assert s["edited"]["rate"] == pytest.approx(0.9) and s["edited"]["successes"] == 45
    assert s["step:20"]["n"] == 49 and s["step:20"]["n_undefined"] == 1
    assert s["step:20"]["successes"] == 25
    fin = s["finetuned"]
    assert fin["rate"] == pytest.approx(0.4) and fin["low"] < 0.4 < fin["high"]
    assert (fin["high"] - fin["low"]) / 2 == pytest.approx(0.136, abs=0.03)
    assert stage_summary(per_stage, n_boot=2000) == s
