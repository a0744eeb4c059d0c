"""The team registry's cost over the bare tool: publishing to and pulling from S3, against boto3 alone.

One artifact of SIZE MiB (random bytes: the registry never looks inside) is committed to a local store, then
  publish  copy into the bucket as a registry version (upload, conditional commit, signed record, lineage,
           catalogue page) vs bare: boto3 ``upload_file`` of the same file
  pull     `registry pull` with signature and every digest checked, staged then renamed, vs bare: boto3
           ``download_file`` of the same object
against moto's S3 server on 127.0.0.1 (a real HTTP endpoint; a LAN MinIO behaves alike). Medians of REPS.

    python bench/registry_s3.py [SIZE_MIB] [REPS]      # writes bench/out/registry_s3.json
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out" / "registry_s3.json"


def main(size_mib: int = 512, reps: int = 3) -> dict:
    import boto3
    from moto.server import ThreadedMotoServer

    from quantmill.backends.local_publisher import record_bytes
    from quantmill.registry.entries import ArtifactRegistry, copy_artifact
    from quantmill.registry.locations import S3Location
    from quantmill.registry.operations import pull
    from quantmill.store import provenance, signing
    from quantmill.store.local import LocalStore
    from quantmill.store.s3 import S3Store

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    with tempfile.TemporaryDirectory(prefix="quantmill-bench-") as tmp:
        root = Path(tmp)
        blob = root / "model.gguf"
        with open(blob, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        private, public = signing.generate(root / "keys")
        signer, keys = signing.signer_from(private), signing.load_public_keys([public])
        store = LocalStore(root / "store")
        times: dict[str, list[float]] = {"publish": [], "bare_upload": [], "pull": [], "bare_download": []}
        for rep in range(reps):
            key = f"{rep:064x}"
            with store.stage(key) as staging:
                shutil.copyfile(blob, staging.files / blob.name)
                ref = store.commit(staging, lambda subjects, digest: provenance.statement(
                    subjects=subjects, artifact_digest=digest, key=key, step="quantize", spec_id="bench",
                    impl_version="1", config={}, inputs={}, dependencies=[], tools={}, run=provenance.RunInfo(),
                    started="", finished=""))
            target = S3Store("bench", f"r{rep}", endpoint_url=endpoint, cache_dir=root / f"cache{rep}")
            registry = ArtifactRegistry(S3Location(target.client, "bench", f"r{rep}/registry"), target)
            t0 = time.perf_counter()
            copy_artifact(store, target, ref)
            record = record_bytes(store.statement(key))
            registry.publish("bench-model", {"artifact": {"key": key, "digest": ref.digest}, "publish_key": key,
                                             "model": "bench", "format": "gguf"}, "card",
                             provenance=record, signature=signing.sign(record, signer), lineage=[])
            times["publish"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.upload_file(str(blob), "bench", f"bare/{rep}/model.gguf", Config=target.transfer)
            times["bare_upload"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pull(registry, "bench-model", root / f"pulled{rep}", keys, require_signature=True)
            times["pull"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.download_file("bench", f"bare/{rep}/model.gguf", str(root / f"bare{rep}.gguf"),
                                 Config=target.transfer)
            times["bare_download"].append(time.perf_counter() - t0)
            shutil.rmtree(root / f"pulled{rep}")
            (root / f"bare{rep}.gguf").unlink()
    server.stop()
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    result = {"size_mib": size_mib, "reps": reps, "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
              "median_s": med, "publish_over_bare": round(med["publish"] / med["bare_upload"], 2),
              "pull_over_bare": round(med["pull"] / med["bare_download"], 2),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": date.today().isoformat()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    return result


def markdown(r: dict) -> str:
    m = r["median_s"]
    return (f"{r['size_mib']} MiB artifact, moto S3 on localhost, medians of {r['reps']}: publish {m['publish']:.2f} s vs "
            f"bare boto3 upload {m['bare_upload']:.2f} s (x{r['publish_over_bare']}); pull with signature and digests "
            f"checked {m['pull']:.2f} s vs bare boto3 download {m['bare_download']:.2f} s (x{r['pull_over_bare']}) "
            f"({r['machine']}, {r['date']})")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    print(markdown(main(*args)))
