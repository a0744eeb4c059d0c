"""How much each weight tensor of a GGUF model costs in quality at each candidate type, measured in llama.cpp.

Run in a process of its own (``quantmill.evaluation.process``), as every evaluation is:
it loads llama.cpp's bindings and starts ``llama-quantize`` many times.

For each candidate type the whole model is quantized once (every weight tensor at that type, with the imatrix):
that gives each tensor's exact size at the type and, dequantized with gguf-py, its imatrix-weighted squared error
(the "estimate"). Then, by method:

- ``measured``: each tensor alone at each type, every other tensor left as in the unquantized model; the KL
  divergence of that file against the unquantized model on the calibration windows is the tensor's cost at the type.
- ``estimate``: every tensor of one kind (``attn_q``, ``ffn_down``, ...) at one probe type, measured the same way,
  calibrates the estimates of that kind: cost = estimate x (measured KLD of the kind / sum of its estimates).

Costs of different tensors add up to a good approximation of the cost of the mix (the perturbations are small and
mostly independent), which is what the mixed-precision search relies on; the uniform files' measured KLD is kept to
check that, and with ``measured`` the rank correlation of the estimate against the measurement is reported.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from quantmill.backends.gguf_auto_quantizer import exact_pattern
from quantmill.evaluation import metrics
from quantmill.toolchain.tools import start_tool

UNQUANTIZED = ("F32", "F16", "BF16")
_LAYER = re.compile(r"^blk\.\d+\.")


def kind_of(tensor: str) -> str:
    """``blk.3.attn_q.weight`` -> ``attn_q.weight``: what a tensor is, whatever its layer."""
    return _LAYER.sub("", tensor)


def kind_pattern(kind: str) -> str:
    return r"^(blk\.\d+\.)?" + re.escape(kind) + "$"


class Session:
    """The unquantized model's log-probabilities on the calibration windows, and one file quantized and measured
    against them at a time."""

    def __init__(self, request: dict[str, Any]):
        from safetensors.numpy import load_file

        from quantmill.backends import RUNTIMES
        from quantmill.toolchain.llamacpp import locate

        self.model = Path(request["model"])
        self.imatrix = Path(request["imatrix"])
        self.work = Path(request["work"])
        self.threads = int(request.get("threads") or 0)
        self.runtime = RUNTIMES.get("llamacpp")
        self.quantize_tool = locate().tool("llama-quantize")
        windows = load_file(str(Path(request["calibration"])))["input_ids"][: request["windows"]]
        self.windows = np.asarray(windows)
        self.n_ctx = int(self.windows.shape[1])
        self.passes = 0
        self.reference = self._logprobs(self.model)

    def _logprobs(self, path: Path) -> list[np.ndarray]:
        first = metrics.first_scored(self.n_ctx)
        out = []
        with self.runtime.load(path.parent, n_ctx=self.n_ctx, threads=self.threads) as model:
            bos = self.runtime.special_ids(model)["bos"]
            for window in self.windows:
                logits = self.runtime.logits(model, metrics.window_input(window, bos), first=first)
                out.append(metrics.scored_logprobs(logits, self.n_ctx, offset=first))
        return out

    def quantize(self, rules: list[tuple[str, str]], name: str) -> Path:
        """The model with ``rules`` (pattern, type) applied in order, the rest left unquantized (F16)."""
        out_dir = self.work / name
        out_dir.mkdir(parents=True, exist_ok=True)
        rules_file = out_dir / "tensor-types.txt"
        rules_file.write_text("".join(f"{p}={t.lower()}\n" for p, t in [*rules, (".*", "f16")]))
        out = out_dir / "model.gguf"
        # The base type only has to be a quantized one: llama.cpp applies --tensor-type overrides only then, and
        # every weight tensor is named by a rule.
        cmd = [str(self.quantize_tool), "--imatrix", str(self.imatrix), "--tensor-type-file", str(rules_file),
               str(self.model), str(out), "Q8_0", str(self.threads or os.cpu_count() or 1)]
        # a measurement killed with -9 leaves no llama-quantize behind
        proc = start_tool(cmd, name="llama-quantize", die_with_parent=True)
        output = proc.communicate()[0].decode(errors="replace")
        if proc.returncode != 0 or not out.is_file():
            tail = output.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"llama-quantize failed ({proc.returncode}) on {name}: {tail[0]}")
        return out

    def kld(self, path: Path) -> float:
        """Mean KL divergence of ``path`` from the unquantized model over every scored position."""
        self.passes += 1
        per_window = [(np.exp(r) * (r - q)).sum(axis=-1) for r, q in zip(self.reference, self._logprobs(path))]
        return float(np.concatenate(per_window).mean())


def weighted_errors(model: Path, quantized: Path, imatrix: Path, tensors: list[str]) -> dict[str, float]:
    """Each tensor's imatrix-weighted squared quantization error: sum over rows and columns of
    (w - q)^2 x mean squared activation of the column (tensors without an imatrix entry weigh columns equally)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    wanted = set(tensors)
    act = {t.name: np.asarray(t.data, dtype=np.float64) for t in GGUFReader(imatrix).tensors}
    originals = {t.name: t for t in GGUFReader(model).tensors if t.name in wanted}
    errors = {}
    for t in GGUFReader(quantized).tensors:
        if t.name not in wanted:
            continue
        o = originals[t.name]
        w = dequantize(o.data, o.tensor_type).astype(np.float64)
        q = dequantize(t.data, t.tensor_type).astype(np.float64)
        sums, counts = act.get(t.name + ".in_sum2"), act.get(t.name + ".counts")
        cols = w.shape[-1]
        if sums is not None and counts is not None and sums.size % cols == 0:
            weight = (sums.reshape(-1, cols) / np.maximum(counts.reshape(-1, 1), 1)).mean(axis=0)
        else:
            weight = np.ones(cols)
        errors[t.name] = float((((w - q) ** 2).reshape(-1, cols) * weight).sum())
    return errors


def measure(request: dict[str, Any]) -> dict[str, Any]:
    from gguf import GGUFReader

    start = time.perf_counter()
    types = [t.upper() for t in request["types"]]
    session = Session(request)
    reader = GGUFReader(session.model)
    total_elements = sum(int(t.n_elements) for t in reader.tensors)
    counts = {t.name: int(t.n_elements) for t in reader.tensors}
    sizes: dict[str, dict[str, int]] = {}
    stored: dict[str, dict[str, str]] = {}
    estimates: dict[str, dict[str, float]] = {}
    uniform: dict[str, dict[str, float]] = {}
    tensors: list[str] = []
    fixed = 0
    steps = len(types)
    method = request["method"]
    for i, qtype in enumerate(types):
        path = session.quantize([(".*", qtype)], f"uniform-{qtype}")
        file = GGUFReader(path)
        if not tensors:  # the tensors llama.cpp quantizes: the rest stays as it is in every mix
            tensors = [t.name for t in file.tensors if t.tensor_type.name not in UNQUANTIZED]
            fixed = sum(int(t.n_bytes) for t in file.tensors if t.name not in set(tensors))
            header = path.stat().st_size - sum(int(t.n_bytes) for t in file.tensors)  # metadata, tokenizer
            if method == "auto":
                method = "measured" if len(tensors) * len(types) <= request["max_measured"] else "estimate"
        for t in file.tensors:
            if t.name in tensors:
                sizes.setdefault(t.name, {})[qtype] = int(t.n_bytes)
                stored.setdefault(t.name, {})[qtype] = t.tensor_type.name
        for name, err in weighted_errors(session.model, path, session.imatrix, tensors).items():
            estimates.setdefault(name, {})[qtype] = err
        uniform[qtype] = {"bytes": sum(int(t.n_bytes) for t in file.tensors)}
        if method == "measured":  # the uniform files' KLD, to check that costs add up; not needed to estimate
            uniform[qtype]["kld"] = session.kld(path)
        path.unlink()
        print(f"[{i + 1}/{steps}] uniform {qtype}", flush=True)

    costs: dict[str, dict[str, float]] = {name: {} for name in tensors}
    calibration: dict[str, dict[str, Any]] = {}
    if method == "measured":
        todo = [(name, qtype) for name in tensors for qtype in types]
        for j, (name, qtype) in enumerate(todo):
            path = session.quantize([(exact_pattern(name), qtype)], "one")
            costs[name][qtype] = session.kld(path)
            path.unlink()
            print(f"[{j + 1}/{len(todo)}] {name} {qtype}", flush=True)
    else:
        probe = types[(len(types) - 1) // 2]
        kinds = sorted({kind_of(n) for n in tensors})
        for j, kind in enumerate(kinds):
            members = [n for n in tensors if kind_of(n) == kind]
            path = session.quantize([(kind_pattern(kind), probe)], "kind")
            measured = session.kld(path)
            path.unlink()
            estimated = sum(estimates[n][probe] for n in members)
            scale = measured / estimated if estimated > 0 else 0.0
            calibration[kind] = {"probe": probe, "kld": measured, "tensors": len(members), "scale": scale}
            for n in members:
                costs[n] = {t: estimates[n][t] * scale for t in types}
            print(f"[{j + 1}/{len(kinds)}] {kind} at {probe}", flush=True)

    pairs = [(costs[n][t], estimates[n][t]) for n in tensors for t in types]
    return {
        "method": method, "types": types, "windows": int(len(session.windows)), "n_ctx": session.n_ctx,
        "total_elements": total_elements, "fixed_bytes": fixed, "header_bytes": header,
        "tensors": {n: {"bytes": sizes[n], "stored": stored[n], "kld": costs[n], "estimate": estimates[n],
                        "elements": counts[n]} for n in tensors},
        "uniform": uniform, "kind_calibration": calibration or None,
        "estimate_rank_correlation": metrics.rank_correlation(*zip(*pairs)) if method == "measured" else None,
        "passes": session.passes, "seconds": round(time.perf_counter() - start, 1),
    }
