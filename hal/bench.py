"""Benchmarks: hal on each target against the native hand-written model on the
same framework, timed side by side in one process.

Per target and mode (inference, training): first-call time (compile + first
step), steady-state samples/s (median over ``repeats`` timed calls after
``warmup`` calls), batch-1 latency (inference) and peak host memory growth of
one call. hal and native calls are *interleaved* (hal, native, hal, native...)
so that drift in machine load hits both alike; the ratio is
``median native time / median hal time`` (>= 1: hal at least as fast).

Native baselines live in the repository's ``bench/`` folder as
``bench/native_<framework>.py`` with ``build(model, num_classes, device)``
returning an object with ``predict(x)`` and ``train_step(x, y)`` (numpy in and
out, like hal), or ``None`` when there is no native twin of that model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from hal.backend import Target
from hal.errors import ConfigError, HalError
from hal.parity import make_batch
from hal.registry import compile, get_backend, resolve
from hal.spec import ModelSpec
from hal.training import SGD, TrainConfig
from hal.weights import init_weights

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
NATIVE_FILES = {"torch": "native_torch.py", "jax": "native_flax.py", "tensorflow": "native_keras.py"}
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

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.median_s


@dataclass
class BenchRow:
    target: str
    mode: str
    hal: Measurement | None = None
    native: Measurement | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """hal throughput over native throughput (median times)."""
        if self.hal is None or self.native is None:
            return None
        return self.native.median_s / self.hal.median_s


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
            r["ratio"] = row.ratio
            for impl in ("hal", "native"):
                m = getattr(row, impl)
                if m is not None:
                    r[impl]["median_s"], r[impl]["samples_per_s"] = m.median_s, m.samples_per_s
        return d

    def _rows(self) -> list[list[str]]:
        out = []
        for r in self.rows:
            h, n = r.hal, r.native
            out.append([
                r.target, r.mode,
                _f(h and h.samples_per_s, ".1f"), _f(n and n.samples_per_s, ".1f"),
                _f(r.ratio, ".2f", "x"),
                _f(h and h.first_call_s, ".2f"), _f(n and n.first_call_s, ".2f"),
                _f(h and h.latency_b1_ms, ".1f"), _f(h and h.peak_mem_mb, ".0f"), _f(n and n.peak_mem_mb, ".0f"), r.note,
            ])
        return out

    HEADER = ["target", "mode", "hal samples/s", "native samples/s", "hal/native",
              "hal first call s", "native first call s", "hal b1 latency ms", "hal peak MB", "native peak MB", "note"]

    def table(self) -> str:
        from hal.table import render

        return f"bench: {self.model}, batch {self.batch}, median of {self.repeats} after {self.warmup} warm-up\n" + render(
            self.HEADER, self._rows()
        )

    def markdown(self) -> str:
        from hal.table import markdown

        env = ", ".join(f"{k}: {v}" for k, v in self.env.items())
        return (
            f"## {self.model}, batch {self.batch}\n\nMedian of {self.repeats} timed calls after {self.warmup} "
            f"warm-up, hal and native interleaved in one process.\n\n{markdown(self.HEADER, self._rows())}\n\n{env}\n"
        )

    def plot(self, path: Path) -> Path | None:
        """Bar chart of samples/s, hal vs native, per target and mode (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        labels = [f"{r.target}\n{r.mode}" for r in self.rows]
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
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """JSON, Markdown and PNG under ``out_dir``; returns the paths written."""
        from hal.weights import atomic_write

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{self.model}-b{self.batch}"
        paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
        atomic_write(paths[0], json.dumps(self.to_dict(), indent=2).encode())
        atomic_write(paths[1], self.markdown().encode())
        png = self.plot(stem.with_suffix(".png"))
        return paths + ([png] if png else [])


def _f(v: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else f"{format(v, fmt)}{suffix}"


def environment(targets: Sequence[str]) -> dict[str, Any]:
    """Versions, threads and machine, recorded with every benchmark."""
    env: dict[str, Any] = {
        "machine": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for var in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "XLA_FLAGS"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    for t in {Target.parse(t).backend for t in targets}:
        a = get_backend(t).availability()
        env[t] = a.version
        if t == "torch" and "torch" in sys.modules:
            env["torch_threads"] = sys.modules["torch"].get_num_threads()
    return env


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
        return None
    base = _rss_mb("VmRSS")
    fn()
    peak = _rss_mb("VmHWM")
    return None if base is None or peak is None else max(peak - base, 0.0)


def _native_path(backend: str) -> Path | None:
    path = BENCH_DIR / NATIVE_FILES.get(backend, "-")
    return path if path.is_file() else None


def load_native(backend: str, model: str, num_classes: int, device: str) -> Any:
    """The native twin from ``bench/native_<framework>.py``, or None."""
    path = _native_path(backend)
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location(f"hal_bench_native_{backend}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclass/flax annotation lookups need the module registered
    spec.loader.exec_module(module)
    return module.build(model, num_classes, device)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
) -> BenchReport:
    """Time ``spec`` on each target (and its native twin); see the module docstring."""
    if repeats < 1 or warmup < 0 or batch < 1:
        raise ConfigError(f"need repeats >= 1, warmup >= 0, batch >= 1; got {repeats}, {warmup}, {batch}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"unknown bench modes {bad}; choose from {MODES}")
    say = progress or (lambda _msg: None)
    config = config or TrainConfig(optimizer=SGD(lr=0.01, momentum=0.9))
    weights = init_weights(spec, 0)
    x, y = make_batch(spec, batch, config.loss, seed=1)
    report = BenchReport(spec.name, batch, repeats, warmup, environment(targets))
    for name in targets:
        try:
            cls, target = resolve(name)
        except HalError as exc:
            report.rows.append(BenchRow(str(name), "-", note=str(exc)))
            continue
        has_native = native and spec.name in _zoo_names() and _native_path(target.backend) is not None
        make_native = (lambda t=target: load_native(t.backend, spec.name, spec.output_shape[0], t.device)) if has_native else None
        for mode in modes:
            if mode == "training" and not cls.capabilities().training:
                report.rows.append(BenchRow(str(target), mode, note=f"{target.backend} does not train"))
                continue
            say(f"{target} {mode}: compiling")
            row = BenchRow(str(target), mode)
            try:
                row.hal, row.native = _measure(spec, target, weights, config, x, y, mode, make_native, repeats, warmup, say)
            except HalError as exc:
                row.note = str(exc)
            if row.native is None and native:
                row.note = row.note or "no native baseline for this model/framework"
            report.rows.append(row)
    return report


def _zoo_names() -> set[str]:
    from hal.models import ZOO

    return set(ZOO)


def _measure(
    spec: ModelSpec, target: Target, weights: dict[str, np.ndarray], config: TrainConfig,
    x: np.ndarray, y: np.ndarray, mode: str, make_native: Callable[[], Any] | None, repeats: int, warmup: int,
    say: Callable[[str], None],
) -> tuple[Measurement, Measurement | None]:
    """Interleaved timings of hal and (if any) its native twin; peak memory is the
    resident-memory growth over building the model and its first call."""
    infer = mode == "inference"
    box: dict[str, Any] = {}

    def hal_first() -> None:
        box["hal"] = exe = compile(spec, target, weights, config)
        exe.predict(x) if infer else exe.train_step(x, y)

    def native_first() -> None:
        box["native"] = nat = make_native()  # type: ignore[misc]
        if nat is not None:
            nat.predict(x) if infer else nat.train_step(x, y)

    fns: dict[str, Callable[[], Any]] = {}
    first: dict[str, float] = {}
    peak: dict[str, float | None] = {}
    for impl, build in (("hal", hal_first), ("native", native_first if make_native else None)):
        if build is None:
            continue
        t0 = time.perf_counter()
        peak[impl] = peak_growth_mb(build)
        first[impl] = time.perf_counter() - t0
        obj = box[impl]
        if obj is not None:
            fns[impl] = (lambda o=obj: o.predict(x)) if infer else (lambda o=obj: o.train_step(x, y))
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        say(f"{target} {mode}: repeat {i + 1}/{repeats}")
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    out = {k: Measurement(k, first[k], times[k], len(x), peak[k]) for k in fns}
    if infer:
        exe, x1 = box["hal"], x[:1]
        exe.predict(x1)
        out["hal"].latency_b1_ms = 1e3 * statistics.median(_timed(lambda: exe.predict(x1)) for _ in range(max(repeats, 5)))
    return out["hal"], out.get("native")
