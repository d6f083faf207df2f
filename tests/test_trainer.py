"""The fine-tuning loop: stopping rules, probe curves, loss falls on real text."""

import itertools
import math

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


class _Counting(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, 0

    def forward(self, x):
        self.calls += torch.is_grad_enabled()
        return self.fn(x)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_training(method):
    calls = []

    def run(ckpt):
        model = make_tiny_model("llama")
        mlp = model.model.layers[2].mlp
        counter = _Counting(mlp.act_fn)  # module hooks do not fire in the recomputation; a submodule call does
        mlp.act_fn = counter
        model, names, _ = prepare_model(model, FinetuneConfig(method=method, policy="threshold:1", dropout=0.0))
        train(model, batch_stream(PATTERN, 4), TrainConfig(lr=1e-2, max_steps=3, eval_every=3, gradient_checkpointing=ckpt),
              evaluate=lambda m: {}, progress=False)
        calls.append(counter.calls)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = run(False), run(True)
    assert calls == [3, 6]  # checkpointing recomputes each block once in the backward pass
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6), n


def test_bf16_autocast_keeps_fp32_master_weights():
    model = make_tiny_model("llama")
    model, names, _ = prepare_model(model, FinetuneConfig(method="full", policy="all"))
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype) if torch.is_grad_enabled() else None)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    log = train(model, batch_stream(PATTERN, 4), TrainConfig(lr=1e-3, max_steps=2, eval_every=2, bf16=True),
                evaluate=lambda m: {}, progress=False)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the training forward ran in bf16 ...
    w = model.model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.float32 and not torch.equal(w, before)  # ... updates land in fp32 weights
    assert all(math.isfinite(x) for x in log.train_loss)
    with pytest.raises(EditdecayError, match="fp32 master weights"):
        train(make_tiny_model("llama").to(torch.bfloat16).train(), batch_stream(PATTERN, 4),
              TrainConfig(max_steps=1, bf16=True), evaluate=lambda m: {}, progress=False)


def test_presets_resolve_to_trainer_settings():
    from editdecay.finetune.presets import finetune_presets, get_preset, llm_adapters_targets
    from editdecay.models.arch import ARCHS

    for name in finetune_presets():  # every shipped preset is valid
        p = get_preset(name)
        p.train_config(1000)
    p = get_preset("seed000-unstructured")
    cfg = p.train_config(60000)
    assert (cfg.lr, cfg.grad_accum, cfg.eval_every, cfg.stop, cfg.weight_decay, cfg.betas) == (5e-5, 16, 20, ["loss<3.1"], 0.01, (0.9, 0.999))
    assert cfg.max_steps == 2 * (60000 // 256)
    c = get_preset("seed001-commonsense-lora").train_config(6400)  # 100 steps per epoch
    assert (c.max_steps, c.eval_every, c.bf16) == (300, 25, True)
    assert get_preset("cpu-unstructured", lr=1e-5, max_steps=None).lr == 1e-5  # None overrides are ignored
    with pytest.raises(EditdecayError, match="unknown fine-tuning preset 'nope'"):
        get_preset("nope")
    with pytest.raises(EditdecayError, match="unknown field"):
        get_preset("cpu-unstructured", learning_rate=1)
    assert llm_adapters_targets(ARCHS["llama"]) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]
    assert llm_adapters_targets(ARCHS["gpt2"]) == ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_llm_adapters_targets_adapt_exactly_q_k_v_up_down(model_type):
    from editdecay.finetune.presets import get_preset
    from editdecay.models.arch import get_arch

    model = make_tiny_model(model_type)
    cfg = get_preset("seed001-commonsense-lora").finetune_config("window:1,1", get_arch(model))
    peft_model, names, _ = prepare_model(model, cfg)
    adapted = sorted({n.split(".lora_")[0].split("layers.")[-1].split("h.")[-1] for n in names})
    want = {"llama": ["1.mlp.down_proj", "1.mlp.up_proj", "1.self_attn.k_proj", "1.self_attn.q_proj", "1.self_attn.v_proj"],
            "gpt2": ["1.attn.c_attn", "1.mlp.c_fc", "1.mlp.c_proj"]}[model_type]
    assert adapted == want
