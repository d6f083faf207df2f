"""Knowledge editors on one core: keys, target vectors, second moments, restore."""

from __future__ import annotations

from .alphaedit import AlphaEdit, AlphaEditHyperParams
from .base import EditError, EditResult, Editor, RequestLog
from .ft import FT, FTHyperParams, ft_hparams
from .malmen import MALMEN, MALMENHyperParams, malmen_hparams
from .memit import MEMIT, MEMITHyperParams, multilayer_hparams
from .mend import MEND, MENDHyperParams, mend_hparams
from .rome import ROME, ROMEHyperParams, rome_hparams

from .registry import EDITOR_REGISTRY, EditorClasses, EditorEntry, EditorRegistry, register_editor

#: Editor classes by method name (a read-only view of :data:`EDITOR_REGISTRY`).
EDITORS = EditorClasses(EDITOR_REGISTRY)


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

    entry = EDITOR_REGISTRY[method]
    if checkpoint is not None:
        if not entry.checkpoint:
            with_ckpt = sorted(n for n, e in EDITOR_REGISTRY.items() if e.checkpoint)
            raise EditdecayError(f"an editor checkpoint applies to {' and '.join(with_ckpt)} only, not {method}")
        overrides = {**(overrides or {}), "checkpoint": str(checkpoint)}
    hp, info = entry.resolve(preset, overrides, model)
    editor = entry.cls(hp, **kwargs)
    editor.preset_info = info
    return editor


__all__ = [
    "EDITORS", "EDITOR_REGISTRY", "EditorEntry", "EditorRegistry", "register_editor", "get_editor", "EditError", "EditResult", "Editor", "RequestLog",
    "ROME", "ROMEHyperParams", "rome_hparams", "FT", "FTHyperParams", "ft_hparams", "MEMIT", "MEMITHyperParams", "multilayer_hparams", "AlphaEdit", "AlphaEditHyperParams",
    "MEND", "MENDHyperParams", "mend_hparams", "MALMEN", "MALMENHyperParams", "malmen_hparams",
]
