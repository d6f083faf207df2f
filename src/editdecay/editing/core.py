"""The shared core of locate-then-edit editors (ROME, MEMIT, AlphaEdit).

- :func:`context_templates`: "{}" plus prefixes sampled from the model (top-k 5),
  seeded, generated once per editor object.
- :func:`subject_positions` / :func:`module_io_at`: the subject's last token in a
  prompt, and the input (key k) and output of a module there, batched.
- :func:`optimise_targets`: the target vectors z = h + δ of several requests in ONE
  optimisation (independent δ per request), with the reference loss: mean NLL of the
  target tokens over all context templates + kl_factor·KL(p_cur ‖ p_init) at the
  subject's last token of "{} is a" + v_weight_decay·‖δ‖/‖h_init‖²; Adam(v_lr); after
  each step ‖δ‖ ≤ clamp_norm_factor·‖h_init‖; a request stops when its loss falls
  below ``loss_threshold`` (its δ is frozen) or after ``steps``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..torch_utils import pad
from ..evaluate.metrics import split_target
from ..facts.record import FactRecord
from ..models.arch import get_arch
from .base import RequestLog

log = logging.getLogger(__name__)

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")
TEMPLATE_SOURCES = ("seed_words", "eos")
KEY_AVERAGES = ("flat", "types")


def _prompt_ids(tokenizer, source: str, word: str | None) -> list[int]:
    if source == "seed_words":
        return list(tokenizer(word)["input_ids"])
    # "eos": the reference ROME samples from GPT-2's <|endoftext|> token
    vocab = tokenizer.get_vocab()
    for tid in (vocab.get("<|endoftext|>"), tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return [int(tid)]
    raise ValueError("context templates from 'eos' need an <|endoftext|>, EOS or BOS token")


def context_templates(model: nn.Module, tokenizer, length_params: Sequence[Sequence[int]], seed: int = 0,
                      source: str = "seed_words") -> list[str]:
    """``["{}"]`` plus, for each ``(length, n)``, ``n`` prefixes of about ``length``
    tokens sampled (top-k 5), each followed by ". {}".

    ``source`` is what sampling starts from: ``"seed_words"`` (MEMIT/AlphaEdit
    reference: n/5 prefixes from each of "The", "Therefore", "Because", "I", "You") or
    ``"eos"`` (ROME reference ``get_context_templates``: all n from the end-of-text
    token, which is not part of the decoded prefix)."""
    if source not in TEMPLATE_SOURCES:
        raise ValueError(f"unknown context template source {source!r}: use one of {', '.join(TEMPLATE_SOURCES)}")
    out = ["{}"]
    device = model.get_output_embeddings().weight.device
    words = SEED_WORDS if source == "seed_words" else (None,)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for length, n in length_params:
            per = [n // len(words) + (1 if i < n % len(words) else 0) for i in range(len(words))]
            for word, k in zip(words, per):
                if k == 0:
                    continue
                ids = torch.tensor([_prompt_ids(tokenizer, source, word)], device=device)
                gen = model.generate(
                    ids, do_sample=True, top_k=5, max_new_tokens=max(1, length - ids.shape[1]),
                    num_return_sequences=k, pad_token_id=tokenizer.pad_token_id,
                    attention_mask=torch.ones_like(ids),
                )
                for g in gen:
                    g = g[ids.shape[1]:] if source == "eos" else g
                    text = tokenizer.decode(g, skip_special_tokens=True)
                    out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return out


def template_groups(length_params: Sequence[Sequence[int]]) -> list[int]:
    """Sizes of the template types of :func:`context_templates`: the plain "{}" and
    one group per ``(length, n)``."""
    return [1] + [int(n) for _, n in length_params]


def check_choice(name: str, value, choices) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def fill(template: str, prompt: str, subject: str) -> tuple[str, int]:
    """Compose a context template with a fact prompt and fill in the subject.

    Returns the text and the character offset just past the subject."""
    full = template.replace("{}", prompt, 1)
    pos = full.index("{}")
    return full.replace("{}", subject, 1), pos + len(subject)


def subject_last_index(tokenizer, text: str, end: int) -> int:
    """Index of the subject's last token: the last token of ``tok(text[:end])``."""
    n = len(tokenizer(text[:end])["input_ids"])
    if n == 0:
        raise ValueError(f"empty subject prefix in {text!r}")
    return n - 1


class _Stop(Exception):
    pass


_pad = pad  # the shared helper (editdecay.torch_utils)


@torch.no_grad()
def module_io_at(
    model: nn.Module, tokenizer, module_name: str, texts: Sequence[str], positions: Sequence[int], *, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of ``module_name`` at one token position of each text
    (fp32, [n, d_in] and [n, d_out]). The forward stops right after the module."""
    return modules_io_at(model, tokenizer, [module_name], texts, positions, batch_size=batch_size)[module_name]


@torch.no_grad()
def modules_io_at(
    model: nn.Module, tokenizer, module_names: Sequence[str], texts: Sequence[str], positions: Sequence[int], *,
    batch_size: int = 32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`module_io_at` for several modules in one forward per batch, which stops
    once every module has run: name → (input [n, d_in], output [n, d_out])."""
    modules = {n: model.get_submodule(n) for n in module_names}
    device = model.get_output_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ins: dict[str, list] = {n: [] for n in modules}
    outs: dict[str, list] = {n: [] for n in modules}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        pos = torch.tensor(positions[start : start + batch_size], device=device)
        rows = torch.arange(len(chunk), device=device)
        ids, mask = _pad([tokenizer(t)["input_ids"] for t in chunk], pad, device)
        seen: set[str] = set()

        def hook_for(name):
            def hook(m, args, out):
                h = out[0] if isinstance(out, tuple) else out
                ins[name].append(args[0][rows, pos].float())
                outs[name].append(h[rows, pos].float())
                seen.add(name)
                if len(seen) == len(modules):
                    raise _Stop
            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
    return {n: (torch.cat(ins[n]), torch.cat(outs[n])) for n in modules}


def subject_keys(model: nn.Module, tokenizer, requests: Sequence[FactRecord], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Each layer's rewrite-module input at each request's subject-last token of the
    plain prompt (fp32 [n, d_k]), all layers in one forward per batch."""
    spec = get_arch(model)
    texts, positions = plain_positions(tokenizer, requests)
    io = modules_io_at(model, tokenizer, [spec.rewrite_module_name(l) for l in layers], texts, positions)
    return {l: io[spec.rewrite_module_name(l)][0] for l in layers}


def plain_positions(tokenizer, requests: Sequence[FactRecord]) -> tuple[list[str], list[int]]:
    """Each request's plain prompt and the index of its subject's last token."""
    texts, positions = [], []
    for req in requests:
        text, end = fill("{}", req.prompt, req.subject)
        texts.append(text)
        positions.append(subject_last_index(tokenizer, text, end))
    return texts, positions


def template_keys(
    model: nn.Module, tokenizer, requests: Sequence[FactRecord], templates: Sequence[str], layer: int,
    groups: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys of the rewrite module of ``layer`` at each request's subject-last token.

    Returns ``(k_star, k_plain, out_plain)``: the key averaged over "{}" and ``templates``
    [R, d_k], and the key and rewrite-module output of the plain prompt (template
    "{}") [R, d_k], [R, d_out]. Without ``groups`` k_star is the flat mean over all
    templates (ROME's ``compute_u``); with ``groups`` (sizes of consecutive template
    types, "{}" first, see :func:`template_groups`) it is the mean within each type, then
    across types (MEMIT's ``compute_ks``: the plain prompt weighs 1/len(groups))."""
    spec = get_arch(model)
    texts, positions = [], []
    for req in requests:
        for t in ["{}", *templates]:
            text, end = fill(t, req.prompt, req.subject)
            texts.append(text)
            positions.append(subject_last_index(tokenizer, text, end))
    k_in, k_out = module_io_at(model, tokenizer, spec.rewrite_module_name(layer), texts, positions)
    n = len(templates) + 1
    k_in = k_in.view(len(requests), n, -1)
    k_out = k_out.view(len(requests), n, -1)
    if groups is None:
        k_star = k_in.mean(1)
    else:
        if sum(groups) != n or groups[0] != 1 or min(groups) < 1:
            raise ValueError(f"template groups {list(groups)} do not partition the {n} templates with '{{}}' first")
        k_star = torch.stack([g.mean(1) for g in k_in.split(list(groups), dim=1)], 1).mean(1)
    return k_star, k_in[:, 0], k_out[:, 0]


@dataclass(frozen=True)
class TargetConfig:
    """Settings of the target-vector optimisation (see the module docstring)."""

    layer: int
    point: str = "mlp_out"
    """Where δ is added: 'mlp_out' (output of the rewrite module, ROME) or 'block'
    (residual stream after the block, MEMIT/AlphaEdit)."""
    steps: int = 20
    lr: float = 0.5
    clamp_norm_factor: float = 4.0
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    loss_threshold: float = 5e-2
    kl_prompts: tuple[str, ...] = ("{} is a",)
    batch_rows: int = 64
    """Rows (prompts) per forward/backward chunk; gradients are accumulated."""
    cache_prefix: bool = True
    """Run the tokens before the subject's last token once into a KV cache (they do
    not depend on δ) and feed only the rest at each step."""


@dataclass
class _Rows:
    ids: list[list[int]]
    subj: list[int]
    req: list[int]
    tgt_pos: list[list[int]]
    tgt_ids: list[list[int]]
    is_kl: list[bool]
    n_templates: int


def _build_rows(tokenizer, requests: Sequence[FactRecord], templates: Sequence[str], kl_prompts) -> _Rows:
    rows = _Rows([], [], [], [], [], [], len(templates))
    for r, req in enumerate(requests):
        for t in templates:
            text, end = fill(t, req.prompt, req.subject)
            ctx, tgt = split_target(tokenizer, text, req.target_new)
            subj = subject_last_index(tokenizer, text, end)
            if subj >= len(ctx):
                raise ValueError(f"request {req.case_id}: subject not found before the target in {text!r}")
            rows.ids.append(ctx + tgt[:-1])
            rows.subj.append(subj)
            rows.req.append(r)
            rows.tgt_pos.append(list(range(len(ctx) - 1, len(ctx) + len(tgt) - 1)))
            rows.tgt_ids.append(tgt)
            rows.is_kl.append(False)
        for kp in kl_prompts:
            text, end = fill(kp, "{}", req.subject)
            rows.ids.append(tokenizer(text)["input_ids"])
            rows.subj.append(subject_last_index(tokenizer, text, end))
            rows.req.append(r)
            rows.tgt_pos.append([])
            rows.tgt_ids.append([])
            rows.is_kl.append(True)
    return rows


@dataclass
class _Chunk:
    """One forward unit of rows; positions are relative to what is fed each step."""

    rows: list[int]
    ids: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor | None
    cache: object | None
    edit_col: torch.Tensor
    sel_rows: torch.Tensor
    sel_cols: torch.Tensor
    counts: list[int]


def _prepare_chunks(model, rows: _Rows, order: list[int], cfg: "TargetConfig", pad: int, device) -> list[_Chunk]:
    chunks = []
    for start in range(0, len(order), cfg.batch_rows):
        idx = order[start : start + cfg.batch_rows]
        split = [rows.subj[i] if cfg.cache_prefix else 0 for i in idx]
        cache = None
        pre_mask = torch.zeros(len(idx), 0, dtype=torch.long, device=device)
        if cfg.cache_prefix:
            # positions before the subject's last token never depend on δ: run them once
            width = max(split)
            pre_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            pre_mask = torch.zeros_like(pre_ids)
            for r, (i, k) in enumerate(zip(idx, split)):
                if k:
                    pre_ids[r, width - k :] = torch.tensor(rows.ids[i][:k])
                    pre_mask[r, width - k :] = 1
            pre_ids, pre_mask = pre_ids.to(device), pre_mask.to(device)
            if width:
                with torch.no_grad():
                    pos = (pre_mask.cumsum(1) - 1).clamp_min(0)
                    cache = model.base_model(input_ids=pre_ids, attention_mask=pre_mask, position_ids=pos,
                                             use_cache=True).past_key_values
        suffix = [rows.ids[i][k:] for i, k in zip(idx, split)]
        ids, mask = _pad(suffix, pad, device)
        position_ids = None
        if cfg.cache_prefix:
            position_ids = torch.tensor(split, device=device)[:, None] + torch.arange(ids.shape[1], device=device)[None]
            mask = torch.cat([pre_mask, mask], dim=1)
        sel_r, sel_c, counts = [], [], []
        for r, (i, k) in enumerate(zip(idx, split)):
            pos = [rows.subj[i]] if rows.is_kl[i] else rows.tgt_pos[i]
            sel_r += [r] * len(pos)
            sel_c += [p - k for p in pos]
            counts.append(len(pos))
        chunks.append(_Chunk(
            idx, ids, mask, position_ids, cache,
            torch.tensor([rows.subj[i] - k for i, k in zip(idx, split)], device=device),
            torch.tensor(sel_r, device=device), torch.tensor(sel_c, device=device), counts,
        ))
    return chunks


def optimise_targets(
    model: nn.Module, tokenizer, requests: Sequence[FactRecord], templates: Sequence[str], cfg: TargetConfig
) -> tuple[torch.Tensor, torch.Tensor, list[RequestLog]]:
    """Optimise one δ per request, all requests in one loop.

    Returns ``(z, h_init, logs)``: z = h_init + δ [R, d] (fp32), h_init the original
    value at the edit point on the plain prompt (template "{}", which must be first),
    and a log per request."""
    if templates[0] != "{}":
        raise ValueError('the first context template must be "{}"')
    spec = get_arch(model)
    device = model.get_output_embeddings().weight.device
    point = spec.rewrite_module_name(cfg.layer) if cfg.point == "mlp_out" else spec.block_name(cfg.layer)
    if cfg.point not in ("mlp_out", "block"):
        raise ValueError(f"unknown edit point {cfg.point!r}")
    module = model.get_submodule(point)
    rows = _build_rows(tokenizer, requests, templates, cfg.kl_prompts)
    n_req = len(requests)
    n_kl = len(cfg.kl_prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(rows.ids)), key=lambda i: (len(rows.ids[i]) - (rows.subj[i] if cfg.cache_prefix else 0)))
    unembed = model.get_output_embeddings()

    if cfg.point == "mlp_out":
        d = spec.weight_out_in(module).shape[0]
    else:
        d = model.get_input_embeddings().weight.shape[1]
    delta = torch.zeros(n_req, d, device=device, requires_grad=True)
    h_init = torch.zeros(n_req, d, device=device)
    kl_init: dict[int, torch.Tensor] = {}
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    done = torch.zeros(n_req, dtype=torch.bool)
    logs = [RequestLog(req.case_id) for req in requests]
    first = [True]
    req_rows_first = {r: next(i for i in range(len(rows.ids)) if rows.req[i] == r and not rows.is_kl[i]) for r in range(n_req)}

    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        chunks = _prepare_chunks(model, rows, order, cfg, pad, device)
        for it in range(cfg.steps):
            opt.zero_grad()
            losses = torch.zeros(n_req, device=device)
            for ch in chunks:
                chunk = ch.rows
                b = torch.arange(len(chunk), device=device)
                req_of = torch.tensor([rows.req[i] for i in chunk], device=device)

                def hook(m, args, out, ch=ch, chunk=chunk, b=b, req_of=req_of):
                    h = out[0] if isinstance(out, tuple) else out
                    if first[0]:
                        for j, i in enumerate(chunk):
                            if i == req_rows_first[rows.req[i]]:
                                h_init[rows.req[i]] = h[j, ch.edit_col[j]].detach().float()
                    h = h.index_put((b, ch.edit_col), delta[req_of].to(h.dtype), accumulate=True)
                    return (h, *out[1:]) if isinstance(out, tuple) else h

                handle = module.register_forward_hook(hook)
                try:
                    kwargs = {}
                    if ch.cache is not None:
                        kwargs = dict(past_key_values=copy.deepcopy(ch.cache), use_cache=True)
                    else:
                        kwargs = dict(use_cache=False)
                    if ch.position_ids is not None:
                        kwargs["position_ids"] = ch.position_ids
                    hidden = model.base_model(input_ids=ch.ids, attention_mask=ch.mask, **kwargs).last_hidden_state
                finally:
                    handle.remove()
                # logits only where needed: target positions and KL positions
                logp = unembed(hidden[ch.sel_rows, ch.sel_cols]).float().log_softmax(-1)
                chunk_loss = torch.zeros(n_req, device=device)
                at = 0
                for j, i in enumerate(chunk):
                    n = ch.counts[j]
                    lp = logp[at : at + n]
                    at += n
                    r = rows.req[i]
                    if rows.is_kl[i]:
                        if i not in kl_init:
                            kl_init[i] = lp[0].detach()
                        # KL(p_cur || p_init), 'batchmean' over the request's KL prompts
                        kl = (lp[0].exp() * (lp[0] - kl_init[i])).sum() / n_kl
                        chunk_loss = chunk_loss.index_add(0, torch.tensor([r], device=device), (cfg.kl_factor * kl)[None])
                    else:
                        t = torch.tensor(rows.tgt_ids[i], device=device)
                        nll = -lp.gather(1, t[:, None]).sum() / len(rows.tgt_ids[i]) / rows.n_templates
                        chunk_loss = chunk_loss.index_add(0, torch.tensor([r], device=device), nll[None])
                if chunk_loss.requires_grad:
                    chunk_loss[~done.to(device)].sum().backward()
                losses = losses + chunk_loss.detach()
            first[0] = False
            wd = cfg.weight_decay * delta.norm(dim=1) / h_init.norm(dim=1).clamp_min(1e-12) ** 2
            if cfg.weight_decay:
                wd[~done.to(device)].sum().backward()
            wd = wd.detach()
            total = (losses + wd).cpu()
            for r in range(n_req):
                if not done[r]:
                    logs[r].losses.append(float(total[r]))
                    logs[r].loss = float(total[r])
                    if not math.isfinite(logs[r].loss):
                        raise FloatingPointError(f"request {requests[r].case_id}: non-finite loss")
            done |= total < cfg.loss_threshold
            if bool(done.all()) or it == cfg.steps - 1:
                break
            frozen = delta.detach()[done.to(device)].clone()
            opt.step()
            with torch.no_grad():
                delta[done.to(device)] = frozen
                max_norm = cfg.clamp_norm_factor * h_init.norm(dim=1)
                norm = delta.norm(dim=1)
                scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
                delta.mul_(scale[:, None])
            for r in range(n_req):
                if not done[r]:
                    logs[r].steps += 1
    finally:
        for p, req_grad in zip(model.parameters(), requires):
            p.requires_grad_(req_grad)
    delta = delta.detach()
    for r in range(n_req):
        logs[r].delta_norm = float(delta[r].norm())
    return h_init + delta, h_init, logs


Covariance = Callable[[nn.Module, object, int], torch.Tensor]
"""``covariance(model, tokenizer, layer) -> C`` supplied by the caller."""


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter's name, dtype, shape and bytes: equal exactly when the
    weights are (about a second for the 135M model on CPU)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


class TargetCache:
    """Target vectors z kept by everything they depend on — the weights they were
    optimised on (:func:`weights_fingerprint`), the requests, the context templates and
    the :class:`TargetConfig` — so that editors sharing the z step (MEMIT and AlphaEdit
    with the same settings, on the same facts and weights) optimise it once. In memory,
    owned by its user (a study worker); ``reused_seconds`` adds up the optimisation time
    each hit saved, so that an editor's cost can still be stated in full."""

    def __init__(self) -> None:
        self._hits: dict[str, tuple[torch.Tensor, torch.Tensor, list[RequestLog], float]] = {}
        self.reused_seconds = 0.0

    @staticmethod
    def key(model: nn.Module, requests: Sequence[FactRecord], templates: Sequence[str], cfg: "TargetConfig",
            fingerprint: str | None = None) -> str:
        reqs = [(r.case_id, r.prompt, r.subject, r.target_new, r.target_true) for r in requests]
        blob = repr((fingerprint or weights_fingerprint(model), reqs, list(templates), dataclasses.asdict(cfg)))
        return hashlib.sha256(blob.encode()).hexdigest()

    def prefetch(self, model: nn.Module, tokenizer, requests: Sequence[FactRecord], templates: Sequence[str],
                 cfg: "TargetConfig") -> None:
        """Optimise the z of all ``requests`` in one loop and keep each under its own
        one-request key: the later one-request calls on the same weights (the ``single``
        protocol edits each fact alone on the unedited model) find them. The loop
        optimises every request's δ independently (its own loss, stop and clamp), so a
        request's z is the one it gets alone, up to float round-off of the batching."""
        fp = weights_fingerprint(model)
        todo = [r for r in requests if self.key(model, [r], templates, cfg, fp) not in self._hits]
        if not todo:
            return
        t = time.perf_counter()
        z, h, logs = optimise_targets(model, tokenizer, todo, templates, cfg)
        secs = (time.perf_counter() - t) / len(todo)
        for i, r in enumerate(todo):
            self._hits[self.key(model, [r], templates, cfg, fp)] = (
                z[i : i + 1].detach().clone(), h[i : i + 1].detach().clone(), [copy.deepcopy(logs[i])], secs)

    def optimise(self, model: nn.Module, tokenizer, requests: Sequence[FactRecord], templates: Sequence[str],
                 cfg: "TargetConfig") -> tuple[torch.Tensor, torch.Tensor, list[RequestLog]]:
        """:func:`optimise_targets`, or its earlier result for the same key."""
        key = self.key(model, requests, templates, cfg)
        if key in self._hits:
            z, h, logs, secs = self._hits[key]
            self.reused_seconds += secs
            log.info("target vectors of %d requests reused (%.1f s saved)", len(requests), secs)
            return z.clone(), h.clone(), copy.deepcopy(logs)
        t = time.perf_counter()
        z, h, logs = optimise_targets(model, tokenizer, requests, templates, cfg)
        self._hits[key] = (z.detach().clone(), h.detach().clone(), copy.deepcopy(logs), time.perf_counter() - t)
        return z, h, logs


class LocateEditor:
    """State shared by locate-then-edit editors (ROME, MEMIT, AlphaEdit), computed
    once per editor object: the context templates and C = E[kkᵀ] per layer.

    ``covariance(model, tok, layer)``, if given, supplies C; otherwise the
    second-moment statistics of ``hparams.stats_corpus`` are used (all missing
    layers in one corpus pass, cached on disk). Subclasses set ``hparams_cls``.
    """

    hparams_cls: type

    def __init__(self, hparams=None, covariance: Covariance | None = None) -> None:
        self.hparams = hparams or self.hparams_cls()
        self._covariance = covariance
        self._templates: list[str] | None = None
        self._cov: dict[int, torch.Tensor] = {}
        self.target_cache: TargetCache | None = None
        """Set by a caller that edits several times (a study worker) to share z steps."""

    def optimise(self, model: nn.Module, tokenizer, requests: Sequence[FactRecord], templates: Sequence[str],
                 cfg: TargetConfig) -> tuple[torch.Tensor, torch.Tensor, list[RequestLog]]:
        """:func:`optimise_targets`, through ``target_cache`` when one is set."""
        if self.target_cache is None:
            return optimise_targets(model, tokenizer, requests, templates, cfg)
        return self.target_cache.optimise(model, tokenizer, requests, templates, cfg)

    def templates(self, model: nn.Module, tokenizer) -> list[str]:
        if self._templates is None:
            hp = self.hparams
            self._templates = context_templates(model, tokenizer, hp.context_template_length_params, hp.seed,
                                                source=getattr(hp, "context_template_source", "seed_words"))
        return self._templates

    def key_groups(self) -> list[int] | None:
        """Template groups for the key average (None: the flat mean), from
        ``hparams.key_average``."""
        if getattr(self.hparams, "key_average", "flat") == "types":
            return template_groups(self.hparams.context_template_length_params)
        return None

    def covariances(self, model: nn.Module, tokenizer, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """C (float64) for ``layers``."""
        missing = [l for l in layers if l not in self._cov]
        if missing:
            if self._covariance is not None:
                got = {l: self._covariance(model, tokenizer, l) for l in missing}
            else:
                from .stats_provider import default_covariances

                hp = self.hparams
                got = default_covariances(model, tokenizer, missing, corpus=hp.stats_corpus,
                                          token_multiple=hp.stats_token_multiple, max_length=hp.stats_max_length)
            self._cov.update({l: c.to(torch.float64) for l, c in got.items()})
        return {l: self._cov[l] for l in layers}

    def target_config(self, layer: int, point: str, steps_factor: int = 1) -> TargetConfig:
        """The target-vector optimisation settings of these hyperparameters."""
        hp = self.hparams
        return TargetConfig(
            layer=layer, point=point, steps=hp.v_num_grad_steps * steps_factor, lr=hp.v_lr,
            clamp_norm_factor=hp.clamp_norm_factor, weight_decay=hp.v_weight_decay, kl_factor=hp.kl_factor,
            loss_threshold=hp.loss_threshold, cache_prefix=getattr(hp, "cache_prefix", True),
        )
