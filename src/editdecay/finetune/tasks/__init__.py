"""Downstream fine-tuning tasks behind one interface.

A :class:`Task` holds tokenised training and validation examples and knows how to
batch them, which module to train (:meth:`Task.wrap`), its loss and its validation
metrics. :func:`load_task` builds one of :data:`TASKS`, the tasks of
:data:`TASK_REGISTRY` (one module each; add one with :func:`register_task`, see
:mod:`editdecay.finetune.tasks.base`):

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

# The task modules register themselves, in this order (the order of TASKS).
from . import unstructured, structured, classification, sft, commonsense, hotpotqa  # noqa: F401
from .base import (
    ALPACA_PROMPT, ALPACA_PROMPT_INPUT, DEFAULT_CUTOFF, DEFAULT_N_VAL, TASK_REGISTRY, TASKS, Batch, Example, Task,
    TaskEntry, TaskRegistry, alpaca_prompt, collate, lm_eval_loss, load_task, read_json_records, register_task,
)
from .classification import ClassificationTask, SequenceClassifier, read_imdb
from .commonsense import HELLASWAG_INSTRUCTION, read_commonsense, read_hellaswag_text
from .hotpotqa import hotpot_support
from .sft import END_OF_TURN_TOKENS, read_conversations, sft_example
from .structured import StructuredTask, retention_true
from .unstructured import read_documents, read_wikitext

__all__ = ["TASKS", "DEFAULT_N_VAL", "DEFAULT_CUTOFF", "Example", "Task", "StructuredTask", "ClassificationTask",
           "SequenceClassifier", "load_task", "collate", "lm_eval_loss", "retention_true", "alpaca_prompt",
           "read_wikitext", "read_documents", "read_imdb", "read_conversations", "read_commonsense",
           "read_hellaswag_text", "read_json_records", "hotpot_support", "sft_example",
           "TASK_REGISTRY", "TaskEntry", "TaskRegistry", "register_task", "Batch", "ALPACA_PROMPT",
           "ALPACA_PROMPT_INPUT", "HELLASWAG_INSTRUCTION", "END_OF_TURN_TOKENS"]
