"""Where a jax:cpu training step spends its time, per XLA:CPU thunk and by kind of work.

``python bench/jax_speed_profile.py --model resnet50 --size 112 --batch 16 --steps 3``
runs ``train_step`` under ``jax.profiler`` with ``--xla_cpu_enable_xprof_traceme=true``
(one trace event per thunk), sums each thunk's time over ``--steps`` steps after a
warm-up, and sorts the thunks into kinds from the optimised HLO: convolutions (YNNPACK
``ynn_fusion`` or XLA's own ``convolution`` thunk) as forward, input-gradient or
weight-gradient by their output batch size and op name, layout transposes and copies,
and the rest (BatchNorm, activations, optimizer). Writes a text report (``--out``).
``--compiler-option K=V`` (repeatable) recompiles the step with XLA debug options.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np


def kinds(hlo: str, batch: int) -> dict[str, str]:
    """Entry instruction name -> kind of work, from the optimised HLO text."""
    comps: dict[str, str] = {}
    for m in re.finditer(r"^(?:%?)([\w.-]+) [^\n]*\{\n(.*?)^\}", hlo, re.M | re.S):
        comps[m.group(1)] = m.group(2)
    entry = hlo[hlo.index("\nENTRY"):]
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.-]+) = (\S+?)\{?[^ ]* (\w[\w-]*)\((.*)$", entry, re.M):
        name, line = m.group(1), m.group(0)
        called = re.search(r"calls=%?([\w.-]+)", line)
        body = comps.get(called.group(1), "") if called else ""
        conv = re.search(r"= f\w+\[(\d+),[^\]]*\][^=]* convolution\(", line if " convolution(" in line else body)
        back = "transpose(jvp" in line
        if conv:
            where = "ynn" if name.startswith("ynn") else "xla"
            if int(conv.group(1)) != batch:
                out[name] = f"conv weight-grad ({where})"
            else:
                out[name] = f"conv {'input-grad' if back else 'forward'} ({where})"
        elif " dot(" in line or " dot(" in body:
            out[name] = f"dot: 1x1 convolutions, dense ({'ynn' if name.startswith('ynn') else 'xla'})"
        elif name.startswith("ynn"):
            out[name] = "ynn other (elementwise)"
        elif "transpose" in name or "copy" in name:
            out[name] = "transpose/copy"
        elif "reduce" in name:
            out[name] = "reductions (BatchNorm statistics, sums)"
        else:
            out[name] = "elementwise fusions (BatchNorm, ReLU, optimizer)"
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compiler-option", action="append", default=[])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true".strip()
    import jax

    import hal
    from hal.lowering import scalar_table
    from hal.models import get
    from hal.training import SGD, TrainConfig

    spec = get(args.model, input_size=args.size)
    config = TrainConfig(loss="cross_entropy", optimizer=SGD(lr=0.01, momentum=0.9))
    exe = hal.compile(spec, "jax:cpu", config=config, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.output_shape[0], args.batch)
    options = dict(kv.split("=", 1) for kv in args.compiler_option)
    if options:
        import types

        progs = exe.programs
        train = jax.jit(progs.train.__wrapped__, donate_argnums=(0, 1, 2), compiler_options=options)
        exe.programs = types.SimpleNamespace(**{**vars(progs), "train": train})
    hlo = exe.programs.train.lower(
        exe.params, exe.stats, exe.opt_state, x, exe._put_y(y), scalar_table(config, 0, 1)[0].astype(np.float32),
        np.int32(0), np.asarray(True)).compile().as_text()
    kind = kinds(hlo, args.batch)
    exe.train_step(x, y)  # compile, warm up
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.steps):
                exe.train_step(x, y)
        wall = (time.perf_counter() - start) / args.steps
        (path,) = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))
    per = collections.Counter()
    for e in events.get("traceEvents", events) if isinstance(events, dict) else events:
        if e.get("ph") == "X" and e.get("name") in kind:
            per[e["name"]] += e["dur"] / 1e3 / args.steps
    total = sum(per.values())
    by_kind = collections.Counter()
    for name, ms in per.items():
        by_kind[kind[name]] += ms
    lines = [f"# {args.model} {args.size}x{args.size} batch {args.batch}, jax:cpu train_step (SGD-momentum), "
             f"{args.steps} profiled steps, load average {load:.2f}; options {options or 'none'}",
             f"wall {wall * 1e3:.0f} ms/step, thunk time {total:.0f} ms/step", "=== by kind"]
    lines += [f"{ms:9.1f} ms/step {ms / total:6.1%}  {k}" for k, ms in by_kind.most_common()]
    lines += ["=== top thunks"] + [f"{ms:9.1f} ms/step  {n}  [{kind[n]}]" for n, ms in per.most_common(25)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
