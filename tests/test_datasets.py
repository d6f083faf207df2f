import json

import pytest

from editdecay import DataError
from editdecay.facts.datasets import load_facts, write_facts
from editdecay.facts.record import FactRecord, Neighbor, facts_hash


def test_all_shared_counterfact_cases_load(shared_data):
    facts = load_facts(shared_data / "counterfact")
    assert len(facts) == 21919
    assert len({f.case_id for f in facts}) == 21919
    case0 = next(f for f in facts if f.case_id == "0")
    assert case0.text == "The mother tongue of Danielle Darrieux is"
    assert (case0.target_true, case0.target_new, case0.relation_id) == ("French", "English", "P103")
    assert case0.neighborhood == (Neighbor("Michel Rocard is a native speaker of", "French"),)
    assert len(case0.paraphrases) == 1
    assert all(f.prompt.count("{}") == 1 and f.relation_id and f.relation_id.startswith("P") for f in facts)


def test_zsre_presets(shared_data):
    path = shared_data / "zsre" / "zsre_mend_eval_portability_gpt4.json"
    memit = load_facts(path)
    easy = load_facts(path, zsre_preset="easyedit")
    assert len(memit) == len(easy) == 1037
    raw = json.loads(path.read_text())[0]
    m, e = memit[0], easy[0]
    assert m.metric == e.metric == "zsre"
    assert (m.target_new, m.target_true) == (raw["answers"][0], None)
    assert (e.target_new, e.target_true) == (raw["alt"], raw["answers"][0])
    assert m.text == raw["src"] and m.paraphrases == (raw["rephrase"],)
    assert m.neighborhood == (Neighbor(raw["loc"] + "?", raw["loc_ans"]),)
    assert len(load_facts(shared_data / "zsre" / "zsre_mend_train-1k.json")) == 1000


def test_rome_format(tmp_path):
    rec = {
        "case_id": 7,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                              "relation_id": "P103", "target_true": {"str": "French", "id": "Q150"},
                              "target_new": {"str": "English", "id": "Q1860"}},
        "paraphrase_prompts": ["Where Danielle Darrieux is from, people speak the language of", "x. Danielle Darrieux speaks"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jacques Chirac spoke"],
        "attribute_prompts": ["ignored"], "generation_prompts": ["ignored"],
    }
    p = tmp_path / "cf.json"
    p.write_text(json.dumps([rec]))
    (f,) = load_facts(p)
    assert (f.case_id, f.relation_id, f.target_true, f.target_new) == ("7", "P103", "French", "English")
    assert len(f.paraphrases) == 2
    assert [n.target for n in f.neighborhood] == ["French", "French"]


def test_records_roundtrip_json_and_jsonl(tmp_path):
    facts = [FactRecord("a", "France", "The capital of {} is", "London", "Paris", "P36", ("p",),
                        (Neighbor("q", "Paris"),), "test"),
             FactRecord("b", "Q", "{} is", "x", None, metric="zsre")]
    write_facts(facts, tmp_path / "f.jsonl")
    assert load_facts(tmp_path / "f.jsonl") == facts
    (tmp_path / "f.json").write_text(json.dumps([f.to_dict() for f in facts]))
    assert load_facts(tmp_path / "f.json") == facts
    assert facts_hash(facts) == facts_hash(load_facts(tmp_path / "f.jsonl"))
    assert facts_hash(facts) != facts_hash(facts[::-1])


@pytest.mark.parametrize("content,message", [
    ('[{"case_id": 0, "prompt": "The tongue of X is", "subject": "X", "ground_truth": "b", "rephrase_prompt": "r"}]',
     r"f\.json: record 0: field 'target_new' is missing"),
    ('[{"case_id": 0, "prompt": "p", "subject": "X", "ground_truth": "b", "target_new": "a", "rephrase_prompt": "r"}]',
     r"f\.json: record 0: field 'prompt' does not contain the subject 'X'"),
    ('[{"src": "Q X?", "subject": "X", "answers": []}]', r"record 0: field 'answers' must be a non-empty list"),
    ('[{"subject": "X", "prompt": "{} is", "target_new": 3, "case_id": 1}]', r"record 0: field 'target_new' must be a string"),
    ('[1, 2]', r"record 0: cannot tell the format"),
    ('[{"subject": "X"', r"f\.json: invalid JSON"),
    ('[]', r"f\.json: no records"),
])
def test_malformed_input_names_file_record_and_field(tmp_path, content, message):
    p = tmp_path / "f.json"
    p.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        load_facts(p)
    assert "\n" not in str(e.value)


def test_second_record_error_names_its_index(tmp_path):
    good = {"subject": "X", "prompt": "{} is", "target_new": "a", "case_id": 1}
    p = tmp_path / "f.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "neighborhood": [{"prompt": 1}]}) + "\n")
    with pytest.raises(DataError, match=r"f\.jsonl: record 1: field 'neighborhood\[0\]'"):
        load_facts(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_facts(tmp_path / "nope.json")
