"""Edit forensics: which blocks of a model were edited, how many edits, which facts.

With the base model known, every weight matrix's difference ΔW = W_suspect − W_base is
taken apart by its singular values. A locate-then-edit method (ROME, MEMIT, AlphaEdit)
leaves a *low-rank* ΔW on the rewrite module (the MLP output projection) of a few
blocks and nothing elsewhere: ROME rank one per edit, MEMIT rank ≤ n per layer for n
facts. Fine-tuning leaves dense (or, for LoRA, rank-r) differences on every trained
module of every trained block. An edit followed by fine-tuning hides in a dense diff;
it still shows as a spectral *outlier*: the top singular value of the edited block's
rewrite-module diff stands far above the same module's diff in the other blocks.

Verdict per block, in order:

1. ``unchanged``: every matrix of the block differs by no more than float round-off.
2. ``edited`` (isolated low-rank): at most half the blocks' rewrite modules changed and
   this block's rewrite diff has numerical rank ≤ ``max_edit_rank_frac`` of its width.
   Score: ``inf`` (no background to compare with).
3. Otherwise (many blocks changed: fine-tuning): ``edited`` when σ₁ of the block's rewrite
   diff is at least ``outlier_ratio`` times the median σ₁ of the other changed blocks'
   rewrite diffs, else ``fine-tuned``. Score: that ratio.
4. Then (fine-tuning only) the window grows from the outlier blocks: a many-layer edit
   (MEMIT) writes the same residual-stream directions at every block of a contiguous
   window, so a *neighbouring* block whose diff has ``outlier_ratio`` times the median
   gain ‖UᵀΔW‖₂ along them (U: the outlier blocks' top output directions) is ``edited``
   too ("shares the edit's directions"), though its own σ₁ sinks in the fine-tuning
   background; far blocks are not followed (a fine-tune can share a direction with the
   edit by chance).

The number of edits is the numerical rank of an isolated edit, or, after fine-tuning,
the larger of the count of singular values above the fine-tuning background and the
block's rank beyond the other blocks' median rank (a LoRA of rank r adds r directions):
exact under a low-rank fine-tune, a lower bound under a dense one (the smallest
directions of a many-fact edit sink below the background). Numerical rank
counts σᵢ above the float round-off of the stored weights, ``10·eps·rms(W)·(√m+√n)``
(W the larger of the two copies), and above ``RTOL·σ₁``.

Candidate facts are matched by their subject key k (the rewrite module's input at the
subject's last token of the plain prompt): ``response = ‖ΔW k‖ / (σ₁‖k‖)``, the share of
the edit's largest gain that k receives; an edit is built to act on its own keys and (by
the C⁻¹ whitening) little on others, so edited subjects rank first.

Without the base, :func:`spectral_anomaly` scores each block's rewrite matrix alone: the
log ratio σ₁/σ₂ of its spectrum against the median of its neighbouring blocks'.

:func:`unedit` subtracts the top singular directions of the rewrite diffs of the edited
blocks: with no fine-tuning on top it restores the base weights within float tolerance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import median
from typing import Sequence

import torch
from torch import nn

from .errors import EditdecayError
from .facts.record import FactRecord
from .models.arch import ArchSpec, get_arch


@dataclass
class ModuleDiff:
    """The difference of one weight matrix (``shape`` as out × in)."""

    name: str
    block: int | None
    rewrite: bool
    shape: tuple[int, int]
    norm: float
    rel_norm: float
    rank: int
    top_sv: list[float] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.rank > 0


@dataclass
class BlockVerdict:
    """What happened to one transformer block."""

    block: int
    verdict: str
    """'edited' | 'fine-tuned' | 'unchanged'."""
    score: float
    """Isolated edit: inf; otherwise σ₁ of the rewrite diff over the other blocks' median."""
    rank: int
    """Numerical rank of the rewrite-module diff."""
    n_edits: int
    """Estimated edits in this block (0 unless 'edited')."""
    changed_modules: list[str]
    signature: str
    """'isolated low-rank' | 'spectral outlier' | "shares the edit's directions" | 'dense' | 'none'."""


@dataclass
class FactMatch:
    case_id: str
    subject: str
    score: float
    """Largest response over the edited blocks (1 = on the edit's top key direction)."""
    block: int | None
    answer_base: str | None = None
    answer_suspect: str | None = None

    @property
    def answer_changed(self) -> bool | None:
        if self.answer_base is None or self.answer_suspect is None:
            return None
        return self.answer_base != self.answer_suspect


@dataclass
class Inspection:
    """The result of :func:`inspect_models`."""

    blocks: list[BlockVerdict]
    modules: list[ModuleDiff]
    settings: dict
    facts: list[FactMatch] = field(default_factory=list)
    base_free: list[dict] = field(default_factory=list)
    deltas: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    """Rewrite-module diffs (out × in) of the edited blocks, for matching and unedit."""

    @property
    def edited_blocks(self) -> list[int]:
        return [b.block for b in self.blocks if b.verdict == "edited"]

    @property
    def n_edits(self) -> int:
        return max((b.n_edits for b in self.blocks), default=0)

    def key_directions(self, block: int, k: int | None = None) -> torch.Tensor:
        """The top ``k`` (default: the estimated edits) right singular vectors of an
        edited block's rewrite diff, as rows [k, d_k]: the directions of the edited keys
        (C⁻¹-whitened for ROME/MEMIT)."""
        if block not in self.deltas:
            raise EditdecayError(f"block {block} is not among the edited blocks {self.edited_blocks}")
        k = k if k is not None else next(b.n_edits for b in self.blocks if b.block == block)
        return torch.linalg.svd(self.deltas[block].double(), full_matrices=False)[2][:k]

    def to_json(self) -> dict:
        def num(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {
            "schema": "editdecay.inspect/1",
            "settings": self.settings,
            "edited_blocks": self.edited_blocks,
            "n_edits": self.n_edits,
            "blocks": [{**asdict(b), "score": num(b.score)} for b in self.blocks],
            "modules": [{**asdict(m), "shape": list(m.shape)} for m in self.modules if m.changed],
            "facts": [{**asdict(f), "answer_changed": f.answer_changed} for f in self.facts],
            "base_free": self.base_free,
        }


def _out_in(spec: ArchSpec, w: torch.Tensor) -> torch.Tensor:
    """A block weight as (out, in); GPT-2's Conv1D stores (in, out)."""
    return w.T if spec.conv1d else w


def noise_floor(w: torch.Tensor, dtype: torch.dtype) -> float:
    """Spectral norm of the round-off a stored ``dtype`` copy of ``w`` carries."""
    m, n = w.shape
    rms = float(w.double().pow(2).mean().sqrt())
    return 10 * torch.finfo(dtype).eps * rms * (math.sqrt(m) + math.sqrt(n))


RTOL = 1e-5
"""Singular values below RTOL·σ₁ count as round-off too: the stored update is rounded
entry by entry, several times (the update's own product, the addition), which puts
σ₂ of a rank-one ROME edit near 1e-6·σ₁ on the embedded model."""


def numerical_rank(sv: torch.Tensor, floor: float) -> int:
    """σᵢ above the absolute round-off ``floor`` and above RTOL·σ₁."""
    if not len(sv):
        return 0
    return int((sv > max(floor, RTOL * float(sv[0]))).sum())


def diff_modules(base: nn.Module, suspect: nn.Module, *, top: int = 16) -> tuple[list[ModuleDiff], dict[int, torch.Tensor]]:
    """Per weight matrix of the transformer blocks: ‖ΔW‖, its rank and top singular
    values. Also returns the rewrite-module diffs (out × in, fp32) by block."""
    spec = get_arch(base)
    if get_arch(suspect) is not spec:
        raise EditdecayError(f"base is {spec.name} but suspect is {get_arch(suspect).name}: compare models of one family")
    bp = dict(base.named_parameters())
    sp = dict(suspect.named_parameters())
    rewrite = {spec.rewrite_module_name(i) + ".weight": i for i in range(spec.num_blocks(base))}
    out, deltas = [], {}
    for name, wb in bp.items():
        block = spec.block_of(name)
        if wb.dim() != 2 or block is None:
            continue
        ws = sp.get(name)
        if ws is None or ws.shape != wb.shape:
            raise EditdecayError(f"suspect has no parameter {name} of shape {tuple(wb.shape)}: not a copy of the base model")
        wb32, ws32 = wb.detach().float().cpu(), ws.detach().float().cpu()
        d = _out_in(spec, ws32 - wb32)
        floor = max(noise_floor(wb32, ws.dtype), noise_floor(ws32, ws.dtype))
        sv = torch.linalg.svdvals(d) if torch.any(d) else torch.zeros(0)
        rank = numerical_rank(sv, floor)
        norm = float(sv.pow(2).sum().sqrt()) if rank else 0.0
        out.append(ModuleDiff(name, block, name in rewrite, tuple(d.shape), norm,
                              norm / max(float(wb32.norm()), 1e-30), rank,
                              [float(s) for s in sv[:top]] if rank else []))
        if name in rewrite and rank:
            deltas[block] = d
    return out, deltas


def block_verdicts(modules: list[ModuleDiff], n_blocks: int, *, outlier_ratio: float = 3.0,
                   max_edit_rank_frac: float = 0.25,
                   deltas: dict[int, torch.Tensor] | None = None) -> list[BlockVerdict]:
    """Verdicts per block from the module diffs (rules in the module docstring);
    ``deltas`` (the rewrite diffs by block) adds the shared-direction pass."""
    by_block: dict[int, list[ModuleDiff]] = {b: [] for b in range(n_blocks)}
    for m in modules:
        by_block[m.block].append(m)
    rw = {b: next((m for m in ms if m.rewrite), None) for b, ms in by_block.items()}
    changed_rw = [b for b, m in rw.items() if m is not None and m.changed]
    isolated = len(changed_rw) <= n_blocks / 2
    sigma1 = {b: rw[b].top_sv[0] for b in changed_rw}
    ranks = {b: rw[b].rank for b in changed_rw}
    verdicts = []
    for b in range(n_blocks):
        ms = by_block[b]
        changed = [m.name for m in ms if m.changed]
        r = rw[b]
        if not changed:
            verdicts.append(BlockVerdict(b, "unchanged", 0.0, 0, 0, [], "none"))
            continue
        if r is None or not r.changed:
            verdicts.append(BlockVerdict(b, "fine-tuned", 0.0, 0, 0, changed, "dense"))
            continue
        if isolated:
            low = r.rank <= max_edit_rank_frac * min(r.shape)
            verdicts.append(BlockVerdict(b, "edited" if low else "fine-tuned", math.inf if low else 0.0, r.rank,
                                         r.rank if low else 0, changed, "isolated low-rank" if low else "dense"))
            continue
        others = [s for o, s in sigma1.items() if o != b]
        bg = median(others) if others else 0.0
        ratio = sigma1[b] / bg if bg > 0 else math.inf
        if ratio >= outlier_ratio:
            n = sum(1 for s in r.top_sv if s >= outlier_ratio * bg) if bg > 0 else r.rank
            n = max(n, r.rank - _background_rank(ranks, b))
            verdicts.append(BlockVerdict(b, "edited", ratio, r.rank, max(n, 1), changed, "spectral outlier"))
        else:
            verdicts.append(BlockVerdict(b, "fine-tuned", ratio, r.rank, 0, changed, "dense"))
    if deltas and not isolated:
        _shared_direction_pass(verdicts, deltas, outlier_ratio, ranks)
    return verdicts


def _background_rank(ranks: dict[int, int], block: int) -> int:
    """The median numerical rank of the other changed blocks' rewrite diffs: a low-rank
    fine-tune (LoRA r) adds that many directions to an edited block's diff, so the rank
    beyond it counts edits (an edit under a dense fine-tune sinks into its full rank)."""
    others = [r for b, r in ranks.items() if b != block]
    return int(median(others)) if others else 0


MAX_SHARED_DIRS = 32
"""At most this many output directions of the outlier blocks are followed into the others."""


def shared_direction_gains(deltas: dict[int, torch.Tensor], seeds: dict[int, int]) -> dict[int, torch.Tensor]:
    """The singular values of Uᵀ ΔW_b (the first is ‖Uᵀ ΔW_b‖₂) for every block b not in
    ``seeds``, U an orthonormal basis of the top ``seeds[s]`` output (left singular)
    directions of each seed block s's diff."""
    cols = []
    for s, n in seeds.items():
        u, _, _ = torch.linalg.svd(deltas[s].double(), full_matrices=False)
        cols.append(u[:, :n])
    q, r = torch.linalg.qr(torch.cat(cols, dim=1)[:, :MAX_SHARED_DIRS])
    q = q[:, r.diagonal().abs() > 1e-6]
    return {b: torch.linalg.svdvals(q.T @ d.double()) for b, d in deltas.items() if b not in seeds}


def _shared_direction_pass(verdicts: list[BlockVerdict], deltas: dict[int, torch.Tensor], outlier_ratio: float,
                           ranks: dict[int, int]) -> None:
    """A many-layer edit (MEMIT, AlphaEdit) writes the same residual-stream directions at
    each block of a contiguous window, but under fine-tuning only its largest blocks stand
    out by σ₁. Grow the window from the outlier blocks: a neighbouring block whose diff
    has ``outlier_ratio`` times the other blocks' median gain along their output
    directions is edited too. Only neighbours: a far block can share a direction by
    chance (the residual stream's outlier dimensions draw edits and fine-tunes alike)."""
    seeds = {v.block: v.n_edits for v in verdicts if v.verdict == "edited" and v.block in deltas}
    if not seeds:
        return
    gains = shared_direction_gains(deltas, seeds)
    ratios, counts = {}, {}
    for b, sv in gains.items():
        others = [float(x[0]) for o, x in gains.items() if o != b]
        bg = median(others) if others else 0.0
        ratios[b] = float(sv[0]) / bg if bg > 0 else math.inf
        counts[b] = int((sv >= outlier_ratio * bg).sum()) if bg > 0 else 1
    window = set(seeds)
    grown = True
    while grown:
        grown = False
        for b in sorted({w + 1 for w in window} | {w - 1 for w in window}):
            v = verdicts[b] if 0 <= b < len(verdicts) else None
            if v is None or b in window or v.verdict != "fine-tuned" or ratios.get(b, 0.0) < outlier_ratio:
                continue
            n = max(counts[b], v.rank - _background_rank(ranks, b))
            verdicts[b] = BlockVerdict(b, "edited", ratios[b], v.rank, max(n, 1), v.changed_modules,
                                       "shares the edit's directions")
            window.add(b)
            grown = True


def match_facts(model: nn.Module, tokenizer, facts: Sequence[FactRecord], deltas: dict[int, torch.Tensor],
                sigma1: dict[int, float]) -> list[FactMatch]:
    """Score candidate facts against the edited blocks' diffs (``sigma1``: each diff's
    largest singular value), best match first."""
    from .editing.core import subject_keys

    best = [(0.0, None)] * len(facts)
    keys = subject_keys(model, tokenizer, facts, list(deltas))
    for b, d in deltas.items():
        k = keys[b].double().cpu()
        resp = (k @ d.double().T).norm(dim=1) / (sigma1[b] * k.norm(dim=1).clamp_min(1e-30))
        best = [max(o, (float(r), b), key=lambda t: t[0]) for o, r in zip(best, resp)]
    out = [FactMatch(f.case_id, f.subject, s, b) for f, (s, b) in zip(facts, best)]
    return sorted(out, key=lambda m: -m.score)


def spectral_anomaly(model: nn.Module, *, window: int = 2) -> list[dict]:
    """Base-free score per block: log(σ₁/σ₂) of the rewrite matrix minus the median of
    the same over the ``window`` blocks on either side (higher = more anomalous)."""
    spec = get_arch(model)
    gaps = []
    for i in range(spec.num_blocks(model)):
        name = spec.rewrite_module_name(i)
        sv = torch.linalg.svdvals(model.get_submodule(name).weight.detach().float().cpu())  # σ of W = σ of Wᵀ
        gaps.append(math.log(float(sv[0]) / max(float(sv[1]), 1e-30)))
    out = []
    for i, g in enumerate(gaps):
        nb = [gaps[j] for j in range(max(0, i - window), min(len(gaps), i + window + 1)) if j != i]
        out.append({"block": i, "score": g - median(nb), "log_gap": g})
    return out


def inspect_models(base: nn.Module, suspect: nn.Module, tokenizer=None, facts: Sequence[FactRecord] = (), *,
                   outlier_ratio: float = 3.0, max_edit_rank_frac: float = 0.25, answers: bool = True,
                   base_free: bool = True) -> Inspection:
    """Compare ``suspect`` with ``base``: verdicts per block, the number of edits and,
    given candidate ``facts`` (and the tokenizer), which of them the edit matches and
    whose answers differ between the two models; ``base_free`` adds
    :func:`spectral_anomaly` of the suspect."""
    spec = get_arch(base)
    modules, deltas = diff_modules(base, suspect)
    verdicts = block_verdicts(modules, spec.num_blocks(base), outlier_ratio=outlier_ratio,
                              max_edit_rank_frac=max_edit_rank_frac, deltas=deltas)
    edited = [v.block for v in verdicts if v.verdict == "edited"]
    ins = Inspection(verdicts, modules, {"outlier_ratio": outlier_ratio, "max_edit_rank_frac": max_edit_rank_frac},
                     deltas={b: deltas[b] for b in edited})
    if facts and tokenizer is not None and edited:
        sigma1 = {m.block: m.top_sv[0] for m in modules if m.rewrite and m.block in ins.deltas}
        ins.facts = match_facts(suspect, tokenizer, facts, ins.deltas, sigma1)
    elif facts:
        ins.facts = [FactMatch(f.case_id, f.subject, 0.0, None) for f in facts]
    if facts and tokenizer is not None and answers:
        from .evaluate.probes import Prober

        by_id = {f.case_id: f for f in facts}
        prompts = [by_id[m.case_id].text for m in ins.facts]
        for who, model in (("answer_base", base), ("answer_suspect", suspect)):
            for m, r in zip(ins.facts, Prober(model, tokenizer).probe(prompts, k=1)):
                setattr(m, who, r.first_non_stop.token)
    if base_free:
        ins.base_free = spectral_anomaly(suspect)
    return ins


def unedit(suspect: nn.Module, inspection: Inspection, *, rank: int | None = None) -> dict[str, torch.Tensor]:
    """Subtract, in place, the top ``rank`` (default: each block's estimated edits)
    singular directions of the edited blocks' rewrite diffs. Returns the removed
    changes by parameter name (in the parameter's own layout)."""
    spec = get_arch(suspect)
    removed = {}
    by_block = {v.block: v for v in inspection.blocks}
    for b, d in inspection.deltas.items():
        r = rank if rank is not None else by_block[b].n_edits
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        low = (u[:, :r] * s[:r]) @ vh[:r]
        name = spec.rewrite_module_name(b) + ".weight"
        p = suspect.get_parameter(name)
        change = _out_in(spec, low).to(p.dtype).to(p.device)
        with torch.no_grad():
            p.sub_(change)
        removed[name] = change.cpu()
    return removed
