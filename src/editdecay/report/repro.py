"""The reproduction check: the study's values beside the published ones of the reference
card (``published.yaml``), matched by the trial axes each published value applies to."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..evaluate.significance import (
    Interval,
)
from .common import Section, Table
from .data import (
    StudyData,
    TrialInfo,
    defined,
    fmt,
    fmt_p,
    name_matches,
)
from .registry import meta, section
from .seed000 import selection_stats
from .seed001 import ttest_groups


# --- reproduction check -------------------------------------------------------------------------
def published_values() -> list[dict[str, Any]]:
    """The reference card's published values (``published.yaml``)."""
    text = resources.files("editdecay.report").joinpath("published.yaml").read_text(encoding="utf-8")
    return list(yaml.safe_load(text)["values"])




def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def matches(t: TrialInfo, applies: dict[str, Any]) -> bool:
    """Whether a trial has the configuration a published value applies to."""
    for k, v in applies.items():
        vals = _as_list(v)
        if k == "model":
            if not name_matches(t.model, vals):
                return False
        elif k == "dataset":
            if not (name_matches(t.dataset, vals) or name_matches(t.dataset_format, vals)):
                return False
        elif k == "n_edits":
            if t.n_edits not in [int(x) for x in vals]:
                return False
        elif k == "layer_policy":
            if t.policy not in vals:
                return False
        elif k == "protocol":
            if (t.protocol or "").split(":")[0] not in vals:
                return False
        elif k in ("editor", "task", "ft_method"):
            if getattr(t, k) not in vals:
                return False
        else:
            raise ValueError(f"published.yaml: unknown applies key {k!r}")
    return True


def _describe(applies: dict[str, Any]) -> str:
    return ", ".join(f"{k} ~ {'/'.join(map(str, _as_list(v)))}" for k, v in applies.items())


def _study_value(d: StudyData, entry: dict[str, Any]) -> list[tuple[str, Interval, str]]:
    """(matched configuration, study value, note) for one published value."""
    q, applies = entry["quantity"], entry.get("applies") or {}
    scale = 100.0 if entry.get("unit") == "percent" else 1.0
    if q == "p_value":
        tests = ttest_groups(d, _as_list(applies.get("model", [])) or None)
        meth = _as_list(applies.get("ft_method"))[0]
        x = tests.get(("all", meth))
        if x is None or math.isnan(x["p"]):
            return []
        return [(f"pooled over {x['n']} configurations", Interval(x["p"], math.nan, math.nan, x["n"]), "")]
    if q in ("mean_p_true", "mean_p_second"):
        out = []
        for (model, ds), s in selection_stats(d, _as_list(applies.get("model", []))).items():
            if "dataset" in applies and not name_matches(ds, _as_list(applies["dataset"])):
                continue
            iv = s["p"].get((entry.get("fact_set", "edit"), q.removeprefix("mean_")))
            if iv is not None:
                out.append((f"{Path(model).name} · {ds}", iv, ""))
        return out
    kinds = ("edit-only", "edit+ft") if entry.get("stage") == "edited" else ("edit+ft",)
    trials = [t for t in d.of_kind(*kinds) if matches(t, applies)]
    prefer = entry.get("prefer") or {}
    exact = [t for t in trials if matches(t, prefer)]
    note = "" if exact or not prefer else f"differs from the published {_describe(prefer)}"
    out = []
    for t in (exact or trials)[:5]:
        if q in ("es", "ps", "ns"):
            iv = d.rate(t.key, "edit", q, entry.get("stage", "edited"))
        elif q == "retention":
            fs = entry.get("fact_set", "edit")
            iv = d.rate(t.key, fs, "retained", entry.get("stage", "finetuned"))
        else:
            raise ValueError(f"published.yaml: unknown quantity {q!r}")
        if defined(iv):
            out.append((t.label, Interval(iv.estimate * scale, iv.low * scale, iv.high * scale, iv.n, iv.n_undefined), note))
    return out


@section("repro", "Reproduction check against published values", "reference card (seed 000, seed 001 T9)")
def reproduction(d: StudyData) -> Section:
    """Shows every published value of the reference card (``published.yaml``) beside the study's value for the
    trials of the same configuration, and whether it lies inside the study's 95% interval; from the
    ``es``/``ps``/``ns``/``retained`` rows of the matching edit-only and edit+ft trials, the selection statistics
    (mean p(true)/p(second)) and the pooled paired t-tests (p-values)."""
    sid, title, src = meta(reproduction)
    entries = published_values()
    rows, matched = [], 0
    for e in entries:
        unit = e.get("unit", "")
        found = _study_value(d, e)
        digits = 3 if unit == "fraction" else 2
        pub = fmt_p(e["value"]) if e["quantity"] == "p_value" else f"{e['value']:g}"
        if not found:
            rows.append([e["source"], e["label"], e.get("configuration", ""), pub, "—",
                         "no matching trial: needs " + _describe(e.get("applies") or {}), ""])
            continue
        for conf, iv, note in found:
            matched += 1
            if e["quantity"] == "p_value":
                study, inside = f"{fmt_p(iv.estimate)} n={iv.n}", ("both < 0.05" if (iv.estimate < 0.05) == (e["value"] < 0.05)
                                                                  else "differs at 0.05")
            else:
                study = fmt(iv, digits=digits)
                inside = "—" if math.isnan(iv.low) else ("yes" if iv.low <= e["value"] <= iv.high else "no")
            rows.append([e["source"], e["label"], e.get("configuration", ""), pub, study,
                         conf + (f" ({note})" if note else ""), inside])
    sec = Section(sid, title, src, "Published values from the seeds' reference card next to the study's value for "
                  "trials with the same configuration (model family, editor, dataset, task as listed); `in CI` says "
                  "whether the published value lies inside the study's 95% bootstrap interval.")
    sec.tables.append(Table(["source", "quantity", "published configuration", "published", "study", "matched trial",
                             "in CI"], rows))
    if not matched:
        sec.missing = ("no trial matches a published configuration: the values apply to GPT-J-6B (MEMIT/AlphaEdit on "
                       "zsre/counterfact, stage edited), GPT-2 XL and Llama3-8B (seed 000 selection and SFT retention) "
                       "and seed 001's models × ft_method (p-values)")
    return sec
