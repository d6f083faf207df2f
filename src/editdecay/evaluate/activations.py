"""Activation drift between model stages (seed 001, Eq. 2–6; Fig. 3).

For each prompt and transformer block ``l``, ``h^l`` is the block's residual output
(the hidden state the block hands to the next one) at the prompt's last real token, or
at the subject's last token with ``position="subject_last"``. Four models with the
same tokenizer take part: ``base``, ``edited`` (base after editing), ``finetuned``
(base after fine-tuning, no edit) and ``edited_finetuned`` (edited, then fine-tuned).
The displacements are

- Δed    = h_edited − h_base             (what the edit changed)
- Δft    = h_finetuned − h_base          (what fine-tuning alone changes)
- Δed_ft = h_edited_finetuned − h_edited (what fine-tuning changed in the edited model)

and :func:`drift` reports, per block, their L2 norms (mean over prompts, and per
prompt) and the cosines cos(Δed, Δft), cos(Δed_ft, Δft), cos(Δed_ft, Δed), each
``a·b / (‖a‖‖b‖ + ε)`` with ε = 1e-8 (0, never NaN, when a displacement is zero),
averaged over prompts. A negative cos(Δed_ft, Δed) means fine-tuning pushes the states
back against the edit.

LoRA/DoRA models are measured merged (seed 001): a peft model is replaced by
:func:`merged`, a merged copy (the input is not modified; the copy costs one model's
memory — pass models merged already to avoid it).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..editing.core import _pad, _Stop, fill, subject_last_index
from ..models.arch import get_arch

POSITIONS = ("last", "subject_last")

#: Keys of :attr:`DriftResult.norms` and their (minuend, subtrahend) stages.
NORM_PAIRS: dict[str, tuple[str, str]] = {
    "edited_vs_base": ("edited", "base"),
    "finetuned_vs_base": ("finetuned", "base"),
    "edited_finetuned_vs_edited": ("edited_finetuned", "edited"),
}
#: Keys of :attr:`DriftResult.cosines` and the displacement pair (keys of NORM_PAIRS).
COSINE_PAIRS: dict[str, tuple[str, str]] = {
    "ed_ft": ("edited_vs_base", "finetuned_vs_base"),
    "edft_ft": ("edited_finetuned_vs_edited", "finetuned_vs_base"),
    "edft_ed": ("edited_finetuned_vs_edited", "edited_vs_base"),
}


# --- helpers shared with tracing -----------------------------------------------------------
def is_peft(model: nn.Module) -> bool:
    """True for a peft wrapper (``PeftModel``)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def merged(model: nn.Module) -> nn.Module:
    """``model`` with its LoRA/DoRA adapters merged into the weights.

    A peft model is deep-copied and ``merge_and_unload()``-ed (the input stays as it
    was); any other model is returned unchanged (not copied)."""
    if is_peft(model):
        return copy.deepcopy(model).merge_and_unload()
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (no dropout) for the block; restore its flag after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def subject_token_range(tokenizer, prompt: str, subject: str) -> tuple[str, int, int]:
    """``(text, start, end)``: the prompt with the subject filled in, and the subject's
    token range ``[start, end)`` in ``tokenizer(text)``.

    ``prompt`` is a template with one ``{}`` or a full text containing ``subject``
    (first occurrence). The last subject token is :func:`subject_last_index`'s (as the
    editors use); the first is the token after the tokens of the text before the
    subject (whitespace-stripped, since a leading space joins the subject's token)."""
    if "{}" in prompt:
        text, end = fill("{}", prompt, subject)
    else:
        at = prompt.find(subject)
        if at < 0 or not subject:
            raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
        text, end = prompt, at + len(subject)
    last = subject_last_index(tokenizer, text, end)
    before = text[: end - len(subject)].rstrip()
    start = len(tokenizer(before)["input_ids"]) if before else len(tokenizer("")["input_ids"])
    start = min(start, last)
    return text, start, last + 1


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


# --- block states --------------------------------------------------------------------------
def block_states(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    position: str = "last",
    subjects: Sequence[str] | None = None,
    batch_size: int = 16,
    *,
    progress: bool = False,
) -> torch.Tensor:
    """Residual output of every block at one token of each prompt: fp32 CPU tensor
    ``[n_prompts, n_blocks, d]``.

    ``position``: ``"last"`` (last real prompt token) or ``"subject_last"`` (needs
    ``subjects``; prompts may be templates with ``{}``). Prompts are tokenised with the
    tokenizer's defaults, sorted by length and right-padded; positions come from the
    token counts, never from the pad id. One forward per batch, stopped after the last
    block. A peft model is measured through :func:`merged`."""
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}: use one of {POSITIONS}")
    if position == "subject_last" and (subjects is None or len(subjects) != len(prompts)):
        raise ValueError("position='subject_last' needs one subject per prompt")
    model = merged(model)
    seqs: list[list[int]] = []
    pos: list[int] = []
    for i, p in enumerate(prompts):
        if position == "subject_last":
            text, _, end = subject_token_range(tokenizer, p, subjects[i])  # type: ignore[index]
            ids = list(tokenizer(text)["input_ids"])
            pos.append(end - 1)
        else:
            ids = list(tokenizer(p)["input_ids"])
            pos.append(len(ids) - 1)
        if not ids:
            raise ValueError(f"prompt {i} tokenises to nothing: {p!r}")
        seqs.append(ids)
    return _states(model, seqs, pos, tokenizer.pad_token_id, batch_size, progress)


@torch.inference_mode()
def _states(model: nn.Module, seqs: list[list[int]], pos: list[int], pad: int | None, batch_size: int,
            progress: bool) -> torch.Tensor:
    blocks = get_arch(model).get_blocks(model)
    n_blocks = len(blocks)
    device = _device(model)
    d = model.get_input_embeddings().weight.shape[1]
    out = torch.empty(len(seqs), n_blocks, d, dtype=torch.float32)
    pad = 0 if pad is None else pad
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    starts = range(0, len(order), batch_size)
    with eval_mode(model):
        for start in tqdm(starts, desc="block states", unit="batch", disable=not progress, leave=False):
            idx = order[start : start + batch_size]
            ids, mask = _pad([seqs[i] for i in idx], pad, device)
            rows = torch.arange(len(idx), device=device)
            cols = torch.tensor([pos[i] for i in idx], device=device)
            got: list[torch.Tensor | None] = [None] * n_blocks

            def make_hook(layer: int, got=got, rows=rows, cols=cols):
                def hook(_m, _a, o):
                    got[layer] = _block_output(o)[rows, cols].float()
                    if layer == n_blocks - 1:
                        raise _Stop

                return hook

            handles = [b.register_forward_hook(make_hook(layer)) for layer, b in enumerate(blocks)]
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            finally:
                for h in handles:
                    h.remove()
            out[torch.tensor(idx)] = torch.stack(got, dim=1).cpu()  # type: ignore[arg-type]
    return out


# --- drift ---------------------------------------------------------------------------------
def _cosine(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def _max_normalise(x: np.ndarray) -> np.ndarray:
    m = float(np.max(x)) if x.size else 0.0
    return x / m if m > 0 else np.zeros_like(x)


@dataclass
class DriftResult:
    """Per-block activation drift (see the module docstring for the definitions).

    Arrays are indexed by block (0-based); ``*_per_prompt`` arrays are
    ``[n_prompts, n_blocks]``. Only the pairs the given models allow are present."""

    position: str
    n_prompts: int
    n_blocks: int
    eps: float = 1e-8
    norms: dict[str, np.ndarray] = field(default_factory=dict)
    """Mean over prompts of ‖h_A − h_B‖₂ per block, keyed as :data:`NORM_PAIRS`."""
    norms_per_prompt: dict[str, np.ndarray] = field(default_factory=dict)
    cosines: dict[str, np.ndarray] = field(default_factory=dict)
    """Mean over prompts of the displacement cosines, keyed as :data:`COSINE_PAIRS`."""
    cosines_per_prompt: dict[str, np.ndarray] = field(default_factory=dict)

    def normalised(self) -> dict[str, np.ndarray]:
        """Each norm curve divided by its own maximum over blocks (all-zero stays 0)."""
        return {k: _max_normalise(v) for k, v in self.norms.items()}

    def to_json(self, per_prompt: bool = False) -> dict:
        """A JSON-serialisable dict (raw and max-normalised curves; per-prompt arrays
        when ``per_prompt``)."""
        d: dict = {
            "position": self.position, "n_prompts": self.n_prompts, "n_blocks": self.n_blocks, "eps": self.eps,
            "norms": {k: v.tolist() for k, v in self.norms.items()},
            "norms_normalised": {k: v.tolist() for k, v in self.normalised().items()},
            "cosines": {k: v.tolist() for k, v in self.cosines.items()},
            "pairs": {k: list(v) for k, v in NORM_PAIRS.items() if k in self.norms},
            "cosine_pairs": {k: list(v) for k, v in COSINE_PAIRS.items() if k in self.cosines},
        }
        if per_prompt:
            d["norms_per_prompt"] = {k: v.tolist() for k, v in self.norms_per_prompt.items()}
            d["cosines_per_prompt"] = {k: v.tolist() for k, v in self.cosines_per_prompt.items()}
        return d


def drift_from_states(
    states: dict[str, torch.Tensor], *, position: str = "last", eps: float = 1e-8
) -> DriftResult:
    """:class:`DriftResult` from precomputed :func:`block_states` keyed by stage
    (``base``, ``edited``, and ``finetuned`` and/or ``edited_finetuned``)."""
    shapes = {k: tuple(v.shape) for k, v in states.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"block states differ in shape: {shapes}")
    n, n_blocks, _ = next(iter(states.values())).shape
    res = DriftResult(position=position, n_prompts=n, n_blocks=n_blocks, eps=eps)
    deltas: dict[str, torch.Tensor] = {}
    for key, (a, b) in NORM_PAIRS.items():
        if a in states and b in states:
            deltas[key] = states[a].double() - states[b].double()
            per = deltas[key].norm(dim=-1).numpy()
            res.norms_per_prompt[key] = per
            res.norms[key] = per.mean(0)
    for key, (a, b) in COSINE_PAIRS.items():
        if a in deltas and b in deltas:
            per = _cosine(deltas[a], deltas[b], eps).numpy()
            res.cosines_per_prompt[key] = per
            res.cosines[key] = per.mean(0)
    return res


def drift(
    base: nn.Module | torch.Tensor,
    edited: nn.Module | torch.Tensor,
    finetuned: nn.Module | torch.Tensor | None,
    edited_finetuned: nn.Module | torch.Tensor | None = None,
    *,
    tokenizer=None,
    prompts: Sequence[str] = (),
    position: str = "last",
    subjects: Sequence[str] | None = None,
    batch_size: int = 16,
    eps: float = 1e-8,
    progress: bool = False,
) -> DriftResult:
    """Per-block activation drift between base, edited, fine-tuned and
    edited-then-fine-tuned models (seed 001 Eq. 2–6; definitions in the module
    docstring).

    Each stage is a model (sharing ``tokenizer``; peft models are merged into a copy)
    or a precomputed ``block_states`` tensor. States are computed once per distinct
    model object. ``finetuned`` or ``edited_finetuned`` may be None (their pairs are
    left out), not both."""
    if finetuned is None and edited_finetuned is None:
        raise ValueError("give finetuned and/or edited_finetuned")
    stages = {"base": base, "edited": edited, "finetuned": finetuned, "edited_finetuned": edited_finetuned}
    seen: dict[int, torch.Tensor] = {}
    states: dict[str, torch.Tensor] = {}
    for name, m in stages.items():
        if m is None:
            continue
        if isinstance(m, torch.Tensor):
            states[name] = m
            continue
        if id(m) not in seen:
            if tokenizer is None or not prompts:
                raise ValueError("tokenizer and prompts are needed to measure models")
            seen[id(m)] = block_states(m, tokenizer, prompts, position, subjects, batch_size, progress=progress)
        states[name] = seen[id(m)]
    return drift_from_states(states, position=position, eps=eps)
