"""The long crash run: a 3-recipe run (GGUF Q8_0, GGUF Q4_K_M with imatrix, safetensors F16, each validated and
published) killed at 20 points read from its step log — every step's progress line, twice, once with SIGKILL (kill -9)
and once with Ctrl-C (SIGINT to the process group) — resumed after each. After every kill: no process of the run
left, nothing half-written visible, every visible artifact verifies, nothing finished lost. A last run goes to the end
and answers every finished step from the store.

    python bench/crashes.py      # writes bench/out/crashes.json, prints a summary line
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.crashes import KillPoint, kill_at, resume  # noqa: E402

OUT = REPO / "bench" / "out" / "crashes.json"
# the progress lines of the 3-recipe run in the order the embedded run (one step at a time) prints them
LINES = ["download tiny-llama", "convert tiny-llama", "quantize gguf_q8_0", "reference log-probabilities",
         "validate gguf_q8_0", "imatrix", "quantize gguf_q4_k_m", "validate gguf_q4_k_m",
         "reference log-probabilities", "validate safetensors_f16"]


def rounds() -> list[list[KillPoint]]:
    first = [KillPoint(line, signal.SIGKILL if i % 2 == 0 else signal.SIGINT) for i, line in enumerate(LINES)]
    second = [KillPoint(p.line, signal.SIGINT if p.sig == signal.SIGKILL else signal.SIGKILL) for p in first]
    return [first, second]


def main() -> dict:
    outcomes, resumes = [], []
    for points in rounds():
        with tempfile.TemporaryDirectory(prefix="quantmill-crashes-") as tmp:
            root, finished = Path(tmp), set()
            for point in points:
                o = kill_at(root, point, finished)
                outcomes.append({"line": point.line, "signal": point.sig.name, "exit": o.returncode,
                                 "ended_s": o.ended_s, "left_behind": len(o.left_behind), "hits": len(o.hits),
                                 "lost": len(o.lost), "problems": o.problems})
                finished = o.hits
            out, reused = resume(root)
            resumes.append({"steps": len(out["steps"]), "reused": len(reused),
                            "failed": sum(s["status"] == "failed" for s in out["steps"])})
    ints = [o["ended_s"] for o in outcomes if o["signal"] == "SIGINT"]
    result = {
        "kill_points": len(outcomes), "outcomes": outcomes, "resumes": resumes,
        "sigint_end_median_s": round(statistics.median(ints), 2), "sigint_end_max_s": max(ints),
        "processes_left": sum(o["left_behind"] for o in outcomes),
        "visible_problems": sum(len(o["problems"]) for o in outcomes),
        "finished_steps_lost": sum(o["lost"] for o in outcomes),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": date.today().isoformat(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    return result


def markdown(r: dict) -> str:
    steps = ", ".join(f"{x['reused']}/{x['steps']} reused" for x in r["resumes"])
    return (f"{r['kill_points']} kill points: {r['processes_left']} processes left, {r['visible_problems']} visible "
            f"problems, {r['finished_steps_lost']} finished steps lost; Ctrl-C ended the run in median "
            f"{r['sigint_end_median_s']} s (max {r['sigint_end_max_s']} s); resumed runs: {steps} "
            f"({r['machine']}, {r['date']})")


if __name__ == "__main__":
    print(markdown(main()))
