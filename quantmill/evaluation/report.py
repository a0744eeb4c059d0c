"""Per-model validation report: JSON, and one self-contained HTML page (no network, no scripts).

The report lists every artifact of the model that was validated into this store, passed or failed, with its
metrics, and draws quality (mean KL divergence) against size. It is rewritten after every run.
"""

from __future__ import annotations

import html
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

from quantmill import constants as C
from quantmill.store.local import LocalStore

REPORTS_DIR = "reports"


def report_dir(store: LocalStore, model: str) -> Path:
    return store.root / REPORTS_DIR / model


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def update(store: LocalStore, model: str, validations: Iterable[tuple[str, str]]) -> Path | None:
    """Merge this run's validation records ((recipe, artifact key) pairs) into the model's report."""
    validations = list(validations)
    if not validations:
        return None
    directory = report_dir(store, model)
    path = directory / "report.json"
    rows = {r["recipe"]: r for r in (json.loads(path.read_text())["artifacts"] if path.is_file() else [])}
    for recipe, key in validations:
        record = json.loads((store.files(_ref(store, key)) / C.VALIDATION_FILE).read_text())
        deps = store.statement(key)["predicate"]["buildDefinition"]["resolvedDependencies"]
        artifact = next(d for d in deps if d["name"] == "input:artifact")
        made = json.loads((store.files(_ref(store, artifact["annotations"]["key"])) / C.RESULT_FILE).read_text())
        rows[recipe] = {"recipe": recipe, "validation_key": key,
                        "artifact_digest": "sha256:" + artifact["digest"]["sha256"],
                        "quant_type": made.get("quant_type") or made.get("outtype", "").upper(),
                        **{k: v for k, v in record.items() if k not in ("generated_ids", "prompt_ids")}}
    report = {"model": model, "artifacts": sorted(rows.values(), key=lambda r: r.get("size_bytes", 0))}
    _atomic_write(path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    _atomic_write(directory / "report.html", render_html(report))
    return directory / "report.html"


def update_from_outcomes(store: LocalStore, model: str, outcomes: Iterable[Any]) -> Path | None:
    """Update the report with the validations of a run (what ran and what was cached)."""
    return update(store, model, [(o.recipe, o.key) for o in outcomes
                                 if o.step == C.VALIDATE and o.recipe and o.key and o.status in ("ran", "cached")])


def _ref(store: LocalStore, key: str):
    ref = store.lookup(key)
    if ref is None:
        raise KeyError(key)
    return ref


def load(store: LocalStore, model: str) -> dict[str, Any] | None:
    path = report_dir(store, model) / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _chart(rows: list[dict[str, Any]]) -> str:
    """Mean KL divergence (log scale) against size: an inline SVG scatter."""
    points = [r for r in rows if r.get("mean_kld") is not None]
    if not points:
        return "<p>No artifact has KL-divergence measurements yet.</p>"
    w, h, pad = 640, 360, 56
    sizes = [r["size_bytes"] / 2**20 for r in points]
    klds = [max(r["mean_kld"], 1e-7) for r in points]
    x0, x1 = 0.0, max(sizes) * 1.1
    y0, y1 = math.log10(min(klds)) - 0.5, math.log10(max(klds)) + 0.5
    sx = lambda v: pad + (v - x0) / (x1 - x0) * (w - 2 * pad)  # noqa: E731
    sy = lambda v: h - pad - (math.log10(v) - y0) / (y1 - y0) * (h - 2 * pad)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             f'aria-label="mean KL divergence against size">',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#444"/>',
             f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">size (MiB)</text>',
             f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" text-anchor="middle">mean KLD (log)</text>']
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        if y0 <= e <= y1:
            parts.append(f'<text x="{pad - 6}" y="{sy(10 ** e) + 4:.1f}" text-anchor="end" font-size="11">1e{e}</text>')
    for r, size, kld in zip(points, sizes, klds):
        color = "#1a7f37" if r["status"] == C.PASSED else "#cf222e"
        label = html.escape(r.get("quant_type") or r["recipe"])
        parts.append(f'<circle class="point" cx="{sx(size):.1f}" cy="{sy(kld):.1f}" r="6" fill="{color}">'
                     f'<title>{html.escape(r["recipe"])}: {size:.2f} MiB, KLD {r["mean_kld"]:.5f}</title></circle>')
        parts.append(f'<text x="{sx(size) + 9:.1f}" y="{sy(kld) + 4:.1f}" font-size="12">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    rows = report["artifacts"]
    header = ["recipe", "status", "size (MiB)", "estimated size", "bpw", "PPL", "PPL ratio", "mean KLD", "p99 KLD", "top-1",
              "tokenizer", "prompt tok/s", "gen tok/s", "peak MiB", "estimated weights + KV", "failed checks"]
    body = []
    for r in rows:
        failed = "; ".join(f"{c['name']}: {c['detail']}" for c in r.get("checks", []) if not c["passed"])
        fmt = lambda k, spec: format(r[k], spec) if r.get(k) is not None else ""  # noqa: E731
        estimate = r.get("estimate") or {}
        est = (f"{estimate['weights_bytes'] / 2**20:.2f} ({100 * (r['size_bytes'] / estimate['weights_bytes'] - 1):+.0f} %)"
               if estimate.get("weights_bytes") else "")
        cells = [r["recipe"], r["status"], f"{r['size_bytes'] / 2**20:.2f}", est, fmt("bits_per_weight", ".2f"),
                 fmt("ppl", ".4f"), fmt("ppl_ratio", ".4f"), fmt("mean_kld", ".5f"), fmt("p99_kld", ".5f"),
                 f"{100 * r['top1_agreement']:.2f} %" if r.get("top1_agreement") is not None else "",
                 "exact" if r.get("tokenizer", {}).get("exact") else "MISMATCH" if "tokenizer" in r else "",
                 fmt("prompt_tokens_per_second", ".0f"), fmt("generation_tokens_per_second", ".0f"),
                 f"{r['peak_rss_bytes'] / 2**20:.0f}" if r.get("peak_rss_bytes") else "",
                 f"{(estimate['weights_bytes'] + estimate['kv_cache_bytes']) / 2**20:.0f}" if estimate else "", failed]
        cls = "passed" if r["status"] == C.PASSED else "failed"
        body.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    machine = next((r["machine"] for r in rows if r.get("machine")), {})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>quantmill report: {html.escape(report['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 14px; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }}
td:first-child, td:last-child, th:first-child {{ text-align: left; }}
tr.failed td {{ background: #ffebe9; }} tr.passed td:nth-child(2) {{ color: #1a7f37; }}
</style></head><body>
<h1>{html.escape(report['model'])}</h1>
<p>{len(rows)} artifact(s) validated against the unquantized model
({sum(r['status'] == C.PASSED for r in rows)} passed). Measured on {html.escape(machine.get('cpu', '?'))}.</p>
<table><thead><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<h2>Quality against size</h2>
{_chart(rows)}
</body></html>
"""
