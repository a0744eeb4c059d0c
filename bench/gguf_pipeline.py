"""Benchmark: the pipeline's GGUF Q4_K_M path against llama.cpp's converter + quantizer run directly.

Both sides start from the same synthetic 1.1B-shape Llama (F16 safetensors) on the same machine, one after the
other, alternating, so page-cache state and machine noise hit both alike. Peak RSS is each process tree's own
(``os.wait4``; a parent's figure includes the children it waited for). The pipeline runs with validation and
publishing off, so both sides do the same work: convert to F16 GGUF, quantize to Q4_K_M.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from quantmill.toolchain.llamacpp import locate

HERE = Path(__file__).resolve().parent


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out[-2000:]}")
    return seconds, usage.ru_maxrss * 1024, out


def bare(model: Path, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build = locate()
    t1, r1, _ = measure([sys.executable, build.converter, model, "--outfile", work / "f16.gguf", "--outtype", "f16"],
                        env=build.converter_env())
    t2, r2, _ = measure([build.tool("llama-quantize"), work / "f16.gguf", work / "q4_k_m.gguf", "Q4_K_M"])
    shutil.rmtree(work)
    return {"seconds": t1 + t2, "max_rss": max(r1, r2), "convert_s": t1, "quantize_s": t2}


def pipeline_cmd(model: Path, work: Path, name: str) -> list:
    return [Path(sys.executable).parent / "quantmill", "run", "--json", "model=local", f"model.path={model}",
            f"model.name={name}", "recipe=[gguf_q4_k_m]", "recipe.gguf_q4_k_m.imatrix=false",
            "validate.enabled=false", "publish.enabled=false", f"store.root={work / 'store'}",
            f"infra.prefect_home={work / 'prefect'}"]


def pipeline(model: Path, work: Path, name: str, env: dict | None = None) -> dict:
    shutil.rmtree(work / "store", ignore_errors=True)
    seconds, rss, out = measure(pipeline_cmd(model, work, name), env=env)
    steps = {s["spec_id"]: s["seconds"] for s in json.loads(out)["steps"]}
    return {"seconds": seconds, "max_rss": rss, "steps": steps,
            "orchestration_s": seconds - sum(steps.values())}


class PrefectServer:
    """A real Prefect server on a free local port, for the variant that does not pay the temporary-server start."""

    def __init__(self, home: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.proc = subprocess.Popen([Path(sys.executable).parent / "prefect", "server", "start", "--host",
                                      "127.0.0.1", "--port", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self) -> "PrefectServer":
        import urllib.request

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("prefect server did not become healthy in 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(2)
        self.proc.wait(timeout=30)


def first_step_seconds(recipe: str, work: Path, server: str) -> float:
    """Seconds from the command to the first new step's start, adding ``recipe`` to the bundled model's cached
    default pipeline: the latency of a small change."""
    argv = [Path(sys.executable).parent / "quantmill", "run", f"recipe=[gguf_q8_0,gguf_q4_k_m,{recipe}]",
            f"store.root={work / 'small-store'}", f"infra.prefect_home={work / 'small-prefect'}"]
    start = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "QUANTMILL_PREFECT_SERVER": server, "HF_HUB_OFFLINE": "1"})
    first = None
    for line in proc.stderr:  # piped stderr: one "… <step>" line as each step starts
        if first is None and line.startswith("…"):
            first = time.perf_counter() - start
    if proc.wait() != 0 or first is None:
        raise RuntimeError(f"adding {recipe} failed (exit {proc.returncode})")
    return first


def small_change(work: Path) -> dict:
    """Adding one quant to a cached model, with the kept server (after the run that filled the cache started it)
    and with a temporary server per run."""
    shutil.rmtree(work / "small-store", ignore_errors=True)
    fill = [Path(sys.executable).parent / "quantmill", "run", f"store.root={work / 'small-store'}",
            f"infra.prefect_home={work / 'small-prefect'}"]
    subprocess.run([str(a) for a in fill], check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = {"kept": [], "temporary": []}
    for recipe in ("gguf_q6_k", "gguf_q5_k_m", "gguf_q3_k_m", "gguf_q4_0", "gguf_q2_k", "gguf_f16"):
        server = "kept" if len(out["kept"]) <= len(out["temporary"]) else "temporary"
        out[server].append(first_step_seconds(recipe, work, server))
    return out


def main(shape: str = "llama-1.1b", reps: int = 2, cached_reps: int = 5) -> dict:
    import synthetic

    out = HERE / "out"
    model = synthetic.make(shape, out / shape)
    work = out / "work"
    results: dict = {"shape": shape, "params": synthetic.n_params(shape), "bare": [], "pipeline": [],
                     "pipeline_kept": [], "pipeline_server": []}
    results["first_step_s"] = small_change(work)
    temporary, kept = {"QUANTMILL_PREFECT_SERVER": "temporary"}, {"QUANTMILL_PREFECT_SERVER": "kept"}
    # The kept server of the benchmark's PREFECT_HOME is started by one run before the measured ones, as a user's
    # earlier run would have.
    subprocess.run([str(a) for a in pipeline_cmd(model, work, shape)] + ["recipe=[gguf_q8_0]"], env={
        **os.environ, **kept}, capture_output=True)
    with PrefectServer(work / "server-home") as server:
        for _ in range(reps):  # alternate, so drift hits both sides alike
            results["bare"].append(bare(model, work / "bare"))
            results["pipeline"].append(pipeline(model, work, shape, env=temporary))
            results["pipeline_kept"].append(pipeline(model, work, shape, env=kept))
            results["pipeline_server"].append(pipeline(model, work, shape, env={"PREFECT_API_URL": server.url}))
    cached = [measure(pipeline_cmd(model, work, shape))[0] for _ in range(cached_reps)]
    results["cached_rerun_s"] = cached

    med = lambda side, k: statistics.median(r[k] for r in results[side])  # noqa: E731
    b_s, p_s = med("bare", "seconds"), med("pipeline", "seconds")
    b_r, p_r = med("bare", "max_rss"), med("pipeline", "max_rss")
    steps = results["pipeline_kept"][-1]["steps"]
    ps_s, pk_s = med("pipeline_server", "seconds"), med("pipeline_kept", "seconds")
    first = results["first_step_s"]
    results["summary"] = {
        "bare_s": round(b_s, 1), "pipeline_s": round(p_s, 1), "ratio": round(p_s / b_s, 3),
        "pipeline_kept_s": round(pk_s, 1), "ratio_kept": round(pk_s / b_s, 3),
        "orchestration_kept_s": round(med("pipeline_kept", "orchestration_s"), 1),
        "pipeline_server_s": round(ps_s, 1), "ratio_server": round(ps_s / b_s, 3),
        "orchestration_server_s": round(med("pipeline_server", "orchestration_s"), 1),
        "bare_rss_mib": round(b_r / 2**20), "pipeline_rss_mib": round(p_r / 2**20), "rss_ratio": round(p_r / b_r, 3),
        "orchestration_s": round(med("pipeline", "orchestration_s"), 1),
        "cached_rerun_median_s": round(statistics.median(cached), 2),
        "first_step_kept_median_s": round(statistics.median(first["kept"]), 2),
        "first_step_kept_range_s": [round(min(first["kept"]), 2), round(max(first["kept"]), 2)],
        "first_step_temporary_median_s": round(statistics.median(first["temporary"]), 2),
        "steps_s": {k: round(v, 1) for k, v in steps.items()},
    }
    (out / f"gguf_pipeline-{shape}.json").write_text(json.dumps(results, indent=1))
    return results


def markdown(results: dict) -> str:
    s = results["summary"]
    n = len(results["bare"])
    return "\n".join([
        f"| {results['shape']} ({results['params'] / 1e9:.2f}B) | bare tools | quantmill | ratio |",
        "|---|---|---|---|",
        f"| wall time, median of {n}, embedded, kept server | {s['bare_s']} s | {s['pipeline_kept_s']} s | "
        f"{s['ratio_kept']} |",
        f"| wall time, median of {n}, embedded, temporary server | {s['bare_s']} s | {s['pipeline_s']} s | "
        f"{s['ratio']} |",
        f"| wall time, median of {n}, PREFECT_API_URL = running server | {s['bare_s']} s | {s['pipeline_server_s']} s "
        f"| {s['ratio_server']} |",
        f"| peak RSS | {s['bare_rss_mib']} MiB | {s['pipeline_rss_mib']} MiB | {s['rss_ratio']} |",
        f"| fully cached re-run, median of {len(results['cached_rerun_s'])} | | {s['cached_rerun_median_s']} s | |",
        f"| one quant added to the cached bundled model: command to first new step, median of "
        f"{len(results['first_step_s']['kept'])} (kept server) | | {s['first_step_kept_median_s']} s "
        f"(range {s['first_step_kept_range_s'][0]}–{s['first_step_kept_range_s'][1]}) | |",
        f"| the same, temporary server | | {s['first_step_temporary_median_s']} s | |",
        "",
        f"Pipeline steps (s): {s['steps_s']}; time outside the step functions: {s['orchestration_kept_s']} s with "
        f"the kept server, {s['orchestration_s']} s with a temporary one, {s['orchestration_server_s']} s with a "
        f"running server.",
    ])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    r = main(*(sys.argv[1:2] or []))
    print(markdown(r))
