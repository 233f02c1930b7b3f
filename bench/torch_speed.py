"""hal's ``torch:cpu`` against native PyTorch, with and without ``torch.compile``, in one process, interleaved.

``python bench/torch_speed.py --model resnet50 --batch 16 --repeats 3 --modes inference,training``
builds each variant, times its first call (the compile, for compiled variants) and a warm-up, then
times one call of every variant per round for ``--repeats`` rounds (round-robin, the order rotated each
round, so load on a shared machine, and TensorFlow's threads spinning after its call, fall on all alike) and reports medians, samples/s, ratios to ``native`` and the load average.

Variants (``--variants``, comma-separated):

``hal``                 ``hal.compile(spec, "torch:cpu")``: option ``fast`` (channels_last, BatchNorm folded)
``hal-inductor``        the same with ``options={"compile": "inductor"}``
``hal-nchw``            ``fast=False``: plain eager NCHW, BatchNorm not folded
``native``              bench/native/torch.py's model (torchvision's layout), eager, channels_last
``native-nchw``         the same in NCHW
``native-inductor``     ``torch.compile`` of the native model (default mode)
``native-freezing``     inference only: ``torch.compile`` with inductor's ``freezing`` (weights are constants,
                        BatchNorm folded and oneDNN weights prepacked by inductor; stale after a weight change)
``native-jit``          inference only: ``torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(m, x)))``
                        (TorchScript's conv-BatchNorm folding and oneDNN fusions)
``tensorflow``          hal's ``tensorflow:cpu`` in a worker process (torch's CUDA build and TensorFlow do not share
                        a process here), timed in the same rounds over a pipe

Training is one SGD-momentum step (hal: ``train_step`` with its default non-finite check; native: the usual
zero_grad/forward/cross_entropy/backward/step). Weights: hal's ``init_weights`` loaded into every variant.
``--threads N`` gives torch and TensorFlow N intra-op threads each. Writes JSON (``--out``) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent


def _hal(spec: Any, w: Any, options: dict[str, Any], target: str = "torch:cpu") -> Any:
    import hal
    from hal.training import SGD, TrainConfig

    return hal.compile(spec, target, w, TrainConfig(optimizer=SGD(lr=0.01, momentum=0.9)), options=options)


def _native(model: str, spec: Any, w: Any, channels_last: bool, compile_options: dict[str, Any] | None) -> Any:
    import torch

    from hal.native.torch import Native, build

    base = build(model, spec.output_shape[0], "cpu", spec.input_shape)
    base.model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in w.items()})
    native = Native(base.model, "cpu", base.note, channels_last)
    if compile_options is not None:
        native.model = torch.compile(native.model, **compile_options)
    return native


def _jit(native: Any, x: np.ndarray) -> Callable[[np.ndarray], Any]:
    import torch

    native.model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(native.model, native._x(x))
    scripted = torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    def predict(xb: np.ndarray) -> Any:
        with torch.no_grad():
            return scripted(native._x(xb)).numpy()

    return predict


def build_variant(name: str, model: str, spec: Any, w: Any, x: np.ndarray) -> dict[str, Callable[..., Any]]:
    """``{"inference": f(x), "training": f(x, y)}`` of one variant (inference only where it says so)."""
    import torch

    if name.startswith("hal"):
        options = {"hal": {}, "hal-inductor": {"compile": "inductor"}, "hal-nchw": {"fast": False}}[name]
        exe = _hal(spec, w, options)
        return {"inference": exe.predict, "training": exe.train_step}
    if name == "native-jit":
        return {"inference": _jit(_native(model, spec, w, True, None), x)}
    if name == "native-freezing":
        native = _native(model, spec, w, True, {"options": {"freezing": True}})

        def frozen(xb: np.ndarray) -> Any:  # freezing needs no_grad (inductor refuses it under inference_mode)
            native.model.eval()
            with torch.no_grad():
                return native.model(native._x(xb)).numpy()

        return {"inference": frozen}
    compile_options = {} if name == "native-inductor" else None
    native = _native(model, spec, w, name != "native-nchw", compile_options)
    return {"inference": native.predict, "training": native.train_step}


class TensorFlowWorker:
    """hal's ``tensorflow:cpu`` executable in a child process: one timed call per request."""

    def __init__(self, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--serve-tensorflow", "--model", args.model, "--batch", str(args.batch),
               "--size", str(args.size), "--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def time(self, mode: str) -> float:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(mode + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the tensorflow worker died")
        return float(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def serve_tensorflow(args: argparse.Namespace) -> None:
    """The worker's side of :class:`TensorFlowWorker`: reads a mode per line, prints the seconds of one call."""
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    spec, w, x, y = _inputs(args)
    exe = _hal(spec, w, {}, "tensorflow:cpu")
    calls = {"inference": lambda: exe.predict(x), "training": lambda: exe.train_step(x, y)}
    for line in sys.stdin:
        t0 = time.perf_counter()
        calls[line.strip()]()
        print(time.perf_counter() - t0, flush=True)


def _inputs(args: argparse.Namespace) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    import hal
    from hal.models import get

    spec = get(args.model, input_size=args.size) if args.size else get(args.model)
    w = hal.init_weights(spec, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.output_shape[0], args.batch)
    return spec, w, x, y


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224, help="input height and width (0: the model's own)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="inference,training")
    p.add_argument("--variants", default="hal,hal-inductor,native,native-inductor")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of torch and TensorFlow (0: theirs)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--serve-tensorflow", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_tensorflow:
        serve_tensorflow(args)
        return {}
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    spec, w, x, y = _inputs(args)
    names = args.variants.split(",")
    modes = args.modes.split(",")
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    first: dict[str, dict[str, float]] = {}
    tf = TensorFlowWorker(args) if "tensorflow" in names else None
    for name in names:
        if name == "tensorflow":
            continue
        fns = build_variant(name, args.model, spec, w, x)
        for mode in modes:
            if mode in fns:
                calls[(name, mode)] = (lambda f=fns[mode]: f(x)) if mode == "inference" else (
                    lambda f=fns[mode]: f(x, y))
    times: dict[tuple[str, str], list[float]] = {}
    for mode in modes:  # one mode after the other: hal's predict after a train_step would time its refold too
        for name in names:  # first call (compiles), then one warm-up
            if name == "tensorflow":
                first.setdefault(name, {})[mode] = tf.time(mode)  # type: ignore[union-attr]
                tf.time(mode)  # type: ignore[union-attr]
            elif (name, mode) in calls:
                t0 = time.perf_counter()
                calls[(name, mode)]()
                first.setdefault(name, {})[mode] = time.perf_counter() - t0
                calls[(name, mode)]()
            else:
                continue
            times[(name, mode)] = []
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:  # each variant leads some rounds
                if (name, mode) not in times:
                    continue
                t0 = time.perf_counter()
                if name == "tensorflow":
                    times[(name, mode)].append(tf.time(mode))  # type: ignore[union-attr]
                else:
                    calls[(name, mode)]()
                    times[(name, mode)].append(time.perf_counter() - t0)
    if tf is not None:
        tf.close()
    rows = []
    for (name, mode), ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "mode": mode, "median_s": med, "samples_per_s": args.batch / med,
                     "times_s": ts, "first_call_s": first[name][mode]})
    for row in rows:  # paired: the median over rounds of native's time over this variant's in the same round
        ref = next((r for r in rows if r["variant"] == "native" and r["mode"] == row["mode"]), None)
        row["vs_native"] = statistics.median(a / b for a, b in zip(ref["times_s"], row["times_s"])) if ref else None
    result = {
        "model": args.model, "batch": args.batch, "input_shape": list(spec.input_shape), "repeats": args.repeats,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or
        platform.machine(), "cores": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "mkldnn": torch.backends.mkldnn.is_available(), "rows": rows,
    }
    print(f"{args.model} batch {args.batch} input {tuple(spec.input_shape)}, {args.repeats} interleaved rounds, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average "
          f"{load_start[0]:.1f} -> {result['loadavg_end'][0]:.1f}")
    print("| variant | mode | samples/s (median) | vs native | first call s |\n|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_native']:.2f}x" if r["vs_native"] else "-"
        print(f"| {r['variant']} | {r['mode']} | {r['samples_per_s']:.2f} | {vs} | {r['first_call_s']:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
