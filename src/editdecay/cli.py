"""The ``editdecay`` command line: a thin layer over the Python API.

Every command that takes ``--json`` prints one JSON document on stdout with the schema
given in its help; logs and progress go to stderr. User errors print
``error: <message>`` on stderr and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
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


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one line."""
    try:
        app()
    except EditdecayError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
