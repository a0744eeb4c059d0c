"""Publishing to the Hugging Face Hub through huggingface_hub's own code path, against a local stand-in for the
Hub's HTTP API (tests/hub_standin.py): the real Hub cannot be reached from this machine. Asserts the exact files,
card metadata and commit messages the stand-in received."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF, QUICK
from tests.hub_standin import serve

pytestmark = pytest.mark.slow
TOKEN = "hf_standin_secret_0123456789"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from quantmill.store import signing

    server, state, url = serve()
    root = tmp_path_factory.mktemp("hf")
    private, public = signing.generate(root / "keys")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PREFECT_API"))}
    env.update(HF_ENDPOINT=url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=str(root / "hf-home"),
               QUANTMILL_CONF=str(CONF))
    yield {"state": state, "url": url, "root": root, "env": env, "key": private, "pub": public}
    server.shutdown()


def run(hub, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    root = hub["root"]
    return subprocess.run([sys.executable, "-m", "quantmill.cli", "run", "--json", f"store.root={root / 'store'}",
                           f"infra.prefect_home={root / 'prefect'}", "publish=hf", *QUICK, *overrides],
                          cwd=root, env=env or hub["env"], capture_output=True, text=True, timeout=900)


def tensors(*paths: Path) -> dict[str, tuple[str, str]]:
    """Tensor name -> (ggml type, sha256 of its bytes), over one GGUF or all parts of a split one."""
    from quantmill.toolchain.llamacpp import locate

    sys.path.insert(0, str(locate().gguf_py))
    from gguf import GGUFReader

    out = {}
    for path in paths:
        for t in GGUFReader(path).tensors:
            out[t.name] = (t.tensor_type.name, hashlib.sha256(bytes(t.data)).hexdigest())
    return out


def front_matter(card: bytes) -> dict:
    text = card.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_publish_folder_layout_with_split_ggufs_and_signed_records(hub):
    proc = run(hub, "recipe=[gguf_q8_0,gguf_q4_k_m]", "publish.repo_id='team/{model}-GGUF'", "publish.hf_layout=folder",
               "publish.split_max_gb=0.001", f"publish.signing_key={hub['key']}", "publish.tags=[team-quants]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    commits = hub["state"].commits
    outcomes = {o["spec_id"]: o for o in json.loads(proc.stdout)["steps"]}
    assert [(c["repo"], c["revision"]) for c in commits] == [("team/tiny-llama-GGUF", "main")] * 2
    assert hub["state"].repos["team/tiny-llama-GGUF"].private is True
    store = hub["root"] / "store" / "objects"
    for recipe, quant in (("gguf_q8_0", "Q8_0"), ("gguf_q4_k_m", "Q4_K_M")):
        quantized = outcomes[f"quantize:{recipe}"]
        commit = next(c for c in commits if c["summary"].startswith(f"quantmill: tiny-llama-{recipe} "))
        assert commit["summary"] == f"quantmill: tiny-llama-{recipe} ({quant}), artifact {quantized['digest']}"
        stem = f"model-{recipe.split('_', 1)[1]}"
        assert sorted(commit["files"]) == sorted(f"{recipe}/{f}" for f in (
            f"{stem}-00001-of-00002.gguf", f"{stem}-00002-of-00002.gguf", "quantmill.json", "README.md",
            "provenance.json", "provenance.sig.json"))
        # the parts hold exactly the published GGUF's tensors, byte for byte
        original = store / quantized["key"] / "files" / f"{stem}.gguf"
        parts = hub["root"] / "parts" / recipe
        parts.mkdir(parents=True)
        for name, data in commit["files"].items():
            (parts / Path(name).name).write_bytes(data)
        assert tensors(*sorted(parts.glob(f"{stem}-0000*-of-00002.gguf"))) == tensors(original)
        card = commit["files"][f"{recipe}/README.md"]
        meta = front_matter(card)
        assert meta["base_model"] == "tiny-llama" and meta["base_model_relation"] == "quantized"
        assert meta["quantized_by"] == "quantmill" and {"gguf", "quantmill", "team-quants"} <= set(meta["tags"])
        text = card.decode()
        assert "| Perplexity |" in text and "## Provenance" in text and quantized["digest"] in text
        record = json.loads(commit["files"][f"{recipe}/provenance.json"])
        assert record["predicate"]["runDetails"]["byproducts"][0]["digest"]["sha256"] == \
            quantized["digest"].removeprefix("sha256:")
        from quantmill.store import signing

        signing.verify(commit["files"][f"{recipe}/provenance.json"], commit["files"][f"{recipe}/provenance.sig.json"],
                       signing.load_public_keys([hub["pub"]]), what=recipe)
    # the token went to the Hub and nowhere else
    assert {auth for method, _, auth in hub["state"].requests if method == "POST"} == {f"Bearer {TOKEN}"}
    assert TOKEN not in proc.stdout + proc.stderr
    assert not [p for p in (hub["root"] / "store").rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_publishing_again_makes_no_commit(hub):
    settings = ["recipe=[gguf_q8_0,gguf_q4_k_m]", "publish.repo_id='team/{model}-GGUF'", "publish.hf_layout=folder",
                "publish.split_max_gb=0.001", f"publish.signing_key={hub['key']}", "publish.tags=[team-quants]"]
    # forget the publish steps' records, so the publisher itself finds the artifacts already on the Hub
    planned = subprocess.run([sys.executable, "-m", "quantmill.cli", "plan", "--json",
                              f"store.root={hub['root'] / 'store'}", "publish=hf", *QUICK, *settings],
                             cwd=hub["root"], env=hub["env"], capture_output=True, text=True, timeout=300)
    publish_keys = [s["key"] for s in json.loads(planned.stdout)["steps"] if s["step"] == "publish"]
    assert len(publish_keys) == 2
    for key in publish_keys:
        shutil.rmtree(hub["root"] / "store" / "objects" / key)
    before = len(hub["state"].commits)
    proc = run(hub, *settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout)["steps"]
    assert sorted(s["spec_id"] for s in steps if s["status"] == "ran") == ["publish:gguf_q4_k_m", "publish:gguf_q8_0"]
    assert len(hub["state"].commits) == before


def test_branch_layout_puts_each_recipe_on_its_branch(hub):
    proc = run(hub, "recipe=[gguf_q8_0]", "publish.repo_id='team/{model}'", "publish.hf_layout=branch",
               "publish.private=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    commit = hub["state"].commits[-1]
    assert (commit["repo"], commit["revision"]) == ("team/tiny-llama", "gguf_q8_0")
    assert sorted(commit["files"]) == ["README.md", "model-q8_0.gguf", "provenance.json", "quantmill.json"]
    assert hub["state"].repos["team/tiny-llama"].private is False


def test_missing_token_is_one_line_before_any_work(hub, tmp_path):
    env = {**hub["env"], "HF_HOME": str(tmp_path / "empty-hf-home")}
    env.pop("HF_TOKEN")
    proc = subprocess.run([sys.executable, "-m", "quantmill.cli", "run", f"store.root={tmp_path / 'store'}",
                           "publish=hf", "recipe=[gguf_q8_0]"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "quantmill: error: publish.publisher=hf needs a Hugging Face token with write " \
                                  "access: set HF_TOKEN in the environment (or run `hf auth login`); it is never " \
                                  "written to conf/ or records"
    assert not any((tmp_path / "store" / "objects").iterdir())
