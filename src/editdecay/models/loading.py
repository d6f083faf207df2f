"""``load_model``: hub ids, local directories, GGUF files and embedded models.

GGUF files are dequantised once and cached as fp32 safetensors (plus config and
tokenizer) under ``<cache root>/models/<key>``, keyed by the file's SHA-256, so later
loads take about a second instead of tens of seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from ..cache import atomic_dir, cache_root, file_sha256
from ..errors import ModelLoadError
from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
IDENTITY_ATTR = "editdecay_identity"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """float32 unless asked otherwise (bf16 matmuls are very slow on CPUs)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as given, else CUDA when available, else CPU (``auto``: the same)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def place_model(model: nn.Module, device: str | torch.device | None) -> nn.Module:
    """Move the model to ``device``; ``auto`` spreads it over all visible GPUs with
    accelerate (whole transformer blocks per device) when there are several, else it
    is the single best device."""
    if str(device) == "auto" and torch.cuda.device_count() > 1:
        from accelerate import dispatch_model, infer_auto_device_map

        from .arch import get_arch

        block = type(get_arch(model).get_blocks(model)[0]).__name__
        device_map = infer_auto_device_map(model, no_split_module_classes=[block])
        return dispatch_model(model, device_map=device_map)
    return model.to(resolve_device(device))


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)``.

    ``name_or_path`` is an embedded model name (default ``smollm2-135m-instruct-q4_1``),
    a local directory, a ``.gguf`` file, or a Hugging Face hub id. The model is in eval
    mode on ``device`` (CUDA if available, else CPU; ``auto`` spreads it over several
    GPUs through accelerate, see :func:`place_model`) in ``dtype`` (default float32). The
    tokenizer pads on the right and has a pad token (EOS if it had none). The model
    carries a stable identity string (see :func:`model_identity`). ``use_cache=False``
    skips the GGUF cache (always dequantises, writes nothing).
    """
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    torch_dtype = resolve_dtype(dtype)
    t0 = time.perf_counter()

    if name in EMBEDDED_MODELS:
        em = EMBEDDED_MODELS[name]
        gguf_path, version = em.locate()
        model, tok, identity = _load_gguf(
            gguf_path, torch_dtype, cache_dir, use_cache,
            label=f"{em.name}@{em.distribution}-{version}",
        )
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tok, identity = _load_gguf(path, torch_dtype, cache_dir, use_cache, label=f"gguf:{path.name}")
        elif path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if not (path / "config.json").exists() and len(ggufs) == 1:
                model, tok, identity = _load_gguf(ggufs[0], torch_dtype, cache_dir, use_cache, label=f"gguf:{ggufs[0].name}")
            else:
                model, tok = _from_pretrained(str(path), torch_dtype, trust_remote_code, what="model directory")
                identity = None
        elif path.exists():
            raise ModelLoadError(f"cannot load model {name!r}: not a directory or a .gguf file")
        elif _looks_like_path(name):
            raise ModelLoadError(f"model path {name!r} does not exist")
        else:
            model, tok = _from_pretrained(name, torch_dtype, trust_remote_code, what="hub model")
            identity = None

    place_model(model, device)
    model.eval()
    if identity is not None:
        setattr(model, IDENTITY_ATTR, identity)
    _prepare_tokenizer(tok)
    log.info("loaded %s in %.1f s (%s, %s)", name, time.perf_counter() - t0, device or "default device", torch_dtype)
    return model, tok


def model_identity(model: nn.Module) -> str:
    """A stable identity for cache keys: name plus weights hash.

    Models from :func:`load_model` of GGUF files carry one (wheel version + GGUF hash);
    for others it is computed once from the parameters and memoised on the model.
    """
    ident = getattr(model, IDENTITY_ATTR, None)
    if ident is None:
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(str(v.dtype).encode())
            h.update(v.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        src = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        ident = f"{Path(str(src)).name}+{h.hexdigest()[:16]}"
        setattr(model, IDENTITY_ATTR, ident)
    return ident


# --- internals -------------------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or os.sep != "/" and os.sep in name
    )


def _from_pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - reported as one line naming the model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (
            f"not an embedded model ({', '.join(EMBEDDED_MODELS)}), not an existing local path, "
            "and the hub could not provide it"
            if what == "hub model" else "the directory is not a loadable transformers model"
        )
        raise ModelLoadError(f"cannot load {what} {name!r}: {hint} ({first})") from e
    return model, tok


def _load_gguf(path: Path, dtype: torch.dtype, cache_dir, use_cache: bool, label: str):
    """Load a GGUF file, through the fp32 safetensors cache when ``use_cache``."""
    sha = file_sha256(path)
    identity = f"{label}+sha256:{sha[:16]}"
    if not use_cache:
        model, tok = _dequantise(path)
        return model.to(dtype), tok, identity
    entry = cache_root(cache_dir) / "models" / f"{path.stem}-{sha[:16]}"
    if not (entry / "identity.json").exists():
        model, tok = _dequantise(path)
        with atomic_dir(entry) as tmp:
            _write_model_dir(model, tok, tmp, {"identity": identity, "gguf_file": str(path), "gguf_sha256": sha})
        log.info("cached dequantised weights of %s in %s", path.name, entry)
        return model.to(dtype), tok, identity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(entry))
        model = AutoModelForCausalLM.from_pretrained(str(entry), dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(
            f"the model cache entry {entry} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); delete it to rebuild"
        ) from e
    return model, tok, identity


def _dequantise(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s (once; later loads use the cache)", path.name)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load GGUF file {str(path)!r}: {first}") from e
    return model, tok


def save_model(model: nn.Module, tokenizer, out: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write a loadable model directory (config, tokenizer, safetensors weights in their
    current dtype, ``identity.json``) atomically; returns its path."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"cannot save the model to {out}: the directory is not empty")
    if out.exists():
        out.rmdir()
    with atomic_dir(out) as tmp:
        _write_model_dir(model, tokenizer, tmp, {"identity": model_identity(model), **(meta or {})}, keep_dtype=True)
    return out


def _write_model_dir(model: nn.Module, tok, out: Path, meta: dict, keep_dtype: bool = False) -> None:
    """Write config, tokenizer and fp32 weights (shared tensors stored once)."""
    from safetensors.torch import save_file

    seen: dict[int, str] = {}
    tensors = {}
    for k, v in model.state_dict().items():
        ptr = v.data_ptr()
        if ptr in seen:  # tied weights: keep the first name (the embedding)
            continue
        seen[ptr] = k
        tensors[k] = (v.detach() if keep_dtype else v.detach().to(torch.float32)).cpu().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "identity.json").write_text(json.dumps(meta, indent=2))


def _prepare_tokenizer(tok) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
