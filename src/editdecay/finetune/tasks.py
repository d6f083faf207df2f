"""Downstream fine-tuning tasks behind one interface.

A :class:`Task` holds tokenised training and validation examples and knows how to
batch them, which module to train (:meth:`Task.wrap`), its loss and its validation
metrics. :func:`load_task` builds one of :data:`TASKS`:

=================  ==========================================================  ========  ============
task               data                                                        metric    validation
=================  ==========================================================  ========  ============
``unstructured``   raw text (C4 JSONL ``{text}``, WikiText ``.raw``, ``.txt``),  loss      sample of train
                   packed into blocks; default: the offline stdlib corpus
``structured``     facts the model gets wrong, trained on prompt + true target  acc       sample of train
                   (loss on the target only); default: the built-in facts
``classification`` IMDB (CSV ``text,label``; JSON ``{sentence, label: Good|Bad}``)  acc   disjoint
                   with a linear head on the last real token's hidden state
``sft``            chat ``messages`` or Alpaca ``{instruction, input, output}``;  loss      sample of train
                   loss on assistant responses (end-of-turn token included)
``commonsense``    LLM-Adapters ``{instruction, input, output, answer}`` records  loss      disjoint
                   or the HellaSwag text layout; Alpaca prompt, loss on all
``hotpotqa``       HotpotQA JSON(L): question + supporting sentences → answer,   loss      disjoint
                   same recipe as commonsense
=================  ==========================================================  ========  ============

Validation follows seed 000 (unstructured, structured, SFT: a fixed sample of the
training set; classification: disjoint) and LLM-Adapters (commonsense, HotpotQA: held
out of the training records). Batches are right-padded with explicit lengths
(``attention_mask``), ``labels`` are -100 where no loss is taken; classification
batches also carry ``label``.

Data hygiene: with ``hygiene_facts`` every document (unstructured, before packing) or
record (the others: its content fields, not the prompt template) containing a word of
those facts is dropped (:mod:`editdecay.finetune.hygiene`); the report is in
``task.info["hygiene"]``.

Malformed files raise :class:`~editdecay.errors.DataError` naming the file, record and
field; a missing path names the path.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, EditdecayError
from ..facts.record import FactRecord, facts_hash
from .hygiene import HygieneReport, hygiene_keep

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

TASKS: tuple[str, ...] = ("unstructured", "structured", "classification", "sft", "commonsense", "hotpotqa")

#: Default validation size per task (CPU-sized; seed 000 uses 1,000 / 100 / 100 / 1,000).
DEFAULT_N_VAL = MappingProxyType({"unstructured": 64, "structured": 100, "classification": 100,
                                  "sft": 64, "commonsense": 120, "hotpotqa": 50})
#: Default token cutoff per record task (LLM-Adapters: 256).
DEFAULT_CUTOFF = MappingProxyType({"classification": 256, "sft": 512, "commonsense": 256, "hotpotqa": 256})

#: The Alpaca / LLM-Adapters prompt without and with an input. (LLM-Adapters'
#: ``generate_prompt`` literally carries source indentation and a stray "noqa"
#: comment inside the string; the clean Alpaca layout is used here.)
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
HELLASWAG_INSTRUCTION = ("Please choose the correct ending to complete the given sentence: {ctx}\n\n"
                         "Ending1: {e0} Ending2: {e1} Ending3: {e2} Ending4: {e3}\n\n"
                         "Answer format: ending1/ending2/ending3/ending4")
#: End-of-turn markers of common chat templates (labelled like EOS when present).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


def alpaca_prompt(instruction: str, input: str = "", output: str = "") -> str:
    """The Alpaca (LLM-Adapters) prompt followed by ``output``."""
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input) + output
    return ALPACA_PROMPT.format(instruction=instruction) + output


# ---------------------------------------------------------------------------------------
# examples, batches, the Task interface
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One tokenised example: ``labels`` has -100 where no loss is taken; ``label`` is
    the class of a classification example."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    label: int | None = None

    @property
    def n_labelled(self) -> int:
        return sum(t != -100 for t in self.labels)


def collate(examples: Sequence[Example], pad_id: int, device=None) -> Batch:
    """Right-padded ``input_ids``, ``attention_mask`` (from the lengths, never the pad
    id), ``labels`` (-100 at padding) and ``label`` when the examples carry one."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for r, e in enumerate(examples):
        k = len(e.input_ids)
        ids[r, :k] = torch.tensor(e.input_ids)
        labels[r, :k] = torch.tensor(e.labels)
        mask[r, :k] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if examples[0].label is not None:
        out["label"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def _lm_of(module: nn.Module) -> nn.Module:
    """The causal LM inside a peft wrapper (adapters injected), or the module itself."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _by_length(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for s in range(0, len(order), batch_size):
        yield [examples[i] for i in order[s : s + batch_size]]


@torch.no_grad()
def lm_eval_loss(module: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean next-token loss over every labelled token of ``examples`` (token-weighted)."""
    dev = _device(module)
    total, n = 0.0, 0
    for chunk in _by_length(examples, batch_size):
        b = collate(chunk, pad_id, dev)
        logits = module(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        lab = b["labels"][:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), lab.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        n += int((lab != -100).sum())
    return total / n if n else float("nan")


class _EvalMode:
    """Context: eval mode and no grad, restoring the training flag."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was = module, module.training

    def __enter__(self) -> None:
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        self.module.eval()

    def __exit__(self, *exc) -> None:
        self.module.train(self.was)
        torch.set_grad_enabled(self.grad)


@dataclass
class Task:
    """A downstream task: tokenised examples plus batching, loss and evaluation.

    Use with :func:`editdecay.finetune.trainer.train`::

        module = task.wrap(model)            # identity, or LM + classification head
        train(module, task.batches(8), cfg, evaluate=task.evaluate, loss_fn=task.loss)
    """

    name: str
    metric: str = field(metadata={"help": "The validation metric stop rules use: 'loss' or 'acc'."})
    train: list[Example]
    val: list[Example]
    pad_id: int
    source: str = field(metadata={"help": "Data files (comma-separated) or corpus id."})
    sha256: str = field(metadata={"help": "SHA-256 of the data: file bytes (several files: of their names and hashes), the corpus hash, or facts_hash."})
    info: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int, seed: int = 0, device=None) -> Iterator[Batch]:
        """Endless training batches: seeded shuffle, reshuffled every epoch, incomplete
        last batch of an epoch dropped (a batch is all examples when there are fewer)."""
        if not self.train:
            raise EditdecayError(f"task {self.name!r} has no training examples")
        rng = random.Random(seed)
        bs = min(batch_size, len(self.train))
        while True:
            order = list(range(len(self.train)))
            rng.shuffle(order)
            for i in range(0, len(order) - bs + 1, bs):
                yield collate([self.train[j] for j in order[i : i + bs]], self.pad_id, device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train and evaluate (the model itself for LM tasks)."""
        return model

    def loss(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean next-token loss over the labelled tokens of the batch."""
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def evaluate(self, module: nn.Module, batch_size: int = 8) -> dict[str, float]:
        """Validation metrics: ``{"loss": token-weighted mean loss}``."""
        with _EvalMode(module):
            return {"loss": lm_eval_loss(module, self.val, self.pad_id, batch_size)}

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (name, metric, source, hash, sizes, info)."""
        return {"task": self.name, "metric": self.metric, "source": self.source, "sha256": self.sha256,
                "n_train": len(self.train), "n_val": len(self.val),
                "train_tokens": sum(len(e.input_ids) for e in self.train), "info": self.info}


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
        from ..evaluate.probes import Prober

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
    from ..evaluate.metrics import probe_token

    if not facts:
        return []
    decided = prober.probe([f.text for f in facts], k=0, mode=mode)
    out = []
    for f, d in zip(facts, decided):
        t = probe_token(tokenizer, f.text, f.target_true, prober.stop_mask)
        out.append(d.first_non_stop.id is not None and d.first_non_stop.id == t)
    return out


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
        dev = _device(clf)
        correct, total, n = 0, 0.0, 0
        with _EvalMode(clf):
            for chunk in _by_length(self.val, batch_size):
                b = collate(chunk, self.pad_id, dev)
                logits = clf(b["input_ids"], b["attention_mask"]).float()
                total += float(F.cross_entropy(logits, b["label"], reduction="sum"))
                correct += int((logits.argmax(-1) == b["label"]).sum())
                n += len(chunk)
        return {"acc": correct / n if n else float("nan"), "loss": total / n if n else float("nan")}


# ---------------------------------------------------------------------------------------
# file reading helpers
# ---------------------------------------------------------------------------------------

def _as_paths(data, task: str) -> list[Path]:
    if data is None:
        raise DataError(f"task {task!r} needs data: pass a file or directory")
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise DataError(f"task {task!r}: no data files given")
    paths = []
    for item in items:
        p = Path(item).expanduser()
        if not p.exists():
            raise DataError(f"{task} data {str(p)!r} does not exist")
        paths.append(p)
    return paths


def _expand(paths: list[Path], task: str, suffixes: tuple[str, ...], skip_names: tuple[str, ...] = (),
            pattern: str | None = None) -> list[Path]:
    """Files as given; a directory contributes its files with ``suffixes`` (recursively,
    sorted) or, with ``pattern``, the files matching that glob."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob(pattern)) if pattern else sorted(
                q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in suffixes and q.name not in skip_names)
            if not found:
                what = pattern or " / ".join(suffixes)
                raise DataError(f"{task} data directory {str(p)!r} has no {what} files")
            out.extend(found)
        else:
            out.append(p)
    return out


def _hash_files(files: list[Path]) -> str:
    hashes = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    if len(files) == 1:
        return hashes[0]
    h = hashlib.sha256()
    for f, x in zip(files, hashes):
        h.update(f"{f.name}\0{x}\n".encode())
    return h.hexdigest()


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None


def read_json_records(p: Path) -> list[Any]:
    """A JSON list, or JSON Lines whatever the extension (HotpotQA's ``.json`` files are
    JSON Lines)."""
    import json

    text = _read_text(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise DataError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e2:
                    raise DataError(f"{p}: line {n} is not valid JSON ({e2.msg} at column {e2.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{p}: top level is a {type(data).__name__}, expected a list of records or JSON Lines")
    if not data:
        raise DataError(f"{p}: no records")
    return data


def _field(rec: Any, name: str, where: str, types: type | tuple = str, required: bool = True, default: Any = None) -> Any:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    if name not in rec or rec[name] is None:
        if required:
            raise DataError(f"{where}: field {name!r} is missing")
        return default
    v = rec[name]
    if not isinstance(v, types):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataError(f"{where}: field {name!r} must be {want}, got {type(v).__name__}")
    return v


def _split_from_train(items: list, n_train: int | None, n_val: int, seed: int) -> tuple[list, list]:
    """Training items (a seeded sample of ``n_train`` in their order, or all) and a fixed
    seeded sample of them for validation."""
    rng = random.Random(seed)
    train = items
    if n_train is not None and n_train < len(items):
        train = [items[i] for i in sorted(rng.sample(range(len(items)), n_train))]
    return train, rng.sample(train, min(n_val, len(train)))


def _split_disjoint(items: list, n_train: int | None, n_val: int, seed: int, task: str) -> tuple[list, list]:
    """Seeded shuffle; the first ``n_val`` items validate, the next ``n_train`` (or the rest) train."""
    if len(items) <= n_val:
        raise DataError(f"task {task!r}: {len(items)} records cannot give {n_val} disjoint validation records "
                        "and a training set (lower n_val)")
    order = list(items)
    random.Random(seed).shuffle(order)
    val, rest = order[:n_val], order[n_val:]
    return (rest if n_train is None else rest[:n_train]), val


def _hygiene(texts: list[str], facts, stopwords) -> tuple[list[int], HygieneReport | None]:
    if not facts:
        return list(range(len(texts))), None
    return hygiene_keep(texts, list(facts), stopwords)


def _pad_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def _eos(tok) -> int:
    if tok.eos_token_id is None:
        raise EditdecayError("the tokenizer has no EOS token; this task appends one")
    return int(tok.eos_token_id)


def _lm_examples(tok, texts: list[str], cutoff: int) -> tuple[list[Example], int]:
    """LLM-Adapters tokenisation: truncate to ``cutoff``; append EOS when the text ends
    before it (and does not end with EOS); loss on every token. Returns the examples
    and how many reached the cutoff."""
    eos = _eos(tok)
    out, at_cut = [], 0
    for ids in tok(texts, truncation=True, max_length=cutoff)["input_ids"]:
        ids = list(ids)
        if ids and ids[-1] != eos and len(ids) < cutoff:
            ids.append(eos)
        at_cut += len(ids) >= cutoff
        t = tuple(ids)
        out.append(Example(t, t))
    return out, at_cut


# ---------------------------------------------------------------------------------------
# unstructured
# ---------------------------------------------------------------------------------------

_WIKITEXT_HEADING = re.compile(r" ?= (?!=)(.+?)(?<!=) = ?")


def read_wikitext(p: Path) -> list[str]:
    """WikiText raw text split into articles: CRLF → LF; an article starts at a
    top-level heading line `` = Title = `` between blank lines (the blank-line rule
    keeps equation lines such as `` = 1 henry and capacitance C = `` inside articles)."""
    lines = _read_text(p).replace("\r\n", "\n").split("\n")
    heads = [i for i, line in enumerate(lines) if _WIKITEXT_HEADING.fullmatch(line)
             and (i == 0 or not lines[i - 1].strip()) and (i + 1 == len(lines) or not lines[i + 1].strip())]
    if not heads:
        raise DataError(f"{p}: no WikiText top-level heading (' = Title = ' between blank lines) found")
    bounds = ([0] if "\n".join(lines[: heads[0]]).strip() else []) + heads + [len(lines)]
    return [doc for a, b in zip(bounds, bounds[1:]) if (doc := "\n".join(lines[a:b]).strip())]


def read_documents(p: Path) -> list[str]:
    """Documents of one text file: ``.raw``/``.tokens`` WikiText articles, else
    :meth:`Corpus.from_path` (``.txt``, ``.jsonl`` ``{text}``, ``.json``)."""
    from ..editing.corpus import Corpus

    if p.suffix.lower() in (".raw", ".tokens"):
        return read_wikitext(p)
    return list(Corpus.from_path(p))


def _load_unstructured(tok, data, *, n_train, n_val, block_size, seed, hygiene_facts, stopwords, **_) -> Task:
    from ..editing.corpus import Corpus
    from .data import pack_blocks

    if data is None:
        corpus = Corpus.offline_default()
        docs, source, sha = list(corpus), corpus.id, corpus.sha256
        info: dict[str, Any] = {"files": {}}
    else:
        files = _expand(_as_paths(data, "unstructured"), "unstructured", (".txt", ".jsonl", ".json", ".raw", ".tokens"))
        docs = []
        per_file = {}
        for f in files:
            d = read_documents(f)
            per_file[str(f)] = len(d)
            docs += d
        source, sha, info = ", ".join(map(str, files)), _hash_files(files), {"files": per_file}
    keep, report = _hygiene(docs, hygiene_facts, stopwords)
    kept = [docs[i] for i in keep]
    blocks = pack_blocks(tok, kept, block_size)
    if not blocks:
        raise DataError(f"{source}: the text ({len(kept)} documents) gives no block of {block_size} tokens")
    train, val = _split_from_train(blocks, n_train, n_val, seed)
    info.update({"n_documents": len(docs), "n_documents_kept": len(kept), "n_blocks": len(blocks),
                 "block_size": block_size, "hygiene": report.to_dict() if report else None})
    def ex(b: list[int]) -> Example:
        t = tuple(b)
        return Example(t, t)

    return Task("unstructured", "loss", [ex(b) for b in train], [ex(b) for b in val], _pad_id(tok), source, sha, info)


# ---------------------------------------------------------------------------------------
# structured
# ---------------------------------------------------------------------------------------

def _load_structured(tok, data, *, model, n_train, n_val, seed, exclude_facts, hygiene_facts, stopwords,
                     probe_mode="greedy", probe_chunk=256, **_) -> StructuredTask:
    from ..evaluate.metrics import split_target
    from ..evaluate.probes import Prober
    from ..facts.datasets import load_facts

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
                          _pad_id(tok), source, sha, info, tokenizer=tok, train_facts=train_facts,
                          val_facts=val_facts, probe_mode=probe_mode)
    task._prober = prober
    return task


# ---------------------------------------------------------------------------------------
# classification (IMDB)
# ---------------------------------------------------------------------------------------

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
    return ClassificationTask("classification", "acc", train, val, _pad_id(tok), ", ".join(map(str, files)),
                              _hash_files(files), info, n_classes=2, head_seed=seed)


# ---------------------------------------------------------------------------------------
# sft
# ---------------------------------------------------------------------------------------

def read_conversations(p: Path) -> list[list[dict[str, str]]]:
    """Conversations of a JSON/JSONL file: records with ``messages`` (a list of
    ``{role, content}``) or Alpaca ``{instruction, input, output}``, converted to
    ``[user: instruction + ("\\n\\n" + input if input), assistant: output]``."""
    out = []
    for i, rec in enumerate(read_json_records(p)):
        where = f"{p}: record {i}"
        if isinstance(rec, dict) and "messages" in rec:
            msgs = _field(rec, "messages", where, list)
            conv = []
            for j, m in enumerate(msgs):
                w = f"{where}: messages[{j}]"
                conv.append({"role": _field(m, "role", w), "content": _field(m, "content", w)})
            if not any(m["role"] == "assistant" for m in conv):
                raise DataError(f"{where}: field 'messages' has no assistant message")
        elif isinstance(rec, dict) and "instruction" in rec:
            instr = _field(rec, "instruction", where)
            inp = _field(rec, "input", where, required=False, default="")
            conv = [{"role": "user", "content": instr + ("\n\n" + inp if inp else "")},
                    {"role": "assistant", "content": _field(rec, "output", where)}]
        else:
            got = f"keys {', '.join(map(repr, rec))}" if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{where}: expected field 'messages' or Alpaca fields 'instruction'/'output', got {got}")
        out.append(conv)
    return out


def _end_ids(tok) -> set[int]:
    vocab = tok.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def _render_steps(tok, conv: list[dict[str, str]], use_template: bool) -> list[tuple[str, bool]]:
    """Cumulative renderings of a conversation: ``(text so far, the part added since the
    previous step is a response)``. Chat template: the prefix with the generation
    prompt, then with the assistant message. Otherwise the Alpaca layout (a system
    message replaces its preamble), EOS text after each response."""
    steps: list[tuple[str, bool]] = []
    if use_template:
        def render(msgs, gen):
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        for i, m in enumerate(conv):
            if m["role"] == "assistant":
                steps.append((render(conv[:i], True), False))
                steps.append((render(conv[: i + 1], False), True))
        if conv[-1]["role"] != "assistant":
            steps.append((render(conv, False), False))
        return steps
    pre = ALPACA_PROMPT.split("\n\n### Instruction")[0]
    text = ""
    for m in conv:
        if m["role"] == "system":
            pre = m["content"]
        elif m["role"] == "assistant":
            steps.append((text + "### Response:\n", False))
            text += "### Response:\n" + m["content"] + (tok.eos_token or "")
            steps.append((text, True))
            text += "\n\n"
        else:
            text += f"### Instruction:\n{m['content']}\n\n"
    return [(pre + "\n\n" + t, flag) for t, flag in steps]


def sft_example(tok, conv: list[dict[str, str]], cutoff: int, use_template: bool,
                end_ids: set[int] | None = None) -> Example | None:
    """Tokenise a conversation with labels on the assistant responses only.

    Every cumulative rendering is tokenised and its boundary is the longest common
    prefix with the full tokenisation, so template tokens never leak into the labels.
    A response is labelled up to and including its last EOS / end-of-turn token
    (tokens after it, e.g. a newline, are not); a final response without one gets EOS
    appended. Truncated to ``cutoff``; None when no labelled token survives."""
    end_ids = _end_ids(tok) if end_ids is None else end_ids
    steps = _render_steps(tok, conv, use_template)
    special = not use_template  # chat templates render BOS themselves
    toks = [list(ids) for ids in tok([s for s, _ in steps], add_special_tokens=special)["input_ids"]]
    full = toks[-1]
    ids, labels = list(full), [-100] * len(full)
    prev = 0
    for k, ((_, is_resp), t) in enumerate(zip(steps, toks)):
        b = 0
        while b < min(len(t), len(full)) and t[b] == full[b]:
            b += 1
        b = max(b, prev)
        if is_resp and b > prev:
            span = list(range(prev, b))
            ends = [j for j in span if full[j] in end_ids]
            if ends:
                span = [j for j in span if j <= ends[-1]]
            for j in span:
                labels[j] = full[j]
            if not ends and k == len(steps) - 1:
                ids.append(_eos(tok))
                labels.append(ids[-1])
        prev = b
    ids, labels = ids[:cutoff], labels[:cutoff]
    if all(x == -100 for x in labels):
        return None
    return Example(tuple(ids), tuple(labels))


def _load_sft(tok, data, *, n_train, n_val, cutoff, seed, hygiene_facts, stopwords, use_chat_template=None, **_) -> Task:
    files = _expand(_as_paths(data, "sft"), "sft", (".json", ".jsonl"))
    convs: list[list[dict[str, str]]] = []
    per_file = {}
    for f in files:
        c = read_conversations(f)
        per_file[str(f)] = len(c)
        convs += c
    keep, report = _hygiene(["\n".join(m["content"] for m in c) for c in convs], hygiene_facts, stopwords)
    convs = [convs[i] for i in keep]
    has_template = bool(getattr(tok, "chat_template", None))
    use = has_template if use_chat_template is None else bool(use_chat_template)
    if use and not has_template:
        raise EditdecayError("the tokenizer has no chat template (use the Alpaca layout: use_chat_template=False)")
    train_c, _ = _split_from_train(convs, n_train, 0, seed)
    end_ids = _end_ids(tok)
    examples = [sft_example(tok, c, cutoff, use, end_ids) for c in train_c]
    train = [e for e in examples if e is not None]
    if not train:
        raise DataError(f"{', '.join(map(str, files))}: no conversation keeps a response token within {cutoff} tokens")
    _, val = _split_from_train(train, None, n_val, seed)
    info = {"files": per_file, "n_records": len(convs) + (report.n_dropped if report else 0), "cutoff": cutoff,
            "layout": "chat-template" if use else "alpaca", "n_dropped_no_response": len(examples) - len(train),
            "n_truncated": sum(len(e.input_ids) >= cutoff for e in train),
            "hygiene": report.to_dict() if report else None}
    return Task("sft", "loss", train, val, _pad_id(tok), ", ".join(map(str, files)), _hash_files(files), info)


# ---------------------------------------------------------------------------------------
# commonsense (LLM-Adapters) and HotpotQA
# ---------------------------------------------------------------------------------------

def read_hellaswag_text(p: Path) -> list[dict[str, str]]:
    """LLM-Adapters records from the HellaSwag text layout (6 lines per task:
    ``activity_label: ctx``, label 0–3, endings 0–3)."""
    lines = _read_text(p).replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{p}: {len(lines)} lines is not a multiple of 6 (HellaSwag text layout: context, label, 4 endings)")
    out = []
    for k in range(0, len(lines), 6):
        ctx, label, *ends = lines[k : k + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{p}: record {k // 6} (line {k + 2}) field 'label' must be 0-3, got {label!r}")
        answer = f"ending{int(label) + 1}"
        out.append({"instruction": HELLASWAG_INSTRUCTION.format(ctx=ctx, e0=ends[0], e1=ends[1], e2=ends[2], e3=ends[3]),
                    "input": "", "output": f"the correct answer is {answer}", "answer": answer})
    return out


def read_commonsense(p: Path) -> list[dict[str, str]]:
    """LLM-Adapters records ``{instruction, input, output, answer}`` of a JSON/JSONL
    file (``input`` and ``answer`` optional), or the HellaSwag text layout (``.txt``)."""
    if p.suffix.lower() == ".txt":
        return read_hellaswag_text(p)
    out = []
    for i, rec in enumerate(read_json_records(p)):
        where = f"{p}: record {i}"
        out.append({"instruction": _field(rec, "instruction", where), "input": _field(rec, "input", where, required=False, default=""),
                    "output": _field(rec, "output", where), "answer": str(_field(rec, "answer", where, (str, int), required=False, default=""))})
    return out


def _records_task(name: str, tok, records: list[dict[str, str]], files: list[Path], per_file: dict, *, n_train, n_val,
                  cutoff, seed, hygiene_facts, stopwords, extra_info: dict | None = None) -> Task:
    n_read = len(records)
    uniq: dict[tuple[str, str, str], dict[str, str]] = {}
    for r in records:
        uniq.setdefault((r["instruction"], r["input"], r["output"]), r)
    records = list(uniq.values())
    keep, report = _hygiene(["\n".join((r["instruction"], r["input"], r["output"])) for r in records], hygiene_facts, stopwords)
    records = [records[i] for i in keep]
    train_r, val_r = _split_disjoint(records, n_train, n_val, seed, name)
    train, cut_t = _lm_examples(tok, [alpaca_prompt(r["instruction"], r["input"], r["output"]) for r in train_r], cutoff)
    val, cut_v = _lm_examples(tok, [alpaca_prompt(r["instruction"], r["input"], r["output"]) for r in val_r], cutoff)
    info = {"files": per_file, "n_records": n_read, "n_duplicates_dropped": n_read - len(uniq), "cutoff": cutoff,
            "n_at_cutoff": cut_t + cut_v, "train_on_inputs": True, **(extra_info or {}),
            "hygiene": report.to_dict() if report else None}
    return Task(name, "loss", train, val, _pad_id(tok), ", ".join(map(str, files)), _hash_files(files), info)


def _load_commonsense(tok, data, *, n_train, n_val, cutoff, seed, hygiene_facts, stopwords, **_) -> Task:
    paths = _as_paths(data, "commonsense")
    files = [q for p in paths for q in (_expand([p], "commonsense", (), pattern="*/train.json") if p.is_dir() else [p])]
    records, per_file = [], {}
    for f in files:
        r = read_commonsense(f)
        per_file[str(f)] = len(r)
        records += r
    return _records_task("commonsense", tok, records, files, per_file, n_train=n_train, n_val=n_val, cutoff=cutoff,
                         seed=seed, hygiene_facts=hygiene_facts, stopwords=stopwords)


def hotpot_support(rec: Any, where: str) -> tuple[list[tuple[str, list[str]]], int, int]:
    """The supporting sentences of a HotpotQA record grouped by title (in order of
    first mention), how many supporting-fact entries were found and how many there
    are. Entries are ``[title, sent_id]`` looked up in ``context`` ``[[title, [sents]]]``,
    or AMOR's ``[title, [sent_ids], [sents], doc]`` (its sentences used when the title
    is not in the context). Out-of-range ids and unknown titles are skipped."""
    ctx: dict[str, list[str]] = {}
    for j, c in enumerate(_field(rec, "context", where, list)):
        if not (isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], list)):
            raise DataError(f"{where}: field 'context[{j}]' must be [title, [sentences]]")
        ctx.setdefault(c[0], c[1])
    groups: dict[str, dict[int, str]] = {}
    found = 0
    sfs = _field(rec, "supporting_facts", where, list)
    for j, sf in enumerate(sfs):
        if not (isinstance(sf, list) and len(sf) >= 2 and isinstance(sf[0], str)
                and (isinstance(sf[1], int) or (isinstance(sf[1], list) and all(isinstance(x, int) for x in sf[1])))):
            raise DataError(f"{where}: field 'supporting_facts[{j}]' must be [title, sent_id] or [title, [sent_ids], ...]")
        title, ids = sf[0], ([sf[1]] if isinstance(sf[1], int) else sf[1])
        if title in ctx:
            sents = {i: ctx[title][i] for i in ids if 0 <= i < len(ctx[title])}
        elif len(sf) >= 3 and isinstance(sf[2], list) and len(sf[2]) == len(ids):
            sents = {i: s for i, s in zip(ids, sf[2]) if isinstance(s, str)}
        else:
            sents = {}
        if sents:
            found += 1
            groups.setdefault(title, {}).update(sents)
    return [(t, [g[i] for i in sorted(g)]) for t, g in groups.items()], found, len(sfs)


def _cut_tokens(tok, text: str, n: int) -> tuple[str, int]:
    """``text`` cut after its first ``n`` tokens (at a character offset), and its token count."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= n:
        return text, len(enc["input_ids"])
    return (text[: enc["offset_mapping"][n - 1][1]] if n > 0 else ""), n


def _load_hotpotqa(tok, data, *, n_train, n_val, cutoff, seed, hygiene_facts, stopwords, context_tokens=160, **_) -> Task:
    files = _expand(_as_paths(data, "hotpotqa"), "hotpotqa", (".json", ".jsonl"))
    records, per_file = [], {}
    no_support = partial = cut = 0
    for f in files:
        recs = read_json_records(f)
        per_file[str(f)] = len(recs)
        for i, rec in enumerate(recs):
            where = f"{f}: record {i}"
            q, a = _field(rec, "question", where), _field(rec, "answer", where)
            groups, found, wanted = hotpot_support(rec, where)
            if not groups:
                no_support += 1
                continue
            partial += found < wanted
            context = "\n".join(f"{t}: " + " ".join(s.strip() for s in sents) for t, sents in groups)
            ctx, n_ctx = _cut_tokens(tok, context, context_tokens) if context_tokens is not None else (context, None)
            for _ in range(4):  # shorten the context until prompt + answer + EOS fit the cutoff
                over = len(tok(alpaca_prompt(q, ctx, a))["input_ids"]) + 1 - cutoff
                if over <= 0 or not ctx:
                    break
                n_ctx = n_ctx if n_ctx is not None else _cut_tokens(tok, ctx, 10**9)[1]
                ctx, n_ctx = _cut_tokens(tok, ctx, max(0, n_ctx - over))
            cut += ctx != context
            records.append({"instruction": q, "input": ctx, "output": a, "answer": a})
    if not records:
        raise DataError(f"{', '.join(map(str, files))}: no record has a supporting sentence in its context")
    extra = {"n_records": sum(per_file.values()), "n_no_support_dropped": no_support, "n_partial_support": partial, "n_context_cut": cut,
             "context_tokens": context_tokens}
    return _records_task("hotpotqa", tok, records, files, per_file, n_train=n_train, n_val=n_val, cutoff=cutoff,
                         seed=seed, hygiene_facts=hygiene_facts, stopwords=stopwords, extra_info=extra)


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------

_LOADERS = MappingProxyType({"unstructured": _load_unstructured, "structured": _load_structured,
                             "classification": _load_classification, "sft": _load_sft,
                             "commonsense": _load_commonsense, "hotpotqa": _load_hotpotqa})


def load_task(
    name: str,
    tokenizer,
    data: Any = None,
    *,
    model: nn.Module | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    cutoff: int | None = None,
    block_size: int = 128,
    seed: int = 0,
    exclude_facts: Sequence[FactRecord] = (),
    hygiene_facts: Sequence[FactRecord] | None = None,
    stopwords: frozenset[str] | None = None,
    context_tokens: int | None = 160,
    use_chat_template: bool | None = None,
    probe_mode: str = "greedy",
) -> Task:
    """Build task ``name`` (one of :data:`TASKS`).

    ``data``: a file, a directory or a list of them (pooled); None gives the offline
    corpus (unstructured) or the built-in facts (structured) and is an error for the
    others. Structured also takes a list of :class:`FactRecord`. ``n_train`` caps the
    training examples (blocks for unstructured, wrong facts for structured);
    ``n_val`` defaults to :data:`DEFAULT_N_VAL`, ``cutoff`` (tokens per example) to
    :data:`DEFAULT_CUTOFF`. ``seed`` fixes the validation sample / split and the
    classification head. ``model`` is needed by ``structured`` (facts it gets wrong);
    ``exclude_facts`` (edit and intrinsic sets) removes facts sharing a subject with
    them; ``hygiene_facts`` drops documents/records containing their words.
    ``context_tokens`` cuts HotpotQA's supporting context; ``use_chat_template``
    (None: when the tokenizer has one) chooses the SFT layout.
    """
    if name not in _LOADERS:
        raise EditdecayError(f"unknown task {name!r}: available tasks: {', '.join(TASKS)}")
    n_val = DEFAULT_N_VAL[name] if n_val is None else n_val
    cutoff = DEFAULT_CUTOFF.get(name, 256) if cutoff is None else cutoff
    if n_val < 1 or (n_train is not None and n_train < 1) or cutoff < 2 or block_size < 2:
        raise EditdecayError("n_val, n_train must be >= 1 and cutoff, block_size >= 2")
    task = _LOADERS[name](tokenizer, data, model=model, n_train=n_train, n_val=n_val, cutoff=cutoff,
                          block_size=block_size, seed=seed, exclude_facts=exclude_facts,
                          hygiene_facts=hygiene_facts, stopwords=stopwords, context_tokens=context_tokens,
                          use_chat_template=use_chat_template, probe_mode=probe_mode)
    task.info.setdefault("seed", seed)
    log.info("task %s: %d train, %d val examples from %s", name, len(task.train), len(task.val), task.source)
    return task


__all__ = ["TASKS", "DEFAULT_N_VAL", "DEFAULT_CUTOFF", "Example", "Task", "StructuredTask", "ClassificationTask",
           "SequenceClassifier", "load_task", "collate", "lm_eval_loss", "retention_true", "alpaca_prompt",
           "read_wikitext", "read_documents", "read_imdb", "read_conversations", "read_commonsense",
           "read_hellaswag_text", "read_json_records", "hotpot_support", "sft_example"]
