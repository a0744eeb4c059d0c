"""Terminal output: rich progress bars for the steps, and the tables the CLI prints."""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from quantmill import pages
from quantmill.outcome import CACHED, FAILED, RAN, SKIPPED, Outcome

console = Console(stderr=True)
# Piped output: tables at full width, not 80, unless COLUMNS says how wide.
out = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 160)


class RichBar:
    def __init__(self, progress: Progress, task_id: int):
        self._progress, self._id = progress, task_id

    def update(self, completed: float, total: float | None = None) -> None:
        self._progress.update(self._id, completed=completed, **({"total": total} if total else {}))

    def advance(self, amount: float) -> None:
        self._progress.advance(self._id, amount)

    def close(self) -> None:
        task = self._progress.tasks[[t.id for t in self._progress.tasks].index(self._id)]
        if task.total:
            self._progress.update(self._id, completed=task.total)
        self._progress.stop_task(self._id)


class RichReporter:
    """Progress bars on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description:<36}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TimeElapsedColumn(), console=console, transient=False,
                                 disable=not sys.stderr.isatty())
        self._lock = threading.Lock()

    @contextmanager
    def showing(self) -> Iterator[None]:
        self.progress.start()
        try:
            yield
        finally:
            self.progress.stop()

    def warn(self, message: str) -> None:
        console.print(f"[yellow]{message}[/]")

    def bar(self, label: str, total: float | None = None, unit: str = "") -> RichBar:
        with self._lock:
            if not sys.stderr.isatty():
                console.print(f"[dim]… {label}[/dim]")
            return RichBar(self.progress, self.progress.add_task(label, total=total))


_STYLE = {RAN: "green", CACHED: "cyan", FAILED: "bold red", SKIPPED: "yellow"}


def _note(o: Outcome) -> str:
    r = o.result
    if o.error:
        return o.error
    parts = []
    if "bits_per_weight" in r and r["bits_per_weight"]:
        parts.append(f"{r['bits_per_weight']:.2f} bpw")
    if "quant_type" in r and o.step == "quantize":
        parts.append(r["quant_type"])
    if "passes" in r and "tensors" in r:  # the sensitivity measurement
        parts.append(f"{r['tensors']} tensors x {len(r['types'])} types, {r['method']}, {r['passes']} passes"
                     + (f", estimate rank corr. {r['estimate_rank_correlation']:.2f}"
                        if r.get("estimate_rank_correlation") is not None else ""))
    if "predicted_kld" in r:
        parts.append(f"predicted KLD {r['predicted_kld']:.4f}")
    if "samples" in r:
        parts.append(f"{r['samples']}x{r['seq_len']} tokens")
    if o.step == "validate" and "status" in r:
        if "mean_kld" in r:
            parts.append(f"KLD {r['mean_kld']:.4f}, PPL x{r['ppl_ratio']:.3f}, top-1 {100 * r['top1_agreement']:.1f}%"
                         + (f", flips {100 * r['flip_rate']:.0f}%" if r.get("flip_rate") is not None else "")
                         + (f", tasks {100 * r['task_recovery']:.0f}% of the original's"
                            if r.get("task_recovery") is not None else ""))
        parts.append(r["status"] + (": " + "; ".join(r["failed"]) if r.get("failed") else ""))
    if o.step == "validate" and "windows" in r:
        parts.append(f"{r['windows']}x{r['n_ctx']} tokens")
    if o.step == "validate" and "ppl" in r and "status" not in r:
        parts.append(f"reference PPL {r['ppl']:.3f}")
    if o.step == "publish" and "name" in r:
        parts.append(r["name"] + ("" if r.get("validated", True) else " (UNVALIDATED)"))
    return ", ".join(parts)


def summary_table(outcomes: Iterable[Outcome], seconds: float) -> Table:
    outcomes = list(outcomes)
    table = Table(title=f"quantmill run: {sum(o.status == RAN for o in outcomes)} ran, "
                        f"{sum(o.status == CACHED for o in outcomes)} cached, "
                        f"{sum(not o.ok for o in outcomes)} failed — {seconds:.1f} s")
    for col in ("step", "status", "time", "digest", "notes"):
        table.add_column(col, overflow="fold", no_wrap=col in ("step", "status", "time"))
    for o in outcomes:
        status = o.status if o.ok or o.status != RAN else FAILED
        table.add_row(o.spec_id, f"[{_STYLE.get(status, '')}]{status}[/]",
                      f"{o.seconds:.1f}s" if o.status == RAN else "",
                      (o.digest or "").removeprefix("sha256:")[:12], _note(o))
    return table


def plan_table(rows: list[dict[str, Any]]) -> Table:
    """The plan: step names whole; at 80 columns the inputs, then the backend, are left out."""
    cells = [[r["id"], r["backend"], r["capability"], ", ".join(r["inputs"].values()), (r["key"] or "–")[:12],
              f"[{ {'hit': 'cyan', 'miss': 'green', 'pending': 'yellow'}[r['cache']]}]{r['cache']}[/]"] for r in rows]
    return fitted_table("quantmill plan", ["step", "backend", "needs", "inputs", "key", "cache"], cells,
                        ["inputs", "backend", "key", "needs"])


def report_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"validation report: {report['model']}")
    for col in ("recipe", "status", "size", "bpw", "PPL ratio", "mean KLD", "p99 KLD", "top-1", "tokenizer"):
        table.add_column(col)
    for r in report["artifacts"]:
        ok = r["status"] == "passed"
        table.add_row(r["recipe"], f"[{'green' if ok else 'bold red'}]{r['status']}[/]",
                      f"{r['size_bytes'] / 2**20:.2f} MiB", f"{r.get('bits_per_weight', 0):.2f}",
                      f"{r['ppl_ratio']:.4f}" if "ppl_ratio" in r else "",
                      f"{r['mean_kld']:.5f}" if "mean_kld" in r else "",
                      f"{r['p99_kld']:.5f}" if "p99_kld" in r else "",
                      f"{100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else "",
                      ("exact" if r["tokenizer"]["exact"] else "MISMATCH") if "tokenizer" in r else "")
    return table


def fit_table(target: Any, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"target {target.name}: {target.description} — {target.memory_gb} GiB, {target.runtime}, "
                        f"KV cache at {target.context} tokens")
    for col in ("recipe", "weights", "KV cache", "total", "fits", "tok/s", "from"):
        table.add_column(col)
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    for r in rows:
        verdict = ("[green]yes[/]" if r["fits"] else
                   f"[yellow]{r['gpu_layers']} layers[/]" if r.get("gpu_layers") else "[red]no[/]")
        verdict += "" if r["available"] else " (no recipe file)"
        speed = r.get("generation_tokens_per_second")
        table.add_row(r["recipe"], gib(r["weights_bytes"]), gib(r["kv_cache_bytes"]), gib(r["total_bytes"]), verdict,
                      f"{speed:.3g}" if speed else "", r.get("source", "estimate"))
    return table


def fitted_table(title: str, columns: list[str], rows: list[list[str]], drop: list[str], *,
                 width: int | None = None) -> Table:
    """A table whose cells are never cut: columns named in ``drop`` go, in that order, until the rest fit."""
    width = width or out.width
    keep = list(columns)

    def needed(cols: list[str]) -> int:
        idx = [columns.index(c) for c in cols]
        return sum(max([len(c)] + [len(Text.from_markup(r[i]).plain) for r in rows]) + 3
                   for c, i in zip(cols, idx)) + 1

    for col in drop:
        if needed(keep) <= width:
            break
        keep.remove(col)
    table = Table(title=title)
    for c in keep:
        table.add_column(c, no_wrap=True)
    for r in rows:
        table.add_row(*(r[columns.index(c)] for c in keep))
    return table


def registry_table(entries: list[dict[str, Any]], *, width: int | None = None) -> Table:
    """Published artifacts: names and numbers whole; at 80 columns the least needed columns are left out."""
    columns = ["name", "ver", "type", "bpw", "MiB", "KLD", "PPL×", "valid.", "tags", "made by", "digest"]
    rows = []
    for e in entries:
        m, made = e.get("metrics") or {}, e.get("made_with") or {}
        rows.append([e["name"], f"v{e['version']}", e.get("quant_type") or "",
                     f"{e['bits_per_weight']:.2f}" if e.get("bits_per_weight") else "",
                     f"{e['size_bytes'] / 2**20:.2f}" if e.get("size_bytes") else "",
                     f"{m['mean_kld']:.4f}" if m.get("mean_kld") is not None else "",
                     f"{m['ppl_ratio']:.3f}" if m.get("ppl_ratio") is not None else "",
                     "passed" if e.get("validated") else "[red]NO[/]", ",".join(e.get("tags", [])),
                     f"{made['recipe']}@{made['config_digest'][:8]}" if made else "",
                     e["artifact"]["digest"].removeprefix("sha256:")[:8]])
    return fitted_table("published", columns, rows, ["digest", "made by", "tags", "bpw", "PPL×", "type", "ver"],
                        width=width)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


def written_table(written: list[Any]) -> Table:
    """What `quantmill quantize` placed: each path whole, its size and its verdict."""
    table = Table(title="written")
    table.add_column("file", overflow="fold")
    table.add_column("size", no_wrap=True, justify="right")
    table.add_column("quality", overflow="fold")
    for w in written:
        style = "green" if w.passed else ("yellow" if w.passed is None else "bold red")
        table.add_row(str(w.path), human_bytes(w.size_bytes), f"[{style}]{w.verdict}[/]")
    return table


def rows_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> Table:
    """A listing whose first column (a name to type) is never cut; the last one wraps."""
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, no_wrap=i == 0, overflow="fold")
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in columns))
    return table


def next_steps(outcomes: Iterable[Outcome], publish: Any, model: str) -> list[str]:
    """What a person does after a run: where each published artifact is and how to get or inspect it."""
    names = [o.result["name"] for o in outcomes if o.step == "publish" and o.ok and o.result.get("name")]
    if not names:
        return []
    where = {"s3": f" publish=s3 publish.bucket={getattr(publish, 'bucket', '')}"}.get(publish.publisher, "")
    lines = ["next:"]
    if publish.publisher == "hf":
        repo = getattr(publish, "repo_id", "")
        lines += [f"  published to the Hub: https://huggingface.co/{repo.format(model=model, name=n, recipe=n)}"
                  for n in dict.fromkeys(names)]
    else:
        lines += [f"  quantmill registry pull {n} --to ./{n}{where}" for n in names]
        lines.append(f"  quantmill report {model}{where}      the validation report and its page")
    return lines


def recommend_table(rows: list[dict[str, Any]],
                    title: str = "closest to the original first; measured speed and energy where there are") -> Table:
    """``quantmill recommend``: the usable artifacts (or recipes) ranked, then the rest with the reason."""
    table = Table(title=title)
    for col in ("#", "name", "format", "mean KLD", "size", "needs", "tok/s", "J/token", "verdict"):
        table.add_column(col, overflow="fold")
    mib = lambda b: f"{b / 2**20:.1f} MiB" if b is not None else ""  # noqa: E731
    for r in rows:
        table.add_row(str(r["rank"] or ""), r["name"], f"{r['format']} {r['quant_type'] or ''}".strip(),
                      f"{r['mean_kld']:.5f}" if r["mean_kld"] is not None else "", mib(r["size_bytes"]),
                      mib(r["need_bytes"]),
                      pages.number(r["generation_tokens_per_second"]) if r["generation_tokens_per_second"] else "",
                      pages.number(r["joules_per_generated_token"]) if r["joules_per_generated_token"] else "",
                      r["verdict"])
    return table
