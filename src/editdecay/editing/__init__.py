"""Knowledge editors on one core: keys, target vectors, second moments, restore."""

from __future__ import annotations

from .base import EditError, EditResult, Editor, RequestLog
from .rome import ROME, ROMEHyperParams, rome_hparams

#: Editor classes by method name.
EDITORS = {"rome": ROME}


def get_editor(method: str, preset: str | None = None, overrides: dict | None = None, model=None, **kwargs) -> Editor:
    """An editor with hyperparameters from ``preset`` (else derived from ``model``),
    updated by ``overrides``.

    >>> editor = get_editor("rome", preset="gpt2-xl@reference")
    """
    from ..errors import EditdecayError

    if method not in EDITORS:
        raise EditdecayError(f"unknown editing method {method!r}: available {', '.join(sorted(EDITORS))}")
    if method == "rome":
        hp, info = rome_hparams(preset, overrides, model)
        editor = ROME(hp, **kwargs)
        editor.preset_info = info
        return editor
    raise AssertionError(method)


__all__ = ["EDITORS", "get_editor", "EditError", "EditResult", "Editor", "RequestLog", "ROME", "ROMEHyperParams", "rome_hparams"]
