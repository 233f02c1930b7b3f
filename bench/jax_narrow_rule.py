"""Which convolutions jax:cpu should run forward as tap sums (``CpuConv.tap``): an A/B of rules in one process.

``python bench/jax_narrow_rule.py --threads 2`` compiles the conductivity CNN (2-d, 64x64),
with BatchNorm and without it (convolutions with bias instead), under each rule:

- ``hal``: ``hal.backends.jax.narrow``: one input channel, or at most 8 input and output
  channels where only training-mode BatchNorms read the output;
- ``one-channel``: one input channel only;
- ``up-to-8``: also at most 8 input and output channels, wherever they are (the rule before);
- ``none``: no tap sums.

and times, interleaved round-robin (the order alternating each round), a ``run_steps`` call
of ``--steps`` training steps at ``--batch`` and one ``predict`` of ``--predict-batch``
samples. Reports medians per step and per predict call, the load average, versions and
threads, as JSON (``--out``) and a Markdown table.
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
from _speed import report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--predict-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from hal.models.conductivity.train import _set_threads, train_config

    _set_threads(args.threads)
    import hal
    import hal.backends.jax as hj
    from hal.spec import SpecBuilder

    hal_rule = hj.narrow
    rules = {
        "hal": hal_rule,
        "one-channel": lambda op, in_shape, dtype, reduced: hal_rule(op, in_shape, dtype, False),
        "up-to-8": lambda op, in_shape, dtype, reduced: hal_rule(op, in_shape, dtype, True),
        "none": lambda *a: False,
    }

    def cnn(bn: bool) -> object:  # hal.models.conductivity.cnn's layers, optionally without BatchNorm
        b = SpecBuilder(f"conductivity_cnn2d{'' if bn else '_nobn'}")
        x = b.input((1, 64, 64))
        for i in range(4):
            if i:
                x = b.max_pool(x, 2, name=f"stage{i}.pool")
            for j in (1, 2):
                x = b.conv(x, 8 * 2**i, 3, padding="same", bias=not bn, name=f"stage{i}.conv{j}")
                x = b.relu(b.batch_norm(x, name=f"stage{i}.bn{j}") if bn else x, name=f"stage{i}.relu{j}")
        x = b.relu(b.dense(b.global_avg_pool(x, name="pool"), 64, name="head.fc1"), name="head.relu")
        return b.build(b.dense(x, 1, name="head.fc2"))

    load_start = os.getloadavg()
    rng = np.random.default_rng(0)
    xs = (rng.random((args.steps, args.batch, 1, 64, 64)) < 0.5).astype(np.float32)
    ys = rng.standard_normal((args.steps, args.batch, 1)).astype(np.float32)
    xp = (rng.random((args.predict_batch, 1, 64, 64)) < 0.5).astype(np.float32)
    config = train_config(1e-3, 1e-4, 1 + args.repeats, args.steps)
    exes = {}
    try:
        for bn in (True, False):
            for rule, fn in rules.items():
                hj.narrow = fn  # read when the programs are traced: on the first call, below
                hj._PROGRAMS.clear()
                exe = hal.compile(cnn(bn), "jax:cpu", config=config, seed=0)
                exe.run_steps(xs, ys)
                exe.predict(xp)
                exes[(f"{'with' if bn else 'without'} BatchNorm", rule)] = exe
    finally:
        hj.narrow = hal_rule
        hj._PROGRAMS.clear()
    train: dict = {k: [] for k in exes}
    infer: dict = {k: [] for k in exes}
    for r in range(args.repeats):
        for k in list(exes) if r % 2 == 0 else list(exes)[::-1]:
            start = time.perf_counter()
            exes[k].run_steps(xs, ys)
            train[k].append((time.perf_counter() - start) / args.steps)
            start = time.perf_counter()
            exes[k].predict(xp)
            infer[k].append(time.perf_counter() - start)
    med = {k: (statistics.median(train[k]) * 1e3, statistics.median(infer[k]) * 1e3) for k in exes}
    result = {
        "what": f"conductivity CNN 2-d 64x64 on jax:cpu: training step (run_steps of {args.steps}, batch "
                f"{args.batch}) and predict (batch {args.predict_batch}) under each tap-sum rule",
        "args": vars(args) | {"out": str(args.out)},
        "ms": {f"{m} / {r}": {"train_step": round(t, 2), "predict": round(i, 1)} for (m, r), (t, i) in med.items()},
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "versions": {m: sys.modules[m].__version__ for m in ("jax", "jaxlib", "flax") if m in sys.modules},
        "threads": {k: os.environ.get(k) for k in ("XLA_FLAGS", "PJRT_NPROC")},
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    rows = [(m, r, f"{t:.1f}", f"{i:.1f}") for (m, r), (t, i) in med.items()]
    return report(result, ("model", "rule", f"train ms/step (median of {args.repeats})",
                           f"predict {args.predict_batch} ms"), rows, load_start, args.out)


if __name__ == "__main__":
    main()
