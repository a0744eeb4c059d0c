"""Benchmark: quantmill's KL-divergence evaluation against ``llama-perplexity --kl-divergence``.

Same model files, same text, same context length, same base (the F16 GGUF), same token ids (quantmill is fed the
ids llama-perplexity stored in its base file). Timed: the reference pass over the F16 model plus the evaluation
of a Q4_K_M, on each side, alternating. quantmill's side runs as the pipeline runs it (a subprocess per pass).
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

from quantmill.backends.llamacpp_runtime import LlamaCppRuntime
from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.evaluation import anchors
from quantmill.steps import validate
from quantmill.toolchain.llamacpp import locate

HERE = Path(__file__).resolve().parent
EVAL_TEXT = BUNDLED_ROOT / "text" / "eval.txt"


def ggufs(model_dir: Path, work: Path) -> tuple[Path, Path]:
    """F16 and Q4_K_M GGUFs of ``model_dir`` made with llama.cpp's tools (kept between runs)."""
    work.mkdir(parents=True, exist_ok=True)
    f16, q4 = work / "f16.gguf", work / "q4_k_m.gguf"
    build = locate()
    if not f16.exists():
        subprocess.run([sys.executable, build.converter, model_dir, "--outfile", f16, "--outtype", "f16"],
                       env={**os.environ, **build.converter_env()}, check=True, capture_output=True)
    if not q4.exists():
        subprocess.run([build.tool("llama-quantize"), f16, q4, "Q4_K_M"], check=True, capture_output=True)
    return f16, q4


def one_round(f16: Path, q4: Path, work: Path, n_ctx: int, chunks: int) -> dict:
    base = work / "base.dat"
    t_base = anchors.write_base(f16, EVAL_TEXT, base, n_ctx=n_ctx, chunks=chunks)
    theirs = anchors.kl_divergence(q4, base, n_ctx=n_ctx)

    runtime = LlamaCppRuntime()
    evalset, reference, art = work / "evalset", work / "reference", work / "artifact"
    for d in (reference, art):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    anchors.evalset_from_base(base, evalset, bos=1, eos=2, prompt_ids=[1])
    start = time.perf_counter()
    validate.reference(runtime, _alone(f16, work / "f16"), evalset, reference, threads=0)
    t_ref = time.perf_counter() - start
    start = time.perf_counter()
    ours = validate.validate(runtime, _alone(q4, art), evalset, reference, gates={}, max_tokens=1, threads=0,
                             label="q4_k_m")
    t_cmp = time.perf_counter() - start
    return {"llama_cpp_s": t_base + theirs["seconds"], "quantmill_s": t_ref + t_cmp,
            "llama_cpp": {k: theirs[k] for k in ("mean_kld", "p99_kld", "ppl", "top1_agreement")},
            "quantmill": {k: ours[k] for k in ("mean_kld", "p99_kld", "ppl", "top1_agreement")}}


def _alone(gguf: Path, directory: Path) -> Path:
    """A directory holding only ``gguf`` (hardlinked), as an artifact directory is."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / gguf.name
    if not target.exists():
        target.hardlink_to(gguf)
    return directory


def main(reps: int = 2) -> dict:
    import synthetic

    out = HERE / "out"
    cases = [("tiny-llama", BUNDLED_ROOT / "tiny-llama", 256, 8),
             ("llama-1.1b", synthetic.make("llama-1.1b", out / "llama-1.1b"), 512, 4)]
    results = {}
    for name, model_dir, n_ctx, chunks in cases:
        work = out / "kld" / name
        f16, q4 = ggufs(model_dir, work)
        rounds = [one_round(f16, q4, work, n_ctx, chunks) for _ in range(reps)]
        results[name] = {"n_ctx": n_ctx, "chunks": chunks, "rounds": rounds,
                         "llama_cpp_s": statistics.median(r["llama_cpp_s"] for r in rounds),
                         "quantmill_s": statistics.median(r["quantmill_s"] for r in rounds)}
        results[name]["ratio"] = results[name]["quantmill_s"] / results[name]["llama_cpp_s"]
    (out / "kld_eval.json").write_text(json.dumps(results, indent=1))
    return results


def markdown(results: dict) -> str:
    lines = ["| model | n_ctx × chunks | llama-perplexity (base + KLD) | quantmill (reference + validate) | ratio |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['n_ctx']} × {r['chunks']} | {r['llama_cpp_s']:.1f} s | {r['quantmill_s']:.1f} s "
                     f"| {r['ratio']:.3f} |")
    lines += ["", "| model | metric (Q4_K_M vs F16) | llama-perplexity | quantmill | difference |", "|---|---|---|---|---|"]
    for name, r in results.items():
        theirs, ours = r["rounds"][-1]["llama_cpp"], r["rounds"][-1]["quantmill"]
        for k in ("mean_kld", "p99_kld", "ppl", "top1_agreement"):
            diff = (ours[k] - theirs[k]) / theirs[k] * 100 if theirs[k] else 0.0
            lines.append(f"| {name} | {k} | {theirs[k]:.6g} | {ours[k]:.6g} | {diff:+.2f} % |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    print(markdown(main()))
