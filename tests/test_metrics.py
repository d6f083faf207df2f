"""Knowledge metrics on a hand-set bigram model: every expected value computed by hand."""

import math

import pytest
import torch

from editdecay.evaluate.metrics import probe_token, score_facts, split_target
from editdecay.evaluate.probes import Prober
from editdecay.facts.record import FactRecord, Neighbor

from fakes import capital_lm


@pytest.fixture(scope="module")
def lm():
    return capital_lm()


F1 = FactRecord("f1", "France", "The capital of {} is", target_new="London", target_true="Paris",
                paraphrases=("France , the", "France is"),
                neighborhood=(Neighbor("Rome is", "Paris"), Neighbor("Rome , the", "Paris")))
F2 = FactRecord("f2", "Germany", "{} speaks", target_new="English", target_true="French")


def test_greedy_and_masked_argmax_differ_as_defined(lm):
    model, tok = lm
    prober = Prober(model, tok)
    g = prober.first_non_stop([F1.text, F2.text], mode="greedy")
    assert [x.token.strip() for x in g] == ["London", "French"]
    assert g[0].steps == 2 and tok.decode(list(g[0].stop_prefix)).strip() == "the"
    m = prober.first_non_stop([F1.text, F2.text], mode="masked_argmax")
    assert [x.token.strip() for x in m] == ["Paris", "French"] and m[0].steps == 1


def test_retention_both_modes(lm):
    model, tok = lm
    greedy = score_facts(model, tok, [F1, F2], mode="greedy")
    assert [(f.retained_true, f.retained_new) for f in greedy.facts] == [(False, True), (True, False)]
    assert greedy.retention_true == 0.5 and greedy.retention_new == 0.5
    masked = score_facts(model, tok, [F1, F2], mode="masked_argmax")
    assert [(f.retained_true, f.retained_new) for f in masked.facts] == [(True, False), (True, False)]
    assert masked.retention_true == 1.0 and masked.retention_new == 0.0


def test_counterfact_es_ps_ns_by_hand(lm):
    model, tok = lm
    s = score_facts(model, tok, [F1, F2])
    f1, f2 = s.facts
    # ES: P(London|is)=.15 < P(Paris|is)=.3 ; P(English|speaks)=.25 < P(French)=.6
    assert f1.es == 0.0 and f2.es == 0.0 and not f1.success
    # PS: "France , the": .7 > .2 -> 1 ; "France is": .15 < .3 -> 0
    assert f1.ps == 0.5 and f2.ps is None
    # NS: "Rome is": P(Paris)=.3 > P(London)=.15 -> 1 ; "Rome , the": .2 < .7 -> 0
    assert f1.ns == 0.5 and f2.ns is None
    assert s.es == 0.0 and s.ps == 0.5 and s.ns == 0.5
    assert s.summary()["n_facts"] == 2


def test_mean_vs_joint_probability(lm):
    model, tok = lm
    # new = "the Paris": mean-token P = sqrt(.5*.2) = .316 > .3 ; joint .1 < .3
    f = FactRecord("f3", "France", "The capital of {} is", target_new="the Paris", target_true="Paris")
    assert score_facts(model, tok, [f], prob="mean").facts[0].es == 1.0
    assert score_facts(model, tok, [f], prob="joint").facts[0].es == 0.0
    sc = Prober(model, tok).score_targets([split_target(tok, f.text, "the Paris")])[0]
    assert sc.logprobs == pytest.approx((math.log(0.5), math.log(0.2)), abs=1e-5)
    assert sc.argmax == (True, False)


def test_target_starting_with_stop_word_probes_next_token(lm):
    model, tok = lm
    prober = Prober(model, tok)
    assert tok.decode([probe_token(tok, F1.text, "the London", prober.stop_mask)]).strip() == "London"
    f = FactRecord("f4", "France", "The capital of {} is", target_new="the London", target_true="Paris")
    r = score_facts(model, tok, [f]).facts[0]
    assert r.retained_new is True  # greedy 'the' -> 'London' matches the probe token London


def test_zsre_token_accuracy_and_success(lm):
    model, tok = lm
    ok = FactRecord("z1", "France", "{} is", target_new="the London", metric="zsre",
                    paraphrases=("Rome is",), neighborhood=(Neighbor("Rome speaks", "French English"),))
    half = FactRecord("z2", "France", "{} is", target_new="the Paris", metric="zsre")
    a, b = score_facts(model, tok, [ok, half]).facts
    assert a.es == 1.0 and a.success and a.ps == 1.0
    assert a.ns == 0.5  # after 'speaks' argmax French (ok); after 'French' uniform -> argmax id 0 (miss)
    assert b.es == 0.5 and not b.success
    assert a.retained_true is None  # zsRE memit preset: no true target


def test_split_target_tokenises_in_context(embedded):
    _, tok = embedded
    ctx, tgt = split_target(tok, "The capital of France is", "Paris")
    assert ctx == tok("The capital of France is")["input_ids"]
    assert ctx + tgt == tok("The capital of France is Paris")["input_ids"]
    assert tok.decode(tgt) == " Paris"


def test_split_target_with_sentencepiece_tokenizer(tmp_path):
    """SentencePiece turns ' Paris' into a lone '▁' plus pieces; the target must be read
    in context and its probe token skip the empty piece."""
    import io
    import json
    import inspect

    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    text = " ".join(inspect.getdoc(m) or "" for m in (json, io, inspect, pytest, torch.nn.Module))
    text = text.encode("ascii", "ignore").decode()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split(". ")), model_writer=buf, vocab_size=600,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    prompt = "The capital of France is"
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id  # BOS handled by the tokenizer
    target = "Ørsted"  # 'Ø' never occurs in the (ASCII) training text: '▁' stands alone
    ctx, tgt = split_target(tok, prompt, target)
    assert ctx == ids and ctx + tgt == tok(prompt + " " + target)["input_ids"]
    pieces = tok.convert_ids_to_tokens(tgt)
    assert pieces[0] == "▁"  # the lone space piece
    from editdecay.evaluate.probes import stop_token_mask

    mask = stop_token_mask(tok, len(tok))
    assert mask[tgt[0]]
    first = probe_token(tok, prompt, target, mask)
    assert first == tgt[1] and tok.convert_ids_to_tokens([first])[0] == pieces[1]
