"""The report's opening sections: the study overview, the headline table and the
retention-during-fine-tuning curves (edited vs intrinsic)."""

from __future__ import annotations

import json

from . import figures as F
from .common import (
    MAX_PANELS,
    Figure,
    Section,
    Table,
    _arrow,
    _edit_rate,
    _no_data,
    _ranges,
    _steps_subset,
)
from .data import (
    StudyData,
    fmt,
)
from .registry import meta, section


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
