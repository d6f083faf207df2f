"""Architecture registry: where each model family keeps the modules editors and
fine-tuning touch.

An :class:`ArchSpec` names module paths relative to the causal-LM model (``model`` as
returned by :func:`editdecay.load_model`): the transformer block list, the MLP input
and output projections (the output projection is the rewrite module of ROME/MEMIT/
AlphaEdit), attention projections, final norm, embeddings and unembedding. Specs are
looked up by ``config.model_type``; add a family with :func:`register_arch`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Module layout of one model family (paths relative to the CausalLM model)."""

    name: str = field(metadata={"help": "Family name, e.g. 'llama'."})
    model_types: tuple[str, ...] = field(metadata={"help": "config.model_type values served."})
    blocks: str = field(metadata={"help": "Path of the ModuleList of transformer blocks."})
    mlp: str = field(metadata={"help": "MLP submodule, relative to a block."})
    attn: str = field(metadata={"help": "Attention submodule, relative to a block."})
    mlp_in: tuple[str, ...] = field(metadata={"help": "MLP input projections, relative to a block."})
    mlp_out: str = field(metadata={"help": "MLP output (down) projection, relative to a block: the rewrite module."})
    attn_proj: tuple[str, ...] = field(metadata={"help": "Attention projections, relative to a block."})
    final_norm: str = field(metadata={"help": "Final norm before the unembedding."})
    embeddings: tuple[str, ...] = field(metadata={"help": "Token (first) and position embeddings."})
    unembed: str = field(metadata={"help": "Output projection to the vocabulary."})
    conv1d: bool = field(default=False, metadata={"help": "Linear weights stored (in, out) as in GPT-2's Conv1D."})
    lora_targets: tuple[str, ...] = field(default=(), metadata={"help": "Leaf module names LoRA/DoRA adapt by default."})

    # --- navigation -----------------------------------------------------------------
    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of transformer blocks."""
        return model.get_submodule(self.blocks)

    def num_blocks(self, model: nn.Module) -> int:
        return len(self.get_blocks(model))

    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def module_name(self, layer: int, rel: str) -> str:
        """Full module path of ``rel`` (e.g. ``self.mlp_out``) inside block ``layer``."""
        return f"{self.blocks}.{layer}.{rel}"

    def rewrite_module_name(self, layer: int) -> str:
        """The MLP output projection of block ``layer`` (ROME/MEMIT rewrite target)."""
        return self.module_name(layer, self.mlp_out)

    def block_of(self, param_name: str) -> int | None:
        """Block index of a parameter/module name, or None outside the blocks.

        Tolerates wrapper prefixes such as peft's ``base_model.model.``.
        """
        m = re.search(r"(?:^|\.)" + re.escape(self.blocks) + r"\.(\d+)(?:\.|$)", param_name)
        return int(m.group(1)) if m else None

    # --- weights --------------------------------------------------------------------
    def weight_out_in(self, module: nn.Module) -> torch.Tensor:
        """The module's weight as an (out_features, in_features) view (Conv1D transposed)."""
        w = module.weight
        return w.T if self.conv1d else w

    def unembed_name(self, model: nn.Module) -> str:
        """Actual path of the output embedding (tolerates renames across transformers versions)."""
        out = model.get_output_embeddings()
        for name, mod in model.named_modules():
            if mod is out:
                return name
        return self.unembed

    def is_tied(self, model: nn.Module) -> bool:
        """True when the unembedding shares its weight tensor with the token embedding."""
        emb = model.get_submodule(self.embeddings[0]).weight
        out = model.get_output_embeddings().weight
        return emb.data_ptr() == out.data_ptr()


_LLAMA_LIKE = dict(
    blocks="model.layers",
    mlp="mlp",
    attn="self_attn",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn_proj=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    final_norm="model.norm",
    embeddings=("model.embed_tokens",),
    unembed="lm_head",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)

BUILTIN_ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        blocks="transformer.h",
        mlp="mlp",
        attn="attn",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        attn_proj=("attn.c_attn", "attn.c_proj"),
        final_norm="transformer.ln_f",
        embeddings=("transformer.wte", "transformer.wpe"),
        unembed="lm_head",
        conv1d=True,
        lora_targets=("c_attn", "c_proj", "c_fc"),
    ),
    ArchSpec(
        name="gptj",
        model_types=("gptj",),
        blocks="transformer.h",
        mlp="mlp",
        attn="attn",
        mlp_in=("mlp.fc_in",),
        mlp_out="mlp.fc_out",
        attn_proj=("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
        final_norm="transformer.ln_f",
        embeddings=("transformer.wte",),
        unembed="lm_head",
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
    ),
    ArchSpec(
        name="gpt_neox",
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        mlp="mlp",
        attn="attention",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        attn_proj=("attention.query_key_value", "attention.dense"),
        final_norm="gpt_neox.final_layer_norm",
        embeddings=("gpt_neox.embed_in",),
        unembed="lm_head",  # 'embed_out' before transformers 5: see unembed_name()
        lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    ArchSpec(name="llama", model_types=("llama",), **_LLAMA_LIKE),
    ArchSpec(name="mistral", model_types=("mistral",), **_LLAMA_LIKE),
    ArchSpec(name="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
    ArchSpec(name="qwen3", model_types=("qwen3",), **_LLAMA_LIKE),
)


class ArchRegistry:
    """Maps ``config.model_type`` to :class:`ArchSpec`."""

    def __init__(self, specs: tuple[ArchSpec, ...] = ()) -> None:
        self._by_type: dict[str, ArchSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: ArchSpec, *, overwrite: bool = False) -> None:
        for mt in spec.model_types:
            if mt in self._by_type and not overwrite:
                raise ValueError(f"model_type {mt!r} is already registered (spec {self._by_type[mt].name!r})")
            self._by_type[mt] = spec

    def supported(self) -> list[str]:
        return sorted(self._by_type)

    def __contains__(self, model_type: str) -> bool:
        return model_type in self._by_type

    def __getitem__(self, model_type: str) -> ArchSpec:
        try:
            return self._by_type[model_type]
        except KeyError:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {model_type!r}: supported model types are "
                f"{', '.join(self.supported())}; add one with "
                "editdecay.models.register_arch(ArchSpec(...))"
            ) from None


#: The process-wide registry of architectures (extend with :func:`register_arch`).
ARCHS = ArchRegistry(BUILTIN_ARCHS)


def register_arch(spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Register an :class:`ArchSpec` for its ``model_types``."""
    ARCHS.register(spec, overwrite=overwrite)


def get_arch(model_or_config) -> ArchSpec:
    """The :class:`ArchSpec` of a model, a config, or a ``model_type`` string."""
    if isinstance(model_or_config, str):
        return ARCHS[model_or_config]
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"cannot determine the architecture of {type(model_or_config).__name__}: it has no config.model_type"
        )
    return ARCHS[model_type]
