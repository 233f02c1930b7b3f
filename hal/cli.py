"""The ``hal`` command: info, parity, bench, compare (the main job), plan, train.

Every command prints a readable table, takes ``--json`` for machines, and exits
non-zero when a check fails (1) or the command is used wrongly (2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hal.errors import HalError
from hal.ipu import add_plan_parser
from hal.models.conductivity.train import add_train_parser

DEFAULT_OUT = Path("bench") / "results"


class Progress:
    """A one-line progress display on stderr (a line per step when not a terminal)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _spec(args: argparse.Namespace) -> Any:
    """A zoo model by name (with --input-size/--num-classes) or a spec JSON file."""
    from hal.models import get
    from hal.spec import ModelSpec

    path = Path(args.model)
    if path.suffix == ".json" and path.is_file():
        return ModelSpec.from_json(path.read_text())
    kwargs: dict[str, Any] = {}
    if args.input_size is not None:
        kwargs["input_size"] = args.input_size
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return get(args.model, **kwargs)


def _targets(args: argparse.Namespace, include_reference: bool = True) -> list[str]:
    from hal.registry import available_targets

    if args.targets:
        return [t.strip() for t in args.targets.split(",") if t.strip()]
    # default: the reference first, then the first (default) device of every other available backend
    seen, out = set(), []
    for t in sorted(available_targets(), key=lambda t: not t.startswith("numpy:")):
        backend = t.split(":")[0]
        if backend not in seen and (include_reference or backend != "numpy"):
            seen.add(backend)
            out.append(t)
    return out


def _config(args: argparse.Namespace) -> Any:
    from hal.training import SGD, AdamW, TrainConfig

    lr = args.lr if args.lr is not None else 1e-3
    opt = AdamW(lr=lr) if args.optimizer == "adamw" else SGD(lr=lr, momentum=0.9)
    return TrainConfig(optimizer=opt, grad_accum=args.grad_accum, precision=args.precision)


def cmd_info(args: argparse.Namespace) -> int:
    from hal.registry import backend_names, get_backend
    from hal.table import render

    rows = []
    for name in backend_names():
        try:
            cls = get_backend(name)
            a = cls.availability()
            devices = cls.devices() if a.available else []
            rows.append({"backend": name, "available": a.available, "version": a.version,
                         "devices": [f"{name}:{d}" for d in devices], "reason": a.reason,
                         "description": cls.description})
        except HalError as exc:
            rows.append({"backend": name, "available": False, "version": None, "devices": [], "reason": str(exc),
                         "description": ""})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render(["backend", "available", "version", "targets", "why not / description"],
                     [[r["backend"], "yes" if r["available"] else "no", r["version"] or "-",
                       ", ".join(r["devices"]) or "-",
                       "; ".join(x for x in (r["description"] if r["available"] else "", r["reason"]) if x)]
                      for r in rows]))
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from hal.parity import CHECKS, run_parity

    progress = Progress(not args.json)
    checks = args.checks.split(",") if args.checks else list(CHECKS)
    spec = _spec(args)
    weights = None
    if args.weights:
        from hal.weights import load_weights

        _, weights = load_weights(args.weights, spec)
    report = run_parity(spec, _targets(args), batch=args.batch, checks=checks, steps=args.steps,
                        config=_config(args), seed=args.seed, weights=weights, progress=progress)
    progress.done()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from hal.bench import run_bench

    progress = Progress(not args.json)
    modes = args.modes.split(",")
    report = run_bench(_spec(args), _targets(args), batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                       modes=modes, native=not args.no_native, config=_config(args), progress=progress)
    progress.done()
    written = report.write(args.out) if args.out else []
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
        print("env: " + ", ".join(f"{k}={v}" for k, v in report.env.items()))
        for p in written:
            print(f"wrote {p}")
    return 1 if any(r.hal is None and "does not train" not in r.note for r in report.rows) else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hal.bench import run_bench
    from hal.parity import run_parity
    from hal.table import render

    spec = _spec(args)
    targets = _targets(args)
    progress = Progress(not args.json)
    parity = run_parity(spec, targets, batch=args.parity_batch, checks=("forward", "forward_train", "grads"),
                        config=_config(args), seed=args.seed, progress=progress)
    timed = [t for t in targets if not t.startswith("numpy")]
    bench = run_bench(spec, timed, batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                      config=_config(args), progress=progress) if timed else None
    progress.done()
    rows = []
    for t in dict.fromkeys(r.target for r in parity.results):
        res = {r.check: r for r in parity.results if r.target == t}
        speed = {r.mode: r for r in (bench.rows if bench else []) if r.target == t}
        row: dict[str, Any] = {"target": t, "parity": "PASS" if all(r.passed is not False for r in res.values()) else "FAIL"}
        for check in ("forward", "forward_train", "grads"):
            r = res.get(check)
            row[check] = None if r is None or r.max_rel is None else r.max_rel
            row[check + "_tol"] = None if r is None else r.tol
        for mode in ("inference", "training"):
            b = speed.get(mode)
            row[mode] = b.hal.samples_per_s if b and b.hal else None
            row[mode + "_ratio"] = b.ratio if b else None
        row["notes"] = "; ".join(r.note for r in res.values() if r.passed is False)
        rows.append(row)
    if args.json:
        print(json.dumps({"model": spec.name, "rows": rows, "parity": parity.to_dict(),
                          "bench": bench.to_dict() if bench else None}, indent=2))
    else:
        def f(v: Any, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        print(f"{spec.name}: max error vs the float64 reference (normalised, tolerance in brackets); "
              f"speed at batch {args.batch} vs the native {'/'.join(sorted({t.split(':')[0] for t in timed}))} model")
        print(render(
            ["target", "forward", "train-mode fwd", "grads", "parity", "infer samples/s", "vs native", "train samples/s",
             "vs native"],
            [[r["target"], f"{f(r['forward'], '.1e')} ({f(r['forward_tol'], '.0e')})",
              f"{f(r['forward_train'], '.1e')} ({f(r['forward_train_tol'], '.0e')})",
              f"{f(r['grads'], '.1e')} ({f(r['grads_tol'], '.0e')})", r["parity"],
              f(r["inference"], ".1f"), f(r["inference_ratio"], ".2f") + ("x" if r["inference_ratio"] else ""),
              f(r["training"], ".1f"), f(r["training_ratio"], ".2f") + ("x" if r["training_ratio"] else "")]
             for r in rows], align="llllrrrrr"))
        if bench:
            print("env: " + ", ".join(f"{k}={v}" for k, v in bench.env.items()))
        for r in rows:
            if r["notes"]:
                print(f"{r['target']}: {r['notes']}")
        for name, reason in _unavailable().items():
            print(f"not available here: {name}: {reason}")
    return 0 if parity.passed else 1


def _unavailable() -> dict[str, str]:
    from hal.registry import backend_names, get_backend

    out = {}
    for name in backend_names():
        try:
            a = get_backend(name).availability()
        except HalError as exc:
            out[name] = str(exc)
            continue
        if not a.available:
            out[name] = a.reason
    return out


def _common(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("model", help="zoo model name (see `hal info`) or a spec .json file")
    p.add_argument("--targets", help="comma-separated targets (default: every available backend)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--input-size", type=int, help="square input size for zoo models")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd: momentum 0.9")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3: larger steps make trajectories chaotic)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp64", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hal", description="Define a CNN once; run, parity-test and benchmark it anywhere.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="backends, versions, devices, and why a backend is unavailable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("parity", help="compare targets against the float64 reference")
    _common(p, batch=4)
    p.add_argument("--checks", help="comma-separated: forward,forward_train,grads,trajectory (default: all)")
    p.add_argument("--steps", type=int, default=3, help="trajectory length")
    p.add_argument("--weights", help="a hal .safetensors file to test with (default: seeded init, see hal.parity)")
    p.set_defaults(fn=cmd_parity)

    p = sub.add_parser("bench", help="time targets against the native hand-written model")
    _common(p, batch=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default="inference,training")
    p.add_argument("--no-native", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for JSON/Markdown/PNG ('' to skip)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("compare", help="the main job: parity and speed of a model on every available target")
    _common(p, batch=16)
    p.add_argument("--parity-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.set_defaults(fn=cmd_compare)

    add_plan_parser(sub)  # subcommands defined next to their code
    add_train_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except HalError as exc:
        print(f"hal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
