"""The report's sections: one function per table or figure of the seeds' reference card.

Each function takes a :class:`~editdecay.report.data.StudyData` and returns a
:class:`Section` (title, Markdown notes, figures, tables, and — when the study holds no
data for it — a note naming the spec axes that would produce it). Every rate is shown
as ``estimate [95% bootstrap interval] n=…``; ES/PS/NS and downstream accuracies in
percent (seed 001), retention as fractions (seed 000). Each function is registered with
``@section(id, title, source)`` (:mod:`~editdecay.report.registry`), which holds its id,
title and source; :func:`build_sections` runs the registered sections in report order
and never raises: a section that fails reports its error instead.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import yaml

from ..evaluate.significance import (
    Interval,
    SignificanceInputError,
    mcnemar,
    paired_ttest,
)
from ..evaluate.stages import efr, emergence
from . import figures as F
from .data import (
    NAN_INTERVAL,
    StudyData,
    TrialInfo,
    accuracy_ci,
    accuracy_diff_ci,
    decrease,
    defined,
    delta_points,
    drop,
    fmt,
    fmt_p,
    fmt_pct,
    group_by,
    mean_ci,
    mean_std,
    name_matches,
)
from .registry import meta, registered, section

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


# --- overview and headline ---------------------------------------------------------------------
@section("overview", "Study overview")
def overview(d: StudyData) -> Section:
    """Shows the studies in the database, the trials counted by kind and status, the axes that vary, a per-trial
    table (key, status, units done, protocol, edited and fine-tuned blocks, unverified edits) and the failed units
    with their errors; from every trial of the study data and its units (status, error, info ``blocks``)."""
    sec = Section(*meta(overview))
    if not d.trials:
        sec.missing = ("the database holds no trials: run a study spec into it (`editdecay run SPEC --db DB`); "
                       "axes: model, dataset, editor, n_edits, protocol, task, ft_method, layer_policy")
        return sec
    studies = ", ".join(f"`{s['name']}` (id {s['id']}, {s['created']})" for s in d.studies) or "none"
    kinds: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for t in d.trials:
        kinds[t.kind] = kinds.get(t.kind, 0) + 1
        statuses[t.status] = statuses.get(t.status, 0) + 1
    lines = [f"Database `{d.store.path}`; studies: {studies}.",
             "Trials: " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + "; status: "
             + ", ".join(f"{n} {s}" for s, n in statuses.items()) + ".",
             ("Intervals are 95% percentile-bootstrap intervals over facts (n = facts; under protocol `single` each "
             f"fact's value is averaged over the per-fact models first), {d.n_boot} resamples, seed {d.seed}.")]
    if d.vary:
        vals = []
        for a in sorted(d.vary):
            vs = sorted({json.dumps(t.axes.get(a)) for t in d.trials if t.axes.get(a) is not None})
            vals.append(f"{a} ∈ {{{', '.join(v.strip(chr(34)) for v in vs)}}}")
        lines.append("Varying axes: " + "; ".join(vals) + ".")
    rows = []
    for t in d.trials:
        units = f"{t.done_units}/{t.n_units if t.n_units is not None else '?'}"
        blocks = sorted({x for bl in d.unit_info(t, "blocks") for x in bl or []})
        rows.append([t.label, t.kind, t.short, t.status, units, t.protocol or "—",
                     _ranges(t.edited_layers) if t.has_edit or t.has_ft else "—",
                     _ranges(blocks) if t.has_ft else "—",
                     str(t.dropped) if t.has_edit else "—"])
    sec.tables.append(Table(["trial", "kind", "key", "status", "units done", "protocol", "edited blocks",
                             "FT blocks", "unverified edits"], rows, "Trials in plan order."))
    failed = [(t, u) for t in d.trials for u in t.units if u["status"] == "failed"]
    if failed:
        sec.tables.append(Table(["trial", "unit", "error"], [[t.label, u["unit_id"] or "(whole)", u["error"] or ""]
                                                               for t, u in failed[:50]], "Failed units."))
    sec.markdown = "\n\n".join(lines)
    return sec


def summary_rows(d: StudyData) -> list[dict[str, str]]:
    """Headline rows: per trial, edited retention before → after FT, intrinsic
    retention, ES before → after (percent), the stopping rule that fired."""
    out = []
    for t in d.trials:
        if t.has_edit:
            ed = _arrow(_edit_rate(d, t, "edited"), _edit_rate(d, t, "finetuned") if t.has_ft else None)
            es = _arrow(_edit_rate(d, t, "edited", "es"), _edit_rate(d, t, "finetuned", "es") if t.has_ft else None,
                        pct=True)
        else:
            ed = es = "—"
        before = "edited" if t.has_edit else "base"
        intr = _arrow(d.intrinsic(t, before), d.intrinsic(t, "finetuned") if t.has_ft else None)
        out.append({"trial": t.label, "kind": t.kind, "key": t.short, "status": t.status,
                    "n_edits": str(t.n_edits) if t.has_edit else "0", "edited_retention": ed,
                    "intrinsic_retention": intr, "es": es, "stop_reason": d.stop_summary(t)})
    return out


@section("summary", "Headline: retention before → after fine-tuning", "seed 000 Fig. 2 / seed 001 T1")
def headline(d: StudyData) -> Section:
    """Shows per trial edited retention after editing → after fine-tuning, intrinsic retention (from the base model
    for zero-edit trials), ES in percent and the stopping rule that fired (:func:`summary_rows`); from the per-fact
    ``retained``/``es`` rows of the edit and intrinsic sets at stages ``edited`` (``base``) and ``finetuned`` of
    every trial."""
    sec = Section(*meta(headline), "Edited retention = share of edited facts whose first non-stop token is the "
                  "new target; intrinsic retention = share of intrinsic facts still answered with the true target. "
                  "Before = after editing (the base model for zero-edit trials), after = after fine-tuning.")
    rows = summary_rows(d)
    if not rows:
        sec.missing = "no trials (see the overview)"
        return sec
    sec.tables.append(Table(["trial", "kind", "edits", "edited retention", "intrinsic retention", "ES (%)", "stop"],
                            [[r["trial"], r["kind"], r["n_edits"], r["edited_retention"], r["intrinsic_retention"],
                              r["es"], r["stop_reason"]] for r in rows]))
    return sec


@section("retention_curves", "Retention during fine-tuning: edited vs intrinsic", "seed 000 Fig. 2 (over steps)")
def retention_curves(d: StudyData) -> Section:
    """Shows edited vs intrinsic retention at every probe during fine-tuning, one panel per trial (the zero-edit
    model with the same fine-tuning dashed), and a table of the first and last probe and the final value; from the
    ``retained`` fact rows at stages ``step:N`` of edit+ft trials (of zero-edit trials' intrinsic probes when no
    edit+ft trial was probed)."""
    sid, title, src = meta(retention_curves)
    cands = [t for t in d.of_kind("edit+ft") if d.probe_steps(t.key)]
    if not cands:
        cands = [t for t in d.of_kind("zero-edit") if d.probe_steps(t.key, "intrinsic")]
    if not cands:
        return _no_data(sid, title, src, "needs fine-tuned trials (ft_method ∈ {lora, dora, full}) with fact probes "
                        "during training (probes.every or probes.every_epochs)")
    panels, rows = [], []
    for t in cands[:MAX_PANELS]:
        lines = []
        for fact_set, label, style in (("edit", "edited facts (new target)", "-"),
                                       ("intrinsic", "intrinsic facts (true target)", "-")):
            steps = _steps_subset(d.probe_steps(t.key, fact_set))
            if not steps:
                continue
            ivs = [d.rate(t.key, fact_set, "retained", f"step:{s}") for s in steps]
            lines.append(F.Line(f"{label} n={ivs[-1].n}", steps, [i.estimate for i in ivs], [i.low for i in ivs],
                                [i.high for i in ivs], style))
            first, last = ivs[0], ivs[-1]
            rows.append([t.label, "edited" if fact_set == "edit" else "intrinsic", f"{steps[0]}", fmt(first),
                         f"{steps[-1]}", fmt(last), fmt(d.rate(t.key, fact_set, "retained", "finetuned"))])
        z = d.zero_edit_for(t) if t.has_edit else None
        if z is not None:
            steps = _steps_subset(d.probe_steps(z.key, "intrinsic"))
            ivs = [d.rate(z.key, "intrinsic", "retained", f"step:{s}", t.dataset) for s in steps]
            if steps and ivs[-1].n:
                lines.append(F.Line(f"intrinsic, no edit n={ivs[-1].n}", steps, [i.estimate for i in ivs],
                                    None, None, "--", "grey", None))
        panels.append(F.Panel(t.label, lines, "optimiser step", "retention", (-0.03, 1.03)))
    sec = Section(sid, title, src, "Share of facts retained at each probe during fine-tuning; bands are 95% "
                  "bootstrap intervals over facts; the dashed grey line is the zero-edit model with the same "
                  "fine-tuning." + (f" First {MAX_PANELS} of {len(cands)} trials shown." if len(cands) > MAX_PANELS else ""))
    sec.figures.append(Figure(sid, F.line_panels(panels), "Retention over fine-tuning steps."))
    sec.tables.append(Table(["trial", "facts", "first probe step", "retention", "last probe step", "retention",
                             "after FT (final)"], rows))
    return sec


# --- seed 000 -------------------------------------------------------------------------------
@section("retention_after_edit_and_ft", "Retention after editing and after fine-tuning (editor × task)", "seed 000 Fig. 2")
def s000_fig2(d: StudyData) -> Section:
    """Shows edited and intrinsic retention after editing and after fine-tuning all blocks per trial (editor ×
    task), as a bar chart with 95% intervals and a table; from the ``retained`` rows at stages ``edited`` and
    ``finetuned`` of the edit+ft trials with layer policy ``all``, and the ``base``/``finetuned`` intrinsic rows of
    the zero-edit trials with policy ``all`` (one row per dataset)."""
    sid, title, src = meta(s000_fig2)
    eft = _prefer(d.of_kind("edit+ft"))
    trials = [t for t in eft if t.policy == "all"]
    zero = [z for z in d.of_kind("zero-edit") if z.policy == "all"]
    if not trials and not zero:
        why = (" (the study's fine-tuned trials use layer policies "
               + ", ".join(sorted({str(t.policy) for t in eft})) + ")") if eft else ""
        return _no_data(sid, title, src, "needs edit+ft trials with layer_policy all (axes editor ∈ {ft, rome, malmen}, "
                        "task, ft_method ≠ none) and the zero-edit baseline (editor none)" + why)
    rows, groups, series = [], [], {k: [] for k in ("edited · after edit", "edited · after FT",
                                                    "intrinsic · after edit", "intrinsic · after FT")}
    for t in sorted(trials, key=lambda t: (str(t.task), t.editor, t.model, str(t.dataset), t.n_edits)):
        e0, e1 = _edit_rate(d, t, "edited"), _edit_rate(d, t, "finetuned")
        i0, i1 = d.intrinsic(t, "edited"), d.intrinsic(t, "finetuned")
        rows.append([t.label, t.editor, str(t.task), fmt(e0), fmt(e1), fmt(i0), fmt(i1)])
        groups.append(t.label)
        for k, iv in zip(series, (e0, e1, i0, i1)):
            series[k].append(_triple(iv))
    for z in zero:
        for ds in z.datasets or [None]:
            i0, i1 = d.intrinsic(z, "base", ds), d.intrinsic(z, "finetuned", ds)
            lab = z.label + (f" [{ds}]" if ds and len(z.datasets) > 1 else "")
            rows.append([lab, "none", str(z.task), "—", "—", fmt(i0) + " (base)", fmt(i1)])
            groups.append(lab)
            for k, iv in zip(series, (None, None, i0, i1)):
                series[k].append(None if iv is None else _triple(iv))
    sec = Section(sid, title, src, "Retention of the edited facts (new target) and of the intrinsic facts (true "
                  "target), after editing and after fine-tuning all blocks (layer policy `all`). The zero-edit rows "
                  "show the unedited model before and after the same fine-tuning.")
    sec.tables.append(Table(["trial", "editor", "task", "edited · after edit", "edited · after FT",
                             "intrinsic · after edit", "intrinsic · after FT"], rows))
    sec.figures.append(Figure(sid, F.bar_chart(groups, list(series.items()), ylabel="retention", ylim=(0, 1.05)),
                              "Retention with 95% bootstrap intervals."))
    if not zero:
        sec.markdown += " No zero-edit baseline with policy `all` in the study (add editor `none` to the axes)."
    return sec


def _sweep(d: StudyData, sid: str, title: str, src: str, prefix: str, xlabel: str, missing: str, note: str) -> Section:
    """Retention after FT against a layer-policy parameter (threshold t / window centre c)."""
    trials = [t for t in d.of_kind("edit+ft") if _policy_num(t.policy, prefix)]
    if not trials:
        return _no_data(sid, title, src, missing)
    groups = group_by(trials, lambda t: (t.edit_key(), t.task, t.ft_method, _policy_num(t.policy, prefix)[1]))
    panels, rows = [], []
    for (ekey, task, method, w), ts in list(groups.items())[:MAX_PANELS]:
        ts = sorted(ts, key=lambda t: _policy_num(t.policy, prefix)[0])
        xs = [_policy_num(t.policy, prefix)[0] for t in ts]
        e = [_edit_rate(d, t, "finetuned") for t in ts]
        i = [d.intrinsic(t, "finetuned") for t in ts]
        name = f"{ts[0].editor} · {task} · {method}" + (f" · w={w}" if prefix == "window" else "")
        if "model" in d.vary:
            name = f"{ts[0].model_short} · " + name
        panels.append(F.Panel(name, [
            F.Line("edited", xs, [v.estimate for v in e], [v.low for v in e], [v.high for v in e]),
            F.Line("intrinsic", xs, [v.estimate for v in i], [v.low for v in i], [v.high for v in i], "--")],
            xlabel, "retention after FT", (-0.03, 1.03),
            spans=[(min(ts[0].edited_layers) - 0.5, max(ts[0].edited_layers) + 0.5, "edited blocks")]
            if ts[0].edited_layers else []))
        for t, x, ev, iv in zip(ts, xs, e, i):
            rows.append([name, str(x), t.policy or "", fmt(_edit_rate(d, t, "edited")), fmt(ev), fmt(iv)])
    sec = Section(sid, title, src, note)
    sec.figures.append(Figure(sid, F.line_panels(panels), title))
    sec.tables.append(Table(["configuration", xlabel, "policy", "edited · after edit", "edited · after FT",
                             "intrinsic · after FT"], rows))
    if all(len(v) < 2 for v in groups.values()):
        sec.markdown += " Only one value per configuration: add more values to the layer_policy axis for a curve."
    return sec


@section("retention_vs_layer_threshold", "Fine-tuning only blocks ≥ t", "seed 000 Fig. 3a")
def s000_fig3a(d: StudyData) -> Section:
    """Shows edited and intrinsic retention after fine-tuning only the blocks ≥ t, against t, one panel per edit ×
    task × FT method (the edited blocks shaded), and a table; from the ``retained`` rows at stages ``edited`` and
    ``finetuned`` of the edit+ft trials whose layer policy is ``threshold:t``."""
    return _sweep(d, *meta(s000_fig3a), "threshold", "threshold t",
                  "needs layer_policy ∈ {threshold:t} (e.g. threshold:10, threshold:20, threshold:30, threshold:40) on "
                  "edit+ft trials with editors rome/ft edited at layer 1 (edit_layers: 1) — seed 000 Fig. 3a",
                  "Retention after fine-tuning only the blocks ≥ t (embeddings, final norm and head frozen); the shaded "
                  "band marks the edited blocks. Freezing the edited layers should raise edited retention.")


@section("retention_vs_layer_window", "Fine-tuning a window of blocks", "seed 000 Fig. 3b")
def s000_fig3b(d: StudyData) -> Section:
    """Shows edited and intrinsic retention after fine-tuning a window of w blocks centred at c, against c, one
    panel per edit × task × FT method × w (the edited blocks shaded), and a table; from the ``retained`` rows at
    stages ``edited`` and ``finetuned`` of the edit+ft trials whose layer policy is ``window:c,w``."""
    return _sweep(d, *meta(s000_fig3b), "window", "window centre c",
                  "needs layer_policy ∈ {window:c,5} with several centres c on edit+ft trials with editors rome/ft "
                  "edited at layer 10 (edit_layers: 10) — seed 000 Fig. 3b",
                  "Retention after fine-tuning a window of w blocks centred at c; the shaded band marks the edited "
                  "blocks.")


_CATS = ("edited", "true", "related", "other")
_CAT_COLORS = MappingProxyType({"edited": "C0", "true": "C1", "related": "C2", "other": "C3"})


@section("token_category_mass", "Token-category mass during fine-tuning", "seed 000 Fig. 4")
def s000_fig4(d: StudyData) -> Section:
    """Shows the probability mass on the edited target, the true target, related and other tokens over the
    fine-tuning steps, for the edited and the intrinsic facts of up to four trials (ROME on unstructured first),
    and a table of the first and last step; from the ``mass_{edited,intrinsic}_{category}`` curves of edit+ft
    trials probed with token categories (bands over the units under protocol single)."""
    sid, title, src = meta(s000_fig4)
    cands = [t for t in _prefer(d.of_kind("edit+ft"), "rome", "unstructured") if "mass_edited_edited" in d.curve_names(t.key)]
    if not cands:
        return _no_data(sid, title, src, "needs edit+ft trials with token-category probes (probes.token_categories: "
                        "true and probes.every; seed 000 Fig. 4 uses editor rome, task unstructured)")
    cands = cands[:4]
    panels, rows = [], []
    banded = False
    for t in cands:
        per_unit = t.n_units is not None and t.n_units > 1
        for side, cats in (("edited", _CATS), ("intrinsic", _CATS[1:])):
            lines = []
            for cat in cats:
                curve = d.curve(t.key, f"mass_{side}_{cat}")
                if not curve:
                    continue
                steps = sorted(curve)
                ivs = [_units_ci(d, curve[s]) for s in steps]
                banded |= per_unit
                lines.append(F.Line(cat, steps, [i.estimate for i in ivs], [i.low for i in ivs] if per_unit else None,
                                    [i.high for i in ivs] if per_unit else None, color=_CAT_COLORS[cat]))
                rows.append([t.label, f"{side} facts", cat, str(steps[0]), fmt(ivs[0], digits=3, n=False),
                             str(steps[-1]), fmt(ivs[-1], digits=3, n=False)])
            if side == "edited":
                n_facts = t.n_units if per_unit else int((d.unit_info(t, "n_edit") or [0])[0])
            else:
                n_facts = sum((d.unit_info(t, "n_intrinsic") or [{}])[0].values())
            panels.append(F.Panel(f"{t.label}: {side} facts (n={n_facts})", lines, "optimiser step",
                                  "probability mass", (0, 1.02)))
    note = ("Mean probability mass at the first non-stop position over non-stop tokens, split into the edited "
            "target, the true target, related terms (objects of the same relation) and other tokens.")
    note += (" Bands: 95% bootstrap over the per-fact models (protocol single)." if banded else
             " The store keeps the mean over facts per probe (batch protocols), so no interval is drawn.")
    sec = Section(sid, title, src, note)
    sec.figures.append(Figure(sid, F.line_panels(panels), "Token-category mass vs step."))
    sec.tables.append(Table(["trial", "facts", "category", "first step", "mass", "last step", "mass"], rows))
    return sec


def _top_cells(raw: str | None) -> list[str]:
    try:
        toks = json.loads(raw or "[]")
    except json.JSONDecodeError:
        return ["?"] * 3
    cells = [f"{tok!r} ({p:.3f})" for tok, p in toks[:3]]
    return cells + [""] * (3 - len(cells))


@section("top_tokens_during_ft", "Top-3 tokens of an edited fact during fine-tuning", "seed 000 Table 1")
def s000_table1(d: StudyData) -> Section:
    """Shows, for the first probed fact of up to three edit+ft trials (one per editor, ROME on unstructured first),
    the greedy first non-stop output of the original, edited and fine-tuned model and the top-3 next tokens at each
    probe during fine-tuning; from the ``top_k`` fact rows at stages ``step:N`` and the outputs of the ``retained``
    rows at stages ``base``, ``edited`` and ``finetuned``."""
    sid, title, src = meta(s000_table1)
    cands = [t for t in _prefer(d.of_kind("edit+ft"), "rome", "unstructured")
             if any(s.startswith("step:") for s in d.stages(t.key, "edit", "top_k"))]
    if not cands:
        return _no_data(sid, title, src, "needs an edit+ft trial with top-k probes (probes.top_k > 0 and probes.every; "
                        "seed 000 Table 1: editor rome, task unstructured)")
    seen_editors: set[str] = set()
    sec = Section(sid, title, src, "Greedy first non-stop output of the original and edited model, then the top-3 "
                  "raw next tokens (probabilities) at each probe during fine-tuning, for the first probed fact.")
    for t in cands:
        if t.editor in seen_editors or len(seen_editors) >= 3:
            continue
        seen_editors.add(t.editor)
        steps = d.probe_steps(t.key, "edit", "top_k")
        facts = list(d.outputs(t.key, "edit", "top_k", f"step:{steps[0]}"))
        fid = facts[0]
        rows = [["original", d.outputs(t.key, "edit", "retained", "base").get(fid) or "—", "", "", ""],
                ["post-edit", d.outputs(t.key, "edit", "retained", "edited").get(fid) or "—", "", "", ""]]
        for s in steps:
            rows.append([f"step {s}", "", *_top_cells(d.outputs(t.key, "edit", "top_k", f"step:{s}").get(fid))])
        rows.append(["after FT", d.outputs(t.key, "edit", "retained", "finetuned").get(fid) or "—", "", "", ""])
        sec.tables.append(Table(["stage", "greedy first non-stop", "top-1", "top-2", "top-3"], rows,
                                f"{t.label}: fact `{fid}`"))
    return sec


@section("retention_after_sft", "Retention after instruction tuning (SFT)", "seed 000 Table 4")
def s000_table4(d: StudyData) -> Section:
    """Shows edited and intrinsic retention after supervised fine-tuning, one row per trial; from the ``finetuned``
    ``retained`` rows of the edit+ft and zero-edit trials with task ``sft``."""
    sid, title, src = meta(s000_table4)
    trials = [t for t in d.of_kind("edit+ft", "zero-edit") if t.task == "sft"]
    if not [t for t in trials if t.has_edit]:
        return _no_data(sid, title, src, "needs task sft edit+ft trials (seed 000 Table 4: model Llama3-8B, editors "
                        "rome/ft/malmen, ft_method full, layer_policy all)")
    rows = []
    for t in _sorted_edit(trials):
        rows.append([t.label, t.editor, fmt(_edit_rate(d, t, "finetuned")) if t.has_edit else "—",
                     fmt(d.intrinsic(t, "finetuned"))])
    sec = Section(sid, title, src, "Retention after supervised fine-tuning; the reference card's values for "
                  "Llama3-8B are compared in the reproduction check.")
    sec.tables.append(Table(["trial", "editor", "edited retention", "intrinsic retention"], rows))
    return sec


@section("retention_vs_edit_layer", "Retention vs edit layer", "seed 000 Fig. 5")
def s000_fig5(d: StudyData) -> Section:
    """Shows edited and intrinsic retention after fine-tuning against the first edited block, one panel per
    configuration that differs only in ``edit_layers``, and a table; from the ``finetuned`` ``retained`` rows of
    the edit+ft trials (task sft first) whose ``edit_layers`` axis takes at least two values."""
    sid, title, src = meta(s000_fig5)

    def key(t: TrialInfo) -> tuple:
        return (t.model, t.dataset, t.editor, t.n_edits, t.protocol, t.seed, t.task, t.ft_method, t.policy)

    groups = {k: ts for k, ts in group_by(_prefer(d.of_kind("edit+ft"), task="sft"), key).items()
              if len({t.edit_layers for t in ts}) > 1}
    if not groups:
        return _no_data(sid, title, src, "needs an edit_layers axis with ≥ 2 values (e.g. edit_layers: [1, 6, 12, 24, 36]) "
                        "on edit+ft trials (seed 000 Fig. 5: editors rome/ft, task sft)")
    panels, rows = [], []
    for k, ts in list(groups.items())[:MAX_PANELS]:
        ts = sorted(ts, key=lambda t: (t.edited_layers or [0])[0])
        xs = [(t.edited_layers or [0])[0] for t in ts]
        e = [_edit_rate(d, t, "finetuned") for t in ts]
        i = [d.intrinsic(t, "finetuned") for t in ts]
        name = f"{ts[0].editor} · {ts[0].task} · {ts[0].ft_method}/{ts[0].policy}"
        panels.append(F.Panel(name, [
            F.Line("edited", xs, [v.estimate for v in e], [v.low for v in e], [v.high for v in e]),
            F.Line("intrinsic", xs, [v.estimate for v in i], [v.low for v in i], [v.high for v in i], "--")],
            "edit layer (first edited block)", "retention after FT", (-0.03, 1.03)))
        for t, ev, iv in zip(ts, e, i):
            rows.append([name, t.edit_layers, ",".join(map(str, t.edited_layers)) or "—", fmt(ev), fmt(iv)])
    sec = Section(sid, title, src, "Retention after fine-tuning as a function of the layer the edit was applied to.")
    sec.figures.append(Figure(sid, F.line_panels(panels), title))
    sec.tables.append(Table(["configuration", "edit_layers", "edited blocks", "edited · after FT",
                             "intrinsic · after FT"], rows))
    return sec


def selection_stats(d: StudyData, model_patterns: Sequence[str] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, dataset) → selection summary: fact counts, filter settings, base
    retention and, where the store has them, mean p(true)/p(second) of each set."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for t in d.trials:
        if model_patterns is not None and not name_matches(t.model, model_patterns):
            continue
        for ds in t.datasets:
            s = out.setdefault((t.model, ds), {"sel": (t.config.get("data") or {}).get("selection") or {},
                                               "edit": None, "intrinsic": None, "edit_trial": None,
                                               "intr_trial": None, "p": {}})
            if t.has_edit and (s["edit_trial"] is None or t.n_edits > s["edit_trial"].n_edits):
                s["edit_trial"] = t
            if s["intr_trial"] is None and d.has(t.key, "intrinsic", "retained", "base"):
                s["intr_trial"] = t
            for fs in ("edit", "intrinsic"):
                for m in ("p_true", "p_second"):
                    vals = d.facts(t.key, fs, m, "base", ds)
                    if vals and (fs, m) not in s["p"]:
                        s["p"][(fs, m)] = mean_ci(list(vals.values()), n_boot=d.n_boot, seed=d.seed)
            for info in d.unit_info(t, "selection"):  # Selection.stats, if the runner recorded it
                for fs in ("edit", "intrinsic"):
                    part = (info or {}).get(fs) or {}
                    for m in ("p_true", "p_second"):
                        v = part.get(f"mean_{m}")
                        if v is not None and (fs, m) not in s["p"]:
                            s["p"][(fs, m)] = Interval(float(v), math.nan, math.nan, int(part.get("n") or 0))
    return out


@section("fact_selection", "Fact selection (confidence filter)", "seed 000 Table 3 (selection)")
def s000_table3(d: StudyData) -> Section:
    """Shows the fact selection per model and dataset (:func:`selection_stats`): the confidence filter and its
    margin/mode, the sizes of the edit and intrinsic sets, their base retention and mean p(true)/p(second); from
    every trial's selection settings, its ``base`` rows (``retained_true`` of the edit set, ``retained`` of the
    intrinsic set, ``p_true``/``p_second``) or its units' ``selection`` info."""
    sid, title, src = meta(s000_table3)
    stats = selection_stats(d)
    if not stats:
        return _no_data(sid, title, src, "needs edited trials (editor ≠ none) or a zero-edit baseline: the selection "
                        "follows the dataset axis and selection.{n_edit, n_intrinsic, margin, mode, filter}")
    rows, missing_p = [], False
    for (model, ds), s in stats.items():
        sel = s["sel"]
        et, it = s["edit_trial"], s["intr_trial"]
        e_base = d.rate(et.key, "edit", "retained_true", "base") if et else NAN_INTERVAL
        i_base = d.intrinsic(it, "base", ds) if it else NAN_INTERVAL
        p = s["p"]
        cells = []
        for fs in ("edit", "intrinsic"):
            pt, p2 = p.get((fs, "p_true")), p.get((fs, "p_second"))
            if pt is None:
                missing_p = True
            cells.append("—" if pt is None else f"{fmt(pt, digits=3)} / {fmt(p2, digits=3, n=False)}")
        rows.append([Path(model).name, ds, "on" if sel.get("filter", True) else "off",
                     f"{sel.get('margin')} / {sel.get('mode')}", str(e_base.n), str(i_base.n),
                     fmt(e_base), fmt(i_base), *cells])
    sec = Section(sid, title, src, "Edit and intrinsic sets per model and dataset. With the confidence filter on, "
                  "every selected fact is retained by the base model (retention 1.0 by construction).")
    sec.tables.append(Table(["model", "dataset", "filter", "margin / mode", "edit facts", "intrinsic facts",
                             "edit set: base retention (true)", "intrinsic: base retention",
                             "edit: mean p(true) / p(second)", "intrinsic: mean p(true) / p(second)"], rows))
    if missing_p:
        sec.markdown += (" Mean p(true)/p(second) need per-fact `p_true`/`p_second` rows at stage `base` or the "
                         "selection statistics in the units' info (`selection`), which this store does not hold.")
    return sec


# --- seed 001 -------------------------------------------------------------------------------------
@section("edit_metrics_before_after_ft", "ES, PS, NS before and after fine-tuning", "seed 001 T1")
def s001_t1(d: StudyData) -> Section:
    """Shows ES, PS and NS in percent after editing and after fine-tuning per trial, with the NS of the same facts
    on the base model and the NS drop caused by the edit (paired bootstrap); from the ``es``/``ps``/``ns`` edit-set
    rows at stages ``base``, ``edited`` and ``finetuned`` of the edit-only and edit+ft trials."""
    sid, title, src = meta(s001_t1)
    trials = _sorted_edit(d.of_kind("edit-only", "edit+ft"))
    if not trials:
        return _no_data(sid, title, src, "needs edited trials: editor ∈ {memit, alphaedit, …}, n_edits > 0, "
                        "dataset ∈ {zsre, counterfact}, ft_method ∈ {none, lora, dora, full}")
    rows = []
    for t in trials:
        cells = []
        for m in ("es", "ps", "ns"):
            cells += [fmt_pct(_edit_rate(d, t, "edited", m), n=False),
                      fmt_pct(_edit_rate(d, t, "finetuned", m), n=False) if t.has_ft else "—"]
        ns_drop = d.paired_stat(t.key, "ns", drop, "base", "edited")
        rows.append([t.label, _ft_label(t), *cells, fmt_pct(_edit_rate(d, t, "base", "ns"), n=False),
                     fmt(ns_drop, scale=100, digits=1, n=False), str(_edit_rate(d, t, "edited", "es").n)])
    sec = Section(sid, title, src, "Efficacy (ES), paraphrase (PS) and neighbourhood (NS) success in percent after "
                  "editing and after fine-tuning, 95% bootstrap intervals over facts (n = edited facts). zsRE: token "
                  "accuracy; CounterFact: P(new) > P(true). NS unedited is the same facts' NS on the base model and "
                  "NS drop = unedited − edited (points, paired bootstrap): the edit's collateral damage, which a high "
                  "ES does not show.")
    sec.tables.append(Table(["trial", "fine-tuning", "ES edited", "ES after FT", "PS edited", "PS after FT",
                             "NS edited", "NS after FT", "NS unedited", "NS drop (edit)", "n"], rows))
    return sec


@section("es_before_after_ft", "ES before and after fine-tuning", "seed 001 Fig. 2")
def s001_fig2(d: StudyData) -> Section:
    """Shows ES after editing and after fine-tuning per edit+ft trial as a bar chart with 95% intervals; from the
    ``es`` edit-set rows at stages ``edited`` and ``finetuned``."""
    sid, title, src = meta(s001_fig2)
    trials = _sorted_edit(d.of_kind("edit+ft"))
    if not trials:
        return _no_data(sid, title, src, "needs edit+ft trials: editor ∈ {memit, alphaedit}, n_edits > 0 and "
                        "ft_method ∈ {lora, dora, full}")
    groups = [t.label for t in trials]
    series = [("ES edited", [_triple(_edit_rate(d, t, "edited", "es"), 100) for t in trials]),
              ("ES after FT", [_triple(_edit_rate(d, t, "finetuned", "es"), 100) for t in trials])]
    sec = Section(sid, title, src, "Edit success before and after fine-tuning (95% bootstrap intervals).")
    sec.figures.append(Figure(sid, F.bar_chart(groups, series, ylabel="ES (%)", ylim=(0, 105)), title))
    return sec


@section("decrease_rates", "Decrease rates", "seed 001 T2")
def s001_t2(d: StudyData) -> Section:
    """Shows the decrease rate (E_ed − E_ed_ft)/E_ed of ES and PS per edit+ft trial (paired bootstrap over facts),
    then mean ± std of the ES decrease rate over configurations per model and overall; from the ``es``/``ps``
    edit-set rows at stages ``edited`` and ``finetuned``."""
    sid, title, src = meta(s001_t2)
    trials = _sorted_edit(d.of_kind("edit+ft"))
    if not trials:
        return _no_data(sid, title, src, "needs edit+ft trials (editor ≠ none, ft_method ≠ none)")
    rows, per_model = [], {}
    for t in trials:
        es, ps = (d.paired_stat(t.key, m, decrease) for m in ("es", "ps"))
        rows.append([t.label, fmt(es, digits=3), fmt(ps, digits=3)])
        per_model.setdefault(t.model_short, []).append(es.estimate)
    agg = []
    for model, vals in per_model.items():
        m, sd, n = mean_std(vals)
        agg.append([model, f"{m:.3f} ± {sd:.3f}" if n else "—", str(n)])
    m, sd, n = mean_std([v for vs in per_model.values() for v in vs])
    agg.append(["all", f"{m:.3f} ± {sd:.3f}" if n else "—", str(n)])
    sec = Section(sid, title, src, "Decrease rate (E_ed − E_ed_ft)/E_ed of ES and PS with paired bootstrap "
                  "intervals over facts; then mean ± std of the ES decrease rate over configurations per model.")
    sec.tables.append(Table(["trial", "ES decrease rate", "PS decrease rate"], rows))
    sec.tables.append(Table(["model", "mean ± std (ES)", "configurations"], agg, "Per-model means."))
    return sec


def _delta_efr_rows(d: StudyData, trials: Sequence[TrialInfo]) -> list[list[str]]:
    rows = []
    for t in trials:
        dl = d.paired_stat(t.key, "es", delta_points)
        _, a, b = d.paired(t.key, "edit", "success", "edited", "finetuned")
        a, b = _bool_list(a), _bool_list(b)
        r, em = efr(a, b), emergence(a, b)
        rows.append([t.label, fmt(dl, digits=1), fmt(_rate_iv(d, r.numerator, r.denominator)) if r.denominator else "—",
                     fmt(_rate_iv(d, em.numerator, em.denominator)) if em.denominator else "—"])
    return rows


@section("es_drop_and_forgetting_rate", "ΔES and edit forgetting rate", "seed 001 T3")
def s001_t3(d: StudyData) -> Section:
    """Shows ΔES in points, the edit forgetting rate EFR = Pr(fail after FT | edit succeeded) and emergence =
    Pr(success after FT | edit failed) per edit+ft trial; from the ``es`` and ``success`` edit-set rows at stages
    ``edited`` and ``finetuned``."""
    sid, title, src = meta(s001_t3)
    trials = _sorted_edit(d.of_kind("edit+ft"))
    if not trials:
        return _no_data(sid, title, src, "needs edit+ft trials (editor ≠ none, ft_method ≠ none)")
    sec = Section(sid, title, src, "ΔES = ES_edited − ES_after_FT in points (paired bootstrap over facts); EFR = "
                  "Pr(fail after FT | edit succeeded), n = facts whose edit succeeded; emergence = Pr(success after "
                  "FT | edit failed), n = facts whose edit failed. Success = every target token is the argmax.")
    sec.tables.append(Table(["trial", "ΔES (points)", "EFR", "emergence"], _delta_efr_rows(d, trials)))
    return sec


@section("fact_transitions", "Transitions of edited facts (with examples)", "seed 001 T4")
def s001_t4(d: StudyData) -> Section:
    """Shows how many edited facts are stable, erased, emergent or impossible from the edited to the fine-tuned
    model per edit+ft trial (count and share with its interval), and up to three examples per class with the
    base/edited/fine-tuned outputs for the first trials; from the trials' transition rows."""
    sid, title, src = meta(s001_t4)
    trials = [t for t in _sorted_edit(d.of_kind("edit+ft")) if d.transitions(t.key)]
    if not trials:
        return _no_data(sid, title, src, "needs edit+ft trials (editor ≠ none, ft_method ≠ none): each writes one "
                        "transition per edited fact")
    classes = ("stable", "erased", "emergent", "impossible")
    rows, examples = [], []
    for t in trials:
        tr = d.transitions(t.key)
        labels = [r["transition"] for r in tr]
        cells = []
        for c in classes:
            k = sum(x == c for x in labels)
            iv = mean_ci([float(x == c) for x in labels], n_boot=d.n_boot, seed=d.seed)
            cells.append(f"{k} ({fmt(iv, n=False)})")
        rows.append([t.label, *cells, str(len(labels))])
        if t in trials[:MAX_EXAMPLE_TRIALS]:
            for c in classes:
                for r in [r for r in tr if r["transition"] == c][:3]:
                    examples.append([t.label, c, f"{r['dataset']}/{r['case_id']}" if r["dataset"] else r["case_id"],
                                     repr(r["base_output"] or ""), repr(r["edited_output"] or ""),
                                     repr(r["finetuned_output"] or "")])
    sec = Section(sid, title, src, "Stable (success → success), erased (success → fail), emergent (fail → success), "
                  "impossible (fail → fail) from the edited to the fine-tuned model; counts with the share and its "
                  "95% bootstrap interval; examples show the greedy first non-stop output of each stage.")
    sec.tables.append(Table(["trial", *classes, "n"], rows))
    if examples:
        sec.tables.append(Table(["trial", "transition", "fact", "base", "edited", "fine-tuned"], examples,
                                f"Up to 3 examples per class (first {MAX_EXAMPLE_TRIALS} trials)."))
    return sec


_POLICIES = ("all", "edited", "non-edited")


@section("selective_block_ft", "Selective fine-tuning of edited / non-edited blocks", "seed 001 T5")
def s001_t5(d: StudyData) -> Section:
    """Shows ES/PS/NS in percent and mean downstream accuracy of the base model, the edited model and fine-tuning
    all / only the edited / only the non-edited blocks, one table per edit × task × FT method; from the
    ``es``/``ps``/``ns`` rows (stages ``base``, ``edited``, ``finetuned``) of the edit+ft trials with layer
    policies ``all``, ``edited`` and ``non-edited``, and the downstream rows of those trials, of the matching
    edit-only trial and of the base model."""
    sid, title, src = meta(s001_t5)
    groups = {k: ts for k, ts in group_by([t for t in d.of_kind("edit+ft") if t.policy in _POLICIES],
                                           lambda t: (t.edit_key(), t.task, t.ft_method)).items()
              if {t.policy for t in ts} & {"edited", "non-edited"}}
    if not groups:
        return _no_data(sid, title, src, "needs layer_policy ∈ {all, edited, non-edited} on edit+ft trials (seed 001 "
                        "T5: MEMIT/AlphaEdit with n_edits 100 and 1000)")
    sec = Section(sid, title, src, "Columns: the base model, the edited model, then fine-tuning all blocks, only the "
                  "edited blocks or only the other blocks. Rows: ES/PS/NS (%) and mean downstream accuracy (%).")
    for (ekey, task, method), ts in groups.items():
        by = {t.policy: t for t in ts}
        first = ts[0]
        eo = d.edit_only_for(first)
        base = d.base_trial(first)
        rows = []
        for m in ("es", "ps", "ns"):
            rows.append([m.upper(), fmt_pct(_edit_rate(d, first, "base", m)), fmt_pct(_edit_rate(d, first, "edited", m)),
                         *[fmt_pct(_edit_rate(d, by[p], "finetuned", m)) if p in by else "—" for p in _POLICIES]])
        acc = [fmt_pct(accuracy_ci(d.downstream(x), n_boot=d.n_boot, seed=d.seed)) if x is not None else "—"
               for x in (base, eo, *(by.get(p) for p in _POLICIES))]
        if any(a != "—" for a in acc):
            rows.append(["downstream acc.", *acc])
        caption = f"{first.editor} · {first.dataset} · n={first.n_edits} · {method} on {task}"
        if "model" in d.vary:
            caption = f"{first.model_short} · " + caption
        absent = [p for p in _POLICIES if p not in by]
        if absent:
            caption += " (missing: layer_policy " + ", ".join(absent) + ")"
        sec.tables.append(Table(["metric", "base", "edited", "ft-all", "ft-edited", "ft-non-edited"], rows, caption))
    return sec


def _downstream_trials(d: StudyData) -> list[TrialInfo]:
    return [t for t in d.trials if d.downstream(t)]


@section("downstream_accuracy", "Downstream accuracy (mean and per task)", "seed 001 T6 and per-task tables")
def s001_t6(d: StudyData) -> Section:
    """Shows each trial's mean downstream accuracy (bootstrap over items within tasks), its difference to the
    reference trial (the zero-edit model with the same fine-tuning for edit+ft, the base model otherwise) and the
    parse rate, then the accuracy per task; from the downstream rows of every trial that has them."""
    sid, title, src = meta(s001_t6)
    trials = _downstream_trials(d)
    if not trials:
        return _no_data(sid, title, src, "needs a downstream: block in the spec (tasks: all, mode gen|ll, data_dir of "
                        "the LLM-Adapters commonsense files) on the trials to compare (base, zero-edit, edit+ft)")
    rows = []
    for t in trials:
        tasks = d.downstream(t)
        iv = accuracy_ci(tasks, n_boot=d.n_boot, seed=d.seed)
        ref = d.reference_for(t)
        ref_tasks = d.downstream(ref) if ref is not None else []
        mark, ref_cell = "", "—"
        if ref_tasks:
            diff = accuracy_diff_ci(tasks, ref_tasks, n_boot=d.n_boot, seed=d.seed)  # trial − reference
            if defined(diff):
                mark = ("▼" if diff.estimate < 0 else "") + ("*" if diff.high < 0 else "")
                ref_cell = f"{ref.label}: {fmt(diff, digits=1, n=False)}"
        parse = [x.parse_rate for x in tasks if x.parse_rate is not None]
        rows.append([t.label, f"{mark} {fmt_pct(iv)}".strip(), str(len(tasks)), ref_cell,
                     f"{100 * sum(parse) / len(parse):.0f}%" if parse else "—"])
    sec = Section(sid, title, src, "Mean accuracy over the downstream tasks (unweighted) with a bootstrap interval "
                  "resampling items within tasks; n = items. Δ vs the reference (edit+ft → the zero-edit model with "
                  "the same fine-tuning; edit-only and zero-edit → the base model) in points; ▼ marks a decline, ▼* "
                  "one whose interval excludes 0.")
    sec.tables.append(Table(["trial", "mean accuracy (%)", "tasks", "Δ vs reference (points)", "parse rate"], rows))
    names = sorted({x.task for t in trials for x in d.downstream(t)})
    per_task = []
    for t in trials:
        by = {x.task: x for x in d.downstream(t)}
        per_task.append([t.label, *[fmt_pct(accuracy_ci([by[n]], n_boot=d.n_boot, seed=d.seed)) if n in by else "—"
                                    for n in names]])
    sec.tables.append(Table(["trial", *names], per_task, "Per-task accuracy (%)."))
    return sec


@section("mend_under_ft", "MEND edits under fine-tuning", "seed 001 T14")
def s001_t14(d: StudyData) -> Section:
    """Shows ES of MEND edits after editing and after fine-tuning per trial and, for the fine-tuned ones, ΔES, EFR
    and emergence; from the ``es``/``success`` edit-set rows (stages ``edited``, ``finetuned``) of the edit-only
    and edit+ft trials with editor ``mend``."""
    sid, title, src = meta(s001_t14)
    trials = _sorted_edit([t for t in d.of_kind("edit-only", "edit+ft") if t.editor == "mend"])
    if not trials:
        return _no_data(sid, title, src, "needs editor mend (seed 001 T14: n_edits ∈ {1000, 10000} × ft_method ∈ "
                        "{none, dora})")
    rows = []
    for t in trials:
        rows.append([t.label, _ft_label(t), fmt_pct(_edit_rate(d, t, "edited", "es")),
                     fmt_pct(_edit_rate(d, t, "finetuned", "es")) if t.has_ft else "—"])
    sec = Section(sid, title, src, "ES of MEND edits before and after fine-tuning.")
    sec.tables.append(Table(["trial", "fine-tuning", "ES edited", "ES after FT"], rows))
    eft = [t for t in trials if t.has_ft]
    if eft:
        sec.tables.append(Table(["trial", "ΔES (points)", "EFR", "emergence"], _delta_efr_rows(d, eft)))
    return sec


@section("hotpotqa_vs_commonsense", "HotpotQA vs Commonsense fine-tuning", "seed 001 T15")
def s001_t15(d: StudyData) -> Section:
    """Shows ES after editing, after fine-tuning on Commonsense-170k and after fine-tuning on HotpotQA, with the
    ΔES of each, for edits fine-tuned otherwise alike; from the ``es`` edit-set rows of edit+ft trials equal in
    edit, FT method and layer policy with tasks ``commonsense`` and ``hotpotqa``."""
    sid, title, src = meta(s001_t15)
    tasks = ("commonsense", "hotpotqa")
    groups = {k: ts for k, ts in group_by([t for t in d.of_kind("edit+ft") if t.task in tasks],
                                           lambda t: (t.edit_key(), t.ft_method, t.policy)).items()}
    full = {k: ts for k, ts in groups.items() if {t.task for t in ts} == set(tasks)}
    if not full:
        have = sorted({t.task for ts in groups.values() for t in ts})
        return _no_data(sid, title, src, "needs task ∈ {commonsense, hotpotqa} on otherwise equal edit+ft trials"
                        + (f" (the study has only {', '.join(have)})" if have else ""))
    rows = []
    for (ekey, method, policy), ts in full.items():
        by = {t.task: t for t in ts}
        c, h = by["commonsense"], by["hotpotqa"]
        rows.append([f"{c.editor} · {c.dataset} · n={c.n_edits} · {method}/{policy}",
                     fmt_pct(_edit_rate(d, c, "edited", "es")),
                     fmt_pct(_edit_rate(d, c, "finetuned", "es")), fmt(d.paired_stat(c.key, "es", delta_points), digits=1),
                     fmt_pct(_edit_rate(d, h, "finetuned", "es")), fmt(d.paired_stat(h.key, "es", delta_points), digits=1)])
    sec = Section(sid, title, src, "ES after fine-tuning on Commonsense-170k vs HotpotQA with the same settings.")
    sec.tables.append(Table(["configuration", "ES edited", "ES after FT (commonsense)", "ΔES (commonsense)",
                             "ES after FT (hotpotqa)", "ΔES (hotpotqa)"], rows))
    return sec


@section("downstream_degradation", "Downstream degradation (mean ± std)", "seed 001 T20")
def s001_t20(d: StudyData) -> Section:
    """Shows the downstream degradation (reference − trial mean accuracy in points, with its interval) per edited
    trial, then mean ± std over configurations per model × FT method and overall; from the downstream rows of the
    edit+ft and edit-only trials and of their reference (the zero-edit model with the same fine-tuning, or the base
    model)."""
    sid, title, src = meta(s001_t20)
    pairs = []
    for t in d.of_kind("edit+ft", "edit-only"):
        ref = d.reference_for(t)
        if ref is None:
            continue
        a, b = d.downstream(ref), d.downstream(t)
        if a and b:
            pairs.append((t, ref, accuracy_diff_ci(a, b, n_boot=d.n_boot, seed=d.seed)))
    if not pairs:
        return _no_data(sid, title, src, "needs downstream results (spec downstream: block) on edited trials and on "
                        "their reference (zero-edit with the same fine-tuning, or the base model for edit-only)")
    rows = [[t.label, ref.label, fmt(iv, digits=1)] for t, ref, iv in pairs]
    agg = []
    for k, ps in group_by(pairs, lambda p: (p[0].model_short, p[0].ft_method)).items():
        m, sd, n = mean_std([p[2].estimate for p in ps])
        agg.append([k[0], k[1], f"{m:.2f} ± {sd:.2f}", str(n)])
    m, sd, n = mean_std([p[2].estimate for p in pairs])
    agg.append(["all", "all", f"{m:.2f} ± {sd:.2f}", str(n)])
    sec = Section(sid, title, src, "Degradation = reference mean accuracy − trial mean accuracy (points; positive = "
                  "the edit costs downstream accuracy), with a bootstrap interval; then mean ± std over configurations.")
    sec.tables.append(Table(["trial", "reference", "degradation (points)"], rows))
    sec.tables.append(Table(["model", "fine-tuning", "mean ± std", "configurations"], agg))
    return sec


@section("activation_drift", "Activation drift and displacement cosines per block", "seed 001 Fig. 3")
def s001_fig3(d: StudyData) -> Section:
    """Shows the residual-stream distance at the last prompt token per block between pairs of models (raw and
    max-normalised) and the cosines between their displacements, in panels per trial (the edited blocks shaded),
    and a table of the peak block and the mean inside/outside the edited blocks; from the drift rows (``distance``
    and ``cosine``) of the trials that recorded them (edit+ft first)."""
    sid, title, src = meta(s001_fig3)
    trials = [t for t in d.trials if d.drift(t.key)]
    if not trials:
        return _no_data(sid, title, src, "needs a drift: block in the spec (prompts: edit, position: last) on edited "
                        "and/or fine-tuned trials (edit+ft gives all three distances and the cosines)")
    trials = _prefer(trials)
    shown = ([t for t in trials if t.kind == "edit+ft"][:4] + [t for t in trials if t.kind != "edit+ft"])[:6]
    panels, rows = [], []
    any_cos = False
    for t in shown:
        dr = d.drift(t.key)
        layers = t.edited_layers
        spans = [(min(layers) - 0.5, max(layers) + 0.5, "edited blocks")] if layers else []
        dist = {p: v for (m, p), v in dr.items() if m == "distance"}
        cos = {p: v for (m, p), v in dr.items() if m == "cosine"}
        raw, normed, cl = [], [], []
        for pair, blocks in dist.items():
            bs = sorted(blocks)
            ivs = [_units_ci(d, blocks[b]) for b in bs]
            ys = [i.estimate for i in ivs]
            top = max((y for y in ys if not math.isnan(y)), default=0.0) or 1.0
            band = len(t.units) > 1
            raw.append(F.Line(pair, bs, ys, [i.low for i in ivs] if band else None, [i.high for i in ivs] if band else None))
            normed.append(F.Line(pair, bs, [y / top for y in ys]))
            inside = [y for b, y in zip(bs, ys) if b in layers]
            outside = [y for b, y in zip(bs, ys) if b not in layers]
            rows.append([t.label, pair, str(bs[_argmax(ys)]) if _argmax(ys) >= 0 else "—",
                         f"{np.mean(inside):.4g}" if inside else "—", f"{np.mean(outside):.4g}" if outside else "—",
                         str(d.drift_prompts(t.key))])
        for pair, blocks in cos.items():
            bs = sorted(blocks)
            ivs = [_units_ci(d, blocks[b]) for b in bs]
            band = len(t.units) > 1
            cl.append(F.Line(pair, bs, [i.estimate for i in ivs], [i.low for i in ivs] if band else None,
                             [i.high for i in ivs] if band else None))
        any_cos |= bool(cl)
        panels += [F.Panel(f"{t.label}: ‖h_A − h_B‖", raw, "block", "distance", spans=spans),
                   F.Panel("max-normalised", normed, "block", "distance / max", (0, 1.05), spans=spans),
                   F.Panel("displacement cosines" if cl else "displacement cosines: not recorded", cl, "block",
                           "cosine", (-1.05, 1.05), spans=spans)]
    sec = Section(sid, title, src, "Mean over prompts of the residual-stream distance at the last prompt token per "
                  "block (raw and max-normalised) and the cosines between displacements; the shaded band marks the "
                  "edited blocks. Bands (protocol single): bootstrap over the per-fact models. Pairs: edited_vs_base, "
                  "finetuned_vs_base, edited_finetuned_vs_edited; cosines ed_ft (Δed, Δft), edft_ft (Δed_ft, Δft), "
                  "edft_ed (Δed_ft, Δed).")
    if not any_cos:
        sec.markdown += (" No cosine rows in the store: the cosines need the displacement of the fine-tuned unedited "
                         "model (finetuned_vs_base) and of the edit in the same unit.")
    sec.figures.append(Figure(sid, F.line_panels(panels, ncols=3, panel_size=(4.0, 2.9)), title))
    sec.tables.append(Table(["trial", "pair", "peak block", "mean in edited blocks", "mean elsewhere", "prompts"], rows))
    return sec


def _load_trace(path: Path) -> dict[str, Any] | None:
    """A trace artefact: ``FactsTrace.to_json()``, or ``editdecay trace``'s trace.json
    (which holds it under ``facts``)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("trace artefact %s unreadable: %s", path, e)
        return None
    if isinstance(doc, dict) and isinstance(doc.get("facts"), dict) and "effects" in doc["facts"]:
        return doc["facts"]
    return doc


@section("causal_tracing", "Causal tracing (restoration effect per layer)", "seed 001 Figs. 6–7")
def s001_fig67(d: StudyData) -> Section:
    """Shows the causal-tracing restoration effect per layer (overall block output, MLP, attention) with intervals
    over the traced facts, one panel per recorded trace, and the peak layer of each; from the store's artefacts of
    kind ``trace``/``tracing`` (``editdecay trace``'s trace.json or ``FactsTrace.to_json()`` files), not from trial
    rows."""
    sid, title, src = meta(s001_fig67)
    arts = d.artefacts("trace") + d.artefacts("tracing")
    base = d.store.path.parent
    docs = []
    for a in arts:
        p = Path(a["path"])
        doc = _load_trace(p if p.is_absolute() else base / p)
        if doc and ("effects" in doc or "scores" in doc):
            docs.append((a, doc))
    if not docs:
        return _no_data(sid, title, src, "no causal-tracing results in the store: tracing is not a spec axis; record "
                        "traces with `editdecay trace --db DB` (or `trace_facts(...).to_json()` files as artefacts of kind "
                        "`trace`, Store.add_artefact) to include seed 001 Figs. 6–7 (restoration effect per layer: overall, "
                        "MLP, attention)")
    panels, rows = [], []
    for a, doc in docs[:MAX_PANELS]:
        name = a["meta"].get("label") or a["meta"].get("model") or a["key"]
        lines = []
        if "effects" in doc:
            for kind, mat in doc["effects"].items():
                m = np.array([[math.nan if v is None else v for v in r] for r in mat], dtype=float)
                ivs = [mean_ci(m[:, j].tolist(), n_boot=d.n_boot, seed=d.seed) for j in range(m.shape[1])]
                xs = list(range(m.shape[1]))
                lines.append(F.Line(f"{kind} (n={m.shape[0]})", xs, [i.estimate for i in ivs], [i.low for i in ivs],
                                    [i.high for i in ivs], marker=None))
                peak = _argmax([i.estimate for i in ivs])
                rows.append([str(name), kind, str(m.shape[0]), str(peak) if peak >= 0 else "—",
                             fmt(ivs[peak], digits=3) if peak >= 0 else "—"])
        else:
            for kind, mat in doc["scores"].items():
                m = np.array([[math.nan if v is None else v for v in r] for r in mat], dtype=float)
                eff = (m - float(doc.get("corrupted_prob", 0.0))).max(axis=0, initial=-np.inf, where=~np.isnan(m))
                eff = [math.nan if not np.isfinite(v) else float(v) for v in eff]
                lines.append(F.Line(f"{kind} (max over tokens)", list(range(len(eff))), eff, marker=None))
                peak = _argmax(eff)
                rows.append([str(name), kind, "1", str(peak) if peak >= 0 else "—",
                             f"{eff[peak]:.3f}" if peak >= 0 else "—"])
        panels.append(F.Panel(str(name), lines, "layer", "restoration effect"))
    sec = Section(sid, title, src, "Average indirect effect of restoring the clean state at the subject's last token "
                  "(overall block output, MLP, attention) with 95% bootstrap intervals over traced facts.")
    sec.figures.append(Figure(sid, F.line_panels(panels), title))
    sec.tables.append(Table(["trace", "kind", "facts", "peak layer", "effect at peak"], rows))
    return sec


def ttest_groups(d: StudyData, model_patterns: Sequence[str] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Seed 001 App. J: per (model, FT method) and pooled per FT method (model ``all``),
    the paired t-test of ES edited vs ES after FT over configurations (editor ×
    dataset × n_edits; trials with other layer policies or tasks count as further
    configurations)."""
    trials = [t for t in d.of_kind("edit+ft")
              if model_patterns is None or name_matches(t.model, model_patterns)]
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key, ts in list(group_by(trials, lambda t: (t.model_short, t.ft_method)).items()) + \
            [((("all", m)), ts) for m, ts in group_by(trials, lambda t: t.ft_method).items()]:
        a = [_edit_rate(d, t, "edited", "es").estimate for t in ts]
        b = [_edit_rate(d, t, "finetuned", "es").estimate for t in ts]
        try:
            res = paired_ttest(a, b)
            out[key] = {"p": res.p_value, "t": res.statistic, "n": res.n, "mean_diff": 100 * (res.mean_diff or 0),
                        "why": "" if not math.isnan(res.p_value) else "no variance"}
        except SignificanceInputError:
            out[key] = {"p": math.nan, "t": math.nan, "n": sum(not (math.isnan(x) or math.isnan(y)) for x, y in zip(a, b)),
                        "mean_diff": math.nan, "why": "n < 2"}
    return out


@section("significance_tests", "Significance: paired t-tests and McNemar", "seed 001 Fig. 9")
def s001_fig9(d: StudyData) -> Section:
    """Shows the paired t-test of ES after editing vs after fine-tuning over configurations per model × FT method
    and pooled per FT method (:func:`ttest_groups`; table and p-value heatmap), then McNemar's test per trial on
    the facts' success after editing vs after fine-tuning; from the ``es`` and ``success`` edit-set rows at stages
    ``edited`` and ``finetuned`` of the edit+ft trials."""
    sid, title, src = meta(s001_fig9)
    eft = d.of_kind("edit+ft")
    if not eft:
        return _no_data(sid, title, src, "needs edit+ft trials; the paired t-test needs ≥ 2 configurations per model × "
                        "ft_method (vary editor, dataset or n_edits)")
    tests = ttest_groups(d)
    models = list(dict.fromkeys(k[0] for k in tests if k[0] != "all")) + ["all"]
    methods = sorted({k[1] for k in tests})
    sec = Section(sid, title, src, "Paired t-test of ES after editing vs after fine-tuning, paired by configuration "
                  "(editor × dataset × n_edits), per model × FT method and pooled per FT method (row `all`); n = "
                  "configurations. McNemar's test per trial on the facts' success after editing vs after FT "
                  "(b = 1→0, c = 0→1).")
    rows, mat, ann = [], [], []
    for m in models:
        r, a = [], []
        for meth in methods:
            x = tests.get((m, meth))
            if x is None:
                r.append(math.nan)
                a.append("")
                continue
            r.append(math.log10(x["p"]) if x["p"] and not math.isnan(x["p"]) and x["p"] > 0 else math.nan)
            a.append(f"p={fmt_p(x['p'])}\nn={x['n']}" if not math.isnan(x["p"]) else f"n={x['n']}")
            rows.append([m, meth, str(x["n"]), f"{x['mean_diff']:.1f}" if not math.isnan(x["mean_diff"]) else "—",
                         f"{x['t']:.2f}" if not math.isnan(x["t"]) else "—",
                         fmt_p(x["p"]) if not x["why"] else f"undefined ({x['why']})"])
        mat.append(r)
        ann.append(a)
    sec.tables.append(Table(["model", "FT method", "configurations", "mean ΔES (points)", "t", "p"], rows))
    if any(not math.isnan(v) for r in mat for v in r):
        sec.figures.append(Figure(sid, F.heatmap(mat, models, methods, title="paired t-test p-values",
                                                   cbar_label="log10 p", annotations=ann), "p-value heatmap."))
    elif any(x["why"] == "no variance" for x in tests.values()):
        sec.markdown += (" No p-value: ES changed by the same amount in every configuration (no variance of the "
                         "differences), so the t statistic is undefined.")
    else:
        sec.markdown += (" No model × FT method has ≥ 2 configurations with defined ES, so no t-test p-value: vary "
                         "editor, dataset or n_edits.")
    mc = []
    for t in _sorted_edit(eft):
        _, a, b = d.paired(t.key, "edit", "success", "edited", "finetuned")
        if not a:
            continue
        res = mcnemar(_bool_list(a), _bool_list(b))
        mc.append([t.label, str(res.b), str(res.c), res.method, fmt_p(res.p_value), str(res.n)])
    if mc:
        sec.tables.append(Table(["trial", "b (1→0)", "c (0→1)", "test", "p", "n"], mc, "McNemar per trial."))
    return sec


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


# --- all sections -------------------------------------------------------------------------------
# importing them registers their sections (they build on this module's objects); the names stay importable here
from .findings import budget_section, findings_section  # noqa: F401
from .preserve import preserve_section  # noqa: F401
from .reedit import reedit_section  # noqa: F401

#: ``(id, function)`` of every section registered when this module loaded, in report order
#: (kept for compatibility; the registry itself is :func:`~editdecay.report.registry.registered`).
SECTIONS: tuple[tuple[str, Callable[[StudyData], Section]], ...] = tuple((s.id, s.fn) for s in registered())


def build_sections(d: StudyData) -> list[Section]:
    """Every registered section in report order; a section that raises becomes an error note."""
    out = []
    for spec in registered():
        try:
            out.append(spec.fn(d))
        except Exception as e:
            log.exception("report section %s failed", spec.id)
            out.append(Section(spec.id, spec.title, spec.source, error=f"{type(e).__name__}: {e}",
                               missing=f"this section failed to render ({type(e).__name__}: {e})"))
    return out


def summary_table(db: str | Path | StudyData, *, study: str | int | None = None) -> list[dict[str, str]]:
    """Headline rows for the terminal: ``trial``, ``kind``, ``key``, ``status``,
    ``n_edits``, ``edited_retention`` (edited → after FT with intervals and n),
    ``intrinsic_retention``, ``es`` (percent), ``stop_reason`` — all strings."""
    if isinstance(db, StudyData):
        return summary_rows(db)
    d = StudyData(db, study=study)
    try:
        return summary_rows(d)
    finally:
        d.close()
