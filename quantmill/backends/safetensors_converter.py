"""The ``safetensors`` format's intermediate is the downloaded Hugging Face checkpoint itself."""

from __future__ import annotations

from quantmill import constants as C
from quantmill.backends import CONVERTERS
from quantmill.backends.base import SourceInfo


class SafetensorsConverter:
    """Identity: nothing to convert, the source checkpoint is what recipes start from and are measured against."""

    key = "safetensors"
    capability = C.CPU
    identity = True

    def check(self, info: SourceInfo, model_name: str) -> None:
        """transformers loads whatever architecture it knows; the runtime check covers the rest."""

    def tools(self) -> dict[str, str]:
        return {}


CONVERTERS.register(SafetensorsConverter.key)(SafetensorsConverter())
# Checkpoints the torch quantizers write are Hugging Face checkpoints too: same intermediate, same reference.
for _fmt in ("compressed-tensors", "gptq", "awq", "bnb"):
    CONVERTERS.register(_fmt)(CONVERTERS.get(SafetensorsConverter.key))
