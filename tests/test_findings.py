"""Findings with power: the fine-tuning budget axis (one run, a probe at every point,
counted), the verdict logic on constructed data (a known effect is supported, a null
effect inconclusive), interval width from n, and the report sections."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from studies import write_tiny_spec

from editdecay.errors import EditdecayError
from editdecay.evaluate.significance import Interval, interval_halfwidth, n_for_halfwidth
from editdecay.finetune.run import budget_config
from editdecay.finetune.trainer import TrainConfig, train
from editdecay.report import StudyData, build_sections
from editdecay.report.findings import decide, decide_equivalence, findings
from editdecay.study import Store, StudySpec
from editdecay.study.spec import Trial, config_hash, format_plan, precision_lines
from editdecay.study.store import CurvePoint, FactRow, MetricRow, UnitRows


# --- the trainer's budget points ----------------------------------------------------------
def _batches(vocab: int, tokens: int):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (2, tokens), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _tiny():
    torch.manual_seed(0)
    m = make_tiny_model("llama")
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def test_step_budget_probes_at_every_point_in_one_run():
    model, calls = _tiny(), []
    cfg = budget_config(TrainConfig(lr=1e-3, max_steps=100, eval_every=100, stop=["loss<100"]), [7, 3, 12])
    assert cfg.max_steps == 12 and cfg.eval_at == (3, 7, 12)
    log = train(model, _batches(model.config.vocab_size, 8), replace_rules(cfg), evaluate=lambda m: {"loss": 1.0},
                probes=[lambda m, s: calls.append(s) or {}], progress=False)
    assert calls == [0, 3, 7, 12] and log.steps == 12
    assert [p["step"] for p in log.probes] == [0, 3, 7, 12]
    assert log.tokens_at == {0: 0, 3: 48, 7: 112, 12: 192}  # 2 × 8 tokens per step


def replace_rules(cfg: TrainConfig) -> TrainConfig:
    """The budget keeps the preset's stopping rules; this test needs the run to go on."""
    from dataclasses import replace

    return replace(cfg, stop=[])


def test_token_budget_stops_at_the_largest_point():
    model, calls = _tiny(), []
    cfg = budget_config(TrainConfig(lr=1e-3, max_steps=5, eval_every=1000), [50, 100, 20], unit="tokens")
    log = train(model, _batches(model.config.vocab_size, 8), cfg, evaluate=lambda m: {"loss": 1.0},
                probes=[lambda m, s: calls.append(s) or {}], progress=False)
    # 16 tokens per step: 20 is reached at step 2 (32), 50 at 4 (64), 100 at 7 (112)
    assert calls == [0, 2, 4, 7] and log.stop_reason == "budget" and log.steps == 7
    with pytest.raises(EditdecayError, match="budget unit"):
        budget_config(cfg, [1], unit="epochs")
    with pytest.raises(EditdecayError, match=">= 1"):
        TrainConfig(eval_at=(0,))


# --- the spec and the runner --------------------------------------------------------------
def test_spec_budget_sets_one_run_and_keeps_other_keys(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("x")
    base = {"name": "b", "axes": {"model": "m", "dataset": "builtin", "editor": "rome", "n_edits": 2,
                                  "task": "unstructured", "ft_method": "lora", "layer_policy": "all"},
            "selection": {"n_edit": 100, "n_intrinsic": 50}}
    plain = StudySpec.from_dict(base).expand()
    with_budget = StudySpec.from_dict({**base, "finetune": {"budget": [40, 10, 160]}}).expand()
    ft = with_budget[-1].config["finetune"]
    assert ft["budget"] == {"unit": "steps", "at": [10, 40, 160]}
    assert ft["params"]["max_steps"] == 160 and ft["params"]["stop"] == [] and ft["params"]["eval_every"] == 160
    assert "budget" not in plain[-1].config["finetune"]
    assert len(plain) == 1 and plain[0].key != with_budget[0].key
    tok = StudySpec.from_dict({**base, "finetune": {"budget": {"tokens": [1000, 5000]}}}).expand()[-1]
    assert tok.config["finetune"]["budget"] == {"unit": "tokens", "at": [1000, 5000]}
    for bad, msg in (([], "at least one"), ([5, 5], "repeat"), ({"epochs": [1]}, "epochs"), ([0], ">= 1")):
        with pytest.raises(EditdecayError, match=msg) as e:
            StudySpec.from_dict({**base, "finetune": {"budget": bad}})
        assert "finetune.budget" in str(e.value)
    plan = format_plan(StudySpec.from_dict(base), plain)
    assert "edited (ES, PS, NS, retention, EFR): n=2 per trial -> 95% interval about ±0.693" in plan
    assert "n >= 97 gives ±0.10" in plan
    assert "intrinsic retention: n=50 per trial -> 95% interval about ±0.139" in plan


def test_interval_width_from_n():
    assert interval_halfwidth(100) == pytest.approx(1.959964 * 0.05, rel=1e-6)
    assert interval_halfwidth(200, p=0.9) == pytest.approx(1.959964 * math.sqrt(0.09 / 200), rel=1e-6)
    assert interval_halfwidth(0) == math.inf
    assert n_for_halfwidth(0.10) == 97 and interval_halfwidth(97) <= 0.10 < interval_halfwidth(96)
    assert n_for_halfwidth(0.05, p=0.9) == 139
    lines = precision_lines([])
    assert lines == []


@pytest.fixture(scope="module")
def tiny_dir(embedded, tmp_path_factory):
    from editdecay.models import save_model

    tok = embedded[1]
    return save_model(make_tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256), tok,
                      tmp_path_factory.mktemp("tiny-budget") / "model")


def test_study_budget_axis_probes_every_point_in_one_finetuning(tiny_dir, tmp_path, monkeypatch):
    """One fine-tuning per trial for the whole curve; the re-edit stage runs after it."""
    import editdecay.finetune.run as run_mod
    from editdecay.study.runner import run_study

    runs = []
    real = run_mod.finetune
    monkeypatch.setattr(run_mod, "finetune", lambda *a, **k: runs.append(k.get("budget")) or real(*a, **k))
    path = write_tiny_spec(tmp_path, tiny_dir, axes={"editor": "ft", "ft_method": "lora", "protocol": "batch"},
                           finetune={"budget": [2, 5], "overrides": {"eval_every": 1000, "n_val": 2, "block_size": 16,
                                                                     "batch_size": 2}},
                           probes={"every": None}, reedit=True)
    db = tmp_path / "b.db"
    summary = run_study(StudySpec.from_yaml(path), db, progress=False)
    assert summary.failed == 0, summary.errors
    assert runs == [[2, 5]]  # one fine-tuning for the whole curve
    with Store(db) as store:
        t = next(t for t in store.trials() if t["kind"] == "edit+ft")
        info = json.loads(store.units(t["key"])[0]["info_json"])
        assert info["budget"]["evaluations"] == 3 and info["steps"] == 5  # steps 0, 2, 5
        rows = store.fact_outcomes(t["key"])
        stages = {r["stage"] for r in rows if r["metric"] == "es"}
        assert stages == {"base", "edited", "finetuned", "step:0", "step:2", "step:5"}
        assert {r["metric"] for r in rows if r["stage"] == "step:2"} >= {"retained", "es", "ps", "ns", "success"}
        tokens = {r["step"]: r["value"] for r in store.curves(t["key"]) if r["name"] == "tokens"}
        assert tokens == {0: 0.0, 2: 64.0, 5: 160.0}  # 2 blocks of 16 tokens per step
    secs = {s.id: s for s in build_sections(StudyData(db, n_boot=200))}
    budget = secs["budget_curves"]
    assert budget.has_data and [r[1] for r in budget.tables[0].rows] == ["0", "2", "5"]
    assert budget.tables[0].rows[1][2] == "64" and budget.tables[0].rows[1][3].endswith("n=3")
    assert secs["findings"].has_data and not secs["findings"].error
    with Store(db) as store:
        info = json.loads(store.units(t["key"])[0]["info_json"])
    re_ = info["reedit"]
    assert re_["editor"] == "ft" and re_["n_facts"] == 3 and re_["scratch"]["n"] == 3
    assert re_["reedit"]["n"] == len(re_["decayed"]) and re_["reedit"]["seconds"] >= 0
    assert secs["reedit"].has_data and secs["reedit"].tables[0].rows[0][1] == f"{len(re_['decayed'])}/3"


# --- verdicts on constructed data ---------------------------------------------------------
def test_decide_directional_and_equivalence():
    iv = lambda e, lo, hi: Interval(e, lo, hi, 100)
    assert decide(iv(0.3, 0.2, 0.4), 1e-6) == "supported"
    assert decide(iv(-0.3, -0.4, -0.2), 1e-6) == "contradicted"
    assert decide(iv(-0.3, -0.4, -0.2), 1e-6, direction=-1) == "supported"
    assert decide(iv(0.02, -0.05, 0.09), 0.6) == "inconclusive"
    assert decide(Interval(math.nan, math.nan, math.nan, 0), None) == "no data"
    assert decide_equivalence(iv(0.01, -0.04, 0.05)) == "supported"
    assert decide_equivalence(iv(0.0, -0.2, 0.2)) == "inconclusive"
    assert decide_equivalence(iv(-0.3, -0.4, -0.2)) == "contradicted"


def _trial(store: Store, sid: int, *, editor: str = "memit", policy: str = "all", method: str = "lora",
           edited: list[float], after: list[float], intrinsic_after: list[float], margins: list[float] | None = None,
           preserve: str = "none", val_loss: float = 3.0, seconds: float = 10.0):
    """An edit+ft trial with given per-fact outcomes (success = retained) after the edit and FT."""
    n = len(edited)
    sel = {"n_edit": n, "n_intrinsic": len(intrinsic_after)}
    cfg = {"model": "m", "seed": 0, "data": {"dataset": "cf", "format": "counterfact", "selection": sel},
           "edit": {"editor": editor, "n_edits": n, "protocol": "batch", "batch_size": None, "layers": None},
           "finetune": {"task": "unstructured", "method": method, "policy": policy, "params": {},
                        **({"preserve": {"method": preserve}} if preserve != "none" else {})},
           "evaluate": {"probe": {}}}
    axes = {"model": "m", "dataset": "cf", "editor": editor, "edit_layers": "default", "n_edits": n,
            "protocol": "batch", "task": "unstructured", "ft_method": method, "layer_policy": policy, "seed": 0,
            "preserve": preserve}
    t = Trial(config_hash(cfg), cfg, axes, (axes,))
    store.upsert_trials(sid, [t])
    facts = []
    for i in range(n):
        for stage, v in (("edited", edited[i]), ("finetuned", after[i])):
            facts += [FactRow(f"e{i}", "edit", stage, m, v, None, "cf") for m in ("retained", "success")]
        if margins:
            facts.append(FactRow(f"e{i}", "edit", "edited", "margin", margins[i], None, "cf"))
    for i, v in enumerate(intrinsic_after):
        facts += [FactRow(f"i{i}", "intrinsic", "edited", "retained", 1.0, None, "cf"),
                  FactRow(f"i{i}", "intrinsic", "finetuned", "retained", v, None, "cf")]
    curves = [CurvePoint("train_loss", 1, 1.0), CurvePoint("val_loss", 0, 3.5), CurvePoint("val_loss", 20, val_loss)]
    metrics = [MetricRow("finetune_seconds", seconds, None, "finetuned"), MetricRow("steps", 20, None, "finetuned")]
    store.write_unit(t.key, "", UnitRows(facts, curves, [], [], [], metrics, {}))


def _ones(k: int, n: int) -> list[float]:
    return [1.0] * k + [0.0] * (n - k)


@pytest.fixture(scope="module")
def constructed(tmp_path_factory) -> Path:
    """100 edits: under policy all 40 survive FT, under non-edited 90 (a known effect);
    AlphaEdit and MEMIT decay identically (a null effect); intrinsic 190/200 vs 40/100."""
    db = tmp_path_factory.mktemp("claims") / "c.db"
    store = Store(db)
    sid = store.register_study("claims", {"name": "claims"})
    ones = [1.0] * 100
    _trial(store, sid, policy="all", edited=ones, after=_ones(40, 100), intrinsic_after=_ones(190, 200),
           margins=[2.0] * 100)
    _trial(store, sid, policy="non-edited", edited=ones, after=_ones(90, 100), intrinsic_after=_ones(190, 200))
    _trial(store, sid, editor="alphaedit", policy="all", edited=ones, after=_ones(40, 100)[::-1],
           intrinsic_after=_ones(190, 200), margins=[2.5] * 50 + [9.0] * 50)
    _trial(store, sid, policy="all", preserve="anchor", edited=ones, after=_ones(95, 100),
           intrinsic_after=_ones(190, 200), val_loss=3.03, seconds=12.0)
    store.close()
    return db


def test_a_known_effect_is_supported_and_a_null_effect_inconclusive(constructed):
    d = StudyData(constructed, n_boot=2000)
    fs = findings(d)
    by = {}
    for f in fs:
        by.setdefault(f.claim, []).append(f)
    freeze = by["freezing the edited layers raises edited retention"]
    assert len(freeze) == 1 and freeze[0].verdict == "supported"
    assert freeze[0].effect.estimate == pytest.approx(0.5) and freeze[0].effect.n == 100 and freeze[0].p < 1e-6
    opposite = by["non-edited-layer FT impairs more edits than full-model FT"]
    assert [f.verdict for f in opposite] == ["contradicted"]
    gap = by["edited retention < intrinsic retention after FT"]
    # 40/100 and (AlphaEdit) 40/100 vs 190/200: supported; 90/100 vs 190/200 (p ≈ 0.13): inconclusive at this n
    assert sorted(f.verdict for f in gap) == ["inconclusive", "supported", "supported"] and gap[0].effect.n == 300
    alpha = {f.comparison.rsplit(", ", 1)[1]: f for f in by["AlphaEdit edits decay more than MEMIT's"]}
    raw, matched = alpha["raw"], alpha["matched margin (|Δ| ≤ 1 nat)"]
    assert raw.verdict == "inconclusive" and raw.effect.estimate == pytest.approx(0.0)  # 60 lost each
    assert matched.effect.n == 50  # only the facts with margins 2.0 vs 2.5
    stable = by["intrinsic retention stable under FT (within ±0.10)"]
    assert {f.verdict for f in stable} == {"supported"}  # 200 → 190: −0.05, interval inside ±0.10
    sec = next(s for s in build_sections(d) if s.id == "findings")
    assert sec.tables[0].rows and any("supported" in " ".join(r) for r in sec.tables[1].rows)
    assert sec.tables[2].columns[1] == "margin after edit"
    d.close()


def test_preserve_section_compares_each_method_with_plain_finetuning(constructed):
    d = StudyData(constructed, n_boot=2000)
    sec = next(s for s in build_sections(d) if s.id == "preserve")
    assert sec.has_data, sec.missing
    plain, anchor = sec.tables[0].rows
    assert plain[1] == "none" and plain[2].startswith("0.40 [") and plain[5] == "3.000" and plain[6] == "0.50"
    assert anchor[1] == "anchor" and anchor[2].startswith("0.95 [")
    assert anchor[3].startswith("0.55 [") and "p=" in anchor[3]  # 55 facts kept that plain FT lost
    assert anchor[5] == "3.030 (+1.0%)" and anchor[6] == "0.60"
    # the preserving trial is not another policy or editor: no freezing/editor pair picks it up
    assert len([f for f in findings(d) if f.claim.startswith("freezing")]) == 1
    d.close()


def test_preserve_label_keeps_runs_of_one_method_with_other_settings_apart():
    from editdecay.report.data import TrialInfo
    from editdecay.report.preserve import preserve_label

    def t(cfg, method):
        return TrialInfo("k", "edit+ft", "done", {"finetune": {"preserve": cfg} if cfg else {}},
                         {"preserve": method}, 1, [])

    assert preserve_label(t({"method": "distill", "rho": 0.3, "replay_batch": 4}, "distill")) == "distill replay_batch=4 rho=0.3"
    assert preserve_label(t(None, "none")) == "none" and preserve_label(t({"method": "nullspace"}, "nullspace")) == "nullspace"


def test_spec_preserve_axis(tmp_path):
    base = {"name": "p", "axes": {"model": "m", "dataset": "builtin", "editor": ["none", "memit"], "n_edits": 2,
                                  "task": "unstructured", "ft_method": "lora", "layer_policy": "all",
                                  "preserve": ["none", "anchor", "replay", "freeze-edited"]},
            "finetune": {"preserve": {"mu": 5, "rho": 0.2}}}
    trials = StudySpec.from_dict(base).expand()
    plain = StudySpec.from_dict({**base, "axes": {**base["axes"], "preserve": "none"}}).expand()
    assert {t.key for t in plain} <= {t.key for t in trials}  # preserve none: the plain trials, same keys
    kinds = [t.kind for t in trials]
    assert kinds.count("zero-edit") == 1  # nothing to preserve without edits: the four points merge
    pres = {t.axes["preserve"]: t.config["finetune"].get("preserve") for t in trials if t.kind == "edit+ft"}
    assert pres == {"none": None, "anchor": {"method": "anchor", "mu": 5.0},
                    "replay": {"method": "replay", "rho": 0.2}, "freeze-edited": {"method": "freeze-edited"}}
    with pytest.raises(EditdecayError, match="freeze-edited.*layer_policy 'edited'"):
        StudySpec.from_dict({**base, "axes": {**base["axes"], "editor": "memit",
                                              "layer_policy": ["all", "edited"]}}).expand()
    with pytest.raises(EditdecayError, match="finetune.preserve.lr: unknown field"):
        StudySpec.from_dict({**base, "finetune": {"preserve": {"lr": 1}}})
