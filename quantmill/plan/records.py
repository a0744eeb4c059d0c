"""Each step kind described once: its typed config record and its named inputs.

The planner builds a spec's config from its kind's record (``Record.to_config``, what the cache key hashes); the
executor reads it back with ``Record.of`` and hands the record to the step function, so no second list of fields
has to agree with the first. ``quantmill.execute.RUNNERS`` maps each kind to the function that runs it.

A record's optional fields (``OPTIONAL``) are left out of the config while they are None: adding one never changes
the keys of the specs that do not set it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from quantmill import constants as C
from quantmill.config import CalibrationConfig, SensitivityConfig


@dataclass(frozen=True)
class Record:
    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_config(self) -> dict[str, Any]:
        """The spec's config: every field, less the optional ones that are None."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in self.OPTIONAL and v is None)}

    @classmethod
    def of(cls, config: Mapping[str, Any]):
        """The record a spec's config holds (a spec made elsewhere, e.g. on another worker, included)."""
        return cls(**config)


@dataclass(frozen=True)
class DownloadRecord(Record):
    """What identifies the downloaded checkpoint: its source's identity and file list (and, for a model, whether
    pickled weights and remote code were allowed; an adapter has neither)."""

    identity: Mapping[str, Any]
    files: list[str]
    allow_pickle: bool | None = None
    trust_remote_code: bool | None = None
    OPTIONAL: ClassVar[tuple[str, ...]] = ("allow_pickle", "trust_remote_code")


@dataclass(frozen=True)
class MergeRecord(Record):
    """A LoRA adapter merged into its base: nothing to configure beyond the two inputs."""


@dataclass(frozen=True)
class EvalSetRecord(Record):
    """The evaluation set: token windows of the texts, the smoke prompt and the tokenizer probes."""

    texts: list[Mapping[str, str]]
    n_ctx: int
    n_chunks: int
    prompt: str
    probes: list[str]
    tasks: list[Mapping[str, str]] | None = None  # lm-eval task files and their data files, by name and digest
    task_limit: int | None = None
    kind: str = "evalset"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("tasks", "task_limit")


@dataclass(frozen=True)
class CalibrationSetRecord(Record):
    """The calibration set every calibrated recipe (and the imatrix) of a model shares."""

    source: str
    num_samples: int
    seq_len: int
    seed: int
    min_samples: int
    texts: list[Mapping[str, str]]
    dataset: str | None
    split: str
    text_field: str
    kind: str = "dataset"

    @classmethod
    def from_config(cls, cal: CalibrationConfig, texts: list[Mapping[str, str]]) -> "CalibrationSetRecord":
        """The record of ``calibration`` config ``cal`` over ``texts`` (name and sha256 of each file)."""
        return cls(source=cal.source, num_samples=cal.num_samples, seq_len=cal.seq_len, seed=cal.seed,
                   min_samples=cal.min_samples, texts=texts, dataset=cal.dataset, split=cal.split,
                   text_field=cal.text_field)


@dataclass(frozen=True)
class ImatrixRecord(Record):
    """llama.cpp's importance matrix over the calibration set."""

    ctx: int
    chunks: int
    kind: str = "imatrix"


@dataclass(frozen=True)
class SensitivityRecord(Record):
    """Each GGUF weight tensor's size and quality cost at each candidate type (``calibration.sensitivity``)."""

    types: list[str]
    method: str
    windows: int
    max_measured: int
    kind: str = "sensitivity"

    @classmethod
    def from_config(cls, sensitivity: SensitivityConfig) -> "SensitivityRecord":
        return cls(types=[t.upper() for t in sensitivity.types], method=sensitivity.method,
                   windows=sensitivity.windows, max_measured=sensitivity.max_measured)


@dataclass(frozen=True)
class ConvertRecord(Record):
    """A format's unquantized intermediate: the GGUF converter's output type and model name, or MLX's dtype."""

    outtype: str | None = None
    model_name: str | None = None
    dtype: str | None = None
    OPTIONAL: ClassVar[tuple[str, ...]] = ("outtype", "model_name", "dtype")


@dataclass(frozen=True)
class QuantizeRecord(Record):
    """One recipe's quantization, as its quantizer backend receives it."""

    method: str
    format: str
    quant_type: str
    imatrix: bool
    params: Mapping[str, Any]
    backend: str | None = None
    OPTIONAL: ClassVar[tuple[str, ...]] = ("backend",)


@dataclass(frozen=True)
class ReferenceRecord(Record):
    """The unquantized model's log-probabilities in a runtime, and its greedy continuations of the first windows'
    starts (``flip_prompts`` of ``flip_tokens`` tokens): computed once, shared by every recipe."""

    flip_prompts: int = 0
    flip_tokens: int = 0
    kind: str = "reference"


@dataclass(frozen=True)
class ValidationRecord(Record):
    """An artifact measured against the reference, and the gates it must pass."""

    max_tokens: int
    gates: Mapping[str, Any]
    estimate: Mapping[str, int] | None
    offload_curve: bool | None = None  # the VRAM-wall curve too (GGUF on a CUDA build)
    offload_tokens: int | None = None  # tokens per point of that curve (None: max_tokens)
    kind: str = "artifact"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("offload_curve", "offload_tokens")


@dataclass(frozen=True)
class PublishRecord(Record):
    """What a published version says: its name, where it came from, and whether failures may be published."""

    name: str
    model: str
    recipe: str
    format: str
    base_model: str | None
    adapter: str | None
    tags: list[str]
    license: str | None
    enforce: bool
    destination: str
    signed_by: str | None


@dataclass(frozen=True)
class StepKind:
    """A kind of step: the verb it runs as, its record, and the names of its inputs."""

    name: str
    step: str
    record: type[Record]
    inputs: tuple[str, ...]


KINDS = {k.name: k for k in (
    StepKind("download", C.DOWNLOAD, DownloadRecord, ()),
    StepKind("merge", C.MERGE, MergeRecord, ("base", "adapter")),
    StepKind("evalset", C.VALIDATE, EvalSetRecord, ("model",)),
    StepKind("dataset", C.CALIBRATE, CalibrationSetRecord, ("model",)),
    StepKind("imatrix", C.CALIBRATE, ImatrixRecord, ("model", "calibration")),
    StepKind("sensitivity", C.CALIBRATE, SensitivityRecord, ("model", "imatrix", "calibration")),
    StepKind("convert", C.CONVERT, ConvertRecord, ("model",)),
    StepKind("quantize", C.QUANTIZE, QuantizeRecord, ("model", "calibration", "imatrix", "sensitivity")),
    StepKind("reference", C.VALIDATE, ReferenceRecord, ("model", "evalset")),
    StepKind("artifact", C.VALIDATE, ValidationRecord, ("artifact", "evalset", "reference")),
    StepKind("publish", C.PUBLISH, PublishRecord, ("artifact", "source", "validation")),
)}


def kind_of(step: str, config: Mapping[str, Any]) -> StepKind:
    """The kind of a spec: its config's ``kind`` where the verb has several, else the verb's own."""
    return KINDS[config.get("kind", step)]
