"""hal ``tensorflow:cpu`` vs a hand-written native Keras ResNet, side by side in one process.

    python bench/tf_vs_native.py                 # ResNet50, batch 16, fp32, 224x224
    python bench/tf_vs_native.py --xla-sweep     # also time hal with XLA forced on and off
    python bench/tf_vs_native.py --json out.json

Per mode (inference = ``predict``, training = one SGD-momentum step): first call
(trace + compile + run), then ``--warmup`` untimed calls, then ``--repeats`` timed
calls with hal and native *interleaved* (hal, native, hal, native, ...) so that
load drift on a shared machine hits both alike. Reported: median seconds per call,
samples/s and the ratio native time / hal time (>= 1.0: hal at least as fast).
Both take the same channels-first float32 batch (see ``bench/native_keras.py``).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def environment() -> dict[str, Any]:
    import tensorflow as tf

    from hal.backends.tensorflow import XLA

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "tensorflow": tf.__version__,
        "keras": tf.keras.__version__ if hasattr(tf.keras, "__version__") else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "auto",
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "auto",
        "load_average_at_start": load,
        "hal_xla": {f"{k[0]}/{k[1]}": v for k, v in XLA.items()},
        "HAL_TF_XLA": os.environ.get("HAL_TF_XLA"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="inference,training")
    ap.add_argument("--xla-sweep", action="store_true", help="also time hal with XLA forced on and off per mode")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import hal
    from hal.models import get
    from native_keras import Native

    depth = int(args.model.removeprefix("resnet"))
    spec = get(args.model, num_classes=args.classes, input_size=args.image)
    config = hal.TrainConfig(optimizer=hal.SGD(lr=0.01, momentum=0.9))
    weights = hal.init_weights(spec)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, args.classes, args.batch)
    env = environment()
    print(json.dumps(env, indent=1))

    def hal_variant(xla: str | None) -> Any:
        if xla is None:
            os.environ.pop("HAL_TF_XLA", None)
        else:
            os.environ["HAL_TF_XLA"] = xla
        exe = hal.compile(spec, "tensorflow:cpu", weights, config)
        return exe

    results: dict[str, Any] = {"env": env, "model": args.model, "batch": args.batch, "image": args.image, "modes": {}}
    for mode in args.modes.split(","):
        impls: dict[str, Any] = {"hal": hal_variant(None)}
        if args.xla_sweep:
            impls["hal_xla_on"] = hal_variant("1")
            impls["hal_xla_off"] = hal_variant("0")
        os.environ.pop("HAL_TF_XLA", None)
        impls["native"] = Native(depth, args.classes, args.image)
        call = {
            k: (lambda o=o: o.predict(x)) if mode == "inference" else (lambda o=o: o.train_step(x, y))
            for k, o in impls.items()
        }
        first = {}
        for k, fn in call.items():
            if k.startswith("hal_xla"):  # HAL_TF_XLA is read when a mode's function is first traced
                os.environ["HAL_TF_XLA"] = "1" if k.endswith("on") else "0"
            first[k] = timed(fn)
            os.environ.pop("HAL_TF_XLA", None)
        for _ in range(args.warmup):
            for fn in call.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in call}
        for i in range(args.repeats):
            for k, fn in call.items():
                times[k].append(timed(fn))
            print(f"{mode} repeat {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
                  flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            k: {"first_call_s": first[k], "median_s": med[k], "samples_per_s": args.batch / med[k], "times_s": times[k],
                "ratio_native_over_this": med["native"] / med[k]}
            for k in call
        }
        results["modes"][mode] = row
        del impls, call
    results["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    print(f"\n{args.model}, batch {args.batch}, {args.image}x{args.image}, fp32, TF {env['tensorflow']}, "
          f"{env['cpus']} CPUs (load avg start {env['load_average_at_start']}, end {results['load_average_at_end']})")
    print(f"{'mode':10s} {'impl':12s} {'first call s':>12s} {'median s':>9s} {'samples/s':>10s} {'native/impl':>11s}")
    for mode, row in results["modes"].items():
        for k, r in row.items():
            print(f"{mode:10s} {k:12s} {r['first_call_s']:12.2f} {r['median_s']:9.3f} {r['samples_per_s']:10.2f} "
                  f"{r['ratio_native_over_this']:11.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
