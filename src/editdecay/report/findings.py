"""The seeds' claims as hypotheses tested on the study's data, and the fine-tuning budget.

Each claim of the two papers (ARCHITECTURE "Findings to expect") becomes a test on the
trials that can answer it: an effect with a 95% bootstrap interval, a p-value, n and a
verdict (:func:`decide`) — ``supported`` (p < α with the claimed sign), ``contradicted``
(p < α with the other sign) or ``inconclusive at this n``. A claim of stability
("intrinsic retention is stable under fine-tuning") is an equivalence claim: supported
when the whole interval of the change lies within ±:data:`EQUIVALENCE_MARGIN`.

Tests: facts shared by two trials (the same edit set under two fine-tunings, two editors
on the same facts) are paired — McNemar on binary outcomes, a paired t-test on per-fact
decays; edited and intrinsic facts are different facts, so that claim uses Fisher's exact
test (McNemar needs pairs). Editors are compared raw and at matched edit strength: only
facts whose post-edit margins (log P(new) − log P(true)) under the two editors differ by
at most ``caliper`` nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..evaluate.significance import (
    Interval,
    SignificanceInputError,
    mcnemar,
    paired_ttest,
)
from ..evaluate.stages import efr
from . import figures as F
from .common import MAX_PANELS, Figure, Section, Table, _no_data
from .data import (
    NAN_INTERVAL,
    StudyData,
    TrialInfo,
    axes_but,
    binary,
    defined,
    fmt,
    fmt_p,
    mean_ci,
    paired_ci,
)
from .registry import meta, order_of, section

ALPHA = 0.05
EQUIVALENCE_MARGIN = 0.10
"""A change of retention within ±0.10 counts as stable (the width the power target allows)."""
MARGIN_CALIPER = 1.0
"""Nats: two editors' margins on a fact count as matched within this distance."""
VERDICTS = ("supported", "contradicted", "inconclusive", "no data")


def decide(effect: Interval, p: float | None, direction: int = 1, alpha: float = ALPHA) -> str:
    """Verdict of a directional claim: the effect is expected to have the sign of
    ``direction``; significance at ``alpha`` decides, otherwise inconclusive."""
    if not defined(effect) or p is None or math.isnan(p):
        return "no data"
    if p < alpha and effect.estimate * direction > 0:
        return "supported"
    if p < alpha and effect.estimate * direction < 0:
        return "contradicted"
    return "inconclusive"


def decide_equivalence(effect: Interval, margin: float = EQUIVALENCE_MARGIN) -> str:
    """Verdict of a no-change claim: supported when the interval lies inside ±margin,
    contradicted when it lies wholly outside, otherwise inconclusive."""
    if not defined(effect) or math.isnan(effect.low) or math.isnan(effect.high):
        return "no data"
    if -margin < effect.low and effect.high < margin:
        return "supported"
    if effect.low >= margin or effect.high <= -margin:
        return "contradicted"
    return "inconclusive"


@dataclass(frozen=True)
class Finding:
    """One test of one claim on one comparison."""

    claim: str
    source: str
    comparison: str
    measure: str
    effect: Interval
    p: float | None
    test: str
    verdict: str

    def row(self) -> list[str]:
        return [self.claim, self.source, self.comparison, self.measure, fmt(self.effect), fmt_p(self.p), self.test,
                self.verdict]


def diff_ci(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000, seed: int = 0) -> Interval:
    """mean(a) − mean(b) of two independent samples with a percentile-bootstrap interval
    (each resampled on its own); n = len(a) + len(b)."""
    x = np.asarray([v for v in a if v is not None and not math.isnan(v)], dtype=float)
    y = np.asarray([v for v in b if v is not None and not math.isnan(v)], dtype=float)
    if not x.size or not y.size:
        return NAN_INTERVAL
    rng = np.random.default_rng(seed)
    bx = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    by = y[rng.integers(0, y.size, size=(n_boot, y.size))].mean(axis=1)
    lo, hi = np.quantile(bx - by, [0.025, 0.975])
    return Interval(float(x.mean() - y.mean()), float(lo), float(hi), int(x.size + y.size))


def fisher_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Fisher exact p of two independent binary samples."""
    from scipy import stats

    x = [bool(v >= 0.5) for v in a if v is not None]
    y = [bool(v >= 0.5) for v in b if v is not None]
    if not x or not y:
        return math.nan
    table = [[sum(x), len(x) - sum(x)], [sum(y), len(y) - sum(y)]]
    return float(stats.fisher_exact(table).pvalue)


def edited_vs_intrinsic(d: StudyData, key: str, stage: str) -> tuple[Interval, float | None]:
    """Intrinsic − edited retention of one trial at ``stage`` (different facts: two-sample
    bootstrap interval, Fisher exact p; None without either set)."""
    e = list(d.facts(key, "edit", "retained", stage).values())
    i = list(d.facts(key, "intrinsic", "retained", stage).values())
    eff = diff_ci(i, e, n_boot=d.n_boot, seed=d.seed)
    return eff, fisher_p(i, e) if defined(eff) else None


# --- pairing trials -------------------------------------------------------------------------
def plain_ft(d: StudyData) -> list[TrialInfo]:
    """Edit+ft trials of plain fine-tuning (the seeds' claims concern it; the preserve
    axis has its own section)."""
    return [t for t in d.of_kind("edit+ft") if t.preserve == "none"]


def pairs_on(d: StudyData, axis: str, a: Callable[[TrialInfo], bool], b: Callable[[TrialInfo], bool]
             ) -> list[tuple[TrialInfo, TrialInfo]]:
    """Trials (x, y) of plain fine-tuning equal on every axis but ``axis``, with ``a(x)`` and ``b(y)``."""
    trials = plain_ft(d)
    return [(x, y) for x in trials if a(x) for y in trials
            if y is not x and b(y) and axes_but(x, axis) == axes_but(y, axis)]


def _freezes_edited(t: TrialInfo) -> bool:
    """The trial fine-tunes only blocks above its edited ones, or none of them."""
    pol = str(t.policy or "")
    if pol == "non-edited":
        return True
    if pol.startswith("threshold:") and t.edited_layers:
        return int(pol.split(":")[1]) > max(t.edited_layers)
    return False


def _finetuned(d: StudyData, x: TrialInfo, y: TrialInfo, metric: str) -> tuple[list, list]:
    """The edited facts' ``metric`` after fine-tuning in ``x`` and in ``y``, paired by fact."""
    _, a, b = d.paired_trials(x.key, y.key, "edit", metric, "finetuned")
    return a, b


def _mcnemar_finding(d: StudyData, claim: str, source: str, comparison: str, measure: str, hi: list, lo: list,
                     ) -> Finding:
    """Claim: outcome ``hi`` > outcome ``lo`` on the same facts (effect = mean(hi) − mean(lo);
    facts undefined on either side are left out)."""
    eff = paired_ci(hi, lo, lambda u, v: u - v, n_boot=d.n_boot, seed=d.seed)
    if not eff.n:
        return Finding(claim, source, comparison, measure, NAN_INTERVAL, None, "McNemar", "no data")
    t = mcnemar(binary(lo), binary(hi))
    return Finding(claim, source, comparison, measure, eff, t.p_value, f"McNemar ({t.method}, b={t.b}, c={t.c})",
                   decide(eff, t.p_value))


def _label_pair(x: TrialInfo, y: TrialInfo, what: str) -> str:
    return f"{what} — {x.editor} n={x.n_edits}, {x.ft_method} on {x.task}"


# --- the claims -----------------------------------------------------------------------------
def claim_edited_below_intrinsic(d: StudyData) -> list[Finding]:
    """Seed 000: after fine-tuning, edited retention < intrinsic retention."""
    out = []
    for t in plain_ft(d):
        eff, p = edited_vs_intrinsic(d, t.key, "finetuned")
        out.append(Finding("edited retention < intrinsic retention after FT", "seed 000", t.label,
                           "intrinsic − edited retention", eff, p, "Fisher exact (different facts)", decide(eff, p)))
    return out


def claim_intrinsic_stable(d: StudyData) -> list[Finding]:
    """Seed 000: intrinsic retention ≈ stable under fine-tuning (edited → fine-tuned)."""
    out = []
    for t in plain_ft(d):
        _, a, b = d.paired(t.key, "intrinsic", "retained", "edited", "finetuned")
        eff = paired_ci(b, a, lambda u, v: u - v, n_boot=d.n_boot, seed=d.seed)
        if not eff.n:
            continue
        m = mcnemar(binary(a), binary(b))
        out.append(Finding(f"intrinsic retention stable under FT (within ±{EQUIVALENCE_MARGIN:.2f})", "seed 000",
                           t.label, "intrinsic retention: FT − edited", eff, m.p_value,
                           "interval inside ±margin (McNemar p shown)", decide_equivalence(eff)))
    return out


def claim_freezing_helps(d: StudyData) -> list[Finding]:
    """Seed 000: freezing the edited layers raises edited retention."""
    out = []
    for x, y in pairs_on(d, "layer_policy", _freezes_edited, lambda t: t.policy == "all"):
        hi, lo = _finetuned(d, x, y, "retained")
        out.append(_mcnemar_finding(d, "freezing the edited layers raises edited retention", "seed 000",
                                    _label_pair(x, y, f"{x.policy} vs all"), "edited retention: frozen − all", hi, lo))
    return out


def claim_ft_lowers_es(d: StudyData) -> list[Finding]:
    """Seed 001: fine-tuning lowers ES (edited → fine-tuned, same facts)."""
    out = []
    for t in plain_ft(d):
        _, a, b = d.paired(t.key, "edit", "success", "edited", "finetuned")
        out.append(_mcnemar_finding(d, "fine-tuning lowers ES", "seed 001", t.label, "ES: edited − fine-tuned", a, b))
    return out


def claim_full_removes_more(d: StudyData) -> list[Finding]:
    """Seed 001: full fine-tuning removes more edits than LoRA/DoRA."""
    out = []
    for x, y in pairs_on(d, "ft_method", lambda t: t.ft_method in ("lora", "dora"), lambda t: t.ft_method == "full"):
        hi, lo = _finetuned(d, x, y, "success")
        out.append(_mcnemar_finding(d, "full FT removes more edits than LoRA/DoRA", "seed 001",
                                    f"{x.ft_method} vs full — {x.editor} n={x.n_edits}, {x.policy} on {x.task}",
                                    f"ES after FT: {x.ft_method} − full", hi, lo))
    return out


def _decays(d: StudyData, t: TrialInfo) -> dict[str, float]:
    """Per fact: success after the edit − success after fine-tuning (1: the edit decayed)."""
    ids, a, b = d.paired(t.key, "edit", "success", "edited", "finetuned")
    return {i: u - v for i, u, v in zip(ids, a, b) if u is not None and v is not None}


def claim_alphaedit_decays_more(d: StudyData, caliper: float = MARGIN_CALIPER) -> list[Finding]:
    """Seed 001: AlphaEdit edits decay more than MEMIT's — raw and at matched margin."""
    out = []
    for x, y in pairs_on(d, "editor", lambda t: t.editor == "alphaedit", lambda t: t.editor == "memit"):
        dx, dy = _decays(d, x), _decays(d, y)
        mx, my = d.facts(x.key, "edit", "margin", "edited"), d.facts(y.key, "edit", "margin", "edited")
        comp = f"alphaedit vs memit — n={x.n_edits}, {x.ft_method}/{x.policy} on {x.task}"
        for label, ids in (("raw", [i for i in dx if i in dy]),
                           (f"matched margin (|Δ| ≤ {caliper:g} nat)",
                            [i for i in dx if i in dy and mx.get(i) is not None and my.get(i) is not None
                             and abs(mx[i] - my[i]) <= caliper])):
            a, b = [dx[i] for i in ids], [dy[i] for i in ids]
            if len(ids) < 2:
                out.append(Finding("AlphaEdit edits decay more than MEMIT's", "seed 001", f"{comp}, {label}",
                                   "decay (ES lost): alphaedit − memit", NAN_INTERVAL, None, "paired t", "no data"))
                continue
            eff = paired_ci(a, b, lambda u, v: u - v, n_boot=d.n_boot, seed=d.seed)
            try:
                p = paired_ttest(a, b).p_value
            except SignificanceInputError:
                p = math.nan
            if math.isnan(p) and eff.estimate == 0:
                p = 1.0  # identical decays: no difference
            out.append(Finding("AlphaEdit edits decay more than MEMIT's", "seed 001", f"{comp}, {label}",
                               "decay (ES lost): alphaedit − memit", eff, p, "paired t over facts", decide(eff, p)))
    return out


def claim_edited_only_removes(d: StudyData) -> list[Finding]:
    """Seed 001: fine-tuning only the edited layers removes the most edits."""
    out = []
    for other in ("all", "non-edited"):
        for x, y in pairs_on(d, "layer_policy", lambda t: t.policy == other, lambda t: t.policy == "edited"):
            hi, lo = _finetuned(d, x, y, "success")
            out.append(_mcnemar_finding(d, "FT of the edited layers only removes the most edits", "seed 001",
                                        _label_pair(x, y, f"{other} vs edited"), f"ES after FT: {other} − edited",
                                        hi, lo))
    return out


def claim_non_edited_impairs(d: StudyData) -> list[Finding]:
    """Issue 16 / seed 001: non-edited-layer fine-tuning impairs more edits than full
    (the opposite direction of seed 000's freezing claim, on ES)."""
    out = []
    for x, y in pairs_on(d, "layer_policy", lambda t: t.policy == "all", lambda t: t.policy == "non-edited"):
        hi, lo = _finetuned(d, x, y, "success")
        out.append(_mcnemar_finding(d, "non-edited-layer FT impairs more edits than full-model FT", "seed 001",
                                    _label_pair(x, y, "all vs non-edited"), "ES after FT: all − non-edited", hi, lo))
    return out


CLAIMS: tuple[Callable[[StudyData], list[Finding]], ...] = (
    claim_edited_below_intrinsic, claim_intrinsic_stable, claim_freezing_helps, claim_ft_lowers_es,
    claim_full_removes_more, claim_alphaedit_decays_more, claim_edited_only_removes, claim_non_edited_impairs,
)


def findings(d: StudyData) -> list[Finding]:
    """Every claim tested on every comparison the study holds."""
    return [f for claim in CLAIMS for f in claim(d)]


def verdict_counts(fs: Sequence[Finding]) -> dict[str, dict[str, int]]:
    """Claim → verdict → number of comparisons."""
    out: dict[str, dict[str, int]] = {}
    for f in fs:
        c = out.setdefault(f.claim, dict.fromkeys(VERDICTS, 0))
        c[f.verdict] += 1
    return out


# --- the budget axis ------------------------------------------------------------------------
def budget_trials(d: StudyData) -> list[TrialInfo]:
    return [t for t in d.of_kind("edit+ft", "zero-edit") if (t.config.get("finetune") or {}).get("budget")]


def budget_rows(d: StudyData, t: TrialInfo) -> list[dict[str, object]]:
    """Per probed step of a budget trial: tokens, retention (edited, intrinsic), ES/PS/NS,
    EFR and margin of the edited facts, intrinsic retention of the zero-edit twin."""
    tokens = {s: v[0] for s, v in d.curve(t.key, "tokens").items() if v}
    z = d.zero_edit_for(t) if t.has_edit else None
    rows = []
    steps = d.probe_steps(t.key, "edit" if t.has_edit else "intrinsic")
    for s in steps:
        st = f"step:{s}"
        r: dict[str, object] = {"step": s, "tokens": tokens.get(s)}
        r["intrinsic"] = d.rate(t.key, "intrinsic", "retained", st)
        r["intrinsic_no_edit"] = d.rate(z.key, "intrinsic", "retained", st, t.dataset) if z else NAN_INTERVAL
        if t.has_edit:
            r["edited"] = d.rate(t.key, "edit", "retained", st)
            for m in ("es", "ps", "ns", "margin"):
                r[m] = d.rate(t.key, "edit", m, st)
            _, a, b = d.paired(t.key, "edit", "success", "edited", st)
            r["efr"] = efr(a, b) if a else None
            r["gap"], r["gap_p"] = edited_vs_intrinsic(d, t.key, st)
        rows.append(r)
    return rows


def _efr_cell(rate) -> str:
    if rate is None or rate.denominator == 0:
        return "—"
    return f"{rate.value:.2f} ({rate.numerator}/{rate.denominator})"


def _tok(v: object) -> str:
    if v is None:
        return "—"
    v = float(v)
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"


@section("budget_curves", "Retention versus fine-tuning budget", "issue 16 (budget axis)",
         order=order_of("retention_curves") + 0.25)
def budget_section(d: StudyData):
    """Shows, per trial with a fine-tuning budget, every probed step: tokens, edited and intrinsic retention, the
    zero-edit twin's intrinsic retention, ES/PS/NS, EFR, margin and the Fisher test of intrinsic vs edited
    retention (:func:`budget_rows`), with retention against training tokens; from the ``step:N`` fact rows and the
    ``tokens`` curve of the edit+ft and zero-edit trials whose ``finetune.budget`` is set."""

    sid, title, src = meta(budget_section)
    trials = budget_trials(d)
    if not trials:
        return _no_data(sid, title, src, "needs a fine-tuning budget axis: finetune.budget: [steps, ...] or "
                        "{tokens: [...]} (one run per trial, probed at every point)")
    rows, panels = [], []
    for t in trials:
        br = budget_rows(d, t)
        if not br:
            continue
        for r in br:
            rows.append([t.label, str(r["step"]), _tok(r["tokens"]), fmt(r.get("edited")), fmt(r["intrinsic"]),
                         fmt(r["intrinsic_no_edit"]), fmt(r.get("es")), fmt(r.get("ps")), fmt(r.get("ns")),
                         _efr_cell(r.get("efr")), fmt(r.get("margin"), n=False),
                         f"{fmt(r.get('gap'), n=False)} (p={fmt_p(r.get('gap_p'))})" if t.has_edit else "—"])
        if len(panels) < MAX_PANELS:
            x = [float(r["tokens"]) if r["tokens"] is not None else float(r["step"]) for r in br]
            lines = []
            for key, label in (("edited", "edited (new target)"), ("intrinsic", "intrinsic (true target)"),
                               ("intrinsic_no_edit", "intrinsic, no edit")):
                ivs = [r.get(key) for r in br]
                if all(defined(iv) for iv in ivs):
                    lines.append(F.Line(f"{label} n={ivs[-1].n}", x, [i.estimate for i in ivs], [i.low for i in ivs],
                                        [i.high for i in ivs], "--" if key == "intrinsic_no_edit" else "-"))
            panels.append(F.Panel(t.label, lines, "training tokens", "retention", (-0.03, 1.03)))
    sec = Section(sid, title, src, "Each trial is one fine-tuning run probed at every budget point (step 0 is "
                  "the edited model before training). Rates: estimate [95% bootstrap interval] n=facts; EFR = "
                  "Pr(ES fails at the point | ES succeeded after the edit) (k/n); margin = mean log P(new) − log "
                  "P(true) on the rewrite prompt; the last column tests seed 000's claim at every point (edited and "
                  "intrinsic are different facts: Fisher's exact test).")
    if panels:
        sec.figures.append(Figure(sid, F.line_panels(panels), "Retention against training tokens."))
    sec.tables.append(Table(["trial", "step", "tokens", "edited retention", "intrinsic retention",
                             "intrinsic, no edit", "ES", "PS", "NS", "EFR", "margin",
                             "intrinsic − edited (Fisher p)"], rows))
    return sec


@section("findings", "Findings: the seeds' claims tested on this study", "seeds 000 and 001, findings",
         order=order_of("summary") + 0.5)
def findings_section(d: StudyData):
    """Shows every claim of the seeds tested on the study (:func:`findings`): the verdict counts per claim, then
    per comparison the effect with its interval, p, test and verdict, and an edit-strength table (margin after the
    edit beside ES decay and EFR); from the ``retained``/``success``/``margin`` edit-set rows of the plain
    fine-tuning edit+ft trials, single or paired with a trial that differs in one axis."""

    sid, title, src = meta(findings_section)
    fs = findings(d)
    if not fs:
        return _no_data(sid, title, src, "needs edit+ft trials (and, per claim, pairs differing in one axis: "
                        "layer_policy all/non-edited/edited, ft_method lora/full, editor memit/alphaedit)")
    counts = verdict_counts(fs)
    summary = [[c, str(v["supported"]), str(v["contradicted"]), str(v["inconclusive"]), str(v["no data"])]
               for c, v in counts.items()]
    sec = Section(sid, title, src, f"Each claim is a hypothesis tested per comparison at α = {ALPHA}: supported = "
                  "significant in the claimed direction, contradicted = significant in the other, inconclusive = "
                  f"not significant at this n. Stability claims need the whole interval within ±{EQUIVALENCE_MARGIN}. "
                  "Effects: estimate [95% bootstrap interval] n=facts.")
    sec.tables.append(Table(["claim", "verdicts supported", "contradicted", "inconclusive", "no data"], summary,
                            "Verdicts per claim over its comparisons."))
    sec.tables.append(Table(["claim", "source", "comparison", "effect measure", "effect", "p", "test", "verdict"],
                            [f.row() for f in fs]))
    strength = edit_strength_rows(d)
    if strength:
        sec.tables.append(Table(["trial", "margin after edit", "ES edited → FT", "decay (ES lost)", "EFR"], strength,
                                "Edit strength beside decay: a stronger edit (larger margin) may survive longer; "
                                "editors are also compared at matched margin above."))
    return sec


def edit_strength_rows(d: StudyData) -> list[list[str]]:
    rows = []
    for t in plain_ft(d):
        m = d.rate(t.key, "edit", "margin", "edited")
        if not defined(m):
            continue
        dec = _decays(d, t)
        dec_iv = mean_ci(list(dec.values()), n_boot=d.n_boot, seed=d.seed) if dec else NAN_INTERVAL
        _, a, b = d.paired(t.key, "edit", "success", "edited", "finetuned")
        e = efr(a, b) if a else None
        rows.append([t.label, fmt(m), f"{fmt(d.rate(t.key, 'edit', 'success', 'edited'), n=False)} → "
                     f"{fmt(d.rate(t.key, 'edit', 'success', 'finetuned'))}", fmt(dec_iv), _efr_cell(e)])
    return rows
