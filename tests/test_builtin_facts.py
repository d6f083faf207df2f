"""The built-in fact set (editdecay.facts.builtin): structure, counts, determinism.

Fast; no model.  Whether the model knows the facts is checked outside the suite.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from editdecay.errors import DataError
from editdecay.facts import builtin
from editdecay.facts.builtin import builtin_relations, load_builtin_facts

KEYS = {"case_id", "subject", "prompt", "relation_id", "target_true", "target_new",
        "paraphrases", "neighborhood", "source"}


@pytest.fixture(scope="module")
def facts():
    return load_builtin_facts()


@pytest.fixture(scope="module")
def table():
    """The raw YAML table, read independently of the module under test."""
    text = files("editdecay.facts.data").joinpath("builtin_facts.yaml").read_text(encoding="utf-8")
    return {rel["id"]: rel for rel in yaml.safe_load(text)["relations"]}


def _fill(template, subject):
    return template.replace("{}", subject)


def test_counts(facts, table):
    assert len(facts) >= 300
    per_rel = Counter(f["relation_id"] for f in facts)
    assert len(per_rel) >= 15
    assert set(per_rel) == set(table) == set(builtin_relations())
    assert min(per_rel.values()) >= 10  # no relation is a token presence


def test_record_keys_and_types(facts):
    for f in facts:
        assert set(f) == KEYS, f["case_id"]
        for key in ("case_id", "subject", "prompt", "relation_id", "target_true", "target_new", "source"):
            assert isinstance(f[key], str) and f[key], (f["case_id"], key)
        assert f["source"] == "builtin"
        assert re.fullmatch(r"P\d+", f["relation_id"])
        assert f["prompt"].count("{}") == 1 and f["prompt"] == f["prompt"].strip()
        assert not f["prompt"].endswith("{}")
        for t in (f["subject"], f["target_true"], f["target_new"]):
            assert t == t.strip() and "{}" not in t
        assert isinstance(f["paraphrases"], list) and all(isinstance(p, str) for p in f["paraphrases"])
        assert isinstance(f["neighborhood"], list)
        for n in f["neighborhood"]:
            assert isinstance(n, dict) and set(n) == {"prompt", "target"}
            assert isinstance(n["prompt"], str) and isinstance(n["target"], str) and n["target"]


def test_case_ids_unique_and_well_formed(facts):
    ids = [f["case_id"] for f in facts]
    assert len(set(ids)) == len(ids)
    for f in facts:
        m = re.fullmatch(r"builtin-(P\d+)-(\d+)", f["case_id"])
        assert m and m.group(1) == f["relation_id"]


def test_facts_come_from_the_table(facts, table):
    for f in facts:
        rel = table[f["relation_id"]]
        n = int(f["case_id"].rsplit("-", 1)[1])
        assert rel["facts"][n] == [f["subject"], f["target_true"]]
        assert f["prompt"] == rel["template"]


def test_counterfactual_is_a_different_object_of_the_same_relation(facts, table):
    for f in facts:
        pool = {obj for _, obj in table[f["relation_id"]]["facts"]}
        assert f["target_new"] != f["target_true"], f["case_id"]
        assert f["target_new"] in pool, f["case_id"]
        # The two answers should start differently (different first token in practice).
        assert f["target_new"].split()[0].casefold() != f["target_true"].split()[0].casefold(), f["case_id"]


def test_counterfactuals_are_spread_over_the_pool(facts):
    by_rel = defaultdict(Counter)
    for f in facts:
        by_rel[f["relation_id"]][f["target_new"]] += 1
    for rid, counts in by_rel.items():
        assert len(counts) >= 2, rid


def test_paraphrases(facts, table):
    for f in facts:
        rel = table[f["relation_id"]]
        assert len(f["paraphrases"]) >= 2, f["case_id"]
        assert f["paraphrases"] == [_fill(t, f["subject"]) for t in rel["paraphrases"]]
        for p in f["paraphrases"]:
            assert f["subject"] in p and "{}" not in p
            assert p != _fill(f["prompt"], f["subject"])


def test_neighborhood(facts):
    for f in facts:
        neigh = f["neighborhood"]
        assert 2 <= len(neigh) <= builtin.MAX_NEIGHBORS, f["case_id"]
        prompts = [n["prompt"] for n in neigh]
        assert len(set(prompts)) == len(prompts), f["case_id"]
        for n in neigh:
            # never about the fact's own subject
            assert f["subject"].casefold() not in n["prompt"].casefold(), (f["case_id"], n["prompt"])
            assert "{}" not in n["prompt"]
            # CounterFact-style: the neighbour's correct answer is this fact's true object
            assert n["target"] == f["target_true"], (f["case_id"], n)


def test_neighbor_prompts_are_main_prompts_of_table_facts(facts, table):
    main_prompts = {}
    for rel in table.values():
        for subject, obj in rel["facts"]:
            main_prompts[_fill(rel["template"], subject)] = obj
    for f in facts:
        for n in f["neighborhood"]:
            assert main_prompts.get(n["prompt"]) == n["target"], (f["case_id"], n)


def test_deterministic_and_fresh(facts):
    again = load_builtin_facts()
    assert again == facts
    again[0]["neighborhood"].clear()
    again[0]["paraphrases"].append("x")
    assert load_builtin_facts() == facts
    rels = builtin_relations()
    assert rels == builtin_relations()
    rels[next(iter(rels))]["paraphrases"].clear()
    assert builtin_relations() != rels


def test_deterministic_across_processes(facts):
    """Independent of the hash seed (string hashing) of the process."""
    code = ("import hashlib, json; from editdecay.facts.builtin import load_builtin_facts; "
            "print(hashlib.sha256(json.dumps(load_builtin_facts(), sort_keys=True).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    src = str(Path(builtin.__file__).resolve().parents[2])  # the directory holding editdecay/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()
    assert out.stdout.strip() == here


def test_builtin_relations(table):
    rels = builtin_relations()
    assert list(rels) == list(table)
    for rid, rel in rels.items():
        assert set(rel) == {"label", "template", "paraphrases"}
        assert isinstance(rel["label"], str) and rel["label"]
        assert rel["template"].count("{}") == 1
        assert len(rel["paraphrases"]) >= 2
        assert all(p.count("{}") == 1 for p in rel["paraphrases"])


# ------------------------------------------------------------------ table validation


def _doc():
    return {"relations": [
        {"id": "P36", "label": "capital", "template": "The capital of {} is",
         "paraphrases": ["The capital city of {} is", "{}'s capital is"],
         "facts": [["France", "Paris"], ["Italy", "Rome"]]},
    ]}


def test_validate_accepts_a_good_table():
    rels = builtin._validate(_doc(), "t.yaml")
    assert rels[0]["facts"] == (("France", "Paris"), ("Italy", "Rome"))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["relations"][0].update(template="The capital of {} or {} is"), "exactly one"),
    (lambda d: d["relations"][0].update(template="The capital of France is"), "exactly one"),
    (lambda d: d["relations"][0].update(template="The capital of {} is "), "whitespace"),
    (lambda d: d["relations"][0].update(template="Tell me about {}"), "not with the subject"),
    (lambda d: d["relations"][0]["paraphrases"].pop(), "at least 2"),
    (lambda d: d["relations"][0]["paraphrases"].__setitem__(1, "The capital of {}{} is"), "exactly one"),
    (lambda d: d["relations"][0]["facts"].append(["Spain", ""]), "non-empty"),
    (lambda d: d["relations"][0]["facts"].append(["Spain", 911]), "quote it"),
    (lambda d: d["relations"][0]["facts"].append(["Spain"]), "pair"),
    (lambda d: d["relations"][0]["facts"].append(["France", "Lyon"]), "duplicate subject"),
    (lambda d: d["relations"][0].update(facts=[["France", "Paris"], ["Monaco", "Paris"]]), "two distinct objects"),
    (lambda d: d["relations"][0].update(id="capital"), "Wikidata"),
    (lambda d: d["relations"].append(copy.deepcopy(d["relations"][0])), "duplicate relation"),
    (lambda d: d["relations"][0].pop("label"), "missing keys"),
    (lambda d: d["relations"][0].update(extra=1), "unknown keys"),
    (lambda d: d.update(other=1), "single key"),
])
def test_validate_rejects_bad_tables(mutate, message):
    doc = _doc()
    mutate(doc)
    with pytest.raises(DataError, match=message) as info:
        builtin._validate(doc, "t.yaml")
    assert "t.yaml" in str(info.value)
