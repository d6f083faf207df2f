"""Probe callbacks run at every evaluation of :func:`~editdecay.finetune.trainer.train`.

:class:`FactProbe` measures, in one batched probe pass over the edit and intrinsic
prompts: retention of the edited facts (``target_new``) and of the intrinsic facts
(``target_true``), whether edited facts fell back to their true object, the top-k raw
next tokens of edit prompts (seed 000 Table 1) and the token-category masses at the
first non-stop position (seed 000 Fig. 4), plus per-fact outcomes for transitions;
with ``scores`` also each edited fact's ES/PS/NS, success and margin
(:func:`~editdecay.evaluate.metrics.score_facts`: a fine-tuning budget axis reports them
at every budget point).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..evaluate.probes import Prober
from ..evaluate.tokens import category_ids, category_masses, mean_masses
from ..facts.record import FactRecord


class FactProbe:
    """Callable ``probe(model, step) -> dict`` over fixed edit and intrinsic fact sets.

    ``model`` is the language model to probe (for peft: the wrapped base model, whose
    layers carry the adapters); the ``model`` argument of the call is ignored so that
    trainers may pass a wrapper. ``pool`` supplies related objects (same relation) for
    the token categories; by default the two sets themselves.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        edit_facts: Sequence[FactRecord] = (),
        intrinsic_facts: Sequence[FactRecord] = (),
        *,
        pool: Sequence[FactRecord] | None = None,
        mode: str = "greedy",
        top_k: int = 3,
        n_top_facts: int = 10,
        batch_size: int = 32,
        scores: bool = False,
        prob: str = "mean",
    ) -> None:
        self.model = model
        self.edit = list(edit_facts)
        self.intrinsic = list(intrinsic_facts)
        self.mode = mode
        self.top_k = top_k
        self.n_top = n_top_facts
        self.scores, self.prob = scores, prob
        self.calls = 0
        self.prober = Prober(model, tokenizer, batch_size=batch_size, progress=False)
        pool = list(pool) if pool is not None else self.edit + self.intrinsic
        mask = self.prober.stop_mask
        self.ids = [category_ids(tokenizer, f, mask, pool, edited=True) for f in self.edit]
        self.ids += [category_ids(tokenizer, f, mask, pool, edited=False) for f in self.intrinsic]

    def __call__(self, model: nn.Module | None = None, step: int = 0) -> dict[str, Any]:
        facts = self.edit + self.intrinsic
        if not facts:
            return {}
        self.calls += 1
        mask = self.prober.stop_mask

        def masses(i, probs):
            e, t, rel = self.ids[i]
            return category_masses(probs, mask, e, t, rel)

        res = self.prober.probe([f.text for f in facts], k=self.top_k, mode=self.mode, at_decision=masses)
        n_e = len(self.edit)
        got = [r.first_non_stop.id for r in res]
        new_ok = [got[i] is not None and got[i] == self.ids[i][0] for i in range(n_e)]
        back = [got[i] is not None and got[i] == self.ids[i][1] for i in range(n_e)]
        true_ok = [got[i] is not None and got[i] == self.ids[i][1] for i in range(n_e, len(facts))]
        return {
            "retention_new": _mean(new_ok),
            "retention_true": _mean(true_ok),
            "edit_reverted": _mean(back),
            "n_edit": n_e,
            "n_intrinsic": len(self.intrinsic),
            "categories": {"edited": mean_masses([r.extra for r in res[:n_e]]),
                           "intrinsic": mean_masses([r.extra for r in res[n_e:]])},
            "top": [{"case_id": f.case_id, "first_non_stop": r.first_non_stop.token,
                     "tokens": [[t.token, round(t.prob, 6)] for t in r.top]}
                    for f, r in zip(self.edit[: self.n_top], res[: self.n_top])],
            "per_fact": {"edit": new_ok, "intrinsic": true_ok},
            **({"scores": self._scores(res[:n_e])} if self.scores and self.edit else {}),
        }

    def _scores(self, decided) -> list[dict[str, Any]]:
        """ES/PS/NS, success and margin of the edited facts; their greedy decisions are this
        probe's (no second pass over the rewrite prompts)."""
        from ..evaluate.metrics import score_facts

        sc = score_facts(self.model, self.prober.tokenizer, self.edit, mode=self.mode, prob=self.prob,
                         prober=self.prober, decided=decided)
        return [{"es": f.es, "ps": f.ps, "ns": f.ns, "success": f.success, "margin": f.margin} for f in sc.facts]


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
