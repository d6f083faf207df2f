"""Knowledge editors on one core: keys, target vectors, second moments, restore."""

from __future__ import annotations

from .alphaedit import AlphaEdit, AlphaEditHyperParams
from .base import EditError, EditResult, Editor, RequestLog
from .ft import FT, FTHyperParams, ft_hparams
from .malmen import MALMEN, MALMENHyperParams, malmen_hparams
from .memit import MEMIT, MEMITHyperParams, multilayer_hparams
from .mend import MEND, MENDHyperParams, mend_hparams
from .rome import ROME, ROMEHyperParams, rome_hparams

#: Editor classes by method name.
EDITORS = {"rome": ROME, "memit": MEMIT, "alphaedit": AlphaEdit, "ft": FT, "mend": MEND, "malmen": MALMEN}
#: Editors driven by a trained hypernetwork (``checkpoint=``).
HYPERNET_EDITORS = {"mend": mend_hparams, "malmen": malmen_hparams}


def get_editor(method: str, preset: str | None = None, overrides: dict | None = None, model=None,
               checkpoint=None, **kwargs) -> Editor:
    """An editor with hyperparameters from ``preset`` (else derived from ``model``),
    updated by ``overrides``. MEND and MALMEN take ``checkpoint`` (a directory written
    by ``editdecay train-editor``; the same as ``overrides={"checkpoint": ...}``): the
    trained network and its hyperparameters; without one their network is untrained
    (identity: a plain gradient step).

    >>> editor = get_editor("rome", preset="gpt2-xl@reference")
    """
    from ..errors import EditdecayError

    if method not in EDITORS:
        raise EditdecayError(f"unknown editing method {method!r}: available {', '.join(sorted(EDITORS))}")
    if checkpoint is not None:
        if method not in HYPERNET_EDITORS:
            raise EditdecayError(f"an editor checkpoint applies to {' and '.join(HYPERNET_EDITORS)} only, not {method}")
        overrides = {**(overrides or {}), "checkpoint": str(checkpoint)}
    if method == "rome":
        hp, info = rome_hparams(preset, overrides, model)
    elif method == "ft":
        hp, info = ft_hparams(preset, overrides, model)
    elif method in HYPERNET_EDITORS:
        hp, info = HYPERNET_EDITORS[method](preset, overrides, model)
    else:
        hp, info = multilayer_hparams(method, EDITORS[method], preset, overrides, model)
    editor = EDITORS[method](hp, **kwargs)
    editor.preset_info = info
    return editor


__all__ = [
    "EDITORS", "get_editor", "EditError", "EditResult", "Editor", "RequestLog",
    "ROME", "ROMEHyperParams", "rome_hparams", "FT", "FTHyperParams", "ft_hparams", "MEMIT", "MEMITHyperParams", "AlphaEdit", "AlphaEditHyperParams",
    "MEND", "MENDHyperParams", "mend_hparams", "MALMEN", "MALMENHyperParams", "malmen_hparams",
]
