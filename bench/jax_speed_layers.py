"""One convolution at a time on jax:cpu: hal's narrow-convolution lowering against ``nn.Conv``, and who runs it.

``PJRT_NPROC=1 python bench/jax_speed_layers.py --shapes 64:1:8,64:8:8,32:8:16 --batch 32`` times,
for every ``size:in:out`` shape, one 3x3 ``same`` convolution of channels-last float32 data as
``nn.Conv`` and as hal's ``CpuConv`` with ``tap=True`` (forward as a tap sum, backward as the convolution's):
the forward pass, and the backward pass (gradients of the input and the kernel), interleaved,
medians of ``--repeats``. The library column says what XLA:CPU made of ``nn.Conv``'s forward
pass: ``ynn`` (YNNPACK) or ``eigen`` (XLA's own convolution thunk). Run it with ``PJRT_NPROC=1``
and ``=2`` to see which kernels use the second thread. Writes a Markdown table, and JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from _speed import report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="64:1:8,64:8:8,32:8:16,32:16:16,16:16:32,16:32:32,8:32:64,8:64:64",
                   help="comma-separated size:in_channels:out_channels")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    import flax.linen as nn

    from hal.backends.jax import _flax

    load_start = os.getloadavg()
    rng = np.random.default_rng(0)
    rows, records = [], []
    for shape in args.shapes.split(","):
        size, cin, cout = map(int, shape.split(":"))
        x = jnp.asarray(rng.standard_normal((args.batch, size, size, cin)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((args.batch, size, size, cout)), jnp.float32)
        timed, library = {}, ""
        conv = {"features": cout, "kernel_size": (3, 3), "strides": (1, 1), "padding": ((1, 1), (1, 1)),
                "kernel_dilation": (1, 1), "use_bias": False, "dtype": jnp.float32, "param_dtype": jnp.float32}
        for lowering in ("plain", "hal"):
            net = nn.Conv(**conv) if lowering == "plain" else _flax()["CpuConv"](**conv, tap=True)
            params = net.init(jax.random.key(0), x)
            fwd = jax.jit(lambda v, x, net=net: net.apply(v, x))
            both = jax.jit(lambda v, x, net=net: jax.vjp(lambda v, x: net.apply(v, x), v, x)[1](g))
            if lowering == "plain":
                hlo = fwd.lower(params, x).compile().as_text()
                library = "ynn" if "ynn_fusion" in hlo else "eigen"
            timed[lowering] = (fwd, both, params)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats + 1):  # the first round compiles and warms up
            for lowering, (fwd, both, params) in timed.items():
                for what, f in (("forward", fwd), ("backward", both)):
                    start = time.perf_counter()
                    jax.block_until_ready(f(params, x))
                    times.setdefault((lowering, what), []).append(time.perf_counter() - start)
        med = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
        records.append({"shape": shape, "library": library, "ms": {f"{a} {w}": round(v, 3) for (a, w), v in med.items()}})
        rows.append((shape, library, f"{med['plain', 'forward']:.2f}", f"{med['hal', 'forward']:.2f}",
                     f"{med['plain', 'backward']:.2f}", f"{med['hal', 'backward']:.2f}"))
    result = {
        "what": f"one 3x3 same convolution, batch {args.batch}, jax:cpu, nn.Conv vs hal's tap-sum CpuConv",
        "args": vars(args) | {"out": str(args.out)},
        "layers": records,
        "pjrt_nproc": os.environ.get("PJRT_NPROC"),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "versions": {"jax": jax.__version__},
        "cpus": os.cpu_count(),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }
    header = ("size:in:out", "nn.Conv runs on", "nn.Conv fwd (ms)", "tap sum fwd (ms)", "nn.Conv bwd (ms)",
              "tap sum bwd (ms)")
    return report(result, header, rows, load_start, args.out)


if __name__ == "__main__":
    main()
