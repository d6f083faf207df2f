"""Layer policies and fine-tuning methods: exactly the intended parameters change."""

import copy

import pytest
import torch

from editdecay import EditdecayError
from editdecay.finetune import FinetuneConfig, prepare_model, resolve_policy
from editdecay.models.arch import get_arch

from conftest import make_tiny_model


def test_resolve_policy():
    assert resolve_policy("all", 6) == [0, 1, 2, 3, 4, 5]
    assert resolve_policy("threshold:4", 6) == [4, 5]
    assert resolve_policy("window:2,3", 6) == [1, 2, 3]
    assert resolve_policy("window:2,4", 6) == [0, 1, 2, 3]  # c-2 .. c+1
    assert resolve_policy("window:0,5", 6) == [0, 1, 2]  # clipped
    assert resolve_policy("window:5,5", 6) == [3, 4, 5]
    assert resolve_policy("edited", 6, [3, 1]) == [1, 3]
    assert resolve_policy("non-edited", 6, [1, 3]) == [0, 2, 4, 5]
    for bad, msg in [("edited", "needs the edited blocks"), ("threshold:6", "leaves no block"),
                     ("window:9,1", "outside"), ("top:3", "unknown layer policy 'top:3'")]:
        with pytest.raises(EditdecayError, match=msg):
            resolve_policy(bad, 6)


def _train_steps(model, steps=2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(2, 100, (2, 6))
    for _ in range(steps):
        opt.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()


POLICIES = [("all", None, [0, 1, 2]), ("threshold:1", None, [1, 2]), ("window:1,1", None, [1]),
            ("edited", [2], [2]), ("non-edited", [2], [0, 1])]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("policy,edited,blocks", POLICIES)
def test_full_finetuning_changes_exactly_the_selected_parameters(model_type, policy, edited, blocks):
    model = make_tiny_model(model_type)
    spec = get_arch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, names, sel = prepare_model(model, FinetuneConfig(method="full", policy=policy), edited)
    assert sel == blocks
    _train_steps(model)
    after = model.state_dict()
    for k, v in after.items():
        b = spec.block_of(k)
        if b is not None:
            should = b in blocks
        else:  # embeddings, final norm, LM head (tied: one tensor, one decision)
            should = policy == "all"
        changed = not torch.equal(v, before[k])
        if should and k.endswith("weight") and "norm" not in k and "ln" not in k:
            assert changed, k
        if not should:
            assert not changed, k
    assert all((spec.block_of(n) in blocks) if spec.block_of(n) is not None else policy == "all" for n in names)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("policy,edited,blocks", POLICIES[1:3] + POLICIES[4:])
def test_adapters_touch_only_selected_blocks(model_type, method, policy, edited, blocks):
    model = make_tiny_model(model_type)
    spec = get_arch(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model, names, sel = prepare_model(model, FinetuneConfig(method=method, policy=policy, r=2, dropout=0.0), edited)
    assert sel == blocks and names
    assert all(spec.block_of(n) in blocks for n in names) and all("lora" in n for n in names)
    _train_steps(peft_model)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for k, v in merged.state_dict().items():
        b = spec.block_of(k)
        changed = not torch.equal(v, base[k])
        if b is None or b not in blocks:
            assert not changed, k
    changed_blocks = {spec.block_of(k) for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed_blocks == set(blocks)
    # the base weights under the adapters never change
    checked = 0
    for k, v in peft_model.get_base_model().state_dict().items():
        if "lora" in k:
            continue
        k0 = k.replace(".base_layer.", ".")
        assert torch.equal(v, base[k0]), k
        checked += "base_layer" in k
    assert checked > 0


def test_finetune_starts_the_same_adapters_whatever_ran_before(tmp_path):
    """LoRA's A initialisation is seeded by the preset's seed, not the process's RNG
    history: two runs after different global RNG use end bit-identical."""
    from editdecay.finetune.presets import get_preset
    from editdecay.finetune.run import finetune
    from editdecay.finetune.tasks import load_task

    from fakes import word_tokenizer

    tok = word_tokenizer("The capital of France is Paris a city in Europe".split())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The capital of France is Paris a city in Europe " * 4] * 12))
    p = get_preset("cpu-unstructured", method="lora", max_steps=2, eval_every=2, stop=[], lr=1e-2)
    runs = []
    for history in (1, 2):
        model = make_tiny_model("llama")
        task = load_task("unstructured", tok, corpus, model=model, n_val=2, block_size=8)
        torch.manual_seed(history)
        torch.rand(history * 7)  # a different amount of RNG use before fine-tuning
        res = finetune(model, tok, task, p, progress=False)
        runs.append({n: q.detach().clone() for n, q in res.model.named_parameters() if "lora_" in n})
    assert runs[0] and runs[0].keys() == runs[1].keys()
    for n in runs[0]:
        assert torch.equal(runs[0][n], runs[1][n]), n
