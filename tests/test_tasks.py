"""Downstream tasks: loaders on the shared data, malformed files, label masks,
validation splits, hygiene, and a few training steps per task."""

from __future__ import annotations

import json
import math

import pytest
import torch

from editdecay.errors import DataError, EditdecayError
from editdecay.evaluate.metrics import score_facts, split_target
from editdecay.facts.datasets import load_facts
from editdecay.facts.record import FactRecord
from editdecay.finetune import FinetuneConfig, prepare_model
from editdecay.finetune.hygiene import HygieneWarning, hygiene_keep
from editdecay.finetune.tasks import (
    Example, SequenceClassifier, alpaca_prompt, collate, hotpot_support, load_task, read_documents,
    read_hellaswag_text, read_imdb, read_wikitext, sft_example,
)
from editdecay.finetune.trainer import TrainConfig, train

from conftest import make_tiny_model
from fakes import word_tokenizer


@pytest.fixture(scope="module")
def tok(embedded):
    return embedded[1]


def tiny(tok):
    return make_tiny_model("llama", vocab_size=len(tok), max_position_embeddings=1024)


def run_steps(task, module, steps: int = 2, batch_size: int = 4):
    """A few optimiser steps; the validation metric must be finite at every evaluation."""
    log = train(module, task.batches(batch_size), TrainConfig(lr=1e-3, max_steps=steps, eval_every=steps),
                evaluate=task.evaluate, loss_fn=task.loss, progress=False)
    assert log.steps == steps and len(log.val) == 2
    assert all(math.isfinite(v[task.metric]) for v in log.val)
    return log


def ids_set(examples):
    return {e.input_ids for e in examples}


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


# --- unstructured ------------------------------------------------------------------------

def test_unstructured_reads_c4_wikitext_txt_and_the_offline_default(shared_data, tok, tmp_path):
    t = load_task("unstructured", tok, shared_data / "c4" / "c4_demo.jsonl", n_val=16, block_size=64)
    assert t.info["n_documents"] == 300 and t.metric == "loss"
    assert t.sha256 == "f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78"
    assert len(t.val) == 16 and ids_set(t.val) <= ids_set(t.train)          # validation sampled from train
    assert all(len(e.input_ids) == 64 and e.labels == e.input_ids for e in t.train)

    arts = read_wikitext(shared_data / "wikitext" / "wiki.test.raw")
    assert len(arts) == 60 and arts[0].startswith("= Robert Boulter =") and not any("\r" in a for a in arts)
    filt = next(a for a in arts if a.startswith("= Constant k filter ="))
    assert "= 1 henry and capacitance C =" in filt                           # equation line, not a heading
    w = load_task("unstructured", tok, shared_data / "wikitext", n_train=50, n_val=8)
    assert w.info["n_documents"] == 120 and len(w.train) == 50

    (tmp_path / "a.txt").write_text("First paragraph\nstill first.\n\nSecond one.\n")
    assert read_documents(tmp_path / "a.txt") == ["First paragraph\nstill first.", "Second one."]

    d = load_task("unstructured", tok, n_train=20, n_val=4)
    assert d.source.startswith("stdlib-docstrings-py") and len(d.train) == 20 and len(d.val) == 4


def test_unstructured_hygiene_and_malformed_files(shared_data, tok, tmp_path):
    fact = FactRecord(case_id="p", subject="France", prompt="The capital of {} is the city of",
                      target_new="Rome", target_true="Paris")
    path = shared_data / "c4" / "c4_demo.jsonl"
    t = load_task("unstructured", tok, path, hygiene_facts=[fact], n_val=4)
    keep, report = hygiene_keep(read_documents(path), [fact])
    assert t.info["hygiene"]["n_dropped"] == report.n_dropped > 0 and t.info["n_documents_kept"] == len(keep)
    assert 300 - len(keep) == report.n_dropped
    with pytest.warns(HygieneWarning, match="documents"):                  # a union that drops > 20%
        wide = FactRecord(case_id="w", subject="people", prompt="Many {} like the", target_new="x", target_true="time")
        load_task("unstructured", tok, path, hygiene_facts=[fact, wide], n_val=4)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"txt": "oops"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2 has no field 'text'"):
        load_task("unstructured", tok, bad)
    with pytest.raises(DataError, match=r"'/nonexistent/c4\.jsonl' does not exist"):
        load_task("unstructured", tok, "/nonexistent/c4.jsonl")
    (tmp_path / "x.raw").write_text("no headings here\n")
    with pytest.raises(DataError, match=r"x\.raw: no WikiText top-level heading"):
        load_task("unstructured", tok, tmp_path / "x.raw")


def test_unstructured_trains(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"Document {i} talks about rivers and hills."} for i in range(40)])
    t = load_task("unstructured", tok, path, n_val=4, block_size=32)
    run_steps(t, tiny(tok))


# --- structured --------------------------------------------------------------------------

def test_structured_trains_on_wrong_facts_with_target_only_labels(embedded):
    model, tok = embedded
    builtin = load_facts("", format="builtin")
    exclude = builtin[:200]
    t = load_task("structured", tok, model=model, n_train=8, n_val=4, exclude_facts=exclude)
    assert t.metric == "acc" and len(t.train) == 8 and len(t.val) == 4
    banned = {f.subject.lower() for f in exclude}
    assert not any(f.subject.lower() in banned for f in t.train_facts)
    assert all(s.retained_true is False for s in score_facts(model, tok, t.train_facts).facts)
    assert {f.case_id for f in t.val_facts} <= {f.case_id for f in t.train_facts}
    for f, e in zip(t.train_facts, t.train):
        ctx, tgt = split_target(tok, f.text, f.target_true)
        assert e.input_ids == tuple(ctx + tgt) and e.labels == tuple([-100] * len(ctx) + tgt)
    m = t.evaluate(model)
    assert m["acc"] == 0.0 and math.isfinite(m["loss"])                    # wrong by construction

    small = load_task("structured", tok, builtin[200:260], model=tiny(tok), n_train=12, n_val=4)
    run_steps(small, tiny(tok))
    with pytest.raises(EditdecayError, match="needs the model"):
        load_task("structured", tok)


# --- classification ----------------------------------------------------------------------

def test_classification_pools_and_dedups_imdb(shared_data, tok):
    deal = read_imdb(shared_data / "imdb" / "deal_cl_benchmark" / "train.json")
    dk = read_imdb(shared_data / "imdb" / "dkivrak" / "imdb_train.csv") + read_imdb(shared_data / "imdb" / "dkivrak" / "imdb_test.csv")
    assert (len(deal), len(dk)) == (2000, 698)
    assert len({t for t, _ in deal} & {t for t, _ in dk}) == 43
    assert sum(label for _, label in deal) == 982                            # Good -> 1

    t = load_task("classification", tok, shared_data / "imdb", n_val=100)
    info = t.info
    assert len(info["files"]) == 3 and info["n_records"] == 2698            # labels.json skipped
    assert info["n_duplicates_dropped"] == 43 and info["n_unique"] == 2655 and info["n_label_conflicts"] == 0
    assert len(t.train) + len(t.val) == 2655 and len(t.val) == 100
    assert not ids_set(t.val) & ids_set(t.train)                            # disjoint validation
    eos = tok.eos_token_id
    assert all(e.input_ids[-1] == eos and len(e.input_ids) <= 256 and e.label in (0, 1) for e in t.train + t.val)


def test_classification_rejects_malformed_files(tok, tmp_path):
    (tmp_path / "a.csv").write_text("review,label\nnice,1\n")
    with pytest.raises(DataError, match=r"a\.csv: no column 'text'"):
        load_task("classification", tok, tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("text,label\nnice,1\nawful,maybe\n")
    with pytest.raises(DataError, match=r"b\.csv: row 1: field 'label' must be Good/Bad or 1/0"):
        load_task("classification", tok, tmp_path / "b.csv")
    (tmp_path / "c.json").write_text(json.dumps([{"sentence": "ok", "label": "Good"}, {"sentence": "meh", "label": "Meh"}]))
    with pytest.raises(DataError, match=r"c\.json: record 1: field 'label'"):
        load_task("classification", tok, tmp_path / "c.json")
    (tmp_path / "labels.json").write_text('["Good", "Bad"]')
    with pytest.raises(DataError, match=r"labels\.json: record 0: expected an object"):
        load_task("classification", tok, tmp_path / "labels.json")


def test_classification_pools_by_length_and_trains_a_head_on_a_lora_model(tok, tmp_path):
    lm = tiny(tok)
    clf = SequenceClassifier(lm)
    eos = tok.eos_token_id
    a, b = Example((5, 6, 7, eos), (5, 6, 7, eos), 1), Example((8, 9, eos), (8, 9, eos), 0)
    batch = collate([a, b], pad_id=eos)                                      # pad == eos: right padding
    assert SequenceClassifier.last_positions(batch["attention_mask"]).tolist() == [3, 2]
    with torch.no_grad():
        both = clf(batch["input_ids"], batch["attention_mask"])
        alone = clf(**{k: v for k, v in collate([b], eos).items() if k in ("input_ids", "attention_mask")})
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-4)

    rows = [("text", "label")] + [(f"{w} film number {i}", int(w == "great")) for i in range(16) for w in ("great", "awful")]
    (tmp_path / "r.csv").write_text("\n".join(f"{x},{y}" for x, y in rows) + "\n")
    t = load_task("classification", tok, tmp_path / "r.csv", n_val=8, cutoff=16)
    assert t.metric == "acc" and not ids_set(t.val) & ids_set(t.train)
    peft_model, _, _ = prepare_model(tiny(tok), FinetuneConfig(method="lora", policy="all", dropout=0.0))
    module = t.wrap(peft_model)
    assert module.head.weight.requires_grad
    head0 = module.head.weight.detach().clone()
    log = run_steps(t, module, steps=3)
    assert 0.0 <= log.val[-1]["acc"] <= 1.0 and not torch.equal(head0, module.head.weight)
    with pytest.raises(EditdecayError, match="task.wrap"):
        t.evaluate(peft_model)


# --- sft ---------------------------------------------------------------------------------

CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def labelled(e: Example) -> list[int]:
    return [t for t, lab in zip(e.input_ids, e.labels) if lab != -100]


def test_sft_label_masks_cover_responses_and_eos_only(tok):
    e = sft_example(tok, CONV, 512, use_template=True)
    assert labelled(e) == tok("Hello!<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(e.input_ids).startswith("<|im_start|>system")
    assert [lab for lab in e.labels if lab != -100] == labelled(e)
    two = sft_example(tok, CONV + [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Smol."}], 512, True)
    assert tok.decode(labelled(two)) == "Hello!<|im_end|>Smol.<|im_end|>"

    wt = word_tokenizer("Below is an instruction that describes a task . Write a response appropriately completes "
                        "the request ### Instruction : Response Hi there Hello".split())
    e = sft_example(wt, [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}], 512, False)
    assert wt.convert_ids_to_tokens(labelled(e)) == ["Hello", "<eos>"]
    assert wt.convert_ids_to_tokens(list(e.input_ids[-7:])) == ["Hi", "there", "###", "Response", ":", "Hello", "<eos>"]
    assert sft_example(wt, [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}], 10, False) is None


def test_sft_reads_alpaca_and_messages_and_rejects_malformed(shared_data, tok, tmp_path):
    t = load_task("sft", tok, shared_data / "alpaca" / "alpaca_en_demo.json", n_val=32)
    assert t.info["n_records"] == 999 and t.info["layout"] == "chat-template" and len(t.train) == 999
    assert ids_set(t.val) <= ids_set(t.train) and len(t.val) == 32
    assert all(e.n_labelled > 0 for e in t.train)

    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": CONV}, {"messages": [{"role": "system", "content": "Be brief."}, *CONV]}])
    t = load_task("sft", tok, m, n_val=1)
    assert len(t.train) == 2 and all(tok.decode(labelled(e)) == "Hello!<|im_end|>" for e in t.train)
    cases = [([{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}], r"record 0: messages\[1\]: field 'role' is missing"),
             ([{"messages": [{"role": "user", "content": "a"}]}], "record 0: field 'messages' has no assistant message"),
             ([{"messages": CONV}, {"prompt": "a", "completion": "b"}], "record 1: expected field 'messages' or Alpaca"),
             ([{"instruction": "a"}], "record 0: field 'output' is missing")]
    for recs, msg in cases:
        with pytest.raises(DataError, match=msg):
            load_task("sft", tok, write_jsonl(tmp_path / "bad.jsonl", recs))


def test_sft_trains_the_embedded_model_with_lora(embedded, tmp_path):
    base, tok = embedded
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = [p.requires_grad for p in base.parameters()]
    convs = [[{"role": "user", "content": f"Add {i} and {i}."}, {"role": "assistant", "content": f"{2 * i}."}] for i in range(6)]
    t = load_task("sft", tok, write_jsonl(tmp_path / "s.jsonl", [{"messages": c} for c in convs]), n_val=2)
    peft_model, _, _ = prepare_model(base, FinetuneConfig(method="lora", policy="all", dropout=0.0))
    try:
        run_steps(t, peft_model, steps=2, batch_size=2)
    finally:
        peft_model.unload()
        for p, f in zip(base.parameters(), flags):
            p.requires_grad_(f)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- commonsense -------------------------------------------------------------------------

def test_commonsense_reads_llm_adapters_files_and_hellaswag(shared_data, tok):
    t = load_task("commonsense", tok, shared_data / "commonsense", n_train=100, n_val=20)
    counts = {k.split("/")[-2]: v for k, v in t.info["files"].items()}
    assert counts == {"ARC-Challenge": 1119, "ARC-Easy": 2251, "boolq": 9427, "openbookqa": 4957}
    assert t.info["train_on_inputs"] and len(t.train) == 100 and len(t.val) == 20
    assert not ids_set(t.val) & ids_set(t.train)                            # held out of the training records
    assert all(e.labels == e.input_ids for e in t.train)

    recs = read_hellaswag_text(shared_data / "commonsense" / "hellaswag" / "hellaswag_val_full.txt")
    assert len(recs) == 10042
    assert recs[0] == {
        "instruction": "Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is "
                       "sitting on a roof. he\n\nEnding1: is using wrap to wrap a pair of skis. Ending2: is ripping level "
                       "tiles off. Ending3: is holding a rubik's cube. Ending4: starts pulling up roofing on a roof."
                       "\n\nAnswer format: ending1/ending2/ending3/ending4",
        "input": "", "output": "the correct answer is ending4", "answer": "ending4"}


def test_commonsense_prompt_cutoff_and_malformed(tok, tmp_path):
    rec = {"instruction": "Is the sky blue?", "input": "", "output": "the correct answer is true", "answer": "true"}
    recs = [rec, {**rec, "input": "Look up."}] + [{**rec, "instruction": f"Question {i}?"} for i in range(10)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs))
    t = load_task("commonsense", tok, path, n_val=2)
    by_ids = {e.input_ids: e for e in t.train + t.val}
    eos = tok.eos_token_id
    for r in recs[:2]:
        ids = tuple(tok(alpaca_prompt(r["instruction"], r["input"], r["output"]))["input_ids"]) + (eos,)
        assert ids in by_ids and by_ids[ids].labels == ids                   # loss on prompt and response, EOS kept
    assert "### Input:\nLook up.\n\n### Response:\nthe correct answer is true" in alpaca_prompt("Q", "Look up.", "the correct answer is true")
    short = load_task("commonsense", tok, path, n_val=2, cutoff=16)
    assert all(len(e.input_ids) == 16 and e.input_ids[-1] != eos for e in short.train)   # truncated: no EOS
    run_steps(load_task("commonsense", tok, path, n_val=2, cutoff=64), tiny(tok))

    path.write_text(json.dumps([rec, {"instruction": "x", "input": ""}]))
    with pytest.raises(DataError, match=r"train\.json: record 1: field 'output' is missing"):
        load_task("commonsense", tok, path)
    (tmp_path / "h.txt").write_text("ctx\n3\na\nb\nc\nd\nctx2\n1\n")
    with pytest.raises(DataError, match=r"h\.txt: 8 lines is not a multiple of 6"):
        load_task("commonsense", tok, tmp_path / "h.txt")
    (tmp_path / "h.txt").write_text("ctx\nx\na\nb\nc\nd\n")
    with pytest.raises(DataError, match=r"h\.txt: record 0 \(line 2\) field 'label' must be 0-3"):
        load_task("commonsense", tok, tmp_path / "h.txt")


# --- hotpotqa ----------------------------------------------------------------------------

HP = {"question": "Who wrote it?", "answer": "Ann",
      "context": [["Book", ["Book is a novel.", " It was written by Ann."]], ["Other", ["Unrelated."]]],
      "supporting_facts": [["Book", 1], ["Book", 0], ["Missing", 0], ["Other", 7]]}


def test_hotpotqa_supporting_context_and_both_formats(shared_data, tok, tmp_path):
    assert hotpot_support(HP, "r") == ([("Book", ["Book is a novel.", " It was written by Ann."])], 2, 4)
    amor = {**HP, "context": [], "supporting_facts": [["Book", [0, 1], ["S0.", "S1."], {"id": "1"}]]}
    assert hotpot_support(amor, "r") == ([("Book", ["S0.", "S1."])], 1, 1)

    t = load_task("hotpotqa", tok, shared_data / "hotpotqa", n_val=20)
    assert {k.split("/")[-1]: v for k, v in t.info["files"].items()} == {"dev.json": 100, "test.json": 500}
    assert t.info["n_no_support_dropped"] == 78 and len(t.train) + len(t.val) == 522
    assert not ids_set(t.val) & ids_set(t.train)
    assert all(len(e.input_ids) <= 256 and e.input_ids[-1] == tok.eos_token_id for e in t.train)   # answer kept

    path = write_jsonl(tmp_path / "hp.json", [HP] * 1 + [{**HP, "question": f"Q{i}?"} for i in range(5)])
    short = load_task("hotpotqa", tok, path, n_val=1, context_tokens=3)
    text = tok.decode(short.train[0].input_ids)
    ctx = text.split("### Input:\n")[1].split("\n\n### Response:")[0]
    assert ctx == "Book: Book" and len(tok(ctx, add_special_tokens=False)["input_ids"]) == 3
    run_steps(load_task("hotpotqa", tok, path, n_val=1), tiny(tok))

    write_jsonl(tmp_path / "bad.json", [HP, {**HP, "supporting_facts": [[1, 0]]}])
    with pytest.raises(DataError, match=r"bad\.json: record 1: field 'supporting_facts\[0\]'"):
        load_task("hotpotqa", tok, tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps(HP) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad2\.json: line 2 is not valid JSON"):
        load_task("hotpotqa", tok, tmp_path / "bad2.json")
    with pytest.raises(DataError, match="task 'hotpotqa' needs data"):
        load_task("hotpotqa", tok)


# --- one run: task + preset + policy ------------------------------------------------------

def test_finetune_run_measures_the_base_rule_on_the_unedited_model(tok, tmp_path):
    import copy

    from editdecay.finetune.presets import get_preset
    from editdecay.finetune.run import finetune

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"Document {i} talks about rivers and hills."} for i in range(40)])
    t = load_task("unstructured", tok, path, n_val=4, block_size=32)
    base = tiny(tok)
    edited = copy.deepcopy(base)
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # a different starting model
    p = get_preset("cpu-unstructured", max_steps=2, eval_every=1, stop=["loss<base-100"], batch_size=4)
    res = finetune(edited, tok, t, p, policy="non-edited", edited=[1], base_model=base, progress=False)
    assert res.base_metrics["loss"] == pytest.approx(t.evaluate(base)["loss"])
    assert res.base_metrics["loss"] != pytest.approx(res.log.val[0]["loss"])  # not the starting (edited) model's
    assert res.log.steps == 2 and res.blocks == [0, 2] and res.log.stop_reason == "max_steps"
    assert all(".layers.1." not in n for n in res.log.trainable)
    assert res.to_json()["task"]["task"] == "unstructured"
