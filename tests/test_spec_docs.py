"""The spec key reference in docs/study-store.md is generated from the settings
dataclasses' help (editdecay.study.spec.docs) and is current; every key has help."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from editdecay.study.spec import BLOCKS, StudySpec, yaml_keys
from editdecay.study.spec.docs import END, START, main, region, update

DOC = Path(__file__).resolve().parents[1] / "docs" / "study-store.md"


def test_committed_key_reference_is_current():
    text = DOC.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1
    assert update(text) == text, "docs/study-store.md is stale: run python -m editdecay.study.spec.docs --write"
    assert main(["--check", "--doc", str(DOC)]) == 0


def test_every_field_of_every_block_has_help_and_every_key_is_documented():
    generated = region()
    for _, cls in BLOCKS:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
        for key in yaml_keys(cls):
            assert f"`{key}`" in generated, (cls.__name__, key)
    paths = {p for p, _ in BLOCKS}
    for key in ("axes", "datasets.NAME", "selection", "editors.EDITOR", "finetune", "overrides[]", "probes",
                "downstream", "drift", "reedit", "resources"):
        assert key in paths and key.split(".")[0].removesuffix("[]") in yaml_keys(StudySpec), key


def test_update_replaces_only_the_region(tmp_path):
    text = f"before\n{START}\nstale text\n{END}\nafter\n"
    out = update(text)
    assert out.startswith("before\n") and out.endswith("\nafter\n") and "stale text" not in out
    doc = tmp_path / "page.md"
    doc.write_text(text, encoding="utf-8")
    assert main(["--check", "--doc", str(doc)]) == 1
    assert main(["--write", "--doc", str(doc)]) == 0 and doc.read_text(encoding="utf-8") == out
