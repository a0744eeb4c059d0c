"""Energy from the hardware's counters: RAPL read through powercap with its wrap-around undone, NVML where a driver
is, and "not available" with the reason where neither is."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantmill.toolchain import energy


def _domain(root: Path, name: str, uj: int, limit: int, label: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{limit}\n")
    (d / "name").write_text(f"{label}\n")
    return d


def test_rapl_package_domains_are_read_and_a_wrapped_counter_is_undone(tmp_path):
    package = _domain(tmp_path, "intel-rapl:0", 1_000_000, 2_000_000, "package-0")
    _domain(tmp_path, "intel-rapl:0:0", 5, 2_000_000, "core")  # a part of package-0: not counted twice
    counters, why = energy.rapl_counters(tmp_path)
    assert why is None and [c.name for c in counters] == ["rapl package-0"]
    meter = energy.EnergyMeter(("cpu",))
    meter.counters, meter.reasons = counters, []
    meter.start()
    (package / "energy_uj").write_text("500000\n")  # passed 2 J and restarted: 1.5 J spent
    spent = meter.joules()
    assert spent["joules"] == pytest.approx(1.5) and spent["per_counter"] == {"rapl package-0": pytest.approx(1.5)}
    record = energy.per_token(meter, {"generated": (spent["joules"], 30, 2.0), "prompt": (0.2, 0, 0.0)})
    assert record == {"available": True, "counters": ["rapl package-0"], "joules_per_generated_token": 0.05,
                      "joules_per_prompt_token": None}
    # a span shorter than the counters resolve is not read as zero energy
    short = energy.per_token(meter, {"generated": (0.0, 30, 0.02)})
    assert short["joules_per_generated_token"] is None and short["detail"].startswith("too short to read")


def test_without_counters_the_record_says_why_and_guesses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "POWERCAP", tmp_path / "no-powercap")
    meter = energy.EnergyMeter(("cpu",))
    assert not meter.available
    assert energy.per_token(meter, {"generated": (0.0, 10, 2.0)}) == {
        "available": False, "detail": f"not available on this machine: no powercap interface ({tmp_path / 'no-powercap'})"}


def test_nvml_without_a_driver_is_a_reason_not_an_error():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pytest.skip("an NVIDIA driver is present here")
    except pynvml.NVMLError:
        pass
    counters, why = energy.nvml_counters()
    assert counters == [] and why.startswith("NVML unavailable (")


@pytest.mark.skipif(not any(Path("/sys/class/powercap").glob("intel-rapl:*/energy_uj")),
                    reason="no RAPL counters on this machine")
def test_rapl_is_read_where_the_machine_has_it():
    counters, why = energy.rapl_counters(Path("/sys/class/powercap"))
    if why and "not readable" in why:
        pytest.skip(why)
    assert counters and all(c.read() >= 0 for c in counters)
