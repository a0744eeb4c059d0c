"""publish: write the model card and register the artifact under its human name, if it passed validation."""

from __future__ import annotations

from typing import Any

from quantmill import constants as C
from quantmill import pages
from quantmill.errors import PublishRefused
from quantmill.steps.validate import failed_checks

LIBRARY = {"gguf": "gguf", "mlx": "mlx", "safetensors": "transformers", "onnx": "onnxruntime-genai"}


def check_publishable(name: str, validation: dict[str, Any] | None, *, enforce: bool) -> bool:
    """True if publishable as validated; False if publishable only as unvalidated (enforce off).

    Raises:
        PublishRefused: validation failed (or did not run) and enforce is on.
    """
    if validation is not None and validation["status"] == C.PASSED:
        return True
    if not enforce:
        return False
    if validation is None:
        raise PublishRefused(f"{name}: not validated; enable validate.enabled or set validate.enforce=false "
                             f"to publish it marked unvalidated")
    raise PublishRefused(f"{name}: failed validation: {'; '.join(failed_checks(validation))}; not published "
                         f"(`quantmill run --force`, i.e. validate.enforce=false, publishes it marked unvalidated)")


def with_domains(validation: dict[str, Any] | None, domains: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """One verdict over the main text and every further domain: failed if any failed, each failed domain check
    named ``code: max_mean_kld (...)``."""
    if validation is None or not domains:
        return validation
    checks = list(validation.get("checks", []))
    for domain, record in domains.items():
        checks += [{**c, "name": f"{domain}: {c['name']}"} for c in record.get("checks", []) if not c["passed"]]
    passed = validation["status"] == C.PASSED and all(r["status"] == C.PASSED for r in domains.values())
    return {**validation, "checks": checks, "status": C.PASSED if passed else C.FAILED}


def domain_rows(validation: dict[str, Any], domains: dict[str, dict[str, Any]]) -> list[str]:
    """The card's "Quality by domain": the main text, then each further domain."""
    lines = ["## Quality by domain", "", "| domain | mean KLD | p99 KLD | PPL ratio | top-1 | verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for domain, v in [("prose", validation), *domains.items()]:
        if "mean_kld" not in v:
            continue
        se = f" ± {v['mean_kld_se']:.5f}" if v.get("mean_kld_se") is not None else ""
        failed = [c["name"] for c in v.get("checks", []) if not c["passed"]]
        lines.append(f"| {domain} | {v['mean_kld']:.5f}{se} | {v['p99_kld']:.5f} | {v['ppl_ratio']:.4f} | "
                     f"{100 * v['top1_agreement']:.2f} % | {'passed' if not failed else 'failed ' + ', '.join(failed)} |")
    return [*lines, ""]


def metric_rows(v: dict[str, Any]) -> list[tuple[str, str]]:
    """The validation record as (label, value) rows, shared by the model card and the report."""
    rows = [("Size", f"{v['size_bytes'] / 2**20:.2f} MiB"), ("Validation", v["status"]),
            ("Validated with", v["runtime"])]
    if "mean_kld" in v:
        rows += [("Perplexity", f"{v['ppl']:.4f} (reference {v['ref_ppl']:.4f}, ratio {v['ppl_ratio']:.4f})"),
                 ("KL divergence", f"mean {v['mean_kld']:.5f}"
                                   + (f" ± {v['mean_kld_se']:.5f}" if v.get("mean_kld_se") is not None else "")
                                   + f", p99 {v['p99_kld']:.5f}"),
                 ("Top-1 agreement", f"{100 * v['top1_agreement']:.2f} %"),
                 *([("Flips", flip_text(v))] if "flip_rate" in v else []),
                 *([("Task accuracy", task_text(v["tasks"]))] if v.get("tasks") else []),
                 *([("Layers on the GPU", offload_text(v["offload_curve"]))] if v.get("offload_curve") else []),
                 ("Tokenizer fidelity", v["tokenizer"]["detail"]),
                 ("Speed", speed_text(v)),
                 *([("Energy", energy_text(v["energy"]))] if "energy" in v else []),
                 ("Peak memory", f"{v['peak_rss_bytes'] / 2**20:.0f} MiB"
                                 + (f" host, {v['peak_gpu_memory_bytes'] / 2**20:.0f} MiB GPU"
                                    if v.get("peak_gpu_memory_bytes") is not None else "")),
                 ("Measured on", machine_text(v["machine"]))]
    return rows


def machine_text(machine: dict[str, Any]) -> str:
    return f"{machine.get('cpu', machine.get('machine', '?'))} ({machine.get('cpus', '?')} cores)"


def energy_text(energy: dict[str, Any]) -> str:
    """Joules per token from the hardware's counters, or why there are none."""
    if not energy.get("available"):
        return energy.get("detail", "not available on this machine")
    parts = [f"{energy[f'joules_per_{k}_token']:.3g} J per {k} token" for k in ("generated", "prompt")
             if energy.get(f"joules_per_{k}_token") is not None]
    return ", ".join(parts) + f" ({', '.join(energy['counters'])})"


def flip_text(v: dict[str, Any]) -> str:
    n = v.get("flip_prompts", 0)
    where = (f", the first difference at token {v['first_divergence']:.1f} on average"
             if v.get("first_divergence") is not None else "")
    return f"{round(v['flip_rate'] * n)} of {n} greedy continuations differ from the original's{where}"


def task_text(tasks: dict[str, dict[str, Any]]) -> str:
    """Each lm-eval task's accuracy ± its standard error, beside the unquantized model's, and their ratio."""
    parts = []
    for name, t in tasks.items():
        se = f" ± {t['stderr']:.3f}" if t.get("stderr") is not None else ""
        ref = (f" (original {t['reference']:.3f}, recovery {100 * t['recovery']:.1f} %)"
               if t.get("recovery") is not None else "")
        parts.append(f"{name} {t['metric']} {t['value']:.3f}{se}{ref} over {t['docs']} documents")
    return "; ".join(parts)


def offload_text(curve: dict[str, Any]) -> str:
    """The VRAM wall: generation speed (and energy) as fewer layers sit on the GPU."""
    if not curve.get("available"):
        return curve.get("detail", "not measured")
    parts = []
    for p in curve["points"]:
        joules = (f", {p['joules_per_generated_token']:.3g} J/token" if p.get("joules_per_generated_token") is not None
                  else "")
        if p["generation_tokens_per_second"] is None:
            parts.append(f"{p['gpu_layers']}: no tokens generated")
            continue
        share = f"{100 * p['vs_all_on_gpu']:.0f} %" if p.get("vs_all_on_gpu") is not None else "n/a"
        parts.append(f"{p['gpu_layers']}: {pages.number(p['generation_tokens_per_second'])} tok/s ({share}{joules})")
    return "generation with " + "; ".join(parts)


def speed_text(v: dict[str, Any]) -> str:
    """Medians with their range over the timed runs, and the machine's load while they ran."""
    runs = v.get("speed_runs") or {}

    def one(key: str) -> str:
        spread = runs.get(key) or []
        extra = (f" (range {pages.number(min(spread))}–{pages.number(max(spread))} over {len(spread)} runs)"
                 if len(spread) > 1 else "")
        return f"{pages.number(v[key]) if v.get(key) is not None else 'n/a'} tok/s{extra}"

    load = f"; machine load {v['load_1m']:.2f} on {v['machine'].get('cpus', '?')} cores" if "load_1m" in v else ""
    return f"prompt {one('prompt_tokens_per_second')}, generation {one('generation_tokens_per_second')}{load}"


def model_card(*, name: str, model: str, base_model: str, recipe: str, fmt: str, quant: dict[str, Any],
               validation: dict[str, Any] | None, validated: bool, artifact_digest: str, tags: list[str],
               license: str | None, adapter: str | None = None, made_by: dict[str, Any] | None = None,
               files: list[str] | None = None, domains: dict[str, dict[str, Any]] | None = None) -> str:
    """README.md with Hugging Face metadata: what was made, from what, and what validation measured."""
    quant_type = quant.get("quant_type") or quant.get("outtype", "").upper()
    bpw = quant.get("bits_per_weight")
    all_tags = sorted({fmt, "quantmill", "quantized", quant_type.lower(), *tags, *(["lora-merged"] if adapter else [])}
                      - {""})
    lines = ["---", f"base_model: {base_model}", "base_model_relation: quantized", "quantized_by: quantmill",
             f"library_name: {LIBRARY.get(fmt, fmt)}"]
    if license:
        lines.append(f"license: {license}")
    lines.append("tags:")
    lines += [f"- {t}" for t in all_tags]
    base = f"[{base_model}](https://huggingface.co/{base_model})" if "/" in base_model else f"`{base_model}`"
    merged = f" with LoRA adapter `{adapter}` merged in" if adapter else ""
    lines += ["---", "", f"# {name}", "", f"{quant_type} {fmt.upper()} of {base}{merged}, made by quantmill recipe "
              f"`{recipe}`.", ""]
    if not validated:
        lines += ["> **Unvalidated**: published with validation not enforced; "
                  + ("it failed: " + "; ".join(failed_checks(validation)) if validation else "it was not validated")
                  + ".", ""]
    rows = [("Quant type", quant_type)]
    if quant.get("quant_type_requested"):
        mix = ", ".join(f"{kind} {share:.0%}" for kind, share in quant["tensor_types"].items())
        rows += [("Recipe asked for", f"{quant['quant_type_requested']}; llama.cpp stored {mix} of the weights "
                                      "(its blocks do not divide every row)")]
    if quant.get("mix"):
        shares = ", ".join(f"{kind} {share:.0%}" for kind, share in quant["tensor_types"].items())
        rows += [("Mixed precision", f"a type per tensor for a budget of {quant['budget_bpw']:g} bits per weight, "
                                     f"chosen by {quant['sensitivity_method']} sensitivity; weights stored as {shares}"
                                     + (f"; `{quant['rules_file']}` holds the rules for `llama-quantize "
                                        f"--tensor-type-file`" if quant.get("rules_file") else "")),
                 ("Predicted mean KLD", f"{quant['predicted_kld']:.5f} (sum of each tensor's measured cost)")]
    rows += [("Bits per weight", f"{bpw:.2f}" if bpw else "n/a"),
            ("Importance matrix", "yes" if quant.get("imatrix") else "no")]
    if validation:
        rows += metric_rows(validation)
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if validation and domains:
        lines += ["", *domain_rows(validation, domains)]
    lines += ["", *how_to_use(name, fmt, files or []), "## Provenance", "", "| | |", "|---|---|", f"| Artifact digest | `{artifact_digest}` |"]
    if made_by:
        tools = ", ".join(f"{k} {v}" for k, v in sorted(made_by.get("tools", {}).items())) or "none"
        lines += [f"| Made by | step `{made_by['spec']}`; tools: {tools} |",
                  f"| Built by | {made_by['builder']} (quantmill {made_by['quantmill']}), finished {made_by['finished']} |"]
    lines += ["| Record | `provenance.json`: in-toto Statement, SLSA Provenance v1, the sha256 of every file and how it "
              "was made; `provenance.sig.json`: its DSSE signature, when the publisher signs |", "",
              f"Check what you downloaded: `quantmill registry verify DIR --key PUBLISHER.pub.json`, or "
              f"`quantmill registry pull {name}` (verifies before writing).", ""]
    return "\n".join(lines)


def how_to_use(name: str, fmt: str, files: list[str]) -> list[str]:
    """The card's "How to use": fetch the files, then the commands of the runtime that loads them."""
    from pathlib import PurePosixPath

    from quantmill.registry.export import run_commands

    main = [f for f in files if f.endswith(".gguf")] if fmt == "gguf" else []
    target = PurePosixPath(name, main[0]) if len(main) == 1 else PurePosixPath(name)
    return ["## How to use", "", "Fetch the files into a folder (from a team registry every byte is checked against "
            "the provenance record):", "", "```sh", f"quantmill registry pull {name} --to {name}", "```", "",
            "Then run it:", "", "```sh", *run_commands(fmt, target), "```", ""]


def made_by(statement: dict[str, Any]) -> dict[str, Any]:
    """The provenance summary a model card shows: the step, its tools, the builder."""
    predicate = statement["predicate"]
    tools = {d["name"].removeprefix("tool:"): d.get("annotations", {}).get("version", "")
             for d in predicate["buildDefinition"]["resolvedDependencies"] if d.get("name", "").startswith("tool:")}
    run = predicate["runDetails"]
    return {"spec": predicate["buildDefinition"]["externalParameters"]["spec"], "tools": tools,
            "builder": run["builder"]["id"], "quantmill": run["builder"].get("version", {}).get("quantmill", "?"),
            "finished": run["metadata"].get("finishedOn", "?")}
