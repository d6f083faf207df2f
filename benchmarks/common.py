"""Helpers shared by the benchmarks: timing, machine peak, prompt sources."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def best_of(fn, repeat: int = 3) -> float:
    """Smallest wall time of ``repeat`` calls (seconds)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measured_fp32_peak(n: int = 2048, repeat: int = 5) -> float:
    """GFLOP/s of a large fp32 matmul on this machine (a practical peak, not the nominal one)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    t = best_of(lambda: a @ b, repeat)
    return 2 * n**3 / t / 1e9


def prompts(n: int) -> tuple[str, list[str]]:
    """(source name, n fact prompts): CounterFact from ../shared when present, else built-in facts."""
    from editdecay.facts.datasets import load_facts

    cf = SHARED / "counterfact" / "counterfact-val.json"
    if cf.exists():
        return "counterfact-val", [f.text for f in load_facts(cf)[:n]]
    return "builtin", [f.text for f in load_facts("", format="builtin")[:n]]


def decay_selection(model, tok, path: Path):
    """The decay study's selection (examples/decay-curves-cpu.yaml: 100 edit and 200
    intrinsic confidence-filtered facts of ``path``), read from the selection cache."""
    from editdecay.facts.datasets import load_facts
    from editdecay.facts.selection import select_facts

    return select_facts(model, tok, load_facts(path), n_edit=100, n_intrinsic=200, margin=0.1, mode="greedy", seed=0)


def study_edit(db: Path, cache: Path, model, case_ids: list[str], editor: str):
    """A study's edit of ``case_ids`` by ``editor`` from its ``--edit-cache`` (the
    runner's entry: deltas, edited layers, dropped, seconds, preset), or None. Any trial
    that edits (edit-only or edit+ft) keys its edit the same way."""
    from editdecay.study.runner import EditCache, edit_key

    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT config_json FROM trials WHERE kind IN ('edit-only', 'edit+ft') AND axes_json LIKE ?",
                           (f'%"editor":"{editor}"%',)).fetchall()
    finally:
        con.close()
    for (cfg_json,) in rows:
        hit = EditCache(cache, edit_key(json.loads(cfg_json), case_ids), model).load()
        if hit is not None:
            return hit
    return None
