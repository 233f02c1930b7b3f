#!/usr/bin/env python3
"""The one-command GPU check (issue 15), run by ``bench/gpu_check.sh`` after it has set hal up.

On a machine with one NVIDIA GPU, within a time budget (default 470 s for the whole command,
set-up included, so that it ends within 8 minutes):

1. **probe**: the GPU (``nvidia-smi``, ``torch.cuda``), driver and CUDA versions, framework
   versions, the TF32 state of a PyTorch process once hal's and the native model are built in
   it, and whether NVML can read the GPU's energy counter (:mod:`hal.energy`);
2. **conformance**: ``hal conformance TARGET --json`` on ``torch:cuda:0`` and ``jax:gpu:0``, and
   ``tensorflow:gpu:0`` where TensorFlow is installed, all at once (small cases; JAX and TensorFlow
   are told not to take the whole GPU's memory). They may use the budget left after the
   benchmarks' estimates, and are stopped at that point;
3. **bench**: ``hal bench resnet50 --batch 256 --json`` once per precision (bf16 and fp16 first:
   the 3,700 img/s target is for mixed precision; then fp32, whose TF32 state the probe states),
   hal against the native PyTorch model in the same processes. Where the torch backend declares
   an option whose name says ``compile`` (``Backend.options()``, detected, not assumed), each of
   its non-default values is timed too, at the ``--compile-precisions``, while budget is left;
4. **summary**: ``summary.md`` and ``summary.json`` from the recorded outputs
   (``--summarize DIR`` rebuilds them from a results folder without running anything).

Every step's stdout (the JSON that ``hal`` prints), its stderr (``logs/``) and ``steps.json``
(what ran, its status and time) are kept in the results folder (default
``bench/results/gpu/``), mirrored to ``$OUT`` when that is set. A step starts only if the
budget left covers its estimate and is stopped when the budget runs out; the summary says which.

Exit status: 0 when every conformance target passed and every benchmark gave hal's figures; 1 on
a parity failure (a failed conformance case, or a conformance target that did not run or finish)
or a benchmark that did not; 2 on a wrong use. The performance targets (:data:`AMP_TARGET`,
:data:`RATIO_TARGET`) are reported met or not met and do not change the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, NoReturn, Sequence

if TYPE_CHECKING:
    from hal.backend import Option

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "bench" / "results" / "gpu"
SCRIPT = "bench/gpu_check.py"

BUDGET_S = 470.0  # the whole command, set-up included: 8 minutes less a margin
SUMMARY_RESERVE_S = 10.0  # kept back for writing the summary
# Planning estimates of one step on an H100/H200-class GPU: guesses, not yet measured on one.
PROBE_ESTIMATE_S, PROBE_TIMEOUT_S = 30.0, 90.0
CONFORMANCE_MIN_S = 60.0
BENCH_ESTIMATE_S = 60.0
COMPILE_ESTIMATE_S = 120.0
AUTOTUNE_ESTIMATE_S = 300.0  # a compile mode that tunes its kernels (torch.compile's max-autotune) compiles longer

AMP_TARGET = 3700.0  # ResNet50 training img/s with mixed precision on one H100/H200-class GPU
RATIO_TARGET = 1.0  # hal throughput / native throughput, same run
AMP_PRECISIONS = ("bf16", "fp16")

PLANNED, OK, FAILED, ERROR, TIMEOUT, SKIPPED = "planned", "ok", "failed", "error", "timeout", "skipped"
CONFORMANCE_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


class UsageError(Exception):
    """A wrong use of this script; the message says what was expected."""


# ---------------------------------------------------------------------------
# arguments and the plan
# ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated names, got {text!r}")
    return names


def _some_of(what: str, choices: Sequence[str]) -> Callable[[str], list[str]]:
    """Comma-separated names among ``choices``."""

    def parse(text: str) -> list[str]:
        names = _names(text)
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(choices)}")
        return names

    return parse


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} > 0, got {text!r}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    """The command line of ``bench/gpu_check.sh`` (and of this script)."""
    from hal.bench import MODES
    from hal.training import PRECISIONS

    precisions = _some_of("precision", PRECISIONS)
    ap = _Parser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the planned commands and exit")
    ap.add_argument("--budget", type=_positive(float), default=BUDGET_S,
                    help=f"seconds for the whole check, set-up included (default {BUDGET_S:.0f})")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default bench/results/gpu)")
    ap.add_argument("--mirror", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="also copy the results here (default: $OUT when set)")
    ap.add_argument("--conformance-targets", type=_names, default=None,
                    help="default torch:cuda:0,jax:gpu:0, and tensorflow:gpu:0 where TensorFlow is installed")
    ap.add_argument("--conformance-include", help="regular expression: only these conformance cases")
    ap.add_argument("--bench-targets", type=_names, default=["torch:cuda:0"])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--input-size", type=_positive(int), help="square input size (default: the model's)")
    ap.add_argument("--batch", type=_positive(int), default=256)
    ap.add_argument("--precisions", type=precisions, default=["bf16", "fp16", "fp32"],
                    help="one bench per precision, in this order (default bf16,fp16,fp32)")
    ap.add_argument("--repeats", type=_positive(int), default=10)
    ap.add_argument("--warmup", type=_positive(int), default=3)
    ap.add_argument("--compile-precisions", type=precisions, default=["bf16"],
                    help="precisions at which a compile option of the torch backend is timed (default bf16)")
    ap.add_argument("--compile-modes", type=_some_of("mode", MODES), default=["training"],
                    help="modes timed with a compile option (default training)")
    ap.add_argument("--summarize", type=Path, metavar="DIR",
                    help="rebuild summary.md/summary.json of a results folder, run nothing")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the probe step's own process
    return ap


@dataclass
class Step:
    """One command of the check and, once run, how it went."""

    name: str
    kind: str  # probe | conformance | bench
    argv: list[str]
    output: str  # the file in the results folder that receives the command's stdout
    estimate_s: float  # the budget it needs to start
    timeout_s: float | None = None  # its own limit, within the budget
    required: bool = True  # False: an extra (skipped for lack of budget without failing) or an optional target
    precision: str | None = None
    target: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    status: str = PLANNED
    rc: int | None = None
    seconds: float = 0.0
    note: str = ""

    @property
    def log(self) -> str:
        return f"logs/{Path(self.output).stem}.log"

    def command(self) -> str:
        """The command as a shell line, environment first."""
        return shlex.join([*(f"{k}={v}" for k, v in self.env.items()), *self.argv])


def _cli_value(value: Any) -> str:
    """An option value as ``hal bench --options`` parses it back (true/false/none, numbers, words)."""
    return str(value).lower() if value is None or isinstance(value, bool) else str(value)


def compile_options(options: Mapping[str, Option]) -> list[tuple[str, Any]]:
    """The (option, value) pairs to time for compilation: every non-default value of each option of
    ``options`` (a backend's ``Backend.options()``) whose name contains ``compile``, where the values
    can be known (a choices list, or a bool)."""
    out = []
    for name, opt in options.items():
        if "compile" not in name.lower():
            continue
        if opt.choices is not None:
            values = [v for v in opt.choices if v != opt.default or type(v) is not type(opt.default)]
        elif isinstance(opt.default, bool):
            values = [not opt.default]
        else:
            continue
        out.extend((name, v) for v in values)
    return out


def tensorflow_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def plan(args: argparse.Namespace, python: str = sys.executable) -> list[Step]:
    """The steps of the check, in order. Imports no framework (the torch backend's options are
    read from its class)."""
    from hal.registry import get_backend

    hal = [python, "-m", "hal.cli"]
    steps = [Step("probe", "probe", [python, SCRIPT, "--probe"], "probe.json", PROBE_ESTIMATE_S,
                  PROBE_TIMEOUT_S, env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})]
    targets = args.conformance_targets
    if targets is None:
        targets = ["torch:cuda:0", "jax:gpu:0"] + (["tensorflow:gpu:0"] if tensorflow_installed() else [])
    for t in targets:
        argv = [*hal, "conformance", t, "--json"]
        if args.conformance_include:
            argv += ["--include", args.conformance_include]
        steps.append(Step(f"conformance {t}", "conformance", argv, f"conformance-{_slug(t)}.json", CONFORMANCE_MIN_S,
                          required=not t.startswith("tensorflow"), target=t, env=dict(CONFORMANCE_ENV)))
    model = [args.model] + (["--input-size", str(args.input_size)] if args.input_size else [])
    common = ["--targets", ",".join(args.bench_targets), "--batch", str(args.batch), "--repeats", str(args.repeats),
              "--warmup", str(args.warmup), "--json", "--out", ""]
    torch_options = get_backend("torch").options() if any(t.startswith("torch") for t in args.bench_targets) else {}
    for p in args.precisions:
        # fp32: hal with TF32 (as the native model runs under torch's cuDNN default) and without (fp32-exact)
        tf32 = ["--options", "tf32=true,false"] if p == "fp32" and "tf32" in torch_options else []
        steps.append(Step(f"bench {p}", "bench", [*hal, "bench", *model, "--precision", p, "--modes",
                                                   "inference,training", *tf32, *common],
                          f"bench-{p}.json", BENCH_ESTIMATE_S, precision=p))
    extras = []
    if torch_options:
        for name, value in compile_options(torch_options):
            estimate = AUTOTUNE_ESTIMATE_S if "autotune" in str(value) else COMPILE_ESTIMATE_S
            for p in args.compile_precisions:
                opt = f"{name}={_cli_value(value)}"
                extras.append(Step(f"bench {p} {opt}", "bench",
                                   [*hal, "bench", *model, "--precision", p, "--modes", ",".join(args.compile_modes),
                                    "--options", opt, *common],
                                   f"bench-{p}-{_slug(opt)}.json", estimate, required=False, precision=p,
                                   options={name: value}))
    return steps + sorted(extras, key=lambda s: s.estimate_s)  # the cheaper first, while budget is left


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------


def run_steps(steps: Sequence[Step], results: Path, deadline: float, say: Callable[[str], None],
              record: Callable[[], None]) -> None:
    """Run ``steps`` (the conformance steps together, the others one at a time) before ``deadline``
    (``time.monotonic()``, less :data:`SUMMARY_RESERVE_S`), calling ``record`` after each group."""
    deadline -= SUMMARY_RESERVE_S
    groups: list[list[Step]] = []
    for step in steps:
        if groups and step.kind == "conformance" and groups[-1][0].kind == "conformance":
            groups[-1].append(step)
        else:
            groups.append([step])
    for i, group in enumerate(groups):
        if group[0].kind == "conformance":  # leave the required benchmarks their estimates
            later = sum(s.estimate_s for g in groups[i + 1:] for s in g if s.required)
            until, need = deadline - later, CONFORMANCE_MIN_S
        else:
            until, need = deadline, group[0].estimate_s
        if group[0].timeout_s is not None:
            until = min(until, time.monotonic() + group[0].timeout_s)
        left = until - time.monotonic()
        if left < need:
            for s in group:
                s.status, s.note = SKIPPED, f"budget: {max(left, 0):.0f} s left for it, it needs about {need:.0f} s"
                say(f"{s.name}: skipped ({s.note})")
        else:
            _run_group(group, results, until, say)
        record()


def _run_group(group: Sequence[Step], results: Path, until: float, say: Callable[[str], None]) -> None:
    """Start the steps of ``group`` together and wait for them until ``until``; stop the rest."""
    (results / "logs").mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple[Step, subprocess.Popen, float]] = {}
    for step in group:
        say(f"{step.name}: {step.command()}")
        with open(results / step.output, "wb") as out, open(results / step.log, "wb") as log:
            try:
                proc = subprocess.Popen(step.argv, stdout=out, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
                                        env={**os.environ, **step.env}, start_new_session=True)
            except OSError as exc:
                step.status, step.note = ERROR, f"cannot start: {exc}"
                continue
        running[proc.pid] = (step, proc, time.monotonic())
    try:
        while running:
            for pid, (step, proc, t0) in list(running.items()):
                if proc.poll() is None and time.monotonic() < until:
                    continue
                if proc.returncode is None:
                    _stop(proc)
                    step.status = TIMEOUT
                    step.note = f"stopped after {time.monotonic() - t0:.0f} s: the budget ran out"
                else:
                    step.rc = proc.returncode
                    step.status = {0: OK, 1: FAILED}.get(proc.returncode, ERROR)
                    if proc.returncode:
                        step.note = _last_line(results / step.log) or f"exit status {proc.returncode}"
                step.seconds = time.monotonic() - t0
                output = results / step.output
                if output.is_file() and output.stat().st_size == 0:  # nothing printed: keep no empty file
                    output.unlink()
                del running[pid]
                say(f"{step.name}: {step.status} in {step.seconds:.0f} s" + (f" ({step.note})" if step.note else ""))
            time.sleep(0.2)
    finally:  # interrupted (Ctrl-C, SIGTERM): the commands run in sessions of their own, stop them too
        for _, proc, _ in running.values():
            _stop(proc)


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Terminate ``proc``'s process group (the command and its workers), then kill it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""


def _clear_previous(results: Path) -> None:
    """Remove what the previous run wrote in ``results`` (the files its ``steps.json`` names)."""
    try:
        previous = json.loads((results / "steps.json").read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for s in previous:
        for name in (s.get("output"), f"logs/{Path(s.get('output') or 'x').stem}.log"):
            if name and (results / name).is_file():
                (results / name).unlink()
    for name in ("steps.json", "summary.json", "summary.md"):
        (results / name).unlink(missing_ok=True)


def write_record(results: Path, steps: Sequence[Step], config: dict[str, Any]) -> None:
    """``steps.json``: the run's settings and every step as it stands."""
    data = {"config": config, "steps": [asdict(s) for s in steps]}
    _write(results / "steps.json", json.dumps(data, indent=2, default=str) + "\n")


def load_steps(results: Path) -> tuple[dict[str, Any], list[Step]]:
    """The settings and steps of the run recorded in ``results/steps.json``."""
    try:
        data = json.loads((results / "steps.json").read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{results} holds no readable steps.json of a gpu_check run: {exc}") from None
    names = {f.name for f in fields(Step)}
    return data["config"], [Step(**{k: v for k, v in s.items() if k in names}) for s in data["steps"]]


# ---------------------------------------------------------------------------
# the probe (its own process: nothing of CUDA stays in the driver)
# ---------------------------------------------------------------------------


def probe() -> dict[str, Any]:
    """What this machine is: GPU, driver, CUDA, frameworks, TF32 state, energy counter, hal commit."""
    from hal.bench import environment

    host = environment([])
    out: dict[str, Any] = {"host": host, "date": host.pop("date")}
    for key, fn in (("gpu", _probe_nvidia_smi), ("torch", _probe_torch), ("jax", _probe_jax),
                    ("tensorflow", _probe_tensorflow), ("energy", _probe_energy), ("hal", _probe_git)):
        try:
            out[key] = fn()
        except Exception as exc:  # noqa: BLE001 - a probe that fails is reported, the others still run
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _probe_nvidia_smi() -> dict[str, Any]:
    query = "name,driver_version,memory.total,power.limit"
    csv = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    gpus = [dict(zip(query.split(","), (c.strip() for c in line.split(",")))) for line in csv.splitlines() if line]
    banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner)
    return {"gpus": gpus, "driver_cuda": cuda.group(1) if cuda else None}


def _tf32_state(torch: Any) -> dict[str, Any]:
    return {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE")}


def _probe_torch() -> dict[str, Any]:
    """Versions, the device, and the TF32 flags before and after hal's and the native model are
    built and stepped on cuda:0 in this process (what ``hal bench`` measures under)."""
    import torch

    info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
                            "tf32_default": _tf32_state(torch)}
    if not torch.cuda.is_available():
        return info
    info["device"] = torch.cuda.get_device_name(0)
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    from hal.bench import load_native
    from hal.models import get
    from hal.parity import make_batch
    from hal.registry import compile
    from hal.training import SGD, TrainConfig
    from hal.weights import init_weights

    spec = get("small_cnn")
    config = TrainConfig(optimizer=SGD(lr=0.01, momentum=0.9))
    x, y = make_batch(spec, 4, config.loss, seed=1)
    compile(spec, "torch:cuda:0", init_weights(spec, 0), config).train_step(x, y)
    native, _ = load_native("torch", spec, "cuda:0")
    if native is not None:
        native.train_step(x, y)
    info["tf32_in_bench"] = _tf32_state(torch)
    return info


def _probe_jax() -> dict[str, Any]:
    import jax

    return {"version": jax.__version__, "devices": [str(d) for d in jax.devices()],
            "default_matmul_precision": jax.config.jax_default_matmul_precision}


def _probe_tensorflow() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tensorflow", "tensorflow-cpu"):
        try:
            return {"installed": True, "version": version(dist), "distribution": dist}
        except PackageNotFoundError:
            continue
    return {"installed": tensorflow_installed()}


def _probe_energy() -> dict[str, Any]:
    from hal.energy import counter_for

    counter, note = counter_for("cuda:0")
    return {"measured": counter is not None, "note": note}


def _probe_git() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "note": "not a git checkout (a copy of the working tree)"}


# ---------------------------------------------------------------------------
# the summary
# ---------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(results: Path) -> dict[str, Any]:
    """The summary of the run recorded in ``results`` (``steps.json`` and the outputs it names)."""
    config, steps = load_steps(results)
    probe_data = next((_load_json(results / s.output) for s in steps if s.kind == "probe" and s.status == OK), None)
    machine = _machine(probe_data)
    conformance = [_conformance_entry(s, _load_json(results / s.output)) for s in steps if s.kind == "conformance"]
    bench, bench_failures = [], []
    for s in (s for s in steps if s.kind == "bench"):
        rows, failure = _bench_rows(s, _load_json(results / s.output))
        bench += rows
        if failure:
            bench_failures.append(failure)
    reasons = [f"parity: {c['target']}: {c['reason']}" for c in conformance if c["status"] not in ("passed", "skipped")]
    reasons += bench_failures
    return {
        "config": config,
        "machine": machine,
        "tf32": _tf32(probe_data),
        "conformance": conformance,
        "bench": bench,
        "targets": _targets(bench, config.get("model"), machine.get("gpu")),
        "energy": _energy(bench, probe_data),
        "steps": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 1), "note": s.note,
                   "command": s.command()} for s in steps],
        "verdict": {"passed": not reasons, "reasons": reasons},
    }


def _conformance_entry(step: Step, data: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"target": step.target, "seconds": round(step.seconds, 1)}
    if step.status in (OK, FAILED) and isinstance(data, dict) and "rows" in data:
        failures = [{k: r.get(k) for k in ("name", "error", "tolerance", "note")}
                    for r in data["rows"] if r.get("status") == "FAIL"]
        entry.update(counts=data.get("counts"), failures=failures,
                     status="passed" if data.get("passed") and not failures else "failed")
        if entry["status"] == "failed":
            names = ", ".join(f["name"] for f in failures[:10]) + (" ..." if len(failures) > 10 else "")
            entry["reason"] = f"{len(failures)} case(s) failed: {names}"
        return entry
    if step.status == ERROR and not step.required:
        entry.update(status="skipped", reason=f"not run here: {step.note}")
    elif step.status == SKIPPED:
        entry.update(status="not run", reason=f"skipped ({step.note})")
    elif step.status == TIMEOUT:
        entry.update(status="not finished", reason=step.note)
    else:
        entry.update(status="not run", reason=step.note or f"no conformance report ({step.status})")
    return entry


def _bench_rows(step: Step, data: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The summary rows of one ``hal bench --json`` output, and why the step failed (None: it did not)."""
    if step.status in (SKIPPED, TIMEOUT) and not step.required:  # an extra the budget did not cover
        return [], None
    if not (step.status in (OK, FAILED) and isinstance(data, dict) and "rows" in data):
        return [], f"{step.name}: {step.status}: {step.note or 'no bench report'}"
    rows, broken = [], []
    for r in data["rows"]:
        h, n = r.get("hal"), r.get("native")
        rows.append({
            "precision": step.precision, "target": r["target"], "options": r.get("options") or {}, "mode": r["mode"],
            "batch": data.get("batch"),
            "hal_samples_per_s": h and h["samples_per_s"], "native_samples_per_s": n and n["samples_per_s"],
            "ratio": r.get("ratio"), "hal_first_call_s": h and h["first_call_s"],
            "hal_joules_per_sample": h and h.get("joules_per_sample"),
            "native_joules_per_sample": n and n.get("joules_per_sample"),
            "energy_note": (h or n or {}).get("energy_note", ""), "note": r.get("note", ""),
        })
        if h is None and "does not train" not in r.get("note", ""):
            broken.append(f"{r['target']} {r['mode']}: {r.get('note', '')}")
    failure = f"{step.name}: {'; '.join(broken)}" if broken else None
    return rows, failure


def _machine(p: Any) -> dict[str, Any]:
    p = p if isinstance(p, dict) else {}
    gpu, torch, jax = p.get("gpu") or {}, p.get("torch") or {}, p.get("jax") or {}
    first = (gpu.get("gpus") or [{}])[0]
    return {
        "gpu": torch.get("device") or first.get("name"), "gpu_count": len(gpu.get("gpus") or []),
        "driver": first.get("driver_version"), "driver_cuda": gpu.get("driver_cuda"),
        "memory": first.get("memory.total"), "power_limit": first.get("power.limit"),
        "torch": torch.get("version"), "torch_cuda": torch.get("cuda"), "cudnn": torch.get("cudnn"),
        "jax": jax.get("version"), "jax_devices": jax.get("devices"),
        "tensorflow": (p.get("tensorflow") or {}).get("version"),
        "host": p.get("host"), "date": p.get("date"), "hal": p.get("hal"),
        "probe_errors": {k: v["error"] for k, v in p.items() if isinstance(v, dict) and "error" in v},
    }


def _tf32(p: Any) -> dict[str, Any]:
    torch = (p or {}).get("torch") or {}
    state = torch.get("tf32_in_bench") or torch.get("tf32_default")
    if not state:
        return {"text": "unknown (the probe did not read PyTorch's TF32 flags)"}
    convs = "on" if state["cudnn.allow_tf32"] else "off"
    mm = "on" if state["cuda.matmul.allow_tf32"] or state["float32_matmul_precision"] != "highest" else "off"
    where = "after hal and the native model were built" if "tf32_in_bench" in torch else "PyTorch defaults"
    text = (f"PyTorch fp32 on CUDA ({where}): cuDNN convolutions TF32 {convs} (torch.backends.cudnn.allow_tf32="
            f"{state['cudnn.allow_tf32']}), matmuls TF32 {mm} (torch.backends.cuda.matmul.allow_tf32="
            f"{state['cuda.matmul.allow_tf32']}, float32_matmul_precision={state['float32_matmul_precision']!r})")
    if state.get("NVIDIA_TF32_OVERRIDE") is not None:
        text += f"; NVIDIA_TF32_OVERRIDE={state['NVIDIA_TF32_OVERRIDE']}"
    return {"text": text, "state": state}


def _targets(bench: Sequence[dict[str, Any]], model: str | None, gpu: str | None) -> dict[str, Any]:
    """The issue's two targets: :data:`AMP_TARGET` (ResNet50 training on torch, bf16 or fp16; None
    where nothing was measured or the model is another) and :data:`RATIO_TARGET` (the lowest hal/native
    ratio of the rows without backend options)."""
    amp = [r for r in bench if model == "resnet50" and r["precision"] in AMP_PRECISIONS and r["mode"] == "training"
           and r["target"].startswith("torch") and r["hal_samples_per_s"] is not None]
    best = max(amp, key=lambda r: r["hal_samples_per_s"], default=None)
    pairs = [r for r in bench if r["ratio"] is not None and not r["options"]]
    lowest = min(pairs, key=lambda r: r["ratio"], default=None)
    return {
        "amp_training": {
            "threshold": AMP_TARGET, "met": None if best is None else best["hal_samples_per_s"] >= AMP_TARGET,
            "best": best and _brief(best),
            "gpu_class_ok": bool(gpu and re.search(r"\bH(100|200)\b", gpu)),
        },
        "hal_vs_native": {"threshold": RATIO_TARGET, "met": None if lowest is None else lowest["ratio"] >= RATIO_TARGET,
                          "lowest": lowest and _brief(lowest), "rows": len(pairs)},
    }


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("precision", "target", "options", "mode", "hal_samples_per_s", "native_samples_per_s",
                              "ratio")}


def _energy(bench: Sequence[dict[str, Any]], p: Any) -> dict[str, Any]:
    measured = [r for r in bench if r["hal_joules_per_sample"] is not None]
    notes = list(dict.fromkeys(r["energy_note"] for r in bench if r["energy_note"]))
    probe_note = ((p or {}).get("energy") or {}).get("note")
    return {"measured": bool(measured), "notes": notes or ([probe_note] if probe_note else [])}


def _f(v: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else f"{format(v, fmt)}{suffix}"


def _label(r: dict[str, Any], precision: bool = True) -> str:
    """``bf16 torch:cuda:0 compile=true``: a bench row's precision, target and options."""
    options = (f"{k}={v}" for k, v in r["options"].items())
    return " ".join([*([r["precision"]] if precision else []), r["target"], *options])


def _met(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**not met**")


def markdown(s: dict[str, Any]) -> str:
    """``summary.md``: the summary as GitHub Markdown."""
    from hal.table import markdown as table

    c, m, t = s["config"], s["machine"], s["targets"]
    host = m.get("host") or {}
    out = [f"# GPU check: {c.get('model')}, batch {c.get('batch')} on {m.get('gpu') or 'no GPU found'}", ""]
    out += ["**Verdict: passed**" if s["verdict"]["passed"] else "**Verdict: FAILED**", ""]
    out += [f"- {r}" for r in s["verdict"]["reasons"]] + ([""] if s["verdict"]["reasons"] else [])
    hal = m.get("hal") or {}
    out += [
        f"- machine: {m.get('gpu') or '-'} (GPUs: {m.get('gpu_count')}, memory {m.get('memory') or '-'}, power limit "
        f"{m.get('power_limit') or '-'}); host {host.get('machine', '-')}, {host.get('cores', '-')} cores; "
        f"{m.get('date') or ''}",
        f"- driver {m.get('driver') or '-'} (CUDA {m.get('driver_cuda') or '-'}); torch {m.get('torch') or '-'} "
        f"(CUDA {m.get('torch_cuda') or '-'}, cuDNN {m.get('cudnn') or '-'}); jax {m.get('jax') or '-'} "
        f"({', '.join(m.get('jax_devices') or []) or '-'}); tensorflow {m.get('tensorflow') or 'not installed'}",
        f"- hal commit {hal.get('commit') or '-'}{' (uncommitted changes)' if hal.get('dirty') else ''}",
        f"- TF32: {s['tf32']['text']}",
        f"- budget {c.get('budget_s', 0):.0f} s; the check took {c.get('elapsed_s', 0):.0f} s",
    ]
    out += [f"- probe error ({k}): {v}" for k, v in (m.get("probe_errors") or {}).items()]
    out += ["", "## Conformance", ""]
    rows = [[e["target"], e["status"], *((e.get("counts") or {}).get(k, "-") for k in ("PASS", "FAIL", "UNSUPPORTED",
            "SKIP")), e["seconds"], e.get("reason", "")] for e in s["conformance"]]
    out += [table(["target", "result", "pass", "fail", "unsupported", "skip", "seconds", "why"], rows), ""]
    failures = [f"- {e['target']} {f['name']}: error {_f(f['error'], '.3g')} > tolerance {_f(f['tolerance'], '.3g')}; "
                f"{f['note']}" for e in s["conformance"] for f in e.get("failures") or ()]
    out += failures + ([""] if failures else [])
    out += [f"## {c.get('model')}, batch {c.get('batch')}: hal against the native model", "",
            "The precision is the one passed to `hal bench --precision` (its JSON does not record it); the note "
            "says what the native model is.", ""]
    rows = [[r["precision"], _label(r, precision=False), r["mode"],
             _f(r["hal_samples_per_s"], ".1f"), _f(r["native_samples_per_s"], ".1f"), _f(r["ratio"], ".2f", "x"),
             _f(r["hal_first_call_s"], ".1f"), _f(r["hal_joules_per_sample"], ".3g"),
             _f(r["native_joules_per_sample"], ".3g"), r["note"]] for r in s["bench"]]
    out += [table(["precision", "target", "mode", "hal img/s", "native img/s", "hal/native", "hal first call s",
                   "hal J/img", "native J/img", "note"], rows), "", "## Targets", ""]
    amp, ratio = t["amp_training"], t["hal_vs_native"]
    best, lowest = amp["best"], ratio["lowest"]
    line = f"- ResNet50 training with mixed precision (AMP) >= {AMP_TARGET:,.0f} img/s on one H100/H200-class GPU: "
    line += _met(amp["met"]) + (f" (best: {best['hal_samples_per_s']:.0f} img/s, {_label(best)})" if best else "")
    if c.get("model") != "resnet50":
        line += f" (the target is for resnet50, this run timed {c.get('model')})"
    elif best and not amp["gpu_class_ok"]:
        line += f"; this GPU ({m.get('gpu') or 'none found'}) is not of that class"
    out.append(line)
    out.append(f"- hal >= {RATIO_TARGET:.1f}x the native model in the same run, every precision and mode: "
               + _met(ratio["met"]) + (f" (lowest: {lowest['ratio']:.2f}x, {_label(lowest)} {lowest['mode']}, "
                                       f"of {ratio['rows']} rows)" if lowest else ""))
    energy = s["energy"]
    out += ["", "## Energy", "", "- " + ("measured (J/img columns above)" if energy["measured"] else "not measured")]
    out += [f"- {n}" for n in energy["notes"]]
    out += ["", "## Steps", ""]
    out += [table(["step", "status", "seconds", "note"], [[x["name"], x["status"], x["seconds"], x["note"]]
                                                          for x in s["steps"]]), ""]
    out += ["Commands:", "", "```"] + [x["command"] for x in s["steps"]] + ["```", ""]
    return "\n".join(out)


def write_summary(results: Path) -> dict[str, Any]:
    """Write ``summary.json`` and ``summary.md`` in ``results``; returns the summary."""
    summary = summarize(results)
    _write(results / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    _write(results / "summary.md", markdown(summary))
    return summary


def _write(path: Path, text: str) -> None:
    """Atomically: an interrupted run leaves the previous file or the new one, never half of one."""
    from hal.weights import atomic_write

    atomic_write(path, text.encode())


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def check_install() -> int:
    """0 when ``import hal`` is this checkout and its backends are registered (entry points)."""
    from importlib.metadata import entry_points

    try:
        import hal
    except ImportError as exc:
        print(f"gpu_check: hal is not importable: {exc}", file=sys.stderr)
        return 1
    where = Path(hal.__file__).resolve().parent
    if where != ROOT / "hal":
        print(f"gpu_check: hal is imported from {where}, not from this checkout ({ROOT})", file=sys.stderr)
        return 1
    if "torch" not in {ep.name for ep in entry_points(group="hal.backends")}:
        print("gpu_check: hal's backends are not registered (install it: pip install -e .)", file=sys.stderr)
        return 1
    return 0


def stage(dest: Path) -> None:
    """Make hal importable without pip, for ``PYTHONPATH=dest``: ``dest`` mirrors the package layout of
    ``pyproject.toml`` (``hal.backends`` is ``backends/``...) with symlinks into this checkout, and a
    ``dist-info`` registers hal's entry points (its backends, the ``hal`` command)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shutil.rmtree(dest, ignore_errors=True)
    for package, source in sorted(project["tool"]["setuptools"]["package-dir"].items()):  # parents first
        folder = dest.joinpath(*package.split("."))
        folder.mkdir(parents=True, exist_ok=True)
        for item in (ROOT / source).iterdir():
            if item.name != "__pycache__" and not (folder / item.name).exists():
                (folder / item.name).symlink_to(item)
    meta = project["project"]
    info = dest / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    groups = {"console_scripts": meta.get("scripts", {}), **meta.get("entry-points", {})}
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in groups.items()))


def _verdict_line(summary: dict[str, Any], results: Path) -> str:
    v = summary["verdict"]
    if v["passed"]:
        return f"GPU CHECK PASSED: summary in {results / 'summary.md'}"
    return "GPU CHECK FAILED:\n" + "\n".join(f"  {r}" for r in v["reasons"]) + f"\nsummary in {results / 'summary.md'}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check (see the module docstring); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--check-install"]:  # gpu_check.sh's set-up, before hal may be importable
        return check_install()
    if len(argv) == 2 and argv[0] == "--stage":
        stage(Path(argv[1]))
        return 0
    try:
        args = parser().parse_args(argv)
        if args.probe:
            print(json.dumps(probe(), indent=2, default=str))
            return 0
        if args.summarize:
            summary = write_summary(args.summarize)
            print(_verdict_line(summary, args.summarize))
            return 0 if summary["verdict"]["passed"] else 1
        return _run(args)
    except UsageError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    started = float(os.environ.get("GPU_CHECK_T0") or time.time())  # gpu_check.sh's start: set-up counts
    deadline = time.monotonic() + args.budget - (time.time() - started)
    steps = plan(args)
    say = _progress(time.monotonic() - (time.time() - started))
    if args.dry_run:
        print(f"gpu_check: budget {args.budget:.0f} s; results in {args.results}"
              + (f", mirrored to {args.mirror}" if args.mirror else ""))
        for s in steps:
            kind = "" if s.required else " (if budget is left)" if s.kind == "bench" else " (optional target)"
            print(f"# {s.name}{kind}, estimate {s.estimate_s:.0f} s, stdout > {s.output}\n{s.command()}")
        return 0
    results = args.results
    results.mkdir(parents=True, exist_ok=True)
    _clear_previous(results)
    config = {"model": args.model, "input_size": args.input_size, "batch": args.batch, "precisions": args.precisions,
              "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget, "elapsed_s": 0.0}

    def record() -> None:
        config["elapsed_s"] = round(time.time() - started, 1)
        write_record(results, steps, config)

    record()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # run the clean-ups
    try:
        run_steps(steps, results, deadline, say, record)
        summary = write_summary(results)
    finally:  # whatever happened, the raw outputs go back with $OUT
        signal.signal(signal.SIGTERM, previous)
        if args.mirror and args.mirror.resolve() != results.resolve():
            shutil.copytree(results, args.mirror, dirs_exist_ok=True)
    print(_verdict_line(summary, results))
    return 0 if summary["verdict"]["passed"] else 1


def _progress(t0: float) -> Callable[[str], None]:
    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


if __name__ == "__main__":
    sys.exit(main())
