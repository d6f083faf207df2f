"""Fact selection (seed 000 App. A): the confidence filter, then seeded edit and
intrinsic sets that share no subject, relation or object.

Confidence filter: at the first non-stop position (mode ``greedy``: after greedily
decoding through stop tokens; ``masked_argmax``: the first position, stop tokens
masked) the true target's probe token is the decided token, and
p(true) − p(second) ≥ margin, where p(second) is the largest probability of any other
token (stop tokens included). Filter outcomes are cached on disk keyed by model
identity, dataset hash, stop-list hash, margin and mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..cache import atomic_dir, cache_root
from ..errors import EditdecayError
from ..evaluate.metrics import probe_token
from ..evaluate.probes import PROBE_MODES, Prober
from ..models.loading import model_identity
from .record import FactRecord, facts_hash
from .stopwords import stopwords_hash

log = logging.getLogger(__name__)


class SelectionError(EditdecayError):
    """Too few facts pass the filter or fit the disjointness constraints."""


@dataclass(frozen=True)
class FilterOutcome:
    """Confidence-filter outcome of one fact."""

    case_id: str
    passed: bool
    p_true: float
    """Probability of the true probe token at the decision position (0 if capped)."""
    p_second: float
    """Largest probability of any other token there."""
    decided: str
    """The decided first non-stop token ('' if capped)."""


def confidence_filter(
    model,
    tokenizer,
    facts: Sequence[FactRecord],
    *,
    margin: float = 0.1,
    mode: str = "greedy",
    prober: Prober | None = None,
    cache: bool = True,
    cache_dir=None,
) -> list[FilterOutcome]:
    """Filter outcome of every fact (cached on disk when ``cache``)."""
    if mode not in PROBE_MODES:
        raise ValueError(f"unknown probe mode {mode!r}: use one of {', '.join(PROBE_MODES)}")
    prober = prober or Prober(model, tokenizer)
    key_src = json.dumps([model_identity(model), facts_hash(list(facts)), stopwords_hash(prober.stopwords),
                          float(margin), mode, prober.max_steps])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    entry = cache_root(cache_dir) / "selections" / key
    if cache and (entry / "filter.json").exists():
        data = json.loads((entry / "filter.json").read_text())
        log.info("confidence filter: cache hit %s", entry)
        return [FilterOutcome(**d) for d in data["outcomes"]]

    true_ids: list[int | None] = []
    for f in facts:
        if f.target_true is None:
            raise SelectionError(f"fact {f.case_id}: the confidence filter needs a true target (target_true is missing)")
        true_ids.append(probe_token(tokenizer, f.text, f.target_true, prober.stop_mask))

    def at_decision(i: int, probs: torch.Tensor):
        t = true_ids[i]
        if t is None:
            return 0.0, float(probs.max())
        p_true = float(probs[t])
        top2 = probs.topk(2)
        p_second = float(top2.values[1]) if int(top2.indices[0]) == t else float(top2.values[0])
        return p_true, p_second

    res = prober.probe([f.text for f in facts], k=0, mode=mode, at_decision=at_decision)
    outcomes = []
    for f, r, t in zip(facts, res, true_ids):
        g = r.first_non_stop
        p_true, p_second = r.extra if r.extra is not None else (0.0, 0.0)
        passed = t is not None and g.id == t and p_true - p_second >= margin
        outcomes.append(FilterOutcome(f.case_id, bool(passed), p_true, p_second, g.token))
    if cache:
        with atomic_dir(entry) as tmp:
            (tmp / "filter.json").write_text(json.dumps({"key": json.loads(key_src), "outcomes": [asdict(o) for o in outcomes]}))
    return outcomes


def _objects(f: FactRecord) -> set[str]:
    return {o.strip().lower() for o in (f.target_true, f.target_new) if o}


def split_sets(
    facts: Sequence[FactRecord],
    n_edit: int = 50,
    n_intrinsic: int = 100,
    seed: int = 0,
) -> tuple[list[FactRecord], list[FactRecord]]:
    """Seeded edit and intrinsic sets with no shared subject, relation or object.

    Facts are shuffled with ``seed``; subjects are de-duplicated (case-insensitive);
    each fact then joins the set that is proportionally emptier when it is compatible
    with the other set (its relation and objects unused there), else the other set if
    compatible. Raises :class:`SelectionError` when the sets cannot be filled.
    """
    order = list(facts)
    random.Random(seed).shuffle(order)
    sets: dict[str, list[FactRecord]] = {"edit": [], "intrinsic": []}
    want = {"edit": n_edit, "intrinsic": n_intrinsic}
    rels = {"edit": set(), "intrinsic": set()}
    objs = {"edit": set(), "intrinsic": set()}
    subjects: set[str] = set()
    for f in order:
        subj = f.subject.strip().lower()
        if subj in subjects:
            continue
        o = _objects(f)
        rel = f.relation_id or f"?{f.prompt}"

        def fits(side: str) -> bool:
            other = "intrinsic" if side == "edit" else "edit"
            return len(sets[side]) < want[side] and rel not in rels[other] and not (o & objs[other])

        sides = sorted(sets, key=lambda s: len(sets[s]) / max(want[s], 1))
        side = next((s for s in sides if fits(s)), None)
        if side is None:
            continue
        sets[side].append(f)
        rels[side].add(rel)
        objs[side] |= o
        subjects.add(subj)
        if all(len(sets[s]) >= want[s] for s in sets):
            break
    if len(sets["edit"]) < n_edit or len(sets["intrinsic"]) < n_intrinsic:
        raise SelectionError(
            f"only {len(facts)} facts passed the confidence filter; with disjoint subjects, relations and "
            f"objects {len(sets['edit'])} edit and {len(sets['intrinsic'])} intrinsic facts fit, but "
            f"{n_edit} and {n_intrinsic} were asked for (lower the set sizes or the margin)"
        )
    return sets["edit"], sets["intrinsic"]


@dataclass
class Selection:
    edit: list[FactRecord]
    intrinsic: list[FactRecord]
    stats: dict


def select_facts(
    model,
    tokenizer,
    facts: Sequence[FactRecord],
    *,
    n_edit: int = 50,
    n_intrinsic: int = 100,
    margin: float = 0.1,
    mode: str = "greedy",
    seed: int = 0,
    prober: Prober | None = None,
    cache: bool = True,
    cache_dir=None,
) -> Selection:
    """Confidence filter, then :func:`split_sets`; ``stats`` as seed 000 Table 3."""
    outcomes = confidence_filter(model, tokenizer, facts, margin=margin, mode=mode, prober=prober,
                                 cache=cache, cache_dir=cache_dir)
    by_id = {o.case_id: o for o in outcomes}
    passed = [f for f, o in zip(facts, outcomes) if o.passed]
    if len(passed) < n_edit + n_intrinsic:
        raise SelectionError(
            f"only {len(passed)} of {len(facts)} facts pass the confidence filter (margin {margin}, mode {mode}); "
            f"{n_edit} edit + {n_intrinsic} intrinsic were asked for"
        )
    edit, intrinsic = split_sets(passed, n_edit, n_intrinsic, seed)

    def part(fs: list[FactRecord]) -> dict:
        return {
            "n": len(fs),
            "mean_p_true": sum(by_id[f.case_id].p_true for f in fs) / len(fs) if fs else float("nan"),
            "mean_p_second": sum(by_id[f.case_id].p_second for f in fs) / len(fs) if fs else float("nan"),
            "n_relations": len({f.relation_id for f in fs}),
        }

    stats = {
        "model": model_identity(model),
        "dataset_hash": facts_hash(list(facts)),
        "stopwords_hash": stopwords_hash(),
        "mode": mode,
        "margin": margin,
        "seed": seed,
        "n_total": len(facts),
        "n_passed": len(passed),
        "pass_rate": len(passed) / len(facts) if facts else float("nan"),
        "passed_mean_p_true": sum(by_id[f.case_id].p_true for f in passed) / len(passed) if passed else float("nan"),
        "passed_mean_p_second": sum(by_id[f.case_id].p_second for f in passed) / len(passed) if passed else float("nan"),
        "edit": part(edit),
        "intrinsic": part(intrinsic),
    }
    return Selection(edit, intrinsic, stats)
