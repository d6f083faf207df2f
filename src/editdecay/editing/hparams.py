"""Typed hyperparameters and named presets (``<family>@<source>``) per editor."""

from __future__ import annotations

import dataclasses
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..errors import EditdecayError

T = TypeVar("T")


def presets(method: str) -> dict[str, dict[str, Any]]:
    """All presets of ``method`` (from ``editdecay/editing/presets/<method>.yaml``)."""
    res = files("editdecay.editing.presets").joinpath(f"{method}.yaml")
    if not res.is_file():
        return {}
    return yaml.safe_load(res.read_text(encoding="utf-8")) or {}


def load_preset(method: str, name: str) -> dict[str, Any]:
    """One preset's values (without its ``source`` note)."""
    all_ = presets(method)
    if name not in all_:
        raise EditdecayError(f"unknown {method} preset {name!r}: available {', '.join(sorted(all_)) or 'none'}")
    return {k: v for k, v in all_[name].items() if k != "source"}


def from_dict(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build the dataclass ``cls``; unknown or ill-typed fields give a one-line error."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise EditdecayError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise EditdecayError(f"{where}: {e}") from None


def read_hparams_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EditdecayError(f"{p}: no such file") from None
    except yaml.YAMLError as e:
        raise EditdecayError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EditdecayError(f"{p}: expected a mapping of hyperparameters")
    data.pop("source", None)
    return data
