"""Input and output helpers of the commands: tables on the console, JSON files, and the
models an analysis command reads (model, 'finetune' output or adapter directories)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import EditdecayError


def print_table(title: str, columns: list[str], rows, *lines: str, **column_options) -> None:
    """Print a rich table (``rows`` of cell strings under ``columns``), then ``lines``."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, **column_options)
    for r in rows:
        t.add_row(*r)
    console = Console()
    console.print(t)
    for line in lines:
        console.print(line)


def write_json(path: Path, doc) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def nan_to_none(x):
    """``x`` with every NaN float (in nested dicts and lists) replaced by None, for JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x


def load_stage(path: str, base: tuple | None = None, device: str | None = None):
    """A model for analysis: a model name or directory, a 'finetune' output directory
    (model/ inside, or adapter/ applied to ``base`` and merged), or an adapter
    directory applied to ``base``."""
    from ..models import load_model

    p = Path(path)
    if (p / "model").is_dir():
        return load_model(str(p / "model"), device=device)
    adapter = p / "adapter" if (p / "adapter").is_dir() else p if (p / "adapter_config.json").exists() else None
    if adapter is None:
        return load_model(path, device=device)
    if base is None:
        raise EditdecayError(f"{path}: an adapter needs the model it was trained on")
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base[0]), str(adapter)).merge_and_unload()
    return model.eval(), base[1]
