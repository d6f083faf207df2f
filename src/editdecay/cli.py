"""The ``editdecay`` command line: a thin layer over the Python API.

Every command that takes ``--json`` prints one JSON document on stdout with the schema
given in its help; logs and progress go to stderr. User errors print
``error: <message>`` on stderr and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import EditdecayError
from .models.embedded import DEFAULT_MODEL

app = typer.Typer(
    name="editdecay",
    help="Edit facts into a language model, fine-tune it, and measure whether the edits survive.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help=f"Embedded model name, local directory, .gguf file or hub id (default {DEFAULT_MODEL})."),
]
DeviceOpt = Annotated[Optional[str], typer.Option(help="Device (default: cuda if available, else cpu).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document (schema in this help) instead of a table.")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"editdecay {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output on stderr (-v info, -vv debug).")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
def probe(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to probe.", show_default=False)],
    model: ModelOpt = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Number of next tokens to list.")] = 5,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 32,
    as_json: JsonOpt = False,
) -> None:
    """Top-k next tokens and the first non-stop token of greedy decoding for each prompt.

    JSON schema: {"model": str, "results": [{"prompt": str, "top": [{"token": str,
    "prob": float}], "first_non_stop": str}]}. "first_non_stop" is "" when the first 8
    greedy tokens are all stop words or punctuation.
    """
    from .evaluate.probes import Prober
    from .models import load_model

    m, tok = load_model(model, device=device)
    results = Prober(m, tok, batch_size=batch_size).probe(prompts, k=top_k)
    doc = {
        "model": model,
        "results": [
            {
                "prompt": r.prompt,
                "top": [{"token": t.token, "prob": t.prob} for t in r.top],
                "first_non_stop": r.first_non_stop.token,
            }
            for r in results
        ],
    }
    if as_json:
        typer.echo(json.dumps(doc, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"next tokens ({model})")
    table.add_column("prompt")
    table.add_column("first non-stop")
    table.add_column(f"top {top_k}")
    for r in doc["results"]:
        tops = "  ".join(f"{t['token']!r} {t['prob']:.3f}" for t in r["top"])
        table.add_row(r["prompt"], repr(r["first_non_stop"]), tops)
    Console().print(table)


facts_app = typer.Typer(help="Fact datasets: select edit/intrinsic sets, score facts.", no_args_is_help=True)
app.add_typer(facts_app, name="facts")

DATASETS = ("counterfact", "zsre", "builtin")


def _load_dataset(dataset: str, data: Optional[Path], zsre_preset: str):
    from .facts.datasets import load_facts

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
    from .facts.datasets import write_facts
    from .facts.selection import select_facts
    from .models import load_model

    facts = _load_dataset(dataset, data, zsre_preset)
    m, tok = load_model(model, device=device)
    sel = select_facts(m, tok, facts, n_edit=n_edit, n_intrinsic=n_intrinsic, margin=margin, mode=mode, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_facts(sel.edit, out / "edit.jsonl")
    write_facts(sel.intrinsic, out / "intrinsic.jsonl")
    stats = {"dataset": dataset, "data": str(data) if data else None, **sel.stats}
    tmp = out / ".selection.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2))
    tmp.replace(out / "selection.json")
    if as_json:
        typer.echo(json.dumps(stats))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"selection ({dataset}, {mode}, margin {margin})")
    for c in ("set", "n", "mean p(true)", "mean p(second)", "relations"):
        t.add_column(c)
    for name in ("edit", "intrinsic"):
        s = stats[name]
        t.add_row(name, str(s["n"]), f"{s['mean_p_true']:.3f}", f"{s['mean_p_second']:.3f}", str(s["n_relations"]))
    c = Console()
    c.print(t)
    c.print(f"{stats['n_passed']} of {stats['n_total']} facts pass the filter ({stats['pass_rate']:.1%}); wrote {out}")


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
    from .evaluate.metrics import score_facts
    from .facts.datasets import load_facts
    from .models import load_model

    facts = load_facts(file, zsre_preset=zsre_preset)[:limit]
    m, tok = load_model(model, device=device)
    res = score_facts(m, tok, facts, mode=mode, prob=prob)
    doc = {**res.summary(), "facts": [f.to_dict() for f in res.facts]}
    if as_json:
        typer.echo(json.dumps(_nan_to_none(doc)))
        return
    from rich.console import Console

    s = res.summary()
    Console().print(
        f"{s['n_facts']} facts ({mode}): retention_true {s['retention_true']:.3f}  retention_new "
        f"{s['retention_new']:.3f}  ES {s['es']:.3f}  PS {s['ps']:.3f}  NS {s['ns']:.3f}"
    )


def _nan_to_none(x):
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one line."""
    try:
        app()
    except EditdecayError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
