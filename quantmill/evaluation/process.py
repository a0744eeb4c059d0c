"""The entry of an evaluation process: ``python -m quantmill.evaluation.process evaluate|sensitivity REQUEST.json``.

A process of its own gives each measurement its own peak-memory figure and keeps a runtime crash from taking the
pipeline down. llama.cpp's library is loaded first, before anything imports numpy: a CUDA build of it loaded after
numpy has brought in its own OpenMP and BLAS runtimes crashes the process at model load (seen with numpy 2.5 and
CUDA 13); loaded first, both work.

Ctrl-C reaches this process with its parent's: it dies by the signal, as a tool does, so the parent sees a run that
was stopped (a negative exit code), not an artifact that failed to load.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path


def main(kind: str, request_file: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    request = json.loads(Path(request_file).read_text())
    if kind == "sensitivity" or request.get("runtime") == "llamacpp":
        from quantmill.toolchain.llamacpp import import_llama_cpp

        import_llama_cpp()
    if kind == "sensitivity":
        from quantmill.evaluation.sensitivity import measure as handler
    else:
        from quantmill.evaluation.evaluate import run as handler
    result = handler(request)
    Path(request["result_path"]).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
