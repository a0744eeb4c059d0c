"""The catalogue page: one static, self-contained HTML file at the registry's root (``index.html``).

Per model, a chart of quality (mean KLD, log scale) against size with each format's Pareto front, then a row per
published artifact (latest version of each name): type, size, bits per weight, KL divergence, perplexity ratio,
generation speed, validation and signature, tags, and links to its main file, model card, validation report and
provenance record. No script, font or style is fetched from anywhere, so the page works opened from disk and
served from the bucket (links are relative).
"""

from __future__ import annotations

import html
from typing import Any

from quantmill import constants as C
from quantmill import pages
from quantmill.errors import NotFound
from quantmill.registry.entries import ArtifactRegistry
from quantmill.registry.names import CARD, CATALOGUE, PROVENANCE, REPORT
from quantmill.store import provenance


def _fmt(value: Any, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _download(registry: ArtifactRegistry, e: dict[str, Any]) -> dict[str, Any]:
    """The link to an artifact's main file (its largest), relative to the catalogue, and how many files it has."""
    key = e["artifact"]["key"]
    try:
        subjects = [s for s in provenance.user_subjects_of(registry.store.statement(key)) if s.path != C.RESULT_FILE]
    except NotFound:  # the artifact was collected from the store: the row still shows its record
        return {"href": None, "file": None, "files": 0}
    main = max(subjects, key=lambda s: s.size)
    return {"href": f"../{registry.store.file_path(key, main.path)}", "file": main.path, "files": len(subjects)}


def rows(registry: ArtifactRegistry) -> list[dict[str, Any]]:
    """The table's data: one dict per published name (its latest version)."""
    out = []
    for e in registry.entries():
        m = e.get("metrics") or {}
        path = lambda file: registry.location.version_path(e["name"], e["version"], file)  # noqa: E731
        out.append({
            "name": e["name"], "version": e["version"], "model": e["model"], "format": e["format"],
            "quant_type": e.get("quant_type"), "size_bytes": e.get("size_bytes") or m.get("size_bytes"),
            "bits_per_weight": e.get("bits_per_weight"), "mean_kld": m.get("mean_kld"), "ppl_ratio": m.get("ppl_ratio"),
            "generation_tokens_per_second": m.get("generation_tokens_per_second"),
            "status": "passed" if e.get("validated") else "unvalidated", "signed": bool(e.get("signed_by")),
            "tags": e.get("tags", []), "download": _download(registry, e), "card": path(CARD),
            "report": path(REPORT) if REPORT in e.get("pages", ()) else None, "provenance": path(PROVENANCE)})
    return out


HEAD = [("name", "l"), ("type", "l"), ("size (MiB)", ""), ("bits/weight", ""), ("mean KLD", ""), ("PPL ratio", ""),
        ("generation (tok/s)", ""), ("validation", "l"), ("tags", "l"), ("get", "l")]


def _row(r: dict[str, Any]) -> str:
    esc = html.escape
    d = r["download"]
    links = []
    if d["href"]:
        more = f" (1 of {d['files']})" if d["files"] > 1 else ""
        links.append(f'<a class="download" href="{esc(d["href"])}" title="{esc(d["file"])}">download</a>{more}')
    links.append(f'<a class="card" href="{esc(r["card"])}">card</a>')
    if r["report"]:
        links.append(f'<a class="report" href="{esc(r["report"])}">report</a>')
    links.append(f'<a class="record" href="{esc(r["provenance"])}">record</a>')
    cells = [
        ("l name", f'<a id="{esc(r["name"])}">{esc(r["name"])}</a> <span class="muted">v{r["version"]}</span>'),
        ("l", f'{esc(r["format"])} {esc(r["quant_type"] or "")}'),
        ("", _fmt(r["size_bytes"] and r["size_bytes"] / 2**20, ".2f")), ("", _fmt(r["bits_per_weight"], ".2f")),
        ("", _fmt(r["mean_kld"], ".5f")), ("", _fmt(r["ppl_ratio"], ".4f")),
        ("", pages.number(r["generation_tokens_per_second"]) if r["generation_tokens_per_second"] else "–"),
        ("l", f'<span class="{r["status"]}">{r["status"]}</span>' + (", signed" if r["signed"] else "")),
        ("l", esc(", ".join(r["tags"]))), ("l", " · ".join(links))]
    return '<tr class="artifact" data-name="{}">{}</tr>'.format(
        esc(r["name"]), "".join(f'<td class="{c}">{v}</td>' for c, v in cells))


def chart_points(data: list[dict[str, Any]]) -> list[pages.Point]:
    return [pages.Point(label=r["quant_type"] or r["name"], family=r["format"], size_mib=r["size_bytes"] / 2**20,
                        kld=r["mean_kld"], passed=r["status"] == "passed",
                        title=f'{r["name"]} v{r["version"]}: {r["size_bytes"] / 2**20:.2f} MiB, mean KLD '
                              f'{r["mean_kld"]:.5f}')
            for r in data if r["size_bytes"] and r["mean_kld"] is not None]


def render(registry: ArtifactRegistry, title: str | None = None) -> str:
    data = rows(registry)
    title = title or f"quantmill registry — {registry.root}"
    head = "".join(f'<th class="{c}">{h}</th>' for h, c in HEAD)
    sections = []
    for model in sorted({r["model"] for r in data}):
        mine = [r for r in data if r["model"] == model]
        sections.append(f"<h2>{html.escape(model)}</h2>" + pages.chart(chart_points(mine), name=model)
                        + f"<table class=catalogue><thead><tr>{head}</tr></thead><tbody>"
                        + "".join(_row(r) for r in sorted(mine, key=lambda r: r["size_bytes"] or 0))
                        + "</tbody></table>")
    intro = (f"<p class=muted>{len(data)} published artifacts, the latest version of each name. Mean KLD: how far "
             "a file's next-token distribution is from the unquantized model's (0 is identical); PPL ratio: its "
             "perplexity over the original's (1.00 is the same); both measured before publishing. "
             "<code>quantmill registry pull NAME</code> fetches a whole artifact and checks every byte.</p>")
    return pages.page(title, f"<h1>{html.escape(title)}</h1>{intro}{''.join(sections)}")


def write_catalogue(registry: ArtifactRegistry) -> str:
    """Render the page and put it at the registry's root; returns where."""
    registry.location.put(CATALOGUE, render(registry).encode(), content_type="text/html; charset=utf-8")
    return f"{registry.root}/{CATALOGUE}"
