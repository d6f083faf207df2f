"""Causal tracing (ROME, Meng et al. 2022; seed 001 Figs. 6–7).

For a prompt with a subject: the *clean* run gives the answer (the clean argmax next
token, or a given target's first token) and its probability. The *corrupted* runs add
Gaussian noise ε ~ N(0, σ²) to the token embeddings of the subject tokens (σ = 3 × the
standard deviation of the token-embedding matrix entries unless given; ROME uses 3 ×
the std of subject-token embeddings); ``n_samples`` noise draws (seeded, the same draws
for every restoration) are averaged. A *restoration* copies the clean value of one
state into the corrupted runs at a (token, layer):

- ``overall``: the block's residual output;
- ``mlp``: the MLP output; ``attn``: the attention output — restored over a window of
  ``window`` layers centred as in ROME (``layer - window//2 … layer + ceil(window/2) - 1``,
  clipped), default 10; ``overall`` uses a window of 1.

The score is p(answer) with the restoration; the *restoration effect* (indirect
effect) is score − p_corrupted. Restorations are batched: each is a group of
``n_samples`` corrupted rows of one forward (chunked by ``batch_rows``); clean states
come from one clean forward. Restoring a token before the subject's first token
changes nothing (its clean and corrupted states are equal), so such cells are set to
p_corrupted without running them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..facts.record import FactRecord
from ..models.arch import ArchSpec, get_arch
from .activations import _block_output, _device, eval_mode, merged, subject_token_range
from .metrics import split_target

KINDS = ("overall", "mlp", "attn")
DEFAULT_WINDOW: Mapping[str, int] = {"overall": 1, "mlp": 10, "attn": 10}

#: Single-token positions :func:`trace_facts` can read.
POSITIONS = ("subject_first", "subject_last", "last")

Restoration = Sequence[tuple[int, int]]
"""A set of (token, layer) states restored together."""


def noise_scale(model: nn.Module, factor: float = 3.0) -> float:
    """``factor`` × the std of the token-embedding matrix entries."""
    return factor * float(model.get_input_embeddings().weight.detach().float().std())


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The layers restored for ``layer`` with a window of ``window`` (ROME's rule)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))


def _module_name(spec: ArchSpec, kind: str, layer: int) -> str:
    if kind == "overall":
        return spec.block_name(layer)
    if kind == "mlp":
        return spec.module_name(layer, spec.mlp)
    if kind == "attn":
        return spec.module_name(layer, spec.attn)
    raise ValueError(f"unknown trace kind {kind!r}: use one of {KINDS}")


def _windows(window: int | Mapping[str, int] | None, kinds: Sequence[str]) -> dict[str, int]:
    if window is None:
        return {k: DEFAULT_WINDOW[k] for k in kinds}
    if isinstance(window, int):
        return {k: window for k in kinds}
    return {k: int(window.get(k, DEFAULT_WINDOW[k])) for k in kinds}


class _Tracer:
    """Clean states, answer and noise of one prompt; runs batches of restorations."""

    def __init__(self, model: nn.Module, tokenizer, prompt: str, subject: str, *, target: str | None,
                 n_samples: int, noise: float | None, seed: int, batch_rows: int) -> None:
        if n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        self.model = model
        self.spec = get_arch(model)
        self.n_layers = self.spec.num_blocks(model)
        self.text, self.start, self.end = subject_token_range(tokenizer, prompt, subject)
        self.token_ids = list(tokenizer(self.text)["input_ids"])
        self.device = _device(model)
        self.ids = torch.tensor([self.token_ids], device=self.device)
        self.n_samples = n_samples
        self.batch_rows = batch_rows
        self.sigma = noise_scale(model) if noise is None else float(noise)
        emb = model.get_input_embeddings().weight
        gen = torch.Generator().manual_seed(seed)
        self.noise = (torch.randn(n_samples, self.end - self.start, emb.shape[1], generator=gen) * self.sigma).to(
            self.device, emb.dtype)
        # clean run: every block/MLP/attention output at every token
        self.clean: dict[str, list[torch.Tensor | None]] = {k: [None] * self.n_layers for k in KINDS}
        handles = []
        for kind in KINDS:
            for layer in range(self.n_layers):
                def hook(_m, _a, o, kind=kind, layer=layer):
                    self.clean[kind][layer] = _block_output(o)[0].detach().clone()
                handles.append(model.get_submodule(_module_name(self.spec, kind, layer)).register_forward_hook(hook))
        try:
            probs = self._probs(self.ids)[0]
        finally:
            for h in handles:
                h.remove()
        if target is None:
            self.answer_id = int(probs.argmax())
        else:
            self.answer_id = split_target(tokenizer, self.text, target.strip())[1][0]
        self.clean_prob = float(probs[self.answer_id])
        self.corrupted_prob = float(self.run("overall", [[]])[0])

    def _probs(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
        return self.model.get_output_embeddings()(hidden).float().softmax(-1)

    def run(self, kind: str, restorations: Sequence[Restoration], bar: tqdm | None = None) -> np.ndarray:
        """p(answer) averaged over the noise samples for each restoration."""
        n = self.n_samples
        per = max(1, self.batch_rows // n)
        out = np.empty(len(restorations))
        for c0 in range(0, len(restorations), per):
            chunk = restorations[c0 : c0 + per]
            groups = len(chunk)
            todo: dict[int, tuple[list[int], list[int]]] = {}
            for g, rest in enumerate(chunk):
                for t, layer in rest:
                    if not (0 <= t < len(self.token_ids) and 0 <= layer < self.n_layers):
                        raise ValueError(f"restoration ({t}, {layer}) out of range")
                    todo.setdefault(layer, ([], []))
                    todo[layer][0].append(g)
                    todo[layer][1].append(t)
            handles = []
            noise = self.noise.repeat(groups, 1, 1)

            def add_noise(_m, _a, o, noise=noise):
                o[:, self.start : self.end] += noise

            handles.append(self.model.get_input_embeddings().register_forward_hook(add_noise))
            for layer, (gs, ts) in todo.items():
                g_t = torch.tensor(gs, device=self.device)
                t_t = torch.tensor(ts, device=self.device)
                rows = (g_t[:, None] * n + torch.arange(n, device=self.device)[None]).reshape(-1)
                toks = t_t.repeat_interleave(n)
                value = self.clean[kind][layer][toks]  # type: ignore[index]

                def restore(_m, _a, o, rows=rows, toks=toks, value=value):
                    _block_output(o)[rows, toks] = value

                module = self.model.get_submodule(_module_name(self.spec, kind, layer))
                handles.append(module.register_forward_hook(restore))
            try:
                probs = self._probs(self.ids.expand(groups * n, -1))[:, self.answer_id]
            finally:
                for h in handles:
                    h.remove()
            out[c0 : c0 + groups] = probs.view(groups, n).mean(1).double().cpu().numpy()
            if bar is not None:
                bar.update(groups)
        return out


def _resolve_tokens(tokens: str | Sequence[int], n_tokens: int, start: int, end: int) -> list[int]:
    if isinstance(tokens, str):
        if tokens == "all":
            return list(range(n_tokens))
        if tokens == "subject_last":
            return [end - 1]
        if tokens == "subject_first":
            return [start]
        if tokens == "last":
            return [n_tokens - 1]
        raise ValueError(f"unknown tokens {tokens!r}: use 'all', one of {POSITIONS} or indices")
    return sorted({int(t) for t in tokens})


def _json_array(a: np.ndarray) -> list:
    return [_json_array(x) for x in a] if a.ndim > 1 else [None if np.isnan(x) else float(x) for x in a]


@dataclass
class TraceResult:
    """Causal trace of one prompt (see the module docstring)."""

    text: str
    subject: str
    tokens: list[str]
    token_ids: list[int]
    subject_range: tuple[int, int]
    """Subject tokens ``[start, end)``."""
    answer: str
    answer_id: int
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, np.ndarray]
    """p(answer) with the restoration, ``[n_tokens, n_layers]`` per kind; NaN where not traced."""
    window: dict[str, int]
    n_samples: int
    noise: float
    """σ of the embedding noise."""
    seed: int = 0

    def effect(self, kind: str) -> np.ndarray:
        """Restoration effect p_restored − p_corrupted ``[n_tokens, n_layers]``."""
        return self.scores[kind] - self.corrupted_prob

    def to_json(self) -> dict:
        return {
            "text": self.text, "subject": self.subject, "tokens": self.tokens, "token_ids": self.token_ids,
            "subject_range": list(self.subject_range), "answer": self.answer, "answer_id": self.answer_id,
            "clean_prob": self.clean_prob, "corrupted_prob": self.corrupted_prob,
            "scores": {k: _json_array(v) for k, v in self.scores.items()},
            "window": dict(self.window), "n_samples": self.n_samples, "noise": self.noise, "seed": self.seed,
        }


def restoration_probs(
    model: nn.Module,
    tokenizer,
    prompt: str,
    subject: str,
    restorations: Sequence[Restoration],
    *,
    kind: str = "overall",
    target: str | None = None,
    n_samples: int = 10,
    noise: float | None = None,
    seed: int = 0,
    batch_rows: int = 128,
) -> tuple[np.ndarray, float, float]:
    """p(answer) for arbitrary restorations (each a set of (token, layer) states of
    ``kind`` restored together; an empty set gives p_corrupted). Returns
    ``(probs, clean_prob, corrupted_prob)``."""
    _module_name(get_arch(model), kind, 0)
    model = merged(model)
    with eval_mode(model), torch.inference_mode():
        tr = _Tracer(model, tokenizer, prompt, subject, target=target, n_samples=n_samples, noise=noise,
                     seed=seed, batch_rows=batch_rows)
        return tr.run(kind, restorations), tr.clean_prob, tr.corrupted_prob


def trace(
    model: nn.Module,
    tokenizer,
    prompt: str,
    subject: str,
    *,
    target: str | None = None,
    kinds: Sequence[str] = KINDS,
    tokens: str | Sequence[int] = "all",
    window: int | Mapping[str, int] | None = None,
    n_samples: int = 10,
    noise: float | None = None,
    seed: int = 0,
    batch_rows: int = 128,
    progress: bool = False,
) -> TraceResult:
    """Causal trace of one prompt: restoration scores per (token, layer) for each kind.

    ``prompt`` is a template with ``{}`` or a text containing ``subject``; the answer is
    the clean argmax unless ``target`` is given; ``tokens``: ``"all"``,
    ``"subject_first"``, ``"subject_last"``, ``"last"`` or token indices (others are NaN); ``window``: an int
    for every kind or a mapping per kind (default :data:`DEFAULT_WINDOW`); ``noise``:
    σ (default :func:`noise_scale`). Peft models are traced merged (a copy)."""
    spec = get_arch(model)
    for k in kinds:
        _module_name(spec, k, 0)
    windows = _windows(window, kinds)
    model = merged(model)
    with eval_mode(model), torch.inference_mode():
        tr = _Tracer(model, tokenizer, prompt, subject, target=target, n_samples=n_samples, noise=noise,
                     seed=seed, batch_rows=batch_rows)
        n_tok, n_layers = len(tr.token_ids), tr.n_layers
        toks = _resolve_tokens(tokens, n_tok, tr.start, tr.end)
        run_toks = [t for t in toks if t >= tr.start]
        total = len(run_toks) * n_layers * len(kinds)
        scores: dict[str, np.ndarray] = {}
        with tqdm(total=total, desc="causal trace", unit="restoration", disable=not progress, leave=False) as bar:
            for kind in kinds:
                s = np.full((n_tok, n_layers), np.nan)
                for t in toks:
                    if t < tr.start:
                        s[t] = tr.corrupted_prob
                cells = [(t, layer) for t in run_toks for layer in range(n_layers)]
                rests = [[(t, j) for j in window_layers(layer, windows[kind], n_layers)] for t, layer in cells]
                for (t, layer), p in zip(cells, tr.run(kind, rests, bar)):
                    s[t, layer] = p
                scores[kind] = s
    return TraceResult(
        text=tr.text, subject=subject, tokens=[tokenizer.decode([i]) for i in tr.token_ids], token_ids=tr.token_ids,
        subject_range=(tr.start, tr.end), answer=tokenizer.decode([tr.answer_id]), answer_id=tr.answer_id,
        clean_prob=tr.clean_prob, corrupted_prob=tr.corrupted_prob, scores=scores, window=windows,
        n_samples=n_samples, noise=tr.sigma, seed=seed,
    )


# --- many facts ----------------------------------------------------------------------------
FactLike = FactRecord | tuple[str, str] | tuple[str, str, str | None]


@dataclass
class FactsTrace:
    """Restoration effects at one token (subject-last by default) of many facts."""

    texts: list[str]
    subjects: list[str]
    answers: list[str]
    clean_probs: np.ndarray
    corrupted_probs: np.ndarray
    effects: dict[str, np.ndarray]
    """p_restored − p_corrupted, ``[n_facts, n_layers]`` per kind."""
    position: str
    window: dict[str, int]
    n_samples: int
    noise: float
    seed: int = 0
    traces: list[TraceResult] = field(default_factory=list, repr=False)

    def mean_effect(self) -> dict[str, np.ndarray]:
        """Average restoration effect per layer for each kind."""
        return {k: v.mean(0) for k, v in self.effects.items()}

    def peak_layers(self) -> dict[str, int]:
        """The layer of the largest average effect for each kind."""
        return {k: int(np.argmax(v)) for k, v in self.mean_effect().items()}

    def to_json(self) -> dict:
        return {
            "texts": self.texts, "subjects": self.subjects, "answers": self.answers,
            "clean_probs": self.clean_probs.tolist(), "corrupted_probs": self.corrupted_probs.tolist(),
            "effects": {k: v.tolist() for k, v in self.effects.items()},
            "mean_effect": {k: v.tolist() for k, v in self.mean_effect().items()},
            "peak_layers": self.peak_layers(), "position": self.position, "window": dict(self.window),
            "n_samples": self.n_samples, "noise": self.noise, "seed": self.seed,
        }


def _fact_parts(f: FactLike) -> tuple[str, str, str | None]:
    if isinstance(f, FactRecord):
        return f.prompt, f.subject, None
    if len(f) == 2:
        return f[0], f[1], None
    return f[0], f[1], f[2]  # type: ignore[misc]


def trace_facts(
    model: nn.Module,
    tokenizer,
    facts: Sequence[FactLike],
    *,
    kinds: Sequence[str] = KINDS,
    position: str = "subject_last",
    window: int | Mapping[str, int] | None = None,
    n_samples: int = 10,
    noise: float | None = None,
    seed: int = 0,
    batch_rows: int = 128,
    progress: bool = True,
) -> FactsTrace:
    """Trace each fact at one token (``position``: one of :data:`POSITIONS`) and collect
    the restoration effect per layer (seed 001 Figs. 6–7).

    ``facts``: :class:`FactRecord` (answer = clean argmax), ``(prompt, subject)`` or
    ``(prompt, subject, target)``. σ is computed once for the model (unless given)."""
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}: use one of {POSITIONS}")
    model = merged(model)
    sigma = noise_scale(model) if noise is None else float(noise)
    traces = []
    for f in tqdm(facts, desc="trace facts", unit="fact", disable=not progress):
        prompt, subject, target = _fact_parts(f)
        traces.append(trace(model, tokenizer, prompt, subject, target=target, kinds=kinds, tokens=position,
                            window=window, n_samples=n_samples, noise=sigma, seed=seed, batch_rows=batch_rows))
    rows = [_resolve_tokens(position, len(r.tokens), *r.subject_range)[0] for r in traces]
    effects = {k: np.stack([r.effect(k)[t] for r, t in zip(traces, rows)]) for k in kinds}
    return FactsTrace(
        texts=[r.text for r in traces], subjects=[r.subject for r in traces], answers=[r.answer for r in traces],
        clean_probs=np.array([r.clean_prob for r in traces]), corrupted_probs=np.array([r.corrupted_prob for r in traces]),
        effects=effects, position=position, window=_windows(window, kinds), n_samples=n_samples, noise=sigma,
        seed=seed, traces=traces,
    )


def suggest_edit_layers(
    avg_mlp_effect: Sequence[float] | np.ndarray, n: int = 5, *, min_layer: int = 0
) -> tuple[int, list[int]]:
    """``(peak, layers)`` from an average MLP restoration-effect curve.

    Rule: ``peak`` is the layer of the largest effect among layers ≥ ``min_layer`` (the
    first on ties); ``layers`` is, among the windows of ``n`` consecutive layers that
    contain the peak and lie inside ``[min_layer, n_layers)``, the one with the largest
    summed effect (the earliest on ties); every allowed layer when fewer than ``n``.
    ``min_layer`` keeps early layers out (e.g. 1 where the first MLP, which acts as an
    extended embedding, dominates a windowed curve)."""
    eff = np.asarray(avg_mlp_effect, dtype=float)
    if eff.ndim != 1 or eff.size == 0:
        raise ValueError("avg_mlp_effect must be a non-empty 1-D curve")
    if n < 1:
        raise ValueError("n must be >= 1")
    n_layers = eff.size
    if not 0 <= min_layer < n_layers:
        raise ValueError(f"min_layer must lie in [0, {n_layers})")
    peak = min_layer + int(np.argmax(eff[min_layer:]))
    if n >= n_layers - min_layer:
        return peak, list(range(min_layer, n_layers))
    starts = range(max(min_layer, peak - n + 1), min(peak, n_layers - n) + 1)
    best = max(starts, key=lambda a: (float(eff[a : a + n].sum()), -a))
    return peak, list(range(best, best + n))


# --- figures -------------------------------------------------------------------------------
_CMAPS = {"overall": "Purples", "mlp": "Greens", "attn": "Reds"}
_TITLES = {"overall": "single restored layer (residual)", "mlp": "restored MLP", "attn": "restored attention"}


def heatmap(result: TraceResult, path: str | Path, kinds: Sequence[str] | None = None) -> Path:
    """Write ROME-style heatmaps (token × layer, p(answer) after restoration; subject
    tokens starred) of ``result`` to a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    kinds = list(kinds or result.scores)
    n_tok = len(result.tokens)
    fig = Figure(figsize=(max(6.0, 3.6 * len(kinds) + 1), 0.32 * n_tok + 1.9))
    FigureCanvasAgg(fig)
    s, e = result.subject_range
    labels = [repr(t)[1:-1] + (" *" if s <= i < e else "") for i, t in enumerate(result.tokens)]
    for j, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), j + 1)
        data = np.ma.masked_invalid(result.scores[kind])
        im = ax.imshow(data, aspect="auto", cmap=_CMAPS.get(kind, "viridis"), vmin=result.corrupted_prob,
                       interpolation="nearest")
        ax.set_yticks(range(n_tok))
        ax.set_yticklabels(labels if j == 0 else [""] * n_tok, fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"layer (window {result.window.get(kind, 1)})")
        ax.set_title(_TITLES.get(kind, kind), fontsize=9)
        fig.colorbar(im, ax=ax, label=f"p({result.answer.strip() or result.answer_id})")
    fig.suptitle(f"{result.text!r} → {result.answer!r}\nclean {result.clean_prob:.3f}, corrupted "
                 f"{result.corrupted_prob:.3f} (σ {result.noise:.3g}, {result.n_samples} samples)", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def effect_plot(result: FactsTrace, path: str | Path) -> Path:
    """Write the average restoration effect per layer, one line per kind (seed 001
    Figs. 6–7), to a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = {"overall": "tab:purple", "mlp": "tab:green", "attn": "tab:red"}
    for kind, curve in result.mean_effect().items():
        ax.plot(range(curve.size), curve, label=f"{kind} (window {result.window[kind]})", color=colours.get(kind))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("p(restored) − p(corrupted)")
    ax.set_title(f"average restoration effect at {result.position} token, {len(result.texts)} facts", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
