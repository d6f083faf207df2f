"""Machinery shared by the fine-tuning tasks, and the task registry.

:class:`Example`, :func:`collate`, :class:`Task` (batching, LM loss, validation loss),
the file readers and split/hygiene helpers every loader uses, and
:data:`TASK_REGISTRY`: one :class:`TaskEntry` per task, filled by :func:`register_task`.
:func:`load_task` is a registry lookup. A new task is one module that defines a loader
and calls::

    register_task("my-task", loader=load_my_task, n_val=64, cutoff=256)

The loader is called as ``loader(tokenizer, data, *, model, n_train, n_val, cutoff,
block_size, seed, exclude_facts, hygiene_facts, stopwords, context_tokens,
use_chat_template, probe_mode)`` and returns a :class:`Task` (accept ``**_`` for the
options it ignores).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import DataError, EditdecayError
from ...facts.record import FactRecord
from ...registry import Registry
from ...torch_utils import device_of, pad_id
from ..hygiene import HygieneReport, hygiene_keep

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

#: The Alpaca / LLM-Adapters prompt without and with an input. (LLM-Adapters'
#: ``generate_prompt`` literally carries source indentation and a stray "noqa"
#: comment inside the string; the clean Alpaca layout is used here.)
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


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


def _by_length(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for s in range(0, len(order), batch_size):
        yield [examples[i] for i in order[s : s + batch_size]]


@torch.no_grad()
def lm_eval_loss(module: nn.Module, examples: Sequence[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean next-token loss over every labelled token of ``examples`` (token-weighted)."""
    dev = device_of(module)
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


# ---------------------------------------------------------------------------------------
# file reading, splits, hygiene, tokenisation
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
    return Task(name, "loss", train, val, pad_id(tok), ", ".join(map(str, files)), _hash_files(files), info)


# ---------------------------------------------------------------------------------------
# the registry and the entry point
# ---------------------------------------------------------------------------------------

Loader = Callable[..., Task]
"""``loader(tokenizer, data, *, n_train, n_val, cutoff, seed, ..., **_) -> Task``."""

#: Token cutoff of a task whose entry has none (it does not use one).
FALLBACK_CUTOFF = 256


@dataclass(frozen=True)
class TaskEntry:
    """One registered fine-tuning task."""

    name: str
    loader: Loader
    n_val: int
    """Default validation size (CPU-sized)."""
    cutoff: int | None = None
    """Default tokens per example; None where the task has no cutoff."""


class TaskRegistry(Registry[TaskEntry]):
    """Maps a task name to its :class:`TaskEntry` (in registration order)."""

    kind = "task"

    def describe(self, entry: TaskEntry) -> str:
        return entry.loader.__qualname__

    def unknown(self, name: str) -> str:
        return (f"unknown task {name!r}: available tasks: {', '.join(self)}; add one with "
                "editdecay.finetune.tasks.register_task(name, loader=..., n_val=..., cutoff=...)")

    def register(self, name: str, *, loader: Loader, n_val: int, cutoff: int | None = None,
                 overwrite: bool = False) -> TaskEntry:
        if not isinstance(name, str) or not name:
            raise ValueError(f"task name must be a non-empty string, got {name!r}")
        if not callable(loader):
            raise TypeError(f"task {name!r}: loader must be callable, got {loader!r}")
        if not isinstance(n_val, int) or n_val < 1:
            raise ValueError(f"task {name!r}: n_val must be an int >= 1, got {n_val!r}")
        if cutoff is not None and (not isinstance(cutoff, int) or cutoff < 2):
            raise ValueError(f"task {name!r}: cutoff must be None or an int >= 2, got {cutoff!r}")
        return self._add(name, TaskEntry(name, loader, n_val, cutoff), overwrite)


#: The process-wide task registry (extend with :func:`register_task`).
TASK_REGISTRY = TaskRegistry()


def register_task(name: str, *, loader: Loader, n_val: int, cutoff: int | None = None,
                  overwrite: bool = False) -> TaskEntry:
    """Register a fine-tuning task: its loader, default ``n_val`` and default ``cutoff``."""
    return TASK_REGISTRY.register(name, loader=loader, n_val=n_val, cutoff=cutoff, overwrite=overwrite)


class TaskNames(Sequence[str]):
    """Read-only view: the registered task names, in registration order (``TASKS``)."""

    def __init__(self, registry: TaskRegistry) -> None:
        self._registry = registry

    def __getitem__(self, i):
        return tuple(self._registry)[i]

    def __len__(self) -> int:
        return len(self._registry)

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (tuple, TaskNames)) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(tuple(self))


class TaskDefaults(Mapping[str, int]):
    """Read-only view: task name → one default of its entry (tasks where it is None left out)."""

    def __init__(self, registry: TaskRegistry, attr: str) -> None:
        self._registry, self._attr = registry, attr

    def _items(self) -> dict[str, int]:
        return {n: v for n, e in self._registry.items() if (v := getattr(e, self._attr)) is not None}

    def __getitem__(self, name: str) -> int:
        return self._items()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return repr(self._items())


#: The registered task names (a live view of :data:`TASK_REGISTRY`).
TASKS = TaskNames(TASK_REGISTRY)
#: Default validation size per task (CPU-sized; seed 000 uses 1,000 / 100 / 100 / 1,000).
DEFAULT_N_VAL = TaskDefaults(TASK_REGISTRY, "n_val")
#: Default token cutoff per record task (LLM-Adapters: 256).
DEFAULT_CUTOFF = TaskDefaults(TASK_REGISTRY, "cutoff")


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
    entry = TASK_REGISTRY[name]
    n_val = entry.n_val if n_val is None else n_val
    if cutoff is None:
        cutoff = entry.cutoff if entry.cutoff is not None else FALLBACK_CUTOFF
    if n_val < 1 or (n_train is not None and n_train < 1) or cutoff < 2 or block_size < 2:
        raise EditdecayError("n_val, n_train must be >= 1 and cutoff, block_size >= 2")
    task = entry.loader(tokenizer, data, model=model, n_train=n_train, n_val=n_val, cutoff=cutoff,
                        block_size=block_size, seed=seed, exclude_facts=exclude_facts,
                        hygiene_facts=hygiene_facts, stopwords=stopwords, context_tokens=context_tokens,
                        use_chat_template=use_chat_template, probe_mode=probe_mode)
    task.info.setdefault("seed", seed)
    log.info("task %s: %d train, %d val examples from %s", name, len(task.train), len(task.val), task.source)
    return task
