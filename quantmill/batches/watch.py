"""One pass of a watch: for each model of a batch, the upstream revision now, against the one last built.

The revision is what the model source keys the download by: a Hub repo's commit sha (``main`` resolved now), a
local directory's content digest (files hashed once per inode, so an unchanged pass hashes nothing). Where it
changed, or was never built, the model's runs go; elsewhere nothing is composed beyond the batch and nothing
runs. A Hub model's runs are pinned to the sha this pass saw. The last built revisions are kept in the store's
state directory (``watch/<batch>.json``), updated only when every run of the model passed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from quantmill.batches.batch import Run, batch_runs, groups, load_batch
from quantmill.config import compose


@dataclass
class Upstream:
    name: str  # origin/model[@target]
    revision: str
    previous: str | None
    runs: list[Run]
    pin: list[str] = field(default_factory=list)  # overrides fixing the revision seen (Hub models)

    @property
    def changed(self) -> bool:
        return self.revision != self.previous


def revision_of(cfg, store) -> tuple[str, list[str]]:
    """(the model's upstream revision, overrides that pin a run to it)."""
    from quantmill.backends import SOURCES

    info = SOURCES.get(cfg.model.source).describe(cfg.model, store.digest_cache())
    identity = dict(info.identity)
    pin = [f"model.revision={identity['commit']}"] if cfg.model.source == "hf" else []
    if cfg.model.adapter:
        from quantmill.plan import lora

        identity["adapter"] = json.dumps(lora.describe(cfg.model, store.digest_cache()).identity, sort_keys=True)
    return json.dumps(identity, sort_keys=True), pin


def _state_path(store, batch: str) -> Path:
    return store.state_dir() / "watch" / f"{batch}.json"


def check(conf_dir: Path, batch_name: str) -> tuple[list[Upstream], Path]:
    """Each model group of the batch with its revision now and the last one built."""
    from quantmill.store import open_store

    batch = load_batch(conf_dir, batch_name)
    out, state_path = [], None
    for overrides, members in groups(batch_runs(conf_dir, batch)):
        cfg = compose([*overrides, f"recipe=[{members[0].recipe}]"], conf_dir=conf_dir)
        store = open_store(cfg.store)
        state_path = state_path or _state_path(store, batch_name)
        state = _read(state_path)
        name = f"{members[0].origin}/{members[0].model}" + (f"@{members[0].target}" if members[0].target else "")
        revision, pin = revision_of(cfg, store)
        out.append(Upstream(name, revision, state.get(name, {}).get("revision"), members, pin))
    return out, state_path


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def record(state_path: Path, upstream: Upstream) -> None:
    """Remember ``upstream.revision`` as built (atomically: a crash leaves the old state, never half a file)."""
    state = _read(state_path)
    state[upstream.name] = {"revision": upstream.revision, "built": datetime.now(timezone.utc).isoformat(),
                            "runs": [r.id for r in upstream.runs]}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(f".{time.time_ns()}.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(state_path)


def watch_once(conf_dir: Path, batch_name: str, run_here: Callable[..., list], *,
               verbose: bool = False) -> dict[str, Any]:
    """One pass: run the runs of every model whose upstream changed with ``run_here`` (``launch.run_here``: the
    launcher sits above this layer); return what was seen and done."""
    start = time.perf_counter()
    upstreams, state_path = check(conf_dir, batch_name)
    report = []
    for up in upstreams:
        item = {"model": up.name, "revision": up.revision, "previous": up.previous, "changed": up.changed,
                "runs": [r.id for r in up.runs] if up.changed else [], "results": []}
        if up.changed:
            results = run_here(conf_dir, up.runs, verbose=verbose, extra=up.pin)
            item["results"] = [r.to_json() for r in results]
            if all(r.ok for r in results):  # a failed model is tried again next pass (its finished steps cached)
                record(state_path, up)
        report.append(item)
    return {"batch": batch_name, "seconds": round(time.perf_counter() - start, 3), "models": report,
            "triggered": sum(len(i["runs"]) for i in report)}
