"""hal's ``jax:cpu`` ResNet-50 against Keras 3's ``keras.applications.ResNet50`` on the
JAX backend, in one process, interleaved.

``KERAS_BACKEND=jax python bench/jax_speed_resnet50.py --batch 16 --repeats 3``
times inference (hal ``predict``, Keras ``predict_on_batch``) and, with ``--train``,
one training step each (hal ``train_step`` SGD-momentum; Keras ``train_on_batch``,
SGD-momentum, sparse cross-entropy on logits), round-robin over the variants for
``--repeats`` rounds after a warm-up call, so load on a shared machine falls on all
alike. ``--variants`` adds hal executables with other options (``default`` =
``matmul_precision='default'``; ``individual`` = XLA compiler option
``xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_CONVOLUTION,INDIVIDUAL_DOT``: YNNPACK
runs each convolution and dot alone, XLA fuses the rest). Reports medians, ratios to Keras, the load
average, versions and ``XLA_FLAGS`` as JSON (``--out``) and markdown on stdout.
``--dump DIR`` writes the optimised HLO of both inference programs there
(``XLA_FLAGS=--xla_dump_to``) for side-by-side reading.

Keras's model is a speed reference with torchvision's parameter count, not
numerically hal's (Keras puts the stride on the first 1x1 convolution of a
bottleneck, v1; hal and torchvision on the 3x3, v1.5). Inputs: hal gets the
channels-first batch and transposes it in its program; Keras gets NHWC.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _speed import report


def individual_ynn(programs: object, kinds: str) -> object:
    """``programs`` with the train and inference programs recompiled with ``xla_cpu_experimental_ynn_fusion_type``."""
    import types

    import jax

    options = {"xla_cpu_experimental_ynn_fusion_type": kinds}
    return types.SimpleNamespace(**{
        **vars(programs), "infer": jax.jit(programs.infer.__wrapped__, compiler_options=options),
        "train": jax.jit(programs.train.__wrapped__, donate_argnums=(0, 1, 2), compiler_options=options)})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train", action="store_true", help="also time one training step of each")
    p.add_argument("--variants", default="",
                   help="comma-separated extra hal variants: default (matmul precision), individual (YNN fusions)")
    p.add_argument("--dump", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if os.environ.get("KERAS_BACKEND") != "jax":
        raise SystemExit("set KERAS_BACKEND=jax (Keras reads it when it is first imported)")
    if args.dump:
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={args.dump} "
                                   "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*(infer|predict|one_step).*")
    import jax
    import keras

    import hal
    from hal.models import get
    from hal.training import SGD, TrainConfig

    load_start = os.getloadavg()
    n, s = args.batch, args.size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, s, s)).astype(np.float32)
    x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y = rng.integers(0, 1000, n).astype(np.int64)
    config = TrainConfig(loss="cross_entropy", optimizer=SGD(lr=0.01, momentum=0.9))
    spec = get("resnet50", input_size=s)
    hal_exes = {"hal": hal.compile(spec, "jax:cpu", config=config)}
    for v in filter(None, args.variants.split(",")):
        if v == "individual":
            hal_exes[f"hal[{v}]"] = e = hal.compile(spec, "jax:cpu", config=config)
            kinds = "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
            e.programs = individual_ynn(e.programs, kinds)
        else:
            hal_exes[f"hal[{v}]"] = hal.compile(spec, "jax:cpu", config=config, options={"matmul_precision": v})
    model = keras.applications.ResNet50(weights=None, input_shape=(s, s, 3), classes=1000, classifier_activation=None)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    calls = {name: (lambda e=e: e.predict(x)) for name, e in hal_exes.items()}
    calls["keras"] = lambda: model.predict_on_batch(x_nhwc)
    if args.train:
        calls.update({f"{name} train": (lambda e=e: e.train_step(x, y)) for name, e in hal_exes.items()})
        calls["keras train"] = lambda: model.train_on_batch(x_nhwc, y)
    first = {}
    for name, fn in calls.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = {k: med["keras train" if k.endswith("train") else "keras"] for k in med}
    result = {
        "what": f"resnet50 {s}x{s}, batch {n}, jax:cpu, hal vs keras.applications.ResNet50 (KERAS_BACKEND=jax)",
        "args": {k: str(v) for k, v in vars(args).items()},
        "img_per_s_median": {k: round(n / v, 2) for k, v in med.items()},
        "ratio_to_keras": {k: round(ref[k] / v, 3) for k, v in med.items()},  # > 1: faster than Keras
        "seconds_all": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "first_call_s": {k: round(v, 2) for k, v in first.items()},
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "versions": {m: sys.modules[m].__version__ for m in ("jax", "jaxlib", "keras", "flax") if m in sys.modules},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
    }
    rows = [(k, f"{n / med[k]:.2f}", f"{ref[k] / med[k]:.3f}", f"{first[k]:.1f}") for k in calls]
    return report(result, ("program", f"img/s (median of {args.repeats})", "x Keras", "first call (s)"), rows,
                  load_start, args.out)


if __name__ == "__main__":
    main()
