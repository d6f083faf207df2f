"""Tests for editdecay.facts.relations: CounterFact template -> Wikidata relation id."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from editdecay.facts.relations import (
    RULES,
    Assignment,
    RelationTable,
    build_classes,
    case_from_record,
    normalize_object,
    relation_label,
    template_of,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact"
FILES = ("counterfact-train.json", "counterfact-val.json", "counterfact-edit.json")
N_CASES = 21_919
N_TEMPLATES = 218

# The 34 relations of ROME's CounterFact.
ROME_RELATIONS = {
    "P17", "P19", "P20", "P27", "P30", "P36", "P37", "P39", "P101", "P103", "P106", "P108",
    "P127", "P131", "P136", "P138", "P140", "P159", "P176", "P178", "P190", "P264", "P276",
    "P364", "P407", "P413", "P449", "P463", "P495", "P641", "P740", "P937", "P1303", "P1412",
}


@pytest.fixture(scope="module")
def table() -> RelationTable:
    return RelationTable.load()


@pytest.fixture(scope="module")
def records_by_file() -> dict[str, list[dict]]:
    paths = [DATA_DIR / name for name in FILES]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"offline CounterFact copy not found: {missing[0]}")
    return {path.name: json.loads(path.read_text(encoding="utf-8")) for path in paths}


@pytest.fixture(scope="module")
def records(records_by_file) -> list[dict]:
    return [r for name in FILES for r in records_by_file[name]]


@pytest.fixture(scope="module")
def cases(records) -> list[tuple[str, str, str]]:
    return [case_from_record(r) for r in records]


@pytest.fixture(scope="module")
def detailed(table, cases) -> list[Assignment]:
    return table.assign_detailed(cases)


@pytest.fixture(scope="module")
def by_case_id(records, detailed) -> dict[int, Assignment]:
    return {r["case_id"]: a for r, a in zip(records, detailed)}


# --------------------------------------------------------------- table only
def test_package_table_loads(table):
    assert len(table) == N_TEMPLATES
    assert set(table.relation_ids) == ROME_RELATIONS
    used = {rid for t in table.templates for rid in table.candidates(t)}
    assert used == ROME_RELATIONS
    assert all(table.label(rid) for rid in table.relation_ids)
    assert table.relation_ids[:3] == ("P17", "P19", "P20")  # numeric order


def test_relation_label(table):
    assert relation_label("P17") == "country"
    assert relation_label("P103", table) == "native language"
    assert table.label("P30") == "continent"
    with pytest.raises(ValueError, match="P9999"):
        relation_label("P9999", table)


def test_unknown_template_is_a_one_line_value_error(table):
    bad = "{} is the favourite colour of"
    for call in (
        lambda: table.assign([("The mother tongue of {} is", "French", "English"), (bad, "red", "blue")]),
        lambda: table.assign([(bad, "red", "blue")], classes={}),
        lambda: table.build_classes([(bad, "red", "blue")]),
        lambda: table.candidates(bad),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert bad in message and "\n" not in message


def test_table_entries_follow_pararel(table):
    # A few unambiguous templates (ParaRel / ROME's knowns) and the shared ones.
    assert table.candidates("The mother tongue of {} is") == ("P103",)
    assert table.candidates("{} speaks the language") == ("P1412",)
    assert table.candidates("{} is written in") == ("P407",)
    assert table.candidates("{}, a product created by") == ("P178",)
    assert table.candidates("{} is produced by") == ("P176",)
    assert table.candidates("{} is employed by") == ("P108",)
    assert table.candidates("{} is within") == ("P131",)
    assert set(table.candidates("{} is located in")) == {"P30", "P17", "P131", "P276"}
    assert set(table.candidates("{} is in")) == {"P30", "P131", "P276"}
    assert set(table.candidates("The language of {} was")) == {"P364", "P407"}
    assert set(table.candidates("{} plays")) == {"P136", "P1303", "P641"}
    assert set(table.candidates("{}, the")) == {"P413", "P1303", "P641"}
    shared = [t for t in table.templates if table.entry(t).ambiguous]
    assert len(shared) == 19
    assert all(table.entry(t).default in table.candidates(t) for t in shared)


def test_single_case_calls_use_seeds_then_default(table):
    one = table.assign
    assert one([("{} is located in", "Europe", "Asia")]) == ["P30"]
    assert one([("{} is located in", "France", "Italy")]) == ["P17"]
    assert one([("{}, in", "Massachusetts", "Ohio")]) == ["P131"]  # default: no seed matches
    assert one([("{} originated in", "Japan", "Canada")]) == ["P495"]
    assert one([("{} originated in", "Seattle", "Leeds")]) == ["P740"]
    assert one([("{}, the", "piano", "guitar")]) == ["P1303"]
    assert one([("{}, the", "hockey", "soccer")]) == ["P641"]
    assert one([("{}, the", "quarterback", "pitcher")]) == ["P413"]
    assert one([("{} plays", "jazz", "opera")]) == ["P136"]
    assert one([("The mother tongue of {} is", "French", "English")]) == ["P103"]
    assert table.assign_detailed([("{} is in", "Gotham", "Metropolis")]) == [Assignment("P276", "default")]
    assert one([]) == []


def _toy_table() -> RelationTable:
    return RelationTable.from_dict({
        "labels": {"P1": "one", "P2": "two", "P3": "three"},
        "templates": {
            "A {}": "P1",
            "B {}": "P2",
            "C {}": "P3",
            "X {}": {"candidates": ["P1", "P2", "P3"], "default": "P3"},
        },
    })


def test_disambiguation_rules_on_a_toy_table():
    table = _toy_table()
    classes = {"P1": Counter(a=3, b=1, shared=1), "P2": Counter(b=2, c=2, shared=1), "P3": {"z"}}

    def rule(true: str, new: str) -> Assignment:
        return table.assign_detailed([("X {}", true, new)], classes=classes)[0]

    assert rule("a", "zz") == Assignment("P1", "true")  # only P1 holds the true object
    assert rule("b", "a") == Assignment("P1", "both")  # P1 and P2 hold "b", only P1 also "a"
    assert rule("b", "c") == Assignment("P2", "both")
    assert rule("b", "zz") == Assignment("P2", "overlap")  # "b": 2 in P2 vs 1 in P1
    assert rule("shared", "zz") == Assignment("P1", "tie")  # 1 vs 1, default P3 not tied
    assert rule("zz", "c") == Assignment("P2", "new")  # fallback on the new object
    assert rule("zz", "yy") == Assignment("P3", "default")
    assert {a.rule for a in map(lambda t: rule(*t), [("a", "x"), ("zz", "yy")])} <= set(RULES)


def test_classes_come_from_unambiguous_cases_only_and_are_case_insensitive():
    table = _toy_table()
    cases = [("A {}", "Alpha", "Beta"), ("B {}", "Gamma", "delta"), ("X {}", "Omega", "Alpha")]
    classes = table.build_classes(cases)
    assert classes == {"P1": Counter(alpha=1, beta=1), "P2": Counter(gamma=1, delta=1)}
    # Classes built from the call's own cases: "alpha" -> P1, "delta" -> P2.
    got = table.assign(cases + [("X {}", "ALPHA ", "x"), ("X {}", "nothing", "DELTA")])
    assert got == ["P1", "P2", "P1", "P1", "P2"]  # "Omega"->"Alpha" resolves on the new object
    # Explicit classes (plain sets allowed) replace the ones from the cases.
    assert table.assign([("X {}", "alpha", "x")], classes={"P2": {"Alpha"}}) == ["P2"]
    assert normalize_object("  New   YORK ") == "new york"


def test_template_helpers():
    record = {"prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "ground_truth": "guitar",
              "target_new": "piano"}
    assert case_from_record(record) == ("{}, the", "guitar", "piano")
    assert template_of("Paris Paris is in", "Paris") == "{} Paris is in"
    with pytest.raises(ValueError, match="does not occur"):
        template_of("The capital of France is", "Germany")


# ------------------------------------------------------------ full dataset
def test_every_case_gets_exactly_one_relation(table, records, cases, detailed):
    assert len(records) == N_CASES
    assert len({r["case_id"] for r in records}) == N_CASES
    assert {c[0] for c in cases} == set(table.templates)  # all 218 templates, no extras
    assert len(detailed) == N_CASES
    assert all(isinstance(a.relation, str) and a.relation in ROME_RELATIONS for a in detailed)
    assert all(a.relation in table.candidates(c[0]) for c, a in zip(cases, detailed))
    assert table.assign(cases) == [a.relation for a in detailed]


HAND_PICKED = {
    0: "P103",      # The mother tongue of Danielle Darrieux is | French
    238: "P30",     # Kalahari Desert is located in | Africa
    359: "P17",     # Sumulong Highway is located in | Philippines
    566: "P17",     # Kandiaro Taluka is located in | Pakistan
    240: "P131",    # Arthur is located in | Illinois
    221: "P30",     # Risemedet Mountain is in | Antarctica
    323: "P131",    # Gracie Mansion is in | Manhattan
    875: "P30",     # Niger, in | Africa
    130: "P17",     # Saratov Oblast, in | Russia
    118: "P131",    # Oliver Ames High School, in | Massachusetts
    2: "P1303",     # Toko Yasuda, the | guitar
    15: "P413",     # Percy Snow, the | linebacker
    321: "P641",    # Zdeno Chára, the | hockey
    291: "P136",    # Jean-Luc Ponty plays | jazz
    1476: "P641",   # Tim Tebow plays | football
    19270: "P1303",  # Gustavo Laureano plays | guitar
    975: "P127",    # Bing Videos, from | Microsoft
    368: "P495",    # Corriere della Sera, from | Italy
    9131: "P740",   # OK Go originated in | Chicago
    1735: "P495",   # Senki Zesshō Symphogear was created in | Japan
    137: "P176",    # Yamaha TZR250 is developed by | Yamaha
    15901: "P178",  # Chrono Trigger is developed by | Square
    16345: "P364",  # The language of The Young Victoria is | English
}


def test_hand_picked_cases(records, by_case_id):
    prompts = {r["case_id"]: r["prompt"] for r in records}
    got = {cid: by_case_id[cid].relation for cid in HAND_PICKED}
    wrong = {cid: (prompts[cid], got[cid], want) for cid, want in HAND_PICKED.items() if got[cid] != want}
    assert not wrong


def test_relation_counts_look_like_rome(table, cases, detailed):
    counts = Counter(a.relation for a in detailed)
    print("\nper-relation counts over all CounterFact cases:")
    for rid in table.relation_ids:
        print(f"  {rid:6} {counts[rid]:5d}  {table.label(rid)}")
    assert set(counts) == ROME_RELATIONS
    assert sum(counts.values()) == N_CASES
    assert min(counts.values()) >= 50  # smallest is P264 (record label)
    # Relations reached by unambiguous templates only have exact counts.
    for rid, n in {"P103": 919, "P1412": 924, "P37": 891, "P27": 958, "P190": 621,
                   "P264": 53, "P36": 139, "P449": 794, "P463": 163}.items():
        assert counts[rid] == n, rid

    # ROME drew one template per case, uniformly among the relation's templates, so
    # a relation should get about as many cases from a shared template as it gets,
    # on average, from each of its own unambiguous templates.
    per_template: dict[str, list[int]] = defaultdict(list)
    by_template: dict[str, Counter] = defaultdict(Counter)
    for (template, _, _), a in zip(cases, detailed):
        by_template[template][a.relation] += 1
    for template, c in by_template.items():
        entry = table.entry(template)
        if not entry.ambiguous:
            per_template[entry.default].append(c[entry.default])
    for template, c in by_template.items():
        entry = table.entry(template)
        if entry.ambiguous:
            for rid in entry.candidates:
                expected = sum(per_template[rid]) / len(per_template[rid])
                assert 0.3 * expected <= c[rid] <= 2.0 * expected, (template, rid, c[rid], expected)


def test_few_cases_fall_back_to_the_default(table, cases, detailed):
    shared = [a for c, a in zip(cases, detailed) if table.entry(c[0]).ambiguous]
    rules = Counter(a.rule for a in shared)
    assert len(shared) == 4453
    assert rules["unambiguous"] == 0
    assert rules["default"] + rules["tie"] <= 0.01 * len(shared)


def test_subsets_agree_with_the_full_assignment(table, records_by_file, records, cases, detailed):
    full = {r["case_id"]: a.relation for r, a in zip(records, detailed)}
    val_records = records_by_file["counterfact-val.json"]
    val = [case_from_record(r) for r in val_records]
    want = [full[r["case_id"]] for r in val_records]
    own = table.assign(val)  # classes from the 1,919 validation cases alone
    shared = [i for i, c in enumerate(val) if table.entry(c[0]).ambiguous]
    assert sum(own[i] == want[i] for i in shared) >= 0.85 * len(shared)
    classes = build_classes(cases, table)  # classes from the full dataset
    assert table.assign(val, classes=classes) == want
