import json

from typer.testing import CliRunner

from editdecay.cli import app

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
