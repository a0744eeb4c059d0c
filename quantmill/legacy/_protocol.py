"""The request/response files a legacy script shares with quantmill's CalibratedQuantizer (no quantmill imports).

A script calls ``serve(name, quantize)``: ``quantize(request, ids)`` gets the request and the calibration token
ids, writes the checkpoint to ``request["out"]`` and returns a small JSON-able result.
"""

import json
import sys
from pathlib import Path


def serve(name, quantize):
    request = json.loads(Path(sys.argv[1]).read_text())
    work = Path(request["work"])
    try:
        import torch
        from safetensors.numpy import load_file

        torch.manual_seed(0)
        ids = load_file(str(Path(request["calibration"]) / "calibration.safetensors"))["input_ids"].tolist()
        result = quantize(request, ids)
    except Exception as e:  # noqa: BLE001 - reported to the parent in one line; the traceback is in the log
        import traceback

        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        (work / "error.json").write_text(json.dumps({"error": f"{name}: {type(e).__name__}: {first}"}))
        return 1
    (work / "result.json").write_text(json.dumps({**result, "calibration_samples": len(ids)}))
    return 0
