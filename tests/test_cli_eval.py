"""CLI paths of the analyses: eval downstream, eval drift, trace."""

import json

import torch
from typer.testing import CliRunner

from editdecay.cli import app

from conftest import make_tiny_model

runner = CliRunner()


def test_eval_downstream_ll_on_arc_easy(embedded, shared_data):
    r = runner.invoke(app, ["eval", "downstream", "--data-dir", str(shared_data / "commonsense"), "--tasks", "arc-e",
                            "--tasks", "boolq", "--mode", "ll", "--limit", "4", "--ll-context", "cloze", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc["tasks"]) == {"ARC-Easy", "boolq"} and all(t["n"] == 4 for t in doc["tasks"].values())
    assert 0 <= doc["mean_accuracy"] <= 1 and doc["mode"] == "ll"


def test_eval_drift_on_tiny_models(embedded, tmp_path):
    from editdecay.models import save_model

    tok = embedded[1]
    base = make_tiny_model("llama", vocab_size=len(tok))
    edited = make_tiny_model("llama", vocab_size=len(tok))
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.add_(0.5)
    tuned = make_tiny_model("llama", vocab_size=len(tok))
    with torch.no_grad():
        tuned.model.layers[2].mlp.down_proj.weight.add_(0.5)
    for name, m in (("base", base), ("edited", edited), ("tuned", tuned)):
        save_model(m, tok, tmp_path / name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nThe river flows\n")
    r = runner.invoke(app, ["eval", "drift", "--base", str(tmp_path / "base"), "--edited", str(tmp_path / "edited"),
                            "--finetuned", str(tmp_path / "tuned"), "--prompts", str(prompts), "--out", str(tmp_path / "d"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    ed = doc["norms"]["edited_vs_base"]
    assert ed[0] == 0.0 and ed[1] > 0 and doc["norms"]["finetuned_vs_base"][1] == 0.0
    assert (tmp_path / "d" / "drift.json").exists()
    r = runner.invoke(app, ["eval", "drift", "--base", str(tmp_path / "base"), "--edited", str(tmp_path / "edited"),
                            "--prompts", str(prompts)])
    assert r.exit_code != 0 and "--finetuned" in str(r.exception)


def test_trace_cli_on_one_fact(embedded, tmp_path):
    from editdecay.facts.datasets import write_facts
    from editdecay.facts.record import FactRecord

    write_facts([FactRecord("e", "Eiffel Tower", "The {} is located in the city of", "Rome", "Paris")], tmp_path / "f.jsonl")
    r = runner.invoke(app, ["trace", "--facts", str(tmp_path / "f.jsonl"), "--out", str(tmp_path / "t"), "--samples", "2",
                            "--heatmaps", "1", "--db", str(tmp_path / "s.db"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc["mean_effect"]) == {"overall", "mlp", "attn"} and len(doc["mean_effect"]["mlp"]) == 30
    assert len(doc["suggested"]["layers"]) == 5 and (tmp_path / "t" / "effects.png").exists()
    assert (tmp_path / "t" / "heatmap_0.png").exists()
    # --db records the trace: the report's tracing section (seed 001 Figs. 6-7) reads it
    from editdecay.report.data import StudyData
    from editdecay.report.sections import s001_fig67

    sec = s001_fig67(StudyData(tmp_path / "s.db", n_boot=200))
    assert sec.has_data and sec.figures
    peaks = {row[1]: int(row[3]) for row in sec.tables[0].rows}
    assert peaks == doc["peak_layers"]
