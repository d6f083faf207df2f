"""``editdecay inspect``: which blocks of a model were edited, how many edits, which facts.

Registered in :mod:`editdecay.cli`; the analysis is :mod:`editdecay.forensics`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import EditdecayError


def inspect(
    suspect: Annotated[str, typer.Option(help="The model to inspect: a model directory, 'editdecay finetune' output or embedded name.")],
    out: Annotated[Path, typer.Option(help="Output directory (inspect.json).")],
    base: Annotated[Optional[str], typer.Option(help="The model it was made from (omit for the base-free score only).")] = None,
    facts: Annotated[Optional[Path], typer.Option(help="Candidate facts (any supported format): which of them the edit matches, whose answers differ.")] = None,
    adapter_on: Annotated[Optional[str], typer.Option(help="When --suspect is an adapter: the model it was trained on (default: --base).")] = None,
    outlier_ratio: Annotated[float, typer.Option(min=1.0, help="After fine-tuning: a block is edited when σ₁ of its rewrite diff is this many times the other blocks' median.")] = 3.0,
    top_k: Annotated[int, typer.Option(min=1, help="Facts listed in the table.")] = 10,
    device: Annotated[Optional[str], typer.Option(help="Device (default: cuda if available, else cpu).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document (schema in this help) instead of a table.")] = False,
) -> None:
    """Edit forensics: per block of SUSPECT, was it edited by a locate-then-edit method,
    fine-tuned or left unchanged, judged from the singular values of W_suspect − W_base.

    JSON schema (also OUT/inspect.json): {"schema": "editdecay.inspect/1", "base",
    "suspect", "settings", "edited_blocks": [int], "n_edits": int, "blocks": [{"block",
    "verdict": "edited"|"fine-tuned"|"unchanged", "score", "rank", "n_edits",
    "changed_modules", "signature"}], "modules": [{"name", "block", "rewrite", "shape",
    "norm", "rel_norm", "rank", "top_sv"}] (changed only), "facts": [{"case_id",
    "subject", "score", "block", "answer_base", "answer_suspect", "answer_changed"}]
    (best match first), "base_free": [{"block", "score", "log_gap"}]}. Without --base
    only "base_free" is filled. "score" is null for an isolated edit (no background).
    """
    from .cli import _load_stage, _print_table, _write_json
    from .facts.datasets import load_facts
    from .forensics import Inspection, inspect_models, spectral_anomaly

    if base is None and facts is not None:
        raise EditdecayError("--facts needs --base (facts are matched against the weight difference)")
    cands = load_facts(facts) if facts is not None else []
    if base is None:
        s, _ = _load_stage(suspect, device=device)
        ins = Inspection([], [], {}, base_free=spectral_anomaly(s))
    else:
        b = _load_stage(base, device=device)
        on = _load_stage(adapter_on, device=device) if adapter_on else b
        s, _ = _load_stage(suspect, on, device)
        ins = inspect_models(b[0], s, b[1], cands, outlier_ratio=outlier_ratio)
    doc = {"base": base, "suspect": suspect, **ins.to_json()}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "inspect.json", doc)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    if base is not None:
        rows = [[str(v.block), v.verdict, v.signature, "∞" if v.score == float("inf") else f"{v.score:.1f}",
                 str(v.rank), str(v.n_edits)] for v in ins.blocks if v.verdict != "unchanged"]
        _print_table(f"blocks of {suspect} against {base}", ["block", "verdict", "signature", "score", "rank", "edits"],
                     rows, f"edited blocks {ins.edited_blocks}, estimated edits {ins.n_edits}; "
                     f"{sum(v.verdict == 'unchanged' for v in ins.blocks)} blocks unchanged; wrote {out / 'inspect.json'}")
    if ins.facts:
        _print_table(f"best-matching facts (of {len(ins.facts)})", ["case", "subject", "score", "block", "base → suspect"],
                     [[f.case_id, f.subject, f"{f.score:.3f}", str(f.block), f"{f.answer_base!r} → {f.answer_suspect!r}"]
                      for f in ins.facts[:top_k]])
    top = sorted(ins.base_free, key=lambda r: -r["score"])[:3]
    typer.echo("base-free spectral score, highest blocks: " + ", ".join(f"{r['block']} ({r['score']:+.2f})" for r in top))
