"""editdecay: do knowledge edits survive fine-tuning?

Python API (the CLI ``editdecay`` is a thin layer over it)::

    from editdecay import load_model, Prober
    model, tok = load_model()                      # embedded SmolLM2-135M-Instruct
    Prober(model, tok).probe(["The capital of France is"], k=5)
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import DataError, EditdecayError, ModelLoadError, UnsupportedArchitectureError
from .evaluate.probes import Prober
from .models import ARCHS, ArchSpec, DEFAULT_MODEL, get_arch, load_model, model_identity, register_arch

try:
    __version__ = version("editdecay")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__", "load_model", "model_identity", "Prober",
    "ARCHS", "ArchSpec", "get_arch", "register_arch", "DEFAULT_MODEL",
    "EditdecayError", "ModelLoadError", "UnsupportedArchitectureError", "DataError",
]
