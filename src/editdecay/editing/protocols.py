"""Editing protocols.

``single`` (seed 000): each fact is edited alone on the one loaded model, measured,
and the model is restored bit-exactly from the saved originals (no reload). With
``verify`` a fact whose edit fails the retention probe (target_new not the first
non-stop token) is retried with 2× and then 4× the optimisation steps, else dropped
(and logged).

``batch`` (seed 001): all facts in one edit. ``sequential``: batches of ``batch_size``
applied in turn without restore (editors with memory, such as AlphaEdit, carry it
across batches). Both measure every fact on the final model and leave the model
edited; ``ProtocolResult.restore`` returns it to the base weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import EditdecayError
from ..evaluate.metrics import FactScore, score_facts
from ..evaluate.probes import Prober
from ..facts.record import FactRecord
from ..models import save_model
from .base import EditResult

log = logging.getLogger(__name__)

PROTOCOLS = ("single", "batch", "sequential")
METRIC_KEYS = ("es", "ps", "ns", "retention_new", "retention_true")


@dataclass
class FactOutcome:
    case_id: str
    pre: FactScore
    post: FactScore | None
    seconds: float
    edited_layers: list[int]
    steps_factor: int
    dropped: bool = False
    result: EditResult | None = field(default=None, repr=False)


@dataclass
class ProtocolResult:
    method: str
    protocol: str
    outcomes: list[FactOutcome]
    mode: str
    results: list[EditResult] = field(default_factory=list, repr=False)
    """Edits still applied to the model (batch, sequential), oldest first."""

    def restore(self, model) -> None:
        """Undo the edits still applied (newest first), bit-exact."""
        for res in reversed(self.results):
            res.restore(model)
        self.results = []

    @property
    def dropped(self) -> list[str]:
        return [o.case_id for o in self.outcomes if o.dropped]

    def _summary(self, stage: str) -> dict:
        scores = [getattr(o, stage) for o in self.outcomes if getattr(o, stage) is not None]
        out = {}
        for key in METRIC_KEYS:
            attr = {"retention_new": "retained_new", "retention_true": "retained_true"}.get(key, key)
            vals = [float(getattr(s, attr)) for s in scores if getattr(s, attr) is not None]
            out[key] = sum(vals) / len(vals) if vals else float("nan")
        return out

    def ns_drop(self) -> dict:
        """NS of the unedited model minus NS after the edit, paired over the facts that
        have neighbourhood prompts: ``{"estimate", "low", "high", "n"}`` (95% bootstrap)."""
        from ..evaluate.significance import bootstrap_ci

        diffs = [o.pre.ns - o.post.ns for o in self.outcomes
                 if o.post is not None and o.pre.ns is not None and o.post.ns is not None]
        iv = bootstrap_ci(diffs) if diffs else None
        return {"estimate": iv.estimate if iv else float("nan"), "low": iv.low if iv else float("nan"),
                "high": iv.high if iv else float("nan"), "n": len(diffs)}

    def to_json(self, preset: str) -> dict:
        kept = [o for o in self.outcomes if not o.dropped]
        return {
            "method": self.method,
            "protocol": self.protocol,
            "preset": preset,
            "n_facts": len(self.outcomes),
            "pre": self._summary("pre"),
            "post": self._summary("post"),
            "ns_drop": self.ns_drop(),
            "seconds_per_fact": sum(o.seconds for o in kept) / len(kept) if kept else float("nan"),
            "edited_layers": sorted({b for o in kept for b in o.edited_layers}),
            "dropped": self.dropped,
            "facts": [
                {"case_id": o.case_id, "pre": o.pre.to_dict(), "post": o.post.to_dict() if o.post else None,
                 "seconds": o.seconds, "edited_layers": o.edited_layers, "steps_factor": o.steps_factor,
                 "dropped": o.dropped}
                for o in self.outcomes
            ],
        }


def edit_with_retries(editor, model, tokenizer, fact: FactRecord, *, verify: bool, mode: str = "greedy",
                      prober: Prober | None = None) -> tuple[EditResult, FactScore, int, float]:
    """Edit one fact; with ``verify``, retry from the original weights with 2× and 4× the
    steps while the retention probe fails. The last attempt stays applied. Returns
    ``(result, post-edit score, steps factor used, editing seconds)``."""
    factors = (1, 2, 4) if verify else (1,)
    seconds = 0.0
    for factor in factors:
        res = editor.edit(model, tokenizer, [fact], steps_factor=factor)
        seconds += res.seconds
        post = score_facts(model, tokenizer, [fact], mode=mode, prober=prober).facts[0]
        if not verify or post.retained_new or factor == factors[-1]:
            break
        res.restore(model)  # retry from the original weights
    return res, post, factor, seconds


def run_single(
    editor,
    model,
    tokenizer,
    facts: list[FactRecord],
    *,
    verify: bool | None = None,
    mode: str = "greedy",
    keep_results: bool = False,
    progress: bool = True,
) -> ProtocolResult:
    """Protocol ``single``: edit, score and restore each fact in turn."""
    verify = getattr(getattr(editor, "hparams", None), "verify", False) if verify is None else verify
    prober = Prober(model, tokenizer, progress=False)
    pre = score_facts(model, tokenizer, facts, mode=mode, prober=prober).facts
    if hasattr(editor, "prefetch_targets") and len(facts) > 1:  # every fact starts from these weights
        editor.prefetch_targets(model, tokenizer, facts)
    outcomes = []
    for fact, pre_f in tqdm(list(zip(facts, pre)), desc=f"{editor.name} single", unit="fact", disable=not progress):
        cache = getattr(editor, "target_cache", None)
        reused = cache.reused_seconds if cache is not None else 0.0
        res, post_f, used, seconds = edit_with_retries(editor, model, tokenizer, fact, verify=verify, mode=mode, prober=prober)
        if cache is not None:  # the fact's share of the batched z optimisation it reused
            seconds += cache.reused_seconds - reused
        dropped = bool(verify and not post_f.retained_new)
        layers = res.edited_layers(model)
        res.restore(model)  # every fact is edited alone: a dropped fact's last attempt is undone too
        if dropped:
            log.warning("%s: fact %s not edited after %d× steps; dropped", editor.name, fact.case_id, used)
        outcomes.append(FactOutcome(fact.case_id, pre_f, post_f, seconds, layers, used, dropped,
                                    res if keep_results else None))
    return ProtocolResult(editor.name, "single", outcomes, mode)


def run_batch(editor, model, tokenizer, facts: list[FactRecord], *, batch_size: int | None = None,
              mode: str = "greedy") -> ProtocolResult:
    """Protocols ``batch`` (``batch_size`` None: all facts in one edit) and
    ``sequential`` (batches of ``batch_size`` in turn, no restore). The model stays
    edited; call ``restore`` on the result to undo."""
    prober = Prober(model, tokenizer, progress=False)
    pre = score_facts(model, tokenizer, facts, mode=mode, prober=prober).facts
    size = batch_size or len(facts)
    results: list[EditResult] = []
    batches = [facts[i : i + size] for i in range(0, len(facts), size)]
    for batch in tqdm(batches, desc=f"{editor.name} {'batch' if batch_size is None else 'sequential'}",
                      unit="batch", disable=len(batches) < 2):
        results.append(editor.edit(model, tokenizer, batch))
    post = score_facts(model, tokenizer, facts, mode=mode, prober=prober).facts
    seconds = sum(r.seconds for r in results) / max(len(facts), 1)
    layers = sorted({b for r in results for b in r.edited_layers(model)})
    outcomes = [FactOutcome(f.case_id, a, b, seconds, layers, 1) for f, a, b in zip(facts, pre, post)]
    return ProtocolResult(editor.name, "batch" if batch_size is None else "sequential", outcomes, mode, results)


def _rates(scores: list[FactScore]) -> dict:
    n = len(scores)
    return {"n": n, "es": sum(s.es for s in scores) / n if n else float("nan"),
            "success": sum(s.success for s in scores) / n if n else float("nan"),
            "retention_new": sum(s.retained_new for s in scores) / n if n else float("nan")}


def reedit(editor, model, tokenizer, facts: list[FactRecord], *, batch_size: int | None = None, mode: str = "greedy",
           scratch: bool = True) -> tuple[dict, list[EditResult]]:
    """Re-apply the decayed edits of a fine-tuned edited model (seed 001's re-edit cost).

    The decayed facts are those of ``facts`` (the original edit set) whose edit no longer
    succeeds on ``model``. With ``scratch``, every fact of the set is first edited again
    from scratch on the fine-tuned model (timed, scored, undone) — the alternative a
    user without the decay measurement has. Then the decayed facts alone are re-edited
    and left applied. Returns ``(report, results still applied)``; report keys:
    ``n_facts``, ``finetuned`` and, per pass, ``{"n", "seconds", "seconds_per_fact",
    "decayed" (rates over the decayed facts), "all" (rates over every fact)}`` under
    ``reedit`` and ``scratch`` (None without), plus ``decayed`` (case ids)."""
    prober = Prober(model, tokenizer, progress=False)
    before = score_facts(model, tokenizer, facts, mode=mode, prober=prober).facts
    decayed = [f for f, s in zip(facts, before) if not s.success]
    ids = {f.case_id for f in decayed}

    def run(batch: list[FactRecord]) -> tuple[dict, ProtocolResult | None]:
        if not batch:
            return {"n": 0, "seconds": 0.0, "seconds_per_fact": None, "decayed": _rates([]), "all": _rates(before)}, None
        res = run_batch(editor, model, tokenizer, batch, batch_size=batch_size, mode=mode)
        seconds = sum(r.seconds for r in res.results)
        after = score_facts(model, tokenizer, facts, mode=mode, prober=prober).facts
        return {"n": len(batch), "seconds": seconds, "seconds_per_fact": seconds / len(batch),
                "decayed": _rates([s for f, s in zip(facts, after) if f.case_id in ids]), "all": _rates(after)}, res

    doc: dict = {"n_facts": len(facts), "finetuned": _rates(before), "decayed": sorted(ids), "scratch": None}
    if scratch:
        doc["scratch"], res = run(list(facts))
        if res is not None:
            res.restore(model)
    doc["reedit"], res = run(decayed)
    return doc, (res.results if res is not None else [])


def save_edited_model(model, tokenizer, path: str | Path, result: ProtocolResult, *, method: str, base_model: str,
                      preset: str | None = None, requests: str | None = None) -> Path:
    """Save the model as edited by ``result`` to ``path``, a loadable model directory whose
    ``identity.json`` records ``base`` (``{"model": base_model}``, the unedited model that
    fine-tuning's ``loss<base-Δ`` and ``unedit`` use) and ``edit`` (``method``, the case
    ids, ``edited_layers``, ``preset``, ``requests`` and ``seconds_per_fact``, read by
    ``finetune --from-edit`` and ``reedit``). Returns the path.

    ``batch`` / ``sequential``: the model still holds the edits and is saved as it is (it
    stays edited; ``result.restore`` undoes that). ``single``: ``result`` must hold one
    fact run with ``keep_results``; its deltas are applied, the model is saved and then
    restored. Raises :class:`EditdecayError` when that fact was dropped (not edited).
    """
    base = {"model": base_model}
    if result.protocol != "single":
        kept = [o for o in result.outcomes if not o.dropped]
        edit = {"method": method, "protocol": result.protocol, "case_ids": [o.case_id for o in result.outcomes],
                "edited_layers": sorted({b for o in kept for b in o.edited_layers}), "preset": preset,
                "requests": requests, "seconds_per_fact": sum(o.seconds for o in kept) / len(kept) if kept else None}
        return save_model(model, tokenizer, path, {"base": base, "edit": edit})
    if len(result.outcomes) != 1 or result.outcomes[0].result is None:
        raise ValueError("save_edited_model: protocol single needs one fact run with keep_results=True")
    outcome = result.outcomes[0]
    if outcome.dropped:
        raise EditdecayError(f"fact {outcome.case_id} could not be edited; no model saved")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in outcome.result.deltas.items():
            params[name].add_(d)
    try:
        return save_model(model, tokenizer, path, {"base": base, "edit": {
            "method": method, "case_id": outcome.case_id, "edited_layers": outcome.edited_layers, "preset": preset,
            "requests": requests, "seconds_per_fact": outcome.seconds}})
    finally:
        outcome.result.restore(model)
