"""jax:cpu gradient accumulation, unrolled micro-batches (the CPU default) against the ``lax.scan``.

``python bench/jax_speed_accum.py conductivity 64 32 1,2,4,8 3`` (model, input size, batch,
grad_accum values, repeats) compiles ``train_step`` once per G and form (``CPU_UNROLL_ACCUM_MAX``
set high for the unrolled form, 0 for the scan; G=1 has no scan), reports each first call
(tracing, XLA compile and one step) and the median step time of ``repeats`` interleaved calls,
and XLA's temporary memory of each program (``memory_analysis``). ``model`` is
``conductivity`` (MSE) or a zoo name (cross-entropy). One XLA thread (``PJRT_NPROC=1``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("PJRT_NPROC", "1")

import numpy as np  # noqa: E402

import hal  # noqa: E402
import hal.backends.jax as hal_jax  # noqa: E402
from hal.lowering import scalar_table  # noqa: E402
from hal.training import AdamW, TrainConfig  # noqa: E402


def main(argv: list[str]) -> None:
    model, size, batch = argv[0], int(argv[1]), int(argv[2])
    accums = [int(g) for g in argv[3].split(",")]
    repeats = int(argv[4]) if len(argv) > 4 else 3
    if model == "conductivity":
        from hal.models.conductivity.cnn import conductivity_cnn

        spec, loss = conductivity_cnn(dims=2, size=size), "mse"
        y = np.random.default_rng(1).standard_normal((batch, 1)).astype(np.float32)
    else:
        from hal.models import get

        spec, loss = get(model, input_size=size), "cross_entropy"
        y = np.random.default_rng(1).integers(0, spec.output_shape[0], batch)
    x = np.random.default_rng(0).standard_normal((batch, *spec.input_shape)).astype(np.float32)
    exes, first, temp = {}, {}, {}
    for g in accums:
        for form in ("scan", "unrolled"):
            if g == 1 and form == "scan":
                continue
            hal_jax.CPU_UNROLL_ACCUM_MAX = 10**6 if form == "unrolled" else 0
            config = TrainConfig(loss=loss, optimizer=AdamW(lr=1e-3), grad_accum=g)
            exe = hal.compile(spec, "jax:cpu", config=config, seed=0)
            program = exe.programs.train.lower(exe.params, exe.stats, exe.opt_state, x, exe._put_y(y),
                                               scalar_table(config, 0, 1)[0].astype(np.float32), np.int32(0),
                                               np.asarray(True))
            temp[g, form] = program.compile().memory_analysis().temp_size_in_bytes / 2**20
            start = time.perf_counter()
            exe.train_step(x, y)
            first[g, form] = time.perf_counter() - start
            exes[g, form] = exe
    times: dict[tuple, list[float]] = {k: [] for k in exes}
    for _ in range(repeats):
        for k, exe in exes.items():
            start = time.perf_counter()
            exe.train_step(x, y)
            times[k].append(time.perf_counter() - start)
    print(f"# {model} {size}, batch {batch}, AdamW, jax:cpu train_step; load average {os.getloadavg()[0]:.2f}")
    print("| G | form | first call (s) | step (ms, median) | XLA temp (MiB) |")
    print("|---|---|---|---|---|")
    for (g, form), v in times.items():
        print(f"| {g} | {form} | {first[g, form]:.1f} | {statistics.median(v) * 1e3:.0f} | {temp[g, form]:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
