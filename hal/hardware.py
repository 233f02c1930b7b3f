"""A catalog of accelerators: Graphcore IPUs, NVIDIA GPUs and this CPU, in one shape.

Every published figure carries its public source in a comment next to it. The
figures are *per chip* (per IPU, per GPU), never per machine: Graphcore often
quotes an IPU-Machine (four IPUs), so those numbers are divided by four here and
the division is written out. "This CPU" is measured, not looked up: a timed
float32 GEMM gives its peak FLOP/s and a timed array copy its memory bandwidth,
once per process (:func:`this_cpu`).

Units: bytes, bytes/s, FLOP/s, Hz. Peak FLOP/s are dense (no structured sparsity).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from hal.errors import ConfigError

KiB = 2**10
MiB = 2**20
GB = 10**9
TERA = 10**12


@dataclass(frozen=True)
class Device:
    """One chip: its memory, peak arithmetic per precision and bandwidths.

    ``memory_bytes`` is the memory the chip computes from: In-Processor-Memory
    (on-chip SRAM) for an IPU, HBM for a GPU, RAM for the CPU.
    ``peak_flops`` maps a hal precision (``"fp32"``, ``"fp16"``) to FLOP/s.
    ``link_bandwidth`` is chip-to-chip (IPU-Links, NVLink), ``None`` where no
    public figure was found.
    """

    key: str
    name: str
    kind: str  # "ipu" | "gpu" | "cpu"
    memory_bytes: int
    memory_bandwidth: float
    peak_flops: Mapping[str, float]
    link_bandwidth: float | None = None
    tiles: int | None = None
    clock_hz: float | None = None
    measured: bool = False
    notes: tuple[str, ...] = field(default=())

    def peak(self, precision: str) -> float:
        """Peak FLOP/s in ``precision``; raises naming the precisions known for this device."""
        if precision not in self.peak_flops:
            raise ConfigError(
                f"{self.name} has no peak figure for precision {precision!r}; known: {sorted(self.peak_flops)}"
            )
        return self.peak_flops[precision]

    def to_dict(self) -> dict[str, object]:
        return {
            "key": self.key, "name": self.name, "kind": self.kind, "memory_bytes": self.memory_bytes,
            "memory_bandwidth": self.memory_bandwidth, "peak_flops": dict(self.peak_flops),
            "link_bandwidth": self.link_bandwidth, "tiles": self.tiles, "clock_hz": self.clock_hz,
            "measured": self.measured, "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------
# Graphcore IPUs
# ---------------------------------------------------------------------------

GC2 = Device(
    key="gc2",
    name="Graphcore Colossus Mk1 GC2 IPU",
    kind="ipu",
    # 1216 tiles x 256 KiB = 304 MiB ("300 MB"): Jia, Tillman, Maggioni, Scarpazza,
    # "Dissecting the Graphcore IPU Architecture via Microbenchmarking", Citadel, 2019
    # (arXiv:1912.03413), sections on tile memory ("304 MiB per IPU, 608 MiB per C2 board").
    tiles=1216,
    memory_bytes=304 * MiB,
    # 1.6 GHz, 31.1 TFLOP/s fp32 and 124.5 TFLOP/s mixed precision (fp16 products,
    # fp32 accumulation), per IPU: same report, "arithmetic throughput".
    clock_hz=1.6e9,
    peak_flops={"fp32": 31.1 * TERA, "fp16": 124.5 * TERA},
    # Aggregate In-Processor-Memory bandwidth ~45 TB/s per IPU: same report.
    memory_bandwidth=45e12,
    link_bandwidth=None,  # no per-IPU IPU-Link figure in the public sources we checked
)

GC200 = Device(
    key="gc200",
    name="Graphcore Colossus Mk2 GC200 IPU",
    kind="ipu",
    # 1472 tiles and "900 MiBytes of on-die memory": Graphcore, "Designing the Colossus
    # Mk2 IPU", Simon Knowles at Hot Chips 33 (2021), graphcore.ai/posts/designing-the-
    # colossus-mk2-ipu-simon-knowles-at-hot-chips-2021. 3.6 GB per 4-IPU M2000 = 900 MB/IPU.
    # Usable In-Processor-Memory: 1472 tiles x 624 KiB = 897 MiB, the figure Poplar's target
    # summary reports for a Mk2/Bow IPU (the "900 MB" above is rounded); 624 KiB per tile is
    # Graphcore's per-tile figure for the Mk2 tile.
    tiles=1472,
    memory_bytes=1472 * 624 * KiB,
    # 250 TFLOP/s FP16.16 per IPU = "1 petaFLOPS FP16.16 AI compute" per IPU-M2000 / 4 IPUs
    # (IPU-M2000 datasheet, docs.graphcore.ai/projects/graphcore-ipu-m2000-datasheet);
    # 62.5 TFLOP/s FP32 per GC200 (Graphcore launch figures, July 2020, as reported by
    # Cambrian-AI "Could Graphcore's second chip challenge NVIDIA?").
    peak_flops={"fp32": 62.5 * TERA, "fp16": 250.0 * TERA},
    # 1.33 GHz = 250e12 / (1472 tiles x 128 fp16 FLOP/tile/cycle); the Bow launch
    # coverage quotes ~1.35 GHz for this generation against Bow's 1.85 GHz.
    clock_hz=1.33e9,
    # 47.5 TB/s In-Processor-Memory bandwidth, 10 IPU-Links totalling 320 GB/s: Graphcore
    # GC200 product page (graphcore.ai/products/ipu), as summarised at thecharlieblake.co.uk/ipus.
    memory_bandwidth=47.5e12,
    link_bandwidth=320 * GB,
)

BOW = Device(
    key="bow",
    name="Graphcore Bow IPU",
    kind="ipu",
    # Bow-2000 datasheet (docs.graphcore.ai/projects/bow-2000-datasheet, "Overview"):
    # 4x Bow IPUs, 5,888 cores (= 4 x 1472 tiles), 3.6 GB In-Processor-Memory (= 4 x 900 MB),
    # 1.4 petaFLOPS FP16.16 (= 4 x 350 TFLOP/s). The processor wafer is "architecturally
    # compatible with the GC200" (Graphcore Bow launch, March 2022), at 1.85 GHz.
    tiles=1472,
    memory_bytes=1472 * 624 * KiB,  # 897 MiB, as the GC200 (same tile, Poplar's target summary)
    clock_hz=1.85e9,
    # FP32: Bow Pod256 datasheet, "89.23 petaFLOPS (FP16.16) ..., 22.31 petaFLOPS @ FP32"
    # over 256 IPUs = 348.6 / 87.1 TFLOP/s per IPU; the Bow-2000 figure gives 350 for FP16.
    peak_flops={"fp32": 87.1 * TERA, "fp16": 350.0 * TERA},
    # Not published per Bow IPU: the GC200's 47.5 TB/s scaled by the clock (1.85/1.33);
    # IPU-Links are the GC200's (the Bow-2000 is backwards compatible with the M2000).
    memory_bandwidth=47.5e12 * 1.85 / 1.33,
    link_bandwidth=320 * GB,
    notes=("memory bandwidth derived from the GC200 figure scaled by clock",),
)

# ---------------------------------------------------------------------------
# NVIDIA GPUs (SXM parts; dense tensor-core figures, without 2:4 sparsity)
# ---------------------------------------------------------------------------

_TF32_NOTE = (
    "fp32 is the IEEE FP32 (CUDA-core) peak; cuDNN convolutions default to TF32 tensor cores, "
    "whose peak is listed as tf32"
)

A100_40GB = Device(
    key="a100-40gb",
    name="NVIDIA A100 40GB SXM4",
    kind="gpu",
    # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): FP32 19.5,
    # TF32 156, FP16 tensor 312 TFLOP/s (dense); 40 GB HBM2 at 1,555 GB/s; NVLink 600 GB/s.
    memory_bytes=40 * GB,
    memory_bandwidth=1555 * GB,
    peak_flops={"fp32": 19.5 * TERA, "tf32": 156 * TERA, "fp16": 312 * TERA},
    link_bandwidth=600 * GB,
    clock_hz=1.41e9,
    notes=(_TF32_NOTE,),
)

A100_80GB = Device(
    key="a100-80gb",
    name="NVIDIA A100 80GB SXM4",
    kind="gpu",
    # Same datasheet: same compute as the 40 GB part; 80 GB HBM2e at 2,039 GB/s.
    memory_bytes=80 * GB,
    memory_bandwidth=2039 * GB,
    peak_flops={"fp32": 19.5 * TERA, "tf32": 156 * TERA, "fp16": 312 * TERA},
    link_bandwidth=600 * GB,
    clock_hz=1.41e9,
    notes=(_TF32_NOTE,),
)

H100_SXM = Device(
    key="h100-sxm",
    name="NVIDIA H100 SXM5 80GB",
    kind="gpu",
    # NVIDIA H100 datasheet (SXM column): FP32 67, TF32 989 (sparse) / 494.7 dense,
    # FP16 tensor 1,979 (sparse) / 989.4 dense TFLOP/s; 80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s.
    memory_bytes=80 * GB,
    memory_bandwidth=3350 * GB,
    peak_flops={"fp32": 66.9 * TERA, "tf32": 494.7 * TERA, "fp16": 989.4 * TERA},
    link_bandwidth=900 * GB,
    clock_hz=1.98e9,
    notes=(_TF32_NOTE,),
)

CATALOG: dict[str, Device] = {d.key: d for d in (GC2, GC200, BOW, A100_40GB, A100_80GB, H100_SXM)}
ALIASES = {
    "mk1": "gc2", "colossus-mk1": "gc2", "mk2": "gc200", "colossus-mk2": "gc200", "m2000": "gc200",
    "bow-ipu": "bow", "a100": "a100-80gb", "h100": "h100-sxm",
}
IPUS = ("gc2", "gc200", "bow")


# ---------------------------------------------------------------------------
# this CPU, measured
# ---------------------------------------------------------------------------


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=1)
def this_cpu() -> Device:
    """This machine's CPU, measured once per process.

    Peak: the best of 5 timed ``float32`` 1024x1024 GEMMs through numpy's BLAS
    (``2 n^3`` FLOP each), i.e. what numpy reaches on all cores, not a datasheet
    peak. Bandwidth: the best of 5 copies of a 64 MiB array (read + write).
    fp16 uses the fp32 figure: numpy and CPU frameworks compute fp16 in fp32.
    """
    n = 1024
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)  # warm up the BLAS threads
    flops = 2 * n**3 / _best_time(lambda: np.matmul(a, b, out=out), 5)
    src = np.ones(16 * MiB, dtype=np.float32)
    dst = np.empty_like(src)
    bandwidth = 2 * src.nbytes / _best_time(lambda: np.copyto(dst, src), 5)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 0
    return Device(
        key="cpu",
        name=f"this CPU ({os.cpu_count()} logical cores, measured)",
        kind="cpu",
        memory_bytes=int(ram),
        memory_bandwidth=float(bandwidth),
        peak_flops={"fp32": float(flops), "fp16": float(flops)},
        measured=True,
        notes=("peak = best numpy float32 1024^3 GEMM; bandwidth = best 64 MiB copy",),
    )


def get_device(name: str) -> Device:
    """A catalog device by key or alias (``bow``, ``gc200``, ``mk1``, ``a100``, ``h100``, ``cpu``)."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key == "cpu":
        return this_cpu()
    if key not in CATALOG:
        raise ConfigError(f"unknown device {name!r}; the catalog has {sorted(CATALOG) + ['cpu']}")
    return CATALOG[key]


def get_ipu(name: str) -> Device:
    """An IPU of the catalog; raises naming the IPU types for anything else."""
    dev = get_device(name)
    if dev.kind != "ipu":
        raise ConfigError(f"{name!r} is not an IPU; IPU types: {list(IPUS)} (aliases mk1, mk2)")
    return dev


def all_devices(include_cpu: bool = True) -> list[Device]:
    """Every catalog device, IPUs first, then GPUs, then (measured) this CPU."""
    return list(CATALOG.values()) + ([this_cpu()] if include_cpu else [])
