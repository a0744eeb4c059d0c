"""The interfaces every backend of a kind implements, and the small records they exchange."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from quantmill.digest import FileDigest
from quantmill.errors import PreflightError


@dataclass(frozen=True)
class SourceInfo:
    """What preflight learns about a model without downloading its weights.

    Attributes:
        identity: What determines the model's bytes (a commit sha or a content digest); part of the download key.
        config: The model's config.json.
        architecture: ``architectures[0]`` of the config.
        files: The files download will take, with sizes (and sha256 where known).
        uri: Where the model comes from, for provenance.
        base_model: The name a model card calls the base model (hub id or directory name).
    """

    source: str
    identity: dict[str, str]
    config: dict[str, Any]
    architecture: str
    files: list[FileDigest]
    uri: str
    base_model: str
    license: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_bytes(self) -> int:
        return sum(f.size for f in self.files if f.path.endswith((".safetensors", ".bin")))

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "identity": self.identity, "config": self.config,
                "architecture": self.architecture, "files": [f.to_json() for f in self.files], "uri": self.uri,
                "base_model": self.base_model, "license": self.license, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SourceInfo":
        files = [FileDigest(f["path"], f["sha256"], f["size"]) for f in data["files"]]
        return cls(**{**data, "files": files})



class HfTokenizerMethods:
    """Tokenizer methods of runtimes that keep a Hugging Face-style tokenizer on ``model.quantmill_tokenizer``."""

    def tokenize(self, model: Any, text: str) -> list[int]:
        return model.quantmill_tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, model: Any, ids: Sequence[int]) -> str:
        return model.quantmill_tokenizer.decode(list(ids))

    def special_ids(self, model: Any) -> dict[str, int]:
        tok = model.quantmill_tokenizer
        return {"bos": tok.bos_token_id, "eos": tok.eos_token_id}

    def chat_template(self, model: Any) -> str | None:
        return model.quantmill_tokenizer.chat_template


class QuantizerDefaults:
    """What most quantizers answer: no calibration, never the intermediate itself, read from the source model,
    write their first format, accept any model shape.

    ``calibration_input`` says what a calibrated recipe's quantize step takes: ``dataset`` (the tokenized
    calibration set) or ``imatrix`` (an importance matrix the planner computes from it first).
    """

    reads = "source"
    calibration_input = "dataset"
    formats: tuple[str, ...] = ()
    # Output files (glob patterns) that appear under their final name only when complete (written to a temporary
    # name, then renamed): the step hashes them while the quantizer writes the rest (``digest.HashAhead``).
    renamed_when_complete: tuple[str, ...] = ()

    def default_format(self, recipe: Any) -> str:
        return self.formats[0]

    def check_model(self, name: str, recipe: Any, info: SourceInfo) -> None:
        """Checks that need the model's config (e.g. a group size against its widths); none by default."""

    def is_intermediate(self, recipe: Any) -> bool:
        return False

    def needs_calibration(self, recipe: Any) -> bool:
        return False

    def source_recipe(self, recipe: Any) -> Any:
        """A recipe whose artifact this recipe starts from instead of the checkpoint (the planner makes it a step of
        its own, calibrated, cached and keyed like any other), or None."""
        return None


def check_transformers_loads(name: str, info: SourceInfo) -> None:
    """Recipes that load the model with transformers need its architecture in the installed transformers (or the
    model's own code, which preflight already asked the user to trust)."""
    from quantmill.toolchain.model_files import transformers_knows

    model_type = info.config.get("model_type")
    if info.config.get("auto_map") or not model_type or transformers_knows(model_type):
        return
    raise PreflightError(f"recipe {name!r}: model {info.base_model!r} has model_type {model_type!r}, which the "
                         f"installed transformers cannot load; choose a GGUF or MLX recipe, or upgrade transformers")


SHARD_SIZE_UNITS = ("GB", "MB", "KB", "GiB", "MiB", "KiB")


def check_shard_size(name: str, params: Any) -> None:
    """A recipe's ``max_shard_size``, if it sets one, as transformers and huggingface_hub read it: bytes, or digits
    and a unit ("1GB")."""
    import re

    if "max_shard_size" not in params:
        return
    value = params["max_shard_size"]
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return
    if isinstance(value, str) and re.fullmatch(rf"[1-9][0-9]*({'|'.join(SHARD_SIZE_UNITS)})", value, re.IGNORECASE):
        return
    raise PreflightError(f"recipe {name!r}: max_shard_size {value!r} is not a size; write bytes or digits and a unit "
                         f"({', '.join(SHARD_SIZE_UNITS)}), e.g. 1GB")
