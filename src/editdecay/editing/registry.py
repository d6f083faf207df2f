"""Editor registry: one entry per editing method, filled by :func:`register_editor`.

An entry names the editor class, its hyperparameter dataclass and how a named preset
(or the model, for a derived preset) and overrides resolve to hyperparameters. The
study spec validates ``hparams:`` against the entry's class, ``get_editor`` is a lookup,
and an external editor is one file that calls::

    register_editor("my-editor", cls=MyEditor, hparams=MyHyperParams)

(``resolve`` defaults to presets from ``editdecay/editing/presets/<name>.yaml``, else
the dataclass defaults, then the overrides).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..registry import Registry
from .hparams import from_dict, load_preset

Resolver = Callable[[str | None, dict | None, nn.Module | None], tuple[Any, dict]]
"""``resolve(preset, overrides, model) -> (hparams, info)``; ``info["preset"]`` names
what was used ('derived', 'default' or the preset)."""


@dataclass(frozen=True)
class EditorEntry:
    """One registered editing method."""

    name: str
    cls: type
    hparams: type
    resolve: Resolver
    checkpoint: bool = False
    """Driven by a trained network: ``get_editor(..., checkpoint=DIR)`` applies."""


def preset_resolver(name: str, hparams: type) -> Resolver:
    """The default resolver: a named preset of ``name``, else the defaults; then overrides."""

    def resolve(preset, overrides, model):
        base = load_preset(name, preset) if preset else {}
        info = {"preset": preset or "default"}
        return from_dict(hparams, {**base, **(overrides or {})}, where=f"{name} hyperparameters ({info['preset']})"), info

    return resolve


class EditorRegistry(Registry[EditorEntry]):
    """Maps a method name to its :class:`EditorEntry`."""

    kind = "editor"

    def describe(self, entry: EditorEntry) -> str:
        return entry.cls.__name__

    def unknown(self, name: str) -> str:
        return (f"unknown editing method {name!r}: available {', '.join(sorted(self))}; add one with "
                "editdecay.editing.register_editor(name, cls=..., hparams=...)")

    def register(self, name: str, *, cls: type, hparams: type | None = None, resolve: Resolver | None = None,
                 checkpoint: bool = False, overwrite: bool = False) -> EditorEntry:
        hparams = hparams if hparams is not None else getattr(cls, "hparams_cls", None)
        if not isinstance(name, str) or not name or name == "none":
            raise ValueError(f"editor name must be a non-empty string other than 'none', got {name!r}")
        if not callable(getattr(cls, "edit", None)):
            raise TypeError(f"editor {name!r}: {cls!r} has no edit(model, tokenizer, requests) method")
        if hparams is None or not dataclasses.is_dataclass(hparams):
            raise TypeError(f"editor {name!r}: hparams must be a dataclass of hyperparameters, got {hparams!r}")
        return self._add(name, EditorEntry(name, cls, hparams, resolve or preset_resolver(name, hparams), checkpoint),
                         overwrite)


#: The process-wide editor registry (extend with :func:`register_editor`).
EDITOR_REGISTRY = EditorRegistry()


def register_editor(name: str, *, cls: type, hparams: type | None = None, resolve: Resolver | None = None,
                    checkpoint: bool = False, overwrite: bool = False) -> EditorEntry:
    """Register an editing method (``hparams`` defaults to ``cls.hparams_cls``)."""
    return EDITOR_REGISTRY.register(name, cls=cls, hparams=hparams, resolve=resolve, checkpoint=checkpoint,
                                    overwrite=overwrite)


class EditorClasses(Mapping[str, type]):
    """Read-only view: method name → editor class (``EDITORS[name]``)."""

    def __init__(self, registry: EditorRegistry) -> None:
        self._registry = registry

    def __getitem__(self, name: str) -> type:
        if name not in self._registry:
            raise KeyError(name)
        return self._registry[name].cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)
