"""Edit quality per editor: ES/PS/NS (with the unedited model's NS and the drop) and
seconds per edit on confidence-filtered CounterFact facts, as JSON lines.

    python -m benchmarks.edit_quality                      # the defaults: ROME, MEMIT (20, 100), AlphaEdit
    python -m benchmarks.edit_quality --grid ablation.yaml # one row per grid entry
    python -m benchmarks.edit_quality --editor rome --set kl_factor=1 --set clamp_norm_factor=2
    python -m benchmarks.edit_quality --vs-reference-loop 5  # s/edit: defaults vs the reference loop
    python -m benchmarks.edit_quality --vs-reference-loop 5 --editor alphaedit

``--vs-reference-loop N`` times N single edits per editor with the defaults and with the
reference implementations' loop (kmeng01/rome ``compute_v``, kmeng01/memit ``compute_z``):
every template's whole prompt re-run at every step (``cache_prefix: false``) and the
vocabulary log-softmax at every position of every prompt (emulated by a hook that adds
it, times zero, to the final hidden states so that forward and backward pay for it); both
keep the same early stop (the reference's ``if loss < 5e-2: break``). The two alternate on
each fact in one process so machine load affects both alike.

A grid file is a YAML list of ``{name, editor, batch, hparams, stats}`` entries; ``batch``
0 is protocol ``single`` (each fact alone, restored), ``b`` > 0 edits independent batches
of ``b`` facts (restored between batches); ``stats: {corpus: PATH|offline, tokens: N}``
sets the second-moment corpus and its token budget. Facts: the first ``--n`` facts of
``--facts`` (default ../shared/data counterfact-train) that pass the confidence filter,
distinct subjects. Rows already in ``--out`` (same name) are skipped, so a grid resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import yaml

from .common import SHARED

DEFAULT_GRID = [
    {"name": "rome-default", "editor": "rome", "batch": 0},
    {"name": "memit-default-b20", "editor": "memit", "batch": 20},
    {"name": "memit-default-b100", "editor": "memit", "batch": 100},
    {"name": "alphaedit-default-b20", "editor": "alphaedit", "batch": 20},
]


def _value(text: str):
    return yaml.safe_load(text)


def filtered_facts(model, tok, path: Path, n: int, pool: int):
    from editdecay.facts.datasets import load_facts
    from editdecay.facts.selection import confidence_filter

    facts = load_facts(path)[:pool]
    passed = [f for f, o in zip(facts, confidence_filter(model, tok, facts)) if o.passed]
    uniq = list({f.subject: f for f in passed}.values())
    if len(uniq) < n:
        sys.exit(f"error: only {len(uniq)} of the first {pool} facts of {path} pass the filter; raise --pool")
    return uniq[:n]


def _mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else math.nan


def _ci(iv) -> list[float]:
    return [round(iv.low, 4), round(iv.high, 4)]


def run_entry(model, tok, facts, entry: dict) -> dict:
    """Edit ``facts`` as ``entry`` says; the model is restored afterwards."""
    from editdecay.editing import get_editor
    from editdecay.editing.corpus import Corpus
    from editdecay.editing.protocols import run_batch, run_single
    from editdecay.editing.stats import StatsCache, second_moments
    from editdecay.evaluate.significance import bootstrap_ci

    hp = dict(entry.get("hparams") or {})
    editor = get_editor(entry["editor"], overrides=hp, model=model)
    stats = entry.get("stats") or {}
    t_stats = 0.0
    if stats and hasattr(editor, "covariances"):
        src = stats.get("corpus", "offline")
        corpus = Corpus.offline_default() if src == "offline" else Corpus.from_path(src)
        t = time.perf_counter()
        layers = list(editor.hparams.layers)
        covs = second_moments(model, tok, layers, corpus, tokens=int(stats["tokens"]), progress=False,
                              cache=StatsCache())
        t_stats = time.perf_counter() - t
        editor._cov = {l: c.double() for l, c in covs.items()}
    b = int(entry.get("batch", 0))
    t0 = time.perf_counter()
    if b == 0:
        res = run_single(editor, model, tok, facts, progress=False)
        outcomes = res.outcomes
        seconds = [o.seconds for o in outcomes]
    else:
        outcomes, seconds = [], []
        for i in range(0, len(facts), b):
            r = run_batch(editor, model, tok, facts[i:i + b])
            outcomes += r.outcomes
            seconds.append(sum(x.seconds for x in r.results))
            r.restore(model)
    wall = time.perf_counter() - t0
    pre_ns = [o.pre.ns for o in outcomes]
    post_ns = [o.post.ns for o in outcomes]
    drop = [a - b_ for a, b_ in zip(pre_ns, post_ns) if a is not None and b_ is not None]
    row = {
        "name": entry["name"], "editor": entry["editor"], "batch": b, "hparams": hp, "stats": stats,
        "n": len(outcomes),
        "es": _mean(o.post.es for o in outcomes), "ps": _mean(o.post.ps for o in outcomes),
        "ns": _mean(post_ns), "ns_unedited": _mean(pre_ns),
        "ns_drop": _mean(drop), "ns_drop_ci": _ci(bootstrap_ci(drop)) if drop else None,
        "retention_new": _mean(o.post.retained_new for o in outcomes),
        "s_per_edit": sum(seconds) / len(outcomes), "wall_s": wall, "stats_s": t_stats,
        "layers": list(editor.hparams.layers),
    }
    ns_info = getattr(editor, "nullspace_info", None)
    if ns_info:
        row["nullspace"] = {str(k): v for k, v in ns_info.items()}
    return row


def _all_position_logits(model):
    """Forward hook on the base model: the reference's full-vocabulary log-softmax at
    every position, added ×0 to the hidden states (same values, the reference's cost)."""
    unembed = model.get_output_embeddings()

    def hook(module, args, out):
        h = out.last_hidden_state
        out.last_hidden_state = h + 0.0 * unembed(h).float().log_softmax(-1).sum()
        return out

    return hook


def vs_reference_loop(model, tok, facts, n: int, methods=("rome", "memit", "alphaedit")) -> list[dict]:
    """Seconds per edit of the defaults and of the reference loop (see the module doc)."""
    from editdecay.editing import get_editor

    rows = []
    for method in methods:
        eds = {"defaults": get_editor(method, model=model),
               "reference loop": get_editor(method, model=model, overrides={"cache_prefix": False})}
        for ed in eds.values():  # templates and statistics are set-up costs, not per edit
            ed.templates(model, tok)
            ed.covariances(model, tok, list(ed.hparams.layers))
        secs = {k: [] for k in eds}
        for f in facts[:n]:
            for k, ed in eds.items():
                handle = model.base_model.register_forward_hook(_all_position_logits(model)) if k != "defaults" else None
                try:
                    res = ed.edit(model, tok, [f])
                finally:
                    if handle is not None:
                        handle.remove()
                secs[k].append(res.seconds)
                res.restore(model)
        d, r = (sum(secs[k]) / n for k in eds)
        rows.append({"editor": method, "n": n, "s_per_edit": d, "s_per_edit_reference_loop": r, "ratio": d / r})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, help="YAML list of entries (default: the shipped defaults)")
    ap.add_argument("--editor", help="one entry with this editor (with --set, --batch)")
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--pool", type=int, default=4000, help="candidate facts run through the confidence filter")
    ap.add_argument("--facts", type=Path, default=SHARED / "counterfact" / "counterfact-train.json")
    ap.add_argument("--only", action="append", default=[], help="run only entries with these names")
    ap.add_argument("--vs-reference-loop", type=int, metavar="N", help="time N single edits per editor against the reference loop")
    ap.add_argument("--out", type=Path, help="append JSON lines here (resumes: names already there are skipped)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.editor:
        hp = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
        grid = [{"name": f"{args.editor}-" + (",".join(args.set) or "default"), "editor": args.editor,
                 "batch": args.batch, "hparams": hp}]
    elif args.grid:
        grid = yaml.safe_load(args.grid.read_text())
    else:
        grid = DEFAULT_GRID
    if args.vs_reference_loop:
        from editdecay import load_model

        model, tok = load_model(device="cpu")
        facts = filtered_facts(model, tok, args.facts, args.vs_reference_loop, args.pool)
        methods = [args.editor] if args.editor else ("rome", "memit", "alphaedit")
        for row in vs_reference_loop(model, tok, facts, args.vs_reference_loop, methods):
            print(json.dumps(row), flush=True)
        return
    if args.only:
        grid = [g for g in grid if g["name"] in args.only]
    done = set()
    if args.out and args.out.exists():
        done = {json.loads(l)["name"] for l in args.out.read_text().splitlines() if l.strip()}
    todo = [g for g in grid if g["name"] not in done]
    if not todo:
        return
    from editdecay import load_model

    model, tok = load_model(device="cpu")
    facts = filtered_facts(model, tok, args.facts, args.n, args.pool)
    for entry in todo:
        row = run_entry(model, tok, facts, entry)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
