"""The fine-tuning loop: stopping rules, probe curves, loss falls on real text."""

import itertools

import pytest
import torch

from editdecay import EditdecayError
from editdecay.finetune import FinetuneConfig, prepare_model
from editdecay.finetune.data import batch_stream, eval_loss, pack_blocks, split_validation
from editdecay.finetune.trainer import StopRule, TrainConfig, train

from conftest import make_tiny_model

PATTERN = [[(i * 3 + s) % 23 + 2 for i in range(16)] for s in range(64)]


def test_stop_rule_parsing():
    assert StopRule.parse("loss<3.1").fires({"loss": 3.0}, None)
    assert not StopRule.parse("loss<3.1").fires({"loss": 3.1}, None)
    assert StopRule.parse("acc>0.7").fires({"acc": 0.71}, None)
    assert StopRule.parse("loss<base-0.2").fires({"loss": 3.4}, base_loss=3.7)
    assert not StopRule.parse("loss<base-0.2").fires({"loss": 3.6}, base_loss=3.7)
    with pytest.raises(EditdecayError, match="unknown stopping rule 'ppl<3'"):
        StopRule.parse("ppl<3")
    with pytest.raises(EditdecayError, match="needs the base model"):
        StopRule.parse("loss<base-0.1").fires({"loss": 1.0}, None)


def _scripted(values):
    it = iter(values)
    return lambda model: next(it)


@pytest.mark.parametrize("rule,metrics,base,steps", [
    ("loss<3.6", [{"loss": 5 - 0.5 * i} for i in range(20)], None, 12),      # 5, 4.5, 4, 3.5 -> 4th eval
    ("acc>0.7", [{"loss": 1.0, "acc": 0.25 * i} for i in range(20)], None, 12),  # 0, .25, .5, .75
    ("loss<base-0.5", [{"loss": 5 - 0.5 * i} for i in range(20)], 4.2, 12),   # < 3.7 -> 3.5
    ("loss<0.1", [{"loss": 5.0} for _ in range(20)], None, 10),               # never: max_steps
])
def test_each_stopping_rule_fires_at_its_threshold(rule, metrics, base, steps):
    model = make_tiny_model("llama")
    seen = []
    log = train(model, batch_stream(PATTERN, 4), TrainConfig(lr=1e-3, max_steps=10 if rule == "loss<0.1" else 40,
                                                           eval_every=4, stop=[rule]),
                evaluate=_scripted(metrics), probes=[lambda m, step: seen.append(step) or {"seen": step}],
                base_loss=base, progress=False)
    assert log.steps == steps
    assert log.stop_reason == (rule if rule != "loss<0.1" else "max_steps")
    # probes are recorded at every evaluation, in step order
    assert [p["step"] for p in log.probes] == [v["step"] for v in log.val] == seen
    assert seen[0] == 0 and seen[-1] == steps


def test_loss_falls_and_only_trainable_parameters_move():
    model = make_tiny_model("llama")
    model, names, _ = prepare_model(model, FinetuneConfig(method="full", policy="threshold:1"))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    val = PATTERN[:8]
    log = train(model, batch_stream(PATTERN, 8), TrainConfig(lr=3e-3, max_steps=40, eval_every=20, weight_decay=0.0),
                evaluate=lambda m: {"loss": eval_loss(m, val)}, trainable=names, progress=False)
    assert log.val[-1]["loss"] < log.val[0]["loss"] - 0.5
    assert log.to_json()["trainable"] == names and log.tokens == 40 * 8 * 16
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_lora_loss_falls_on_real_text_with_the_embedded_model(embedded):
    from editdecay.editing.corpus import Corpus

    base, tok = embedded
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = [p.requires_grad for p in base.parameters()]
    docs = list(itertools.islice(iter(Corpus.offline_default()), 40))
    blocks = pack_blocks(tok, docs, 64)
    val = split_validation(blocks, 8, seed=0)
    peft_model, names, _ = prepare_model(base, FinetuneConfig(method="lora", policy="all", r=8, dropout=0.0))
    try:
        log = train(peft_model, batch_stream(blocks, 4), TrainConfig(lr=2e-3, max_steps=12, eval_every=12),
                    evaluate=lambda m: {"loss": eval_loss(m, val, batch_size=8)}, trainable=names, progress=False)
        assert log.val[-1]["loss"] < log.val[0]["loss"] - 0.05
    finally:
        peft_model.unload()  # remove the adapters: the shared fixture model is unchanged
        for p, f in zip(base.parameters(), flags):
            p.requires_grad_(f)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
