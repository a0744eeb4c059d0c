"""A 3-recipe run killed at six points read from its step log (SIGKILL, Ctrl-C and SIGTERM), resumed after each:
nothing half-written is ever visible, every visible artifact verifies, no process of the run survives, and the last
run finishes with every step that had finished answered from the store. The 20-point version is bench/crashes.py."""

from __future__ import annotations

import signal

from tests.crashes import KillPoint, hits, kill_at, resume

POINTS = [
    KillPoint("convert tiny-llama", signal.SIGKILL),
    KillPoint("quantize gguf_q8_0", signal.SIGINT),
    KillPoint("validate gguf_q8_0", signal.SIGKILL),
    KillPoint("imatrix", signal.SIGTERM),
    KillPoint("validate gguf_q4_k_m", signal.SIGKILL),
    KillPoint("validate safetensors_f16", signal.SIGINT),
]
EXIT = {signal.SIGKILL: -9, signal.SIGINT: 130, signal.SIGTERM: 143}


def test_a_run_killed_at_six_points_resumes_and_never_shows_a_half_written_artifact(tmp_path):
    finished: set[str] = set()
    grew = []
    for point in POINTS:
        outcome = kill_at(tmp_path, point, finished)
        assert outcome.returncode == EXIT[point.sig], (point, outcome)
        assert outcome.ended_s < 10, (point, outcome)
        assert not outcome.left_behind, (point, outcome)
        assert not outcome.problems, (point, outcome)
        assert not outcome.lost, (point, outcome)
        grew.append(len(outcome.hits) - len(finished))
        finished = outcome.hits
    assert sum(grew) > 0 and len(finished) >= 8, grew  # the kills let work through: download, convert, quants …
    out, reused = resume(tmp_path)
    assert reused == finished
    assert all(s["status"] in ("cached", "ran") for s in out["steps"]), out["steps"]
    assert hits(tmp_path) >= {s["key"] for s in out["steps"]}
