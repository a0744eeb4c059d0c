"""The team registry against moto's S3 server: two team members publish from their own stores, a third lists,
pulls and verifies; signatures; search by measured quality; gc; bad names."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from quantmill.config import compose
from quantmill.prefect.launch import run_config
from tests.conftest import CONF, QUICK

pytestmark = pytest.mark.slow
BUCKET = "team-registry"


@pytest.fixture(scope="module")
def team(s3_endpoint, tmp_path_factory):
    """Members alice and bob publish (each from a store of their own, each signing with a key of their own) to one
    bucket; carol has only the bucket and both public keys."""
    import os

    from quantmill.store import signing

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    root = tmp_path_factory.mktemp("team")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    # what a team does to serve the catalogue page: anyone may read the registry folder (not the artifacts)
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{BUCKET}/quantmill/registry/*"}]}))
    keys = {who: signing.generate(root / "keys", who) for who in ("alice", "bob", "mallory")}
    publish = ["publish=s3", f"publish.bucket={BUCKET}", f"publish.endpoint_url={s3_endpoint}"]
    outcomes = {}
    loose = ["recipe.gguf_q2_k.gates.max_ppl_ratio=null", "recipe.gguf_q2_k.gates.max_mean_kld=null"]
    for who, recipes, model in (("alice", "gguf_q8_0,gguf_q4_k_m", []),
                                ("bob", "gguf_q2_k", ["model.name=tiny-llama-bob", *loose])):
        cfg = compose([f"store.root={root / who / 'store'}", f"infra.prefect_home={root / who / 'prefect'}",
                       f"store.cache_dir={root / who / 'cache'}", f"recipe=[{recipes}]", *publish, *QUICK, *model,
                       f"publish.signing_key={keys[who][0]}"], conf_dir=CONF)
        outcomes[who] = run_config(cfg)
        assert all(o.ok for o in outcomes[who]), [o for o in outcomes[who] if not o.ok]
    carol = [*publish, f"store.root={root / 'carol' / 'store'}", f"store.cache_dir={root / 'carol' / 'cache'}",
             f"publish.trusted_keys=[{keys['alice'][1]},{keys['bob'][1]}]"]
    return {"root": root, "keys": keys, "outcomes": outcomes, "carol": carol, "endpoint": s3_endpoint,
            "publish": publish}


def quantmill(team, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "quantmill.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd or team["root"], env={**os.environ, "QUANTMILL_CONF": str(CONF)})


def registry_json(team, *args: str):
    proc = quantmill(team, "registry", *args, "--json", *team["carol"])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_two_members_publish_a_third_lists_them(team):
    names = {e["name"]: e for e in registry_json(team, "ls")}
    assert sorted(names) == ["tiny-llama-bob-gguf_q2_k", "tiny-llama-gguf_q4_k_m", "tiny-llama-gguf_q8_0"]
    assert all(e["validated"] and e["version"] == 1 for e in names.values())
    keyids = {who: json.loads(team["keys"][who][1].read_text())["keyid"] for who in ("alice", "bob")}
    assert names["tiny-llama-gguf_q8_0"]["signed_by"] == keyids["alice"]
    assert names["tiny-llama-bob-gguf_q2_k"]["signed_by"] == keyids["bob"]


@pytest.mark.parametrize("again", ["same settings", "--force"])
def test_publishing_the_same_bytes_again_adds_no_version(team, again):
    before = _bucket(team)
    root = team["root"] / "alice"
    force = ["validate.enforce=false"] if again == "--force" else []  # what `quantmill run --force` sets
    cfg = compose([f"store.root={root / 'store'}", f"infra.prefect_home={root / 'prefect'}",
                   f"store.cache_dir={root / 'cache'}", "recipe=[gguf_q8_0,gguf_q4_k_m]", *team["publish"], *QUICK,
                   f"publish.signing_key={team['keys']['alice'][0]}", *force], conf_dir=CONF)
    # forget alice's publish records, so the registry itself must find the artifacts it already holds
    for o in team["outcomes"]["alice"]:
        if o.step == "publish":
            shutil.rmtree(root / "store" / "objects" / o.key, ignore_errors=True)
    outcomes = run_config(cfg)
    assert sorted(o.spec_id for o in outcomes if o.status == "ran") == ["publish:gguf_q4_k_m", "publish:gguf_q8_0"]
    assert _bucket(team) == before


def _bucket(team) -> dict[str, str]:
    client = boto3.client("s3", endpoint_url=team["endpoint"])
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("index.html"):
                out[o["Key"]] = o["ETag"]
    return out


def _alice_files(team, recipe: str) -> dict[str, bytes]:
    quantize = next(o for o in team["outcomes"]["alice"] if o.spec_id == f"quantize:{recipe}")
    files = team["root"] / "alice" / "store" / "objects" / quantize.key / "files"
    return {p.name: p.read_bytes() for p in files.iterdir()}


def test_pull_reproduces_the_exact_bytes_and_verifies_the_signature(team, tmp_path):
    out = registry_json(team, "pull", "tiny-llama-gguf_q4_k_m", "--to", str(tmp_path / "q4"), "--require-signature")
    assert out["signed_by"] == json.loads(team["keys"]["alice"][1].read_text())["keyid"]
    pulled = {p.name: p.read_bytes() for p in (tmp_path / "q4").iterdir()}
    expected = _alice_files(team, "gguf_q4_k_m")
    assert {k: hashlib.sha256(v).hexdigest() for k, v in pulled.items() if k in expected} == \
        {k: hashlib.sha256(v).hexdigest() for k, v in expected.items()}
    assert sorted(pulled) == sorted([*expected, "provenance.json", "provenance.sig.json"])
    proc = quantmill(team, "registry", "verify", str(tmp_path / "q4"), "--require-signature", *team["carol"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"{tmp_path / 'q4'}: verified", proc.stderr


def _objects(team, contains: str) -> list[str]:
    return [k for k in _bucket(team) if contains in k]


def test_a_flipped_byte_in_the_bucket_fails_pull_and_verify_naming_the_file(team, tmp_path):
    client = boto3.client("s3", endpoint_url=team["endpoint"])
    key = next(k for k in _objects(team, "/files/") if k.endswith("model-q8_0.gguf"))
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x01
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    try:
        proc = quantmill(team, "registry", "pull", "tiny-llama-gguf_q8_0", "--to", str(tmp_path / "q8"),
                         *team["carol"])
        assert proc.returncode == 2
        assert "tiny-llama-gguf_q8_0:v1: model-q8_0.gguf: sha256 " in proc.stderr, proc.stderr
        assert "nothing was written" in proc.stderr and not (tmp_path / "q8").exists()
        assert [p.name for p in tmp_path.iterdir()] == []  # not even the staging folder is left
        proc = quantmill(team, "registry", "verify", "tiny-llama-gguf_q8_0", *team["carol"])
        assert proc.returncode == 1 and proc.stderr.startswith("tiny-llama-gguf_q8_0: model-q8_0.gguf: sha256 ")
    finally:
        body[len(body) // 2] ^= 0x01
        client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    assert quantmill(team, "registry", "verify", "tiny-llama-gguf_q8_0", *team["carol"]).returncode == 0


@pytest.mark.parametrize("tamper", ["record", "signature", "other-key"])
def test_tampered_records_and_foreign_signatures_fail(team, tamper):
    from quantmill.store import signing

    client = boto3.client("s3", endpoint_url=team["endpoint"])
    record_key = next(k for k in _objects(team, "tiny-llama-gguf_q4_k_m/v1/") if k.endswith("/provenance.json"))
    sig_key = record_key.replace("provenance.json", "provenance.sig.json")
    saved = {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in (record_key, sig_key)}
    if tamper == "record":
        client.put_object(Bucket=BUCKET, Key=record_key, Body=saved[record_key].replace(b'"quantize"', b'"quantise"'))
        expected = "the signature is over other bytes than the provenance record published beside it"
    elif tamper == "signature":
        envelope = json.loads(saved[sig_key])
        sig = envelope["signatures"][0]["sig"]
        envelope["signatures"][0]["sig"] = ("A" if sig[0] != "A" else "B") + sig[1:]
        client.put_object(Bucket=BUCKET, Key=sig_key, Body=json.dumps(envelope).encode())
        expected = "signature does not verify with any trusted key"
    else:  # mallory re-signs the record with a key nobody trusts
        client.put_object(Bucket=BUCKET, Key=sig_key,
                          Body=signing.sign(saved[record_key], signing.signer_from(team["keys"]["mallory"][0])))
        expected = "signature does not verify with any trusted key (signed by key " + \
            json.loads(team["keys"]["mallory"][1].read_text())["keyid"][:16]
    try:
        proc = quantmill(team, "registry", "verify", "tiny-llama-gguf_q4_k_m", *team["carol"])
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
        assert proc.stderr.startswith("quantmill: error: tiny-llama-gguf_q4_k_m:v1: ")
        proc = quantmill(team, "registry", "pull", "tiny-llama-gguf_q4_k_m", "--to", "x", *team["carol"])
        assert proc.returncode == 2 and expected in proc.stderr
    finally:
        for k, v in saved.items():
            client.put_object(Bucket=BUCKET, Key=k, Body=v)


def test_ls_filters_by_measured_quality(team):
    kld = {}
    for who in ("alice", "bob"):
        for o in team["outcomes"][who]:
            if o.step == "validate" and o.result.get("mean_kld") is not None and o.spec_id.count(":") == 1:
                name = ("tiny-llama-bob-" if who == "bob" else "tiny-llama-") + o.recipe
                kld[name] = o.result["mean_kld"]
    assert len(kld) == 3
    threshold = sorted(kld.values())[1]  # two of the three are at or under it
    found = registry_json(team, "ls", "--max-kld", str(threshold))
    assert sorted(e["name"] for e in found) == sorted(n for n, k in kld.items() if k <= threshold)
    assert len(found) == 2
    assert [e["name"] for e in registry_json(team, "ls", "--bits", "4")] == ["tiny-llama-gguf_q4_k_m"]
    assert [e["name"] for e in registry_json(team, "ls", "--model", "tiny-llama-bob")] == ["tiny-llama-bob-gguf_q2_k"]
    assert len(registry_json(team, "ls", "--fits", "phone_8gb")) == 3
    assert registry_json(team, "ls", "--max-ppl-ratio", "0.5") == []


def test_ls_fits_keeps_what_fits_and_only_that(team, tmp_path):
    # a target whose memory lies between the footprints of the largest artifact and the others
    entries = registry_json(team, "ls")
    context = 64
    need = {e["name"]: e["size_bytes"] + e["kv_cache_bytes_per_token"] * context for e in entries}
    largest = max(need, key=need.get)
    memory = (need[largest] + max(v for k, v in need.items() if k != largest)) / 2
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "target" / "tiny_box.yaml").write_text(
        f"name: tiny_box\ndescription: a box just too small for one of them\nmemory_gb: {memory / 2**30}\n"
        f"runtime: llamacpp\nrecipes: [gguf_q4_k_m]\ncontext: {context}\noverhead_gb: 0.0\n")
    proc = quantmill(team, "registry", "ls", "--json", "--fits", "tiny_box", "--config-dir", str(conf), *team["carol"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(e["name"] for e in json.loads(proc.stdout)) == sorted(n for n in need if n != largest)


def test_recommend_picks_the_closest_that_fits_and_says_why(team, tmp_path):
    entries = {e["name"]: e for e in registry_json(team, "ls") if e["model"] == "tiny-llama"}
    context = 64
    need = {n: e["size_bytes"] + e["kv_cache_bytes_per_token"] * context for n, e in entries.items()}
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    for box, memory in (("small_box", (need["tiny-llama-gguf_q4_k_m"] + need["tiny-llama-gguf_q8_0"]) / 2),
                        ("roomy_box", 2 * need["tiny-llama-gguf_q8_0"])):
        (conf / "target" / f"{box}.yaml").write_text(
            f"name: {box}\nmemory_gb: {memory / 2**30}\nruntime: llamacpp\nrecipes: [gguf_q4_k_m]\n"
            f"context: {context}\noverhead_gb: 0.0\n")
    def recommend(box: str) -> dict:
        proc = quantmill(team, "recommend", "tiny-llama", "--target", box, "--json", "--config-dir", str(conf),
                         *team["carol"])
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    small = recommend("small_box")  # Q8_0 is closer to the original but does not fit: the 4-bit file is chosen
    assert [r["name"] for r in small["rows"] if r["rank"]] == ["tiny-llama-gguf_q4_k_m"]
    kld = entries["tiny-llama-gguf_q4_k_m"]["metrics"]["mean_kld"]
    assert small["recommendation"].startswith(f"tiny-llama-gguf_q4_k_m: the lowest mean KL divergence ({kld:.5f})")
    assert "closer to the original but not usable there: tiny-llama-gguf_q8_0 (needs " in small["recommendation"]
    roomy = recommend("roomy_box")  # both fit: the closer one first
    assert [r["name"] for r in roomy["rows"] if r["rank"]] == ["tiny-llama-gguf_q8_0", "tiny-llama-gguf_q4_k_m"]
    assert all(r["generation_tokens_per_second"] > 0 for r in roomy["rows"])
    proc = quantmill(team, "recommend", "tiny-llama", "--target", "none", *team["carol"])
    assert proc.returncode == 2 and "has no memory_gb" in proc.stderr and "Traceback" not in proc.stderr


def test_lineage_show_and_promote(team):
    hops = registry_json(team, "lineage", "tiny-llama-gguf_q4_k_m")
    assert [h["step"] for h in hops] == ["download", "convert", "quantize"]
    assert hops[0]["sources"][0]["name"] == "model" and "imatrix" in hops[-1]["side_inputs"]
    alice = {(o.step, o.recipe): o for o in team["outcomes"]["alice"] if o.step != "convert" or o.recipe is None}
    assert [h["digest"] for h in hops] == [alice[("download", None)].digest, alice[("convert", None)].digest,
                                           alice[("quantize", "gguf_q4_k_m")].digest]
    proc = quantmill(team, "registry", "promote", "tiny-llama-gguf_q4_k_m", "--tag", "stable", *team["carol"])
    assert proc.returncode == 0 and proc.stdout.strip() == "tiny-llama-gguf_q4_k_m:stable -> v1"
    shown = registry_json(team, "show", "tiny-llama-gguf_q4_k_m:stable")
    assert shown["tags"] == {"stable": 1} and shown["signature_verified_with"] == shown["signed_by"]
    assert "base_model_relation: quantized" in shown["card"]
    assert [e["name"] for e in registry_json(team, "ls", "--tag", "stable")] == ["tiny-llama-gguf_q4_k_m"]


@pytest.mark.parametrize("name, message", [
    ("tiny-llama-gguf_q4_k", "no published artifact named 'tiny-llama-gguf_q4_k' in s3://team-registry/quantmill/"
                             "registry; did you mean 'tiny-llama-gguf_q4_k_m'?"),
    ("../etc", "registry name '../etc' is invalid; use letters, digits, '.', '_' and '-' (no path separators or "
               "'..')"),
    ("team/tiny", "registry name 'team/tiny' is invalid"),
    ("tiny-llama-gguf_q8_0:beta", "'tiny-llama-gguf_q8_0' has no tag 'beta'; tags: none"),
])
def test_bad_names_are_one_line(team, name, message):
    proc = quantmill(team, "registry", "show", name, *team["carol"])
    assert proc.returncode == 2 and proc.stderr.startswith(f"quantmill: error: {message}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _browse(url: str, screenshot: Path) -> dict:
    """Open ``url`` in Debian's headless Chromium: console errors, the table rows, the charts; save a screenshot."""
    import asyncio
    import shutil

    from playwright.sync_api import sync_playwright

    asyncio.set_event_loop(asyncio.new_event_loop())  # Prefect closed this thread's loop; Playwright needs one
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed; `make test` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        response = page.goto(url)
        rows = {}
        for row in page.locator("tr.artifact").all():
            cells = [c.inner_text().strip() for c in row.locator("td").all()]
            rows[row.get_attribute("data-name")] = cells
        charts = {}
        for svg in page.locator("svg.chart").all():
            box = svg.bounding_box()
            charts[svg.get_attribute("data-model")] = {"points": svg.locator("circle.point").count(),
                                                       "width": box["width"], "height": box["height"]}
        link = page.locator("tr.artifact a[href$='provenance.json']").first.get_attribute("href")
        record = page.request.get(page.url.rsplit("/", 1)[0] + "/" + link) if url.startswith("http") else None
        record = (record.status, record.json()) if record else (None, None)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {"status": response.status if response else None, "errors": errors, "rows": rows, "charts": charts,
            "record_status": record[0], "record": record[1]}


def test_the_catalogue_page_served_from_the_bucket(team):
    from tests.conftest import REPO

    shot = REPO / ".quantmill" / "test-artifacts" / "catalogue-s3.png"
    page = _browse(f"{team['endpoint']}/{BUCKET}/quantmill/registry/index.html", shot)
    assert page["status"] == 200 and page["errors"] == []
    entries = {e["name"]: e for e in registry_json(team, "ls")}
    assert sorted(page["rows"]) == sorted(entries)
    for name, cells in page["rows"].items():
        e, m = entries[name], entries[name]["metrics"]
        assert cells[0] == f"{name} v{e['version']}" and cells[1] == f"{e['format']} {e['quant_type']}"
        assert cells[2] == f"{e['size_bytes'] / 2**20:.2f}" and cells[3] == f"{e['bits_per_weight']:.2f}"
        assert cells[4] == f"{m['mean_kld']:.5f}" and cells[5] == f"{m['ppl_ratio']:.4f}"
        assert cells[7] == "passed, signed" and cells[9].startswith("download · card · report · record")
    assert {m: c["points"] for m, c in page["charts"].items()} == {"tiny-llama": 2, "tiny-llama-bob": 1}
    assert all(c["width"] >= 460 and c["height"] >= 260 for c in page["charts"].values())  # laid out, drawn
    assert page["record_status"] == 200 and page["record"]["_type"] == "https://in-toto.io/Statement/v1"
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_the_catalogue_page_opened_from_disk(default_run):
    from tests.conftest import REPO

    root, _, outcomes = default_run
    page = _browse((root / "store" / "registry" / "index.html").as_uri(),
                   REPO / ".quantmill" / "test-artifacts" / "catalogue-local.png")
    assert page["errors"] == []
    kld = {o.recipe: o.result["mean_kld"] for o in outcomes if o.step == "validate" and "mean_kld" in o.result}
    assert {name: cells[4] for name, cells in page["rows"].items()} == \
        {f"tiny-llama-{r}": f"{k:.5f}" for r, k in kld.items()}
    assert page["charts"]["tiny-llama"]["points"] == 2


def test_gc_dry_run_lists_exactly_the_unreferenced_objects(tmp_path, capsys):
    """Two versions of one name (the second made from a BF16 intermediate) and an unpublished recipe: what only the
    old version and the unpublished run made is unreferenced; a tag keeps the old version's."""
    from quantmill.cli import main
    from tests.conftest import overrides_for

    base = [*overrides_for(tmp_path), *QUICK]
    first = run_config(compose([*base, "recipe=[gguf_q8_0]"], conf_dir=CONF))
    second = run_config(compose([*base, "recipe=[gguf_q8_0]", "convert.gguf_outtype=bf16"], conf_dir=CONF))
    loose = run_config(compose([*base, "recipe=[gguf_q6_k]", "publish.enabled=false"], conf_dir=CONF))
    assert all(o.ok for o in first + second + loose)
    keys = lambda outcomes: {o.key for o in outcomes}  # noqa: E731
    expected = (keys(first) | keys(loose)) - keys(second)
    assert {o.step for o in first if o.key in expected} == {"convert", "quantize", "validate", "publish"}

    def gc(*args: str) -> dict:
        capsys.readouterr()
        assert main(["registry", "gc", "--keep-days", "0", "--json", *args, *overrides_for(tmp_path)]) == 0
        return json.loads(capsys.readouterr().out)

    plan = gc("--dry-run")
    assert set(plan["objects"]) == expected and plan["versions"] == ["tiny-llama-gguf_q8_0:v1"]
    assert gc("--dry-run") == plan and all((tmp_path / "store" / "objects" / k).is_dir() for k in expected)
    assert gc("--dry-run", "--keep-days", "1")["objects"] == []  # all made just now: recent runs keep them

    assert main(["registry", "promote", "tiny-llama-gguf_q8_0", "--tag", "stable", "--version", "1",
                 *overrides_for(tmp_path)]) == 0
    plan = gc("--dry-run")
    assert set(plan["objects"]) == keys(loose) - keys(second) - keys(first) and plan["versions"] == []

    gc()  # for real: the unpublished q6_k run's objects go; everything named stays and verifies
    assert sorted(p.name for p in (tmp_path / "store" / "objects").iterdir()) == \
        sorted((keys(first) | keys(second) | keys(loose)) - (keys(loose) - keys(second) - keys(first)))
    capsys.readouterr()
    for name in ("tiny-llama-gguf_q8_0:stable", "tiny-llama-gguf_q8_0"):
        assert main(["registry", "verify", name, *overrides_for(tmp_path)]) == 0



def test_a_publisher_without_a_registry_cannot_be_listed(team):
    proc = quantmill(team, "registry", "ls", "publish=hf")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("quantmill: error: publish.publisher='hf' cannot be listed; the team registry is "
                                   "publish=local or publish=s3")
