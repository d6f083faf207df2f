"""The registry shape shared by editors and fine-tuning tasks.

:class:`Registry` maps a name to a frozen entry: lookup, ``in``, iteration in
registration order, ``unregister``, and the two errors every registry gives — a duplicate
name says what holds it, an unknown name lists what is available and how to add one.
A subclass sets :attr:`kind` and says how to describe an entry and an unknown name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from .errors import EditdecayError

E = TypeVar("E")


class Registry(Mapping[str, E], Generic[E]):
    """Name → entry, in registration order."""

    kind: str = "entry"

    def __init__(self) -> None:
        self._entries: dict[str, E] = {}

    def describe(self, entry: E) -> str:
        """What holds a name, for the duplicate error."""
        return repr(entry)

    def unknown(self, name: str) -> str:
        """The error message for a name that is not registered."""
        return f"unknown {self.kind} {name!r}: available {', '.join(self._entries)}"

    def _add(self, name: str, entry: E, overwrite: bool) -> E:
        if name in self._entries and not overwrite:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self.describe(self._entries[name])})")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and plugins that replace an entry)."""
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> E:
        try:
            return self._entries[name]
        except KeyError:
            raise EditdecayError(self.unknown(name)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
