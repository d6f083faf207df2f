"""Option types shared by the commands (``--model``, ``--device``, ``--json``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..models.embedded import DEFAULT_MODEL

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help=f"Embedded model name, local directory, .gguf file or hub id (default {DEFAULT_MODEL})."),
]
DeviceOpt = Annotated[Optional[str], typer.Option(help="Device (default: cuda if available, else cpu).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document (schema in this help) instead of a table.")]
