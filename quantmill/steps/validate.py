"""validate: load the artifact in the runtime its users will use, and check that it works.

This is the minimal gate (it loads, its logits are finite, it generates from fixed token ids); measured quality
against the unquantized model plugs in here through the same runtime interface.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

from quantmill import constants as C
from quantmill.config import ValidateConfig
from quantmill.provenance import host_info
from quantmill.steps.calibrate import load_tokenizer


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def validate(runtime: Any, artifact: Path, source_model: Path, cfg: ValidateConfig, *,
             threads: int = 0) -> dict[str, Any]:
    """Run the checks; return the validation record (``status`` is ``passed`` only if every check passed)."""
    import numpy as np

    prompt_ids = [1] + load_tokenizer(source_model)(cfg.prompt)  # BOS + the prompt, same ids for every runtime
    checks: list[dict[str, Any]] = []
    record: dict[str, Any] = {"runtime": runtime.key, "prompt_ids": prompt_ids}
    try:
        with runtime.load(artifact, n_ctx=cfg.n_ctx, threads=threads) as model:
            record["load_seconds"] = round(model.load_seconds, 3)
            checks.append(_check("loads", True, f"loaded in {model.load_seconds:.2f} s"))
            logits = runtime.logits(model, prompt_ids)
            finite = bool(np.isfinite(logits).all())
            checks.append(_check("finite_logits", finite, f"{logits.shape[0]}x{logits.shape[1]} logits"
                                 + ("" if finite else ", some NaN/inf")))
            start = time.perf_counter()
            generated = runtime.generate(model, prompt_ids, cfg.max_tokens)
            seconds = time.perf_counter() - start
            record["generated_ids"] = generated
            record["generation_tokens_per_second"] = round(len(generated) / seconds, 1) if seconds else None
            distinct = len(set(generated))
            checks.append(_check("generates", len(generated) > 0 and distinct > 1,
                                 f"{len(generated)} tokens, {distinct} distinct"))
    except Exception as e:  # a runtime that cannot load the artifact is a failed check, recorded with its reason
        checks.append(_check("loads", False, f"{type(e).__name__}: {e}"))
    record["checks"] = checks
    record["status"] = C.PASSED if checks and all(c["passed"] for c in checks) else C.FAILED
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["machine"] = host_info()
    files = sorted(p for p in artifact.iterdir() if p.is_file())
    record["size_bytes"] = sum(p.stat().st_size for p in files)
    return record


def failed_checks(record: dict[str, Any]) -> list[str]:
    return [f"{c['name']} ({c['detail']})" for c in record.get("checks", []) if not c["passed"]]
