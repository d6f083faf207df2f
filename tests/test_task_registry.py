"""The fine-tuning task registry: built-in entries and their defaults, errors that say
how to add a task, and a toy in-memory text task defined in this one file that
load_task then builds."""

import pytest

from editdecay import EditdecayError
from editdecay.finetune.tasks import (
    DEFAULT_CUTOFF, DEFAULT_N_VAL, TASK_REGISTRY, TASKS, Example, Task, load_task, register_task,
)

from fakes import word_tokenizer

TOY_TEXTS = ["the cat sat", "a dog ran far", "the dog sat", "a cat ran"]


def load_toy(tok, data, *, n_val, cutoff, seed, **_) -> Task:
    """Each text (``data``, else TOY_TEXTS) one example, loss on every token."""
    texts = list(data) if data is not None else TOY_TEXTS
    examples = [Example(tuple(ids[:cutoff]), tuple(ids[:cutoff])) for ids in tok(texts)["input_ids"]]
    return Task("toy", "loss", examples, examples[:n_val], tok.pad_token_id, "toy:inline", "0" * 64, {})


@pytest.fixture
def toy():
    register_task("toy", loader=load_toy, n_val=2, cutoff=3)
    try:
        yield
    finally:
        TASK_REGISTRY.unregister("toy")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(sorted({w for t in TOY_TEXTS for w in t.split()}))


def test_builtin_tasks_and_their_defaults():
    assert TASKS == ("unstructured", "structured", "classification", "sft", "commonsense", "hotpotqa")
    assert tuple(TASK_REGISTRY) == tuple(TASKS)
    assert dict(DEFAULT_N_VAL) == {"unstructured": 64, "structured": 100, "classification": 100, "sft": 64,
                                   "commonsense": 120, "hotpotqa": 50}
    assert dict(DEFAULT_CUTOFF) == {"classification": 256, "sft": 512, "commonsense": 256, "hotpotqa": 256}
    assert TASK_REGISTRY["unstructured"].cutoff is None and "unstructured" not in DEFAULT_CUTOFF
    with pytest.raises(TypeError):
        DEFAULT_N_VAL["sft"] = 1  # read-only


def test_toy_task_registers_loads_and_unregisters(toy, tok):
    assert "toy" in TASKS and TASKS[-1] == "toy" and "toy" in TASK_REGISTRY
    assert DEFAULT_N_VAL["toy"] == 2 and DEFAULT_CUTOFF["toy"] == 3
    task = load_task("toy", tok, seed=5)
    assert task.name == "toy" and len(task.train) == 4 and len(task.val) == 2  # n_val from the entry
    assert max(len(e.input_ids) for e in task.train) == 3  # cutoff from the entry
    assert task.info["seed"] == 5
    assert len(load_task("toy", tok, ["the cat", "a dog"], n_val=1, cutoff=8).val) == 1
    batch = next(task.batches(2))
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].shape == batch["labels"].shape


def test_toy_is_gone_after_unregister(tok):
    assert "toy" not in TASKS and "toy" not in TASK_REGISTRY and "toy" not in DEFAULT_N_VAL
    with pytest.raises(EditdecayError, match="unknown task 'toy'"):
        load_task("toy", tok)


def test_unknown_task_names_the_tasks_and_how_to_add_one(tok):
    with pytest.raises(EditdecayError, match=r"unknown task 'bogus': available tasks: unstructured, structured") as e:
        load_task("bogus", tok)
    assert "hotpotqa" in str(e.value) and "register_task(name, loader=" in str(e.value)


def test_duplicate_and_invalid_registrations_fail(toy):
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_task("toy", loader=load_toy, n_val=2)
    with pytest.raises(ValueError, match="already registered"):
        register_task("sft", loader=load_toy, n_val=2)
    assert TASK_REGISTRY["sft"].loader is not load_toy and TASK_REGISTRY["toy"].cutoff == 3
    with pytest.raises(ValueError, match="n_val"):
        register_task("toy2", loader=load_toy, n_val=0)
    with pytest.raises(TypeError, match="loader"):
        register_task("toy2", loader=None, n_val=2)
    assert "toy2" not in TASK_REGISTRY
