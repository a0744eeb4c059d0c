"""`quantmill store check [--repair]` and the staging a killed step leaves: found, repaired, and cleaned by runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from quantmill import constants as C
from quantmill.store.check import check, remove_stale_staging
from quantmill.store.local import LocalStore
from quantmill.store.owners import OWNER_FILE
from tests.conftest import CONF
from tests.unit.test_store import commit_payload

GOOD, NO_RECORD, FLIPPED = "aa" * 32, "bb" * 32, "cc" * 32


def _damaged_store(root) -> LocalStore:
    store = LocalStore(root)
    for key in (GOOD, NO_RECORD, FLIPPED):
        commit_payload(store, key, key.encode() * 100)
    (root / C.OBJECTS_DIR / NO_RECORD / C.PROVENANCE_FILE).unlink()  # a commit that never completed
    path = next((root / C.OBJECTS_DIR / FLIPPED / C.FILES_DIR).rglob("*.gguf"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    dead = root / C.STAGING_DIR / "dead-step"  # a step killed mid-way, by a process that is gone
    (dead / C.FILES_DIR).mkdir(parents=True)
    (dead / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": 2 ** 22 + 7, "started": "1"}))
    return store


def test_check_finds_each_kind_of_problem_and_repair_puts_them_right(tmp_path):
    store = _damaged_store(tmp_path)
    alive = store.stage(GOOD)  # a staging folder this live process owns: never touched
    report = check(store)
    assert report.without_record == [NO_RECORD]
    assert list(report.damaged) == [FLIPPED] and "does not match its provenance record" in report.damaged[FLIPPED][0]
    assert report.stale_staging == ["dead-step"]
    assert not report.clean

    repaired = check(store, repair=True)
    assert len(repaired.repaired) == 3
    assert sorted(p.name.split(".")[0] for p in (tmp_path / C.DAMAGED_DIR).iterdir()) == sorted([NO_RECORD, FLIPPED])
    assert check(store).clean
    assert store.lookup(GOOD) is not None and alive.root.is_dir()


def test_a_full_check_rehashes_what_stat_data_would_miss(tmp_path):
    store = LocalStore(tmp_path)
    commit_payload(store, GOOD, b"x" * 1000)
    path = next((tmp_path / C.OBJECTS_DIR / GOOD / C.FILES_DIR).rglob("*.gguf"))
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: the stat check trusts it
    assert check(store).clean
    assert list(check(store, full=True).damaged) == [GOOD]


def test_a_commit_over_an_incomplete_one_sets_it_aside(tmp_path):
    store = _damaged_store(tmp_path)
    assert store.lookup(NO_RECORD) is None
    ref = commit_payload(store, NO_RECORD, NO_RECORD.encode() * 100)
    assert store.lookup(NO_RECORD) == ref and store.verify(NO_RECORD) == []
    assert not (tmp_path / C.OBJECTS_DIR / NO_RECORD / OWNER_FILE).exists()


def test_runs_remove_only_staging_no_live_process_owns(tmp_path):
    store = _damaged_store(tmp_path)
    alive = store.stage(GOOD)
    assert remove_stale_staging(store) == ["staging/dead-step removed"]
    assert alive.root.is_dir()


def test_store_check_command_exits_1_with_problems_and_0_once_repaired(tmp_path):
    _damaged_store(tmp_path / "store")
    env = {**os.environ, "QUANTMILL_CONF": str(CONF)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "quantmill.cli", "store", "check", *args,
                               f"store.root={tmp_path / 'store'}"], env=env, capture_output=True, text=True)

    found = run()
    assert found.returncode == 1 and len(found.stdout.splitlines()) == 3, found.stdout + found.stderr
    assert run("--repair").returncode == 0
    assert run().stdout.strip().endswith(": clean")
