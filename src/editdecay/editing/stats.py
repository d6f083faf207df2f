"""Second-moment statistics C = E[k kᵀ] of the rewrite module's input keys.

ROME, MEMIT and AlphaEdit need, per edited layer l, the uncentred second moment of the
keys k — the inputs of the MLP output projection (``spec.rewrite_module_name(l)``) —
over a text corpus. :func:`second_moments` computes it for **all requested layers in
one pass**: a forward pre-hook on each layer's rewrite module accumulates Σ k kᵀ in
float64, and the forward is stopped inside the highest requested layer, so the blocks
above it (and the unembedding) never run.

Token plan (deterministic, independent of ``batch_size``): documents in corpus order
are tokenized with the tokenizer's defaults and cut into consecutive chunks of at most
``max_length`` tokens (a leading BOS, when the tokenizer adds one, is repeated at the
start of every chunk); chunks are taken in order until exactly ``tokens`` tokens are
planned (the last chunk is cut — causal attention makes its kept keys identical to
those of the full chunk). ``max_length`` is capped at the model's maximum positions
but never defaults to it (EasyEdit#470). Chunks are sorted by length for batching and
right-padded; real positions are selected by explicit lengths, never by pad id.

**Corpus exhaustion is an error**: when the corpus holds fewer tokens than the budget,
:class:`DataError` says how many were available, before any forward pass. A
silently smaller sample would be recorded under a cache key claiming the full budget.

:class:`StatsCache` stores one safetensors file per (model identity, layer, corpus id +
sha256, tokens, max length, dtype), with these fields as metadata; :func:`import_npz`
reads a published ROME/MEMIT ``.npz`` (``mom2.mom2`` = Σ k kᵀ, ``mom2.count``) without
pickle and can store it as such an entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import re
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..cache import cache_root, file_sha256
from ..errors import DataError, EditdecayError
from ..models.arch import get_arch
from ..models.loading import IDENTITY_ATTR, model_identity
from .corpus import Corpus

log = logging.getLogger(__name__)

FORMAT = "editdecay-stats/1"
DEFAULT_TOKEN_MULTIPLE = 20
DEFAULT_MAX_LENGTH = 256
_MAX_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
_TOKENIZE_GROUP = 64


# --- result and key types --------------------------------------------------------------

@dataclass(frozen=True)
class StatsKey:
    """Everything a cached second moment depends on (one layer)."""

    model: str = field(metadata={"help": "Model identity (editdecay.models.model_identity); '' if unknown (no cache used)."})
    layer: int = field(metadata={"help": "Block index (0-based)."})
    corpus_id: str = field(metadata={"help": "Corpus id."})
    corpus_sha256: str = field(metadata={"help": "Corpus content hash (or the source file's hash for imports)."})
    tokens: int = field(metadata={"help": "Number of key vectors averaged."})
    max_length: int = field(metadata={"help": "Effective chunk length in tokens."})
    dtype: str = field(metadata={"help": "Dtype of the keys (the rewrite module's weight dtype), e.g. 'float32'."})

    def metadata(self) -> dict[str, str]:
        """The key as safetensors metadata (all strings)."""
        return {k: str(v) for k, v in asdict(self).items()}

    def digest(self) -> str:
        """SHA-256 of the key's canonical JSON."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class LayerStats:
    """C = E[k kᵀ] (float64, [d_k, d_k]) of one layer over ``count`` keys."""

    layer: int
    mom2: torch.Tensor = field(repr=False)
    count: int
    key: StatsKey | None = None
    cached: bool = False
    path: Path | None = None

    @property
    def d_k(self) -> int:
        return int(self.mom2.shape[0])

    @property
    def trace(self) -> float:
        """tr C = E[‖k‖²]."""
        return float(self.mom2.diagonal().sum())


# --- helpers ---------------------------------------------------------------------------

def rewrite_module(model: nn.Module, layer: int) -> nn.Module:
    """The rewrite module (MLP output projection) of block ``layer``."""
    spec = get_arch(model)
    n = spec.num_blocks(model)
    try:
        layer = operator.index(layer)
    except TypeError:
        raise EditdecayError(f"layer must be an integer, got {layer!r}") from None
    if not 0 <= layer < n:
        raise EditdecayError(f"layer {layer!r} is out of range: the model has {n} blocks (0 … {n - 1})")
    return model.get_submodule(spec.rewrite_module_name(layer))


def key_width(model: nn.Module, layer: int) -> int:
    """d_k: the input width of the rewrite module of block ``layer``."""
    return int(get_arch(model).weight_out_in(rewrite_module(model, layer)).shape[1])


def effective_max_length(model: nn.Module, max_length: int = DEFAULT_MAX_LENGTH) -> int:
    """``max_length`` capped at the model's maximum positions (when its config names them)."""
    if max_length < 2:
        raise EditdecayError(f"max_length must be at least 2 tokens, got {max_length}")
    config = getattr(model, "config", None)
    for attr in _MAX_POSITION_ATTRS:
        cap = getattr(config, attr, None)
        if isinstance(cap, int) and cap > 0:
            if max_length > cap:
                log.info("max_length %d capped at the model's %s = %d", max_length, attr, cap)
                return cap
            break
    return max_length


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _slug(s: str, n: int) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", s).strip("._")[:n] or "x"


def _normalise_layers(layers: int | Iterable[int]) -> list[int]:
    try:
        out = [operator.index(layers)] if not isinstance(layers, Iterable) else [operator.index(x) for x in layers]
    except TypeError:
        raise EditdecayError(f"layers must be integers, got {layers!r}") from None
    if not out:
        raise EditdecayError("no layers requested")
    return sorted(set(out))


# --- cache -----------------------------------------------------------------------------

class StatsCache:
    """Second moments on disk: ``<cache root>/stats/<model>/<layer-…>.safetensors``.

    One file per :class:`StatsKey`; the key's fields, ``count``, ``d_k`` and the
    format tag are stored as safetensors metadata and checked on load (a mismatching or
    unreadable file counts as a miss and is overwritten). Writes are atomic (temporary
    file, then rename).
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = cache_root(root) / "stats"

    def __repr__(self) -> str:
        return f"StatsCache({str(self.root)!r})"

    def path(self, key: StatsKey) -> Path:
        """Where the entry for ``key`` lives (it may not exist)."""
        model_dir = f"{_slug(key.model, 48)}-{hashlib.sha256(key.model.encode()).hexdigest()[:10]}"
        name = (
            f"layer{key.layer:03d}-{_slug(key.corpus_id, 40)}-n{key.tokens}-len{key.max_length}-"
            f"{key.dtype}-{key.digest()[:12]}.safetensors"
        )
        return self.root / model_dir / name

    def __contains__(self, key: StatsKey) -> bool:
        return self.load(key) is not None

    def load(self, key: StatsKey, device: str | torch.device | None = None) -> LayerStats | None:
        """The cached stats for ``key``, or None on a miss."""
        p = self.path(key)
        if not p.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                mom2 = f.get_tensor("mom2")
        except Exception as e:  # noqa: BLE001 - corrupt file: recompute
            log.warning("unreadable stats cache entry %s (%s): recomputing", p, e)
            return None
        want = key.metadata()
        bad = [k for k, v in want.items() if meta.get(k) != v]
        if meta.get("format") != FORMAT:
            bad.append("format")
        if (mom2.dtype != torch.float64 or mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]
                or meta.get("count") != str(key.tokens)):
            bad.append("tensor")
        if bad:
            log.warning("stats cache entry %s does not match its key (%s): recomputing", p, ", ".join(bad))
            return None
        if device is not None:
            mom2 = mom2.to(device)
        return LayerStats(layer=key.layer, mom2=mom2, count=int(meta["count"]), key=key, cached=True, path=p)

    def save(self, key: StatsKey, mom2: torch.Tensor, count: int) -> Path:
        """Store C (float64, [d_k, d_k], the mean over ``count`` keys) for ``key``."""
        from safetensors.torch import save_file

        if count != key.tokens:
            raise ValueError(f"count {count} differs from the key's token budget {key.tokens}")
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
        meta = {**key.metadata(), "format": FORMAT, "count": str(count), "d_k": str(mom2.shape[0])}
        try:
            save_file({"mom2": mom2.detach().to("cpu", torch.float64).contiguous()}, str(tmp), metadata=meta)
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("cached second moment of layer %d in %s", key.layer, p)
        return p


# --- the token plan --------------------------------------------------------------------

def _chunks(ids: list[int], max_length: int, bos: int | None) -> Iterator[list[int]]:
    prefix = ids[:1] if bos is not None and ids and ids[0] == bos else []
    body = ids[len(prefix):]
    step = max_length - len(prefix)
    for i in range(0, len(body), step):
        yield prefix + body[i:i + step]


def _groups(it: Iterable[str], n: int) -> Iterator[list[str]]:
    group: list[str] = []
    for x in it:
        group.append(x)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def plan_tokens(tokenizer, corpus: Corpus, max_length: int, budget: int) -> list[list[int]]:
    """Token chunks (corpus order) holding exactly ``budget`` tokens; raises
    :class:`DataError` (with the number available) when the corpus is too small."""
    seqs: list[list[int]] = []
    total = 0
    bos = getattr(tokenizer, "bos_token_id", None)
    for group in _groups(corpus, _TOKENIZE_GROUP):
        for ids in tokenizer(group, verbose=False)["input_ids"]:
            for chunk in _chunks(list(ids), max_length, bos):
                take = min(len(chunk), budget - total)
                seqs.append(chunk[:take])
                total += take
                if total == budget:
                    return seqs
    raise DataError(
        f"corpus {corpus.id!r} has only {total} tokens (documents cut into chunks of at most {max_length}) "
        f"but {budget} were requested: lower the token budget to at most {total} or use a larger corpus"
    )


# --- the pass --------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised inside the highest requested layer to end the forward early."""


def _collect(model: nn.Module, tokenizer, layers: list[int], budgets: dict[int, int], corpus: Corpus,
             max_length: int, batch_size: int, progress: bool) -> dict[int, torch.Tensor]:
    """Σ k kᵀ / n for every layer in ``layers`` in one pass over the planned tokens."""
    from tqdm import tqdm

    seqs = plan_tokens(tokenizer, corpus, max_length, max(budgets.values()))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # stable: ties in corpus order
    modules = {l: rewrite_module(model, l) for l in layers}
    acc: dict[int, torch.Tensor] = {}  # allocated where the keys arrive (offloaded weights sit on 'meta')
    remaining = dict(budgets)
    top = max(layers)
    masks: dict[torch.device, torch.Tensor] = {}

    def make_hook(l: int):
        def hook(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            mask = masks.get(x.device)
            if mask is None:
                mask = masks[x.device] = next(iter(masks.values())).to(x.device)
            if x.shape[:2] != mask.shape:
                raise EditdecayError(
                    f"rewrite module of layer {l} got input of shape {tuple(x.shape)}; expected "
                    f"[batch, positions, d_k] with batch × positions = {tuple(mask.shape)}"
                )
            if remaining[l] > 0:
                k = x[mask][: remaining[l]].to(torch.float64)
                if l not in acc:
                    acc[l] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=k.device)
                acc[l].addmm_(k.T, k)
                remaining[l] -= k.shape[0]
            if l == top:
                raise _StopForward
        return hook

    in_dev = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    handles = [m.register_forward_pre_hook(make_hook(l), with_kwargs=True) for l, m in modules.items()]
    was_training = model.training
    model.eval()
    bar = tqdm(total=max(budgets.values()), unit="tok", disable=not progress, dynamic_ncols=True,
               desc=f"second moments, layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))}")
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [seqs[i] for i in order[start:start + batch_size]]
                lengths = torch.tensor([len(s) for s in batch])
                width = int(lengths.max())
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                for i, s in enumerate(batch):
                    ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
                attn = (torch.arange(width)[None, :] < lengths[:, None])
                masks.clear()
                masks[in_dev] = attn.to(in_dev)
                try:
                    model(input_ids=ids.to(in_dev), attention_mask=attn.long().to(in_dev), use_cache=False)
                except _StopForward:
                    pass
                else:  # pragma: no cover - the hook on the top layer always fires
                    raise RuntimeError(f"the forward never reached layer {top}")
                bar.update(int(lengths.sum()))
    finally:
        bar.close()
        for h in handles:
            h.remove()
        model.train(was_training)
    short = {l: r for l, r in remaining.items() if r != 0}
    if short:  # pragma: no cover - the plan holds exactly the budget
        raise RuntimeError(f"token accounting failed: {short}")
    return {l: acc[l] / budgets[l] for l in layers}


def layer_stats(
    model: nn.Module,
    tokenizer,
    layers: int | Iterable[int],
    corpus: Corpus | None = None,
    *,
    tokens: int | None = None,
    token_multiple: int = DEFAULT_TOKEN_MULTIPLE,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 8,
    cache: StatsCache | None = None,
    progress: bool = True,
) -> dict[int, LayerStats]:
    """Second moments with their counts, keys and cache status, per layer.

    Same arguments as :func:`second_moments`. Cached layers are loaded; all missing
    layers are computed in one pass and then stored.
    """
    layers = _normalise_layers(layers)
    corpus = corpus if corpus is not None else Corpus.offline_default()
    if batch_size < 1:
        raise EditdecayError(f"batch_size must be at least 1, got {batch_size}")
    if tokens is not None and tokens < 1:
        raise EditdecayError(f"tokens must be at least 1, got {tokens}")
    if tokens is None and token_multiple < 1:
        raise EditdecayError(f"token_multiple must be at least 1, got {token_multiple}")
    max_len = effective_max_length(model, max_length)
    # with no cache, don't hash all weights just for the record: use a memoised identity if any
    ident = model_identity(model) if cache is not None else (getattr(model, IDENTITY_ATTR, None) or "")
    keys, devices = {}, {}
    for l in layers:
        m = rewrite_module(model, l)
        d_k = key_width(model, l)
        devices[l] = m.weight.device if m.weight.device.type != "meta" else torch.device("cpu")
        keys[l] = StatsKey(model=ident, layer=l, corpus_id=corpus.id, corpus_sha256=corpus.sha256,
                           tokens=tokens if tokens is not None else token_multiple * d_k,
                           max_length=max_len, dtype=_dtype_name(m.weight.dtype))
    out: dict[int, LayerStats] = {}
    if cache is not None:
        for l in layers:
            hit = cache.load(keys[l], device=devices[l])
            if hit is not None:
                if hit.d_k != key_width(model, l):
                    log.warning("cached stats %s have d_k %d, the model %d: recomputing", hit.path, hit.d_k, key_width(model, l))
                    continue
                out[l] = hit
                log.info("layer %d: second moment from cache %s", l, hit.path)
    missing = [l for l in layers if l not in out]
    if missing:
        log.info("computing second moments of layers %s over %s (%s tokens each, max length %d)",
                 missing, corpus.id, sorted({keys[l].tokens for l in missing}), max_len)
        moms = _collect(model, tokenizer, missing, {l: keys[l].tokens for l in missing}, corpus,
                        max_len, batch_size, progress)
        for l in missing:
            path = cache.save(keys[l], moms[l], keys[l].tokens) if cache is not None else None
            out[l] = LayerStats(layer=l, mom2=moms[l], count=keys[l].tokens, key=keys[l], cached=False, path=path)
    return {l: out[l] for l in layers}


def second_moments(
    model: nn.Module,
    tokenizer,
    layers: int | Iterable[int],
    corpus: Corpus | None = None,
    *,
    tokens: int | None = None,
    token_multiple: int = DEFAULT_TOKEN_MULTIPLE,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 8,
    cache: StatsCache | None = None,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] (float64, [d_k, d_k], on the layer's device) per requested layer.

    ``k`` = input of the rewrite module at every real token position; exactly
    ``tokens`` keys per layer (default ``token_multiple × d_k``) from ``corpus``
    (default :meth:`Corpus.offline_default`), chunked to ``max_length`` tokens (capped at
    the model's maximum positions), ``batch_size`` chunks per forward. All layers not
    in ``cache`` are computed in one pass stopped inside the highest of them. Raises
    :class:`DataError` when the corpus has fewer tokens than the budget.
    """
    res = layer_stats(model, tokenizer, layers, corpus, tokens=tokens, token_multiple=token_multiple,
                      max_length=max_length, batch_size=batch_size, cache=cache, progress=progress)
    return {l: s.mom2 for l, s in res.items()}


# --- ROME / MEMIT .npz import ----------------------------------------------------------

def import_npz(
    path: str | os.PathLike,
    *,
    cache: StatsCache | None = None,
    model: nn.Module | str | None = None,
    layer: int | None = None,
    corpus_id: str = "rome-wikipedia",
    max_length: int | None = None,
    dtype: str = "float32",
) -> LayerStats:
    """Read a ROME/MEMIT second-moment file (``mom2.mom2`` = Σ k kᵀ, ``mom2.count``; a
    bare ``mom2``/``count`` pair is accepted too) without pickle; C = mom2 / count.

    With ``cache``, the result is also stored as an entry keyed by ``model`` (a model or
    its identity string), ``layer``, ``corpus_id``, the ``.npz`` file's SHA-256 as the
    corpus hash, ``tokens = count``, ``max_length`` (what the statistics were computed
    with: ROME used the model's context, 1024 for GPT-2 XL) and ``dtype``. Read it back
    with ``second_moments(..., Corpus.external(key.corpus_id, key.corpus_sha256),
    tokens=key.tokens, max_length=key.max_length, cache=cache)``.
    """
    import numpy as np

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"statistics file {str(p)!r} does not exist")
    try:
        npz = np.load(p, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{p}: not a readable .npz file ({e})") from None
    if not hasattr(npz, "files"):
        raise DataError(f"{p}: a single array, not an .npz archive with keys 'mom2.mom2' and 'mom2.count'")
    with npz:
        files = set(npz.files)
        for prefix in ("mom2.", ""):
            if f"{prefix}mom2" in files and f"{prefix}count" in files:
                break
        else:
            raise DataError(
                f"{p}: no second-moment statistics: expected keys 'mom2.mom2' and 'mom2.count' "
                f"(ROME/MEMIT layout), found {', '.join(sorted(files)) or 'none'}"
            )
        arrays = {}
        for name in ("mom2", "count"):
            try:
                arrays[name] = npz[prefix + name]
            except ValueError as e:
                if "pickle" in str(e).lower():
                    raise DataError(f"{p}: key {prefix + name!r} is a pickled object array; refusing to unpickle") from None
                raise DataError(f"{p}: key {prefix + name!r} is unreadable ({e})") from None
    m, c = arrays["mom2"], arrays["count"]
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.dtype.kind not in "fiu":
        raise DataError(f"{p}: key {prefix + 'mom2'!r} has shape {m.shape} and dtype {m.dtype}; expected a square numeric matrix")
    if c.size != 1 or c.dtype.kind not in "fiu" or float(c.reshape(())) <= 0 or float(c.reshape(())) != int(c.reshape(())):
        raise DataError(f"{p}: key {prefix + 'count'!r} must be one positive integer, got {c!r}")
    count = int(c.reshape(()))
    mom2 = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float64)) / count
    if not torch.isfinite(mom2).all():
        raise DataError(f"{p}: key {prefix + 'mom2'!r} contains NaN or infinite values")
    if cache is None:
        return LayerStats(layer=layer if layer is not None else -1, mom2=mom2, count=count)
    if model is None or layer is None or max_length is None:
        raise EditdecayError("import_npz with a cache needs model, layer and max_length (to build the cache key)")
    if isinstance(model, nn.Module):
        d_k = key_width(model, layer)
        if d_k != mom2.shape[0]:
            raise DataError(f"{p}: statistics have d_k {mom2.shape[0]} but layer {layer} of the model has d_k {d_k}")
        ident = model_identity(model)
    else:
        ident = str(model)
    key = StatsKey(model=ident, layer=layer, corpus_id=corpus_id, corpus_sha256=file_sha256(p),
                   tokens=count, max_length=max_length, dtype=dtype)
    out = cache.save(key, mom2, count)
    return LayerStats(layer=layer, mom2=mom2, count=count, key=key, cached=False, path=out)


__all__ = [
    "Corpus", "LayerStats", "StatsCache", "StatsKey", "second_moments", "layer_stats",
    "import_npz", "effective_max_length", "key_width", "rewrite_module", "plan_tokens",
    "DEFAULT_TOKEN_MULTIPLE", "DEFAULT_MAX_LENGTH",
]
