"""Downstream evaluation: loaders on the real LLM-Adapters files, the HellaSwag recipe,
answer extraction, oracle models in both modes, KV-shared option scoring against a full
forward (plain and peft-wrapped), left-padded generation, and the embedded model on a
few ARC-Easy items."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from fakes import word_tokenizer

from editdecay.errors import DataError, EditdecayError
from editdecay.evaluate.downstream import (
    ANSWER_PATTERNS,
    ANSWER_PREFIX,
    TASKS,
    DownstreamConfig,
    build_prompt,
    canonical_task,
    cloze_context,
    evaluate_downstream,
    evaluate_items,
    extract_answer,
    generate_responses,
    load_task,
    score_options,
)

COUNTS = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "winogrande": 1267, "ARC-Easy": 2376,
          "ARC-Challenge": 1172, "openbookqa": 500, "hellaswag": 10042}


@pytest.fixture(scope="module")
def commonsense(shared_data) -> Path:
    d = shared_data / "commonsense"
    if not d.is_dir():
        pytest.skip("no commonsense data")
    return d


# --- loaders -----------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_loader_reads_real_file(commonsense, task):
    items = load_task(task, commonsense)
    assert len(items) == COUNTS[task]
    for it in items:
        assert it.answer in it.labels and len(it.options) == len(it.labels) and all(it.options)
        assert all(re.fullmatch(ANSWER_PATTERNS[task], lab) for lab in it.labels)


def test_loader_option_layouts(commonsense):
    boolq = load_task("boolq", commonsense)[0]
    assert boolq.labels == boolq.options == ("true", "false") and boolq.answer == "false"
    assert boolq.stem == "does ethanol take more energy make that produces?"
    piqa = load_task("piqa", commonsense)[1]
    assert piqa.options == ("replace drawer with bobby pin", "finish, woodgrain with  bobby pin")
    siqa = load_task("siqa", commonsense)[0]  # alias
    assert siqa.options == ("make a new plan", "Go home and see Riley", "Find somewhere to go")
    wino = load_task("winogrande", commonsense)[0]
    assert wino.options == ("Sarah", "Maria") and wino.answer == "option2"
    arc = load_task("arc-e", commonsense)[1]
    assert arc.labels == ("answer1", "answer2", "answer3", "answer4")
    assert arc.options[1] == "breathing mask" and arc.gold == 1
    assert cloze_context(arc) == ("Question: Which piece of safety equipment is used to keep mold spores from "
                                  "entering the respiratory system?\nAnswer:")
    # the shared data root works too
    assert len(load_task("openbookqa", commonsense.parent)) == 500


def test_hellaswag_record_follows_provenance_recipe(commonsense):
    lines = (commonsense / "hellaswag" / "hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")[:6]
    first = load_task("hellaswag", commonsense)[0]
    expected = ("Please choose the correct ending to complete the given sentence: " + lines[0]
                + "\n\nEnding1: {} Ending2: {} Ending3: {} Ending4: {}".format(*lines[2:6])
                + "\n\nAnswer format: ending1/ending2/ending3/ending4")
    assert first.instruction == expected
    assert first.instruction.startswith("Please choose the correct ending to complete the given sentence: "
                                        "Roof shingle removal: A man is sitting on a roof. he\n\nEnding1: is using wrap")
    assert first.answer == f"ending{int(lines[1]) + 1}" == "ending4"
    assert first.options == tuple(lines[2:6])
    assert cloze_context(first) == first.stem == lines[0]


def test_hellaswag_prefers_test_json(tmp_path):
    rec = {"instruction": "Please choose the correct ending to complete the given sentence: x\n\nEnding1: a Ending2: b "
                          "Ending3: c Ending4: d\n\nAnswer format: ending1/ending2/ending3/ending4",
           "input": "", "output": "the correct answer is ending3", "answer": "ending3"}
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "test.json").write_text(json.dumps([rec]))
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text("broken\n")
    [it] = load_task("hellaswag", tmp_path)
    assert it.options == ("a", "b", "c", "d") and it.gold == 2


GOOD = {"instruction": "Please choose the correct answer to the question: q?\n\nAnswer1: a Answer2: b\n\n"
                       "Answer format: answer1/answer2", "input": "", "output": "the correct answer is answer1",
        "answer": "answer1"}


@pytest.mark.parametrize("bad, field", [
    ({**GOOD, "answer": "answer3"}, "answer"),
    ({k: v for k, v in GOOD.items() if k != "answer"}, "answer"),
    ({**GOOD, "instruction": 5}, "instruction"),
    ({**GOOD, "instruction": "q?\n\nAnswer1: a Answer2: b"}, "instruction"),  # no answer format
    ({**GOOD, "instruction": "q?\n\nAnswer1: a\n\nAnswer format: answer1/answer2"}, "instruction"),  # option missing
    ({**GOOD, "instruction": "q?\n\nAnswer1: a Answer2: b\n\nAnswer format: option1/option2"}, "instruction"),
])
def test_loader_rejects_malformed_record(tmp_path, bad, field):
    (tmp_path / "ARC-Easy").mkdir()
    path = tmp_path / "ARC-Easy" / "test.json"
    path.write_text(json.dumps([GOOD, GOOD, bad]))
    with pytest.raises(DataError) as e:
        load_task("ARC-Easy", tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "record 2" in msg and repr(field) in msg and "\n" not in msg


def test_loader_rejects_malformed_files(tmp_path):
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text("{not json")
    with pytest.raises(DataError, match="boolq/test.json: not valid JSON"):
        load_task("boolq", tmp_path)
    with pytest.raises(DataError, match="piqa/test.json: file not found"):
        load_task("piqa", tmp_path)
    (tmp_path / "hellaswag").mkdir()
    txt = tmp_path / "hellaswag" / "hellaswag_val_full.txt"
    txt.write_text("ctx\n3\na\nb\nc\nd\nctx2\n7\na\nb\nc\nd\n")
    with pytest.raises(DataError, match=r"record 1 \(line 8\): field 'label'"):
        load_task("hellaswag", tmp_path)
    txt.write_text("ctx\n3\na\nb\nc\n")
    with pytest.raises(DataError, match="multiple of 6"):
        load_task("hellaswag", tmp_path)
    with pytest.raises(EditdecayError, match="unknown downstream task"):
        canonical_task("mmlu")


# --- prompts and answer extraction -------------------------------------------------------
@pytest.mark.parametrize("task, text, expected", [
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "  false, not true", "false"),
    ("boolq", "True.", ""),  # case-sensitive, as LLM-Adapters
    ("piqa", "solution2 is better than solution1", "solution2"),
    ("piqa", "Solution1", ""),
    ("social_i_qa", "The correct answer is answer3: Find somewhere to go", "answer3"),
    ("ARC-Easy", "answer5", "answer5"),
    ("ARC-Challenge", "Answer4: the producers", ""),
    ("openbookqa", "I think answer2, then answer1", "answer2"),
    ("hellaswag", "the correct answer is ending4.", "ending4"),
    ("hellaswag", "answer1", ""),
    ("winogrande", "option1 fits the blank", "option1"),
    ("winogrande", "the correct answer is Sarah", ""),
])
def test_extract_answer(task, text, expected):
    assert extract_answer(task, text) == expected


def test_build_prompt_styles():
    assert build_prompt("Q?") == ("Below is an instruction that describes a task. Write a response that appropriately "
                                  "completes the request.\n\n### Instruction:\nQ?\n\n### Response:\n")
    lla = build_prompt("Q?", "llm-adapters")
    assert "request. \n\n                ### Instruction:\n                Q?\n\n" in lla
    assert lla.endswith("### Response:\n                ")
    with pytest.raises(EditdecayError, match="chat template"):
        build_prompt("Q?", "chat", word_tokenizer(["a"]))
    with pytest.raises(EditdecayError, match="unknown prompt style"):
        build_prompt("Q?", "vicuna")
    with pytest.raises(EditdecayError, match="unknown ll_norm"):
        DownstreamConfig(ll_norm="max")
    with pytest.raises(EditdecayError, match="cloze"):
        DownstreamConfig(mode="ll", ll_context="cloze", ll_target="label")


# --- oracles -----------------------------------------------------------------------------
def _items_by_prompt(commonsense, limit, style="alpaca"):
    return {build_prompt(it.instruction, style): it for t in TASKS for it in load_task(t, commonsense)[:limit]}


def test_oracle_generation_scores_one(commonsense):
    by_prompt = _items_by_prompt(commonsense, 12)

    def oracle(prompts: Sequence[str]) -> list[str]:
        return [f"{ANSWER_PREFIX} {by_prompt[p].answer}.\n\n### Response:\nanswer1" for p in prompts]

    res = evaluate_downstream(None, None, "all", commonsense, "gen", limit=12, generate_fn=oracle, progress=False)
    assert list(res.tasks) == list(TASKS)
    assert all(t.accuracy == 1.0 and t.parse_rate == 1.0 and t.n == 12 for t in res.tasks.values())
    assert res.mean_accuracy == 1.0
    d = json.loads(res.to_json(items=True))
    assert d["schema"] == "editdecay.downstream/1" and d["mode"] == "gen" and d["settings"]["limit"] == 12
    assert set(d["tasks"]["boolq"]) == {"n", "correct", "accuracy", "parse_rate", "seconds", "items"}
    assert d["tasks"]["piqa"]["items"][0]["pred"] == d["tasks"]["piqa"]["items"][0]["gold"]

    mute = evaluate_downstream(None, None, ["boolq", "obqa"], commonsense, "gen", limit=5,
                               generate_fn=lambda ps: ["I cannot say."] * len(ps), progress=False)
    assert all(t.accuracy == 0.0 and t.parse_rate == 0.0 for t in mute.tasks.values())


@pytest.mark.parametrize("context, target", [("prompt", "text"), ("prompt", "label"), ("cloze", "text")])
@pytest.mark.parametrize("norm", ["mean", "sum"])
def test_oracle_scorer_scores_one(commonsense, context, target, norm):
    items = _items_by_prompt(commonsense, 12)
    if context == "prompt":
        by_ctx = {p + ANSWER_PREFIX: it for p, it in items.items()}
    else:
        by_ctx = {cloze_context(it): it for it in items.values()}

    def oracle(contexts, continuations):
        out = []
        for c, conts in zip(contexts, continuations):
            it = by_ctx[c]
            assert tuple(conts) == (it.options if target == "text" else it.labels)
            out.append([[-0.1, -0.1] if k == it.gold else [-3.0] for k in range(len(conts))])
        return out

    res = evaluate_downstream(None, None, "all", commonsense, "ll", limit=12, score_fn=oracle, ll_norm=norm,
                              ll_target=target, ll_context=context, progress=False)
    assert all(t.accuracy == 1.0 and t.parse_rate is None for t in res.tasks.values())


def test_ll_norm_mean_vs_sum(commonsense):
    [it] = load_task("winogrande", commonsense)[:1]  # gold: option2
    scores = [[[-1.0, -1.0, -1.0], [-2.0]]]  # option1: mean -1, sum -3; option2: mean -2, sum -2
    pick = {norm: evaluate_items([it], DownstreamConfig(mode="ll", ll_norm=norm), score_fn=lambda c, o: scores,
                                 progress=False).predictions[0] for norm in ("mean", "sum")}
    assert pick == {"mean": "option1", "sum": "option2"}


# --- model calls on tiny models ----------------------------------------------------------
WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "x", "y", "z", "the", "correct", "answer", "is", "Below"]


def _full_forward_scores(model, tok, contexts, continuations):
    """Reference: each (context, option) sequence in its own forward, no cache."""
    out = []
    for c, conts in zip(contexts, continuations):
        ctx = tok(c)["input_ids"]
        per = []
        for x in conts:
            ids = tok(c + " " + x)["input_ids"]
            assert ids[: len(ctx)] == ctx
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            per.append([logp[j - 1, ids[j]].item() for j in range(len(ctx), len(ids))])
        out.append(per)
    return out


CTX = ["a b c d the correct answer is", "e f the correct answer is", "Below a b c d e f g h the correct answer is"]
CONTS = [["x y", "z"], ["x", "y z x", "z"], ["x", "y"]]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_score_options_matches_full_forward(model_type):
    model, tok = make_tiny_model(model_type), word_tokenizer(WORDS)
    got = score_options(model, tok, CTX, CONTS, batch_size=2)
    ref = _full_forward_scores(model, tok, CTX, CONTS)
    assert [[len(x) for x in per] for per in got] == [[2, 1], [1, 3, 1], [1, 1]]
    for g, r in zip(got, ref):
        for a, b in zip(g, r):
            assert a == pytest.approx(b, abs=1e-5)


def test_score_options_and_generation_through_peft():
    peft = pytest.importorskip("peft")
    tok = word_tokenizer(WORDS)
    base = make_tiny_model("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(base, cfg)
    wrapped.train()
    got = score_options(wrapped, tok, CTX, CONTS, batch_size=3)
    gen = generate_responses(wrapped, tok, CTX, batch_size=3, max_new_tokens=4)
    assert wrapped.training  # training flag restored
    merged = wrapped.merge_and_unload().eval()
    ref = _full_forward_scores(merged, tok, CTX, CONTS)
    for g, r in zip(got, ref):
        for a, b in zip(g, r):
            assert a == pytest.approx(b, abs=1e-5)
    assert gen == generate_responses(merged, tok, CTX, batch_size=3, max_new_tokens=4)


def test_generation_left_pads_without_touching_tokenizer():
    model, tok = make_tiny_model("llama"), word_tokenizer(WORDS)
    batched = generate_responses(model, tok, CTX, batch_size=3, max_new_tokens=5)
    single = [generate_responses(model, tok, [c], max_new_tokens=5)[0] for c in CTX]
    assert batched == single and all(batched)
    assert tok.padding_side == "right"
    beams = generate_responses(model, tok, CTX, batch_size=2, num_beams=2, max_new_tokens=5)
    assert len(beams) == 3 and all(isinstance(b, str) for b in beams)


# --- the embedded model ------------------------------------------------------------------
def test_embedded_arc_easy(embedded, commonsense):
    """The first 40 ARC-Easy items (figures on 200: benchmarks/downstream_modes.py).

    The unfine-tuned 135M model seldom answers in the label format: with the plain
    LLM-Adapters protocol it parses 14% of 200 items, primed with "the correct answer
    is" under the chat template 74% (72.5% of these 40), so generation is checked
    primed, at >= 0.6. Log-likelihood ranking is checked in cloze form (57.5% of these
    40; the instruction-prompt form is near chance on this model, 28.5% of 200).
    """
    model, tok = embedded
    torch.set_num_threads(1)
    gen = evaluate_downstream(model, tok, "ARC-Easy", commonsense, "gen", limit=40, prompt_style="chat",
                              response_prefix=ANSWER_PREFIX, max_new_tokens=8, progress=False)
    arc = gen.tasks["ARC-Easy"]
    assert arc.n == 40 and arc.parse_rate >= 0.6
    assert len(arc.responses) == 40 and json.loads(gen.to_json())["tasks"]["ARC-Easy"]["parse_rate"] == arc.parse_rate
    ll = evaluate_downstream(model, tok, "arc-e", commonsense, "ll", limit=40, ll_context="cloze", progress=False)
    assert ll.tasks["ARC-Easy"].accuracy > 0.25
