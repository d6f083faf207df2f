"""The synthetic fact universe shared by the MEND and MALMEN tests: 60 subjects, two
relations, word-level tokens, tiny random models and fast training settings."""

from __future__ import annotations

import pytest

from editdecay.facts.record import FactRecord, Neighbor

from conftest import make_tiny_model
from fakes import word_tokenizer

N_SUBJECTS = 60
SUBJECTS = [f"S{i}" for i in range(N_SUBJECTS)]
OBJECTS = [f"O{i}" for i in range(8)]
RELATIONS = [("{} lives in", "{} resides in"), ("{} works for", "{} is employed by")]
WORDS = SUBJECTS + OBJECTS + "lives in resides works for is employed by".split()


def synthetic_facts() -> list[FactRecord]:
    """One fact per subject: a relation, a 'true' and a new object, a paraphrase and a
    neighbourhood prompt (another subject, same relation, its own object)."""
    facts = []
    for i, s in enumerate(SUBJECTS):
        rel, para = RELATIONS[i % 2]
        true = OBJECTS[(3 * i) % 8]
        new = OBJECTS[(3 * i + 1 + i % 5) % 8]
        j = (i + 2) % N_SUBJECTS
        facts.append(FactRecord(
            str(i), s, rel, target_new=new, target_true=true, paraphrases=(para.format(s),),
            neighborhood=(Neighbor(rel.format(SUBJECTS[j]), OBJECTS[(3 * j) % 8]),)))
    return facts


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def facts():
    return synthetic_facts()


def tiny(model_type="llama"):
    return make_tiny_model(model_type, initializer_range=0.3)


FAST = dict(layers=[1, 2], rank=16, edit_lr=1e-3, meta_lr=1e-3, lr_lr=0.05, steps=60, train_batch=8,
            eval_every=20, n_val=20, save_every=20, patience=0, cedit=1.0, cloc=0.1)
