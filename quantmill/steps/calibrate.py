"""calibrate: a seeded, tokenized calibration set, and (for GGUF) the importance matrix computed from it."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, Sequence

from quantmill import constants as C
from quantmill.errors import PreflightError
from quantmill.plan.records import CalibrationSetRecord
from quantmill.toolchain.source_tokenizer import SourceTokenizer

log = logging.getLogger(__name__)
_PROGRESS = re.compile(r"\[(?P<done>\d+)/(?P<total>\d+)\]")


def load_texts(cfg: CalibrationSetRecord, files: Sequence[Path]) -> list[str]:
    """Paragraphs of calibration text (files split on blank lines, or dataset rows)."""
    if cfg.source == "files":
        paragraphs = []
        for path in files:
            paragraphs += [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        return paragraphs
    if cfg.source == "hf_dataset":
        try:
            import datasets
        except ImportError:
            raise PreflightError("calibration.source=hf_dataset needs the `datasets` package: "
                                 "pip install datasets") from None
        rows = datasets.load_dataset(cfg.dataset, split=cfg.split)
        return [r[cfg.text_field].strip() for r in rows if r[cfg.text_field].strip()]
    raise PreflightError(f"calibration.source {cfg.source!r} unknown; choose files or hf_dataset")


def calibrate_dataset(cfg: CalibrationSetRecord, model_dir: Path, files: Sequence[Path], out: Path) -> dict[str, Any]:
    """Pack seeded, shuffled paragraphs into ``num_samples`` windows of ``seq_len`` token ids.

    Writes ``calibration.safetensors`` (``input_ids`` int32 [n, seq_len]) for torch quantizers and
    ``calibration.txt`` (the same paragraphs) for llama.cpp's imatrix, which tokenizes for itself.

    Raises:
        PreflightError: fewer windows than ``min_samples`` can be made.
    """
    import numpy as np
    from safetensors.numpy import save_file

    paragraphs = load_texts(cfg, files)
    random.Random(cfg.seed).shuffle(paragraphs)
    encode = SourceTokenizer(model_dir).encode
    windows: list[list[int]] = []
    used: list[str] = []
    current: list[int] = []
    for paragraph in paragraphs:
        if len(windows) >= cfg.num_samples:
            break
        current += encode(paragraph + "\n\n")
        used.append(paragraph)
        while len(current) >= cfg.seq_len and len(windows) < cfg.num_samples:
            windows.append(current[: cfg.seq_len])
            current = current[cfg.seq_len:]
    if len(windows) < cfg.min_samples:
        raise PreflightError(
            f"calibration: only {len(windows)} windows of {cfg.seq_len} tokens can be made from "
            f"{len(paragraphs)} paragraphs, below calibration.min_samples={cfg.min_samples}; add text or lower "
            f"calibration.seq_len / calibration.num_samples")
    if len(windows) < cfg.num_samples:
        log.warning("calibration: %d of %d requested windows of %d tokens (text ran out)",
                    len(windows), cfg.num_samples, cfg.seq_len)
    # No safetensors metadata: its writer orders the map by hash, which would make the bytes vary run to run.
    save_file({"input_ids": np.asarray(windows, dtype=np.int32)}, str(out / C.CALIBRATION_TOKENS_FILE))
    (out / C.CALIBRATION_TEXT_FILE).write_text("\n\n".join(used) + "\n", encoding="utf-8")
    return {"samples": len(windows), "requested": cfg.num_samples, "seq_len": cfg.seq_len,
            "tokens": len(windows) * cfg.seq_len, "paragraphs": len(used)}


def calibrate_imatrix(quantizer_module: Any, model_gguf: Path, calibration: Path, out: Path, *,
                      ctx: int, chunks: int, threads: int, label: str) -> dict[str, Any]:
    """The importance matrix of ``model_gguf`` over the calibration text."""
    return quantizer_module.compute_imatrix(model_gguf, calibration / C.CALIBRATION_TEXT_FILE,
                                            out / C.IMATRIX_FILE, ctx=ctx, chunks=chunks, threads=threads,
                                            label=label)


def calibrate_sensitivity(model_gguf: Path, imatrix_gguf: Path, calibration: Path, out: Path, *, types: Sequence[str],
                          method: str, windows: int, max_measured: int, threads: int) -> dict[str, Any]:
    """Each weight tensor's size and cost at each candidate type (``quantmill.evaluation.sensitivity``), measured
    in a process of its own; written to ``out/sensitivity.json``."""
    import json
    import sys
    import tempfile

    from quantmill.toolchain.tools import run_tool

    with tempfile.TemporaryDirectory(prefix="quantmill-sensitivity-") as tmp:
        request = {"model": str(model_gguf.resolve()), "imatrix": str(imatrix_gguf.resolve()),
                   "calibration": str((calibration / C.CALIBRATION_TOKENS_FILE).resolve()), "types": list(types),
                   "method": method, "windows": windows, "max_measured": max_measured, "threads": threads,
                   "work": str(Path(tmp) / "work"), "result_path": str(Path(tmp) / "result.json")}
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        run_tool([sys.executable, "-m", "quantmill.evaluation.process", "sensitivity", Path(tmp) / "request.json"],
                 name="sensitivity measurement", label="sensitivity", progress=_PROGRESS, cwd=Path(tmp))
        result = json.loads((Path(tmp) / "result.json").read_text())
    # Seconds vary run to run: the step's result keeps them, the artifact's bytes do not.
    seconds = result.pop("seconds")
    (out / C.SENSITIVITY_FILE).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return {"method": result["method"], "tensors": len(result["tensors"]), "types": result["types"],
            "passes": result["passes"], "seconds": seconds,
            "estimate_rank_correlation": result["estimate_rank_correlation"]}
