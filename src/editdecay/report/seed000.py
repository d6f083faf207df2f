"""Sections that regenerate seed 000's figures and tables (retention after editing and
fine-tuning, layer sweeps, token-category mass, top tokens, SFT, edit layer, fact selection)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..evaluate.significance import (
    Interval,
)
from . import figures as F
from .common import (
    MAX_PANELS,
    Figure,
    Section,
    Table,
    _edit_rate,
    _no_data,
    _policy_num,
    _prefer,
    _sorted_edit,
    _triple,
    _units_ci,
)
from .data import (
    NAN_INTERVAL,
    StudyData,
    TrialInfo,
    fmt,
    group_by,
    mean_ci,
    name_matches,
)
from .registry import meta, section


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
