"""``editdecay facts``: select edit/intrinsic sets and score facts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EditdecayError
from ..models.embedded import DEFAULT_MODEL
from .options import DeviceOpt, JsonOpt, ModelOpt
from .output import nan_to_none, print_table, write_json

facts_app = typer.Typer(help="Fact datasets: select edit/intrinsic sets, score facts.", no_args_is_help=True)

DATASETS = ("counterfact", "zsre", "builtin")


def _load_dataset(dataset: str, data: Optional[Path], zsre_preset: str):
    from ..facts.datasets import load_facts

    if dataset not in DATASETS:
        raise EditdecayError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    if dataset == "builtin":
        return load_facts("", format="builtin")
    if data is None:
        raise EditdecayError(f"--data PATH is required for --dataset {dataset} (a file or a directory of JSON files)")
    facts = load_facts(data, zsre_preset=zsre_preset)
    wrong = [f for f in facts if (f.metric == "zsre") != (dataset == "zsre")]
    if wrong:
        raise EditdecayError(f"{data}: record {facts.index(wrong[0])} is not a {dataset} record")
    return facts


@facts_app.command("select")
def facts_select(
    dataset: Annotated[str, typer.Option(help="counterfact | zsre | builtin.")],
    out: Annotated[Path, typer.Option(help="Output directory (edit.jsonl, intrinsic.jsonl, selection.json).")],
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[Optional[Path], typer.Option(help="Dataset file or directory (any supported format).")] = None,
    n_edit: Annotated[int, typer.Option("--n-edit", min=0, help="Facts in the edit set.")] = 50,
    n_intrinsic: Annotated[int, typer.Option("--n-intrinsic", min=0, help="Facts in the intrinsic set.")] = 100,
    margin: Annotated[float, typer.Option(help="Confidence margin p(true) - p(second).")] = 0.1,
    mode: Annotated[str, typer.Option(help="Probe mode: greedy | masked_argmax.")] = "greedy",
    seed: Annotated[int, typer.Option(help="Seed of the edit/intrinsic split.")] = 0,
    zsre_preset: Annotated[str, typer.Option(help="zsRE targets: memit (answers[0] as new) | easyedit (alt as new).")] = "easyedit",
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Confidence-filter a dataset and split it into disjoint edit and intrinsic sets.

    Writes OUT/edit.jsonl and OUT/intrinsic.jsonl (FactRecords) and OUT/selection.json
    (the statistics of seed 000 Table 3; also printed with --json).
    """
    from ..facts.datasets import write_facts
    from ..facts.selection import select_facts
    from ..models import load_model

    facts = _load_dataset(dataset, data, zsre_preset)
    m, tok = load_model(model, device=device)
    sel = select_facts(m, tok, facts, n_edit=n_edit, n_intrinsic=n_intrinsic, margin=margin, mode=mode, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_facts(sel.edit, out / "edit.jsonl")
    write_facts(sel.intrinsic, out / "intrinsic.jsonl")
    stats = {"dataset": dataset, "data": str(data) if data else None, **sel.stats}
    write_json(out / "selection.json", stats)
    if as_json:
        typer.echo(json.dumps(stats))
        return
    print_table(f"selection ({dataset}, {mode}, margin {margin})",
                ["set", "n", "mean p(true)", "mean p(second)", "relations"],
                [(n, str(stats[n]["n"]), f"{stats[n]['mean_p_true']:.3f}", f"{stats[n]['mean_p_second']:.3f}",
                  str(stats[n]["n_relations"])) for n in ("edit", "intrinsic")],
                f"{stats['n_passed']} of {stats['n_total']} facts pass the filter ({stats['pass_rate']:.1%}); wrote {out}")


@facts_app.command("score")
def facts_score(
    file: Annotated[Path, typer.Argument(help="Facts file (any supported format) or directory.")],
    model: ModelOpt = DEFAULT_MODEL,
    mode: Annotated[str, typer.Option(help="Retention probe mode: greedy | masked_argmax.")] = "greedy",
    prob: Annotated[str, typer.Option(help="CounterFact P(x|p): mean (per-token) | joint.")] = "mean",
    zsre_preset: Annotated[str, typer.Option(help="zsRE targets: memit | easyedit.")] = "memit",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N facts.")] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retention of true and new targets and ES/PS/NS of every fact in FILE.

    JSON schema: {"n_facts": int, "mode": str, "retention_true": float, "retention_new":
    float, "es": float, "ps": float, "ns": float, "facts": [{"case_id", "first_non_stop",
    "capped", "retained_true", "retained_new", "es", "ps", "ns", "success"}]}; undefined
    means are NaN (written as null).
    """
    from ..evaluate.metrics import score_facts
    from ..facts.datasets import load_facts
    from ..models import load_model

    facts = load_facts(file, zsre_preset=zsre_preset)[:limit]
    m, tok = load_model(model, device=device)
    res = score_facts(m, tok, facts, mode=mode, prob=prob)
    doc = {**res.summary(), "facts": [f.to_dict() for f in res.facts]}
    if as_json:
        typer.echo(json.dumps(nan_to_none(doc)))
        return
    from rich.console import Console

    s = doc  # the summary's keys
    Console().print(
        f"{s['n_facts']} facts ({mode}): retention_true {s['retention_true']:.3f}  retention_new "
        f"{s['retention_new']:.3f}  ES {s['es']:.3f}  PS {s['ps']:.3f}  NS {s['ns']:.3f}"
    )
