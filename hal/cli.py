"""The ``hal`` command: info, parity, bench, compare (the main job), conformance, plan, train.

Every command prints a readable table and takes ``--json`` for machines. Exit status: 0 when
everything passed, 1 when a check, a target or a plan failed, 2 when the command is used wrongly.
A wrong use is reported as one line ``hal: error: ...`` on stderr, before any long work starts.

This module imports only the core; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from hal.bench import MODES, check_writable
from hal.errors import ConfigError, HalError
from hal.hardware import MiB
from hal.ipu import DEFAULT_HEADROOM, PRECISIONS as IPU_PRECISIONS
from hal.parity import CHECKS
from hal.training import PRECISIONS, SGD, Adam, AdamW, Optimizer

DEFAULT_OUT = Path("bench") / "results"
DEFAULT_TRAIN_OUT = DEFAULT_OUT / "conductivity"
DEFAULT_TRAIN_CACHE = Path(".hal-cache") / "conductivity"
TRANSFORMS = ("plain", "sqrt", "log")  # = hal.models.conductivity.train.TRANSFORMS, which loads the workload
PLAN_OPTIMIZERS: dict[str, Callable[[], Optimizer]] = {
    "sgd": SGD, "sgd-momentum": lambda: SGD(momentum=0.9), "adam": Adam, "adamw": AdamW,
}


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


# ---------------------------------------------------------------------------
# argument types: each turns a bad value into a one-line usage error
# ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _int(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    """A comma-separated list: no empty entry, no entry twice."""
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"an empty entry in {text!r} (expected comma-separated names)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} given twice in {text!r}")
    return names


def _names_in(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A comma-separated list of some of ``choices``."""

    def parse(text: str) -> list[str]:
        names = _names(text)
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, unknown))}; choose from {', '.join(choices)}")
        return names

    return parse


def _target(text: str) -> str:
    from hal.backend import Target

    try:
        return str(Target.parse(text))
    except HalError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _targets(text: str) -> list[str]:
    return [_target(t) for t in _names(text)]


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {exc}") from None
    return text


def _value(text: str) -> Any:
    """An option value: true/false/none, an int, a float, else the string itself."""
    words = {"true": True, "false": False, "none": None}
    if text.lower() in words:
        return words[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _sweep(text: str) -> tuple[str, list[Any]]:
    """``name=value[,value...]``: a backend option and the values to time it with."""
    name, eq, values = text.partition("=")
    if not (name.strip() and eq and values.strip()):
        raise argparse.ArgumentTypeError(f"expected name=value[,value...], got {text!r}")
    return name.strip(), [_value(v) for v in _names(values)]


def _option(text: str) -> tuple[str, Any]:
    """``name=value``: one backend option."""
    name, values = _sweep(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected name=value (one value), got {text!r}")
    return name, values[0]


def _options(pairs: list[tuple[str, Any]] | None) -> dict[str, Any]:
    """``--option`` pairs as a mapping; a name given twice is a ConfigError."""
    out: dict[str, Any] = {}
    for name, value in pairs or ():
        if name in out:
            raise ConfigError(f"argument --option: {name} given twice")
        out[name] = value
    return out


def _check_writable(folder: str, flag: str) -> None:
    """Create ``folder`` if needed and check that files can be written in it, before long work."""
    try:
        check_writable(folder)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _output_file(output: str, suffix: str) -> Path:
    """The ``-o/--output`` file, checked writable before any work."""
    out = Path(output)
    if out.is_dir():
        raise ConfigError(f"-o/--output: {output!r} is a folder; give the {suffix} file to write")
    _check_writable(str(out.parent), "-o/--output")
    return out


# ---------------------------------------------------------------------------
# what the commands share
# ---------------------------------------------------------------------------


def _model(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """MODEL's spec and weights (None: the command's default weights). MODEL is a zoo name (with
    --input-size/--num-classes), a spec .json file, or a hal weights file (.safetensors with the spec
    inside, as `hal import` writes); ``--weights FILE`` (where the command has it) gives the weights."""
    from hal.models import get
    from hal.spec import ModelSpec
    from hal.weights import load_weights

    sizes = {k: v for k, v in (("input_size", args.input_size), ("num_classes", args.num_classes)) if v is not None}
    path = Path(args.model)
    weights = None
    if path.suffix not in (".json", ".safetensors"):
        spec = get(args.model, **sizes)
    elif sizes:
        raise ConfigError("--input-size and --num-classes apply to zoo models, not to a spec or weights file")
    elif path.suffix == ".safetensors":
        spec, weights = load_weights(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the spec file {args.model!r}: {exc}") from None
        spec = ModelSpec.from_json(text)
    if getattr(args, "weights", None):
        _, weights = load_weights(args.weights, spec)
    return spec, weights


def _default_targets(include_reference: bool = True) -> list[str]:
    """The reference first, then the first (default) device of every other available backend."""
    from hal.registry import available_targets

    seen, out = set(), []
    for t in sorted(available_targets(), key=lambda t: not t.startswith("numpy:")):
        backend = t.split(":")[0]
        if backend not in seen and (include_reference or backend != "numpy"):
            seen.add(backend)
            out.append(t)
    return out


def _config(args: argparse.Namespace) -> Any:
    from hal.training import TrainConfig

    lr = args.lr if args.lr is not None else 1e-3
    opt = AdamW(lr=lr) if args.optimizer == "adamw" else SGD(lr=lr, momentum=0.9)
    return TrainConfig(optimizer=opt, grad_accum=args.grad_accum, precision=args.precision)


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


# ---------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from hal.registry import backend_names, get_backend
    from hal.table import render

    rows = []
    for name in backend_names():
        try:
            cls = get_backend(name)
            a = cls.availability()
            devices = cls.devices() if a.available else []
            options = {k: {"default": o.default, "choices": o.choices, "doc": o.doc} for k, o in cls.options().items()}
            rows.append({"backend": name, "available": a.available, "version": a.version,
                         "devices": [f"{name}:{d}" for d in devices], "reason": a.reason,
                         "description": cls.description, "options": options})
        except HalError as exc:
            rows.append({"backend": name, "available": False, "version": None, "devices": [], "reason": str(exc),
                         "description": "", "options": {}})
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(render(["backend", "available", "version", "targets", "why not / description"],
                     [[r["backend"], "yes" if r["available"] else "no", r["version"] or "-",
                       ", ".join(r["devices"]) or "-",
                       "; ".join(x for x in (r["description"] if r["available"] else "", r["reason"]) if x)]
                      for r in rows]))
        for r in rows:  # what `hal bench --options` can sweep
            for k, o in r["options"].items():
                values = "|".join(map(str, o["choices"])) if o["choices"] else type(o["default"]).__name__
                print(f"option {r['backend']} {k}={values} (default {o['default']}): {o['doc']}")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from hal.parity import run_parity

    spec, weights = _model(args)
    progress = Progress(not args.json)
    if args.replicas > 1:
        from hal.parity import run_dp_parity
        from hal.registry import get_backend

        ignored = [flag for flag, given in (("--optimizer", args.optimizer != "sgd"), ("--lr", args.lr is not None),
                                            ("--grad-accum", args.grad_accum != 1), ("--precision", args.precision != "fp32"),
                                            ("--checks", args.checks != list(CHECKS)), ("--option", bool(args.option)))
                   if given]
        if ignored:
            raise ConfigError(f"hal parity --replicas compares fp32 SGD and AdamW runs of its own; it does not take "
                              f"{', '.join(ignored)}")

        targets = args.targets or [t for t in _default_targets(False)
                                   if get_backend(t.partition(":")[0]).capabilities().data_parallel]
        report = run_dp_parity(spec, targets, replicas=args.replicas, batch=args.batch, steps=args.steps or 5,
                               seed=args.seed, weights=weights, progress=progress)
    else:
        report = run_parity(spec, args.targets or _default_targets(), batch=args.batch, checks=args.checks,
                            steps=args.steps or 3, config=_config(args), seed=args.seed, weights=weights,
                            progress=progress, options=_options(args.option))
    progress.done()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from hal.bench import run_bench

    if args.out:
        _check_writable(args.out, "--out")
    spec, _ = _model(args)  # speed and plans do not depend on the weights' values
    progress = Progress(not args.json)
    options: dict[str, list[Any]] = {}
    for name, values in args.options or ():
        if name in options:
            raise ConfigError(f"argument --options: {name} given twice")
        options[name] = values
    report = run_bench(spec, args.targets or _default_targets(), batch=args.batch, repeats=args.repeats,
                       warmup=args.warmup, modes=args.modes, native=not args.no_native, config=_config(args),
                       options=options, progress=progress)
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

    if args.report:  # the migration report over the targets, instead of the table
        _check_writable(args.report, "--report")
        spec, weights = _model(args)
        args.out = args.report
        return _write_migration(spec, weights, args.targets or _default_targets(include_reference=False), args)
    spec, weights = _model(args)
    targets = args.targets or _default_targets()
    progress = Progress(not args.json)
    parity = run_parity(spec, targets, batch=args.parity_batch, checks=("forward", "forward_train", "grads"),
                        config=_config(args), seed=args.seed, weights=weights, progress=progress)
    timed = [t for t in targets if not t.startswith("numpy")]
    bench = run_bench(spec, timed, batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                      config=_config(args), progress=progress, memory=False) if timed else None  # not shown
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


def _watts(text: str) -> tuple[str, float]:
    """``device=W``: the rated power of a catalog device, for energy estimates."""
    name, eq, value = text.partition("=")
    try:
        watts = float(value)
    except ValueError:
        watts = math.nan
    if not (name.strip() and eq and math.isfinite(watts) and watts > 0):
        raise argparse.ArgumentTypeError(f"expected device=watts (e.g. bow=300), got {text!r}")
    return name.strip(), watts


def _migrate_settings(args: argparse.Namespace) -> Any:
    from hal.migrate import Settings

    return Settings(batch=args.batch, batches=args.batches, repeats=args.repeats, warmup=args.warmup, ipu=args.ipu,
                    micro_batch=args.micro_batch, ipu_precision=args.ipu_precision, gpu=args.gpu,
                    watts=dict(args.watts or ()))


def _write_migration(spec: Any, weights: Any, targets: list[str], args: argparse.Namespace) -> int:
    """Run the migration report over ``targets``, write it under ``args.out`` and print its summary."""
    from hal.migrate import run_migrate

    progress = Progress(not args.json)
    report = run_migrate(spec, targets, _migrate_settings(args), weights=weights, progress=progress)
    progress("writing the report and plots")
    written = report.write(args.out)
    progress.done()
    if args.json:
        print(json.dumps(report.data, indent=2, default=str))
    else:
        print(report.summary())
        for p in written:
            print(f"wrote {p}")
    pair = report.data["numerics"].get("pair")
    return 1 if pair and not pair.get("passed", False) else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """``hal migrate MODEL --from A --to B``: the migration report; 1 if the two targets disagree."""
    if args.source == args.dest:
        raise ConfigError(f"--from and --to are the same target {args.source!r}")
    _check_writable(args.out, "--out")
    spec, weights = _model(args)
    return _write_migration(spec, weights, [args.source, args.dest], args)


def cmd_export(args: argparse.Namespace) -> int:
    from hal.onnx import to_onnx

    out = _output_file(args.output, ".onnx")
    spec, weights = _model(args)
    model = to_onnx(spec, weights, out, opset=args.opset, dynamic_batch=args.dynamic_batch, batch=args.batch)
    batch = "dynamic" if args.dynamic_batch else args.batch
    print(f"wrote {out} ({spec.name}, opset {args.opset}, batch {batch}, {len(model.graph.node)} ONNX nodes, "
          f"{spec.num_params:,} parameters, {'given' if weights is not None else 'seeded'} weights)")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from hal.testing.conformance import run_conformance

    progress = Progress(not args.json)
    report = run_conformance(args.target, include=args.include, exclude=args.exclude, progress=progress,
                             options=_options(args.option))
    progress.done()
    if not report.rows:
        chosen = " and ".join(f"--{k} {v!r}" for k, v in (("include", args.include), ("exclude", args.exclude)) if v)
        raise ConfigError(f"no conformance case is left by {chosen}: nothing was checked")
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.passed else 1


def cmd_import(args: argparse.Namespace) -> int:
    """``hal import package.module:factory -o FILE``: the factory's module as a hal weights file (spec inside)."""
    import importlib

    from hal.importers.torch import from_torch
    from hal.weights import save_weights

    out = _output_file(args.output, ".safetensors")
    path, _, attr = args.factory.partition(":")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:  # the user's own package, as `python -m` would
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory: Any = importlib.import_module(path)
    except Exception as exc:  # ImportError, or the module failing as it loads
        raise ConfigError(f"cannot import {path!r}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ConfigError(f"{args.factory!r}: {getattr(factory, '__name__', path)!r} has no attribute {part!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ConfigError(f"{args.factory!r} is not callable")
    try:
        module = factory(**args.kwargs)
    except Exception as exc:  # the user's factory refusing these arguments
        raise ConfigError(f"calling {args.factory}(**{args.kwargs}) failed: {type(exc).__name__}: {exc}") from None
    import torch

    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"{args.factory} returned a {type(module).__name__}, not an nn.Module")
    spec, weights = from_torch(module, args.input_shape)
    save_weights(out, spec, weights)
    print(f"wrote {out}: {spec.name!r}, {len(spec.nodes)} nodes, {spec.num_params:,} parameters, "
          f"input {spec.input_shape}, output {spec.output_shape}")
    return 0


def _factory(text: str) -> str:
    module, colon, attr = text.partition(":")
    if not (colon and module.strip() and attr.strip()):
        raise argparse.ArgumentTypeError(f"expected package.module:factory, got {text!r}")
    return text


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(t) for t in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W (positive ints, any number of spatial dims), got {text!r}")
    return shape


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of keyword arguments, got {text!r}")
    return value


def _plan_settings(args: argparse.Namespace) -> dict[str, Any]:
    return dict(ipu=args.ipu, ipus=args.ipus, micro_batch=args.micro_batch, replicas=args.replicas,
                grad_accum=args.grad_accum, device_iterations=args.device_iterations, precision=args.precision,
                optimizer=PLAN_OPTIMIZERS[args.optimizer](), recompute=args.recompute, training=not args.inference,
                headroom=args.headroom, efficiency=args.efficiency, framework=args.framework,
                schedule=args.schedule, split=args.split, device_mapping=args.device_mapping,
                available_memory_proportion=args.available_memory_proportion,
                recompute_checkpoints=args.recompute_checkpoints or (), half_partials=args.half_partials)


def cmd_plan(args: argparse.Namespace) -> int:
    """``hal plan``: the plan's table (or JSON) and, when it does not fit, a hint; with ``--split``,
    hal's own split of the same configuration beside it. 0 if the plan fits, 1 if not."""
    from hal.ipu import plan

    spec, _ = _model(args)  # speed and plans do not depend on the weights' values
    p = plan(spec, **_plan_settings(args))
    own = plan(spec, **{**_plan_settings(args), "split": None, "device_mapping": p.device_mapping,
                        "devices": []}) if args.split else None
    if args.json:
        print(json.dumps({**p.to_dict(), "hal_split": own.to_dict() if own else None}, indent=2))
    else:
        print(p.table())
        if own:
            print(_split_line("your split", p) + "\n" + _split_line("hal's split", own))
    if not p.fits and not args.json:
        print(_plan_hint(spec, args))
    return 0 if p.fits else 1


def _split_line(who: str, p: Any) -> str:
    worst = max(p.ipu_memory, key=lambda m: m.memory.total / m.usable_bytes)
    expected = f"; expected {p.expected.samples_per_second:,.0f} samples/s (estimate)" if p.expected else ""
    return (f"{who}: stages end at {', '.join(p.cuts)}; balance {p.balance()[0]:.2f}; tightest IPU {worst.ipu} "
            f"{worst.memory.total / MiB:,.1f}/{worst.usable_bytes / MiB:,.0f} MiB; "
            f"{'fits' if p.fits else 'does not fit'}{expected}")


def _plan_hint(spec: Any, args: argparse.Namespace) -> str:
    """The first of a few standard changes that makes the plan fit, as a command-line hint."""
    from hal.ipu import plan

    base = {**_plan_settings(args), "devices": []}
    pipelined = (args.ipus or 1) > 1 or bool(args.split or args.device_mapping)
    rec = {"recompute": True} if pipelined and not args.inference else {}  # pipeline recomputation only
    half = {"precision": "16.16", **rec}
    tries = [rec, {"precision": "16.16"}, half] + [
        {**half, "micro_batch": m} for m in (args.micro_batch // 2, args.micro_batch // 4) if m >= 1]
    for change in tries:
        if not change or all(base[k] == v for k, v in change.items()):
            continue
        flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in change.items())
        try:
            p = plan(spec, **{**base, **change})
        except HalError:
            continue
        if p.fits:
            worst = max(m.memory.total for m in p.ipu_memory)
            return f"hint: it fits with {flags} (largest IPU {worst / MiB:,.1f} MiB, balance {p.balance()[0]:.2f})."
    return "hint: no standard change fits: try more IPUs per replica (--ipus) or a smaller --micro-batch."


def cmd_train(args: argparse.Namespace) -> int:
    """``hal train conductivity``: 0 if every target trained, 1 if one failed or the results went elsewhere."""
    from hal.training import DataParallel

    if args.hosts > 1 and args.coordinator is None:  # multi-host: say what to run where
        import socket

        from hal.distributed import free_port, host_commands

        coordinator = f"{socket.getfqdn()}:{free_port('')}"
        print(f"Run on each of the {args.hosts} hosts (host 0 at {coordinator.rpartition(':')[0]}, whose port "
              f"{coordinator.rpartition(':')[2]} the others must reach):")
        for i, line in enumerate(host_commands(["hal", *sys.argv[1:]], args.hosts, coordinator)):
            print(f"  host {i}: {line}")
        return 0
    dp = DataParallel(args.replicas, args.hosts, args.sync_batchnorm, args.host_rank, args.coordinator or "")
    _check_writable(args.out, "--out")
    _check_writable(args.cache_dir, "--cache-dir")
    from hal.models.conductivity.train import report_text, run_workload

    progress = Progress(not args.json)
    report, files = run_workload(
        args.compare or [args.target], samples=args.samples, size=args.size, dims=args.dims, kind=args.kind,
        epochs=args.epochs, batch=args.batch, lr=args.lr, width=args.width, transform=args.transform, seed=args.seed,
        steps_per_call=args.steps_per_call, threads=args.threads, cache_dir=args.cache_dir, out=args.out,
        isolate=args.compare is not None, progress=progress, data_parallel=dp)
    progress.done()
    if args.json:
        print(json.dumps({**report, "files": [str(f) for f in files]}, indent=2))
    else:
        print(report_text(report))
        for f in files:
            print(f"wrote {f}")
    if "output_error" in report:
        print(f"hal: warning: {report['output_error']}", file=sys.stderr)
    return 1 if report["failed"] or "output_error" in report else 0


# ---------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="zoo model name (see `hal info`), a spec .json file or a hal weights .safetensors file")
    p.add_argument("--input-size", type=_int(1), help="square input size for zoo models")
    p.add_argument("--num-classes", type=_int(1), help="classes for zoo models")


def _common(p: argparse.ArgumentParser, batch: int) -> None:
    _model_args(p)
    p.add_argument("--targets", type=_targets, help="comma-separated targets (default: every available backend)")
    p.add_argument("--batch", type=_int(1), default=batch)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd: momentum 0.9")
    p.add_argument("--lr", type=_positive_float,
                   help="learning rate (default 1e-3: larger steps make trajectories chaotic)")
    p.add_argument("--grad-accum", type=_int(1), default=1)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    p.add_argument("--seed", type=_int(0), default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def _add_plan(sub: Any) -> None:
    from hal.ipu import FRAMEWORKS, SCHEDULES

    p = sub.add_parser(
        "plan", help="plan a model on Graphcore IPUs (pipeline stages, memory, batch arithmetic)",
        description="Split a model into pipeline stages over IPUs, estimate each IPU's memory and check the "
        "framework's pipeline rules. Exits with status 1 when the plan does not fit.",
    )
    _model_args(p)
    p.add_argument("--ipu", default="bow", help="IPU type: gc2 (Mk1), gc200 (Mk2) or bow (default)")
    p.add_argument("--ipus", type=_int(1), default=None,
                   help="IPUs per replica (default: one per stage; 1 without --split)")
    p.add_argument("--framework", choices=FRAMEWORKS, default="poptorch", help="whose rules apply (default poptorch)")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="pipeline schedule (default: tensorflow grouped, poptorch interleaved)")
    p.add_argument("--split", type=_node_list, default=None,
                   help="comma-separated nodes (names or indices) after which a stage ends; hal's own split is "
                   "shown beside it")
    p.add_argument("--device-mapping", type=_ints, default=None,
                   help="comma-separated IPU of each stage, e.g. 0,0,0,0 (several stages on one IPU)")
    p.add_argument("--micro-batch", type=_int(1), default=1, help="samples per micro-batch (default 1)")
    p.add_argument("--replicas", type=_int(1), default=1, help="data-parallel replicas (default 1)")
    p.add_argument("--grad-accum", type=_int(1), default=None,
                   help="gradient accumulation G (default: the smallest the framework accepts reaching 97%% "
                   "pipeline efficiency; 1 for one stage)")
    p.add_argument("--efficiency", type=float, default=None,
                   help="pick the smallest accepted G reaching this pipeline efficiency (0..1) instead")
    p.add_argument("--device-iterations", type=_int(1), default=None,
                   help="iterations per host call (default 1; inference: the smallest the framework accepts)")
    p.add_argument("--precision", choices=sorted(IPU_PRECISIONS), default="fp32",
                   help="fp32, or Graphcore's <compute>.<master weights> precisions 16.16 and 16.32")
    p.add_argument("--half-partials", action="store_true",
                   help="convolution and matmul partial sums in fp16 (Graphcore's half_partial; default fp32)")
    p.add_argument("--optimizer", choices=sorted(PLAN_OPTIMIZERS), default="sgd")
    p.add_argument("--recompute", action="store_true", help="pipeline recomputation: stash stage inputs only")
    p.add_argument("--recompute-checkpoints", type=_node_list, default=None,
                   help="comma-separated nodes whose outputs are kept, the rest recomputed (one stage)")
    p.add_argument("--available-memory-proportion", type=_fractions, default=None,
                   help="Poplar's availableMemoryProportion, one value or one per IPU (default: the most that "
                   "fits, <= 0.6)")
    p.add_argument("--inference", action="store_true", help="plan inference instead of training")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help=f"fraction of IPU memory kept for code and exchange (default {DEFAULT_HEADROOM})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=cmd_plan)


def _node_list(text: str) -> tuple[str | int, ...]:
    items = tuple(int(t) if t.strip().isdigit() else t.strip() for t in text.split(","))
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated node names or indices, got {text!r}")
    return items


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated IPU numbers, got {text!r}") from None


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None


def _batch_sizes(text: str) -> tuple[int, ...]:
    """Distinct comma-separated batch sizes >= 1."""
    sizes = tuple(map(_int(1), text.split(",")))
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"expected distinct batch sizes, got {text!r}")
    return sizes


def _migrate_args(p: argparse.ArgumentParser) -> None:
    """Options the migration report shares between ``migrate`` and ``compare --report``."""
    p.add_argument("--batches", type=_batch_sizes, default=(1, 4, 16), metavar="B,B,...",
                   help="inference batches to time or estimate; the best is set beside batch-1 latency "
                        "(default 1,4,16)")
    p.add_argument("--ipu", default="bow", choices=("gc2", "gc200", "bow"), help="IPU generation to plan for")
    p.add_argument("--micro-batch", type=_int(1), default=4, help="IPU micro-batch of the plan (default 4)")
    p.add_argument("--ipu-precision", default="16.16", choices=sorted(IPU_PRECISIONS),
                   help="IPU plan precision (default 16.16, Graphcore's ResNet50 setting)")
    p.add_argument("--gpu", default="a100-80gb", help="catalog GPU for GPU estimates (default a100-80gb)")
    p.add_argument("--watts", type=_watts, action="append", metavar="DEVICE=W",
                   help="rated power of a catalog device for energy estimates (e.g. bow=300); repeatable")


def _add_migrate(sub: Any) -> None:
    p = sub.add_parser(
        "migrate", help="one report on moving a model between two targets (coverage, changes, numerics, speed, "
        "energy)",
        description="Coverage, what changes and the effort, parity, performance and energy of MODEL on two "
        "targets: measured where a target runs here, planner estimates (labelled) where not. Writes report.md, "
        "report.json, report.html and PNG plots. Exits 1 if both targets run here and disagree.",
    )
    _model_args(p)
    p.add_argument("--from", dest="source", type=_target, required=True, help="the stack the model runs on now")
    p.add_argument("--to", dest="dest", type=_target, required=True, help="the stack to move it to")
    p.add_argument("--out", default=str(DEFAULT_OUT / "migrate"), help="folder for the report")
    p.add_argument("--batch", type=_int(1), default=8, help="training bench batch (default 8)")
    p.add_argument("--repeats", type=_int(1), default=3)
    p.add_argument("--warmup", type=_int(0), default=1)
    _migrate_args(p)
    p.add_argument("--json", action="store_true", help="print report.json on stdout")
    p.set_defaults(fn=cmd_migrate)


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train a workload's model on a target, or compare targets",
        description="Build (or reload) the workload's dataset, train its CNN, report R² and MAE on the held-out "
        "test split, write a parity plot, loss curves and the weights. Exits 1 if a target failed.",
    )
    p.add_argument("workload", choices=("conductivity",))
    which = p.add_mutually_exclusive_group()
    which.add_argument("--target", type=_target, default="torch:cpu", help="target to train on (default torch:cpu)")
    which.add_argument("--compare", type=_targets,
                       help="comma-separated targets, each trained in its own process from the same weights and "
                       "batches")
    p.add_argument("--samples", type=_int(1), default=2000, help="dataset size (split 80/10/10)")
    p.add_argument("--size", type=_int(1), default=64, help="grid extent per side")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--kind", choices=("grf", "spheres", "mixed"), default="grf", help="microstructure generator")
    p.add_argument("--epochs", type=_int(1), default=30)
    p.add_argument("--batch", type=_int(1), default=32)
    p.add_argument("--lr", type=_positive_float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--width", type=_int(1), default=8, help="channels of the first stage (doubling per stage)")
    p.add_argument("--transform", choices=TRANSFORMS, default="sqrt", help="target transform before standardising")
    p.add_argument("--seed", type=_int(0), default=0, help="dataset, initial weights and batch order")
    p.add_argument("--steps-per-call", type=_int(0), default=0,
                   help="optimizer steps per Executable.run_steps call (default 0: a whole epoch; 1: train_step)")
    p.add_argument("--threads", type=_int(0), default=0,
                   help="intra-op threads for torch/TensorFlow/XLA (default 0: the frameworks' own choice)")
    p.add_argument("--cache-dir", default=str(DEFAULT_TRAIN_CACHE), help="dataset cache folder")
    p.add_argument("--out", default=str(DEFAULT_TRAIN_OUT), help="folder for weights, plots, JSON and Markdown")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    dp = p.add_argument_group("data parallelism (the rules: hal.training)")
    dp.add_argument("--replicas", type=_int(1), default=1, help="replicas on this host (torch: processes)")
    dp.add_argument("--hosts", type=_int(1), default=1,
                    help="hosts; without --coordinator, print the command to run on each host and exit")
    dp.add_argument("--host-rank", type=_int(0), default=0, help="this host's index, 0..hosts-1")
    dp.add_argument("--coordinator", help="ADDRESS:PORT of host 0, the same on every host")
    dp.add_argument("--sync-batchnorm", action="store_true", help="BatchNorm statistics over all replicas")
    p.set_defaults(fn=cmd_train)


def _add_export(sub: Any) -> None:
    from hal.onnx import DEFAULT_OPSET, MIN_OPSET  # hal.onnx imports onnx only when it runs

    p = sub.add_parser(
        "export", help="write a model as ONNX (inference form) with the spec in its metadata",
        description="Write a zoo model or spec file with its weights as an ONNX model that passes onnx.checker; "
        "hal.from_onnx reads it back to the same spec and weights.",
    )
    _model_args(p)
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--weights", help="a hal .safetensors file (default: the seeded init, seed 0)")
    p.add_argument("--opset", type=_int(MIN_OPSET), default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} to the newest the installed onnx knows (default {DEFAULT_OPSET})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--dynamic-batch", action="store_true", help="a symbolic batch dim instead of a fixed one")
    size.add_argument("--batch", type=_int(1), default=1, help="the fixed batch size (default 1)")
    p.set_defaults(fn=cmd_export)


def _add_import(sub: Any) -> None:
    p = sub.add_parser(
        "import", help="import a PyTorch nn.Module (torch.fx) as a hal weights file with the spec inside",
        description="Import package.module (from the current folder or the environment), call its factory with "
        "--kwargs, trace the module with torch.fx and write its spec and weights (its own state_dict names).",
    )
    p.add_argument("factory", type=_factory, help="package.module:factory, a callable returning an nn.Module")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.add_argument("--input-shape", type=_shape, default=(3, 224, 224), help="per-sample C,H,W (default 3,224,224)")
    p.add_argument("--kwargs", type=_json_object, default={}, help="the factory's keyword arguments, a JSON object")
    p.set_defaults(fn=cmd_import)


def parser() -> argparse.ArgumentParser:
    """The ``hal`` argument parser; a wrong use raises :class:`~hal.errors.ConfigError`."""
    ap = _Parser(prog="hal", description="Define a CNN once; run, parity-test and benchmark it anywhere.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="backends, versions, devices, and why a backend is unavailable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("parity", help="compare targets against the float64 reference")
    p.add_argument("--replicas", type=_int(1), default=1,
                   help="N > 1: data-parallel parity instead (N replicas vs one device; SGD and AdamW, --steps each)")
    _common(p, batch=4)
    p.add_argument("--checks", type=_names_in(CHECKS), default=list(CHECKS),
                   help=f"comma-separated: {','.join(CHECKS)} (default: all)")
    p.add_argument("--steps", type=_int(1), help="trajectory length (default 3; 5 with --replicas)")
    p.add_argument("--weights", help="a hal .safetensors file to test with (default: seeded init, see hal.parity)")
    p.add_argument("--option", type=_option, action="append", metavar="NAME=VALUE",
                   help="a backend option (listed by `hal info`) for the targets that declare it, e.g. "
                   "compile=inductor; repeatable")
    p.set_defaults(fn=cmd_parity)

    p = sub.add_parser("bench", help="time targets against the native hand-written model")
    _common(p, batch=16)
    p.add_argument("--repeats", type=_int(1), default=5)
    p.add_argument("--warmup", type=_int(0), default=2)
    p.add_argument("--modes", type=_names_in(MODES), default=list(MODES), help=f"comma-separated: {','.join(MODES)}")
    p.add_argument("--no-native", action="store_true")
    p.add_argument("--options", type=_sweep, action="append", metavar="NAME=VALUE[,VALUE...]",
                   help="sweep a backend option (listed by `hal info`), e.g. xla=true,false; repeatable: "
                   "every combination is timed")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for JSON/Markdown/PNG ('' to skip)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("compare", help="the main job: parity and speed of a model on every available target")
    _common(p, batch=16)
    p.add_argument("--parity-batch", type=_int(2), default=4)
    p.add_argument("--repeats", type=_int(1), default=3)
    p.add_argument("--warmup", type=_int(0), default=1)
    p.add_argument("--report", metavar="DIR",
                   help="write the migration report (as `hal migrate`) for the targets to DIR instead of the table")
    _migrate_args(p)
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("conformance", help="run the backend conformance suite on a target",
                       description="Every op, training path, weights round trip and documented error of a target "
                       "against the float64 reference. Exits 1 if a case failed.")
    p.add_argument("target", type=_target, help="e.g. numpy, torch:cpu, or a plug-in's target")
    p.add_argument("--include", type=_regex, help="run only the cases whose name matches this regular expression")
    p.add_argument("--exclude", type=_regex, help="skip the cases whose name matches this regular expression")
    p.add_argument("--option", type=_option, action="append", metavar="NAME=VALUE",
                   help="compile the target's executables with this backend option, e.g. compile=inductor; repeatable")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(fn=cmd_conformance)

    _add_plan(sub)
    _add_migrate(sub)
    _add_train(sub)
    _add_export(sub)
    _add_import(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hal`` with ``argv`` (default: the command line); returns the exit status."""
    try:
        args = parser().parse_args(argv)
        return int(args.fn(args))
    except HalError as exc:
        print("hal: error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 2
    except MemoryError as exc:  # e.g. a --batch far too large for this machine
        print(f"hal: error: out of memory{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
