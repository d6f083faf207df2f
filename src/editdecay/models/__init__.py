"""Models: :func:`load_model`, embedded models, and the architecture registry."""

from .arch import ARCHS, ArchSpec, get_arch, register_arch
from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModel
from .loading import load_model, model_identity, place_model, resolve_device, resolve_dtype, save_model

__all__ = [
    "ARCHS", "ArchSpec", "get_arch", "register_arch",
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "EmbeddedModel",
    "load_model", "model_identity", "place_model", "resolve_device", "resolve_dtype", "save_model",
]
