"""Sections that regenerate seed 001's tables and figures (ES/PS/NS before and after
fine-tuning, decrease rates, ΔES and EFR, transitions, selective block fine-tuning, downstream
accuracy, MEND, HotpotQA vs Commonsense, degradation, activation drift, causal tracing,
significance tests)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluate.significance import (
    SignificanceInputError,
    mcnemar,
    paired_ttest,
)
from ..evaluate.stages import efr, emergence
from . import figures as F
from .common import (
    MAX_EXAMPLE_TRIALS,
    MAX_PANELS,
    Figure,
    Section,
    Table,
    _argmax,
    _bool_list,
    _edit_rate,
    _ft_label,
    _no_data,
    _prefer,
    _rate_iv,
    _sorted_edit,
    _triple,
    _units_ci,
)
from .data import (
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
from .registry import meta, section

log = logging.getLogger(__name__)


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
