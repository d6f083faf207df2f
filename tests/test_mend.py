"""MEND and the shared hypernetwork core: the untrained editor is a gradient step,
batch edits sum single updates, restore, training raises validation edit success,
checkpoints reload to identical edits, resume continues identically, the CLI."""

import json
import math

import pytest
import torch

from editdecay import EditdecayError
from editdecay.editing.hypernet import (
    _capture, _record_prefix, _replay_prefix, _step_rows, _target_logprobs, capture_factors, frozen,
    train_hypernet, validate,
)
from editdecay.editing.mend import MEND, MENDHyperParams, mend_hparams
from editdecay.evaluate.metrics import split_target
from editdecay.models.arch import get_arch

import hypernets
from hypernets import FAST, tiny

tok, facts = hypernets.tok, hypernets.facts  # fixtures shared with test_malmen (module-scoped fixtures)


def _nll_grad(model, tok, reqs, names):
    """∇ of Σ_requests mean target NLL with respect to the named weights."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    total = 0.0
    for r in reqs:
        c, t = split_target(tok, r.text, r.target_new)
        h = model.base_model(input_ids=torch.tensor([c + t[:-1]])).last_hidden_state
        lp = model.get_output_embeddings()(h[0, len(c) - 1 :]).log_softmax(-1)
        total = total - lp.gather(1, torch.tensor(t)[:, None]).mean()
    grads = torch.autograd.grad(total, [params[n] for n in names])
    for n, p in params.items():
        p.requires_grad_(flags[n])
    return dict(zip(names, grads))


# --- the edit ---------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_untrained_mend_is_a_plain_gradient_step(model_type, tok, facts):
    """Identity initialisation: ΔW = −lr · ∇W Σ_r NLL_r for every edit module (Conv1D
    orientation included), and the model is restored bit-exactly."""
    model = tiny(model_type)
    editor = MEND(MENDHyperParams(layers=[1, 2], edit_lr=0.1))
    reqs = facts[:3]
    editor.prepare(model)
    names = [n + ".weight" for n in editor.module_names]
    assert len(names) == (6 if model_type == "llama" else 4)  # gate/up/down or c_fc/c_proj per block
    grads = _nll_grad(model, tok, reqs, names)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = editor.edit(model, tok, reqs)
    assert sorted(res.deltas) == sorted(names)
    for n in names:
        torch.testing.assert_close(res.deltas[n], -0.1 * grads[n], atol=1e-6, rtol=1e-4)
    assert res.edited_layers(model) == [1, 2]
    after = model.state_dict()
    for k, v in state.items():
        if k not in names:
            assert torch.equal(after[k], v), k
    res.restore(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_batch_edit_is_the_sum_of_single_edits(tok, facts):
    """MEND's batching: each request's factors come from its own loss, so the batch
    update is the sum of the single updates (network perturbed off the identity)."""
    model = tiny()
    editor = MEND(MENDHyperParams(layers=[2], rank=8, token="ans"))
    net = editor.prepare(model)
    with torch.no_grad():
        for blk in net.nets.values():
            for b in blk.blocks:
                b.B.normal_(0, 0.01)
    a = editor.edit(model, tok, facts[:1])
    a.restore(model)
    b = editor.edit(model, tok, facts[1:2])
    b.restore(model)
    ab = editor.edit(model, tok, facts[:2])
    ab.restore(model)
    for n in ab.deltas:
        torch.testing.assert_close(ab.deltas[n], a.deltas[n] + b.deltas[n], atol=1e-6, rtol=1e-5)


def test_capture_reads_ans_and_all_positions(tok, facts):
    model = tiny()
    names = ["model.layers.1.mlp.down_proj"]  # in the last block only target positions carry a gradient
    reqs = facts[:2]
    f_ans, losses = capture_factors(model, tok, reqs, names, token="ans")
    f_all, _ = capture_factors(model, tok, reqs, names, token="all")
    n_tgt = [len(split_target(tok, r.text, r.target_new)[1]) for r in reqs]
    assert f_ans[names[0]].owner.tolist() == [0] * n_tgt[0] + [1] * n_tgt[1]
    assert len(f_all[names[0]].keys) > len(f_ans[names[0]].keys)
    assert f_ans[names[0]].keys.shape[1] == 64 and f_ans[names[0]].grads.shape[1] == 32
    assert all(math.isfinite(v) and v > 0 for v in losses)
    # the capture leaves the model's flags and gradients alone
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_replayed_prefix_gives_the_same_forward(tok, facts):
    """Training's second pass replays the blocks below the lowest edit block."""
    model = tiny()
    s = _step_rows(tok, facts[:4], True, torch.device("cpu"))
    with frozen(model):
        with _record_prefix(model, 2) as prefix:
            _, _, lp0 = _capture(model, s.batch, s.edit_rows, ["model.layers.2.mlp.down_proj"], "ans")
        with _replay_prefix(model, prefix):
            lp1 = _target_logprobs(model, s.batch)
    assert torch.equal(lp0, lp1)
    assert "forward" not in get_arch(model).get_blocks(model)[0].__dict__


# --- training, checkpoints, resume ---------------------------------------------------------

def _train(tmp_path, tok, facts, name="run", **over):
    model = tiny()
    editor = MEND(MENDHyperParams(**{**FAST, **over}))
    report = train_hypernet(editor, model, tok, facts[:40], facts[40:], tmp_path / name, progress=False)
    return model, editor, report


def test_training_raises_validation_edit_success(tmp_path, tok, facts):
    """60 steps raise the validation edit success (ES of single edits of 20 held-out
    facts) by at least 0.2 over the untrained (identity) network."""
    model, editor, report = _train(tmp_path, tok, facts)
    base = report.curve[0]
    assert base["step"] == 0 and report.baseline == base
    assert [r["step"] for r in report.curve] == [0, 20, 40, 60]
    assert report.best["es"] >= base["es"] + 0.2, report.curve
    assert report.steps == 60 and report.stop_reason == "max_steps"
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["method"] == "mend" and cfg["best"]["step"] == report.best["step"]
    assert cfg["curve"] == report.curve and cfg["hparams"]["checkpoint"] is None
    # the saved (best) network reproduces the best validation figures
    from editdecay.editing import get_editor

    loaded = get_editor("mend", model=model, checkpoint=tmp_path / "run")
    got = validate(loaded, model, tok, facts[40:])
    assert got["es"] == pytest.approx(report.best["es"]) and got["ns"] == pytest.approx(report.best["ns"])


def test_reloaded_checkpoint_gives_identical_edits(tmp_path, tok, facts):
    from editdecay.editing import get_editor

    model, editor, _ = _train(tmp_path, tok, facts, steps=10, eval_every=5)
    editor.save(tmp_path / "ck", model)
    again = get_editor("mend", model=model, checkpoint=tmp_path / "ck")
    assert again.hparams.checkpoint == str(tmp_path / "ck")
    assert again.preset_info["preset"] == f"checkpoint:{tmp_path / 'ck'}"
    for reqs in (facts[45:46], facts[50:55]):
        a = editor.edit(model, tok, reqs)
        a.restore(model)
        b = again.edit(model, tok, reqs)
        b.restore(model)
        assert sorted(a.deltas) == sorted(b.deltas)
        for n in a.deltas:
            assert torch.equal(a.deltas[n], b.deltas[n]), n
    # structure is fixed by the checkpoint; a preset cannot come with it
    with pytest.raises(EditdecayError, match="cannot be overridden"):
        get_editor("mend", model=model, checkpoint=tmp_path / "ck", overrides={"rank": 4})
    with pytest.raises(EditdecayError, match="exclusive"):
        get_editor("mend", preset="gpt2-xl@reference", checkpoint=tmp_path / "ck")
    with pytest.raises(EditdecayError, match="not an editor checkpoint"):
        get_editor("mend", model=model, checkpoint=tmp_path)
    with pytest.raises(EditdecayError, match="an editor checkpoint applies to malmen and mend only"):
        get_editor("rome", model=model, checkpoint=tmp_path / "ck")


def test_resume_continues_exactly(tmp_path, tok, facts):
    """10 steps, then --resume to 20, equals 20 steps in one go (network and curve)."""
    over = dict(steps=20, eval_every=10, save_every=5)
    _, straight, rep = _train(tmp_path, tok, facts, "straight", **over)
    _, first, _ = _train(tmp_path, tok, facts, "split", **{**over, "steps": 10})
    with pytest.raises(EditdecayError, match="--resume"):
        _train(tmp_path, tok, facts, "split", **over)
    model = tiny()
    cont = MEND(MENDHyperParams(**{**FAST, **over}))
    rep2 = train_hypernet(cont, model, tok, facts[:40], facts[40:], tmp_path / "split", resume=True, progress=False)
    assert rep2.resumed_from == 10 and rep2.steps == 20
    for k, v in straight.net.state_dict().items():
        torch.testing.assert_close(cont.net.state_dict()[k], v, rtol=1e-5, atol=1e-7)
    assert [r["es"] for r in rep2.curve] == [r["es"] for r in rep.curve]


# --- hyperparameters, presets, CLI ----------------------------------------------------------

def test_presets_derived_and_validation():
    from editdecay.editing import get_editor
    from editdecay.editing.hparams import presets

    for name in presets("mend"):
        hp, info = mend_hparams(preset=name)
        assert info["preset"] == name
    hp, _ = mend_hparams(preset="llama3-8b@reference")
    assert hp.layers == [29, 30, 31] and hp.modules == ["mlp_in", "mlp_out"] and not hp.denormalize
    ed = get_editor("mend", model=tiny())
    assert ed.hparams.layers == [0, 1, 2] and ed.preset_info["preset"] == "derived"
    assert ed.prepare(tiny()) is not None and len(ed.module_names) == 9
    with pytest.raises(EditdecayError, match="token"):
        mend_hparams(overrides={"token": "some"})
    with pytest.raises(EditdecayError, match="out of range"):
        MEND(MENDHyperParams(layers=[7])).prepare(tiny())
    with pytest.raises(EditdecayError, match="no module"):
        MEND(MENDHyperParams(layers=[1], modules=["mlp.nothing"])).prepare(tiny())


def test_cli_train_editor_json_and_edit_with_checkpoint(tmp_path, tok, facts):
    import typer
    from typer.testing import CliRunner

    from editdecay.cli_editors import parse_layers, train_editor
    from editdecay.editing import get_editor
    from editdecay.facts.datasets import write_facts
    from editdecay.models import load_model

    assert parse_layers("24-26,29") == [24, 25, 26, 29]
    with pytest.raises(EditdecayError):
        parse_layers("3-1")
    model = tiny()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    write_facts(facts[:45], tmp_path / "train.jsonl")
    write_facts(facts[40:], tmp_path / "val.jsonl")
    write_facts(facts[58:], tmp_path / "exclude.jsonl")
    hp = tmp_path / "hp.yaml"
    hp.write_text("rank: 8\nedit_lr: 0.001\nmeta_lr: 0.001\nlr_lr: 0.05\neval_every: 2\ntrain_batch: 4\n")
    app = typer.Typer()
    app.command("train-editor")(train_editor)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, [
        "train-editor", "--method", "mend", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"),
        "--val-data", str(tmp_path / "val.jsonl"), "--exclude", str(tmp_path / "exclude.jsonl"), "--layers", "1-2",
        "--steps", "4", "--n-val", "10", "--hparams", str(hp), "--out", str(tmp_path / "ck"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(doc) == {"method", "model", "preset", "out", "steps", "stop_reason", "seconds", "n_train", "n_val",
                        "edit_modules", "baseline", "best", "curve", "resumed_from"}
    assert doc["steps"] == 4 and doc["n_val"] == 10 and doc["n_train"] == 40  # 45 minus 5 shared with validation
    assert [r["step"] for r in doc["curve"]] == [0, 2, 4]
    assert set(doc["curve"][0]) == {"step", "es", "ps", "ns", "score", "train", "seconds", "val_seconds"}
    assert doc["edit_modules"][0] == "model.layers.1.mlp.gate_proj"
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert {f.case_id for f in facts[58:]}.isdisjoint(cfg["val_case_ids"])
    assert json.loads((tmp_path / "ck" / "train.json").read_text()) == doc
    m, t = load_model(str(tmp_path / "model"), device="cpu")
    ed = get_editor("mend", model=m, checkpoint=tmp_path / "ck")
    assert ed.hparams.layers == [1, 2] and ed.hparams.rank == 8
    r = ed.edit(m, t, facts[50:52])
    assert r.edited_layers(m) == [1, 2]
    r.restore(m)
    bad = CliRunner().invoke(app, ["train-editor", "--method", "rome", "--data", "x", "--out", str(tmp_path / "o")])
    assert bad.exit_code != 0


@pytest.mark.model
def test_untrained_mend_edits_the_embedded_model(embedded, cf_facts10):
    """The derived preset edits the last 3 blocks' gate/up/down of SmolLM2 in one pass
    and restores it bit-exactly; the protocol runner accepts the editor."""
    from editdecay.editing import get_editor
    from editdecay.editing.protocols import run_single

    model, tok = embedded
    ed = get_editor("mend", model=model, overrides={"edit_lr": 0.1})
    assert ed.hparams.layers == [27, 28, 29]
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in ("model.layers.29.mlp.down_proj.weight",
                                                      "model.layers.27.mlp.gate_proj.weight")}
    res = run_single(ed, model, tok, cf_facts10[:2], progress=False)
    assert all(o.post.es == 1.0 for o in res.outcomes)  # lr 0.1 is a strong edit (NS suffers)
    assert all(o.edited_layers == [27, 28, 29] for o in res.outcomes)
    for n, v in before.items():
        assert torch.equal(params[n], v), n


def test_chunked_edit_equals_one_pass(tok, facts):
    """Requests captured in chunks of batch_size give the same summed shift."""
    model = tiny()
    one = MEND(MENDHyperParams(layers=[1, 2], edit_lr=0.05, batch_size=64))
    chunked = MEND(MENDHyperParams(layers=[1, 2], edit_lr=0.05, batch_size=3))
    a = one.edit(model, tok, facts[:10])
    a.restore(model)
    b = chunked.edit(model, tok, facts[:10])
    b.restore(model)
    assert [lg.case_id for lg in b.requests] == [f.case_id for f in facts[:10]]
    for n in a.deltas:
        torch.testing.assert_close(a.deltas[n], b.deltas[n], rtol=1e-4, atol=1e-6)


def test_early_stopping_and_time_limit(tmp_path, tok, facts):
    """No improvement for `patience` validations stops training (the best network is
    the step-0 one); max_minutes stops it too."""
    _, _, rep = _train(tmp_path, tok, facts, "flat", meta_lr=1e-12, lr_lr=1e-12, steps=50, eval_every=5, patience=2)
    assert rep.stop_reason == "early_stop" and rep.steps == 10 and rep.best["step"] == 0
    assert [r["step"] for r in rep.curve] == [0, 5, 10]
    _, _, rep = _train(tmp_path, tok, facts, "timed", steps=50, max_minutes=1e-6)
    assert rep.stop_reason == "time" and rep.steps == 1 and [r["step"] for r in rep.curve] == [0, 1]
