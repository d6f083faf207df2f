"""Knowledge metrics on FactRecords: retention (seed 000 Eq. 1), CounterFact ES/PS/NS
(seed 001 Eq. 8, 11, 13) and zsRE token accuracy (Eq. 7, 10, 12).

Definitions (ARCHITECTURE "Knowledge probes and metrics"):

- A target's tokens are the tokens of ``tok(prompt + " " + target)`` after those of
  ``tok(prompt)`` (never the target tokenised alone); its *probe token* is the first of
  them that is not a stop token.
- Retention: the fact is retained iff the prompt's first non-stop token (mode
  ``greedy`` or ``masked_argmax``, see :class:`~editdecay.evaluate.probes.Prober`)
  equals the target's probe token. ``retention_true`` uses ``target_true``,
  ``retention_new`` uses ``target_new``.
- CounterFact: P(x|p) = exp(-mean token NLL of x after p) (``prob="joint"``: the
  product). ES = [P(new) > P(true)] on the rewrite prompt; PS = mean of the same over
  paraphrases; NS = mean of [P(answer) > P(new)] over neighbourhood prompts. Per case,
  then averaged over cases.
- zsRE: teacher-forced argmax accuracy of the target tokens (ES: target_new on the
  prompt; PS: on paraphrases; NS: each neighbourhood prompt's own answer). A fact's
  binary success (for EFR and transitions) is "every target token is the argmax".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..facts.record import FactRecord
from .probes import Prober, ProbeResult

PROB_MODES = ("mean", "joint")


def split_target(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """``(context_ids, target_ids)`` with ``context + target == tok(prompt + " " + target)``.

    The context is ``tok(prompt)``. A prompt with trailing whitespace is re-split
    without it (``"is "`` + ``" Paris"`` would otherwise put a lone space token before
    the target). When ``tok(prompt)`` is still not a prefix of the joined tokens (the
    tokenizer merges across the boundary), ``ValueError`` names the prompt and target:
    any split would move prompt text into the target or the reverse."""
    stripped = prompt.rstrip()
    if stripped != prompt and stripped:
        prompt = stripped
    ctx = list(tokenizer(prompt)["input_ids"])
    if not ctx:
        raise ValueError(f"prompt {prompt!r} tokenises to nothing")
    joined = list(tokenizer(prompt + " " + target)["input_ids"])
    if joined[: len(ctx)] != ctx or len(joined) == len(ctx):
        raise ValueError(
            f"prompt {prompt!r} and target {target!r}: the tokenizer merges tokens across their boundary "
            f"(tok(prompt) is not a prefix of tok(prompt + ' ' + target)); rephrase the prompt or the target"
        )
    return ctx, joined[len(ctx):]


def probe_token(tokenizer, prompt: str, target: str, stop_mask: torch.Tensor) -> int | None:
    """The first target token (in context) that is not a stop token, or None."""
    return first_non_stop_id(split_target(tokenizer, prompt, target)[1], stop_mask)


@dataclass
class FactScore:
    """Per-fact outcome of :func:`score_facts` (None where undefined)."""

    case_id: str
    first_non_stop: str
    capped: bool
    retained_true: bool | None
    retained_new: bool
    es: float
    ps: float | None
    ns: float | None
    success: bool
    """Binary edit success on the rewrite prompt: CounterFact P(new) > P(true) (or
    retention_new without a true target); zsRE every target_new token is the argmax."""
    margin: float | None = None
    """Edit strength on the rewrite prompt: log P(new) − log P(true) (per-token mean
    log-probabilities, or sums with ``prob="joint"``); None without a true target."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FactScores:
    mode: str
    prob: str
    facts: list[FactScore]

    def _mean(self, name: str) -> float:
        vals = [getattr(f, name) for f in self.facts if getattr(f, name) is not None]
        return float(sum(vals) / len(vals)) if vals else math.nan

    @property
    def retention_true(self) -> float:
        return self._mean("retained_true")

    @property
    def retention_new(self) -> float:
        return self._mean("retained_new")

    @property
    def es(self) -> float:
        return self._mean("es")

    @property
    def ps(self) -> float:
        return self._mean("ps")

    @property
    def ns(self) -> float:
        return self._mean("ns")

    def summary(self) -> dict:
        return {
            "n_facts": len(self.facts),
            "mode": self.mode,
            "retention_true": self.retention_true,
            "retention_new": self.retention_new,
            "es": self.es,
            "ps": self.ps,
            "ns": self.ns,
        }


def score_facts(
    model,
    tokenizer,
    facts: Sequence[FactRecord],
    *,
    mode: str = "greedy",
    prob: str = "mean",
    prober: Prober | None = None,
    decided: Sequence[ProbeResult] | None = None,
) -> FactScores:
    """Retention (true and new targets) and ES/PS/NS of every fact, batched: one probe
    pass over the rewrite prompts and one teacher-forced pass over all (prompt, target)
    pairs. ``decided``: the probe results of the rewrite prompts in ``mode`` when the
    caller has them already (that pass is then skipped)."""
    if prob not in PROB_MODES:
        raise ValueError(f"unknown probability mode {prob!r}: use one of {', '.join(PROB_MODES)}")
    prober = prober or Prober(model, tokenizer)
    texts = [f.text for f in facts]
    if decided is None:
        decided = prober.probe(texts, k=0, mode=mode)
    elif len(decided) != len(facts):
        raise ValueError(f"decided has {len(decided)} probe results for {len(facts)} facts")

    pairs: list[tuple[list[int], list[int]]] = []
    slots: list[dict[str, list[int]]] = []  # per fact: name -> indices into pairs

    def add(prompt: str, target: str) -> int:
        pairs.append(split_target(tokenizer, prompt, target))
        return len(pairs) - 1

    probes_true, probes_new = [], []
    for f, text in zip(facts, texts):
        s: dict[str, list[int]] = {"es_new": [add(text, f.target_new)]}
        probes_new.append(first_non_stop_id(pairs[s["es_new"][0]][1], prober.stop_mask))
        if f.target_true is not None:
            s["es_true"] = [add(text, f.target_true)]
            probes_true.append(first_non_stop_id(pairs[s["es_true"][0]][1], prober.stop_mask))
        else:
            probes_true.append(None)
        if f.metric == "zsre":
            s["ps_new"] = [add(p, f.target_new) for p in f.paraphrases]
            s["ns_ans"] = [add(n.prompt, n.target) for n in f.neighborhood]
        else:
            if f.target_true is not None:
                s["ps_new"] = [add(p, f.target_new) for p in f.paraphrases]
                s["ps_true"] = [add(p, f.target_true) for p in f.paraphrases]
            s["ns_ans"] = [add(n.prompt, n.target) for n in f.neighborhood]
            s["ns_new"] = [add(n.prompt, f.target_new) for n in f.neighborhood]
        slots.append(s)
    scores = prober.score_targets(pairs)

    def p(i: int) -> float:
        lp = scores[i].logprobs
        return sum(lp) if prob == "joint" else sum(lp) / len(lp)

    out = []
    for f, d, s, pt, pn in zip(facts, decided, slots, probes_true, probes_new):
        g = d.first_non_stop
        margin = p(s["es_new"][0]) - p(s["es_true"][0]) if "es_true" in s else None
        if f.metric == "zsre":
            es = scores[s["es_new"][0]].token_accuracy
            ps = _avg([scores[i].token_accuracy for i in s["ps_new"]])
            ns = _avg([scores[i].token_accuracy for i in s["ns_ans"]])
            success = all(scores[s["es_new"][0]].argmax)
        else:
            if "es_true" in s:
                es = float(p(s["es_new"][0]) > p(s["es_true"][0]))
                ps = _avg([float(p(a) > p(b)) for a, b in zip(s.get("ps_new", []), s.get("ps_true", []))])
            else:
                es, ps = float(g.id is not None and g.id == pn), None
            ns = _avg([float(p(a) > p(b)) for a, b in zip(s["ns_ans"], s["ns_new"])])
            success = bool(es)
        out.append(FactScore(
            case_id=f.case_id,
            first_non_stop=g.token,
            capped=g.capped,
            retained_true=None if f.target_true is None else (g.id is not None and g.id == pt),
            retained_new=g.id is not None and g.id == pn,
            es=es, ps=ps, ns=ns, success=success, margin=margin,
        ))
    return FactScores(mode=mode, prob=prob, facts=out)


def first_non_stop_id(ids: list[int], stop_mask: torch.Tensor) -> int | None:
    """The first of ``ids`` that is not a stop token (ids beyond the mask count as non-stop)."""
    for t in ids:
        if t >= len(stop_mask) or not stop_mask[t]:
            return t
    return None


def _avg(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
