"""hal ``jax`` backend vs a hand-written Flax ResNet, side by side in one process.

    python bench/jax_vs_native.py [--model resnet50] [--batch 16] [--image 224] [--repeats 5] [--json out.json]

Times, for each of hal (``hal.compile(spec, "jax:cpu")``) and native Flax
(``bench/native_flax.py``): the first call (trace + XLA compile + one run) and
the steady state (median of ``--repeats`` calls after ``--warmup`` calls) of fp32
inference and of one SGD-momentum training step, as samples/s, plus the ratio
hal/native (>= 1.0: no abstraction tax). Repeats alternate hal and native so that
a noisy, shared machine penalises both alike. The matmul precision of each side,
the jax/flax/optax versions, the CPU count, XLA_FLAGS and the load average are
recorded: timings from different machines or loads are not comparable. On a
shared machine wall time swings with other jobs' load, so each call's process
CPU time (all threads) is recorded too, and a CPU-time ratio printed beside the
wall-time one: it measures the work each side does, whatever the load.

Measured 2026-11-26, ResNet-50, batch 16, 224x224, fp32, 2-core AMD EPYC VM shared
with other jobs, jax 0.10.2 / flax 0.12.8 / optax 0.2.8, hal at matmul precision
"highest", native at "default" (identical on CPU), 5 repeats; three runs:

    run (load avg)   inference hal/native      training hal/native
                     wall   CPU-time           wall   CPU-time
    1 (4.3)          1.084  1.038              0.883  1.002
    2 (3.8-6.3)      1.121  1.045              1.095  1.046
    3 (1.5-1.8)      0.999  1.011              0.983  1.024

Quietest run: inference 13.0 vs 13.0 samples/s, training 2.59 vs 2.64 samples/s;
first call (trace + compile + run) 2.4 vs 2.1 s inference, 11.9 vs 12.2 s training.
hal does slightly less work (BatchNorm folded in inference); the wall-time
ratios move by +-10% with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed2(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import flax
    import jax
    import optax

    import hal
    import hal.models
    import native_flax
    from hal.backends.jax import matmul_precision

    depth = int(args.model.removeprefix("resnet"))
    spec = hal.models.get(args.model, num_classes=args.classes, input_size=args.image)
    cfg = hal.TrainConfig(optimizer=hal.SGD(lr=0.01, momentum=0.9))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.image, args.image)).astype(np.float32)
    y = rng.integers(0, args.classes, size=args.batch).astype(np.int64)

    t0 = time.perf_counter()
    exe = hal.compile(spec, f"jax:{args.device}", config=cfg)
    hal_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    native = native_flax.Native(depth, args.classes, args.device)
    native_build = time.perf_counter() - t0

    sides: dict[str, dict[str, Callable[[], Any]]] = {
        "hal": {"infer": lambda: exe.predict(x), "train": lambda: exe.train_step(x, y)},
        "native": {"infer": lambda: native.predict(x), "train": lambda: native.train_step(x, y)},
    }
    modes = ["infer"] + ([] if args.skip_train else ["train"])
    result: dict[str, Any] = {
        "model": args.model, "batch": args.batch, "image": args.image, "precision": "fp32",
        "device": str(jax.devices(args.device)[0]), "cpu_count": os.cpu_count(),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "python": platform.python_version()},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_precision": {"hal": exe.matmul_precision, "native": "default"},
        "loadavg_start": os.getloadavg(), "build_s": {"hal": hal_build, "native": native_build},
        "first_call_s": {}, "median_s": {}, "samples_per_s": {}, "ratio_hal_over_native": {}, "runs_s": {},
        "cpu_runs_s": {}, "cpu_median_s": {}, "cpu_ratio_hal_over_native": {},
    }
    for mode in modes:
        for side in sides:  # first call: trace + compile + run
            result["first_call_s"][f"{side}.{mode}"] = _timed(sides[side][mode])
        for _ in range(args.warmup):
            for side in sides:
                sides[side][mode]()
        runs: dict[str, list[float]] = {side: [] for side in sides}
        cpu: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side in sides:
                wall, cpu_s = _timed2(sides[side][mode])
                runs[side].append(wall)
                cpu[side].append(cpu_s)
        for side in sides:
            med = statistics.median(runs[side])
            result["runs_s"][f"{side}.{mode}"] = runs[side]
            result["cpu_runs_s"][f"{side}.{mode}"] = cpu[side]
            result["cpu_median_s"][f"{side}.{mode}"] = statistics.median(cpu[side])
            result["median_s"][f"{side}.{mode}"] = med
            result["samples_per_s"][f"{side}.{mode}"] = args.batch / med
        result["ratio_hal_over_native"][mode] = (
            result["samples_per_s"][f"hal.{mode}"] / result["samples_per_s"][f"native.{mode}"]
        )
        result["cpu_ratio_hal_over_native"][mode] = (
            result["cpu_median_s"][f"native.{mode}"] / result["cpu_median_s"][f"hal.{mode}"]
        )
        print(
            f"{mode:5s}  hal {result['samples_per_s'][f'hal.{mode}']:7.2f} samples/s "
            f"(first call {result['first_call_s'][f'hal.{mode}']:.1f} s)   "
            f"native {result['samples_per_s'][f'native.{mode}']:7.2f} samples/s "
            f"(first call {result['first_call_s'][f'native.{mode}']:.1f} s)   "
            f"ratio hal/native {result['ratio_hal_over_native'][mode]:.3f} "
            f"(CPU seconds per call hal {result['cpu_median_s'][f'hal.{mode}']:.2f}, "
            f"native {result['cpu_median_s'][f'native.{mode}']:.2f}: ratio {result['cpu_ratio_hal_over_native'][mode]:.3f})",
            flush=True,
        )
    result["loadavg_end"] = os.getloadavg()
    print(
        f"{args.model} batch {args.batch} fp32 on {result['device']} ({result['cpu_count']} CPUs), "
        f"jax {jax.__version__}, matmul precision hal={exe.matmul_precision} native=default, "
        f"load average {result['loadavg_start'][0]:.2f} -> {result['loadavg_end'][0]:.2f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
