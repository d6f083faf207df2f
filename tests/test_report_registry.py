"""The report's section registry: a section registered with ``@section`` renders in the
report (in definition order or at an explicit ``order``), a duplicate id is refused, a
failing section becomes an error note under its title, and every registered section
documents what it shows."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from editdecay.report import SECTIONS, StudyData, build_report, build_sections
from editdecay.report.data import fmt
from editdecay.report.registry import (
    DuplicateSectionError,
    get,
    meta,
    order_of,
    registered,
    section,
    spec_of,
    unregister,
)
from editdecay.report.sections import Section, Table, overview
from editdecay.study import Store
from editdecay.study.spec import Trial, config_hash
from editdecay.study.store import FactRow, UnitRows


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory) -> Path:
    """One edit+ft trial: 3 edited facts, 2 retained after fine-tuning."""
    db = tmp_path_factory.mktemp("registry") / "r.db"
    store = Store(db)
    sid = store.register_study("registry", {"name": "registry"})
    cfg = {"model": "m", "seed": 0, "data": {"dataset": "cf", "format": "counterfact", "selection": {}},
           "edit": {"editor": "memit", "n_edits": 3, "protocol": "batch", "batch_size": None, "layers": None},
           "finetune": {"task": "unstructured", "method": "lora", "policy": "all", "params": {}},
           "evaluate": {"probe": {}}}
    axes = {"model": "m", "dataset": "cf", "editor": "memit", "edit_layers": "default", "n_edits": 3,
            "protocol": "batch", "task": "unstructured", "ft_method": "lora", "layer_policy": "all", "seed": 0,
            "preserve": "none"}
    t = Trial(config_hash(cfg), cfg, axes, (axes,))
    store.upsert_trials(sid, [t])
    facts = [FactRow(f"e{i}", "edit", stage, "retained", v, None, "cf")
             for i in range(3) for stage, v in (("edited", 1.0), ("finetuned", float(i < 2)))]
    store.write_unit(t.key, "", UnitRows(facts, [], [], [], [], [], {}))
    store.close()
    return db


@pytest.fixture
def toy():
    """Register toy sections for one test and remove them afterwards."""
    ids: list[str] = []

    def register(sid: str, *, order: float | None = None, fail: bool = False):
        @section(sid, f"Toy section {sid}", "test source", order=order)
        def toy_section(d: StudyData) -> Section:
            """Shows the edited retention after fine-tuning of every trial; from the ``finetuned`` ``retained``
            edit-set rows."""
            if fail:
                raise RuntimeError("toy failure")
            sec = Section(*meta(toy_section), "Toy notes.")
            sec.tables.append(Table(["trial", "retention"],
                                    [[t.label, fmt(d.rate(t.key, "edit", "retained", "finetuned"))] for t in d.trials]))
            return sec

        ids.append(sid)
        return toy_section

    yield register
    for sid in ids:
        unregister(sid)


def test_a_registered_section_renders_in_the_report(tiny_db, tmp_path, toy):
    fn = toy("toy_retention")
    assert spec_of(fn).id == "toy_retention" and meta(fn) == ("toy_retention", "Toy section toy_retention",
                                                               "test source")
    assert registered()[-1].fn is fn  # definition order: after every built-in section
    d = StudyData(tiny_db, n_boot=200)
    try:
        secs = build_sections(d)
    finally:
        d.close()
    sec = secs[-1]
    assert (sec.id, sec.title, sec.source, sec.error) == ("toy_retention", "Toy section toy_retention", "test source",
                                                          None)
    assert sec.tables[0].rows[0][1].startswith("0.67 [") and sec.tables[0].rows[0][1].endswith("n=3")
    paths = build_report(tiny_db, tmp_path / "out", n_boot=200)
    md, page = paths.markdown.read_text(), paths.html.read_text()
    assert '<a id="toy_retention"></a>\n## Toy section toy_retention' in md
    assert "](#toy_retention)" in md and "*Regenerates: test source*" in md and "Toy notes." in md
    assert '<section id="toy_retention"' in page and 'href="#toy_retention"' in page
    unregister("toy_retention")
    assert "toy_retention" not in [s.id for s in registered()]


def test_an_explicit_order_places_a_section(tiny_db, toy):
    toy("toy_second", order=order_of("overview") + 0.5)
    ids = [s.id for s in registered()]
    assert ids[:3] == ["overview", "toy_second", "summary"]


def test_a_duplicate_id_raises(toy):
    toy("toy_dup")
    with pytest.raises(DuplicateSectionError, match="'toy_dup' is already registered"):
        section("toy_dup", "Another")(lambda d: None)
    with pytest.raises(DuplicateSectionError, match="'overview' is already registered by .*report.overview.overview"):
        section("overview", "Study overview")(lambda d: None)
    assert get("overview").fn is overview and get("toy_dup").title == "Toy section toy_dup"


def test_a_failing_section_becomes_an_error_note_under_its_title(tiny_db, toy):
    toy("toy_fail", fail=True)
    d = StudyData(tiny_db, n_boot=200)
    try:
        sec = next(s for s in build_sections(d) if s.id == "toy_fail")
    finally:
        d.close()
    assert sec.title == "Toy section toy_fail" and sec.error == "RuntimeError: toy failure" and not sec.has_data


def test_every_registered_section_is_documented_and_named_for_what_it_shows():
    specs = registered()
    assert len(specs) == len({s.id for s in specs}) == len(SECTIONS) == 29
    assert [sid for sid, _ in SECTIONS] == [s.id for s in specs]
    for s in specs:
        assert s.doc and s.doc == inspect.getdoc(s.fn), s.id
        assert "\n\n" not in s.doc, f"{s.id}: one paragraph"
        assert s.title and re.fullmatch(r"[a-z][a-z0-9_]*", s.id), s.id
        assert not re.match(r"s00\d_", s.id), f"{s.id}: say what the section shows, not which figure it mirrors"
