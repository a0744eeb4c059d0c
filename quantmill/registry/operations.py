"""What ``quantmill registry`` does: search by measured quality, lineage, verified pull, verify, tags, gc.

Every read that hands bytes to a user re-hashes them against the provenance record published with them, and
checks that record's signature when trusted keys are configured; nothing is written where the user asked until
every file passed (files are staged beside the destination, then renamed into place).
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from quantmill import constants as C
from quantmill.digest import sha256_file
from quantmill.errors import IntegrityError, NotFound, QuantmillError
from quantmill.registry.entries import ArtifactRegistry
from quantmill.registry.names import LINEAGE, PROVENANCE, SIGNATURE
from quantmill.store import provenance as prov


# -- search --------------------------------------------------------------------------------------------------
def nominal_bits(entry: dict[str, Any]) -> int | None:
    """The bits a format is named by (Q4_K_M: 4, W8A16: 8, mlx 3-bit: 3, F16: 16), else floor(bits per weight)."""
    quant = (entry.get("quant_type") or "").upper()
    for pattern in (r"^I?Q(\d)", r"^W(\d+)", r"(\d+)[-_ ]?BIT", r"^(?:NV)?FP(\d+)", r"^NF(\d)", r"^B?F(\d+)$"):
        if m := re.search(pattern, quant):
            return int(m.group(1))
    bpw = entry.get("bits_per_weight")
    return int(bpw) if bpw else None


@dataclass
class Filters:
    model: str | None = None
    format: str | None = None
    bits: int | None = None
    max_kld: float | None = None
    max_ppl_ratio: float | None = None
    fits: Any = None  # a TargetConfig
    tag: str | None = None
    domain: str | None = None  # the quality filters read this domain's metrics (``validate.domains``)

    def __call__(self, e: dict[str, Any]) -> bool:
        m = e.get("metrics") or {}
        if self.domain and self.domain != "prose":
            m = (e.get("domains") or {}).get(self.domain)
            if m is None:  # not measured on that domain: it cannot be said to meet a bound there
                return False
        if self.model and e["model"] != self.model:
            return False
        if self.format and e["format"] != self.format:
            return False
        if self.bits is not None and nominal_bits(e) != self.bits:
            return False
        if self.max_kld is not None and not (m.get("mean_kld") is not None and m["mean_kld"] <= self.max_kld):
            return False
        if self.max_ppl_ratio is not None and not (m.get("ppl_ratio") is not None
                                                   and m["ppl_ratio"] <= self.max_ppl_ratio):
            return False
        if self.tag and self.tag not in e.get("tags", []):
            return False
        return self.fits is None or fits(e, self.fits)


def same_gpu(target_gpu: str, measured_gpu: str | None) -> bool:
    """``H100`` matches ``NVIDIA H100 80GB HBM3``; an empty target class matches nothing."""
    return bool(target_gpu and measured_gpu and target_gpu.lower() in measured_gpu.lower())


def overhead_bytes(entry: dict[str, Any], target) -> int:
    """The runtime's memory beyond weights and KV cache: measured where the entry was validated on the target's GPU
    class (peak GPU memory at the validation's context, less the file and that KV cache), else the target's."""
    peak = (entry.get("metrics") or {}).get("peak_gpu_memory_bytes")
    if peak and entry.get("size_bytes") and same_gpu(getattr(target, "gpu", ""), entry.get("gpu")):
        kv = (entry.get("kv_cache_bytes_per_token") or 0) * (entry.get("validated_n_ctx") or 0)
        return max(0, int(peak) - int(entry["size_bytes"]) - int(kv))
    return int(target.overhead_gb * 2**30)


def footprint_bytes(entry: dict[str, Any], target) -> int | None:
    """Weights + KV cache at the target's context + the runtime's overhead (None: size unknown)."""
    size = entry.get("size_bytes") or (entry.get("metrics") or {}).get("size_bytes")
    if not size:
        return None
    return int(size + (entry.get("kv_cache_bytes_per_token") or 0) * target.context + overhead_bytes(entry, target))


def fits(entry: dict[str, Any], target) -> bool:
    need = footprint_bytes(entry, target)
    return need is not None and need <= target.memory_gb * 2**30


def search(registry: ArtifactRegistry, filters: Filters, *, every_version: bool = False) -> list[dict[str, Any]]:
    """The latest version of each name that passes ``filters`` (or every version, with its tags)."""
    if not every_version:
        return [e for e in registry.entries() if filters(e)]
    out = []
    for name in registry.names():
        tags = registry.tags(name)
        for v in registry.versions(name):
            e = registry.get(name, v)
            e = {**e, "tags": sorted(t for t, tv in tags.items() if tv == v)}
            if filters(e):
                out.append(e)
    return out


# -- lineage -------------------------------------------------------------------------------------------------
def lineage_of(registry: ArtifactRegistry, name: str, version: int | str | None = None) -> list[dict[str, Any]]:
    """The hops from the base model to the published artifact: source first, then each step that made the next."""
    name, v = registry.resolve(name, version)
    data = registry.file(name, v, LINEAGE)
    if data is None:
        raise NotFound(f"{name}:v{v} was published without its lineage; publish it again to record it")
    nodes = {n["key"]: n for n in json.loads(data)}
    entry = registry.get(name, v)
    chain, key = [], entry["artifact"]["key"]
    while key in nodes:  # follow the main input back to the download: model (convert/quantize), artifact
        node = nodes[key]
        chain.append(node)
        key = next((node["inputs"][k] for k in ("model", "artifact", "base") if k in node["inputs"]), None)
    chain.reverse()
    hops = []
    for node in chain:
        side = {k: nodes[kk]["spec"] for k, kk in node["inputs"].items() if kk in nodes and kk not in
                {n["key"] for n in chain}}
        hops.append({"step": node["step"], "spec": node["spec"], "digest": node["digest"], "key": node["key"],
                     "sources": node.get("sources", []), "side_inputs": side})
    return hops


# -- pull and verify -----------------------------------------------------------------------------------------
def fetch_verified(registry: ArtifactRegistry, statement: dict[str, Any], key: str, into: Path, *,
                   users_only: bool = False) -> list[str]:
    """Fetch every file the record lists (``users_only``: the files users load) from the registry's store into
    ``into`` (fresh, not from a cache) and re-hash it; returns the problems, one line per file."""
    problems = []
    for subject in (prov.user_subjects_of if users_only else prov.subjects_of)(statement):
        dst = into / subject.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            registry.store.fetch_file(key, subject.path, dst)
        except (NotFound, FileNotFoundError):
            problems.append(f"{subject.path}: missing from {registry.store.uri}")
            continue
        actual = sha256_file(dst)
        if actual != subject.sha256:
            problems.append(f"{subject.path}: sha256 {actual[:16]}… but its provenance record says "
                            f"{subject.sha256[:16]}…")
    return problems


def pull(registry: ArtifactRegistry, name: str, to: Path, keys: list, *, require_signature: bool) -> dict[str, Any]:
    """Download a published artifact into ``to`` (new or empty), every digest and the signature checked first."""
    name, v = registry.resolve(name)
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise QuantmillError(f"{to} exists and is not an empty directory; pull into a new one (--to DIR)")
    statement, record, signer = registry.signed_record(name, v, keys, require=require_signature)
    entry = registry.get(name, v)
    staging = to.parent / f".{to.name}.pull-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        problems = fetch_verified(registry, statement, entry["artifact"]["key"], staging, users_only=True)
        if problems:
            raise IntegrityError(f"{name}:v{v}: " + "; ".join(problems) + "; nothing was written to " + str(to))
        (staging / PROVENANCE).write_bytes(record)
        signature = registry.file(name, v, SIGNATURE)
        if signature is not None:
            (staging / SIGNATURE).write_bytes(signature)
        if to.exists():
            to.rmdir()
        staging.rename(to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"name": name, "version": v, "to": str(to), "files": [s.path for s in prov.user_subjects_of(statement)],
            "signed_by": signer, "artifact": entry["artifact"]}


def verify_name(registry: ArtifactRegistry, name: str, keys: list, *, require_signature: bool) -> list[str]:
    """Problems with a published artifact: its signature, then every file in the registry re-hashed."""
    import tempfile

    name, v = registry.resolve(name)
    statement, _, _ = registry.signed_record(name, v, keys, require=require_signature)
    with tempfile.TemporaryDirectory(prefix="quantmill-verify-") as tmp:
        return fetch_verified(registry, statement, registry.get(name, v)["artifact"]["key"], Path(tmp))


def verify_path(path: Path, keys: list, *, require_signature: bool) -> list[str]:
    """Problems with a pulled directory: its signature (if keys), then each listed file re-hashed."""
    from quantmill.store import signing

    record_path = path / PROVENANCE
    if not record_path.is_file():
        raise NotFound(f"{path} has no {PROVENANCE}; `quantmill registry pull` writes it beside the files")
    record = record_path.read_bytes()
    signature = (path / SIGNATURE).read_bytes() if (path / SIGNATURE).is_file() else None
    if signature is not None and keys:
        signing.verify(record, signature, keys, what=str(path))
    elif require_signature:
        raise signing.SignatureError(f"{path}: " + ("no signature file" if signature is None else "no trusted keys"))
    problems = []
    for subject in prov.user_subjects_of(json.loads(record)):  # what pull writes
        file = path / subject.path
        if not file.is_file():
            problems.append(f"{subject.path}: missing")
        elif sha256_file(file) != subject.sha256:
            problems.append(f"{subject.path}: sha256 differs from its provenance record")
    return problems


# -- garbage collection --------------------------------------------------------------------------------------
def gc_plan(registry: ArtifactRegistry, keep_days: float) -> dict[str, list[str]]:
    """What ``gc`` deletes: objects that no name's latest version, no tag and no run within ``keep_days``
    references (directly, or as something a referenced artifact was made from), and the old untagged registry
    versions whose artifact goes with them."""
    from quantmill.registry.entries import lineage

    store = registry.store
    keep_versions = []
    for name in registry.names():
        versions = registry.versions(name)
        tagged = set(registry.tags(name).values())
        keep_versions += [(name, v) for v in versions if v == versions[-1] or v in tagged]
    roots = set()
    for name, v in keep_versions:
        entry = registry.get(name, v)
        roots |= {entry["artifact"]["key"], entry.get("publish_key")} - {None}
    cutoff = datetime.now(timezone.utc) - timedelta(days=keep_days)
    objects = store.keys()
    for key in objects:
        finished = store.statement(key)["predicate"]["runDetails"]["metadata"].get("finishedOn")
        if finished and datetime.fromisoformat(finished.replace("Z", "+00:00")) >= cutoff:
            roots.add(key)
    referenced = set()
    for key in roots:
        if key in objects:
            referenced |= {n["key"] for n in lineage(store, key)}
    delete = sorted(set(objects) - referenced)
    stale_versions = sorted(f"{n}:v{v}" for n in registry.names() for v in registry.versions(n)
                            if (n, v) not in keep_versions and registry.get(n, v)["artifact"]["key"] in delete)
    return {"objects": delete, "versions": stale_versions}


def gc_apply(registry: ArtifactRegistry, plan: dict[str, list[str]]) -> None:
    for version in plan["versions"]:  # entries first: a name never points at a deleted object
        name, v = version.split(":v")
        registry.location.delete_version(name, int(v))
    for key in plan["objects"]:
        registry.store.delete(key)


def keys_for(publish, extra: list[str]) -> list:
    from quantmill.store import signing

    return signing.load_public_keys([*publish.trusted_keys, *extra])


__all__ = ["Filters", "search", "lineage_of", "pull", "verify_name", "verify_path", "gc_plan", "gc_apply",
           "nominal_bits", "fits", "keys_for", "C"]
