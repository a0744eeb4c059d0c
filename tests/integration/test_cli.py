"""The quantmill command, called as a user calls it (in process, through ``main``)."""

from __future__ import annotations

import json

import pytest

from quantmill import constants as C
from quantmill.cli import main
from tests.conftest import compose_in, overrides_for, run_inline

pytestmark = pytest.mark.slow


def _json(capsys, argv):
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


def test_plan_json_shows_keys_and_cache_state(tmp_path, capsys):
    code, plan = _json(capsys, ["plan", "--json", *overrides_for(tmp_path)])
    assert code == 0 and plan["model"] == "tiny-llama"
    steps = {s["id"]: s for s in plan["steps"]}
    assert steps["download"]["cache"] == "miss" and len(steps["download"]["key"]) == 64
    assert steps["quantize:gguf_q4_k_m"]["cache"] == "pending"
    assert steps["quantize:gguf_q4_k_m"]["inputs"] == {"model": "convert:gguf-f16",
                                                       "imatrix": "calibrate:imatrix-gguf"}
    assert "llama.cpp" in steps["convert:gguf-f16"]["tools"]
    assert not (tmp_path / "store" / C.OBJECTS_DIR).exists() or not any((tmp_path / "store" / C.OBJECTS_DIR).iterdir())


def test_ls_and_show_json(default_run, capsys):
    root, _, _ = default_run
    code, entries = _json(capsys, ["ls", "--json", *overrides_for(root)])
    assert code == 0
    assert sorted(e["name"] for e in entries) == ["tiny-llama-gguf_q4_k_m", "tiny-llama-gguf_q8_0"]
    assert all(e["artifact"]["digest"].startswith("sha256:") and len(e["artifact"]["digest"]) == 71
               for e in entries)
    code, shown = _json(capsys, ["show", "tiny-llama-gguf_q4_k_m", "--json", *overrides_for(root)])
    assert code == 0 and shown["verified"] is True and shown["problems"] == []
    assert shown["entry"]["artifact"]["digest"] == next(
        e for e in entries if e["name"] == "tiny-llama-gguf_q4_k_m")["artifact"]["digest"]
    assert [s["name"] for s in shown["provenance"]["subject"]] == ["model-q4_k_m.gguf", C.RESULT_FILE]
    assert "quantized_by: quantmill" in shown["card"]


def test_plan_after_run_is_all_hits(default_run, capsys):
    root, _, _ = default_run
    _, plan = _json(capsys, ["plan", "--json", *overrides_for(root)])
    assert {s["cache"] for s in plan["steps"]} == {"hit"}


def test_verify_names_a_tampered_file(tmp_path, capsys):
    store, _, results = run_inline(compose_in(tmp_path, "recipe=[gguf_q8_0]"))
    assert main(["verify", "tiny-llama-gguf_q8_0", *overrides_for(tmp_path)]) == 0
    gguf = store.files(results["quantize:gguf_q8_0"].ref) / "model-q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    gguf.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", "tiny-llama-gguf_q8_0", *overrides_for(tmp_path)]) == 1
    assert "tiny-llama-gguf_q8_0: model-q8_0.gguf: sha256" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["run", "recipe=[gguf_q4_k_mm]"], "quantmill: error: unknown recipe 'gguf_q4_k_mm' (did you mean 'gguf_q4_k_m'?); known: awq_w4a16,"),
    (["plan", "model.colour=red"], "quantmill: error: unknown config key 'model.colour'"),
    (["show", "tiny-llama-gguf_q4_k"], "did you mean 'tiny-llama-gguf_q4_k_m'?"),
])
def test_bad_input_is_one_line_and_exit_2(default_run, capsys, argv, expected):
    root, _, _ = default_run
    assert main([*argv, *overrides_for(root)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_multirun_sweeps_a_matrix(tmp_path, capsys):
    code = main(["run", "-m", "recipe=[gguf_q8_0],[gguf_q4_0]", "validate.enabled=false",
                 "validate.enforce=false", *overrides_for(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("quantmill run:") == 2  # one summary per job of the sweep
    _, entries = _json(capsys, ["ls", "--json", *overrides_for(tmp_path)])
    assert sorted(e["name"] for e in entries) == ["tiny-llama-gguf_q4_0", "tiny-llama-gguf_q8_0"]
    assert all(e["validated"] is False for e in entries)


def test_a_temporary_server_that_does_not_start_is_one_line(tmp_path):
    """Prefect's temporary API server not answering in time is a one-line error naming the setting, and nothing
    is stored (a wait of 0 s: Prefect gives up before its first health check)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "0"
    argv = ["run", "recipe=[safetensors_bf16]", *overrides_for(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "quantmill.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "temporary API server" in proc.stderr and "within 0 s" in proc.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in proc.stderr and "PREFECT_API_URL" in proc.stderr
    objects = tmp_path / "store" / C.OBJECTS_DIR
    assert not objects.exists() or not any(objects.iterdir())
