"""The cost model of a study (:class:`CostModel`, :func:`estimate_cost`) and the plan
text of ``editdecay plan`` (:func:`format_plan`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .expand import KINDS, Trial, canonical_json
from .schema import StudySpec, layers_label


# --- cost -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Rough CPU seconds per unit of work, measured loosely on the embedded SmolLM2-135M
    (fp32, 2 CPU cores). They scale roughly with parameter count: multiply by ~50 for a
    7B model on a CPU, divide by ~20–100 on a GPU. Estimates, not promises."""

    edit_s: Mapping[str, float] = field(default_factory=lambda: {"rome": 16.0, "ft": 3.0, "memit": 5.1,
                                                                  "alphaedit": 4.9, "mend": 0.3, "malmen": 0.3})
    """Seconds per edited fact (target optimisation dominates; batched editors share it). MEMIT
    and AlphaEdit measured on 100 CounterFact facts in one batch (511 s and 494 s); ROME at
    15.9 s per fact applied one after another (3 facts, 20 target steps each, profiled)."""
    edit_default_s: float = 8.0
    stats_pass_s: float = 60.0
    """One second-moment pass for a (model, editor, layers) set; cached across trials."""
    ft_step_s: Mapping[str, float] = field(default_factory=lambda: {"lora": 1.2, "dora": 1.8, "full": 1.6})
    """Seconds per optimiser step of a task of short padded examples (structured facts,
    classification, SFT, QA: the tokens per step depend on the data); fits the measured
    seed000/seed001 CPU specs."""
    ft_fixed_s: Mapping[str, float] = field(default_factory=lambda: {"lora": 0.40, "dora": 0.6, "full": 1.49})
    ft_token_s: Mapping[str, float] = field(default_factory=lambda: {"lora": 0.0084, "dora": 0.0126, "full": 0.0074})
    """Packed text (``unstructured``): a step costs ``ft_fixed_s + ft_token_s × batch ×
    block``. Measured by a bare loop here: LoRA 2.55 s at 4 × 64 tokens and 9.01 s at 8 × 128;
    full 3.38 s and 9.06 s (DoRA assumed 1.5 × LoRA)."""
    probe_fact_s: float = 0.03
    """Seconds to probe one fact at one stage (retention, ES/PS/NS, categories)."""
    budget_probe_fact_s: float = 0.076
    """Seconds per fact at one budget point (retention plus each edited fact's ES/PS/NS and
    margin): measured 22.8 s for 100 edited + 200 intrinsic facts (benchmarks/budget_probe.py)."""
    select_fact_s: float = 0.032
    """Seconds per candidate fact of the confidence filter (one greedy probe)."""
    select_candidates: int = 10_000
    """Candidates assumed per filtered selection (CounterFact's edit file; measured 320 s)."""
    downstream_item_s: Mapping[str, float] = field(default_factory=lambda: {"gen": 0.4, "ll": 0.08})
    downstream_default_items: int = 1000
    """Items per task assumed when ``limit`` is unset."""
    drift_prompt_s: float = 0.02
    epoch_examples: int = 1000
    """Training examples assumed when a schedule is in epochs and ``n_train`` is unset."""


def _ft_steps(params: Mapping[str, Any], cm: CostModel) -> tuple[int, int]:
    """(max steps, evaluations) of a fine-tuning config."""
    per_epoch = max(1, (params.get("n_train") or cm.epoch_examples) // max(1, params.get("batch_size") or 1))
    steps = params.get("max_steps") or (math.ceil(params["epochs"] * per_epoch) if params.get("epochs") else 100)
    every = params.get("eval_every") or (max(1, round(params["eval_every_epochs"] * per_epoch))
                                         if params.get("eval_every_epochs") else 20)
    return int(steps), int(steps) // int(every) + 1


def _step_s(ft: Mapping[str, Any], cm: CostModel) -> float:
    """Seconds per optimiser step of a fine-tuning config (packed text: from its tokens)."""
    m, p = ft["method"], ft["params"]
    if ft.get("task") == "unstructured":
        tokens = (p.get("batch_size") or 1) * (p.get("block_size") or 128)
        return cm.ft_fixed_s.get(m, max(cm.ft_fixed_s.values())) + tokens * cm.ft_token_s.get(m, max(cm.ft_token_s.values()))
    return cm.ft_step_s.get(m, max(cm.ft_step_s.values()))


def _budget_steps(ft: Mapping[str, Any], cm: CostModel) -> tuple[int, int] | None:
    """(steps, evaluations) of a fine-tuning budget axis (tokens: at the task's tokens per step)."""
    b = ft.get("budget")
    if not b:
        return None
    p = ft["params"]
    if b["unit"] == "steps":
        steps = max(b["at"])
    else:
        per_step = (p.get("batch_size") or 1) * (p.get("block_size") or p.get("cutoff") or 128)
        steps = math.ceil(max(b["at"]) / per_step)
    every = p.get("eval_every") or steps
    return steps, len(b["at"]) + 1 + (steps // every if every < steps else 0)


def estimate_cost(trials: Iterable[Trial], cost_model: CostModel | None = None) -> dict[str, Any]:
    """Counts and rough CPU seconds of running ``trials``.

    Counts: ``trials``, ``units``, ``edited_facts`` (facts edited, summed over trials),
    ``edit_calls`` (editor invocations: one per fact under single, per batch otherwise;
    trials that share an edit — same model, facts and editor settings — share its calls
    and seconds, as the runner reuses it),
    ``stats_passes`` (distinct second-moment passes, cached), ``finetune_runs`` (one per
    unit that fine-tunes: under single one per fact), ``finetune_steps`` (at most),
    ``downstream_evals`` (model × task evaluations) and ``downstream_items``,
    ``probe_evals`` (fact × stage probes, including the probes during fine-tuning),
    ``selection_probes`` (candidates of the confidence filter, once per model and data).
    ``cpu_seconds`` splits the estimate per unit class (select, edit, stats, finetune, probe,
    downstream, drift) with the assumptions of ``cost_model`` (:class:`CostModel`)."""
    cm = cost_model or CostModel()
    c = dict.fromkeys(("trials", "units", "edited_facts", "edit_calls", "finetune_runs", "finetune_steps",
                       "downstream_evals", "downstream_items", "probe_evals", "drift_runs",
                       "selection_probes"), 0)
    secs = dict.fromkeys(("select", "edit", "stats", "finetune", "probe", "downstream", "drift"), 0.0)
    selections: set[str] = set()
    stats: set[str] = set()
    edits: set[str] = set()
    by_kind = dict.fromkeys(KINDS, 0)
    for t in trials:
        cfg = t.config
        c["trials"] += 1
        by_kind[t.kind] += 1
        units = t.unit_count
        c["units"] += units
        edit, ft, ev = cfg["edit"], cfg["finetune"], cfg["evaluate"]
        sel = cfg["data"]["selection"]
        n_sets = len(cfg["data"].get("datasets", [None]))
        n_probe = t.n_edits + sel["n_intrinsic"] * n_sets  # facts probed per stage
        stages = 1 + (edit is not None) + (ft is not None)
        if edit is not None:
            n = edit["n_edits"]
            c["edited_facts"] += n
            ekey = canonical_json([cfg["model"], cfg["data"], edit])
            if ekey not in edits:  # the runner reuses an edit for every trial that shares it
                edits.add(ekey)
                c["edit_calls"] += n if edit["protocol"] == "single" else math.ceil(n / (edit["batch_size"] or n))
                secs["edit"] += n * cm.edit_s.get(edit["editor"], cm.edit_default_s)
            if edit["editor"] != "ft":
                stats.add(canonical_json([cfg["model"], edit["editor"], edit["preset"], edit["layers"]]))
            if edit["protocol"] == "single":  # each fact's model probes the fact and the intrinsic set
                n_probe = units * (1 + sel["n_intrinsic"] * n_sets)
        probes = n_probe * stages
        if sel.get("filter", True):  # filter outcomes are cached per model, dataset, margin and mode
            for src in cfg["data"].get("datasets", [cfg["data"]]):
                skey = canonical_json([cfg["model"], [src.get(k) for k in ("dataset", "path", "format")],
                                       sel.get("margin"), sel.get("mode")])
                if skey not in selections:
                    selections.add(skey)
                    c["selection_probes"] += cm.select_candidates
                    secs["select"] += cm.select_candidates * cm.select_fact_s
        secs["probe"] += probes * cm.probe_fact_s
        if ft is not None:
            budget = _budget_steps(ft, cm)
            steps, evals = budget or _ft_steps(ft["params"], cm)
            c["finetune_runs"] += units
            c["finetune_steps"] += units * steps
            secs["finetune"] += units * steps * _step_s(ft, cm)
            probes += n_probe * evals  # a budget point also scores each edited fact
            secs["probe"] += n_probe * evals * (cm.budget_probe_fact_s if budget else cm.probe_fact_s)
        c["probe_evals"] += probes
        ds = ev.get("downstream")
        if ds:
            evals = units * len(ds["stages"]) * len(ds["tasks"])
            items = evals * (ds["limit"] or cm.downstream_default_items)
            c["downstream_evals"] += evals
            c["downstream_items"] += items
            secs["downstream"] += items * cm.downstream_item_s.get(ds["mode"], max(cm.downstream_item_s.values()))
        if ev.get("drift"):
            c["drift_runs"] += units
            n_prompts = ev["drift"]["limit"] or (t.n_edits or sel["n_intrinsic"])
            secs["drift"] += units * 4 * n_prompts * cm.drift_prompt_s
    c["stats_passes"] = len(stats)
    secs["stats"] = len(stats) * cm.stats_pass_s
    secs = {k: round(v, 1) for k, v in secs.items()}
    return {**c, "by_kind": by_kind, "cpu_seconds": {**secs, "total": round(sum(secs.values()), 1)},
            "assumptions": "CPU seconds on the embedded SmolLM2-135M (fp32, 2 cores); fine-tuning at max_steps "
                           "(stop rules can end runs earlier); scale with model size; "
                           "see editdecay.study.spec.CostModel"}


def _hms(s: float) -> str:
    s = round(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_plan(spec: StudySpec, trials: Sequence[Trial], cost: Mapping[str, Any] | None = None) -> str:
    """A plain-text plan: one row per trial (key prefix, kind, axes, units, merged grid
    points), then the cost estimate (for ``editdecay plan``)."""
    cost = cost or estimate_cost(trials)
    cols = ("#", "key", "kind", "model", "dataset", "editor", "n", "protocol", "layers", "task", "ft", "policy",
            "seed", "units", "points")

    def cell(v: Any) -> str:
        return "-" if v is None else layers_label(v) if isinstance(v, list) else str(v)

    rows = []
    for i, t in enumerate(trials, 1):
        a = t.axes
        model = str(a["model"])
        model = model if len(model) <= 28 else "…" + model[-27:]
        rows.append((str(i), t.short, t.kind, model, cell(a["dataset"]), a["editor"], str(a["n_edits"]),
                     cell(a["protocol"]), cell(a["edit_layers"]), cell(a["task"]), a["ft_method"],
                     cell(a["layer_policy"]), str(a["seed"]), str(t.unit_count), str(len(t.points))))
    widths = [max(len(c), *(len(r[j]) for r in rows)) if rows else len(c) for j, c in enumerate(cols)]
    fmt = "  ".join(f"{{:{'>' if c in ('#', 'n', 'seed', 'units', 'points') else '<'}{w}}}"
                    for c, w in zip(cols, widths))
    excluded = spec.grid_size() - sum(len(t.points) for t in trials)
    merged = sum(len(t.points) for t in trials) - len(trials)
    lines = [(f"study {spec.name}: {len(trials)} trials from {spec.grid_size()} grid points "
              f"({excluded} excluded, {merged} merged into shared baselines)"),
             fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    k = cost["by_kind"]
    cs = cost["cpu_seconds"]
    lines += [
        "",
        f"kinds: {k['base']} base, {k['zero-edit']} zero-edit, {k['edit-only']} edit-only, {k['edit+ft']} edit+ft",
        (f"work: {cost['units']} units; {cost['edited_facts']} edited facts in {cost['edit_calls']} editor calls "
         f"({cost['stats_passes']} second-moment passes); {cost['finetune_runs']} fine-tuning runs "
         f"(<= {cost['finetune_steps']} steps); {cost['downstream_evals']} downstream evaluations "
         f"({cost['downstream_items']} items); {cost['probe_evals']} fact probes; {cost['drift_runs']} drift runs"),
        "estimated CPU time: " + ", ".join(f"{n} {_hms(cs[n])}" for n in ("select", "edit", "stats", "finetune", "probe",
                                                                            "downstream", "drift") if cs[n])
        + f"; total {_hms(cs['total'])} ({cost['assumptions']})",
        f"resources per unit: {spec.resources.cpus:g} CPU, {spec.resources.gpus:g} GPU"
        + (f", {spec.resources.memory_gb:g} GB" if spec.resources.memory_gb else ""),
        *precision_lines(trials),
    ]
    return "\n".join(lines)


def precision_lines(trials: Sequence[Trial]) -> list[str]:
    """The expected 95% interval of each rate the trials report, from its n (worst case
    p = 0.5), and the n that ±0.10 needs."""
    from ...evaluate.significance import interval_halfwidth, n_for_halfwidth

    ns: dict[str, set[int]] = {"edited (ES, PS, NS, retention, EFR)": set(), "intrinsic retention": set()}
    for t in trials:
        sel = t.config["data"]["selection"]
        if t.n_edits:
            ns["edited (ES, PS, NS, retention, EFR)"].add(t.n_edits)
        if sel.get("n_intrinsic"):
            ns["intrinsic retention"].add(int(sel["n_intrinsic"]))
    out = []
    for rate, values in ns.items():
        for n in sorted(values):
            w = interval_halfwidth(n)
            flag = "" if w <= 0.10 else f"  (wider than ±0.10: n >= {n_for_halfwidth(0.10)} gives ±0.10)"
            out.append(f"  {rate}: n={n} per trial -> 95% interval about ±{w:.3f}{flag}")
    return ["precision (95% interval half-width of a rate, worst case p=0.5):", *out] if out else []
