"""Knowledge editors on one core: keys, target vectors, second moments, restore."""

from __future__ import annotations

from .alphaedit import AlphaEdit, AlphaEditHyperParams
from .base import EditError, EditResult, Editor, RequestLog
from .ft import FT, FTHyperParams, ft_hparams
from .memit import MEMIT, MEMITHyperParams, multilayer_hparams
from .rome import ROME, ROMEHyperParams, rome_hparams

#: Editor classes by method name.
EDITORS = {"rome": ROME, "memit": MEMIT, "alphaedit": AlphaEdit, "ft": FT}


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
    elif method == "ft":
        hp, info = ft_hparams(preset, overrides, model)
    else:
        hp, info = multilayer_hparams(method, EDITORS[method], preset, overrides, model)
    editor = EDITORS[method](hp, **kwargs)
    editor.preset_info = info
    return editor


__all__ = [
    "EDITORS", "get_editor", "EditError", "EditResult", "Editor", "RequestLog",
    "ROME", "ROMEHyperParams", "rome_hparams", "FT", "FTHyperParams", "ft_hparams", "MEMIT", "MEMITHyperParams", "AlphaEdit", "AlphaEditHyperParams",
]
