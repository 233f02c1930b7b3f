"""hal.energy: the NVML counter against a stand-in of pynvml's calls, the powercap reader on a
fake sysfs tree, the estimates, and the bench's energy columns."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from hal import energy
from hal.bench import run_bench
from hal.errors import ConfigError
from hal.models import get


class _NVMLError(Exception):
    pass


def fake_pynvml(energy_mj: list[int], fail_init: bool = False) -> types.SimpleNamespace:
    """A strict stand-in of the pynvml calls hal makes (any other name is an AttributeError);
    each energy read returns the next value of ``energy_mj`` (millijoules, as NVML)."""
    calls: list[tuple] = []
    reads = iter(energy_mj)

    def init() -> None:
        calls.append(("nvmlInit",))
        if fail_init:
            raise _NVMLError("Driver Not Loaded")

    def handle(index: int) -> str:
        calls.append(("nvmlDeviceGetHandleByIndex", index))
        return f"handle{index}"

    def total_energy(h: str) -> int:
        assert h.startswith("handle")
        return next(reads)

    return types.SimpleNamespace(
        NVMLError=_NVMLError, nvmlInit=init, nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3", nvmlDeviceGetTotalEnergyConsumption=total_energy,
        calls=calls)


def test_nvml_counter_reads_millijoules_as_joules() -> None:
    nvml = fake_pynvml([1_000, 1_000, 3_500])  # the constructor's probe read, then two reads
    counter = energy.NvmlCounter(0, nvml)
    e0 = counter.joules()
    assert counter.joules() - e0 == pytest.approx(2.5)
    assert ("nvmlDeviceGetHandleByIndex", 0) in nvml.calls
    assert "GPU 0 (NVIDIA H100 80GB HBM3)" in counter.source


def test_nvml_counter_maps_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    nvml = fake_pynvml([0])
    energy.NvmlCounter(1, nvml)
    assert ("nvmlDeviceGetHandleByIndex", 1) in nvml.calls
    nvml = fake_pynvml([0])
    energy.NvmlCounter(0, nvml)
    assert ("nvmlDeviceGetHandleByIndex", 3) in nvml.calls


def test_nvml_failure_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], fail_init=True))
    counter, why = energy.counter_for("cuda:0")
    assert counter is None and "Driver Not Loaded" in why
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([5_000, 5_000, 6_000]))
    counter, why = energy.counter_for("gpu:0")  # TensorFlow's and JAX's device name
    assert counter is not None and "NVML" in why
    assert -counter.joules() + counter.joules() == pytest.approx(1.0)


def _zone(root: Path, name: str, uj: int, max_range: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(f"{uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def test_powercap_sums_packages_and_unwraps(tmp_path: Path) -> None:
    p0 = _zone(tmp_path, "intel-rapl:0", 900_000, 1_000_000)
    p1 = _zone(tmp_path, "intel-rapl:1", 10_000, 1_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 0, 1_000_000)  # a sub-zone (core): inside package 0, not added
    counter = energy.PowercapCounter(tmp_path)
    assert counter.joules() == 0.0
    (p0 / "energy_uj").write_text("100000\n")  # wrapped: 900000 -> 1000000 -> 100000 is 200000 uJ
    (p1 / "energy_uj").write_text("60000\n")
    assert counter.joules() == pytest.approx(0.25)
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("999999\n")
    assert counter.joules() == pytest.approx(0.25)


def test_powercap_reasons(tmp_path: Path) -> None:
    with pytest.raises(energy.EnergyUnavailable, match="does not exist"):
        energy.PowercapCounter(tmp_path / "absent")
    with pytest.raises(energy.EnergyUnavailable, match="no RAPL package zone"):
        energy.PowercapCounter(tmp_path)
    counter, why = energy.counter_for("ipu")
    assert counter is None and "IPU" in why


@pytest.mark.skipif(energy.POWERCAP.is_dir(), reason="this machine exposes powercap")
def test_this_cpu_says_why_energy_is_not_measured() -> None:
    counter, why = energy.counter_for("cpu")
    assert counter is None and "no RAPL powercap interface" in why


def test_estimates() -> None:
    e = energy.estimate(400.0, 2.0, 100, "test")
    assert (e.kind, e.joules_per_sample, e.samples_per_joule) == ("estimate", 8.0, 0.125)
    assert energy.board_power("a100-80gb") == (400.0, "NVIDIA A100 datasheet, SXM4 max TDP")
    assert energy.board_power("bow", {"bow": 250.0})[0] == 250.0
    assert energy.board_power("bow")[0] == 1250.0 / 4  # a quarter of a Bow-2000's published 1.25 kW
    with pytest.raises(ConfigError, match="--watts tpu-v4=W"):
        energy.board_power("tpu-v4")
    watts, why = energy.cpu_power("AMD EPYC 7B13", cores=2)
    assert watts == pytest.approx(2 * 280 / 64) and "2 core(s)" in why
    with pytest.raises(ConfigError):
        energy.estimate(0.0, 1.0, 1, "x")


class _FakeCounter:
    """A counter that grows 3 J per read: each timed call reads twice, so 3 J per call."""

    source = "fake counter"

    def __init__(self) -> None:
        self.total = 0.0

    def joules(self) -> float:
        self.total += 3.0
        return self.total


def test_bench_energy_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get("small_cnn")
    monkeypatch.setattr(energy, "counter_for", lambda device: (_FakeCounter(), "fake counter"))
    report = run_bench(spec, ["numpy"], batch=4, repeats=2, warmup=0, modes=["inference"], native=False,
                       isolate=False)
    m = report.rows[0].hal
    assert m.joules == [3.0, 3.0] and m.joules_per_sample == pytest.approx(0.75)
    assert report.to_dict()["rows"][0]["hal"]["joules_per_sample"] == pytest.approx(0.75)
    monkeypatch.setattr(energy, "counter_for", lambda device: (None, "no counter here"))
    report = run_bench(spec, ["numpy"], batch=4, repeats=1, warmup=0, modes=["inference"], native=False,
                       isolate=False)
    assert report.rows[0].hal.joules_per_sample is None
    table = report.table()
    assert "n/a" in table and "energy n/a: no counter here" in table
    assert np.isfinite(report.rows[0].hal.samples_per_s)
