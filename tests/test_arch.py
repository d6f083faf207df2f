import pytest
import torch

from editdecay import ARCHS, UnsupportedArchitectureError, get_arch
from editdecay.models.arch import ArchSpec, ArchRegistry

from conftest import TINY_CONFIGS, make_tiny_model


def test_every_registered_type_has_a_tiny_model():
    assert set(ARCHS.supported()) == set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_spec_modules_exist_and_run(model_type):
    model = make_tiny_model(model_type)
    spec = get_arch(model)
    cfg = model.config
    n_blocks = spec.num_blocks(model)
    assert n_blocks == 3
    hidden, inter = 32, 64

    names = [spec.final_norm, spec.unembed_name(model), *spec.embeddings]
    for i in range(n_blocks):
        names += [spec.block_name(i), spec.module_name(i, spec.mlp), spec.module_name(i, spec.attn)]
        names += [spec.module_name(i, r) for r in (*spec.mlp_in, spec.mlp_out, *spec.attn_proj)]
    seen: dict[str, tuple] = {}
    hooks = []
    for name in names:
        mod = model.get_submodule(name)  # raises if the path is wrong

        def hook(m, args, out, name=name):
            x = args[0] if args else None
            seen[name] = (tuple(x.shape) if torch.is_tensor(x) else None,
                          tuple(out.shape) if torch.is_tensor(out) else None)

        hooks.append(mod.register_forward_hook(hook))
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    assert set(seen) == set(names), f"modules never called: {set(names) - set(seen)}"

    # rewrite module: intermediate -> hidden, weight seen as (out, in)
    down = spec.rewrite_module_name(1)
    assert seen[down] == ((2, 7, inter), (2, 7, hidden))
    assert tuple(spec.weight_out_in(model.get_submodule(down)).shape) == (hidden, inter)
    for rel in spec.mlp_in:
        w = spec.weight_out_in(model.get_submodule(spec.module_name(0, rel)))
        assert w.shape[1] == hidden
    assert seen[spec.unembed_name(model)][1] == tuple(logits.shape)
    assert seen[spec.final_norm][1] == (2, 7, hidden)

    # block_of: every block parameter maps to its block, others to None
    for pname, _ in model.named_parameters():
        b = spec.block_of(pname)
        assert (b is not None) == pname.startswith(spec.blocks + ".")
        if b is not None:
            assert pname.startswith(f"{spec.blocks}.{b}.")
    assert spec.block_of(f"base_model.model.{spec.blocks}.2.{spec.mlp_out}.lora_A.default.weight") == 2

    # LoRA targets name real linear leaves; tied weights detected
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(spec.lora_targets) <= leaves
    assert spec.is_tied(model) == bool(getattr(cfg, "tie_word_embeddings", False))


def test_unknown_architecture_error_is_one_clear_line():
    from transformers import BertConfig

    with pytest.raises(UnsupportedArchitectureError) as e:
        get_arch(BertConfig())
    msg = str(e.value)
    assert "\n" not in msg
    assert "'bert'" in msg and "llama" in msg and "gpt2" in msg and "register_arch" in msg


def test_registry_rejects_duplicates_and_accepts_new_specs():
    reg = ArchRegistry(tuple(ARCHS[t] for t in ("llama",)))
    with pytest.raises(ValueError):
        reg.register(ARCHS["llama"])
    custom = ArchSpec(**{**ARCHS["llama"].__dict__, "name": "mine", "model_types": ("mine",)})
    reg.register(custom)
    assert reg["mine"].name == "mine"
    assert "mine" not in ARCHS  # the global registry is untouched
