"""Energy: joules per sample, measured where the hardware exposes a counter, else estimated.

Two counters are read, both cumulative energy since some origin, so a call's
energy is the difference of two reads around it (no sampling thread):

* **NVIDIA GPUs** through NVML (``nvidia-ml-py``, imported as ``pynvml``):
  ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver loaded;
  Volta and newer). The whole board, whatever else runs on it.
* **Linux CPUs** through powercap (``/sys/class/powercap/intel-rapl:N/energy_uj``,
  the RAPL driver, which also serves AMD Zen since Linux 5.8): the package
  zones summed, each unwrapped at its ``max_energy_range_uj``. Whole packages:
  other processes' work is counted too. Since Linux 5.10 (CVE-2020-8694) the
  files are readable by root only.

IPUs: Graphcore's monitoring (``gc-monitor``, ``gcipuinfo``) ships with the Poplar
SDK; hal does not read it yet, so IPU energy is an estimate.

Where nothing can be read, :func:`counter_for` says why, and
:func:`estimate` turns a board power (:data:`BOARD_POWER_W`, :func:`cpu_power`)
and a time into joules, labelled ``kind="estimate"``: it assumes the chip draws
its rated power the whole time, an upper bound for a busy chip.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hal.errors import ConfigError, HalError

POWERCAP = Path("/sys/class/powercap")
_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")  # packages; intel-rapl:N:M are their sub-zones (core, dram)

# Rated power per chip, watts, with the public source. Only figures with a source
# are here; any other device needs ``watts`` from the caller.
BOARD_POWER_W: dict[str, tuple[float, str]] = {
    # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): "Max TDP Power 400W" (SXM4).
    "a100-40gb": (400.0, "NVIDIA A100 datasheet, SXM4 max TDP"),
    "a100-80gb": (400.0, "NVIDIA A100 datasheet, SXM4 max TDP"),
    # NVIDIA H100 datasheet, SXM5 column: "Max thermal design power (TDP) up to 700W".
    "h100-sxm": (700.0, "NVIDIA H100 datasheet, SXM5 max TDP"),
    # Graphcore C2 PCIe card: two GC2 IPUs, 300 W per card (Graphcore C2 product brief).
    "gc2": (150.0, "Graphcore C2 card, 300 W for two GC2 IPUs"),
    # eeNews Europe, "Graphcore details power for Bow AI unit" (2022): a Bow-2000 (four Bow IPUs) averages
    # 1.25 kW, an IPU-M2000 (four GC200) 1.5 kW. Per IPU a quarter of the 1U machine (gateway and fans included).
    "bow": (1250.0 / 4, "Bow-2000 machine, 1.25 kW average for four IPUs (eeNews Europe, 2022)"),
    "gc200": (1500.0 / 4, "IPU-M2000 machine, 1.5 kW for four GC200 IPUs (eeNews Europe, 2022)"),
}
# A CPU's model name rarely says which part it is (a VM reports "AMD EPYC"): per core,
# a reference server part of the vendor, spelled out in the estimate's note.
CPU_REFERENCE_W_PER_CORE: dict[str, tuple[float, str]] = {
    "amd": (280.0 / 64, "AMD EPYC 7763 (280 W TDP, 64 cores, AMD product page)"),
    "intel": (270.0 / 40, "Intel Xeon Platinum 8380 (270 W TDP, 40 cores, Intel ARK)"),
}


class Counter(Protocol):
    """A cumulative energy counter: :meth:`joules` grows with the energy used."""

    source: str

    def joules(self) -> float: ...


class NvmlCounter:
    """The energy counter of one NVIDIA GPU through NVML (``nvidia-ml-py``)."""

    def __init__(self, index: int, nvml: Any | None = None) -> None:
        """``index`` is the CUDA device index (mapped through ``CUDA_VISIBLE_DEVICES``);
        ``nvml`` defaults to the ``pynvml`` module. Raises :class:`EnergyUnavailable`."""
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                raise EnergyUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
        self._nvml = nvml
        physical = _physical_gpu(index)
        try:
            nvml.nvmlInit()
            self._handle = nvml.nvmlDeviceGetHandleByIndex(physical)
            name = nvml.nvmlDeviceGetName(self._handle)
            self.joules()
        except nvml.NVMLError as exc:
            raise EnergyUnavailable(f"NVML cannot read GPU {physical}'s energy counter: {exc}") from None
        name = name.decode() if isinstance(name, bytes) else str(name)
        self.source = f"NVML total energy counter of GPU {physical} ({name}), whole board"

    def joules(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3


class PowercapCounter:
    """The RAPL package counters under Linux powercap, summed and unwrapped."""

    def __init__(self, root: Path = POWERCAP) -> None:
        """Raises :class:`EnergyUnavailable` saying why when no package zone can be read."""
        if not root.is_dir():
            raise EnergyUnavailable(f"no RAPL powercap interface on this machine ({root} does not exist: "
                                    "no intel-rapl driver, or a VM that does not expose it)")
        zones = sorted(p for p in root.iterdir() if _PACKAGE_ZONE.match(p.name))
        if not zones:
            raise EnergyUnavailable(f"{root} has no RAPL package zone (intel-rapl:N)")
        try:
            self._range = [int((z / "max_energy_range_uj").read_text()) for z in zones]
            self._last = [int((z / "energy_uj").read_text()) for z in zones]
        except PermissionError:
            raise EnergyUnavailable(f"{zones[0] / 'energy_uj'} is readable by root only (Linux >= 5.10, "
                                    "CVE-2020-8694): run as root or grant read access") from None
        except (OSError, ValueError) as exc:
            raise EnergyUnavailable(f"cannot read the RAPL counters under {root}: {exc}") from None
        self._zones, self._total_uj = zones, 0
        self.source = f"RAPL powercap, {len(zones)} CPU package(s), whole packages (other processes included)"

    def joules(self) -> float:
        for i, zone in enumerate(self._zones):
            now = int((zone / "energy_uj").read_text())
            self._total_uj += now - self._last[i] if now >= self._last[i] else now + self._range[i] - self._last[i]
            self._last[i] = now
        return self._total_uj / 1e6


class EnergyUnavailable(HalError):
    """No energy counter can be read for a device; the message says why."""


def _physical_gpu(index: int) -> int:
    """The NVML index of CUDA device ``index`` (``CUDA_VISIBLE_DEVICES`` renumbers CUDA's)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


def counter_for(device: str) -> tuple[Counter | None, str]:
    """The energy counter of a target's device (``cpu``, ``cuda:0``, ``gpu:1``, ``ipu``...)
    and where it reads, or None and why none can be read here."""
    kind, _, index = device.partition(":")
    try:
        if kind in ("cuda", "gpu"):
            counter: Counter = NvmlCounter(int(index or 0))
        elif kind == "cpu":
            counter = PowercapCounter()
        elif kind.startswith("ipu"):
            return None, "IPU power (Graphcore gc-monitor / gcipuinfo, Poplar SDK) is not read by hal"
        else:
            return None, f"no energy counter known for device {device!r}"
    except EnergyUnavailable as exc:
        return None, str(exc)
    return counter, counter.source


@dataclass(frozen=True)
class Energy:
    """Joules over ``samples`` samples; ``kind`` is ``measured`` or ``estimate``, ``source`` says how."""

    joules: float
    samples: int
    kind: str
    source: str

    @property
    def joules_per_sample(self) -> float:
        return self.joules / self.samples

    @property
    def samples_per_joule(self) -> float:
        return self.samples / self.joules if self.joules > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "joules_per_sample": self.joules_per_sample,
                "samples_per_joule": self.samples_per_joule, "source": self.source}


def board_power(device_key: str, watts: dict[str, float] | None = None) -> tuple[float, str]:
    """Rated watts of a catalog chip (``bow``, ``a100-80gb``...) and the source; ``watts``
    overrides or adds figures. Raises :class:`~hal.errors.ConfigError` when none is known."""
    if watts and device_key in watts:
        return float(watts[device_key]), "power given by the user"
    if device_key not in BOARD_POWER_W:
        raise ConfigError(f"no public rated-power figure for {device_key!r} in hal.energy.BOARD_POWER_W "
                          f"(known: {sorted(BOARD_POWER_W)}); give one, e.g. --watts {device_key}=W")
    return BOARD_POWER_W[device_key]


def cpu_power(cpu_name: str, cores: int | None = None) -> tuple[float, str]:
    """Estimated watts of ``cores`` cores (default: the cores this process may use) of a CPU
    named ``cpu_name``, from its vendor's reference part's TDP per core."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    vendor = next((v for v in CPU_REFERENCE_W_PER_CORE if v in cpu_name.lower()), None)
    per_core, ref = CPU_REFERENCE_W_PER_CORE[vendor or "amd"]
    guess = "" if vendor else f" (no reference part for {cpu_name!r}: the AMD one stands in)"
    return per_core * cores, f"{cores} core(s) x {per_core:.2f} W, the TDP per core of {ref}{guess}"


def estimate(watts: float, seconds: float, samples: int, source: str) -> Energy:
    """``watts x seconds`` over ``samples`` samples, labelled an estimate."""
    if not (watts > 0 and seconds >= 0 and samples > 0):
        raise ConfigError(f"an energy estimate needs watts > 0, seconds >= 0 and samples > 0, got "
                          f"{watts}, {seconds}, {samples}")
    return Energy(watts * seconds, samples, "estimate", f"estimate: {watts:.0f} W rated power x time ({source})")
