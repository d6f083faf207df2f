"""Downstream accuracy on the 8 commonsense tasks of LLM-Adapters (seed 001).

Data: ``<data_dir>/<task>/test.json`` (LLM-Adapters format, a JSON list of
``{instruction, input, output, answer}``); HellaSwag from ``hellaswag/test.json`` when
present, else built from ``hellaswag/hellaswag_val_full.txt`` (6 lines per task) by the
recipe in ``shared/data/PROVENANCE.md`` §3. The option labels (``answer1`` …) and their
texts are parsed from each instruction.

Two modes:

``gen`` (LLM-Adapters): the Alpaca prompt, greedy decoding (``num_beams=4`` as in
  LLM-Adapters' code on request), 32 new tokens, left-padded batches; the prediction is
  the first match of the task's answer regex in the response (LLM-Adapters'
  ``extract_answer``, case-sensitive); no match counts as wrong and lowers the parse
  rate. ``response_prefix`` (default ``""``) is appended to the prompt, e.g. ``"the
  correct answer is"`` to prime an unfine-tuned model with the answer format.
``ll`` (log-likelihood): each option is scored by the log-probability of
  ``" " + option`` after ``prompt + "the correct answer is"`` (teacher forced; the
  option's tokens are those of the joined text after the shared context, the project's
  tokenisation rule). ``ll_norm="mean"`` (default) ranks by the mean token log-prob
  (length-normalised, like lm-eval-harness ``acc_norm`` but per token);
  ``"sum"`` by the total (lm-eval ``acc``). ``ll_target="text"`` scores the option's
  text, ``"label"`` its label (``answer2``), the format fine-tuned models are trained
  to emit. ``ll_context="cloze"`` drops the instruction template and the option list
  and scores the option text after ``"Question: {stem}\nAnswer:"`` (HellaSwag: after
  the context sentence itself), lm-eval-harness style; the stem is the instruction's
  text after its first ``": "`` up to the first option marker. Ties go to the first
  option. The shared context of an item runs once and its KV cache is reused by all its
  options.

Both modes put the model in eval mode for the call and restore its training flag. The
model calls go through two small functions, :data:`GenerateFn` and :data:`ScoreFn`,
which the caller may replace (tests use oracles).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError, EditdecayError

log = logging.getLogger(__name__)

TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
"""The 8 tasks, named as LLM-Adapters' ``dataset/`` folders."""

ALIASES = MappingProxyType({
    "siqa": "social_i_qa", "arc-e": "ARC-Easy", "arc_e": "ARC-Easy", "arce": "ARC-Easy", "arc-easy": "ARC-Easy",
    "arc-c": "ARC-Challenge", "arc_c": "ARC-Challenge", "arcc": "ARC-Challenge", "arc-challenge": "ARC-Challenge",
    "obqa": "openbookqa", "social-i-qa": "social_i_qa",
})

ANSWER_PATTERNS = MappingProxyType({
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
})
"""LLM-Adapters' ``extract_answer`` regex per task (first match wins)."""

PROMPT_STYLES = ("alpaca", "llm-adapters", "chat")
MODES = ("gen", "ll")
LL_NORMS = ("mean", "sum")
LL_TARGETS = ("text", "label")
LL_CONTEXTS = ("prompt", "cloze")
ANSWER_PREFIX = "the correct answer is"
"""What LLM-Adapters' targets say before the label; the log-likelihood context ends with it."""

HELLASWAG_INSTRUCTION = "Please choose the correct ending to complete the given sentence: "

_ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
           "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
# LLM-Adapters' commonsense_evaluate.py verbatim: a trailing space after "request." and the
# 16-space indentation of its triple-quoted f-string.
_LLM_ADAPTERS = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request. \n\n                ### Instruction:\n                {instruction}"
                 "\n\n                ### Response:\n                ")
JSON_SCHEMA = "editdecay.downstream/1"

GenerateFn = Callable[[Sequence[str]], list[str]]
"""prompts -> responses (the generated text only)."""
ScoreFn = Callable[[Sequence[str], Sequence[Sequence[str]]], list[list[list[float]]]]
"""(contexts, continuations of each context) -> per context, per continuation, the token
log-probabilities of ``" " + continuation`` after the context."""


# --- data --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One multiple-choice question in LLM-Adapters format."""

    task: str
    index: int
    instruction: str
    answer: str
    """Gold label, e.g. ``answer2``."""
    labels: tuple[str, ...]
    """Option labels in order (``answer1``, ``answer2``, …; ``true``/``false`` for BoolQ)."""
    options: tuple[str, ...]
    """Option texts parsed from the instruction (the labels themselves for BoolQ)."""
    stem: str = ""
    """The question (or sentence) alone: the instruction after its first ``": "`` up to
    the first option marker."""

    @property
    def gold(self) -> int:
        return self.labels.index(self.answer)


def canonical_task(name: str) -> str:
    """The canonical task name of ``name`` (case-insensitive; aliases such as ``siqa``,
    ``arc-e``, ``obqa``)."""
    for t in TASKS:
        if t.lower() == name.lower():
            return t
    key = name.lower()
    if key in ALIASES:
        return ALIASES[key]
    raise EditdecayError(f"unknown downstream task {name!r}: use one of {', '.join(TASKS)}")


def _task_dir(data_dir: Path, task: str) -> Path:
    """``data_dir/task``, or ``data_dir/commonsense/task`` when ``data_dir`` is the
    shared data root."""
    d = data_dir / task
    if not d.is_dir() and (data_dir / "commonsense" / task).is_dir():
        d = data_dir / "commonsense" / task
    return d


def load_task(name: str, data_dir: str | Path) -> list[Item]:
    """Read one task's test items. Malformed input raises :class:`DataError` naming the
    file, the record index and the field."""
    task = canonical_task(name)
    d = _task_dir(Path(data_dir), task)
    path = d / "test.json"
    if task == "hellaswag" and not path.exists():
        txt = d / "hellaswag_val_full.txt"
        if not txt.exists():
            raise DataError(f"{d}: neither test.json nor hellaswag_val_full.txt found")
        records = hellaswag_records(txt)
        where = str(txt)
    else:
        if not path.exists():
            raise DataError(f"{path}: file not found")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list) or not records:
            raise DataError(f"{path}: expected a non-empty JSON list of records")
        where = str(path)
    return [_parse_item(task, i, r, where) for i, r in enumerate(records)]


def hellaswag_records(path: str | Path) -> list[dict[str, str]]:
    """LLM-Adapters records from the 6-lines-per-task HellaSwag text file
    (``activity_label: ctx``, label 0-3, endings 0..3), per PROVENANCE.md §3."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines, expected a non-zero multiple of 6 (6 lines per task)")
    out = []
    for i in range(0, len(lines), 6):
        ctx, label, *endings = lines[i : i + 6]
        if label not in ("0", "1", "2", "3"):
            raise DataError(f"{path}: record {i // 6} (line {i + 2}): field 'label': expected 0-3, got {label!r}")
        answer = f"ending{int(label) + 1}"
        opts = " ".join(f"Ending{k + 1}: {e}" for k, e in enumerate(endings))
        out.append({
            "instruction": f"{HELLASWAG_INSTRUCTION}{ctx}\n\n{opts}\n\nAnswer format: ending1/ending2/ending3/ending4",
            "input": "",
            "output": f"{ANSWER_PREFIX} {answer}",
            "answer": answer,
        })
    return out


def _parse_item(task: str, i: int, r: Any, where: str) -> Item:
    at = f"{where}: record {i}"
    if not isinstance(r, dict):
        raise DataError(f"{at}: expected an object, got {type(r).__name__}")
    for key in ("instruction", "answer"):
        if not isinstance(r.get(key), str) or not r[key]:
            raise DataError(f"{at}: field {key!r}: missing or not a non-empty string")
    instr, answer = r["instruction"], r["answer"]
    cut = instr.rfind("Answer format:")
    if cut < 0:
        raise DataError(f"{at}: field 'instruction': no 'Answer format:' line")
    labels = tuple(s.strip() for s in instr[cut + len("Answer format:"):].strip().split("/"))
    pattern = ANSWER_PATTERNS[task]
    if len(labels) < 2 or not all(re.fullmatch(pattern, lab) for lab in labels):
        raise DataError(f"{at}: field 'instruction': answer format {labels} does not fit {task} ({pattern})")
    if answer not in labels:
        raise DataError(f"{at}: field 'answer': {answer!r} is not one of {'/'.join(labels)}")
    options = _parse_options(instr[:cut], labels)
    if options is None:
        raise DataError(f"{at}: field 'instruction': cannot find the options {', '.join(_marker(lab) for lab in labels)}")
    first = min((p for p in (instr.rfind(_marker(lab), 0, cut) for lab in labels) if p >= 0), default=cut)
    head = instr.find(": ")
    stem = instr[head + 2 if 0 <= head < first else 0 : first].strip()
    return Item(task, i, instr, answer, labels, options, stem)


def _marker(label: str) -> str:
    return label[:1].upper() + label[1:] + ":"


def _parse_options(body: str, labels: tuple[str, ...]) -> tuple[str, ...] | None:
    """Option texts between ``Label1:`` … markers, found from the last one backwards (a
    question may quote a marker, an option text should not). No markers at all (BoolQ):
    the labels are the texts. Some but not all: None."""
    found = [body.rfind(_marker(lab)) for lab in labels]
    if all(p < 0 for p in found):
        return labels
    texts: list[str] = []
    end = len(body)
    for lab in reversed(labels):
        pos = body.rfind(_marker(lab), 0, end)
        if pos < 0:
            return None
        texts.append(body[pos + len(_marker(lab)) : end].strip())
        end = pos
    return tuple(reversed(texts))


# --- prompts and answers -----------------------------------------------------------------
def build_prompt(instruction: str, style: str = "alpaca", tokenizer=None) -> str:
    """The evaluation prompt for ``instruction``.

    ``alpaca``: the clean Alpaca template (no input field); ``llm-adapters``: LLM-Adapters'
    evaluation string verbatim (indentation included); ``chat``: the tokenizer's chat
    template with the instruction as the user turn and the assistant turn opened (a BOS
    the tokenizer adds itself is left out of the text).
    """
    if style == "alpaca":
        return _ALPACA.format(instruction=instruction)
    if style == "llm-adapters":
        return _LLM_ADAPTERS.format(instruction=instruction)
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise EditdecayError("prompt style 'chat' needs a tokenizer with a chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
        bos = tokenizer.bos_token
        if bos and text.startswith(bos):
            ids = tokenizer("x")["input_ids"]
            if ids and ids[0] == tokenizer.bos_token_id:
                text = text[len(bos):]
        return text
    raise EditdecayError(f"unknown prompt style {style!r}: use one of {', '.join(PROMPT_STYLES)}")


def cloze_context(item: Item) -> str:
    """The log-likelihood context of ``ll_context="cloze"``: ``"Question: {stem}\nAnswer:"``,
    or the stem itself for HellaSwag (its options continue the sentence)."""
    return item.stem if item.task == "hellaswag" else f"Question: {item.stem}\nAnswer:"


def extract_answer(task: str, response: str) -> str:
    """LLM-Adapters' answer extraction: the first match of the task's regex in the
    stripped response, or ``""``."""
    m = re.search(ANSWER_PATTERNS[canonical_task(task)], response.strip())
    return m.group(0) if m else ""


# --- model calls -------------------------------------------------------------------------
@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _device(model: nn.Module) -> torch.device:
    return model.get_output_embeddings().weight.device


def _pad_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    return 0


def _chunks(order: list[int], size: int, desc: str, progress: bool) -> Iterator[list[int]]:
    starts = range(0, len(order), size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) < 2, leave=False):
        yield order[s : s + size]


@torch.inference_mode()
def generate_responses(
    model: nn.Module,
    tok,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    num_beams: int = 1,
    max_new_tokens: int = 32,
    progress: bool = False,
    desc: str = "generate",
) -> list[str]:
    """Greedy (or beam) responses to ``prompts``: left-padded batches of similar length
    (the tokenizer is not touched), the new tokens decoded without special tokens."""
    enc = [list(ids) for ids in tok(list(prompts))["input_ids"]]
    if any(not e for e in enc):
        raise ValueError("cannot generate from an empty prompt")
    pad = _pad_id(tok)
    gcfg = getattr(model, "generation_config", None)
    eos = getattr(gcfg, "eos_token_id", None)
    eos = tok.eos_token_id if eos is None else eos
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                              pad_token_id=pad, eos_token_id=eos)
    device = _device(model)
    out: list[str] = [""] * len(enc)
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    with _eval_mode(model):
        for idx in _chunks(order, batch_size, desc, progress):
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
                mask[r, width - len(enc[i]):] = 1
            seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
            texts = tok.batch_decode(seqs[:, width:], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                out[i] = t
    return out


def _common_split(tok, context: str, conts: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """``(shared context ids, target ids per continuation)``: each joined text
    ``context + " " + cont`` is tokenised whole; the shared context is the longest prefix
    common to ``tok(context)`` and every joined tokenisation (at least one target token
    each); the targets are the rest."""
    ctx = list(tok(context)["input_ids"])
    joined = [list(j) for j in tok([context + " " + c for c in conts])["input_ids"]]
    n = len(ctx)
    for j in joined:
        k = 0
        while k < min(n, len(j) - 1) and ctx[k] == j[k]:
            k += 1
        n = k
    if n < 2:
        raise ValueError(f"context {context[:60]!r}... is too short to score options after it")
    return ctx[:n], [j[n:] for j in joined]


def _body(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings, blocks, final norm) of a causal LM, through a
    peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


@torch.inference_mode()
def score_options(
    model: nn.Module,
    tok,
    contexts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "score options",
) -> list[list[list[float]]]:
    """Token log-probabilities of ``" " + cont`` after each context, for every
    continuation of that context (see :data:`ScoreFn`).

    Per batch of contexts: one forward over the left-padded shared contexts (all but
    their last token) fills a KV cache, which is repeated for each continuation; one
    forward over ``[last context token] + continuation[:-1]`` (right-padded, explicit
    positions) gives every target position. Only target positions go through the
    unembedding.
    """
    if len(contexts) != len(continuations):
        raise ValueError("contexts and continuations differ in length")
    enc = [_common_split(tok, c, conts) for c, conts in zip(contexts, continuations)]
    pad = _pad_id(tok)
    body, unembed, device = _body(model), model.get_output_embeddings(), _device(model)
    out: list[list[list[float]]] = [[] for _ in enc]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))
    with _eval_mode(model):
        for idx in _chunks(order, batch_size, desc, progress):
            ctx = [enc[i][0] for i in idx]
            lc = max(len(c) for c in ctx) - 1
            ids1 = torch.full((len(idx), lc), pad, dtype=torch.long)
            m1 = torch.zeros_like(ids1)
            for r, c in enumerate(ctx):
                ids1[r, lc - len(c) + 1:] = torch.tensor(c[:-1])
                m1[r, lc - len(c) + 1:] = 1
            pos1 = (m1.cumsum(-1) - 1).clamp_min(0)
            ids1, m1, pos1 = ids1.to(device), m1.to(device), pos1.to(device)
            cache = body(input_ids=ids1, attention_mask=m1, position_ids=pos1, use_cache=True).past_key_values
            rows = [(r, k) for r, i in enumerate(idx) for k in range(len(enc[i][1]))]
            sel = torch.tensor([r for r, _ in rows], device=device)
            cache.reorder_cache(sel)
            tgts = [enc[idx[r]][1][k] for r, k in rows]
            lt = max(len(t) for t in tgts)
            ids2 = torch.full((len(rows), lt), pad, dtype=torch.long)
            m2 = torch.zeros_like(ids2)
            for q, ((r, _), t) in enumerate(zip(rows, tgts)):
                seq = [ctx[r][-1], *t[:-1]]
                ids2[q, : len(seq)] = torch.tensor(seq)
                m2[q, : len(seq)] = 1
            n_ctx = torch.tensor([len(ctx[r]) - 1 for r, _ in rows])
            pos2 = n_ctx[:, None] + torch.arange(lt)[None, :]
            mask = torch.cat([m1[sel], m2.to(device)], dim=1)
            hidden = body(input_ids=ids2.to(device), attention_mask=mask, position_ids=pos2.to(device),
                          past_key_values=cache, use_cache=True).last_hidden_state
            qi = torch.tensor([q for q, t in enumerate(tgts) for _ in t], device=device)
            ji = torch.tensor([j for t in tgts for j in range(len(t))], device=device)
            tt = torch.tensor([x for t in tgts for x in t], device=device)
            logits = unembed(hidden[qi, ji]).float()
            lp = (logits.gather(1, tt[:, None])[:, 0] - logits.logsumexp(-1)).tolist()
            pos = 0
            for (r, _), t in zip(rows, tgts):
                out[idx[r]].append(lp[pos : pos + len(t)])
                pos += len(t)
    return out


# --- results -----------------------------------------------------------------------------
@dataclass
class TaskResult:
    """Accuracy on one task. ``parse_rate`` is None in ``ll`` mode."""

    task: str
    n: int
    correct: int
    accuracy: float
    parse_rate: float | None
    seconds: float
    predictions: list[str] = field(default_factory=list, repr=False)
    """Predicted label per item (``""``: unparsed)."""
    gold: list[str] = field(default_factory=list, repr=False)
    responses: list[str] | None = field(default=None, repr=False)
    """Generated responses (``gen``) or None."""

    def summary(self) -> dict[str, Any]:
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy,
                "parse_rate": self.parse_rate, "seconds": round(self.seconds, 3)}


@dataclass
class DownstreamResult:
    """Per-task results of one :func:`evaluate_downstream` call; ``mean_accuracy`` is
    the unweighted mean over tasks (LLM-Adapters' "Avg.")."""

    mode: str
    settings: dict[str, Any]
    tasks: dict[str, TaskResult]

    @property
    def mean_accuracy(self) -> float:
        accs = [t.accuracy for t in self.tasks.values()]
        return sum(accs) / len(accs) if accs else float("nan")

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.tasks.values())

    def to_dict(self, items: bool = False) -> dict[str, Any]:
        """Schema ``editdecay.downstream/1``: ``{schema, mode, settings, mean_accuracy,
        seconds, tasks: {task: {n, correct, accuracy, parse_rate, seconds[, items]}}}``;
        with ``items``, ``items`` is a list of ``{pred, gold[, response]}``."""
        tasks: dict[str, Any] = {}
        for name, t in self.tasks.items():
            d = t.summary()
            if items:
                d["items"] = [
                    {"pred": p, "gold": g, **({"response": t.responses[i]} if t.responses is not None else {})}
                    for i, (p, g) in enumerate(zip(t.predictions, t.gold))
                ]
            tasks[name] = d
        return {"schema": JSON_SCHEMA, "mode": self.mode, "settings": dict(self.settings),
                "mean_accuracy": self.mean_accuracy, "seconds": round(self.seconds, 3), "tasks": tasks}

    def to_json(self, items: bool = False, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(items), indent=indent)


@dataclass(frozen=True)
class DownstreamConfig:
    """Settings of a downstream evaluation (recorded in every result)."""

    mode: str = field(default="gen", metadata={"help": "gen (LLM-Adapters generative) or ll (log-likelihood ranking)"})
    limit: int | None = field(default=None, metadata={"help": "first N items of each task (None: all)"})
    batch_size: int = field(default=16, metadata={"help": "prompts (gen) or items (ll) per forward"})
    num_beams: int = field(default=1, metadata={"help": "beam width (LLM-Adapters' code: 4)"})
    max_new_tokens: int = field(default=32, metadata={"help": "generated tokens (LLM-Adapters: 32)"})
    prompt_style: str = field(default="alpaca", metadata={"help": "alpaca | llm-adapters | chat"})
    response_prefix: str = field(default="", metadata={"help": "text appended to the prompt in gen mode"})
    ll_norm: str = field(default="mean", metadata={"help": "mean | sum of option token log-probs"})
    ll_target: str = field(default="text", metadata={"help": "text | label: what option string is scored"})
    ll_context: str = field(default="prompt", metadata={"help": "prompt (instruction template + 'the correct "
                                                                 "answer is') | cloze (question alone)"})

    def __post_init__(self) -> None:
        checks = (("mode", MODES), ("prompt_style", PROMPT_STYLES), ("ll_norm", LL_NORMS), ("ll_target", LL_TARGETS),
                  ("ll_context", LL_CONTEXTS))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise EditdecayError(f"unknown {name} {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        if self.limit is not None and self.limit < 1:
            raise EditdecayError(f"limit must be positive, got {self.limit}")
        if self.batch_size < 1 or self.num_beams < 1 or self.max_new_tokens < 1:
            raise EditdecayError("batch_size, num_beams and max_new_tokens must be positive")
        if self.ll_context == "cloze" and self.ll_target != "text":
            raise EditdecayError("ll_context 'cloze' scores option texts: use ll_target 'text'")


# --- evaluation --------------------------------------------------------------------------
def evaluate_items(
    items: Sequence[Item],
    config: DownstreamConfig,
    *,
    model: nn.Module | None = None,
    tok=None,
    generate_fn: GenerateFn | None = None,
    score_fn: ScoreFn | None = None,
    progress: bool = True,
) -> TaskResult:
    """Accuracy of one task's items. ``generate_fn``/``score_fn`` default to
    :func:`generate_responses`/:func:`score_options` on ``model`` and ``tok``."""
    if not items:
        raise ValueError("no items to evaluate")
    task = items[0].task
    if any(it.task != task for it in items):
        raise ValueError("evaluate_items takes the items of one task")
    t0 = time.perf_counter()
    cloze = config.mode == "ll" and config.ll_context == "cloze"
    prompts = [] if cloze else [build_prompt(it.instruction, config.prompt_style, tok) for it in items]
    responses: list[str] | None = None
    if config.mode == "gen":
        generate = generate_fn or partial(generate_responses, model, tok, batch_size=config.batch_size,
                                          num_beams=config.num_beams, max_new_tokens=config.max_new_tokens,
                                          progress=progress, desc=f"{task} gen")
        responses = list(generate([p + config.response_prefix for p in prompts]))
        # LLM-Adapters keeps the text up to a repeated "### Response:" marker
        preds = [extract_answer(task, r.split("### Response:")[0]) for r in responses]
        parsed = sum(bool(p) for p in preds)
    else:
        score = score_fn or partial(score_options, model, tok, batch_size=config.batch_size, progress=progress,
                                    desc=f"{task} ll")
        conts = [it.options if config.ll_target == "text" else it.labels for it in items]
        contexts = [cloze_context(it) for it in items] if cloze else [p + ANSWER_PREFIX for p in prompts]
        scores = score(contexts, conts)
        preds = []
        for it, per_opt in zip(items, scores):
            agg = [sum(lp) / len(lp) if config.ll_norm == "mean" else sum(lp) for lp in per_opt]
            preds.append(it.labels[max(range(len(agg)), key=agg.__getitem__)])
        parsed = len(items)
    gold = [it.answer for it in items]
    correct = sum(p == g for p, g in zip(preds, gold))
    seconds = time.perf_counter() - t0
    res = TaskResult(task, len(items), correct, correct / len(items),
                     parsed / len(items) if config.mode == "gen" else None, seconds, preds, gold, responses)
    log.info("%s %s: accuracy %.4f (n=%d%s) in %.1fs", task, config.mode, res.accuracy, res.n,
             f", parse rate {res.parse_rate:.3f}" if res.parse_rate is not None else "", seconds)
    return res


def evaluate_downstream(
    model: nn.Module | None,
    tok,
    tasks: str | Sequence[str],
    data_dir: str | Path,
    mode: str = "gen",
    *,
    limit: int | None = None,
    batch_size: int = 16,
    num_beams: int = 1,
    max_new_tokens: int = 32,
    prompt_style: str = "alpaca",
    response_prefix: str = "",
    ll_norm: str = "mean",
    ll_target: str = "text",
    ll_context: str = "prompt",
    progress: bool = True,
    generate_fn: GenerateFn | None = None,
    score_fn: ScoreFn | None = None,
) -> DownstreamResult:
    """Downstream accuracy of ``model`` on ``tasks`` (names, aliases or ``"all"``) read
    from ``data_dir`` (the ``commonsense`` folder, or the shared data root). ``limit``
    takes the first N items of each task. Works on plain and peft-wrapped models."""
    config = DownstreamConfig(mode, limit, batch_size, num_beams, max_new_tokens, prompt_style, response_prefix,
                              ll_norm, ll_target, ll_context)
    names = list(TASKS) if tasks == "all" else [tasks] if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(canonical_task(t) for t in names))
    if model is None and (generate_fn if mode == "gen" else score_fn) is None:
        raise ValueError("pass a model or a generate_fn/score_fn")
    results: dict[str, TaskResult] = {}
    for name in names:
        items = load_task(name, data_dir)[: limit]
        results[name] = evaluate_items(items, config, model=model, tok=tok, generate_fn=generate_fn,
                                       score_fn=score_fn, progress=progress)
    return DownstreamResult(mode, asdict(config), results)


__all__ = [
    "ALIASES",
    "ANSWER_PATTERNS",
    "ANSWER_PREFIX",
    "LL_CONTEXTS",
    "LL_NORMS",
    "LL_TARGETS",
    "MODES",
    "PROMPT_STYLES",
    "TASKS",
    "DownstreamConfig",
    "DownstreamResult",
    "GenerateFn",
    "Item",
    "ScoreFn",
    "TaskResult",
    "build_prompt",
    "canonical_task",
    "cloze_context",
    "evaluate_downstream",
    "evaluate_items",
    "extract_answer",
    "generate_responses",
    "hellaswag_records",
    "load_task",
    "score_options",
]
