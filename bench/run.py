"""Run every CPU benchmark and print its table: ``make bench`` (or ``python bench/run.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import domains  # noqa: E402
import gguf_pipeline  # noqa: E402
import kld_eval  # noqa: E402
import onnx_builder  # noqa: E402
import task_accuracy  # noqa: E402


class _OnnxSpeed:
    main = staticmethod(onnx_builder.speed)
    markdown = staticmethod(onnx_builder.speed_markdown)


class _Tasks:
    main = staticmethod(lambda: task_accuracy.main(["bundled", "deep"]))
    markdown = staticmethod(task_accuracy.markdown)


BENCHMARKS = {"gguf_pipeline": gguf_pipeline, "kld_eval": kld_eval, "onnx_builder": onnx_builder,
              "onnx_speed": _OnnxSpeed, "domains": domains, "task_accuracy": _Tasks}

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(BENCHMARKS)
    for name in chosen:
        print(f"## {name}\n")
        print(BENCHMARKS[name].markdown(BENCHMARKS[name].main()), "\n", flush=True)
