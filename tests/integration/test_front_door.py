"""What one person sees: `quantmill quantize` placing named files, the tables at 80 columns, the pages in a browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantmill.digest import sha256_file
from tests.conftest import CONF, REPO, overrides_for

RECIPES = ["gguf_q4_k_m", "gguf_q8_0", "mlx_4bit"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The bundled model through `quantmill quantize` with three recipes of two formats, in a process of its own."""
    root = tmp_path_factory.mktemp("front-door")
    done = _quantmill(root, "quantize", "tiny-llama", *RECIPES, "--out", "quants")
    assert done.returncode == 0, done.stderr[-3000:]
    return root, done


def _quantmill(root: Path, *argv: str, columns: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUANTMILL_CONF": str(CONF), "HF_HUB_OFFLINE": "1"}
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([str(Path(sys.executable).parent / "quantmill"), *argv, *overrides_for(root)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=900)


def test_quantize_places_named_files_with_the_stores_bytes(quantized):
    root, done = quantized
    out = root / "quants"
    gguf = {"gguf_q4_k_m": out / "tiny-llama-Q4_K_M.gguf", "gguf_q8_0": out / "tiny-llama-Q8_0.gguf"}
    mlx = out / "tiny-llama-mlx_4bit"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in gguf.values()), *(p.with_suffix(".md").name for p in gguf.values()), mlx.name])
    assert (mlx / "README.md").is_file() and (mlx / "model.safetensors").is_file()
    for path in [*gguf.values(), mlx]:
        assert str(path.relative_to(root)) in done.stdout, (path, done.stdout)  # the summary names each path
    # The same bytes as the store's record of the quantize step.
    steps = json.loads(_quantmill(root, "run", "--json", f"recipe=[{','.join(RECIPES)}]").stdout)["steps"]
    keys = {s["recipe"]: s["key"] for s in steps if s["step"] == "quantize"}
    for recipe, path in gguf.items():
        record = json.loads((root / "store" / "objects" / keys[recipe] / "provenance.json").read_text())
        (subject,) = [s for s in record["subject"] if s["name"].endswith(".gguf")]
        assert sha256_file(path) == subject["digest"]["sha256"]
    card = gguf["gguf_q4_k_m"].with_suffix(".md").read_text()
    assert "## How to use" in card and "llama-cli -m tiny-llama-gguf_q4_k_m/model-q4_k_m.gguf" in card
    assert "llama-cli -m quants/tiny-llama-Q4_K_M.gguf" in done.stdout and "mlx_lm.generate --model" in done.stdout


def test_llama_cpp_loads_the_placed_gguf(quantized):
    from quantmill.backends.llamacpp_runtime import import_llama_cpp

    root, _ = quantized
    llama = import_llama_cpp().Llama(str(root / "quants" / "tiny-llama-Q4_K_M.gguf"), n_ctx=64, verbose=False)
    try:
        made = llama.create_completion("Once upon a time", max_tokens=8, temperature=0.0)
        assert made["usage"]["completion_tokens"] > 0 and made["choices"][0]["text"].strip(), made
    finally:
        llama.close()


def test_a_failing_gate_writes_nothing_and_says_why_in_one_line(quantized, tmp_path):
    root, _ = quantized
    done = _quantmill(root, "quantize", "tiny-llama", "gguf_q4_k_m", "--out", str(tmp_path / "q"),
                      "recipe.gguf_q4_k_m.gates.max_mean_kld=0.000001")
    errors = [line for line in done.stderr.splitlines() if line.startswith("quantmill: error:")]
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert len(errors) == 1 and "max_mean_kld" in errors[0] and "not written" in errors[0], done.stderr
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def test_ls_at_80_columns_shows_every_name_whole(quantized):
    root, _ = quantized
    done = _quantmill(root, "ls", columns=80)
    assert done.returncode == 0, done.stderr
    assert max(len(line) for line in done.stdout.splitlines()) <= 80, done.stdout
    assert "…" not in done.stdout, done.stdout
    for recipe in RECIPES:
        assert f"tiny-llama-{recipe}" in done.stdout, done.stdout
    assert "0.0" in done.stdout  # the KLD column is kept, whole
    plan = _quantmill(root, "plan", f"recipe=[{','.join(RECIPES)}]", columns=80)
    assert "quantize:gguf_q4_k_m" in plan.stdout and "validate:reference-gguf" in plan.stdout, plan.stdout


def test_registry_versions_show_the_settings_that_made_them(quantized):
    root, _ = quantized
    assert _quantmill(root, "run", "recipe=[gguf_q4_k_m]", "recipe.gguf_q4_k_m.imatrix=false").returncode == 0
    versions = json.loads(_quantmill(root, "registry", "ls", "--versions", "--json").stdout)
    mine = [e for e in versions if e["name"] == "tiny-llama-gguf_q4_k_m"]
    assert [e["version"] for e in mine] == [1, 2]
    assert mine[0]["made_with"]["config"]["imatrix"] is True and mine[1]["made_with"]["config"]["imatrix"] is False
    assert mine[0]["made_with"]["config_digest"] != mine[1]["made_with"]["config_digest"]
    table = _quantmill(root, "registry", "ls", "--versions", columns=160).stdout
    assert f"gguf_q4_k_m@{mine[0]['made_with']['config_digest'][:8]}" in table, table
    assert f"gguf_q4_k_m@{mine[1]['made_with']['config_digest'][:8]}" in table, table


def _layout(url: str, width: int, shot: Path) -> dict:
    """Open ``url`` at ``width`` px in Debian's headless Chromium; what a reader would see, from the layout boxes."""
    import asyncio
    import shutil

    from playwright.sync_api import sync_playwright

    asyncio.set_event_loop(asyncio.new_event_loop())
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed; `make test` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        seen = page.evaluate("""() => {
            const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
            return {
              scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
              charts: [...document.querySelectorAll('svg.chart')].map(svg => ({
                x: [...svg.querySelectorAll('text.tick.x')].map(t => t.textContent),
                y: [...svg.querySelectorAll('text.tick.y')].map(t => t.textContent),
                labels: [...svg.querySelectorAll('text.label')].map(t => ({text: t.textContent, box: box(t)})),
                points: svg.querySelectorAll('circle.point').length,
                fronts: [...svg.querySelectorAll('polyline.front')].map(l => l.dataset.family)})),
              rows: [...document.querySelectorAll('tr.artifact')].map(r => ({
                name: r.dataset.name,
                links: Object.fromEntries([...r.querySelectorAll('a[href]')].map(a => [a.className, a.href]))}))};
        }""")
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    seen["errors"] = errors
    return seen


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("width", [1024, 1400])
def test_pages_fit_the_window_with_numbered_axes_and_working_links(quantized, width):
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    root, _ = quantized
    shots = REPO / ".quantmill" / "test-artifacts"
    pages = {"catalogue": root / "store" / "registry" / "index.html",
             "report": root / "store" / "reports" / "tiny-llama" / "report.html"}
    for kind, path in pages.items():
        seen = _layout(path.as_uri(), width, shots / f"{kind}-{width}.png")
        assert seen["errors"] == [] and seen["scroll"] <= seen["inner"], (kind, seen["scroll"], seen["inner"])
        (chart,) = seen["charts"]
        assert chart["points"] == 3 and len(chart["x"]) >= 3 and len(chart["y"]) >= 2, chart
        assert all(float(t) >= 0 for t in chart["x"] + chart["y"]), chart  # numbers, not blanks
        assert sorted(label["text"] for label in chart["labels"]) == ["Q4", "Q4_K_M", "Q8_0"], chart["labels"]
        boxes = [label["box"] for label in chart["labels"]]
        assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), boxes
        assert chart["fronts"] == ["gguf"], chart  # two GGUF points make a front; one MLX point does not
    seen = _layout(pages["catalogue"].as_uri(), width, shots / f"catalogue-{width}.png")
    assert sorted(r["name"] for r in seen["rows"]) == sorted(f"tiny-llama-{r}" for r in RECIPES)
    for row in seen["rows"]:
        assert sorted(row["links"]) == ["card", "download", "record", "report"], row
        for kind, href in row["links"].items():
            target = Path(url2pathname(urlparse(href).path))
            assert target.is_file() and target.stat().st_size > 0, (row["name"], kind, target)
        assert Path(url2pathname(urlparse(row["links"]["download"]).path)).suffix in (".gguf", ".safetensors")


@pytest.mark.parametrize("argv, message", [
    (["quantize", "tiny-llama", "--out", "a-file"], "quantmill: error: --out 'a-file' is a file; give a folder"),
    (["quantize", "no-such-model"], "quantmill: error: model 'no-such-model' is not a folder, a bundled model"),
])
def test_bad_quantize_input_is_one_line_before_any_step(tmp_path, argv, message):
    (tmp_path / "a-file").write_text("")
    done = _quantmill(tmp_path, *argv)
    assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "store").exists()
