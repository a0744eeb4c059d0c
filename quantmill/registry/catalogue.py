"""The catalogue page: one static, self-contained HTML file at the registry's root (``index.html``).

A row per published artifact (latest version of each name): size, bits per weight, KL divergence, perplexity
ratio, generation speed, validation status, signature, tags and a link to its provenance record; and per model
a chart of quality (mean KLD) against size, drawn as inline SVG. No script, font or style is fetched from
anywhere, so the page works opened from disk and served from the bucket (links are relative).
"""

from __future__ import annotations

import html
from typing import Any

from quantmill.registry.entries import ArtifactRegistry
from quantmill.registry.names import CATALOGUE, PROVENANCE

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#1d1d1f}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;margin:1rem 0}th,td{padding:.3rem .6rem;border-bottom:1px solid #ddd;text-align:right}
th{background:#f4f4f6;position:sticky;top:0}td.l,th.l{text-align:left}
.passed{color:#137333}.unvalidated{color:#b3261e;font-weight:600}.muted{color:#777}
svg{background:#fafafa;border:1px solid #e3e3e3;margin:.5rem 1rem .5rem 0}
"""


def _fmt(value: Any, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def rows(registry: ArtifactRegistry) -> list[dict[str, Any]]:
    """The table's data: one dict per published name (its latest version)."""
    out = []
    for e in registry.entries():
        m = e.get("metrics") or {}
        out.append({
            "name": e["name"], "version": e["version"], "model": e["model"], "format": e["format"],
            "quant_type": e.get("quant_type"), "size_bytes": e.get("size_bytes") or m.get("size_bytes"),
            "bits_per_weight": e.get("bits_per_weight"), "mean_kld": m.get("mean_kld"), "ppl_ratio": m.get("ppl_ratio"),
            "generation_tokens_per_second": m.get("generation_tokens_per_second"),
            "status": "passed" if e.get("validated") else "unvalidated", "signed": bool(e.get("signed_by")),
            "tags": e.get("tags", []),
            "provenance": registry.location.version_path(e["name"], e["version"], PROVENANCE)})
    return out


def _chart(model: str, points: list[dict[str, Any]]) -> str:
    """Mean KLD (y) against size in MiB (x), one labelled dot per artifact."""
    points = [p for p in points if p["size_bytes"] and p["mean_kld"] is not None]
    if not points:
        return f'<p class="muted">{html.escape(model)}: no validated metrics to chart</p>'
    w, h, pad, left = 460, 260, 48, 72
    xs = [p["size_bytes"] / 2**20 for p in points]
    ys = [p["mean_kld"] for p in points]
    x0, x1 = 0.0, max(xs) * 1.1
    y0, y1 = 0.0, max(max(ys) * 1.15, 1e-6)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - pad)

    def sy(y: float) -> float:
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    parts = [f'<svg class="chart" data-model="{html.escape(model)}" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(model)}: KL divergence against size">',
             f'<line x1="{left}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#555"/>',
             f'<line x1="{left}" y1="{pad}" x2="{left}" y2="{h - pad}" stroke="#555"/>',
             f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle" font-size="12">size (MiB)</text>',
             f'<text x="14" y="{h / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 14 {h / 2})">'
             f'mean KLD</text>']
    for i in range(5):
        x, y = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts += [f'<text x="{sx(x):.1f}" y="{h - pad + 16}" text-anchor="middle" font-size="10">{x:.2f}</text>',
                  f'<text x="{left - 6}" y="{sy(y) + 3:.1f}" text-anchor="end" font-size="10">{y:.3g}</text>']
    for p, x, y in zip(points, xs, ys):
        label = html.escape(p["quant_type"] or p["name"])
        parts += [f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="#1a73e8">'
                  f'<title>{html.escape(p["name"])}: {x:.2f} MiB, KLD {y:.5f}</title></circle>',
                  f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 7:.1f}" font-size="11">{label}</text>']
    parts.append("</svg>")
    return "".join(parts)


def render(registry: ArtifactRegistry, title: str | None = None) -> str:
    data = rows(registry)
    title = title or f"quantmill registry — {registry.root}"
    head = ["name", "model", "format", "quant", "size (MiB)", "bits/weight", "mean KLD", "PPL ratio", "gen tok/s",
            "validation", "signed", "tags", "provenance"]
    body = []
    for r in data:
        cells = [
            ("l", f'<a id="{html.escape(r["name"])}">{html.escape(r["name"])}</a> <span class="muted">v{r["version"]}</span>'),
            ("l", html.escape(r["model"])), ("l", html.escape(r["format"])), ("l", html.escape(r["quant_type"] or "")),
            ("", _fmt(r["size_bytes"] and r["size_bytes"] / 2**20, ".2f")), ("", _fmt(r["bits_per_weight"], ".2f")),
            ("", _fmt(r["mean_kld"], ".5f")), ("", _fmt(r["ppl_ratio"], ".4f")),
            ("", _fmt(r["generation_tokens_per_second"], ".1f")),
            ("l", f'<span class="{r["status"]}">{r["status"]}</span>'), ("l", "yes" if r["signed"] else "no"),
            ("l", html.escape(", ".join(r["tags"]))),
            ("l", f'<a href="{html.escape(r["provenance"])}">record</a>')]
        body.append('<tr class="artifact" data-name="{}">{}</tr>'.format(
            html.escape(r["name"]), "".join(f'<td class="{c}">{v}</td>' for c, v in cells)))
    charts = []
    for model in sorted({r["model"] for r in data}):
        charts.append(f"<h2>{html.escape(model)}</h2>" + _chart(model, [r for r in data if r["model"] == model]))
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width'><link rel=icon href='data:,'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=muted>{len(data)} published artifacts; KLD and perplexity against the unquantized model, "
            f"measured before publishing.</p><table id=catalogue><thead><tr>"
            + "".join(f'<th class="{"l" if i in (0, 1, 2, 3, 9, 10, 11, 12) else ""}">{h}</th>'
                      for i, h in enumerate(head))
            + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>" + "".join(charts) + "</body></html>\n")


def write_catalogue(registry: ArtifactRegistry) -> str:
    """Render the page and put it at the registry's root; returns where."""
    registry.location.put(CATALOGUE, render(registry).encode(), content_type="text/html; charset=utf-8")
    return f"{registry.root}/{CATALOGUE}"
