"""The study runner end to end on a tiny model: every unit runs, rows land in the store,
a SIGKILLed run resumes without recomputing or duplicating anything, and Ray runs it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from editdecay.study import Store, StudySpec
from editdecay.study.runner import run_study

from conftest import REPO, make_tiny_model
from studies import write_tiny_spec


@pytest.fixture(scope="module")
def tiny_dir(embedded, tmp_path_factory):
    """A tiny random Llama with the embedded tokenizer, saved as a model directory."""
    from editdecay.models import save_model

    tok = embedded[1]
    model = make_tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256)
    return save_model(model, tok, tmp_path_factory.mktemp("tiny") / "model")


def check_complete(db: Path) -> dict:
    """Every unit done; no duplicated rows; per-unit rows complete."""
    with Store(db) as store:
        units = store.rows("units")
        assert units and all(u["status"] == "done" for u in units), [(u["trial_key"][:8], u["unit_id"], u["status"]) for u in units]
        rows = store.rows("fact_outcomes")
        keys = [(r["trial_key"], r["unit_id"], r["dataset"], r["case_id"], r["fact_set"], r["stage"], r["metric"]) for r in rows]
        assert len(keys) == len(set(keys)), "duplicated fact rows"
        return {"units": {(u["trial_key"], u["unit_id"]): u["finished"] for u in units}, "facts": len(rows),
                "trials": store.trials(), "store": None}


def test_tiny_study_runs_end_to_end(tiny_dir, tmp_path):
    spec = StudySpec.from_yaml(write_tiny_spec(tmp_path, tiny_dir))
    db = tmp_path / "tiny.db"
    summary = run_study(spec, db, progress=False)
    assert summary.failed == 0, summary.errors
    assert summary.done == 1 + 1 + 3 + 3  # base, zero-edit, 3 + 3 single-fact units
    check_complete(db)
    with Store(db) as store:
        trials = {t["kind"]: t for t in store.trials()}
        assert set(trials) == {"base", "zero-edit", "edit-only", "edit+ft"}
        key = trials["edit+ft"]["key"]
        units = store.units(key)
        assert sorted(u["unit_id"] for u in units) != [""] and len(units) == 3
        unit = units[0]["unit_id"]
        facts = store.fact_outcomes(key, unit_id=unit)
        stages = {r["stage"] for r in facts}
        assert {"base", "edited", "finetuned", "step:0", "step:1", "step:2"} <= stages
        edit_rows = [r for r in facts if r["fact_set"] == "edit" and r["stage"] == "edited"]
        assert {r["case_id"] for r in edit_rows} == {unit}  # protocol single: one fact per unit
        assert len(store.transitions(key, unit_id=unit)) == 1
        curves = {r["name"] for r in store.curves(key, unit_id=unit)}
        assert {"train_loss", "val_loss", "retention_new", "retention_true", "mass_edited_edited"} <= curves
        metrics = {r["name"]: r for r in store.metrics(key, unit_id=unit)}
        assert metrics["steps"]["value"] == 2 and metrics["stop_reason"]["text"] == "max_steps"
        zero = trials["zero-edit"]["key"]
        z = store.fact_outcomes(zero)
        assert z and {r["fact_set"] for r in z} == {"intrinsic"} and {r["dataset"] for r in z} == {"builtin"}
        assert not store.transitions(trials["edit-only"]["key"])
        only = trials["edit-only"]["key"]  # the edit is computed once and shared by both trials
        same = lambda k: sorted((r["case_id"], r["metric"], r["value"]) for r in store.fact_outcomes(k, unit_id=unit, stage="edited"))
        assert same(only) == same(key)
        secs = lambda k: [r["value"] for r in store.metrics(k, unit_id=unit) if r["name"] == "edit_seconds"]
        assert secs(only) == secs(key)
    again = run_study(spec, db, progress=False)  # everything finished: nothing reruns
    assert again.done == 0 and again.failed == 0


def test_a_sigkilled_study_resumes_without_recomputing(tiny_dir, tmp_path):
    path = write_tiny_spec(tmp_path, tiny_dir)
    db = tmp_path / "tiny.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "editdecay", "run", str(path), "--db", str(db)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    done = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            if db.exists():
                try:
                    with Store(db) as s:
                        done = s.count("units", status="done")
                except Exception:  # noqa: BLE001 - schema still being created
                    continue
                if done >= 3:
                    break
        assert proc.poll() is None, "the study finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    with Store(db) as s:
        units = s.rows("units")
        finished = {(u["trial_key"], u["unit_id"]): u["finished"] for u in units if u["status"] == "done"}
        assert 3 <= len(finished) < 8
        for u in units:  # nothing partial: units not done have no rows
            if u["status"] != "done":
                assert s.count("fact_outcomes", trial_key=u["trial_key"], unit_id=u["unit_id"]) == 0
                assert s.count("curves", trial_key=u["trial_key"], unit_id=u["unit_id"]) == 0
    summary = run_study(StudySpec.from_yaml(path), db, progress=False)
    assert summary.failed == 0 and summary.done == 8 - len(finished)  # only the unfinished units ran
    after = check_complete(db)
    for k, t in finished.items():  # finished units were not recomputed
        assert after["units"][k] == t


def test_ray_executor_runs_the_study(tiny_dir, tmp_path):
    ray = pytest.importorskip("ray")
    spec = StudySpec.from_yaml(write_tiny_spec(tmp_path, tiny_dir, resources={"cpus": 1, "gpus": 0}))
    db = tmp_path / "ray.db"
    try:
        summary = run_study(spec, db, executor="ray", max_parallel=2, progress=False)
    finally:
        ray.shutdown()
    assert summary.failed == 0 and summary.done == 8, summary.errors
    check_complete(db)


def test_cli_plan_and_run_errors(tmp_path):
    from typer.testing import CliRunner

    from editdecay.cli import app

    r = CliRunner().invoke(app, ["plan", str(REPO / "examples" / "demo.yaml"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["grid_points"] == 12 and len(doc["trials"]) == 9
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: {ft_method: [lorra]}\n")
    r = CliRunner().invoke(app, ["run", str(bad)])
    assert r.exit_code != 0 and "'lorra' is not one of" in str(r.exception)


def test_editor_checkpoint_resolves_against_the_spec_folder(tiny_dir, tmp_path, monkeypatch):
    """A MEND checkpoint named relative to the spec is found from any working directory."""
    import json

    from editdecay.editing import get_editor
    from editdecay.models import load_model

    model, _ = load_model(tiny_dir)
    editor = get_editor("mend", model=model, overrides={"layers": [2], "rank": 4})
    editor.prepare(model)  # the untrained (identity) network is enough to test the path
    editor.save(tmp_path / "ck", model)
    path = write_tiny_spec(tmp_path, tiny_dir, axes={"editor": "mend", "ft_method": "none", "protocol": "batch"},
                           editors={"mend": {"hparams": {"checkpoint": "ck"}}})
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    summary = run_study(StudySpec.from_yaml(path), tmp_path / "m.db", progress=False)
    assert summary.failed == 0, summary.errors
    with Store(tmp_path / "m.db") as store:
        key = next(t["key"] for t in store.trials() if t["kind"] == "edit-only")
        info = json.loads(store.units(key)[0]["info_json"])
    assert info["editor_preset"] == f"checkpoint:{tmp_path / 'ck'}" and info["edited_layers"] == [2]


def test_hygiene_filters_each_units_facts(tiny_dir, tmp_path):
    """finetune.hygiene: under single each fact's fine-tuning data loses the documents
    that mention it (not those of the other facts); the counts are in the unit's info."""
    import json

    from editdecay.facts.datasets import load_facts

    facts = load_facts("", format="builtin")
    text = tmp_path / "mentions.txt"  # one paragraph per builtin subject, then neutral ones
    text.write_text("\n\n".join([f"Something about {f.subject}." for f in facts]
                                + [f"Paragraph {i} of plain filler." for i in range(40)]))
    path = write_tiny_spec(tmp_path, tiny_dir, finetune={"data": {"unstructured": str(text)}, "hygiene": True})
    spec = StudySpec.from_yaml(path)
    assert all(t.config["finetune"]["hygiene"] for t in spec.expand() if t.config["finetune"])
    summary = run_study(spec, tmp_path / "h.db", progress=False)
    assert summary.failed == 0, summary.errors
    with Store(tmp_path / "h.db") as store:
        key = next(t["key"] for t in store.trials() if t["kind"] == "edit+ft")
        infos = {u["unit_id"]: json.loads(u["info_json"])["hygiene"] for u in store.units(key)}
        zero = next(t["key"] for t in store.trials() if t["kind"] == "zero-edit")
        zero_info = json.loads(store.units(zero)[0]["info_json"])
    assert len(infos) == 3
    n_docs = len(facts) + 40
    for h in infos.values():  # the unit's own subject paragraph at least, far from all of them
        assert h["n_docs"] == n_docs and 1 <= h["n_dropped"] < len(facts) // 4 and h["n_kept"] >= 40, h
    assert "hygiene" not in zero_info  # nothing to filter for the zero-edit baseline


def test_downstream_rows_and_evaluator_options(tiny_dir, tmp_path, shared_data, monkeypatch):
    """A downstream block scores every applicable stage, and its options (here the cloze
    context) reach the evaluator."""
    import editdecay.evaluate.downstream as dsmod

    seen = []
    real = dsmod.evaluate_downstream

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dsmod, "evaluate_downstream", spy)
    path = write_tiny_spec(tmp_path, tiny_dir, axes={"protocol": "batch"},
                           downstream={"tasks": ["boolq", "arc-e"], "mode": "ll", "limit": 3, "ll_context": "cloze",
                                       "stages": ["final", "edited"], "data_dir": str(shared_data / "commonsense")})
    summary = run_study(StudySpec.from_yaml(path), tmp_path / "d.db", progress=False)
    assert summary.failed == 0, summary.errors
    assert seen and all(k["ll_context"] == "cloze" and k["mode"] == "ll" and k["limit"] == 3 for k in seen)
    with Store(tmp_path / "d.db") as store:
        by_kind = {t["kind"]: t["key"] for t in store.trials()}
        rows = store.rows("downstream")
    stages = {(r["trial_key"], r["stage"]) for r in rows}
    assert stages == {(by_kind["base"], "base"), (by_kind["zero-edit"], "finetuned"), (by_kind["edit-only"], "edited"),
                      (by_kind["edit+ft"], "edited"), (by_kind["edit+ft"], "finetuned")}
    assert {r["task"] for r in rows} == {"boolq", "ARC-Easy"} and all(r["n"] == 3 and r["mode"] == "ll" for r in rows)


def test_base_and_edited_stages_are_scored_once_per_weights(tiny_dir, tmp_path, monkeypatch):
    """A unit whose base model and edit were scored by an earlier unit reuses those scores
    (counted) and writes the same rows as a fresh worker."""
    import editdecay.evaluate.metrics as metrics
    from editdecay.study.runner import Worker

    spec = StudySpec.from_yaml(write_tiny_spec(tmp_path, tiny_dir))
    trials = {t.kind: t for t in spec.expand()}
    only, both = trials["edit-only"].config, trials["edit+ft"].config
    calls = []
    real = metrics.score_facts
    monkeypatch.setattr(metrics, "score_facts", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    worker = Worker(spec.base_dir, progress=False)
    unit = worker.unit_ids(only)[0]
    worker.run_unit(only, unit)
    assert len(calls) == 4  # base and edited: the edit set and the intrinsic set each
    calls.clear()
    shared = worker.run_unit(both, unit)
    assert len(calls) == 2  # only the fine-tuned stage is scored (the budget probes call the probe's own path)
    fresh = Worker(spec.base_dir, progress=False).run_unit(both, unit)
    rows = lambda r: sorted((f.case_id, f.fact_set, f.stage, f.metric, f.value) for f in r.facts if f.stage in ("base", "edited"))
    assert rows(shared) == rows(fresh) and rows(shared)


def test_an_edits_key_is_the_same_for_a_config_read_back_from_the_store(tiny_dir, tmp_path):
    """A config read back from the store (canonical JSON) keys its edit as the expanded
    config does, so a reader of the store finds the --edit-cache entry; other edit
    settings or facts key differently."""
    import json

    from editdecay.study.runner import edit_key
    from editdecay.study.spec import canonical_json

    spec = StudySpec.from_yaml(write_tiny_spec(tmp_path, tiny_dir))
    cfg = {t.kind: t for t in spec.expand()}["edit-only"].config
    stored = json.loads(canonical_json(cfg))
    ids = ["a", "b"]
    assert edit_key(stored, ids) == edit_key(cfg, ids)
    other = json.loads(canonical_json(cfg))
    other["edit"]["hparams"]["__probe__"] = 1
    assert edit_key(other, ids) != edit_key(cfg, ids) and edit_key(cfg, ["a"]) != edit_key(cfg, ids)


def test_an_edit_cache_lets_a_fresh_worker_skip_the_edit(tiny_dir, tmp_path, monkeypatch):
    """With ``edit_cache`` an edit computed by one worker is loaded by a fresh one (another
    run or study): the editor is not called again and the edited weights and rows are the same."""
    import editdecay.study.runner as runner

    spec = StudySpec.from_yaml(write_tiny_spec(tmp_path, tiny_dir))
    trials = {t.kind: t for t in spec.expand()}
    only, both = trials["edit-only"].config, trials["edit+ft"].config
    cache = tmp_path / "cache"
    first = runner.Worker(spec.base_dir, progress=False, edit_cache=cache)
    unit, other = first.unit_ids(only)[:2]
    rows_first = first.run_unit(only, unit)
    entries = list((cache / "edits").iterdir())
    assert len(entries) == 1 and (entries[0] / "params.safetensors").exists()

    calls = []
    real = runner._apply_edit
    monkeypatch.setattr(runner, "_apply_edit", lambda *a, **k: calls.append(1) or real(*a, **k))
    fresh = runner.Worker(spec.base_dir, progress=False, edit_cache=cache)
    rows_both = fresh.run_unit(both, unit)
    assert calls == []  # loaded, not edited again
    edited = lambda r: sorted((f.case_id, f.fact_set, f.metric, f.value) for f in r.facts if f.stage == "edited")
    assert edited(rows_both) == edited(rows_first) and edited(rows_first)
    fresh.run_unit(only, other)  # another fact: a miss, edited and stored
    assert calls == [1] and len(list((cache / "edits").iterdir())) == 2
