"""Reports: synthetic study databases with known values (batch and single protocols,
baselines only, empty), a real tiny study run end to end, the Markdown/HTML/PNG output,
and the HTML rendered in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_tiny_model
from studies import write_tiny_spec

from editdecay.evaluate.significance import rate_ci
from editdecay.report import (
    SECTIONS,
    ReportError,
    StudyData,
    build_report,
    build_sections,
    summary_table,
)
from editdecay.report.data import fmt
from editdecay.report.sections import published_values
from editdecay.study import Store, StudySpec
from editdecay.study.spec import AXES, Trial, config_hash
from editdecay.study.store import (
    CurvePoint,
    DownstreamRow,
    DriftRow,
    FactRow,
    MetricRow,
    TransitionRow,
    UnitRows,
)

GPTJ = "EleutherAI/gpt-j-6b"
SECTION_IDS = [sid for sid, _ in SECTIONS]
MEMIT_LORA = "zsre · memit · lora/all on commonsense"  # label of the synthetic study's main trial


# --- synthetic databases ----------------------------------------------------------------------------
def _config(model: str, dataset: str | None, editor: str, n: int, ft: str, policy: str | None, task: str | None,
            protocol: str, layers: list[int] | None, datasets: list[str]) -> dict:
    sel = {"n_edit": 10, "n_intrinsic": 10, "margin": 0.1, "mode": "greedy", "seed": 0, "filter": True}
    if editor == "none":
        data = {"datasets": [{"dataset": d, "path": None, "format": d, "zsre_preset": "memit"} for d in datasets],
                "selection": sel}
        edit = None
    else:
        data = {"dataset": dataset, "path": None, "format": dataset, "zsre_preset": "memit", "selection": sel}
        edit = {"editor": editor, "preset": None, "hparams": {}, "layers": layers, "protocol": protocol.split(":")[0],
                "batch_size": int(protocol.split(":")[1]) if ":" in protocol else None, "n_edits": n}
    finetune = None if ft == "none" else {"task": task, "method": ft, "policy": policy, "preset": "x", "params": {},
                                           "data": None}
    return {"version": 1, "model": model, "seed": 0, "data": data, "edit": edit, "finetune": finetune,
            "evaluate": {"probe": {"mode": "greedy"}, "downstream": None, "drift": None}}


def _counts(k: int, n: int) -> list[float]:
    return [1.0] * k + [0.0] * (n - k)


def add_trial(store: Store, sid: int, *, model: str = GPTJ, dataset: str = "zsre", editor: str = "memit", n: int = 10,
              ft: str = "lora", policy: str = "all", task: str = "commonsense", protocol: str = "batch",
              layers: list[int] | None = None, edited: int = 10, after: int = 7, es_after: int | None = None,
              intrinsic: int = 9, downstream: dict[str, tuple[int, int]] | None = None, drift: bool = True,
              datasets: tuple[str, ...] = ("zsre",), fail_unit: bool = False) -> str:
    """One trial with known outcomes: ``edited``/``after`` of ``n`` edit facts retained
    (and successful) after editing / after FT, ``intrinsic`` of 10 intrinsic facts after FT."""
    zero = editor == "none"
    has_ft = ft != "none"
    cfg = _config(model, None if zero else dataset, editor, 0 if zero else n, ft, policy if has_ft else None,
                  task if has_ft else None, protocol, layers, list(datasets))
    axes = {"model": model, "dataset": None if zero else dataset, "editor": editor,
            "edit_layers": None if zero else (layers or "default"), "n_edits": 0 if zero else n,
            "protocol": None if zero else protocol, "task": task if has_ft else None, "ft_method": ft,
            "layer_policy": policy if has_ft else None, "seed": 0, "preserve": "none" if has_ft and not zero else None}
    assert set(axes) == set(AXES)
    t = Trial(config_hash(cfg), json.loads(json.dumps(cfg)), axes, (axes,))
    store.upsert_trials(sid, [t])
    stages = ["base"] + ([] if zero else ["edited"]) + (["finetuned"] if has_ft else [])
    final = stages[-1]
    es_after = after if es_after is None else es_after
    edit_ids = [] if zero else [f"e{i}" for i in range(n)]
    ds_list = list(datasets) if zero else [dataset]
    steps = [0, 5, 10] if has_ft else []

    def edit_vals(stage: str, k_edit: int | None = None) -> dict[str, float]:
        k = {"base": 0, "edited": edited, "finetuned": after}[stage] if k_edit is None else k_edit
        return dict(zip(edit_ids, _counts(k, n)))

    def rows_for(unit_edit: list[str]) -> UnitRows:
        facts, curves, metrics, trans, down, drifts = [], [], [], [], [], []
        for stage in stages:
            ret = edit_vals(stage)
            es = edit_vals(stage, {"base": 0, "edited": edited, "finetuned": es_after}[stage])
            for c in unit_edit:
                facts += [FactRow(c, "edit", stage, "retained", ret[c], "new" if ret[c] else "old", dataset),
                          FactRow(c, "edit", stage, "retained_true", 1.0 - ret[c], None, dataset),
                          FactRow(c, "edit", stage, "es", es[c], None, dataset),
                          FactRow(c, "edit", stage, "ps", es[c], None, dataset),
                          # the edit damages the neighbourhood of the first two facts: NS drop 0.2
                          FactRow(c, "edit", stage, "ns", 0.0 if stage != "base" and c in edit_ids[:2] else 1.0,
                                  None, dataset),
                          FactRow(c, "edit", stage, "success", es[c], "new" if es[c] else "old", dataset)]
            k_int = intrinsic if stage == "finetuned" else 10
            for ds in ds_list:
                for i, v in enumerate(_counts(k_int, 10)):
                    facts.append(FactRow(f"i{i}", "intrinsic", stage, "retained", v, "true", ds))
        for j, s in enumerate(steps):
            frac = j / (len(steps) - 1)
            k_e = round(edited + (after - edited) * frac)
            k_i = round(10 + (intrinsic - 10) * frac)
            ret = edit_vals("edited", k_e)
            for c in unit_edit:
                facts.append(FactRow(c, "edit", f"step:{s}", "retained", ret[c], None, dataset))
                facts.append(FactRow(c, "edit", f"step:{s}", "top_k", None,
                                     json.dumps([[" Paris", 0.6 - 0.05 * j], [" Rome", 0.2], [" the", 0.1]]), dataset))
            for ds in ds_list:
                for i, v in enumerate(_counts(k_i, 10)):
                    facts.append(FactRow(f"i{i}", "intrinsic", f"step:{s}", "retained", v, None, ds))
            for side in ("edited", "intrinsic"):
                for cat, v in {"edited": 0.6 - 0.2 * frac, "true": 0.1 + 0.2 * frac, "related": 0.1,
                               "other": 0.2, "nonstop": 1.0}.items():
                    curves.append(CurvePoint(f"mass_{side}_{cat}", s, v))
            curves.append(CurvePoint("train_loss", s + 1, 3.0 - 0.1 * j))
        if has_ft:
            metrics += [MetricRow("stop_reason", None, "loss<base-0.3", "finetuned"), MetricRow("steps", 10, None, "finetuned")]
        if unit_edit and has_ft:
            succ_e, succ_f = edit_vals("edited"), edit_vals("finetuned", es_after)
            for c in unit_edit:
                lab = {(1, 1): "stable", (1, 0): "erased", (0, 1): "emergent", (0, 0): "impossible"}[
                    (int(succ_e[c]), int(succ_f[c]))]
                trans.append(TransitionRow(c, lab, "old", "new" if succ_e[c] else "old", "new" if succ_f[c] else "old",
                                           dataset))
        for task_name, (correct, items) in (downstream or {}).items():
            down.append(DownstreamRow(final, task_name, "gen", correct / items, items, correct, 0.9))
        if drift and not zero or drift and has_ft:
            for b in range(6):
                if not zero:
                    drifts.append(DriftRow("edited_vs_base", "distance", b, 1.0 if b in (3, 4) else 0.1, 5))
                if has_ft:
                    drifts.append(DriftRow("edited_finetuned_vs_edited" if not zero else "finetuned_vs_base",
                                           "distance", b, 0.2 * b, 5))
                if has_ft and not zero:
                    drifts.append(DriftRow("edft_ed", "cosine", b, -0.1 * b, 5))
        info = {"edited_layers": layers or [3, 4]} if not zero else {}
        return UnitRows(facts, curves, down, drifts, trans, metrics, info)

    if protocol == "single" and not zero:
        store.set_units(t.key, edit_ids)
        for k, c in enumerate(edit_ids):
            if fail_unit and k == 0:
                store.mark_running(t.key, c)
                store.mark_failed(t.key, c, "RuntimeError: boom")
                continue
            store.write_unit(t.key, c, rows_for([c]))
    else:
        store.write_unit(t.key, "", rows_for(edit_ids))
    return t.key


def add_base(store: Store, sid: int, *, model: str = GPTJ, downstream=None, datasets=("zsre",)) -> str:
    return add_trial(store, sid, model=model, editor="none", ft="none", downstream=downstream, drift=False,
                     datasets=datasets)


DOWN = {"boolq": (60, 100), "piqa": (50, 100)}


@pytest.fixture(scope="module")
def synthetic_db(tmp_path_factory) -> Path:
    """A batch study on 'GPT-J' (so the reproduction check matches) covering every section
    that needs no tracing: policies all/edited/non-edited/threshold/window, two editors,
    MEND, two tasks, SFT with two edit layers, downstream, drift."""
    db = tmp_path_factory.mktemp("synthetic") / "synthetic.db"
    store = Store(db)
    sid = store.register_study("synthetic", {"name": "synthetic"})
    add_base(store, sid, downstream={"boolq": (62, 100), "piqa": (55, 100)})
    add_trial(store, sid, editor="none", downstream={"boolq": (61, 100), "piqa": (52, 100)})
    add_trial(store, sid, ft="none", downstream={"boolq": (60, 100), "piqa": (54, 100)})
    add_trial(store, sid, downstream=DOWN)  # memit · lora/all: 7 of 10 retained after FT
    add_trial(store, sid, policy="edited", after=5, downstream=DOWN)
    add_trial(store, sid, policy="non-edited", after=9, downstream=DOWN)
    add_trial(store, sid, editor="alphaedit", after=4, es_after=4, downstream=DOWN)
    add_trial(store, sid, dataset="counterfact", after=6)
    add_trial(store, sid, ft="dora", after=8)
    add_trial(store, sid, ft="dora", dataset="counterfact", after=5)
    add_trial(store, sid, task="hotpotqa", after=3)
    for t in (1, 3, 5):
        add_trial(store, sid, editor="rome", task="unstructured", policy=f"threshold:{t}", after=4 + t)
    for c in (1, 3):
        add_trial(store, sid, editor="rome", task="unstructured", policy=f"window:{c},3", after=5)
    add_trial(store, sid, editor="mend", ft="none", n=10)
    add_trial(store, sid, editor="mend", ft="dora", after=2)
    for layer in (1, 6):
        add_trial(store, sid, editor="rome", task="sft", layers=[layer], after=3 + layer // 2)
    store.close()
    return db


@pytest.fixture(scope="module")
def single_db(tmp_path_factory) -> Path:
    """Protocol single (one unit per edited fact) on 'GPT-2 XL', with one failed unit."""
    db = tmp_path_factory.mktemp("single") / "single.db"
    store = Store(db)
    sid = store.register_study("single", {"name": "single"})
    add_base(store, sid, model="gpt2-xl", datasets=("counterfact",))
    add_trial(store, sid, model="gpt2-xl", editor="none", task="unstructured", datasets=("counterfact",))
    add_trial(store, sid, model="gpt2-xl", dataset="counterfact", editor="rome", task="unstructured",
              protocol="single", after=6, intrinsic=8)
    add_trial(store, sid, model="gpt2-xl", dataset="counterfact", editor="ft", task="unstructured",
              protocol="single", after=8, fail_unit=True)
    store.close()
    return db


@pytest.fixture(scope="module")
def baselines_db(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("baselines") / "baselines.db"
    store = Store(db)
    sid = store.register_study("baselines", {"name": "baselines"})
    add_base(store, sid)
    add_trial(store, sid, editor="none")
    store.close()
    return db


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("empty") / "empty.db"
    Store(db).close()
    return db


def _sections(db: Path) -> dict:
    d = StudyData(db, n_boot=2000)
    try:
        return {s.id: s for s in build_sections(d)}
    finally:
        d.close()


def _text(section) -> str:
    return "\n".join([section.markdown, section.missing or ""] + [c for t in section.tables for r in t.rows for c in r])


# --- known values -----------------------------------------------------------------------------------
def test_rates_show_the_known_value_with_interval_and_n(synthetic_db):
    secs = _sections(synthetic_db)
    assert not [s.id for s in secs.values() if s.error], [(s.id, s.error) for s in secs.values() if s.error]
    fig2 = secs["retention_after_edit_and_ft"]
    row = next(r for r in fig2.tables[0].rows if r[0] == MEMIT_LORA)
    expected = fmt(rate_ci([True] * 7 + [False] * 3, n_boot=2000))
    assert row[4] == expected and expected.startswith("0.70 [") and expected.endswith("n=10"), row
    assert row[3].startswith("1.00 [1.00, 1.00] n=10")
    assert row[6].startswith("0.90 [") and "n=10" in row[6]  # intrinsic after FT: 9 of 10
    # T1: ES in percent; T3: ΔES 30 points and EFR 3/10
    t1 = next(r for r in secs["edit_metrics_before_after_ft"].tables[0].rows if r[0] == row[0])
    assert t1[2].startswith("100.0") and t1[3].startswith("70.0 [")
    cols = secs["edit_metrics_before_after_ft"].tables[0].columns
    assert t1[cols.index("NS edited")].startswith("80.0 [") and t1[cols.index("NS unedited")].startswith("100.0")
    assert t1[cols.index("NS drop (edit)")].startswith("20.0 [")  # collateral damage, with its interval
    t3 = next(r for r in secs["es_drop_and_forgetting_rate"].tables[0].rows if r[0] == row[0])
    assert t3[1].startswith("30.0 [") and t3[2].startswith("0.30 [") and t3[2].endswith("n=10")
    # T2: decrease rate 0.3; T4: 7 stable, 3 erased
    assert next(r for r in secs["decrease_rates"].tables[0].rows if r[0] == row[0])[1].startswith("0.300 [")
    t4 = next(r for r in secs["fact_transitions"].tables[0].rows if r[0] == row[0])
    assert t4[1].startswith("7 (0.70") and t4[2].startswith("3 (0.30") and t4[-1] == "10"
    assert {r[1] for r in secs["fact_transitions"].tables[1].rows} == {"stable", "erased"}


def test_large_samples_use_the_binomial_bootstrap():
    from editdecay.report.data import mean_ci

    small = mean_ci([1.0] * 7 + [0.0] * 3, n_boot=2000)
    assert small == rate_ci([True] * 7 + [False] * 3, n_boot=2000)  # exactly rate_ci below the budget
    big = mean_ci([1.0] * 7000 + [0.0] * 3000 + [None] * 5)
    ref = rate_ci([True] * 7000 + [False] * 3000, n_boot=1000)
    assert big.n == 10000 and big.n_undefined == 5 and big.estimate == pytest.approx(0.7)
    assert big.low == pytest.approx(ref.low, abs=0.002) and big.high == pytest.approx(ref.high, abs=0.002)


def test_every_section_has_data_on_the_synthetic_batch_study(synthetic_db):
    secs = _sections(synthetic_db)
    empty = {sid for sid, s in secs.items() if not s.has_data}
    # no tracing in the store; the budget and preserve axes are tested in test_findings
    assert empty == {"causal_tracing", "budget_curves", "preserve", "reedit"}, empty
    assert "artefacts of kind `trace`" in secs["causal_tracing"].missing
    t5 = secs["selective_block_ft"].tables[0]
    assert t5.columns == ["metric", "base", "edited", "ft-all", "ft-edited", "ft-non-edited"]
    es = t5.rows[0]
    assert es[3].startswith("70.0") and es[4].startswith("50.0") and es[5].startswith("90.0")
    assert t5.rows[3][0] == "downstream acc." and t5.rows[3][1].startswith("58.5 [")  # base: (62 + 55) / 2
    t6 = secs["downstream_accuracy"]
    assert t6.tables[1].columns == ["trial", "boolq", "piqa"]
    memit = next(r for r in t6.tables[0].rows if r[0] == MEMIT_LORA)
    assert memit[1].startswith("▼") and "55.0 [" in memit[1] and memit[1].endswith("n=200")
    t20 = secs["downstream_degradation"].tables[0].rows
    assert any(r[2].startswith("1.5 [") for r in t20)  # zero-edit 56.5 − edited 55.0
    fig9 = {(r[0], r[1]): r for r in secs["significance_tests"].tables[0].rows}
    assert fig9[("all", "lora")][2] != "1" and fig9[("all", "lora")][5] != "—"
    assert secs["significance_tests"].figures and secs["significance_tests"].tables[1].columns[1] == "b (1→0)"
    assert len(secs["retention_vs_layer_threshold"].tables[0].rows) == 3 and len(secs["retention_vs_layer_window"].tables[0].rows) == 2
    assert [r[1] for r in secs["retention_vs_edit_layer"].tables[0].rows] == ["1", "6"]
    t15 = secs["hotpotqa_vs_commonsense"].tables[0].rows
    assert len(t15) == 1 and t15[0][4].startswith("30.0")
    assert secs["mend_under_ft"].tables[0].rows and all("mend" in r[0] for r in secs["mend_under_ft"].tables[0].rows)
    tab1 = secs["top_tokens_during_ft"].tables[0]
    assert tab1.rows[2][2] == "' Paris' (0.600)"


def test_reproduction_check_compares_matching_configurations(synthetic_db):
    rows = _sections(synthetic_db)["repro"].tables[0].rows
    es = next(r for r in rows if r[1] == "MEMIT zsRE ES")
    assert es[3] == "96.7" and es[4].startswith("100.0") and "n_edits ~ 10000" in es[5] and es[6] == "no"
    lora = next(r for r in rows if r[1] == "p-value LoRA (pooled)")
    assert lora[4] != "—" and "n=" in lora[4]
    rome = next(r for r in rows if r[1] == "ROME edited retention")
    assert rome[4] == "—" and "llama-3-8b" in rome[5]
    labels = {v["label"] for v in published_values()}
    assert {"AlphaEdit CounterFact NS", "MALMEN intrinsic retention", "p-value full FT (pooled)",
            "Llama3 intrinsic set mean p(second)"} <= labels
    for v in published_values():
        assert {"source", "label", "quantity", "unit", "value", "applies", "configuration"} <= set(v)


def test_single_protocol_averages_intrinsic_over_per_fact_models(single_db):
    secs = _sections(single_db)
    assert not [s.id for s in secs.values() if s.error]
    rome = next(r for r in secs["retention_after_edit_and_ft"].tables[0].rows if r[1] == "rome")
    assert rome[4].startswith("0.60 [") and rome[4].endswith("n=10")
    assert rome[6].startswith("0.80 [") and rome[6].endswith("n=10")  # 10 intrinsic facts, each over 10 models
    ft = next(r for r in secs["retention_after_edit_and_ft"].tables[0].rows if r[1] == "ft")
    assert ft[4].endswith("n=9")  # one unit failed: 9 facts
    overview = secs["overview"]
    assert any("boom" in r[2] for r in overview.tables[1].rows)
    assert any(r[4] == "9/10" and r[3] == "failed" for r in overview.tables[0].rows)
    assert secs["token_category_mass"].figures and "per-fact models" in secs["token_category_mass"].markdown


def test_sections_never_crash_on_empty_or_baseline_only_databases(empty_db, baselines_db, tmp_path):
    for db in (empty_db, baselines_db):
        secs = _sections(db)
        assert list(secs) == SECTION_IDS
        assert not [s.id for s in secs.values() if s.error], [(s.id, s.error) for s in secs.values() if s.error]
        for sid in ("retention_vs_layer_threshold", "edit_metrics_before_after_ft", "selective_block_ft", "causal_tracing"):
            assert secs[sid].missing and not secs[sid].has_data
        paths = build_report(db, tmp_path / db.stem, n_boot=500)
        assert paths.markdown.is_file() and paths.html.is_file()
    secs = _sections(empty_db)
    assert "no trials" in secs["overview"].missing
    assert "layer_policy ∈ {threshold:t}" in secs["retention_vs_layer_threshold"].missing
    assert summary_table(empty_db) == []
    rows = summary_table(baselines_db)
    assert [r["kind"] for r in rows] == ["base", "zero-edit"]
    assert rows[1]["intrinsic_retention"].startswith("1.00 [1.00, 1.00] → 0.90 [") and rows[1]["intrinsic_retention"].endswith("(n=10)")
    with pytest.raises(ReportError, match="no such study database"):
        build_report(tmp_path / "nope.db", tmp_path / "x")


def test_summary_table_rows(synthetic_db):
    assert summary_table(synthetic_db, study="1") == summary_table(synthetic_db, study="synthetic")  # --study id
    rows = summary_table(synthetic_db)
    assert set(rows[0]) == {"trial", "kind", "key", "status", "n_edits", "edited_retention", "intrinsic_retention",
                            "es", "stop_reason"}
    r = next(r for r in rows if r["trial"] == MEMIT_LORA)
    assert re.fullmatch(r"1\.00 \[1\.00, 1\.00\] → 0\.70 \[0\.\d\d, [01]\.\d\d\] \(n=10\)", r["edited_retention"])
    assert r["es"].startswith("100.0 [100.0, 100.0] → 70.0 [") and r["stop_reason"] == "loss<base-0.3 (10 steps)"


# --- output files and the browser ------------------------------------------------------------------
def _assert_self_contained(page: str, n_figures: int) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page and "@import" not in page
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == n_figures and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_build_report_writes_markdown_html_and_pngs(synthetic_db, tmp_path):
    paths = build_report(synthetic_db, tmp_path / "out", title="Synthetic", n_boot=1000)
    assert paths.figures and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths.figures)
    md = paths.markdown.read_text()
    for p in paths.figures:
        assert f"](figures/{p.name})" in md
    assert md.startswith("# Synthetic") and "0.70 [" in md and "n=10" in md
    page = paths.html.read_text()
    _assert_self_contained(page, len(paths.figures))
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in page


def _chromium() -> str | None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None and os.environ.get("EDITDECAY_REQUIRE_CHROMIUM"):
        pytest.fail("EDITDECAY_REQUIRE_CHROMIUM is set (CI) but no Chromium is installed")
    return exe


def render_dom(page: Path, tmp_path: Path) -> str:
    """The DOM of ``page`` after load, as headless Chromium serialises it."""
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium found (chromium, chromium-browser or google-chrome); "
                    "install it with: apt-get install -y chromium")
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chrome-profile'}", "--virtual-time-budget=10000", "--dump-dom",
           page.resolve().as_uri()]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_html_renders_in_headless_chromium(synthetic_db, tmp_path):
    if _chromium() is None:
        pytest.skip("no Chromium found (chromium, chromium-browser or google-chrome); "
                    "install it with: apt-get install -y chromium")
    paths = build_report(synthetic_db, tmp_path / "out", n_boot=500)
    dom = render_dom(paths.html, tmp_path)
    assert 'data-report="editdecay"' in dom
    assert f'data-images="{len(paths.figures)}"' in dom and 'data-images-ok="true"' in dom, dom[:400]
    d = StudyData(synthetic_db, n_boot=200)
    titles = [s.title for s in build_sections(d)]
    d.close()
    for title in titles:
        assert html.escape(title, quote=False) in dom, title


# --- a real tiny study -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_study_db(embedded, tmp_path_factory) -> Path:
    """The tiny-study recipe of test_study_runner (random 3-block Llama, protocol single)
    with activation drift, run end to end."""
    from editdecay.models import save_model
    from editdecay.study.runner import run_study

    tmp = tmp_path_factory.mktemp("tiny-report")
    tok = embedded[1]
    model_dir = save_model(make_tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256), tok,
                           tmp / "model")
    path = write_tiny_spec(tmp, model_dir, drift={"prompts": "edit", "limit": 4})
    db = tmp / "tiny.db"
    summary = run_study(StudySpec.from_yaml(path), db, progress=False)
    assert summary.failed == 0, summary.errors
    return db


def test_report_of_a_real_tiny_study(tiny_study_db, tmp_path):
    secs = _sections(tiny_study_db)
    assert not [s.id for s in secs.values() if s.error], [(s.id, s.error) for s in secs.values() if s.error]
    with_data = {sid for sid, s in secs.items() if s.has_data}
    assert {"overview", "summary", "retention_curves", "retention_after_edit_and_ft", "token_category_mass", "top_tokens_during_ft", "fact_selection",
            "edit_metrics_before_after_ft", "es_before_after_ft", "decrease_rates", "es_drop_and_forgetting_rate", "fact_transitions", "activation_drift", "significance_tests", "repro"} <= with_data
    rows = summary_table(tiny_study_db)
    assert [r["kind"] for r in rows] == ["base", "zero-edit", "edit-only", "edit+ft"]
    eft = rows[3]
    assert "→" in eft["edited_retention"] and eft["edited_retention"].endswith("(n=3)")
    assert eft["stop_reason"].startswith("max_steps ×3")
    paths = build_report(tiny_study_db, tmp_path / "tiny", n_boot=1000)
    page = paths.html.read_text()
    _assert_self_contained(page, len(paths.figures))
    assert len(paths.figures) >= 4
    if _chromium() is not None:
        dom = render_dom(paths.html, tmp_path)
        assert 'data-images-ok="true"' in dom
