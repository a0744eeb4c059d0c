"""A batch of 2 models x 3 recipes run once, then again and again: what a nightly batch costs when nothing changed.

The project is built in a temporary directory: the bundled tiny Llama and a second tiny Llama (other weights, a
local directory), recipes GGUF Q8_0, GGUF Q4_K_M (imatrix) and safetensors F16, each run validated. Timed as the
user sees it: `quantmill batch pair` as a process (interpreter start, composing 2 entries, describing both models,
resolving every step's key). Then the watch of the same batch: `quantmill watch pair --once` with nothing changed.

    python bench/batch_cached.py [REPS]     # writes bench/out/batch_cached.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import QUICK, project  # noqa: E402

OUT = REPO / "bench" / "out" / "batch_cached.json"
BATCH = "recipes: [gguf_q8_0, gguf_q4_k_m, safetensors_f16]\noverrides: [{quick}]\nmodels: [tiny_llama, tiny_b]\n"


def timed(args: list[str], cwd: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantmill.cli", *args, "--json"], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout)


def main(reps: int = 5) -> dict:
    with tempfile.TemporaryDirectory(prefix="quantmill-bench-") as tmp:
        root = Path(tmp)
        conf = project(root, batch=BATCH.format(quick=", ".join(QUICK)))
        args = ["batch", "pair", "--config-dir", str(conf)]
        first_s, first = timed(args, root)
        cached = [timed(args, root) for _ in range(reps)]
        watch = ["watch", "pair", "--once", "--config-dir", str(conf)]
        timed(watch, root)  # the first pass records both revisions (every step cached)
        unchanged = [timed(watch, root) for _ in range(reps)]
    assert all(r["ran"] == 0 for _, out in cached for r in out["results"])
    assert all(out["triggered"] == 0 for _, out in unchanged)
    median = statistics.median(s for s, _ in cached)
    result = {
        "runs": len(first["results"]), "first_s": round(first_s, 2),
        "cached_s": [round(s, 3) for s, _ in cached], "cached_median_s": round(median, 3),
        "cached_steps_ran": sum(r["ran"] for _, out in cached for r in out["results"]),
        "watch_unchanged_s": [round(s, 3) for s, _ in unchanged],
        "watch_unchanged_median_s": round(statistics.median(s for s, _ in unchanged), 3),
        "ratio_first_to_cached": round(first_s / median, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": date.today().isoformat(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    return result


def markdown(r: dict) -> str:
    return (f"Batch of {r['runs']} runs (2 models x 3 recipes): first run {r['first_s']:.0f} s; "
            f"again, nothing changed: median {r['cached_median_s']:.2f} s over "
            f"{len(r['cached_s'])} runs ({r['cached_steps_ran']} steps ran; {r['ratio_first_to_cached']}x faster "
            f"than the first); `watch --once` with no upstream change: median {r['watch_unchanged_median_s']:.2f} s "
            f"({r['machine']}, {r['date']})")


if __name__ == "__main__":
    print(markdown(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)))
