"""Benchmarks: hal on each target against the native hand-written model on the
same framework, timed side by side in one process.

Per target, mode (inference, training) and combination of backend options:
first-call time (compile + first step), steady-state samples/s (median over
``repeats`` timed calls after ``warmup`` calls), the process CPU seconds of each
phase (all threads: on a shared machine wall time swings with other jobs' load,
CPU time measures the work done), batch-1 latency (inference) and peak host
memory growth of the first call (building the model, framework import included,
and its first step), each in a fresh process: hal first in its worker, the native
twin in a worker of its own, since a process's second model reuses memory the
first one freed (ResNet50 training on torch:cpu: 1.7 GB for whichever comes first,
0.9-1.0 GB for the second); without isolation, not measured ("-"). hal and native
calls are *interleaved* (hal, native, hal, native...) so that drift in machine load
hits both alike; the ratio is ``median native time / median hal time`` (>= 1: hal at
least as fast), the CPU ratio the same with CPU seconds. The load average is
recorded at the start and the end of the run.
Energy (:mod:`hal.energy`) is read around each timed call where the device has a
counter (NVML on NVIDIA GPUs, RAPL powercap on Linux CPUs): joules per sample,
else ``n/a`` and the reason.

Each (target, mode, options) runs in its own worker process (:mod:`hal.worker`)
unless ``isolate=False``: frameworks do not share a process or compete for its
threads, and a crash or an out-of-memory is a row with its reason.

Native baselines are the ``hal.native`` package (the repository's
``bench/native/``): per framework, ``build(model, num_classes, device, input_shape, precision)`` returns
an object with ``predict(x)`` and ``train_step(x, y)`` (numpy in and out, like
hal), or raises ``hal.native.NoBaseline`` when there is no native twin of that model.
The twin trains and infers in the config's precision (bf16/fp16 as that framework's
mixed precision), so a ratio compares like with like.
A baseline counts only with the spec's trainable parameter count (another width,
depth or input channel count under a zoo name has none); the row's note names it
and says how it differs from hal's model, or why there is none.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hal.backend import Backend, Target, Weights
from hal.errors import ConfigError, HalError
from hal.native import MODULES as NATIVE_MODULES
from hal.native import NoBaseline
from hal.parity import available_backend, check_common, check_int, check_names, make_batch
from hal.registry import check_options, compile, get_backend, options_per_backend, resolve
from hal.spec import ModelSpec
from hal.training import SGD, TrainConfig
from hal.weights import atomic_savefig, init_weights
from hal.worker import run_inline, run_isolated

MODES = ("inference", "training")


@dataclass
class Measurement:
    """Timings of one implementation (hal or native) in one mode on one target."""

    impl: str
    first_call_s: float
    times_s: list[float]
    batch: int
    peak_mem_mb: float | None = None
    latency_b1_ms: float | None = None
    first_call_cpu_s: float | None = None
    cpu_times_s: list[float] = field(default_factory=list)
    joules: list[float] = field(default_factory=list)  # per timed call, where a counter can be read
    energy_note: str = ""  # the counter read (``joules`` filled) or why energy is not measured (hal.energy)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def median_cpu_s(self) -> float | None:
        return statistics.median(self.cpu_times_s) if self.cpu_times_s else None

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.median_s

    @property
    def joules_per_sample(self) -> float | None:
        """Median measured joules per call over the batch; None where energy is not measured."""
        return statistics.median(self.joules) / self.batch if self.joules else None


@dataclass
class BenchRow:
    target: str
    mode: str
    hal: Measurement | None = None
    native: Measurement | None = None
    note: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The target, with the options this row was timed with (``tensorflow:cpu xla=False``)."""
        return " ".join([self.target, *(f"{k}={v}" for k, v in self.options.items())])

    @property
    def ratio(self) -> float | None:
        """hal throughput over native throughput (median wall times)."""
        if self.hal is None or self.native is None:
            return None
        return self.native.median_s / self.hal.median_s

    @property
    def cpu_ratio(self) -> float | None:
        """Native CPU seconds per call over hal's (medians): the work each side does, whatever the load."""
        h, n = (m and m.median_cpu_s for m in (self.hal, self.native))
        return n / h if h and n is not None else None


@dataclass
class BenchReport:
    model: str
    batch: int
    repeats: int
    warmup: int
    env: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for r, row in zip(d["rows"], self.rows):
            r["ratio"], r["cpu_ratio"] = row.ratio, row.cpu_ratio
            for impl in ("hal", "native"):
                m = getattr(row, impl)
                if m is not None:
                    r[impl]["median_s"], r[impl]["samples_per_s"] = m.median_s, m.samples_per_s
                    r[impl]["median_cpu_s"] = m.median_cpu_s
                    r[impl]["joules_per_sample"] = m.joules_per_sample
        return d

    def _rows(self) -> list[list[str]]:
        out = []
        for r in self.rows:
            h, n = r.hal, r.native
            out.append([
                r.label, r.mode,
                _f(h and h.samples_per_s, ".1f"), _f(n and n.samples_per_s, ".1f"),
                _f(r.ratio, ".2f", "x"), _f(r.cpu_ratio, ".2f", "x"),
                _f(h and h.first_call_s, ".2f"), _f(n and n.first_call_s, ".2f"),
                _f(h and h.latency_b1_ms, ".1f"), _f(h and h.peak_mem_mb, ".0f"), _f(n and n.peak_mem_mb, ".0f"),
                _joules(h), _joules(n), r.note,
            ])
        return out

    def energy_notes(self) -> list[str]:
        """Each distinct account of the energy columns: the counter read, or why they are n/a."""
        notes = (f"energy{'' if m.joules else ' n/a'}: {m.energy_note}"
                 for r in self.rows for m in (r.hal, r.native) if m is not None and m.energy_note)
        return list(dict.fromkeys(notes))

    HEADER = ["target", "mode", "hal samples/s", "native samples/s", "hal/native", "hal/native CPU",
              "hal first call s", "native first call s", "hal b1 latency ms", "hal peak MB", "native peak MB", "hal J/sample", "native J/sample", "note"]

    def table(self) -> str:
        from hal.table import render

        return "\n".join([f"bench: {self.model}, batch {self.batch}, median of {self.repeats} after {self.warmup} warm-up",
                          render(self.HEADER, self._rows()), *self.energy_notes()])

    def markdown(self) -> str:
        from hal.table import markdown

        env = ", ".join(f"{k}: {v}" for k, v in self.env.items())
        return (
            f"## {self.model}, batch {self.batch}\n\nMedian of {self.repeats} timed calls after {self.warmup} "
            f"warm-up, hal and native interleaved in one process.\n\n{markdown(self.HEADER, self._rows())}\n\n"
            + "".join(f"{n}\n\n" for n in self.energy_notes()) + f"{env}\n"
        )

    def plot(self, path: Path) -> Path | None:
        """Bar chart of samples/s, hal vs native, per target and mode (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        labels = [f"{r.label}\n{r.mode}" for r in self.rows]
        hal = [r.hal.samples_per_s if r.hal else 0.0 for r in self.rows]
        nat = [r.native.samples_per_s if r.native else 0.0 for r in self.rows]
        xs = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
        ax.bar(xs - 0.2, hal, 0.4, label="hal")
        ax.bar(xs + 0.2, nat, 0.4, label="native")
        for x, r in zip(xs, self.rows):
            if r.ratio is not None:
                ax.annotate(f"{r.ratio:.2f}x", (x, max(hal[x], nat[x])), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_ylabel("samples/s (median)")
        ax.set_title(f"{self.model}, batch {self.batch} — {self.env.get('machine', '')}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        atomic_savefig(fig, path)
        plt.close(fig)
        return path

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """JSON, Markdown and PNG under ``out_dir``; returns the paths written."""
        from hal.weights import atomic_write

        out = check_writable(out_dir)
        stem = out / f"{self.model}-b{self.batch}"
        paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
        atomic_write(paths[0], json.dumps(self.to_dict(), indent=2).encode())
        atomic_write(paths[1], self.markdown().encode())
        png = self.plot(stem.with_suffix(".png"))
        return paths + ([png] if png else [])


def check_writable(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path, created if needed, after checking files can be written in it;
    raises :class:`~hal.errors.ConfigError` otherwise (call it before long work)."""
    try:
        out = Path(out_dir)
    except TypeError as exc:
        raise ConfigError(f"output folder must be a path, got {type(out_dir).__name__}") from exc
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"cannot write results under {str(out)!r}: {str(blocker)!r} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".hal-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write results under {str(out)!r}: {exc.strerror or exc}") from exc
    return out


def _f(v: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else f"{format(v, fmt)}{suffix}"


def _joules(m: Measurement | None) -> str:
    """A J/sample cell: the measured figure, ``n/a`` (the reason is in :meth:`BenchReport.energy_notes`) or ``-``."""
    if m is None:
        return "-"
    return "n/a" if m.joules_per_sample is None else f"{m.joules_per_sample:.3g}"


def environment(targets: Sequence[Target]) -> dict[str, Any]:
    """Versions, machine and load, recorded with every benchmark; imports no framework
    (each worker adds its framework's thread settings)."""
    env: dict[str, Any] = {
        "machine": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_avg_start": _load_average(),
    }
    for var in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "XLA_FLAGS"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    for backend in dict.fromkeys(t.backend for t in targets):
        try:
            env[backend] = get_backend(backend).availability().version
        except HalError:  # an unknown backend is reported in its row
            continue
    return env


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _threads(backend: str) -> dict[str, Any]:
    """The thread settings of the framework loaded in this process."""
    if backend in ("torch", "poptorch") and "torch" in sys.modules:
        return {"torch_threads": sys.modules["torch"].get_num_threads()}
    if backend == "tensorflow" and "tensorflow" in sys.modules:
        threading = sys.modules["tensorflow"].config.threading
        return {"tf_intra_op_threads": threading.get_intra_op_parallelism_threads() or "auto",
                "tf_inter_op_threads": threading.get_inter_op_parallelism_threads() or "auto"}
    return {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_mb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_growth_mb(fn: Callable[[], Any]) -> float | None:
    """Peak resident-memory growth of the process during ``fn()`` (Linux; None elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        fn()
        return None
    base = _rss_mb("VmRSS")
    fn()
    peak = _rss_mb("VmHWM")
    return None if base is None or peak is None else max(peak - base, 0.0)


NO_BASELINE = "no native baseline"


def load_native(backend: str, spec: ModelSpec, device: str, precision: str = "fp32") -> tuple[Any | None, str]:
    """The native twin of zoo model ``spec`` on ``backend`` in ``precision`` from :mod:`hal.native`
    (imports its framework), or None, and the bench row's note: what the twin is and how it
    differs from hal's model, or why there is none."""
    module = NATIVE_MODULES.get(backend)
    if module is None:
        return None, f"{NO_BASELINE} for {backend}"
    try:
        native = importlib.import_module(module).build(
            spec.name, spec.output_shape[0], device, spec.input_shape, precision
        )
    except NoBaseline as exc:
        return None, f"{NO_BASELINE}: {exc}"
    if native.num_params != spec.num_params:
        return None, (f"{NO_BASELINE}: {native.note} has {native.num_params} trainable parameters, this "
                      f"{spec.name} {spec.num_params} (another width, depth or input channel count)")
    return native, f"native: {native.note}"


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def run_bench(
    spec: ModelSpec,
    targets: Sequence[str],
    batch: int = 16,
    repeats: int = 5,
    warmup: int = 2,
    modes: Sequence[str] = MODES,
    native: bool = True,
    config: TrainConfig | None = None,
    progress: Callable[[str], None] | None = None,
    options: Mapping[str, Sequence[Any]] | None = None,
    isolate: bool = True,
    memory: bool = True,
) -> BenchReport:
    """Time ``spec`` on each target (and its native twin); see the module docstring.

    ``options`` sweeps backend options: ``{"xla": [True, False]}`` gives one row per
    combination of values on each target whose backend declares those options
    (``Backend.options()``), labelled with them; a name no target declares, or a
    value a backend refuses, raises :class:`~hal.errors.ConfigError` before any work.
    A target that fails or crashes is a row with the reason; bad arguments raise.
    ``memory=False`` skips the first calls' peak memory (and the native twin's extra worker).
    """
    check_common("bench", spec, config)
    check_int("bench", "batch", batch, 1)
    check_int("bench", "repeats", repeats, 1)
    check_int("bench", "warmup", warmup, 0)
    targets, modes = check_names("bench", "targets", targets), check_names("bench", "modes", modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"bench: unknown modes {bad}; choose from {MODES}")
    say = progress or (lambda _msg: None)
    run = run_isolated if isolate else run_inline
    config = config or TrainConfig(optimizer=SGD(lr=0.01, momentum=0.9))
    weights = init_weights(spec, 0)
    x, y = make_batch(spec, batch, config.loss, seed=1)
    parsed: list[tuple[str, Target | None, type[Backend] | HalError]] = []
    for name in targets:
        try:
            target, cls = available_backend(name)
            parsed.append((name, target, cls))
        except HalError as exc:
            parsed.append((name, None, exc))
    sweeps = _sweeps(options, [cls for _, _, cls in parsed if not isinstance(cls, HalError)])
    report = BenchReport(spec.name, batch, repeats, warmup, environment([t for _, t, _ in parsed if t is not None]))
    twin = native and spec.name in _zoo_names()
    for name, target, cls in parsed:
        if isinstance(cls, HalError):
            report.rows.append(BenchRow(str(name), "-", note=str(cls)))
            continue
        rows = [BenchRow(str(target), mode, options=opts) for opts in sweeps[cls.name] for mode in modes]
        resolved = str(target)
        for row in rows:
            if row.mode == "training" and not cls.capabilities().training:
                row.note = f"{target.backend} does not train"
                continue
            say(f"{row.label} {row.mode}" + (" (in a worker process)" if isolate else ""))
            try:
                resolved, row.hal, row.native, native_note, threads = run(
                    _measure, spec, str(target), weights, config, row.options, x, y, row.mode,
                    twin and target.backend in NATIVE_MODULES, repeats, warmup, memory and isolate,
                    label=row.label, progress=say,
                )
                if row.native is not None and memory and isolate:
                    say(f"{row.label} {row.mode}: native first call's memory (in a worker process)")
                    row.native.peak_mem_mb = run(_native_first_call_peak, spec, str(target), config, x, y, row.mode,
                                                 label=row.label)
            except HalError as exc:
                row.note = str(exc)
                continue
            report.env.update(threads)
            if native:
                row.note = native_note or f"{NO_BASELINE} for this model/framework"
        for row in rows:  # one name per target, device filled in (``torch`` -> ``torch:cpu``)
            row.target = resolved
        report.rows.extend(rows)
    report.env["load_avg_end"] = _load_average()
    return report


def _sweeps(options: Mapping[str, Sequence[Any]] | None, backends: Sequence[type[Backend]]) -> dict[str, list[dict[str, Any]]]:
    """Per backend name, the option combinations to time (``[{}]``: the defaults only), each
    checked against the backend's declared options."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"bench: options must map an option name to a list of values, got {type(options).__name__}")
    for k, values in options.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"bench: option {k!r} needs a non-empty list of values to sweep, got {values!r}")
    per_backend = options_per_backend("bench", backends, list(options))
    out = {}
    for cls in backends:
        names = per_backend[cls.name]
        combos = [dict(zip(names, values)) for values in itertools.product(*(options[k] for k in names))]
        for combo in combos:
            check_options(cls, combo)
        out[cls.name] = combos
    return out


def _zoo_names() -> set[str]:
    from hal.models import ZOO

    return set(ZOO)


def _measure(
    spec: ModelSpec, target: str, weights: Weights, config: TrainConfig, options: dict[str, Any], x: np.ndarray,
    y: np.ndarray, mode: str, native: bool, repeats: int, warmup: int, memory: bool,
    progress: Callable[[str], None] | None = None,
) -> tuple[str, Measurement, Measurement | None, str, dict[str, Any]]:
    """Interleaved timings of hal and (with ``native``) its native twin, run in a worker:
    ``(resolved target, hal, native or None, the native's note, framework thread settings)``.
    With ``memory`` (in a fresh worker process), hal's peak memory: the resident-memory growth over building
    the model and its first call, measured first; the native's is :func:`_native_first_call_peak`'s."""
    from hal.energy import counter_for

    say = progress or (lambda _msg: None)
    _, resolved = resolve(target)
    infer = mode == "inference"
    counter, energy_note = counter_for(resolved.device)
    box: dict[str, Any] = {"note": ""}

    def hal_first() -> None:
        box["hal"] = exe = compile(spec, resolved, weights, config, options=options)
        exe.predict(x) if infer else exe.train_step(x, y)

    def native_first() -> None:
        box["native"], box["note"] = _native_first_call(spec, resolved, config.precision, x, y, infer)

    fns: dict[str, Callable[[], Any]] = {}
    first: dict[str, tuple[float, float]] = {}
    peak: dict[str, float | None] = {}
    for impl, build in (("hal", hal_first), ("native", native_first if native else None)):
        if build is None:
            continue
        say(f"{resolved} {mode}: {impl} first call")
        t0, c0 = time.perf_counter(), time.process_time()
        peak[impl] = peak_growth_mb(build) if memory and impl == "hal" else build()
        first[impl] = (time.perf_counter() - t0, time.process_time() - c0)
        obj = box[impl]
        if obj is not None:
            fns[impl] = (lambda o=obj: o.predict(x)) if infer else (lambda o=obj: o.train_step(x, y))
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    joules: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        say(f"{resolved} {mode}: repeat {i + 1}/{repeats}")
        for k, fn in fns.items():
            e0 = counter.joules() if counter else 0.0
            times[k].append(_timed(fn))
            if counter:
                joules[k].append(counter.joules() - e0)
    out = {
        k: Measurement(k, first[k][0], [t[0] for t in times[k]], len(x), peak_mem_mb=peak[k],
                       first_call_cpu_s=first[k][1], cpu_times_s=[t[1] for t in times[k]], joules=joules[k],
                       energy_note=energy_note)
        for k in fns
    }
    if infer:
        exe, x1 = box["hal"], x[:1]
        exe.predict(x1)
        out["hal"].latency_b1_ms = 1e3 * statistics.median(_timed(lambda: exe.predict(x1))[0] for _ in range(max(repeats, 5)))
    return str(resolved), out["hal"], out.get("native"), box["note"], _threads(resolved.backend)


def _native_first_call_peak(spec: ModelSpec, target: str, config: TrainConfig, x: np.ndarray, y: np.ndarray,
                            mode: str) -> float | None:
    """The native twin's peak resident-memory growth over building it and its first call, measured as
    :func:`_measure` measures hal's: first thing in a fresh worker process (framework import included)."""
    _, resolved = resolve(target)
    return peak_growth_mb(lambda: _native_first_call(spec, resolved, config.precision, x, y, mode == "inference"))


def _native_first_call(spec: ModelSpec, resolved: Target, precision: str, x: np.ndarray, y: np.ndarray,
                       infer: bool) -> tuple[Any | None, str]:
    """:func:`load_native`'s twin and note, after the twin's first call (``predict`` or ``train_step``)."""
    nat, note = load_native(resolved.backend, spec, resolved.device, precision)
    if nat is not None:
        nat.predict(x) if infer else nat.train_step(x, y)
    return nat, note
