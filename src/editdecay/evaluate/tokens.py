"""Token categories (seed 000 §3.4, Fig. 4) and top-k tables (Table 1).

At the position where a fact's first non-stop token is decided, the probability mass
over non-stop tokens is split into the **edited** target's probe token, the **true**
target's probe token, **related** terms (probe tokens of the other objects of the same
relation in the dataset, the two targets excluded) and **other**; precedence edited >
true > related. Masses are fractions of the non-stop mass (they sum to 1); the
non-stop mass itself is reported as ``nonstop``. Intrinsic facts have no edited
category (pass ``edited=None``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..facts.record import FactRecord
from .metrics import probe_token

CATEGORIES = ("edited", "true", "related", "other")


def category_masses(
    probs: torch.Tensor,
    stop_mask: torch.Tensor,
    edited: int | None,
    true: int | None,
    related: Iterable[int] = (),
) -> dict[str, float]:
    """Split one next-token distribution's non-stop mass into the four categories."""
    p = probs.detach().float().masked_fill(stop_mask.to(probs.device), 0.0)
    total = float(p.sum())
    out = {c: 0.0 for c in CATEGORIES}
    out["nonstop"] = total
    if total <= 0:
        return out
    taken: set[int] = set()
    if edited is not None:
        out["edited"] = float(p[edited]) / total
        taken.add(edited)
    if true is not None and true not in taken:
        out["true"] = float(p[true]) / total
        taken.add(true)
    rel = sorted(set(related) - taken)
    if rel:
        out["related"] = float(p[torch.tensor(rel, device=p.device)].sum()) / total
    out["other"] = max(0.0, 1.0 - out["edited"] - out["true"] - out["related"])
    return out


def related_objects(fact: FactRecord, pool: Sequence[FactRecord]) -> list[str]:
    """Objects (true and new targets) of ``pool`` facts with ``fact``'s relation, the
    fact's own two targets excluded (case-insensitive)."""
    if fact.relation_id is None:
        return []
    own = {t.strip().lower() for t in (fact.target_true, fact.target_new) if t}
    seen: dict[str, str] = {}
    for g in pool:
        if g.relation_id != fact.relation_id:
            continue
        for t in (g.target_true, g.target_new):
            if t and t.strip().lower() not in own:
                seen.setdefault(t.strip().lower(), t)
    return list(seen.values())


def category_ids(tokenizer, fact: FactRecord, stop_mask: torch.Tensor, pool: Sequence[FactRecord] = (),
                 edited: bool = True) -> tuple[int | None, int | None, list[int]]:
    """``(edited id, true id, related ids)``: probe tokens (first non-stop target token
    in the context of the fact's prompt) of its targets and of the related objects."""
    text = fact.text
    e = probe_token(tokenizer, text, fact.target_new, stop_mask) if edited else None
    t = probe_token(tokenizer, text, fact.target_true, stop_mask) if fact.target_true else None
    rel = {probe_token(tokenizer, text, o, stop_mask) for o in related_objects(fact, pool)}
    return e, t, sorted(i for i in rel if i is not None and i not in (e, t))


def mean_masses(rows: Sequence[dict[str, float] | None]) -> dict[str, float]:
    """Average category masses over facts (capped probes, given as None, are skipped)."""
    rows = [r for r in rows if r is not None]
    keys = (*CATEGORIES, "nonstop")
    if not rows:
        return {k: float("nan") for k in keys} | {"n": 0}
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys} | {"n": len(rows)}
