"""Shared fixtures. Models are built or copied locally (the bundled tiny Llama); nothing comes from a hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from quantmill.backends.local_source import BUNDLED_ROOT
from quantmill.config import compose
from quantmill.execute import run_step
from quantmill.plan.build import plan
from quantmill.prefect import settings
from quantmill.store import open_store

settings.prefect_defaults()  # before any test module imports Prefect; CLI subprocesses inherit it
# Each test has a PREFECT_HOME of its own: kept servers (the default) would pile up, one per test, until idle.
# Tests of the kept server ask for it with infra.server=kept.
os.environ.setdefault("QUANTMILL_PREFECT_SERVER", "temporary")

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A writable copy of the bundled tiny Llama, for tests that damage it."""
    dst = tmp_path / "tiny-llama"
    shutil.copytree(BUNDLED_ROOT / "tiny-llama", dst)
    return dst


def overrides_for(root: Path, *extra: str) -> list[str]:
    """Overrides that keep a test's store and Prefect home inside its own directory."""
    return [f"store.root={root / 'store'}", f"infra.prefect_home={root / 'prefect'}", *extra]


def compose_in(root: Path, *extra: str):
    return compose(overrides_for(root, *extra), conf_dir=CONF)


def run_inline(cfg):
    """Walk the plan with the plain step executor, no Prefect: what every task does, in order."""
    store = open_store(cfg.store)
    the_plan = plan(cfg, store)
    refs, results = {}, {}
    for spec in the_plan:
        result = run_step(spec, {name: refs[sid] for name, sid in spec.inputs.items()}, store)
        refs[spec.id], results[spec.id] = result.ref, result
    return store, the_plan, results


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The default pipeline run once through the real embedded Prefect flow, shared by read-only tests."""
    from quantmill.prefect.launch import run_config

    root = tmp_path_factory.mktemp("default-run")
    cfg = compose_in(root)
    outcomes = run_config(cfg)
    return root, cfg, outcomes


def plant(store, key: str, directory: Path) -> None:
    """Replace the committed artifact under ``key`` with the files of ``directory`` (a planted artifact)."""
    from quantmill import constants as C
    from quantmill.store import provenance

    shutil.rmtree(store.root / C.OBJECTS_DIR / key)
    with store.stage(key) as staging:
        for p in directory.iterdir():
            shutil.copy(p, staging.files / p.name)
        store.commit(staging, lambda subjects, digest: provenance.statement(
            subjects=subjects, artifact_digest=digest, key=key, step="quantize", spec_id="planted",
            impl_version="1", config={}, inputs={}, dependencies=[], tools={}, run=provenance.RunInfo(),
            started="", finished=""))


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server: a real HTTP S3 endpoint on 127.0.0.1 (free port), one per test module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def second_model(directory: Path, scale: float = 1.01) -> Path:
    """Another tiny Llama: the bundled one with its output head scaled, so its bytes (and every key) differ."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(BUNDLED_ROOT / "tiny-llama", directory)
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weight"] = (tensors["lm_head.weight"] * scale).astype(tensors["lm_head.weight"].dtype)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def project(root: Path, *, batch: str | None = None) -> Path:
    """A project of its own under ``root``: a copy of conf/ (store and Prefect home inside ``root``), a second model
    ``tiny_b`` (a local directory) and, if given, ``conf/batch/pair.yaml``. Returns the conf directory."""
    conf = root / "conf"
    shutil.copytree(CONF, conf)
    model = second_model(root / "models" / "tiny-b")
    (conf / "model" / "tiny_b.yaml").write_text(f"name: tiny-b\nsource: local\npath: {model}\n")
    for path in (conf / "batch").glob("*.yaml"):
        path.unlink()
    if batch is not None:
        (conf / "batch" / "pair.yaml").write_text(batch)
    config = (conf / "config.yaml").read_text()
    (conf / "config.yaml").write_text(config.replace("  - _self_\n", f"  - _self_\n\nstore:\n  root: {root / 'store'}\n"
                                                     f"infra:\n  prefect_home: {root / 'prefect'}\n"))
    return conf


QUICK = ["validate.n_chunks=2", "validate.n_ctx=128", "calibration.num_samples=16", "calibration.seq_len=128"]
