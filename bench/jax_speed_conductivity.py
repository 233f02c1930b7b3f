"""Side-by-side training speed of the conductivity CNN on several targets, interleaved.

``python bench/jax_speed_conductivity.py --targets torch:cpu,jax:cpu,tensorflow:cpu``
compiles every target in one process (same spec, weights, batches and config as
``hal train conductivity``), then times ``run_steps`` over ``--steps`` batches per
call, targets interleaved round-robin for ``--repeats`` rounds, so that the load of a
shared machine falls on all of them alike. Reports per-step medians, each target's
ratio to the fastest, the load average at start and end, versions and thread
settings, as JSON (``--out``) and a markdown table on stdout.

Random 0/1 phase grids stand in for the GRF dataset: the speed does not depend on
the values. ``--threads`` sets the intra-op threads of every framework before any
of them loads (``hal train --threads``'s rule). ``--jax-module NAME=PATH`` also times
jax:cpu built by another version of the backend module, for an A/B in one process:
``git show HEAD~1:backends/jax.py > /tmp/old.py``, then ``--jax-module old=/tmp/old.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _speed import jax_module_executable, report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="torch:cpu,jax:cpu,tensorflow:cpu")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run_steps call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per target (after one warm-up call)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps-per-call", type=int, default=0,
                   help="0: one run_steps call of --steps; 1: train_step per step")
    p.add_argument("--jax-module", action="append", default=[], metavar="NAME=PATH",
                   help="also time jax:cpu from the backend module file PATH, labelled 'jax:cpu NAME'")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from hal.models.conductivity.train import _set_threads, train_config

    if args.threads:
        _set_threads(args.threads)
    import hal
    from hal.models.conductivity.cnn import conductivity_cnn

    load_start = os.getloadavg()
    targets = args.targets.split(",")
    spec = conductivity_cnn(dims=2, size=args.size)
    rng = np.random.default_rng(0)
    n = args.steps
    xs = (rng.random((n, args.batch, 1, args.size, args.size)) < 0.5).astype(np.float32)
    ys = rng.standard_normal((n, args.batch, 1)).astype(np.float32)
    config = train_config(3e-3, 1e-4, 1 + args.repeats, n)

    def call(exe: object) -> None:
        if args.steps_per_call == 1:
            for x, y in zip(xs, ys):
                exe.train_step(x, y)
        else:
            exe.run_steps(xs, ys)

    exes, first = {t: hal.compile(spec, t, config=config, seed=0) for t in targets}, {}
    for name, path in (m.split("=", 1) for m in args.jax_module):
        exes[f"jax:cpu {name}"] = jax_module_executable(name, path, spec, hal.init_weights(spec, seed=0), config)
    targets = list(exes)
    for t in targets:
        start = time.perf_counter()
        call(exes[t])  # compile and warm up
        first[t] = time.perf_counter() - start
    times: dict[str, list[float]] = {t: [] for t in targets}
    for r in range(args.repeats):
        for t in targets if r % 2 == 0 else targets[::-1]:  # alternate the order: drift falls on all alike
            start = time.perf_counter()
            call(exes[t])
            times[t].append((time.perf_counter() - start) / n)
    med = {t: statistics.median(v) for t, v in times.items()}
    fastest = min(med.values())
    versions = {}
    for mod in ("torch", "jax", "jaxlib", "tensorflow", "flax"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    threads = {}
    if "torch" in sys.modules:
        threads["torch"] = sys.modules["torch"].get_num_threads()
    result = {
        "what": f"conductivity CNN 2-d {args.size}x{args.size}, batch {args.batch}, "
                f"{'train_step per step' if args.steps_per_call == 1 else f'run_steps of {n} steps'}",
        "args": vars(args) | {"out": str(args.out)},
        "ms_per_step_median": {t: round(v * 1e3, 2) for t, v in med.items()},
        "ratio_to_fastest": {t: round(v / fastest, 3) for t, v in med.items()},
        "ms_per_step_all": {t: [round(x * 1e3, 2) for x in v] for t, v in times.items()},
        "first_call_s": {t: round(v, 2) for t, v in first.items()},
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
        "threads": threads | {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "XLA_FLAGS")},
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    rows = [(t, f"{med[t] * 1e3:.1f}", f"{med[t] / fastest:.2f}", f"{first[t]:.1f}") for t in targets]
    return report(result, ("target", f"ms/step (median of {args.repeats})", "x fastest", "first call (s)"), rows,
                  load_start, args.out)


if __name__ == "__main__":
    main()
