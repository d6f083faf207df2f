"""Validation helpers of study specs: field paths (:class:`_At`) for one-line errors,
type checks and coercions, and the keys and defaults of the settings dataclasses."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, NoReturn

from ...errors import EditdecayError


class SpecError(EditdecayError):
    """A study spec is malformed; the message names the file and the field path."""


@dataclass(frozen=True)
class _At:
    """A position in the spec (file label and field path) for error messages."""

    src: str
    path: str = ""

    def __truediv__(self, key: object) -> _At:
        return _At(self.src, f"{self.path}.{key}" if self.path else str(key))

    def __getitem__(self, i: int) -> _At:
        return _At(self.src, f"{self.path}[{i}]")

    def fail(self, msg: str) -> NoReturn:
        raise SpecError(f"{self.src}: {self.path}: {msg}" if self.path else f"{self.src}: {msg}")


def yaml_keys(cls: type) -> tuple[str, ...]:
    """The spec keys of a settings dataclass, in field order: each field's name, or the
    ``keys`` of its metadata instead (``()`` for a field that is no key, several names
    for a field that gathers several keys)."""
    return tuple(k for f in fields(cls) for k in f.metadata.get("keys", (f.name,)))


def field_defaults(cls: type) -> dict[str, Any]:
    """Field name → default value of a dataclass (fields without a default are left out)."""
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def _mapping(v: Any, at: _At, known: Sequence[str] | None = None) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        at.fail(f"expected a mapping, got {type(v).__name__} {v!r}")
    bad = [k for k in v if not isinstance(k, str)]
    if bad:
        at.fail(f"keys must be strings, got {bad[0]!r}")
    if known is not None:
        unknown = sorted(set(v) - set(known))
        if unknown:
            at.fail(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return dict(v)


def _list_of(v: Any, at: _At) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        at.fail(f"expected a list, got {type(v).__name__}")
    return v


def _as_list(v: Any, at: _At) -> list[Any]:
    if isinstance(v, (list, tuple)):
        if not v:
            at.fail("expected at least one value")
        return list(v)
    if isinstance(v, Mapping):
        at.fail(f"expected a value or a list of values, got a mapping {dict(v)!r}")
    return [v]


def _str(v: Any, at: _At) -> str:
    if not isinstance(v, str) or not v.strip():
        at.fail(f"expected a non-empty string, got {v!r}")
    return v.strip()


def _choice(v: Any, at: _At, allowed: Sequence[str], lower: bool = True) -> str:
    s = v.strip().lower() if lower and isinstance(v, str) else v
    if s not in allowed:
        at.fail(f"{v!r} is not one of {', '.join(allowed)}")
    return s


def _int(v: Any, at: _At, minimum: int | None = None) -> int:
    out: int | None = None
    if isinstance(v, bool):
        pass
    elif isinstance(v, int):
        out = v
    elif isinstance(v, float) and v.is_integer():
        out = int(v)
    elif isinstance(v, str):
        try:
            f = float(v.replace("_", ""))
            out = int(f) if f.is_integer() else None
        except ValueError:
            out = None
    if out is None:
        at.fail(f"expected an integer, got {v!r}")
    if minimum is not None and out < minimum:
        at.fail(f"expected an integer >= {minimum}, got {out}")
    return out


def _float(v: Any, at: _At, minimum: float | None = None) -> float:
    out: float | None = None
    if isinstance(v, bool):
        pass
    elif isinstance(v, (int, float)):
        out = float(v)
    elif isinstance(v, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            out = float(v)
        except ValueError:
            out = None
    if out is None or not math.isfinite(out):
        at.fail(f"expected a number, got {v!r}")
    if minimum is not None and out < minimum:
        at.fail(f"expected a number >= {minimum}, got {out}")
    return out


def _bool(v: Any, at: _At) -> bool:
    if not isinstance(v, bool):
        at.fail(f"expected true or false, got {v!r}")
    return v


def _opt(v: Any, conv, at: _At, *args):
    return None if v is None else conv(v, at, *args)


def _dc_fields(cls: type) -> dict[str, str]:
    """Field name → annotation text of a dataclass (annotations are strings here)."""
    return {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)) for f in fields(cls)}


def _coerce_fields(cls: type, values: Mapping[str, Any], at: _At, forbidden: Sequence[str] = ()) -> dict[str, Any]:
    """Check keys against the dataclass ``cls`` and coerce numbers by annotation, so that
    ``1e-5`` (a YAML string) and ``1`` for a float field hash like ``1e-05`` and ``1.0``."""
    types = _dc_fields(cls)
    known = [k for k in types if k not in forbidden]
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k not in known:
            (at / k).fail(f"unknown field; known: {', '.join(sorted(known))}")
        t = types[k].replace(" ", "")
        if v is None:
            out[k] = None
        elif t in ("float", "float|None"):
            out[k] = _float(v, at / k)
        elif t in ("int", "int|None"):
            out[k] = _int(v, at / k)
        elif t in ("bool", "bool|None"):
            out[k] = _bool(v, at / k)
        elif t == "tuple[float,float]":
            vs = _as_list(v, at / k)
            out[k] = [_float(x, (at / k)[i]) for i, x in enumerate(vs)]
        else:
            out[k] = v
    return out


def _build(cls: type, values: Mapping[str, Any], at: _At, context: str = "") -> Any:
    """Construct the dataclass (its ``__post_init__`` validates); errors name ``at``."""
    from ...editing.hparams import from_dict

    try:
        return from_dict(cls, dict(values), "x")
    except EditdecayError as e:
        msg = str(e).removeprefix("x: ")
        at.fail(f"{msg}{context}")
