"""The ``classification`` task: IMDB (CSV ``text,label``; JSON ``{sentence, label:
Good|Bad}``) with a linear head on the last real token's hidden state; accuracy on a
disjoint validation set."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DataError, EditdecayError
from ...torch_utils import device_of, pad_id
from .base import (
    Batch, Example, Task, _as_paths, _by_length, _eos, _EvalMode, _expand, _field, _hash_files, _hygiene, _lm_of,
    _split_disjoint, collate, read_json_records, register_task,
)

log = logging.getLogger(__name__)


class SequenceClassifier(nn.Module):
    """A causal LM (possibly peft-wrapped) with a linear head on the final hidden state
    of each sequence's last real token, found by length (right padding assumed)."""

    def __init__(self, lm: nn.Module, n_classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.lm = lm
        inner = _lm_of(lm)
        w = inner.get_output_embeddings().weight
        self.head = nn.Linear(w.shape[1], n_classes).to(device=w.device, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 0.02)
            self.head.bias.zero_()
        self.head.requires_grad_(True)

    @staticmethod
    def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
        """Index of each row's last real token: its length − 1 (right padding)."""
        return attention_mask.sum(dim=1) - 1

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inner = _lm_of(self.lm)
        h = inner.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        pos = self.last_positions(attention_mask)
        return h[torch.arange(h.shape[0], device=h.device), pos]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> torch.Tensor:
        """Class logits ``(batch, n_classes)``."""
        return self.head(self.pooled(input_ids, attention_mask).to(self.head.weight.dtype))


@dataclass
class ClassificationTask(Task):
    """Sequence classification with a linear head (trainable under every policy)."""

    n_classes: int = 2
    head_seed: int = 0

    def wrap(self, model: nn.Module) -> SequenceClassifier:
        """The LM (after ``prepare_model``) with a new, seeded linear head."""
        return SequenceClassifier(model, self.n_classes, self.head_seed)

    @staticmethod
    def _check(module: nn.Module) -> SequenceClassifier:
        if not isinstance(module, SequenceClassifier):
            raise EditdecayError("the classification task trains and evaluates task.wrap(model), not the bare model")
        return module

    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """Cross-entropy of the head's logits."""
        logits = self._check(module)(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["label"])

    def evaluate(self, module: nn.Module, batch_size: int = 8) -> dict[str, float]:
        """``{"acc": accuracy, "loss": mean cross-entropy}`` on the validation set."""
        clf = self._check(module)
        dev = device_of(clf)
        correct, total, n = 0, 0.0, 0
        with _EvalMode(clf):
            for chunk in _by_length(self.val, batch_size):
                b = collate(chunk, self.pad_id, dev)
                logits = clf(b["input_ids"], b["attention_mask"]).float()
                total += float(F.cross_entropy(logits, b["label"], reduction="sum"))
                correct += int((logits.argmax(-1) == b["label"]).sum())
                n += len(chunk)
        return {"acc": correct / n if n else float("nan"), "loss": total / n if n else float("nan")}


_IMDB_LABELS = MappingProxyType({"good": 1, "bad": 0, "positive": 1, "negative": 0, "pos": 1, "neg": 0, "1": 1, "0": 0})


def _imdb_label(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)) or str(v).strip().lower() not in _IMDB_LABELS:
        raise DataError(f"{where}: field 'label' must be Good/Bad or 1/0, got {v!r}")
    return _IMDB_LABELS[str(v).strip().lower()]


def read_imdb(p: Path) -> list[tuple[str, int]]:
    """``(text, label)`` pairs: CSV with columns ``text,label`` (1 positive, 0 negative)
    or JSON/JSONL ``{sentence|text, label: Good|Bad|1|0}`` (Good = 1)."""
    out = []
    if p.suffix.lower() == ".csv":
        with p.open(newline="", encoding="utf-8") as fh:
            try:
                reader = csv.DictReader(fh)
                cols = reader.fieldnames or []
                for name in ("text", "label"):
                    if name not in cols:
                        raise DataError(f"{p}: no column {name!r} (header: {', '.join(cols) or 'empty'})")
                for i, row in enumerate(reader):
                    where = f"{p}: row {i}"
                    text = row.get("text")
                    if not isinstance(text, str) or not text.strip():
                        raise DataError(f"{where}: field 'text' is empty")
                    out.append((text, _imdb_label(row.get("label"), where)))
            except (csv.Error, UnicodeDecodeError) as e:
                raise DataError(f"{p}: not a readable CSV file ({e})") from None
        return out
    for i, rec in enumerate(read_json_records(p)):
        where = f"{p}: record {i}"
        key = "sentence" if isinstance(rec, dict) and "sentence" in rec else "text"
        text = _field(rec, key, where)
        if not text.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        out.append((text, _imdb_label(_field(rec, "label", where, (str, int)), where)))
    return out


def _load_classification(tok, data, *, n_train, n_val, cutoff, seed, hygiene_facts, stopwords, **_) -> ClassificationTask:
    files = _expand(_as_paths(data, "classification"), "classification", (".csv", ".json", ".jsonl"),
                    skip_names=("labels.json",))
    pairs: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    dup, conflicts, per_file = 0, 0, {}
    for f in files:
        rows = read_imdb(f)
        per_file[str(f)] = len(rows)
        for text, label in rows:
            if text in seen:
                dup += 1
                conflicts += seen[text] != label
                continue
            seen[text] = label
            pairs.append((text, label))
    if dup:
        log.info("classification: dropped %d duplicate texts (%d with conflicting labels)", dup, conflicts)
    keep, report = _hygiene([t for t, _ in pairs], hygiene_facts, stopwords)
    pairs = [pairs[i] for i in keep]
    train_p, val_p = _split_disjoint(pairs, n_train, n_val, seed, "classification")
    eos = _eos(tok)

    def examples(ps: list[tuple[str, int]]) -> list[Example]:
        out = []
        for (_, label), ids in zip(ps, tok([t for t, _ in ps])["input_ids"]):
            t = tuple(list(ids)[: cutoff - 1] + [eos])
            out.append(Example(t, t, label))
        return out

    train, val = examples(train_p), examples(val_p)
    info = {"files": per_file, "n_records": sum(per_file.values()), "n_duplicates_dropped": dup,
            "n_label_conflicts": conflicts, "n_unique": len(seen), "cutoff": cutoff,
            "n_truncated": sum(len(e.input_ids) >= cutoff for e in train + val),
            "train_label_counts": [sum(e.label == c for e in train) for c in (0, 1)],
            "val_label_counts": [sum(e.label == c for e in val) for c in (0, 1)],
            "hygiene": report.to_dict() if report else None}
    return ClassificationTask("classification", "acc", train, val, pad_id(tok), ", ".join(map(str, files)),
                              _hash_files(files), info, n_classes=2, head_seed=seed)


register_task("classification", loader=_load_classification, n_val=100, cutoff=256)
