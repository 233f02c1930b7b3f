"""One zoo model's training step and inference on several CPU targets, interleaved in one process.

``python bench/jax_speed_stacks.py --model resnet50 --size 112 --batch 16 --targets jax:cpu,tensorflow:cpu,torch:cpu``
compiles the model on every target (same spec, weights, batch, SGD-momentum with
cross-entropy, as ``hal bench``), then times ``train_step`` and ``predict`` round-robin
over the targets for ``--repeats`` rounds after a warm-up call, so that the load of a
shared machine falls on all alike. ``--jax-options`` adds jax:cpu variants compiled
with ``jax.jit`` ``compiler_options`` (``NAME=K:V;K:V``, XLA debug options such as
``xla_cpu_experimental_ynn_fusion_type``); ``--jax-module NAME=PATH`` adds jax:cpu built by
another version of the backend module (``git show HEAD~1:backends/jax.py > /tmp/old.py``,
then ``--jax-module old=/tmp/old.py``); ``--jax-conv1x1`` adds jax:cpu with 1x1
convolutions as ``nn.Conv`` instead of hal's CPU lowering (``PointwiseConv``). Reports
medians, ratios to the fastest, the load average, versions and thread settings as JSON
(``--out``) and markdown on stdout. ``--threads`` sets every framework's intra-op
threads before any loads (``hal train --threads``'s rule).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from _speed import jax_module_executable, report


def jax_variant(exe: object, options: dict[str, str]) -> None:
    """Recompile ``exe``'s jitted train and inference programs with XLA ``compiler_options``."""
    import types

    import jax

    progs = exe.programs
    train = jax.jit(progs.train.__wrapped__, donate_argnums=(0, 1, 2), compiler_options=options)
    infer = jax.jit(progs.infer.__wrapped__, compiler_options=options)
    exe.programs = types.SimpleNamespace(**{**vars(progs), "train": train, "infer": infer})


@contextlib.contextmanager
def conv1x1_as_conv() -> Iterator[None]:
    """hal's jax lowering with 1x1 convolutions left as convolutions (traced inside, so the
    first call must be made here too); a fresh set of programs."""
    import hal.backends.jax as hal_jax

    saved = hal_jax.pointwise
    hal_jax.pointwise = lambda op: False
    hal_jax._PROGRAMS.clear()
    try:
        yield
    finally:
        hal_jax.pointwise = saved
        hal_jax._PROGRAMS.clear()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--targets", default="jax:cpu,tensorflow:cpu,torch:cpu")
    p.add_argument("--jax-options", action="append", default=[], help="NAME=K:V;K:V (repeatable)")
    p.add_argument("--jax-module", action="append", default=[], metavar="NAME=PATH",
                   help="also time jax:cpu from the backend module file PATH, labelled 'jax:cpu[NAME]'")
    p.add_argument("--jax-conv1x1", action="store_true", help="add jax:cpu with 1x1 convolutions as convolutions")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-infer", action="store_true", help="time train_step only")
    p.add_argument("--no-train", action="store_true", help="time predict only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from hal.models.conductivity.train import _set_threads

    if args.threads:
        _set_threads(args.threads)
    import hal
    from hal.models import get
    from hal.training import SGD, TrainConfig

    load_start = os.getloadavg()
    spec = get(args.model, input_size=args.size)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.output_shape[0], args.batch)
    config = TrainConfig(loss="cross_entropy", optimizer=SGD(lr=0.01, momentum=0.9))
    weights = hal.init_weights(spec, seed=0)
    exes = {t: hal.compile(spec, t, weights, config) for t in args.targets.split(",")}
    for v in args.jax_options:
        name, _, opts = v.partition("=")
        exes[f"jax:cpu[{name}]"] = e = hal.compile(spec, "jax:cpu", weights, config)
        jax_variant(e, dict(kv.split(":", 1) for kv in opts.split(";") if kv))
    for name, path in (m.split("=", 1) for m in args.jax_module):
        exes[f"jax:cpu[{name}]"] = jax_module_executable(name, path, spec, weights, config)
    calls = {} if args.no_train else {f"{t} train": (lambda e=e: e.train_step(x, y)) for t, e in exes.items()}
    if not args.no_infer:
        calls |= {f"{t} infer": (lambda e=e: e.predict(x)) for t, e in exes.items()}
    first = {}
    if args.jax_conv1x1:
        with conv1x1_as_conv():
            e = hal.compile(spec, "jax:cpu", weights, config)
            for kind, fn in (("train", lambda e=e: e.train_step(x, y)), ("infer", lambda e=e: e.predict(x))):
                if not (args.no_train if kind == "train" else args.no_infer):
                    calls[f"jax:cpu[conv1x1] {kind}"] = fn
                    start = time.perf_counter()
                    fn()
                    first[f"jax:cpu[conv1x1] {kind}"] = time.perf_counter() - start
    for name, fn in calls.items():
        if name not in first:
            start = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - start
        print(f"{name}: first call {first[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {kind: min(v for k, v in med.items() if k.endswith(kind)) for kind in ("train", "infer") if
            any(k.endswith(kind) for k in med)}
    result = {
        "what": f"{args.model} {args.size}x{args.size}, batch {args.batch}, train_step (SGD-momentum) and predict",
        "args": {k: str(v) for k, v in vars(args).items()},
        "img_per_s_median": {k: round(args.batch / v, 3) for k, v in med.items()},
        "x_fastest": {k: round(v / best[k.rsplit(' ', 1)[1]], 3) for k, v in med.items()},  # time / fastest's
        "seconds_all": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "first_call_s": {k: round(v, 2) for k, v in first.items()},
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "versions": {m: sys.modules[m].__version__ for m in ("jax", "jaxlib", "flax", "torch", "tensorflow")
                     if m in sys.modules},
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "PJRT_NPROC", "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")},
        "cpus": os.cpu_count(),
    }
    rows = [(k, f"{args.batch / med[k]:.2f}", f"{result['x_fastest'][k]:.2f}", f"{first[k]:.1f}") for k in calls]
    return report(result, ("program", f"img/s (median of {args.repeats})", "time x fastest", "first call (s)"),
                  rows, load_start, args.out)


if __name__ == "__main__":
    main()
