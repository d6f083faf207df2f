"""Edit-preserving fine-tuning against plain fine-tuning (the study axis ``preserve``).

For each group of edit+ft trials equal on every axis but ``preserve``, one row per
method: edited retention after fine-tuning (with its gain over plain fine-tuning, paired
over the same facts, McNemar p), intrinsic retention, the task's final validation loss
(the downstream metric of a fine-tuning run, with its change relative to plain) and the
seconds per optimiser step.
"""

from __future__ import annotations

import math

from ..evaluate.significance import mcnemar
from .common import Section, Table, _no_data
from .data import (
    NAN_INTERVAL,
    StudyData,
    TrialInfo,
    axes_but,
    binary,
    defined,
    fmt,
    fmt_p,
    paired_ci,
)
from .registry import meta, order_of, section


def final_val(d: StudyData, t: TrialInfo, name: str = "val_loss") -> float:
    """The task metric at the last evaluation (mean over units)."""
    c = d.curve(t.key, name)
    if not c:
        return math.nan
    vals = c[max(c)]
    return sum(vals) / len(vals)


def seconds_per_step(d: StudyData, t: TrialInfo) -> float:
    secs = [r["value"] for r in d.metric_rows(t.key, "finetune_seconds") if r["value"] is not None]
    steps = [r["value"] for r in d.metric_rows(t.key, "steps") if r["value"] is not None]
    return sum(secs) / sum(steps) if secs and steps and sum(steps) else math.nan


def preserve_label(t: TrialInfo) -> str:
    """The method with its settings (``distill rho=0.3``), so that two runs of one method
    with different settings stay apart."""
    cfg = (t.config.get("finetune") or {}).get("preserve") or {}
    extra = " ".join(f"{k}={v}" for k, v in sorted(cfg.items()) if k != "method")
    return f"{t.preserve} {extra}".strip() if t.preserve else "none"


def preserve_groups(d: StudyData) -> list[tuple[TrialInfo, list[TrialInfo]]]:
    """(plain trial, [preserving trials]) for every group that has both."""
    trials = d.of_kind("edit+ft")
    plain = {axes_but(t, "preserve"): t for t in trials if t.preserve == "none"}
    groups: dict[tuple, list[TrialInfo]] = {}
    for t in trials:
        k = axes_but(t, "preserve")
        if t.preserve != "none" and k in plain:
            groups.setdefault(k, []).append(t)
    return [(plain[k], v) for k, v in groups.items()]


@section("preserve", "Edit-preserving fine-tuning versus plain fine-tuning", "issue 17",
         order=order_of("retention_curves") + 0.5)
def preserve_section(d: StudyData):
    """Shows, per group of edit+ft trials equal on every axis but ``preserve`` (plain fine-tuning first), edited
    retention after fine-tuning, its paired gain over plain fine-tuning with McNemar p, intrinsic retention, the
    final validation loss with its change vs plain, and seconds per step (:func:`preserve_groups`); from the
    ``finetuned`` ``retained`` rows, the ``val_loss`` curve and the ``finetune_seconds``/``steps`` metrics."""
    sid, title, src = meta(preserve_section)
    groups = preserve_groups(d)
    if not groups:
        return _no_data(sid, title, src, "needs the preserve axis (anchor, nullspace, replay, distill, freeze-edited) "
                        "beside preserve: none on otherwise equal edit+ft trials")
    rows = []
    for plain, others in groups:
        base_loss = final_val(d, plain)
        for t in [plain, *others]:
            gain, p = NAN_INTERVAL, None
            if t is not plain:
                _, ft, fp = d.paired_trials(t.key, plain.key, "edit", "retained", "finetuned")
                iv = paired_ci(ft, fp, lambda u, v: u - v, n_boot=d.n_boot, seed=d.seed)
                if iv.n:
                    gain, p = iv, mcnemar(binary(fp), binary(ft)).p_value
            loss = final_val(d, t)
            rel = 100 * (loss - base_loss) / base_loss if base_loss and not math.isnan(loss) else math.nan
            sps = seconds_per_step(d, t)
            rows.append([plain.label if t is plain else f"  {t.preserve}", preserve_label(t),
                         fmt(d.rate(t.key, "edit", "retained", "finetuned")),
                         fmt(gain, n=False) + (f" (p={fmt_p(p)})" if defined(gain) else ""),
                         fmt(d.intrinsic(t, "finetuned")),
                         "—" if math.isnan(loss) else f"{loss:.3f}" + ("" if t is plain else f" ({rel:+.1f}%)"),
                         "—" if math.isnan(sps) else f"{sps:.2f}"])
    sec = Section(sid, title, src, "Per group (the plain fine-tuning first): edited retention after fine-tuning, "
                  "its gain over plain fine-tuning on the same facts (paired bootstrap interval, McNemar p), "
                  "intrinsic retention, the final validation loss of the task with its change relative to plain "
                  "fine-tuning, and seconds per optimiser step.")
    sec.tables.append(Table(["trial", "preserve", "edited retention", "gain vs plain", "intrinsic retention",
                             "val loss (vs plain)", "s/step"], rows))
    return sec
