"""The registry of report sections.

A section function takes a :class:`~editdecay.report.data.StudyData` and returns a
:class:`~editdecay.report.sections.Section`; ``@section(id, title, source)`` records it
with its docstring. :func:`registered` lists the sections in report order: definition
order, unless a section names an explicit ``order`` (a number; the n-th registered
section has order n, so ``order=order_of("summary") + 0.5`` places one right after the
headline). Example::

    @section("my_table", "My table", "issue 99")
    def my_table(d):
        '''What the table shows and from which rows.'''
        sid, title, source = meta(my_table)
        return Section(sid, title, source)
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SectionFn = Callable[[Any], Any]


class DuplicateSectionError(ValueError):
    """A second section was registered under an id already in use."""


@dataclass(frozen=True)
class SectionSpec:
    """One registered section: its id (the report's anchor), title, the reference-card
    item it regenerates (``source``), the function, its docstring and its sort key."""

    id: str
    title: str
    source: str
    fn: SectionFn
    doc: str
    order: float


_REGISTRY: dict[str, SectionSpec] = {}
_COUNTER = itertools.count()


def section(id: str, title: str, source: str = "", *, order: float | None = None) -> Callable[[SectionFn], SectionFn]:
    """Register the decorated function as the report section ``id`` (returned unchanged).
    Raises :class:`DuplicateSectionError` when ``id`` is taken."""

    def register(fn: SectionFn) -> SectionFn:
        n = next(_COUNTER)
        if id in _REGISTRY:
            other = _REGISTRY[id].fn
            raise DuplicateSectionError(f"report section id {id!r} is already registered by "
                                        f"{other.__module__}.{other.__qualname__}; cannot register "
                                        f"{fn.__module__}.{fn.__qualname__} under it")
        _REGISTRY[id] = SectionSpec(id, title, source, fn, inspect.getdoc(fn) or "", float(n if order is None else order))
        return fn

    return register


def registered() -> list[SectionSpec]:
    """Every registered section in report order (ties in definition order)."""
    return sorted(_REGISTRY.values(), key=lambda s: s.order)


def get(id: str) -> SectionSpec:
    """The section registered under ``id`` (KeyError naming the known ids otherwise)."""
    try:
        return _REGISTRY[id]
    except KeyError:
        raise KeyError(f"no report section {id!r}; known: {', '.join(s.id for s in registered())}") from None


def order_of(id: str) -> float:
    """The sort key of the registered section ``id`` (to place another one beside it)."""
    return get(id).order


def spec_of(fn: SectionFn) -> SectionSpec:
    """The registration of the section function ``fn``."""
    for s in _REGISTRY.values():
        if s.fn is fn:
            return s
    raise KeyError(f"{getattr(fn, '__qualname__', fn)!r} is not a registered report section")


def meta(fn: SectionFn) -> tuple[str, str, str]:
    """``(id, title, source)`` of the section function ``fn``."""
    s = spec_of(fn)
    return s.id, s.title, s.source


def unregister(id: str) -> None:
    """Remove the section ``id`` (for tests that register a temporary one)."""
    _REGISTRY.pop(id, None)
