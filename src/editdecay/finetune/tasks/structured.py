"""The ``structured`` task: facts the model gets wrong, trained on prompt + true target
(loss on the target only); accuracy is retention of the true target on a fixed sample
of the training facts. Default data: the built-in facts."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...errors import DataError, EditdecayError
from ...facts.record import FactRecord, facts_hash
from ...torch_utils import pad_id
from .base import (
    Example, Task, _as_paths, _EvalMode, _hygiene, _lm_of, _split_from_train, lm_eval_loss, register_task,
)


@dataclass
class StructuredTask(Task):
    """Facts trained on their true target; accuracy = retention of the true target on
    the validation facts (greedy first non-stop token, as ``score_facts``)."""

    tokenizer: Any = field(default=None, repr=False)
    train_facts: list[FactRecord] = field(default_factory=list, repr=False)
    val_facts: list[FactRecord] = field(default_factory=list, repr=False)
    probe_mode: str = "greedy"
    _prober: Any = field(default=None, init=False, repr=False, compare=False)

    def _prober_for(self, module: nn.Module):
        from ...evaluate.probes import Prober

        lm = _lm_of(module)
        if self._prober is None or self._prober.vocab_size != lm.get_output_embeddings().weight.shape[0]:
            self._prober = Prober(lm, self.tokenizer, progress=False)
        self._prober.model = lm  # same tokenizer and vocabulary: the stop mask is reused
        return self._prober

    def evaluate(self, module: nn.Module, batch_size: int = 8) -> dict[str, float]:
        """``{"loss": target-token loss, "acc": retention of the true target}``."""
        with _EvalMode(module):
            loss = lm_eval_loss(module, self.val, self.pad_id, batch_size)
            kept = retention_true(self._prober_for(module), self.tokenizer, self.val_facts, self.probe_mode)
        return {"loss": loss, "acc": sum(kept) / len(kept) if kept else float("nan")}


def retention_true(prober, tokenizer, facts: Sequence[FactRecord], mode: str = "greedy") -> list[bool]:
    """Per fact: is the prompt's first non-stop token the true target's probe token?
    (``score_facts``' ``retained_true`` without the other scores.)"""
    from ...evaluate.metrics import probe_token

    if not facts:
        return []
    decided = prober.probe([f.text for f in facts], k=0, mode=mode)
    out = []
    for f, d in zip(facts, decided):
        t = probe_token(tokenizer, f.text, f.target_true, prober.stop_mask)
        out.append(d.first_non_stop.id is not None and d.first_non_stop.id == t)
    return out


def _load_structured(tok, data, *, model, n_train, n_val, seed, exclude_facts, hygiene_facts, stopwords,
                     probe_mode="greedy", probe_chunk=256, **_) -> StructuredTask:
    from ...evaluate.metrics import split_target
    from ...evaluate.probes import Prober
    from ...facts.datasets import load_facts

    if model is None:
        raise EditdecayError("the structured task needs the model (it trains on the facts the model gets wrong)")
    if data is None:
        facts, source = load_facts("", format="builtin"), "builtin-facts"
    elif isinstance(data, (list, tuple)) and data and all(isinstance(f, FactRecord) for f in data):
        facts, source = list(data), "facts:inline"
    else:
        files = _as_paths(data, "structured")
        facts = [f for p in files for f in load_facts(p)]
        source = ", ".join(map(str, files))
    sha = facts_hash(facts)
    excluded = {f.subject.strip().lower() for f in exclude_facts}
    pool = [f for f in facts if f.target_true and f.subject.strip().lower() not in excluded]
    n_no_true = sum(1 for f in facts if not f.target_true)
    keep, report = _hygiene([f"{f.text} {f.target_true}" for f in pool], hygiene_facts, stopwords)
    pool = [pool[i] for i in keep]
    random.Random(seed).shuffle(pool)
    lm = _lm_of(model)
    prober = Prober(lm, tok, progress=False)
    wrong: list[FactRecord] = []
    probed = 0
    with _EvalMode(lm):
        while probed < len(pool) and (n_train is None or len(wrong) < n_train):
            size = probe_chunk if n_train is None else min(probe_chunk, max(16, 2 * (n_train - len(wrong))))
            chunk = pool[probed : probed + size]
            probed += len(chunk)
            wrong += [f for f, ok in zip(chunk, retention_true(prober, tok, chunk, probe_mode)) if not ok]
    if n_train is not None:
        wrong = wrong[:n_train]
    if not wrong:
        raise DataError(f"{source}: the model gets none of the {probed} probed facts wrong; nothing to train on")
    train_facts, val_facts = _split_from_train(wrong, None, n_val, seed)

    def example(f: FactRecord) -> Example:
        ctx, tgt = split_target(tok, f.text, f.target_true)
        return Example(tuple(ctx + tgt), tuple([-100] * len(ctx) + tgt))

    info = {"n_facts": len(facts), "n_without_true_target": n_no_true,
            "n_excluded_subject": sum(1 for f in facts if f.target_true and f.subject.strip().lower() in excluded),
            "n_probed": probed, "n_wrong": len(wrong), "probe_mode": probe_mode,
            "hygiene": report.to_dict() if report else None}
    task = StructuredTask("structured", "acc", [example(f) for f in train_facts], [example(f) for f in val_facts],
                          pad_id(tok), source, sha, info, tokenizer=tok, train_facts=train_facts,
                          val_facts=val_facts, probe_mode=probe_mode)
    task._prober = prober
    return task


register_task("structured", loader=_load_structured, n_val=100)
