import json

import pytest

from typer.testing import CliRunner

from editdecay.cli import app
from editdecay.models.embedded import DEFAULT_MODEL

runner = CliRunner()


def test_help_everywhere():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "probe" in r.output
    r = runner.invoke(app, ["probe", "--help"])
    assert r.exit_code == 0 and "--top-k" in r.output and "--json" in r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("editdecay ")


def test_probe_json_schema(embedded):
    r = runner.invoke(app, ["probe", "--top-k", "3", "--json", "The capital of France is", "The capital of Italy is"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"model", "results"} and isinstance(doc["model"], str)
    assert len(doc["results"]) == 2
    for res in doc["results"]:
        assert set(res) == {"prompt", "top", "first_non_stop"}
        assert len(res["top"]) == 3
        for t in res["top"]:
            assert set(t) == {"token", "prob"} and isinstance(t["token"], str) and 0 <= t["prob"] <= 1
        probs = [t["prob"] for t in res["top"]]
        assert probs == sorted(probs, reverse=True)
    assert doc["results"][0]["first_non_stop"] == " Paris"
    assert doc["results"][1]["first_non_stop"] == " Rome"


def test_probe_table(embedded):
    r = runner.invoke(app, ["probe", "The capital of France is"])
    assert r.exit_code == 0 and "Paris" in r.output


def test_facts_score_json_schema(embedded, tmp_path):
    from editdecay.facts.datasets import write_facts
    from editdecay.facts.record import FactRecord, Neighbor

    facts = [
        FactRecord("paris", "France", "The capital of {} is", "London", "Paris", "P36",
                   ("France's capital city is",), (Neighbor("The capital of Belgium is", "Brussels"),)),
        FactRecord("rome", "Italy", "The capital of {} is", "Berlin", "Rome", "P36"),
    ]
    path = tmp_path / "facts.jsonl"
    write_facts(facts, path)
    r = runner.invoke(app, ["facts", "score", str(path), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) == {"n_facts", "mode", "retention_true", "retention_new", "es", "ps", "ns", "facts"}
    assert doc["n_facts"] == 2 and doc["mode"] == "greedy"
    assert doc["retention_true"] == 1.0 and doc["retention_new"] == 0.0 and doc["es"] == 0.0
    assert [f["case_id"] for f in doc["facts"]] == ["paris", "rome"]
    assert doc["facts"][1]["ps"] is None  # no paraphrases: undefined, not zero


def test_facts_score_counterfact_file(embedded, shared_data):
    r = runner.invoke(app, ["facts", "score", str(shared_data / "counterfact" / "counterfact-val.json"),
                            "--limit", "16", "--json", "--mode", "masked_argmax"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["n_facts"] == 16 and doc["mode"] == "masked_argmax"
    assert all(0 <= doc[k] <= 1 for k in ("retention_true", "retention_new", "es", "ps", "ns"))


def test_facts_score_zsre_file(embedded, shared_data):
    r = runner.invoke(app, ["facts", "score", str(shared_data / "zsre" / "zsre_mend_train-1k.json"),
                            "--limit", "8", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["retention_true"] is None  # memit preset has no true target
    assert 0 <= doc["es"] <= 1 and 0 <= doc["ns"] <= 1


def test_facts_select_needs_data_for_counterfact(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "editdecay", "facts", "select", "--dataset", "counterfact",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --data PATH is required for --dataset counterfact (a file or a directory of JSON files)"


def test_facts_select_builtin_writes_sets(embedded, tmp_path, selection_cache, monkeypatch):
    from editdecay.facts.datasets import load_facts

    monkeypatch.setenv("EDITDECAY_CACHE", str(selection_cache))
    out = tmp_path / "sel"
    r = runner.invoke(app, ["facts", "select", "--dataset", "builtin", "--n-edit", "8", "--n-intrinsic", "16",
                            "--seed", "1", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)
    assert stats == json.loads((out / "selection.json").read_text())
    assert stats["edit"]["n"] == 8 and stats["intrinsic"]["n"] == 16 and stats["mode"] == "greedy"
    edit, intr = load_facts(out / "edit.jsonl"), load_facts(out / "intrinsic.jsonl")
    assert len(edit) == 8 and len(intr) == 16
    assert not ({f.subject for f in edit} & {f.subject for f in intr})
    assert sorted(p.name for p in out.iterdir()) == ["edit.jsonl", "intrinsic.jsonl", "selection.json"]


@pytest.fixture(scope="module")
def rome_saved(embedded, tmp_path_factory):
    """One ROME edit (France → London) through the CLI, saved: (tmp dir, JSON, fact)."""
    from editdecay.facts.datasets import write_facts
    from editdecay.facts.record import FactRecord, Neighbor

    tmp_path = tmp_path_factory.mktemp("rome_saved")
    fact = FactRecord("paris", "France", "The capital of {} is", "London", "Paris", "P36",
                      ("France's capital city is",), (Neighbor("The capital of Belgium is", "Brussels"),))
    write_facts([fact], tmp_path / "one.jsonl")
    r = runner.invoke(app, ["edit", "--method", "rome", "--requests", str(tmp_path / "one.jsonl"),
                            "--out", str(tmp_path / "out"), "--save-model", str(tmp_path / "edited"), "--json"])
    assert r.exit_code == 0, r.output
    return tmp_path, json.loads(r.stdout), fact


def test_edit_json_schema_and_saved_model(embedded, rome_saved):
    from editdecay import Prober, load_model

    tmp_path, doc, fact = rome_saved
    saved = tmp_path / "edited"
    assert set(doc) == {"method", "protocol", "preset", "n_facts", "pre", "post", "ns_drop", "seconds_per_fact",
                        "edited_layers", "dropped", "facts"}
    assert set(doc["ns_drop"]) == {"estimate", "low", "high", "n"} and doc["ns_drop"]["n"] == 1
    assert doc["ns_drop"]["estimate"] == doc["pre"]["ns"] - doc["post"]["ns"]
    assert (doc["method"], doc["protocol"], doc["preset"], doc["n_facts"]) == ("rome", "single", "derived", 1)
    keys = {"es", "ps", "ns", "retention_new", "retention_true"}
    assert set(doc["pre"]) == keys and set(doc["post"]) == keys
    assert doc["pre"]["retention_true"] == 1.0 and doc["post"]["retention_new"] == 1.0 and doc["post"]["es"] == 1.0
    assert doc["edited_layers"] == [5] and doc["dropped"] == [] and doc["seconds_per_fact"] > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == doc
    # the saved model carries the edit; the session's model was restored
    model, tok = embedded
    assert Prober(model, tok).first_non_stop([fact.text])[0].token == " Paris"
    edited, etok = load_model(str(saved), device="cpu")
    assert Prober(edited, etok).first_non_stop([fact.text])[0].token == " London"


def test_inspect_finds_the_rome_edit_and_finetune_preserves_or_removes_it(embedded, rome_saved):
    """Issue 18 on a real ROME edit: block 5, one edit, the edited fact first; issue 17:
    nullspace LoRA keeps the edit, --remove-edits unedit takes it out (base recorded)."""
    from editdecay import Prober, load_model
    from editdecay.facts.datasets import load_facts, write_facts

    tmp_path, _, fact = rome_saved
    decoys = [f for f in load_facts("", format="builtin") if f.subject != fact.subject][:20]  # same subject, same key
    write_facts([*decoys[:10], fact, *decoys[10:]], tmp_path / "cands.jsonl")
    r = runner.invoke(app, ["inspect", "--base", DEFAULT_MODEL, "--suspect", str(tmp_path / "edited"),
                            "--facts", str(tmp_path / "cands.jsonl"), "--out", str(tmp_path / "ins"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["edited_blocks"] == [5] and doc["n_edits"] == 1
    assert [b["verdict"] for b in doc["blocks"]].count("unchanged") == 29
    assert doc["facts"][0]["case_id"] == "paris" and doc["facts"][0]["answer_changed"] is True
    assert doc["facts"][0]["score"] > 1.5 * doc["facts"][1]["score"]
    assert json.loads((tmp_path / "ins" / "inspect.json").read_text()) == doc
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"The river number {i} flows north past the old mill and the quiet town." for i in range(200)))
    common = ["finetune", "--from-edit", str(tmp_path / "edited"), "--data", str(text), "--method", "full",
              "--max-steps", "3", "--eval-every", "3", "--block-size", "32", "--batch-size", "4", "--lr", "1e-4",
              "--stop", "loss<0.01", "--probe-facts", str(tmp_path / "one.jsonl"), "--json"]
    r = runner.invoke(app, [*common, "--preserve-edits", "nullspace", "--out", str(tmp_path / "ns")])
    assert r.exit_code == 0, r.output
    ft = json.loads(r.stdout)
    assert ft["preserve"]["method"] == "nullspace" and ft["probes"][-1]["retention_new"] == 1.0
    r = runner.invoke(app, [*common, "--remove-edits", "unedit", "--max-steps", "1", "--out", str(tmp_path / "rm")])
    assert r.exit_code == 0, r.output
    rm = json.loads(r.stdout)
    assert rm["remove_edits"]["blocks"] == [5] and rm["probes"][0]["retention_new"] == 0.0
    m, tok = load_model(str(tmp_path / "rm" / "model"), device="cpu")
    assert Prober(m, tok).first_non_stop([fact.text])[0].token == " Paris"
    r = runner.invoke(app, [*common, "--preserve-edits", "anchor", "--remove-edits", "unedit", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "exclude each other" in str(r.exception)


def test_reedit_reapplies_the_edit_that_finetuning_removed(embedded, rome_saved, tmp_path):
    """Issue 18: a fine-tune that lost the ROME edit (here: unedit, so it is surely gone)
    gets it back from 'editdecay reedit'; from scratch and the original edit are timed."""
    saved, _, fact = rome_saved
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"The river number {i} flows north past the old mill." for i in range(100)))
    r = runner.invoke(app, ["finetune", "--from-edit", str(saved / "edited"), "--data", str(text), "--method", "full",
                            "--max-steps", "1", "--block-size", "32", "--batch-size", "2", "--stop", "loss<0.01",
                            "--probe-facts", str(saved / "one.jsonl"), "--remove-edits", "unedit",
                            "--out", str(tmp_path / "ft"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["from_edit"] == str(saved / "edited")
    r = runner.invoke(app, ["reedit", "--from-finetune", str(tmp_path / "ft"), "--out", str(tmp_path / "re"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "editdecay.reedit/1" and doc["method"] == "rome" and doc["decayed"] == ["paris"]
    assert doc["finetuned"]["success"] == 0.0 and doc["reedit"]["decayed"]["success"] == 1.0
    assert doc["scratch"]["all"]["success"] == 1.0 and doc["reedit"]["seconds"] > 0
    assert doc["original"]["method"] == "rome" and doc["original"]["seconds_per_fact"] > 0
    assert json.loads((tmp_path / "re" / "reedit.json").read_text()) == doc
    r = runner.invoke(app, ["reedit", "--from-finetune", str(tmp_path), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "no finetune.json" in str(r.exception)


def test_edit_errors(tmp_path):
    from editdecay.facts.datasets import write_facts
    from editdecay.facts.record import FactRecord

    write_facts([FactRecord("a", "X", "{} is", "y", "z"), FactRecord("b", "Y", "{} is", "y", "z")], tmp_path / "two.jsonl")
    r = runner.invoke(app, ["edit", "--requests", str(tmp_path / "two.jsonl"), "--out", str(tmp_path / "o"),
                            "--save-model", str(tmp_path / "m")])
    assert r.exit_code != 0 and "needs exactly one fact" in str(r.exception)
    r = runner.invoke(app, ["edit", "--requests", str(tmp_path / "two.jsonl"), "--out", str(tmp_path / "o"),
                            "--protocol", "bogus"])
    assert r.exit_code != 0 and "unknown protocol 'bogus'" in str(r.exception)


def test_finetune_lora_non_edited_with_probes(embedded, tmp_path):
    from editdecay.facts.datasets import load_facts, write_facts

    facts = load_facts("", format="builtin")
    write_facts(facts[:3], tmp_path / "edit.jsonl")
    write_facts(facts[100:103], tmp_path / "intr.jsonl")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"The river number {i} flows north past the old mill and the quiet town." for i in range(200)))
    r = runner.invoke(app, ["finetune", "--data", str(text), "--method", "lora", "--layers", "non-edited",
                            "--layers-from", "rome", "--max-steps", "4", "--eval-every", "2", "--block-size", "32",
                            "--batch-size", "4", "--lr", "1e-3", "--stop", "loss<0.01",
                            "--probe-facts", str(tmp_path / "edit.jsonl"), "--probe-facts", str(tmp_path / "intr.jsonl"),
                            "--out", str(tmp_path / "ft"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {"steps", "stop_reason", "trainable", "val", "probes"} <= set(doc)
    assert doc["steps"] == 4 and doc["stop_reason"] == "max_steps"
    assert [v["step"] for v in doc["val"]] == [0, 2, 4] and doc["val"][-1]["loss"] < doc["val"][0]["loss"]
    assert all(".layers.5." not in n for n in doc["trainable"]) and any(".layers.6." in n for n in doc["trainable"])
    assert [p["step"] for p in doc["probes"]] == [0, 2, 4]
    first = doc["probes"][0]
    assert (first["n_edit"], first["n_intrinsic"]) == (3, 3) and 0 <= first["retention_true"] <= 1
    assert len(first["top"]) == 3 and len(first["top"][0]["tokens"]) == 3
    assert set(first["categories"]) == {"edited", "intrinsic"}
    assert doc["preset"]["method"] == "lora" and doc["base"] == {} and doc["edited_layers"] == [5]
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").exists()


def test_finetune_classification_task_with_a_head(embedded, shared_data, tmp_path):
    r = runner.invoke(app, ["finetune", "--task", "classification", "--data", str(shared_data / "imdb" / "dkivrak" / "imdb_test.csv"),
                            "--method", "lora", "--layers", "threshold:28", "--max-steps", "2", "--eval-every", "2",
                            "--batch-size", "2", "--cutoff", "48", "--n-val", "8", "--n-train", "16",
                            "--out", str(tmp_path / "cls"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["steps"] == 2 and {"acc", "loss"} <= set(doc["val"][-1])
    assert any(n.startswith("head.") for n in doc["trainable"]) and doc["task"]["metric"] == "acc"
    assert (tmp_path / "cls" / "head.safetensors").exists()
    r = runner.invoke(app, ["finetune", "--task", "bogus", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "unknown task 'bogus'" in str(r.exception)
