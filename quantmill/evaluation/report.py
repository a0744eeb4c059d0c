"""Per-model validation report: JSON, and one self-contained HTML page (no network, no scripts).

The report lists every artifact of the model that was validated into this store, passed or failed, with its
metrics, and draws quality (mean KL divergence) against size. It is rewritten after every run.
"""

from __future__ import annotations

import html
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

from quantmill import constants as C
from quantmill import pages
from quantmill.store.local import LocalStore

REPORTS_DIR = "reports"
DOMAIN_KEYS = ("ppl_ratio", "mean_kld", "mean_kld_se", "p99_kld", "top1_agreement", "flip_rate")


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
    domains: dict[str, dict[str, Any]] = {}
    for recipe, key in validations:
        record = json.loads((store.files(_ref(store, key)) / C.VALIDATION_FILE).read_text())
        if "@" in recipe:  # a further domain's validation: a sub-row of its recipe's
            recipe, _, domain = recipe.partition("@")
            domains.setdefault(recipe, {})[domain] = {
                "status": record["status"], **{k: record[k] for k in DOMAIN_KEYS if k in record},
                "failed": [c["name"] for c in record.get("checks", []) if not c["passed"]]}
            continue
        deps = store.statement(key)["predicate"]["buildDefinition"]["resolvedDependencies"]
        artifact = next(d for d in deps if d["name"] == "input:artifact")
        made = json.loads((store.files(_ref(store, artifact["annotations"]["key"])) / C.RESULT_FILE).read_text())
        made_by = store.statement(artifact["annotations"]["key"])["predicate"]["buildDefinition"]
        fmt = made_by["externalParameters"].get("config", {}).get("format")
        rows[recipe] = {"recipe": recipe, "validation_key": key,
                        "artifact_digest": "sha256:" + artifact["digest"]["sha256"],
                        "quant_type": made.get("quant_type") or made.get("outtype", "").upper(), "format": fmt,
                        **({"predicted_kld": made["predicted_kld"]} if "predicted_kld" in made else {}),
                        **{k: v for k, v in record.items() if k not in ("generated_ids", "prompt_ids")}}
    for recipe, by_domain in domains.items():
        if recipe in rows:
            rows[recipe]["domains"] = {**rows[recipe].get("domains", {}), **by_domain}
    report = {"model": model, "artifacts": sorted(rows.values(), key=lambda r: r.get("size_bytes", 0))}
    _atomic_write(path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    _atomic_write(directory / "report.html", render_html(report))
    return directory / "report.html"


def update_from_outcomes(store: LocalStore, model: str, outcomes: Iterable[Any]) -> Path | None:
    """Update the report with the validations of a run (what ran and what was cached)."""
    return update(store, model, [(o.spec_id.partition(":")[2] if "@" in o.spec_id else o.recipe, o.key)
                                 for o in outcomes
                                 if o.step == C.VALIDATE and o.recipe and o.key and o.status in ("ran", "cached")])


def _ref(store: LocalStore, key: str):
    ref = store.lookup(key)
    if ref is None:
        raise KeyError(key)
    return ref


def load(store: LocalStore, model: str) -> dict[str, Any] | None:
    path = report_dir(store, model) / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def chart_points(rows: list[dict[str, Any]], family: str = "") -> list[pages.Point]:
    return [pages.Point(label=r.get("quant_type") or r["recipe"], family=_family(r, family),
                        size_mib=r["size_bytes"] / 2**20, kld=r["mean_kld"], passed=r["status"] == C.PASSED,
                        title=f"{r['recipe']}: {r['size_bytes'] / 2**20:.2f} MiB, mean KLD {r['mean_kld']:.5f}")
            for r in rows if r.get("mean_kld") is not None and r.get("size_bytes")]


def _family(r: dict[str, Any], family: str) -> str:
    """The chart's series: the format, with GGUF's per-tensor mixes apart from its uniform types (their own front)."""
    name = r.get("format") or r.get("runtime") or family or "artifact"
    return f"{name} auto" if str(r.get("quant_type") or "").startswith("AUTO") else name


def _ladder_note(rows: list[dict[str, Any]]) -> str:
    """How well the sensitivity search predicted the mixes' measured KLD: predictions are summed per-tensor costs
    on the calibration text, so their scale differs from the evaluation text's; their order is what the search uses."""
    mixes = [r for r in rows if r.get("predicted_kld") is not None and r.get("mean_kld") is not None]
    if not mixes:
        return ""
    pairs = ", ".join(f"{html.escape(r['recipe'])} {r['predicted_kld']:.5f} → {r['mean_kld']:.5f}" for r in mixes)
    from quantmill.evaluation.metrics import rank_correlation

    rho = rank_correlation([r["predicted_kld"] for r in mixes], [r["mean_kld"] for r in mixes])
    order = "" if rho is None else f" Rank correlation of predicted and measured: {rho:.2f}."
    return (f"<p class=muted>Per-tensor mixes (gguf auto), predicted mean KLD on the calibration text → measured on "
            f"the evaluation text: {pairs}.{order}</p>")


def _speed(r: dict[str, Any], key: str) -> str:
    """A speed as its median, with its range when it was measured more than once; marked when the machine was busy."""
    value = r.get(key)
    if value is None:
        return ""
    spread = (r.get("speed_runs") or {}).get(key)
    text = pages.number(value)
    if spread and len(spread) > 1:
        text += f"\n{pages.number(min(spread))}–{pages.number(max(spread))}"
    energy = r.get("energy") or {}
    if key == "generation_tokens_per_second" and energy.get("joules_per_generated_token") is not None:
        text += f"\n{pages.number(energy['joules_per_generated_token'])} J/token"
    return text + (" *" if busy(r) else "")


def busy(r: dict[str, Any]) -> bool:
    """The machine's load per core was above one half while speeds were measured: they are not this file's best."""
    load, cpus = r.get("load_1m"), (r.get("machine") or {}).get("cpus")
    return load is not None and str(cpus).isdigit() and load / int(cpus) > 0.5


HEADER = ["recipe", "status", "size (MiB), estimate", "bits per weight", "PPL", "PPL ratio", "mean KLD",
          "p99 KLD", "top-1", "flips", "token&shy;izer", "prompt (tok/s)", "gene&shy;ration (tok/s)", "peak memory (MiB)",
          "estimated weights + KV (MiB)", "failed checks"]


def _domain_table(rows: list[dict[str, Any]]) -> str:
    """Mean KLD (± its standard error) and top-1 of each artifact on each further domain."""
    domains = sorted({d for r in rows for d in r.get("domains", {})})
    if not domains:
        return ""
    head = "".join(f"<th>{html.escape(d)}: mean KLD</th><th>{html.escape(d)}: top-1</th>" for d in domains)
    body = []
    for r in rows:
        cells = [f'<td class="l">{html.escape(r["recipe"])}</td>', f'<td>{_kld(r)}</td>']
        for d in domains:
            v = r.get("domains", {}).get(d)
            bad = ' class="failed-status"' if v and v["status"] != C.PASSED else ""
            cells += [f"<td{bad}>{_kld(v) if v else ''}</td>",
                      f"<td>{100 * v['top1_agreement']:.2f}%</td>" if v and "top1_agreement" in v else "<td></td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ("<h2>By domain</h2><p>Each domain is scored against the unquantized model on its own text; ± is the "
            "standard error over windows.</p><table class=domains><thead><tr><th class=l>recipe</th>"
            f"<th>prose: mean KLD</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def _task_table(rows: list[dict[str, Any]]) -> str:
    """Each lm-eval task's accuracy per artifact beside the unquantized model's (validate.tasks)."""
    tasks = sorted({t for r in rows for t in r.get("tasks") or {}})
    if not tasks:
        return ""
    reference = {t: next(r["tasks"][t]["reference"] for r in rows if t in (r.get("tasks") or {})) for t in tasks}
    body = ['<tr><td class="l">unquantized</td>'
            + "".join(f"<td>{reference[t]:.3f}</td><td></td>" if reference[t] is not None else "<td></td><td></td>"
                      for t in tasks) + "</tr>"]
    for r in rows:
        cells = [f'<td class="l">{html.escape(r["recipe"])}</td>']
        for t in tasks:
            v = (r.get("tasks") or {}).get(t)
            se = f" ± {v['stderr']:.3f}" if v and v.get("stderr") is not None else ""
            cells += [f"<td>{v['value']:.3f}{se}</td>" if v else "<td></td>",
                      f"<td>{100 * v['recovery']:.1f}%</td>" if v and v.get("recovery") is not None else "<td></td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{html.escape(t)}</th><th>recovery</th>" for t in tasks)
    return ("<h2>Task accuracy</h2><p>lm-evaluation-harness tasks run on each file in its own runtime; ± is the "
            "standard error over documents, recovery the ratio to the unquantized model's accuracy.</p>"
            f"<table class=domains><thead><tr><th class=l>model</th>{head}</tr></thead><tbody>{''.join(body)}"
            "</tbody></table>")


def _offload_table(rows: list[dict[str, Any]]) -> str:
    """The VRAM wall of each GGUF measured on a GPU: generation speed and energy by layers offloaded."""
    curves = [(r["recipe"], r["offload_curve"]) for r in rows if (r.get("offload_curve") or {}).get("available")]
    if not curves:
        return ""
    body = []
    for recipe, curve in curves:
        for i, p in enumerate(curve["points"]):
            joules = p.get("joules_per_generated_token")
            speed, share = p["generation_tokens_per_second"], p.get("vs_all_on_gpu")
            body.append(f'<tr><td class="l">{html.escape(recipe) if i == 0 else ""}</td><td>{p["gpu_layers"]}</td>'
                        f'<td>{pages.number(speed) if speed is not None else ""}</td>'
                        f'<td>{f"{100 * share:.0f}%" if share is not None else ""}</td>'
                        f'<td>{f"{joules:.3g}" if joules else ""}</td></tr>')
    return ("<h2>Layers on the GPU</h2><p>Greedy generation with all, three quarters, half, a quarter and none of "
            "the layers on the GPU (llama.cpp's n_gpu_layers; the first row counts the output layer too): what "
            "happens when the file does not fit. Joules per token from the GPU's counter (NVML) only.</p>"
            "<table class=domains><thead><tr><th class=l>recipe</th><th>layers on GPU</th><th>generation (tok/s)"
            "</th><th>vs all on GPU</th><th>J per token</th></tr></thead><tbody>" + "".join(body) +
            "</tbody></table>")


def _kld(v: dict[str, Any]) -> str:
    if v.get("mean_kld") is None:
        return ""
    se = f" ± {v['mean_kld_se']:.5f}" if v.get("mean_kld_se") is not None else ""
    return f"{v['mean_kld']:.5f}{se}"


def render_html(report: dict[str, Any]) -> str:
    rows = report["artifacts"]
    any_failed = any(not c["passed"] for r in rows for c in r.get("checks", []))
    header = HEADER if any_failed else HEADER[:-1]
    body = []
    for r in rows:
        failed = "; ".join(f"{c['name']}: {c['detail']}" for c in r.get("checks", []) if not c["passed"])
        fmt = lambda k, spec: format(r[k], spec) if r.get(k) is not None else ""  # noqa: E731
        estimate = r.get("estimate") or {}
        est = (f"\nest. {estimate['weights_bytes'] / 2**20:.2f} ({100 * (r['size_bytes'] / estimate['weights_bytes'] - 1):+.0f}%)"
               if estimate.get("weights_bytes") else "")
        cells = [r["recipe"], r["status"], f"{r['size_bytes'] / 2**20:.2f}{est}", fmt("bits_per_weight", ".2f"),
                 fmt("ppl", ".4f"), fmt("ppl_ratio", ".4f"), fmt("mean_kld", ".5f"), fmt("p99_kld", ".5f"),
                 f"{100 * r['top1_agreement']:.2f}%" if r.get("top1_agreement") is not None else "",
                 f"{round(r['flip_rate'] * r['flip_prompts'])}/{r['flip_prompts']}" if "flip_rate" in r else "",
                 "exact" if r.get("tokenizer", {}).get("exact") else "MISMATCH" if "tokenizer" in r else "",
                 _speed(r, "prompt_tokens_per_second"), _speed(r, "generation_tokens_per_second"),
                 (f"{r['peak_rss_bytes'] / 2**20:.0f}" if r.get("peak_rss_bytes") else "")
                 + (f"\nGPU {r['peak_gpu_memory_bytes'] / 2**20:.0f}" if r.get("peak_gpu_memory_bytes") else ""),
                 f"{(estimate['weights_bytes'] + estimate['kv_cache_bytes']) / 2**20:.0f}" if estimate else "", failed]
        cells = cells if any_failed else cells[:-1]
        cls = "passed" if r["status"] == C.PASSED else "failed"
        body.append(f'<tr class="{cls}">' + "".join(
            f'<td class="{"l" if i in (0, 1, 10, 15) else ""}">{html.escape(str(c)).replace(chr(10), "<br>")}</td>'
            for i, c in enumerate(cells))
            + "</tr>")
    machine = next((r["machine"] for r in rows if r.get("machine")), {})
    note = ("<p class=muted>* measured while the machine was busy (load above half its cores): slower than the file "
            "can run.</p>" if any(busy(r) for r in rows) else "")
    model = html.escape(report["model"])
    return pages.page(f"quantmill report: {report['model']}", f"""<h1>{model}</h1>
<p>{len(rows)} artifact(s) validated against the unquantized model ({sum(r['status'] == C.PASSED for r in rows)} passed).
Measured on {html.escape(machine.get('cpu', '?'))}. Mean KL divergence: how far each file's next-token distribution is
from the original's (0 is identical; lower is better). PPL ratio: its perplexity over the original's (1.00 is the same).
Top-1: how often both pick the same next token. Flips: how many greedy continuations of the
text's openings differ from the original's. Speeds are medians of repeated runs, their range beneath.</p>
<h2>Quality against size</h2>
{pages.chart(chart_points(rows), name=report["model"])}{_ladder_note(rows)}
<table><thead><tr>{''.join(f'<th class="{"l" if i in (0, 1, 10, 15) else ""}">{h}</th>' for i, h in enumerate(header))}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>{note}{_domain_table(rows)}{_task_table(rows)}{_offload_table(rows)}""")
