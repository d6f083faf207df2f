import pytest
import torch

from editdecay import Prober
from editdecay.facts.stopwords import is_stop_text, load_stopwords, stopwords_hash
from editdecay.evaluate.probes import stop_token_mask


def test_stopword_list_is_nltk_english():
    words = load_stopwords()
    assert len(words) == 179
    assert {"the", "a", "of", "don't", "wouldn't", "y", "ma"} <= words
    assert "paris" not in words
    assert stopwords_hash() == stopwords_hash(words) and len(stopwords_hash()) == 16


@pytest.mark.parametrize("text,stop", [
    (" the", True), ("The", True), (" THE ", True), ("", True), ("   ", True), (",", True),
    (" ...", True), ("'", True), (" \"", True), ("—", True),
    (" Paris", False), (" 1990", False), ("'s", False), ("$", False), (" theory", False),
])
def test_is_stop_text(text, stop):
    assert is_stop_text(text, load_stopwords()) is stop


def test_stop_mask_on_embedded_tokenizer(embedded):
    model, tok = embedded
    mask = stop_token_mask(tok, model.lm_head.weight.shape[0])
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    the, paris, comma = ids(" the")[0], ids(" Paris")[0], ids(",")[0]
    assert mask[the] and mask[comma] and not mask[paris]
    assert not mask[tok.eos_token_id]  # special tokens end the search instead
    assert 0.005 < mask.float().mean() < 0.2


def test_batched_probe_matches_unbatched_forward(embedded):
    model, tok = embedded
    prompts = ["The capital of France is", "Hi", "The mother tongue of Danielle Darrieux is",
               "Apple was founded by", "Water boils at a temperature of one hundred degrees"]
    res = Prober(model, tok, batch_size=4).probe(prompts, k=5)
    for p, r in zip(prompts, res):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = model(input_ids=ids).logits[0, -1].softmax(-1)
        top = probs.topk(5)
        assert [t.id for t in r.top] == top.indices.tolist()
        assert torch.allclose(torch.tensor([t.prob for t in r.top]), top.values, atol=1e-5)
        assert r.prompt == p


def test_greedy_skips_stop_tokens_and_flags_cap(embedded):
    model, tok = embedded
    prompt = "Michael Jordan plays the sport of"  # argmax is ' the'
    prober = Prober(model, tok)
    g = prober.first_non_stop([prompt])[0]
    first = prober.top_k([prompt], 1)[0][0]
    assert first.token == " the"
    assert not g.capped and g.steps >= 2 and g.id is not None
    assert g.stop_prefix[0] == first.id
    assert all(prober.stop_mask[t] for t in g.stop_prefix) and not prober.stop_mask[g.id]
    # the greedy continuation is the model's own greedy decoding
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=g.steps, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out[0, ids.shape[1]:].tolist() == [*g.stop_prefix, g.id]
    capped = Prober(model, tok, max_steps=1).first_non_stop([prompt, "The capital of France is"])
    assert capped[0].capped and capped[0].id is None and capped[0].token == "" and capped[0].steps == 1
    assert not capped[1].capped and capped[1].token == " Paris"


def test_carrier_sequences_share_a_context_wherever_a_prefix_allows():
    from editdecay.evaluate.probes import carrier_sequences

    c, d = [5, 6], [7]
    pairs = [(c, [1]), (c, [2]), (c, [1, 3]), (c, [2, 4]), (d, [1]), (c, [1, 3, 9])]
    seqs, readers = carrier_sequences(pairs)
    # c+[1,3,9] carries (c,[1,3]) and every one-token target of c; c+[2,4] only itself
    assert sorted(map(tuple, seqs)) == [(5, 6, 1, 3, 9), (5, 6, 2, 4), (7, 1)]
    assert sorted(i for r in readers for i in r) == list(range(len(pairs)))
    assert sorted(map(len, readers)) == [1, 1, 4]
    for s, rs in zip(seqs, readers):
        for i in rs:
            ctx, tgt = pairs[i]
            assert s[: len(ctx) + len(tgt) - 1] == ctx + tgt[:-1]


def test_shared_sequence_scores_equal_scoring_each_pair_alone(embedded):
    from editdecay.evaluate.metrics import split_target

    model, tok = embedded
    prompts = ["The capital of France is", "The mother tongue of Danielle Darrieux is", "Apple was founded by"]
    targets = ["Paris", "London", "French", "the Paris of Europe", "Steve Jobs", "Steve Wozniak", "Microsoft"]
    pairs = [split_target(tok, p, t) for p in prompts for t in targets]
    shared = Prober(model, tok, batch_size=8).score_targets(pairs)
    alone = [Prober(model, tok, batch_size=1).score_targets([p])[0] for p in pairs]
    for a, b in zip(shared, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.argmax == b.argmax
