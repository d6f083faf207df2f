"""Study specs: validation messages, grid expansion, exclusion, shared baselines, keys,
cost estimate and plan (no model is loaded)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from editdecay.editing import EDITORS
from editdecay.finetune.presets import get_preset
from editdecay.study import CostModel, SpecError, StudySpec, estimate_cost, expand, format_plan
from editdecay.study.spec import KINDS, config_hash, stage_seed

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo.yaml"

SEED001 = {
    "name": "seed001-mini",
    "axes": {
        "dataset": ["zsre", "counterfact"],
        "editor": ["none", "memit", "alphaedit"],
        "n_edits": [0, 100, 1000],
        "task": "commonsense",
        "ft_method": ["none", "lora", "dora", "full"],
    },
    "datasets": {"zsre": {"path": "data/zsre", "format": "zsre"}, "counterfact": {"path": "data/cf"}},
    "selection": {"filter": False, "n_intrinsic": 0},
    "finetune": {"preset": "seed001-{task}-{method}"},
}


def spec(d: dict, where: str = "test.yaml") -> StudySpec:
    return StudySpec.from_dict(copy.deepcopy(d), where)


def test_demo_spec_loads_and_plans():
    s = StudySpec.from_yaml(DEMO)
    trials = expand(s)
    assert s.name == "demo" and s.grid_size() == 12
    assert len(trials) == 9
    assert [t.kind for t in trials] == ["base", "zero-edit", "zero-edit", "edit-only", "edit-only"] + ["edit+ft"] * 4
    assert sum(len(t.points) for t in trials) == 12
    assert all(t.unit_count == 1 for t in trials)
    cost = estimate_cost(trials)
    assert cost["edited_facts"] == 6 * 8 and cost["edit_calls"] == 2 and cost["finetune_runs"] == 6  # 2 edits, each shared by 3 trials
    assert cost["cpu_seconds"]["total"] > 0
    plan = format_plan(s, trials)
    assert all(t.key[:12] in plan for t in trials)
    assert "9 trials from 12 grid points" in plan and "fine-tuning runs" in plan


def test_grid_counts_order_and_shared_zero_edit():
    s = spec(SEED001)
    trials = expand(s)
    assert s.grid_size() == 2 * 3 * 3 * 4
    kinds = [t.kind for t in trials]
    assert kinds == sorted(kinds, key=KINDS.index)  # baselines first
    assert kinds.count("base") == 1 and kinds.count("zero-edit") == 3
    assert kinds.count("edit-only") == 2 * 2 * 2 and kinds.count("edit+ft") == 2 * 2 * 2 * 3
    assert len(trials) == 36
    # one zero-edit trial per fine-tuning method, standing for both datasets, every editor
    # with n_edits 0 and editor none with every n_edits: 2 * (3 + 2) points
    zero = [t for t in trials if t.kind == "zero-edit"]
    assert [t.axes["ft_method"] for t in zero] == ["lora", "dora", "full"]
    for t in zero:
        assert len(t.points) == 10
        assert {p["dataset"] for p in t.points} == {"zsre", "counterfact"}
        assert t.config["edit"] is None and "dataset" not in t.config["data"]
        assert [d["dataset"] for d in t.config["data"]["datasets"]] == ["zsre", "counterfact"]
        assert t.axes["dataset"] is None and t.axes["n_edits"] == 0
    # within a kind the grid order holds (dataset before editor before n_edits before ft)
    edit_only = [(t.axes["dataset"], t.axes["editor"], t.axes["n_edits"]) for t in trials if t.kind == "edit-only"]
    assert edit_only[:3] == [("zsre", "memit", 100), ("zsre", "memit", 1000), ("zsre", "alphaedit", 100)]
    # deterministic
    assert [t.key for t in expand(spec(SEED001))] == [t.key for t in trials]
    # trials edit the first n facts of one selection of the largest size
    assert {t.config["data"]["selection"]["n_edit"] for t in trials} == {1000}


def test_exclude_rules():
    d = copy.deepcopy(SEED001)
    d["exclude"] = [{"editor": "alphaedit", "ft_method": "full"}]
    s = spec(d)
    trials = expand(s)
    assert len(trials) == 36 - 2 * 2  # alphaedit × full × {zsre, cf} × {100, 1000}
    assert s.grid_size() - sum(len(t.points) for t in trials) == 2 * 3  # n_edits 0 points too
    assert not any(t.axes["editor"] == "alphaedit" and t.axes["ft_method"] == "full" for t in trials)
    # the zero-edit full trial survives through its other points
    assert any(t.kind == "zero-edit" and t.axes["ft_method"] == "full" for t in trials)
    d["exclude"] = [{"ft_method": ["lora", "dora"], "n_edits": 1000}, {"dataset": "zsre", "editor": "memit"}]
    trials2 = expand(spec(d))
    assert not any(t.axes["n_edits"] == 1000 and t.axes["ft_method"] in ("lora", "dora") for t in trials2)
    assert not any(t.axes["dataset"] == "zsre" and t.axes["editor"] == "memit" for t in trials2)
    assert len(trials2) == 36 - 2 * 2 * 2 - (2 * 4 - 2)  # (1000 × lora/dora × 2 editors × 2 datasets); zsre memit


def test_no_finetune_baseline_shared_across_ft_axes():
    d = {"axes": {"editor": "rome", "n_edits": 4, "task": ["unstructured", "structured"],
                  "ft_method": ["none", "lora", "full"], "layer_policy": ["all", "threshold:10"]}}
    trials = expand(spec(d))
    no_ft = [t for t in trials if t.kind == "edit-only"]
    assert len(no_ft) == 1 and len(no_ft[0].points) == 2 * 2
    assert no_ft[0].config["finetune"] is None and no_ft[0].axes["task"] is None
    assert len(trials) == 1 + 2 * 2 * 2
    # presets follow the task: cpu-{task}
    assert {t.config["finetune"]["preset"] for t in trials if t.config["finetune"]} == {"cpu-unstructured",
                                                                                      "cpu-structured"}


def test_keys_are_stable():
    base = yaml.safe_load(DEMO.read_text())
    keys = {t.key for t in expand(spec(base))}
    # reordered mapping keys, another name, resources, runtime batch size: same keys
    d = copy.deepcopy(base)
    d["axes"] = dict(reversed(list(d["axes"].items())))
    d["name"], d["resources"] = "renamed", {"cpus": 8, "gpus": 1}
    assert {t.key for t in expand(spec(d))} == keys
    # more values on an axis keep the existing trials' keys
    d["axes"]["ft_method"] = ["none", "lora", "dora"]
    more = {t.key for t in expand(spec(d))}
    assert keys < more
    # YAML's string 2e-3 and the float 0.002 are the same value; another lr is another trial
    d = copy.deepcopy(base)
    d["finetune"]["overrides"]["lr"] = "2e-3"
    assert {t.key for t in expand(spec(d))} == keys  # the demo's lr is 2e-3 already
    d["finetune"]["overrides"]["lr"] = "3e-3"
    changed = {t.key for t in expand(spec(d))}
    assert len(changed & keys) == 3  # base and the two edit-only trials do not fine-tune
    # hygiene off (the default, or written out) keeps the keys; on changes the fine-tuning trials
    d = copy.deepcopy(base)
    d["finetune"]["hygiene"] = False
    assert {t.key for t in expand(spec(d))} == keys
    d["finetune"]["hygiene"] = True
    trials = expand(spec(d))
    assert len({t.key for t in trials} & keys) == 3
    assert all(t.config["finetune"]["hygiene"] for t in trials if t.config["finetune"])
    d["finetune"]["hygiene"] = "yes"
    with pytest.raises(SpecError, match=r"finetune\.hygiene: expected true or false"):
        spec(d)
    # the key is the hash of the config
    t = expand(spec(base))[-1]
    assert t.key == config_hash(t.config) == t.config_hash and len(t.key) == 64


def test_overrides_per_method_and_rules():
    d = {"axes": {"model": ["m-a", "m-b"], "editor": "rome", "n_edits": 2, "ft_method": ["lora", "full"]},
         "editors": {"rome": {"hparams": {"v_lr": "1e-1"}}},
         "finetune": {"per_method": {"full": {"lr": 1e-5}}},
         "overrides": [{"when": {"model": "m-b"}, "editors": {"rome": {"preset": "gpt2-xl@seed000"}},
                        "finetune": {"max_steps": 7}}]}
    trials = {(t.axes["model"], t.axes["ft_method"]): t for t in expand(spec(d))}
    assert trials["m-a", "full"].config["finetune"]["params"]["lr"] == 1e-5
    assert trials["m-a", "lora"].config["finetune"]["params"]["lr"] == get_preset("cpu-unstructured").lr
    assert trials["m-b", "lora"].config["finetune"]["params"]["max_steps"] == 7
    assert trials["m-a", "lora"].config["finetune"]["params"]["max_steps"] == get_preset("cpu-unstructured").max_steps
    assert trials["m-b", "lora"].config["edit"]["preset"] == "gpt2-xl@seed000"
    assert trials["m-a", "lora"].config["edit"]["preset"] is None
    assert trials["m-a", "lora"].config["edit"]["hparams"]["v_lr"] == 0.1
    # per-stage seeds come from the replicate seed, not the key
    assert trials["m-a", "lora"].config["finetune"]["params"]["seed"] == stage_seed(0, "finetune")
    assert trials["m-a", "lora"].config["edit"]["hparams"]["seed"] == stage_seed(0, "edit")


def test_protocols_and_units():
    d = {"axes": {"editor": ["none", "memit"], "n_edits": 5, "protocol": ["single", "sequential:2", "batch"],
                  "edit_layers": ["default", "3-5"]}}
    trials = expand(spec(d))
    assert len(trials) == 1 + 3 * 2
    by = {(t.axes["protocol"], str(t.axes["edit_layers"])): t for t in trials if t.kind != "base"}
    single = by["single", "default"]
    assert single.per_fact and single.unit_count == 5
    with pytest.raises(ValueError, match="case ids"):
        single.units()
    assert [u.unit_id for u in single.units(["a", "b"])] == ["a", "b"]
    seq = by["sequential:2", "[3, 4, 5]"]
    assert seq.config["edit"]["protocol"] == "sequential" and seq.config["edit"]["batch_size"] == 2
    assert seq.config["edit"]["hparams"]["layers"] == [3, 4, 5] and not seq.per_fact
    assert [u.unit_id for u in seq.units()] == [""]
    cost = estimate_cost(trials)
    assert cost["edit_calls"] == 2 * 5 + 2 * 3 + 2 * 1  # single, sequential:2 (ceil 5/2), batch
    assert cost["units"] == 1 + 2 * 5 + 2 + 2


def test_zero_edit_layer_policy_needs_layers_from():
    d = {"axes": {"editor": ["none", "rome"], "n_edits": 2, "ft_method": "lora", "layer_policy": "edited",
                  "edit_layers": [4, 6]}, "finetune": {"layers_from": "rome"}}
    trials = expand(spec(d))
    zero = [t for t in trials if t.kind == "zero-edit"]
    assert len(zero) == 2  # the edit layers value decides the blocks of the baseline
    assert sorted(t.config["finetune"]["layers_from"]["layers"][0] for t in zero) == [4, 6]
    del d["finetune"]
    with pytest.raises(SpecError, match=r"^t\.yaml: finetune\.layers_from: layer policy 'edited' on the zero-edit"):
        spec(d, "t.yaml")


BAD = [
    (["axes", "ft_method"], ["none", "lorra"], "demo.yaml: axes.ft_method[1]: 'lorra' is not one of full, lora, dora, none"),
    (["axes", "editor"], "romee", "demo.yaml: axes.editor: 'romee' is not one of none, " + ", ".join(sorted(EDITORS))),
    (["axes", "layer_policy"], ["all", "window:3"],
     "demo.yaml: axes.layer_policy[1]: 'window:3' is not one of all, threshold:t, window:c,w, edited, non-edited"),
    (["axes", "protocol"], "sequential", "demo.yaml: axes.protocol: 'sequential' needs a batch size"),
    (["axes", "n_edits"], -1, "demo.yaml: axes.n_edits: expected an integer >= 0, got -1"),
    (["axes", "dataset"], "zsre", "demo.yaml: axes.dataset: 'zsre' is not one of builtin"),
    (["axes", "colour"], "red", "demo.yaml: axes: unknown key(s) colour; known: model, dataset, editor"),
    (["exclude"], [{"editor": "alphaedt"}], "demo.yaml: exclude[0].editor: 'alphaedt' is not one of none,"),
    (["finetune", "preset"], "nope-{task}", "demo.yaml: finetune.preset: 'nope-{task}' gives 'nope-unstructured'"),
    (["finetune", "per_method"], {"full": {"lrr": 1}}, "demo.yaml: finetune.per_method.full.lrr: unknown field; known: alpha,"),
    (["finetune", "per_method"], {"lora": {"lr": "fast"}}, "demo.yaml: finetune.per_method.lora.lr: expected a number, got 'fast'"),
    (["finetune", "stop"], ["loss<<3"], "demo.yaml: finetune.stop[0]: 'loss<<3' is not one of loss<τ, loss<base-Δ, acc>τ"),
    (["editors"], {"rome": {"preset": "gpt2-xl@nope"}}, "demo.yaml: editors.rome.preset: 'gpt2-xl@nope' is not one of gpt-j@reference,"),
    (["editors"], {"rome": {"hparams": {"v_lrr": 1}}}, "demo.yaml: editors.rome.hparams.v_lrr: unknown field; known: "),
    (["downstream"], {"tasks": ["boolq", "arcx"]}, "demo.yaml: downstream.tasks[1]: 'arcx' is not one of boolq, piqa,"),
    (["selection", "n_edit"], 4, "demo.yaml: selection.n_edit: 4 is smaller than the largest n_edits on the grid (8)"),
    (["probes", "mode"], "masked", "demo.yaml: probes.mode: 'masked' is not one of greedy, masked_argmax"),
    (["drift"], {"position": "first"}, "demo.yaml: drift.position: 'first' is not one of last, subject_last"),
    (["datasets"], {"cf": {"format": "auto"}}, "demo.yaml: datasets.cf.path: required for format auto"),
    (["surprise"], 1, "demo.yaml: unknown key(s) surprise; known: name, description, axes,"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[".".join(b[0]) for b in BAD])
def test_validation_errors_name_field_and_allowed_values(path, value, message):
    d = yaml.safe_load(DEMO.read_text())
    node = d
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    with pytest.raises(SpecError) as e:
        spec(d, "demo.yaml")
    msg = str(e.value)
    assert msg.startswith(message), msg
    assert "\n" not in msg


def test_file_errors(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        StudySpec.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: not valid YAML"):
        StudySpec.from_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(SpecError, match=r"scalar\.yaml: expected a mapping"):
        StudySpec.from_yaml(scalar)


def test_downstream_and_drift_settings():
    d = yaml.safe_load(DEMO.read_text())
    d["downstream"] = {"tasks": ["arc-e", "boolq"], "mode": "ll", "limit": 5, "stages": ["final", "base"]}
    d["drift"] = {"prompts": "both"}
    trials = expand(spec(d))
    by_kind = {t.kind: t for t in trials}
    ds = by_kind["edit+ft"].config["evaluate"]["downstream"]
    assert ds["tasks"] == ["ARC-Easy", "boolq"] and ds["stages"] == ["finetuned", "base"] and ds["limit"] == 5
    assert by_kind["base"].config["evaluate"]["downstream"]["stages"] == ["base"]
    assert by_kind["base"].config["evaluate"]["drift"] is None
    assert by_kind["edit-only"].config["evaluate"]["drift"]["prompts"] == "both"
    cost = estimate_cost(trials)
    assert cost["downstream_evals"] == sum(2 * len(t.config["evaluate"]["downstream"]["stages"]) for t in trials)
    assert cost["downstream_items"] == 5 * cost["downstream_evals"]
    # log-likelihood context: cloze reaches the evaluator's options; a bad value names the field
    d["downstream"]["ll_context"] = "cloze"
    t = expand(spec(d))[-1]
    assert t.config["evaluate"]["downstream"]["ll_context"] == "cloze"
    d["downstream"]["ll_context"] = "clozed"
    with pytest.raises(SpecError, match=r"downstream.*ll_context"):
        spec(d)


@pytest.mark.parametrize("name", ["seed000-retention", "seed000-retention-cpu", "seed001-decay", "seed001-decay-cpu"])
def test_replication_specs_plan(name):
    """The shipped replication specs validate against the presets and expand into the
    grids their headers describe (no model is loaded)."""
    s = StudySpec.from_yaml(DEMO.parent / f"{name}.yaml")
    trials = expand(s)
    cost = estimate_cost(trials)
    axes = [t.axes for t in trials]
    edited = [a for a in axes if a["editor"] != "none"]
    if name.startswith("seed000"):
        assert {a["editor"] for a in edited} == {"ft", "rome", "malmen"}
        assert {a["task"] for a in axes if a["task"]} == {"unstructured", "structured", "classification", "sft"}
        policies = {a["layer_policy"] for a in edited if a["layer_policy"]}
        assert sum(p.startswith("threshold:") for p in policies) == 4 and sum(p.startswith("window:") for p in policies) >= 4
        assert len({str(a["edit_layers"]) for a in edited if a["editor"] == "rome"}) >= 4  # the Fig. 5 sweep
        assert all(t.config["finetune"]["hygiene"] for t in trials if t.config["finetune"])
        protocol = "single" if name == "seed000-retention" else "batch"
    else:
        assert {a["editor"] for a in edited} == {"memit", "alphaedit", "mend"}
        assert {a["ft_method"] for a in axes} == {"none", "lora", "dora", "full"}
        assert {a["layer_policy"] for a in edited if a["layer_policy"]} == {"all", "edited", "non-edited"}
        assert {a["task"] for a in axes if a["task"]} == {"commonsense", "hotpotqa"}
        assert {a["n_edits"] for a in edited if a["editor"] == "mend"} == ({1000, 10000} if name == "seed001-decay" else {24})
        assert cost["downstream_evals"] > 0 and cost["drift_runs"] > 0
        protocol = "batch"
    assert {a["protocol"] for a in edited} == {protocol}
    if name.endswith("-cpu"):
        assert {a["model"] for a in axes} == {"smollm2-135m-instruct-q4_1"}
        assert cost["cpu_seconds"]["total"] < 60 * 60  # an upper bound: runs at max_steps (measured 41 and 43 min)
    else:
        assert len({a["model"] for a in axes}) >= 2


def test_cost_counts_the_confidence_filter_once_per_model_and_data():
    d = copy.deepcopy(SEED001)
    d["axes"].update(dataset="counterfact", n_edits=100)
    d["selection"] = {"filter": True, "n_intrinsic": 50}
    cm = CostModel()
    trials = expand(spec(d))
    cost = estimate_cost(trials, cm)
    assert len(trials) > 1 and cost["selection_probes"] == cm.select_candidates  # as the runner: one pass
    assert cost["cpu_seconds"]["select"] == round(cm.select_candidates * cm.select_fact_s, 1)
    d["selection"]["filter"] = False
    assert estimate_cost(expand(spec(d)), cm)["cpu_seconds"]["select"] == 0


def test_packed_text_steps_are_priced_by_their_tokens():
    """A budget run on packed text costs (fixed + tokens x per-token) seconds per step."""
    d = yaml.safe_load((DEMO.parent / "decay-curves-cpu.yaml").read_text())
    d["exclude"] = [{"editor": ["rome", "memit", "alphaedit"]}, {"ft_method": "full"}, {"layer_policy": ["non-edited", "edited"]}]
    cm = CostModel()
    secs = lambda dd: estimate_cost(expand(StudySpec.from_dict(dd, base_dir=DEMO.parent)), cm)["cpu_seconds"]["finetune"]
    small = secs(d)
    d["finetune"]["overrides"]["block_size"] = 128
    steps = max(d["finetune"]["budget"])  # the zero-edit baseline's one LoRA run
    assert secs(d) - small == pytest.approx(steps * 4 * 64 * cm.ft_token_s["lora"], abs=0.2)
    assert small == pytest.approx(steps * (cm.ft_fixed_s["lora"] + 4 * 64 * cm.ft_token_s["lora"]), abs=0.2)


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_expands(path):
    """The shipped specs stay valid as the schema grows (no model, no data is read)."""
    trials = StudySpec.from_yaml(path).expand()
    assert trials and all(t.key for t in trials)
