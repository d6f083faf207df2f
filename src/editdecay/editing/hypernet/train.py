"""Scoring and validation of single edits, and the two-stage meta-training loop (see
the package docstring)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import EditdecayError
from ...evaluate.metrics import split_target
from ...facts.record import FactRecord
from ...torch_utils import device_of, pad_id
from .capture import (
    Shift, _Batch, _batch, _capture, _lowest_block, _record_prefix, _replay_prefix, _row_mean, _target_logprobs,
    capture_factors, frozen, shifted,
)
from .editor import HypernetEditor, _atomic, _state_tensors
from .params import STATE_DIR, WEIGHTS_FILE

log = logging.getLogger(__package__)  # the package's logger, as before the split


def _score_pairs(tokenizer, fact: FactRecord) -> tuple[list[tuple[list[int], list[int]]], dict[str, list[int]]]:
    pairs: list[tuple[list[int], list[int]]] = []
    slots: dict[str, list[int]] = {}

    def add(key: str, prompt: str, target: str) -> None:
        slots.setdefault(key, []).append(len(pairs))
        pairs.append(split_target(tokenizer, prompt, target))

    add("es_new", fact.text, fact.target_new)
    cf = fact.metric != "zsre" and fact.target_true is not None
    if cf:
        add("es_true", fact.text, fact.target_true)
    for p in fact.paraphrases:
        add("ps_new", p, fact.target_new)
        if cf:
            add("ps_true", p, fact.target_true)
    for nb in fact.neighborhood:
        add("ns_ans", nb.prompt, nb.target)
        if cf:
            add("ns_new", nb.prompt, fact.target_new)
    return pairs, slots


def _metrics(slots: dict[str, list[int]], lp: list[float], acc: list[float]) -> dict[str, float | None]:
    """ES/PS/NS of one fact from its rows' mean log-probabilities and token accuracies."""
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    if "es_true" in slots:
        return {"es": float(lp[slots["es_new"][0]] > lp[slots["es_true"][0]]),
                "ps": mean([float(lp[a] > lp[t]) for a, t in zip(slots.get("ps_new", []), slots.get("ps_true", []))]),
                "ns": mean([float(lp[a] > lp[n]) for a, n in zip(slots.get("ns_ans", []), slots.get("ns_new", []))])}
    return {"es": acc[slots["es_new"][0]], "ps": mean([acc[i] for i in slots.get("ps_new", [])]),
            "ns": mean([acc[i] for i in slots.get("ns_ans", [])])}


@torch.no_grad()
def score_edits(model: nn.Module, tokenizer, facts: Sequence[FactRecord], shifts: Sequence[dict[str, Shift]],
                *, max_rows: int = 64) -> list[dict[str, float | None]]:
    """ES/PS/NS of each fact on the model shifted by its own ``shifts[i]`` (hooks,
    weights untouched; several facts per forward), by the definitions of
    :func:`~editdecay.evaluate.metrics.score_facts`: CounterFact compares
    P = exp(−mean token NLL) of the new and true targets; zsRE (or no true target)
    uses teacher-forced token accuracy."""
    out: list[dict[str, float | None]] = []
    prepared = [_score_pairs(tokenizer, f) for f in facts]
    i = 0
    with frozen(model):
        while i < len(facts):
            j, n_rows = i, 0
            while j < len(facts) and (j == i or n_rows + len(prepared[j][0]) <= max_rows):
                n_rows += len(prepared[j][0])
                j += 1
            pairs, groups = [], []
            for g, k in enumerate(range(i, j)):
                pairs += prepared[k][0]
                groups += [g] * len(prepared[k][0])
            b = _batch(pairs, pad_id(tokenizer), device_of(model.get_output_embeddings()))
            row_group = torch.tensor(groups, device=b.ids.device)
            with shifted(model, shifts[i:j], row_group):
                logp = _target_logprobs(model, b)
            lp = _row_mean(logp.gather(1, b.tgt[:, None])[:, 0], b.row, b.n_rows).tolist()
            acc = _row_mean((logp.argmax(-1) == b.tgt).float(), b.row, b.n_rows).tolist()
            at = 0
            for k in range(i, j):
                n = len(prepared[k][0])
                out.append(_metrics(prepared[k][1], lp[at : at + n], acc[at : at + n]))
                at += n
            i = j
    return out


def validate(editor: HypernetEditor, model: nn.Module, tokenizer, facts: Sequence[FactRecord]) -> dict[str, float]:
    """Mean ES/PS/NS of single edits of ``facts`` (each edit applied alone, through hooks)."""
    editor.prepare(model)
    factors, _ = capture_factors(model, tokenizer, facts, editor.module_names,
                                 token=editor.hparams.token, batch_size=editor.hparams.batch_size)
    with torch.no_grad():
        shifts = [editor.shifts({n: f.select([i]) for n, f in factors.items()}) for i in range(len(facts))]
    rows = score_edits(model, tokenizer, facts, shifts)
    out = {}
    for k in ("es", "ps", "ns"):
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


def _val_score(metrics: dict[str, float], key: str) -> float:
    vals = [metrics[k] for k in key.split("+") if not math.isnan(metrics[k])]
    return sum(vals) / len(vals) if vals else math.nan


# --- training --------------------------------------------------------------------------

@dataclass
class TrainReport:
    """What :func:`train_hypernet` did (also in the checkpoint's ``config.json``)."""

    steps: int
    stop_reason: str
    seconds: float
    curve: list[dict]
    best: dict
    baseline: dict
    n_train: int
    n_val: int
    out: str
    resumed_from: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _StepRows:
    """The rows of one training batch: per fact its rewrite row (the edit), its
    generalisation rows and its locality rows, all in one padded batch."""

    batch: _Batch
    edit_rows: list[int]
    gen_rows: list[int]
    loc_rows: list[int]
    fact_of_row: list[int]


def _step_rows(tokenizer, facts: Sequence[FactRecord], on_rewrite: bool, device) -> _StepRows:
    pairs: list[tuple[list[int], list[int]]] = []
    edit_rows, gen_rows, loc_rows, fact_of = [], [], [], []

    def add(pair, i: int) -> int:
        pairs.append(pair)
        fact_of.append(i)
        return len(pairs) - 1

    for i, f in enumerate(facts):
        r = add(split_target(tokenizer, f.text, f.target_new), i)
        edit_rows.append(r)
        if on_rewrite or not f.paraphrases:
            gen_rows.append(r)
        gen_rows += [add(split_target(tokenizer, p, f.target_new), i) for p in f.paraphrases]
        loc_rows += [add(split_target(tokenizer, nb.prompt, nb.target), i) for nb in f.neighborhood]
    return _StepRows(_batch(pairs, pad_id(tokenizer), device), edit_rows, gen_rows, loc_rows, fact_of)


def _rows_mask(b: _Batch, rows: Sequence[int]) -> torch.Tensor:
    sel = torch.zeros(b.n_rows, dtype=torch.bool, device=b.ids.device)
    sel[torch.tensor(list(rows), dtype=torch.long, device=b.ids.device)] = True
    return sel[b.row]


def train_step(editor: HypernetEditor, model: nn.Module, tokenizer, facts: Sequence[FactRecord],
               opt: torch.optim.Optimizer) -> dict[str, float]:
    """One meta-training step on ``facts`` (see the module docstring): the facts are
    edited in independent groups of ``group_size``; returns the losses."""
    hp = editor.hparams
    net = editor.net
    device = device_of(model.get_output_embeddings())
    s = _step_rows(tokenizer, facts, hp.train_on_rewrite, device)
    b = s.batch
    groups = [list(range(i, min(i + hp.group_size, len(facts)))) for i in range(0, len(facts), hp.group_size)]
    group_of_fact = [g for g, grp in enumerate(groups) for _ in grp]
    row_group = torch.tensor([group_of_fact[f] for f in s.fact_of_row], device=device)
    lowest = _lowest_block(model, editor.module_names)
    with frozen(model):
        # stage 1: factors of the edits, pre-edit distribution, blocks below the edits
        with _record_prefix(model, lowest) as prefix:
            factors, _, logp_pre = _capture(model, b, s.edit_rows, editor.module_names, hp.token)
        for i, n in enumerate(editor.module_names):
            net.observe(i, factors[n].keys, factors[n].grads)
        by_group = [{n: f.select(grp) for n, f in factors.items()} for grp in groups]
        with torch.no_grad():
            leaves = [{n: sh.leaves() for n, sh in editor.shifts(fg).items()} for fg in by_group]
        # stage 2: the meta-loss on the edited model, its gradient with respect to ΔW
        with torch.enable_grad(), _replay_prefix(model, prefix), shifted(model, leaves, row_group):
            logp = _target_logprobs(model, b)
        gen = _rows_mask(b, s.gen_rows)
        nll = -logp.gather(1, b.tgt[:, None])[:, 0]
        per_row = _row_mean(torch.where(gen, nll, torch.zeros_like(nll)), b.row, b.n_rows)
        l_edit = per_row[torch.tensor(s.gen_rows, device=device)].mean()
        if s.loc_rows:
            loc = _rows_mask(b, s.loc_rows)
            ref = logp_pre[loc]
            l_loc = (ref.exp() * (ref - logp[loc])).sum(-1).mean()  # KL(p_pre || p_post), mean over positions
        else:
            l_loc = torch.zeros((), device=device)
        loss = hp.cedit * l_edit + hp.cloc * l_loc
        flat = [t for grp in leaves for sh in grp.values() for t in sh.tensors()]
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    # stage 3: back-propagate <ΔW(θ), G> into the network (through MALMEN's solve)
    opt.zero_grad(set_to_none=True)
    with torch.enable_grad():
        again = [t for fg in by_group for sh in editor.shifts(fg).values() for t in sh.tensors()]
        meta = sum((t * g).sum() for t, g in zip(again, grads) if g is not None and t.requires_grad)
        if isinstance(meta, torch.Tensor) and meta.requires_grad:
            meta.backward()
    params = [p for grp in opt.param_groups for p in grp["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm))
    if math.isfinite(grad_norm):
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
        log.warning("%s: non-finite meta-gradient; step skipped", editor.name)
    return {"loss": float(loss.detach()), "loss_edit": float(l_edit.detach()), "loss_loc": float(l_loc.detach()),
            "grad_norm": grad_norm}


def make_optimizer(editor: HypernetEditor) -> torch.optim.Optimizer:
    hp = editor.hparams
    return torch.optim.Adam([{"params": editor.net.network_parameters(), "lr": hp.meta_lr},
                             {"params": editor.net.rate_parameters(), "lr": hp.lr_lr}])


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> dict:
    """Optimizer tensors to safetensors; returns the JSON-able rest."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors, meta = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().clone()
            else:
                meta.setdefault(str(pid), {})[k] = v
    _atomic(path, lambda t: save_file(tensors, str(t)))
    return {"param_groups": sd["param_groups"], "scalars": meta}


def _load_optimizer(opt: torch.optim.Optimizer, path: Path, meta: dict, device) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path), device=str(device))
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, vals in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(vals)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class _Sampler:
    """Epochs of seeded permutations of the training indices; resumable."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.pos = 0
        self.epoch = 0

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
                self.pos = 0
                self.epoch += 1
            take = min(k - len(out), len(self.order) - self.pos)
            out += self.order[self.pos : self.pos + take]
            self.pos += take
        return out

    def state(self) -> dict:
        st = self.rng.getstate()
        return {"n": self.n, "order": self.order, "pos": self.pos, "epoch": self.epoch,
                "rng": [st[0], list(st[1]), st[2]]}

    def load(self, d: dict) -> None:
        if d["n"] != self.n:
            raise EditdecayError(f"cannot resume: the training set has {self.n} facts, the saved state {d['n']}")
        self.order, self.pos, self.epoch = list(d["order"]), int(d["pos"]), int(d["epoch"])
        self.rng.setstate((d["rng"][0], tuple(d["rng"][1]), d["rng"][2]))


def _facts_hash(facts: Sequence[FactRecord]) -> str:
    from ...facts.record import facts_hash

    return facts_hash(list(facts))


def train_hypernet(
    editor: HypernetEditor, model: nn.Module, tokenizer, train_facts: Sequence[FactRecord],
    val_facts: Sequence[FactRecord], out: str | Path, *, resume: bool = False, progress: bool = True,
    extra_config: dict | None = None,
) -> TrainReport:
    """Train ``editor``'s network on ``train_facts``, validating on ``val_facts``; the
    best network is written to ``out`` (``hypernet.safetensors`` + ``config.json``) and
    the resumable state to ``out/train_state/``."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    hp = editor.hparams
    if hp.checkpoint:
        raise EditdecayError(f"{editor.name}: training starts from an identity network; "
                             "to continue a run use --resume with its output directory")
    if not train_facts:
        raise EditdecayError("no training facts")
    if not val_facts:
        raise EditdecayError("no validation facts")
    out = Path(out)
    state_dir = out / STATE_DIR
    device = device_of(model.get_output_embeddings())
    net = editor.prepare(model)
    opt = make_optimizer(editor)
    sampler = _Sampler(len(train_facts), hp.seed)
    data_id = {"train": _facts_hash(train_facts), "val": _facts_hash(val_facts),
               "n_train": len(train_facts), "n_val": len(val_facts)}
    curve: list[dict] = []
    best: dict = {}
    step, bad, seconds = 0, 0, 0.0
    resumed_from = None
    window: list[dict] = []
    if (state_dir / "state.json").exists():
        if not resume:
            raise EditdecayError(f"{out} holds a training run; pass --resume to continue it or choose another --out")
        st = json.loads((state_dir / "state.json").read_text())
        saved_hp = dict(st["hparams"])
        mine = dataclasses.asdict(hp)
        diff = [k for k in mine if k not in ("steps", "max_minutes", "patience", "eval_every", "save_every")
                and mine[k] != saved_hp.get(k)]
        if st["method"] != editor.name or diff:
            raise EditdecayError(f"cannot resume {out}: hyperparameters differ ({', '.join(diff) or 'method'})")
        if st["data"] != data_id:
            raise EditdecayError(f"cannot resume {out}: the training or validation facts differ from the saved run")
        net.load_state_dict(load_file(str(state_dir / "last.safetensors"), device=str(device)), strict=True)
        _load_optimizer(opt, state_dir / "optimizer.safetensors", st["optimizer"], device)
        sampler.load(st["sampler"])
        torch.set_rng_state(load_file(str(state_dir / "rng.safetensors"))["torch"])
        step, bad, seconds = st["step"], st["bad"], st["seconds"]
        curve, best, window = st["curve"], st["best"], st.get("window", [])
        resumed_from = step
        log.info("%s: resuming %s at step %d", editor.name, out, step)
    elif resume:
        log.info("%s: nothing to resume in %s; starting afresh", editor.name, out)

    def save_state() -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        _atomic(state_dir / "last.safetensors", lambda t: save_file(_state_tensors(net), str(t)))
        _atomic(state_dir / "rng.safetensors", lambda t: save_file({"torch": torch.get_rng_state()}, str(t)))
        opt_meta = _save_optimizer(opt, state_dir / "optimizer.safetensors")
        st = {"method": editor.name, "hparams": dataclasses.asdict(hp), "data": data_id, "step": step, "bad": bad,
              "seconds": seconds, "curve": curve, "best": best, "window": window, "optimizer": opt_meta,
              "sampler": sampler.state()}
        _atomic(state_dir / "state.json", lambda t: t.write_text(json.dumps(st)))

    def save_best(stop_reason: str | None) -> None:
        extra = {"trained_steps": best.get("step"), "preset": getattr(editor, "preset_info", {}).get("preset"),
                 "best": best, "curve": curve, "baseline": curve[0] if curve else None,
                 "stop_reason": stop_reason, "seconds": seconds, "data": data_id, **(extra_config or {})}
        if best_state is not None:
            cur = _state_tensors(net)
            net.load_state_dict(best_state)
            editor.save(out, model, extra)
            net.load_state_dict(cur)
        else:
            editor.save(out, model, extra)

    def run_validation() -> bool:
        """Validate, update best; True when the network improved."""
        nonlocal bad, best_state
        t = time.perf_counter()
        m = validate(editor, model, tokenizer, val_facts)
        means = {k: (sum(w[k] for w in window) / len(window) if window else None)
                 for k in ("loss", "loss_edit", "loss_loc")}
        row = {"step": step, **m, "score": _val_score(m, hp.early_stop), "train": means,
               "seconds": round(seconds, 2), "val_seconds": round(time.perf_counter() - t, 2)}
        curve.append(row)
        window.clear()
        improved = not best or row["score"] > best["score"]
        if improved:
            best.clear()
            best.update({k: row[k] for k in ("step", "es", "ps", "ns", "score")})
            best_state = _state_tensors(net)
            bad = 0
        else:
            bad += 1
        log.info("%s step %d: val es %.3f ps %.3f ns %.3f (best step %d)", editor.name, step,
                 m["es"], m["ps"], m["ns"], best["step"])
        return improved

    best_state: dict | None = None
    if resumed_from is not None and (out / WEIGHTS_FILE).exists():
        best_state = {k: v.to(device) for k, v in load_file(str(out / WEIGHTS_FILE)).items()}
    t_start = time.perf_counter() - seconds
    stop_reason = "max_steps"
    if not curve:
        run_validation()
        save_best(None)
        save_state()
    bar = tqdm(total=hp.steps, initial=step, desc=f"train {editor.name}", unit="step", disable=not progress)
    try:
        while step < hp.steps:
            if hp.patience and bad >= hp.patience:
                stop_reason = "early_stop"
                break
            if hp.max_minutes is not None and seconds >= hp.max_minutes * 60:
                stop_reason = "time"
                break
            batch = [train_facts[i] for i in sampler.take(hp.train_batch)]
            losses = train_step(editor, model, tokenizer, batch, opt)
            window.append(losses)
            step += 1
            seconds = time.perf_counter() - t_start
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.3f}", val=f"{curve[-1]['score']:.2f}")
            validated = False
            if step % hp.eval_every == 0 or step == hp.steps:
                run_validation()
                seconds = time.perf_counter() - t_start
                save_best(None)
                validated = True
            if validated or step % hp.save_every == 0:
                save_state()
    finally:
        bar.close()
    if curve[-1]["step"] != step:
        run_validation()
        seconds = time.perf_counter() - t_start
    save_best(stop_reason)
    save_state()
    report = TrainReport(step, stop_reason, seconds, curve, dict(best), curve[0], len(train_facts), len(val_facts),
                         str(out), resumed_from)
    return report
