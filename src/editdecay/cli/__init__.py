"""The ``editdecay`` command line: a thin layer over the Python API.

Every command that takes ``--json`` prints one JSON document on stdout with the schema
given in its help; logs and progress go to stderr. User errors print
``error: <message>`` on stderr and exit with status 2.

The commands live in one module per group (:mod:`.probing`, :mod:`.editing`,
:mod:`.facts`, :mod:`.finetune`, :mod:`.evaluation`, :mod:`.study`, :mod:`.editors`,
:mod:`.forensics`); this module builds ``app`` from them.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from .. import __version__
from ..errors import EditdecayError
from . import editing, editors, evaluation, facts, finetune, forensics, probing, study

app = typer.Typer(
    name="editdecay",
    help="Edit facts into a language model, fine-tune it, and measure whether the edits survive.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


# Registration order is the order of the help's command list.
app.command("probe")(probing.probe)
app.command("stats")(editing.stats)
app.add_typer(facts.facts_app, name="facts")
app.command("edit")(editing.edit)
app.command("finetune")(finetune.finetune)
app.add_typer(evaluation.eval_app, name="eval")
app.command("trace")(probing.trace)
app.command("demo")(study.demo)
app.command("plan")(study.plan)
app.command("run")(study.run)
app.command("report")(study.report)
app.command("export")(study.export_cmd)
app.command("train-editor")(editors.train_editor)
app.command("inspect")(forensics.inspect)
app.command("reedit")(forensics.reedit)


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one line."""
    try:
        app()
    except EditdecayError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
