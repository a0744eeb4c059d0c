"""What the HTML pages share (the catalogue, the validation report): their style and the quality-against-size chart.

The chart is inline SVG, drawn here without a plotting library so that a page is one file that works opened from
disk or served from a bucket. Quality is the mean KL divergence against the unquantized model on a log axis (a Q8_0
sits two decades below a Q4), size is linear in MiB; each format family has a colour and its Pareto front (no
other artifact of the family is both smaller and closer to the original) is drawn as a line. Labels are placed
where they overlap neither another label nor a point, trying eight spots around a point, then farther out.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Iterable

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem;color:#1f2328;max-width:1360px}
h1{font-size:1.4rem;margin:.2rem 0}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;margin:1rem 0;width:100%;font-size:13px}
th,td{padding:.3rem .35rem;border-bottom:1px solid #d0d7de;text-align:right;vertical-align:top}
th{background:#f4f4f6;font-weight:600}td.l,th.l{text-align:left}td.name{overflow-wrap:anywhere}
tr.failed td{background:#ffebe9}.passed{color:#137333}.unvalidated,.failed-status{color:#b3261e;font-weight:600}
.muted{color:#6e7781}a{color:#0b57d0}
svg.chart{background:#fafafa;border:1px solid #e3e3e3;margin:.5rem 0;max-width:100%;height:auto}
svg.chart text{font-family:system-ui,sans-serif}
"""

# One colour per format family, in the order families are first seen.
PALETTE = ("#1a73e8", "#e8710a", "#188038", "#a142f4", "#d01884", "#12a4af", "#5f6368")
_CHAR_W = 7.0  # px per character of an 11 px label: a safe upper bound for system-ui digits and capitals
_LABEL_H = 13.0


@dataclass(frozen=True)
class Point:
    label: str  # drawn beside the dot (Q4_K_M)
    family: str  # gguf, mlx, compressed-tensors, ...
    size_mib: float
    kld: float
    title: str  # the tooltip: name, size, KLD
    passed: bool = True


def nice_step(span: float, ticks: int = 5) -> float:
    """A 1-2-5 step that cuts ``span`` into about ``ticks`` parts."""
    raw = span / max(ticks, 1)
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def number(v: float) -> str:
    """A measured figure as people read it: 3 significant figures, no exponent above 0.001 (62000, 18.5, 0.0123)."""
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1e-3:
        return f"{v:.3g}"
    return f"{v:.0e}".replace("e-0", "e-")


def pareto_front(points: Iterable[Point]) -> list[Point]:
    """The points of one family that no other is both smaller than and closer to the original, by size."""
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p.size_mib, p.kld)):
        if p.kld < best:
            front.append(p)
            best = p.kld
    return front


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def chart(points: list[Point], *, name: str, width: int = 640, height: int = 360) -> str:
    """Mean KLD (log) against size (MiB): one dot per artifact, labelled, the Pareto front of each family."""
    points = [p for p in points if p.size_mib > 0 and p.kld is not None]
    if not points:
        return f'<p class="muted">{html.escape(name)}: no artifact has KL-divergence measurements yet</p>'
    left, right, top, bottom = 64, 24, 28, 52
    floor = 1e-7
    klds = [max(p.kld, floor) for p in points]
    y0, y1 = math.floor(math.log10(min(klds))), math.ceil(math.log10(max(klds)))
    if y1 - y0 < 1:
        y1 += 1
    step = nice_step(max(p.size_mib for p in points))
    x1 = step * math.ceil(max(p.size_mib for p in points) * 1.12 / step)

    def sx(v: float) -> float:
        return left + v / x1 * (width - left - right)

    def sy(v: float) -> float:
        return height - bottom - (math.log10(max(v, floor)) - y0) / (y1 - y0) * (height - top - bottom)

    esc = html.escape
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" data-model="{esc(name)}" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{esc(name)}: mean KL divergence against size">',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#555"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#555"/>',
           f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle" font-size="12">'
           f'size (MiB)</text>',
           f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" font-size="12" '
           f'transform="rotate(-90 16 {(top + height - bottom) / 2})">mean KL divergence (log scale)</text>']
    for i in range(int(round(x1 / step)) + 1):
        x = sx(i * step)
        out += [f'<line x1="{x:.1f}" y1="{height - bottom}" x2="{x:.1f}" y2="{height - bottom + 4}" stroke="#555"/>',
                f'<text class="tick x" x="{x:.1f}" y="{height - bottom + 17}" text-anchor="middle" '
                f'font-size="11">{number(round(i * step, 10))}</text>']
    for e in range(y0, y1 + 1):
        y = sy(10.0 ** e)
        out += [f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#e6e6e6"/>',
                f'<text class="tick y" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
                f'{number(10.0 ** e)}</text>']
    families = list(dict.fromkeys(p.family for p in points))
    colour = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(families)}
    for family in families:
        front = pareto_front(p for p in points if p.family == family)
        if len(front) > 1:
            xy = " ".join(f"{sx(p.size_mib):.1f},{sy(p.kld):.1f}" for p in front)
            out.append(f'<polyline class="front" data-family="{esc(family)}" points="{xy}" fill="none" '
                       f'stroke="{colour[family]}" stroke-width="1.5" stroke-dasharray="5 3"/>')
    dots = [(sx(p.size_mib), sy(p.kld)) for p in points]
    taken = [(x - 6, y - 6, x + 6, y + 6) for x, y in dots]
    taken.append((width - right - 8 - _CHAR_W * max(len(f) for f in families) - 14, top - 2, width, top + 4 +
                  _LABEL_H * len(families)))  # the legend's corner
    for p, (x, y) in zip(points, dots):
        fill = colour[p.family] if p.passed else "#fff"
        stroke = colour[p.family] if p.passed else "#cf222e"
        out.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{fill}" stroke="{stroke}" '
                   f'stroke-width="2"><title>{esc(p.title)}</title></circle>')
    for p, (x, y) in zip(points, dots):
        w = _CHAR_W * len(p.label)
        spot = None
        for reach in (1.0, 2.0, 3.0, 4.5):
            for side, dy in (("r", 4), ("l", 4), ("above", -10), ("below", 17), ("r", -8), ("r", 15), ("l", -8),
                             ("l", 15)):
                bx = {"r": x + 8 * reach, "l": x - 8 * reach - w}.get(side, x - w / 2)
                by = y + dy * reach
                box = (bx - 1, by - _LABEL_H + 2, bx + w + 1, by + 3)
                inside = box[0] >= left + 2 and box[2] <= width - 2 and box[1] >= 2 and box[3] <= height - bottom
                if inside and not any(_overlaps(box, t) for t in taken):
                    spot = (bx, by, box)
                    break
            if spot:
                break
        if spot is None:  # a crowded chart: the tooltip still names it
            continue
        bx, by, box = spot
        taken.append(box)
        if math.hypot(bx - x, by - y) > 40:
            out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{bx + w / 2:.1f}" y2="{by - 4:.1f}" stroke="#aaa"/>')
        out.append(f'<text class="label" x="{bx:.1f}" y="{by:.1f}" font-size="11">{esc(p.label)}</text>')
    for i, family in enumerate(families):  # legend, top right
        y = top + 8 + i * _LABEL_H
        x = width - right - _CHAR_W * len(family) - 14
        out += [f'<circle cx="{x:.1f}" cy="{y - 4:.1f}" r="4" fill="{colour[family]}"/>',
                f'<text class="legend" x="{x + 8:.1f}" y="{y:.1f}" font-size="11">{esc(family)}</text>']
    out.append("</svg>")
    return "".join(out)


def page(title: str, body: str) -> str:
    """A whole self-contained page."""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'><link rel=icon href='data:,'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")
