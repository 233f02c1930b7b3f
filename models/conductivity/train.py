"""Train the conductivity CNN on any target, or on several to compare them: ``hal train conductivity``.

Data and preprocessing
----------------------
* Inputs are the 0/1 phase labels as they are. No standardisation: the first
  convolution has no bias and feeds BatchNorm, which absorbs any affine rescaling
  of the input, and zero padding then reads as the insulating phase.
* Targets: ``y`` (normalised effective conductivity) goes through ``transform``
  (``plain``, ``sqrt`` or ``log``: ``log(y + LOG_OFFSET)``, since a
  non-percolating sample has ``y = 0``) and is standardised with the mean and
  standard deviation of the training split. Predictions are mapped back and
  clipped at 0; R² and MAE are on the original ``y`` scale, on the test split.
  The report's ``training.target_scaler`` holds what the saved weights need to be used.
  ``sqrt`` is the default, for the measurements in
  ``bench/results/conductivity/README.md``.

Training
--------
MSE loss, AdamW (``weight_decay`` decoupled), cosine schedule with a one-epoch
linear warm-up, by optimizer step. Every target is compiled with the same seed,
so it starts from the same initial weights (``hal.init_weights``), and sees the
same batches in the same order: epoch ``e`` visits the training split in the
order ``default_rng([seed, e]).permutation``, dropping the last partial batch so
every step has the same batch shape. By default one ``Executable.run_steps``
call runs an epoch; ``steps_per_call`` splits it, and 1 calls ``train_step`` per
step (the same speed on every CPU backend: jax:cpu's ``run_steps`` is a loop of
its jitted step, see ``bench/results/jax_speed``). After each epoch the validation loss
(the same MSE, BatchNorm in inference mode) is recorded.

Timing: ``train_seconds`` is the wall time of all training calls (compile and
tracing included); ``samples_per_s`` counts epochs after the first only, so it
is the steady rate without the first call's compile. On a busy 2-core machine
``--threads 1`` trained torch:cpu 16x faster than torch's default two threads.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import hal
from hal.backend import Weights
from hal.errors import ConfigError, HalError, UnsupportedError
from hal.models.conductivity.cnn import conductivity_cnn
from hal.models.conductivity.dataset import ConductivityDataset, build_dataset
from hal.registry import resolve
from hal.spec import ModelSpec
from hal.table import markdown, render
from hal.training import AdamW, Cosine, DataParallel, TrainConfig
from hal.weights import atomic_savefig, atomic_write, save_weights
from hal.worker import describe, run_isolated

TRANSFORMS = ("plain", "sqrt", "log")
LOG_OFFSET = 0.01
EVAL_BATCH = 256
DATASET_BYTES = 5  # per voxel: the uint8 phases and the float32 network inputs
WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class TargetScaler:
    """``y -> (transform(y) - mean) / std`` and back (clipped at 0)."""

    transform: str
    mean: float
    std: float

    @classmethod
    def fit(cls, transform: str, y: np.ndarray) -> "TargetScaler":
        """Mean and standard deviation of the transformed training targets."""
        if transform not in TRANSFORMS:
            raise ConfigError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        t = _forward(transform, y)
        return cls(transform, float(t.mean()), float(t.std()) or 1.0)

    def encode(self, y: np.ndarray) -> np.ndarray:
        """Training targets of shape ``(N, 1)``, float32."""
        return ((_forward(self.transform, y) - self.mean) / self.std).astype(np.float32)[:, None]

    def decode(self, out: np.ndarray) -> np.ndarray:
        """Network outputs ``(N, 1)`` to conductivities ``(N,)``."""
        t = np.asarray(out, np.float64).reshape(-1) * self.std + self.mean
        if self.transform == "sqrt":
            y = np.square(np.maximum(t, 0.0))
        elif self.transform == "log":
            y = np.exp(t) - LOG_OFFSET
        else:
            y = t
        return np.maximum(y, 0.0)


def _forward(transform: str, y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, np.float64)
    if transform == "sqrt":
        return np.sqrt(y)
    if transform == "log":
        return np.log(y + LOG_OFFSET)
    return y


@dataclass
class TrainResult:
    """One target's run: curves, test accuracy, timing and final weights."""

    target: str
    train_loss: list[float]  # mean training loss per epoch (standardised target space)
    val_loss: list[float]  # validation loss after each epoch
    y_true: np.ndarray  # test split, original scale
    y_pred: np.ndarray
    r2: float
    mae: float
    train_seconds: float
    first_epoch_seconds: float
    samples_per_s: float
    weights: Weights = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no arrays but the curves)."""
        keep = ("target", "r2", "mae", "train_seconds", "first_epoch_seconds", "samples_per_s",
                "train_loss", "val_loss")
        return {k: v for k, v in asdict(self).items() if k in keep}


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot``."""
    ss_tot = float(np.sum(np.square(y_true - np.mean(y_true))))
    return 1.0 - float(np.sum(np.square(y_true - y_pred))) / ss_tot if ss_tot > 0 else float("nan")


def train_config(lr: float, weight_decay: float, epochs: int, steps_per_epoch: int,
                 data_parallel: DataParallel = DataParallel()) -> TrainConfig:
    """MSE, AdamW, cosine decay to 0 after a one-epoch linear warm-up."""
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch if epochs > 1 else 0
    return TrainConfig(loss="mse", optimizer=AdamW(lr=lr, weight_decay=weight_decay),
                       schedule=Cosine(total_steps=total, warmup_steps=warmup), data_parallel=data_parallel)


def train_conductivity(
    data: ConductivityDataset,
    target: str,
    *,
    spec: ModelSpec | None = None,
    epochs: int = 30,
    batch: int = 32,
    lr: float = 3e-3,
    weight_decay: float = WEIGHT_DECAY,
    transform: str = "sqrt",
    seed: int = 0,
    steps_per_call: int = 0,
    data_parallel: DataParallel = DataParallel(),
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``spec`` (default: :func:`conductivity_cnn` for the data's grid) on ``target``.

    Deterministic batches and initial weights from ``seed``: the same for every target.
    ``steps_per_call`` optimizer steps go to one ``run_steps`` call (0: a whole epoch; 1: ``train_step``).
    With ``data_parallel`` ``batch`` is the global batch; this host trains on its slice of each.
    """
    x, splits = data.x, data.splits
    spec = spec or conductivity_cnn(dims=x.ndim - 2, size=x.shape[2:])
    _check_int("epochs", epochs)
    _check_int("batch", batch)
    _check_int("steps_per_call", steps_per_call, low=0)
    if not (isinstance(lr, numbers.Real) and lr > 0):
        raise ConfigError(f"lr must be a number > 0, got {lr!r}")
    if not all(len(splits[s]) for s in ("val", "test")):
        sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        raise ConfigError(f"the validation and test splits must not be empty ({sizes}): use more samples")
    train_idx = splits["train"]
    steps = len(train_idx) // batch
    if steps < 1:
        raise ConfigError(f"batch {batch} is larger than the training split ({len(train_idx)} samples)")
    chunk = steps_per_call or steps
    scaler = TargetScaler.fit(transform, data.y[train_idx])
    t_all = scaler.encode(data.y)
    if batch % data_parallel.hosts:
        raise ConfigError(f"batch {batch} is not divisible by hosts {data_parallel.hosts}")
    with hal.compile(spec, target, config=train_config(lr, weight_decay, epochs, steps, data_parallel),
                     seed=seed) as exe:  # closing ends data-parallel replica processes
        host = slice(data_parallel.host_rank * batch // data_parallel.hosts,
                     (data_parallel.host_rank + 1) * batch // data_parallel.hosts)
        train_loss, val_loss, seconds = [], [], []
        x_val, t_val = x[splits["val"]], t_all[splits["val"]]
        for epoch in range(epochs):
            order = np.random.default_rng([seed, epoch]).permutation(train_idx)[: steps * batch]
            xs = x[order].reshape(steps, batch, *x.shape[1:])[:, host]
            ys = t_all[order].reshape(steps, batch, 1)[:, host]
            start = time.perf_counter()
            if chunk == 1:
                losses = np.array([exe.train_step(xb, yb) for xb, yb in zip(xs, ys)])
            else:
                losses = np.concatenate([exe.run_steps(xs[i:i + chunk], ys[i:i + chunk])
                                         for i in range(0, steps, chunk)])
            seconds.append(time.perf_counter() - start)
            train_loss.append(float(np.mean(losses)))
            val_loss.append(float(np.mean(np.square(_predict(exe, x_val) - t_val))))
            if not all(map(math.isfinite, (train_loss[-1], val_loss[-1]))):
                raise ConfigError(f"{target}: the loss diverged in epoch {epoch + 1} (lr {lr}): try a smaller --lr")
            if progress:
                progress(f"{target} epoch {epoch + 1}/{epochs}: train {train_loss[-1]:.4f}, val {val_loss[-1]:.4f} "
                         f"({seconds[-1]:.1f} s)")
        test = splits["test"]
        y_true, y_pred = data.y[test], scaler.decode(_predict(exe, x[test]))
        weights = exe.weights()
    later = sum(seconds[1:])
    rate = (epochs - 1) * steps * batch / later if epochs > 1 else steps * batch / seconds[0]
    return TrainResult(
        target=str(exe.target), train_loss=train_loss, val_loss=val_loss, y_true=y_true, y_pred=y_pred,
        r2=r2_score(y_true, y_pred), mae=float(np.mean(np.abs(y_true - y_pred))), train_seconds=sum(seconds),
        first_epoch_seconds=seconds[0], samples_per_s=rate, weights=weights,
    )


def _predict(exe: Any, x: np.ndarray) -> np.ndarray:
    return np.concatenate([exe.predict(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])


def _check_int(name: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------



def parity_plot(results: Sequence[TrainResult], path: Path, title: str) -> Path:
    """Predicted vs true test conductivity, one panel per target."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(results), 4.2))
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    top = max(max(r.y_true.max(), r.y_pred.max()) for r in results) * 1.05
    for ax, r in zip(axes, results):
        ax.plot([0, top], [0, top], color="0.6", lw=1)
        ax.scatter(r.y_true, r.y_pred, s=8, alpha=0.6)
        ax.set(xlim=(0, top), ylim=(0, top), aspect="equal", xlabel="true σ_eff / σ₁", ylabel="predicted",
               title=f"{r.target}: R² {r.r2:.3f}, MAE {r.mae:.4f}")
        ax.title.set_fontsize(9)
    fig.suptitle(title, fontsize=10)
    return atomic_savefig(fig, path)


def loss_plot(results: Sequence[TrainResult], path: Path, title: str) -> Path:
    """Training (solid) and validation (dashed) loss per epoch, all targets on one axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for i, r in enumerate(results):
        epochs = np.arange(1, len(r.train_loss) + 1)
        ax.plot(epochs, r.train_loss, color=f"C{i}", label=f"{r.target} train")
        ax.plot(epochs, r.val_loss, color=f"C{i}", ls="--", marker="o", ms=2.5, label=f"{r.target} val")
    ax.set(yscale="log", xlabel="epoch", ylabel="MSE (standardised target)", title=title)
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    return atomic_savefig(fig, path)


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def run_workload(
    targets: Sequence[str],
    *,
    samples: int,
    size: int,
    dims: int,
    kind: str,
    epochs: int,
    batch: int,
    lr: float,
    width: int,
    transform: str,
    seed: int,
    steps_per_call: int,
    threads: int,
    cache_dir: str | os.PathLike | None,
    out: str | os.PathLike,
    isolate: bool = False,
    progress: Callable[[str], None] | None = None,
    data_parallel: DataParallel = DataParallel(),
) -> tuple[dict[str, Any], list[Path]]:
    """``hal train conductivity``: build (or reload) the dataset, train on each target, write the results.

    Every argument is checked before the dataset is built. A target that fails is listed in the report's
    ``failed`` (with ``isolate``, each target trains in its own worker process, so even a crash is); a
    single target's hal error is raised. Writes to ``out`` the weights of each trained target, then the
    parity and loss plots (when matplotlib is installed) and the Markdown and JSON report. If ``out``
    cannot be written, everything goes to a new temporary folder instead and ``report["output_error"]``
    says where and why. Returns the report and the files written.
    """
    for name, value, low in (("epochs", epochs, 1), ("batch", batch, 1), ("threads", threads, 0),
                             ("steps_per_call", steps_per_call, 0), ("samples", samples, 1)):
        _check_int(name, value, low)
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    if transform not in TRANSFORMS:
        raise ConfigError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    targets = list(targets)
    if not targets:
        raise ConfigError("no target to train on")
    if threads:  # read when each framework loads: before resolve() below, which loads it (workers inherit it)
        _set_threads(threads)
    resolved: dict[str, str] = {}
    for t in targets:  # fail before the dataset is built
        cls, target = resolve(t, data_parallel)  # a framework that fixes its devices at start learns them here
        if not cls.capabilities().training:
            raise UnsupportedError(f"target {t!r} does not train")
        if str(target) in resolved:
            raise ConfigError(f"targets {resolved[str(target)]!r} and {t!r} are the same target, {str(target)!r}")
        resolved[str(target)] = t
    spec = conductivity_cnn(dims=dims, size=size, width=width)
    need, have = samples * math.prod(spec.input_shape) * DATASET_BYTES, _physical_memory()
    if have and need > have:
        raise ConfigError(f"{samples} samples at {size}^{dims} need about {need / 2**30:,.1f} GiB for the dataset "
                          f"alone; this machine has {have / 2**30:,.1f} GiB: use fewer --samples or a smaller --size")
    if importlib.util.find_spec("scipy") is None:
        raise ConfigError("the conductivity dataset's solver needs scipy: pip install 'hal-cnn[science]'")
    say = progress or (lambda _msg: None)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    data = build_dataset(samples, size, dims, seed, kind, cache_dir=cache_dir, progress=progress is not None)
    build_seconds = time.perf_counter() - start

    results: list[TrainResult] = []
    failed: dict[str, str] = {}
    settings = dict(spec=spec, epochs=epochs, batch=batch, lr=lr, transform=transform, seed=seed,
                    steps_per_call=steps_per_call, data_parallel=data_parallel)
    for t in targets:
        try:
            if isolate:  # a framework that crashes or runs out of memory fails its target only
                results.append(run_isolated(train_conductivity, data, t, label=t, progress=progress, **settings))
            else:
                results.append(train_conductivity(data, t, progress=progress, **settings))
        except Exception as exc:  # one broken target must not hide the others' results
            if len(targets) == 1 and isinstance(exc, HalError):
                raise
            failed[t] = describe(exc)
            say(f"{t} failed: {failed[t]}")

    steps = len(data.splits["train"]) // batch
    report = {
        "workload": "conductivity",
        "dataset": {"samples": samples, "size": size, "dims": dims, "kind": kind,
                    "seed": seed, "splits": {k: len(v) for k, v in data.splits.items()},
                    "from_cache": data.from_cache, "seconds": build_seconds,
                    "generation_seconds": data.manifest["generation_seconds"], "rate": data.rate,
                    "zero_fraction": float(np.mean(data.y == 0))},
        "model": {"spec": spec.name, "params": spec.num_params, "width": width},
        "training": {"epochs": epochs, "batch": batch, "steps_per_epoch": steps, "lr": lr,
                     "optimizer": f"AdamW(weight_decay={WEIGHT_DECAY})", "schedule": "Cosine, 1-epoch warm-up",
                     "transform": transform, "loss": "mse", "data_parallel": asdict(data_parallel),
                     "target_scaler": asdict(TargetScaler.fit(transform, data.y[data.splits["train"]]))},
        "env": {"cpus": os.cpu_count(), "threads": threads or "default", "steps_per_call": steps_per_call,
                "load_average_start": load, "load_average_end": os.getloadavg()[0]},
        "results": [r.summary() for r in results],
        "failed": failed,
    }
    stem = f"conductivity{dims}d"
    try:
        files = _write_outputs(Path(out), stem, spec, results, report)
    except OSError as exc:  # trained weights are never lost: they go somewhere that can be written
        fallback = Path(tempfile.mkdtemp(prefix="hal-train-"))
        report["output_error"] = f"could not write to {str(out)!r} ({exc}); wrote to {str(fallback)!r} instead"
        files = _write_outputs(fallback, stem, spec, results, report)
    return report, files


def _write_outputs(out: Path, stem: str, spec: ModelSpec, results: Sequence[TrainResult],
                   report: dict[str, Any]) -> list[Path]:
    """Weights first (the costly part), then plots, Markdown and JSON; returns the paths written."""
    files = [save_weights(out / f"{stem}-{r.target.replace(':', '-')}.safetensors", spec, r.weights)
             for r in results]
    d, t = report["dataset"], report["training"]
    setting = _setting(d["dims"], d["kind"], d["samples"], d["size"], t["transform"])
    if results and importlib.util.find_spec("matplotlib") is None:
        report["plots"] = "not drawn: matplotlib is not installed (pip install 'hal-cnn[plot]')"
    elif results:
        files.append(parity_plot(results, out / f"{stem}-parity.png", f"test split: {setting}"))
        files.append(loss_plot(results, out / f"{stem}-loss.png", f"loss curves: {setting}"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.md", report_markdown(report).encode())
    atomic_write(out / f"{stem}.json", json.dumps(report, indent=2).encode())
    return files + [out / f"{stem}.md", out / f"{stem}.json"]


def report_text(report: dict[str, Any]) -> str:
    """The terminal summary of one run: setting, results table, failed targets."""
    d, m, t, env = report["dataset"], report["model"], report["training"], report["env"]
    src = "cache" if d["from_cache"] else f"built in {d['seconds']:.1f} s, {d['rate']:.1f} samples/s"
    lines = [f"{m['spec']} ({m['params']:,} params), "
             f"{_setting(d['dims'], d['kind'], d['samples'], d['size'], t['transform'])}; dataset {src}; "
             f"{t['epochs']} epochs x {t['steps_per_epoch']} steps of {t['batch']}{_replicas(report)}; "
             f"load average {env['load_average_start']:.1f}",
             render(*report_table(report))]
    lines += [f"{target}: {why}" for target, why in report["failed"].items()]
    lines += [f"plots {report['plots']}"] if "plots" in report else []
    return "\n".join(lines)


def report_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: target | R² | MAE | train time | samples/s."""
    header = ["target", "R²", "MAE", "train time (s)", "samples/s"]
    rows = [[r["target"], f"{r['r2']:.4f}", f"{r['mae']:.4f}", f"{r['train_seconds']:.1f}", f"{r['samples_per_s']:.1f}"]
            for r in report["results"]]
    return header, rows + [[t, "failed", "-", "-", "-"] for t in report["failed"]]


def report_markdown(report: dict[str, Any]) -> str:
    """The report of one ``hal train conductivity`` run as Markdown."""
    d, m, t, env = report["dataset"], report["model"], report["training"], report["env"]
    built = (f"loaded from the cache in {d['seconds']:.1f} s (generated earlier in {d['generation_seconds']:.1f} s, "
             f"{d['rate']:.0f} samples/s)" if d["from_cache"] else
             f"generated in {d['generation_seconds']:.1f} s ({d['rate']:.0f} samples/s)")
    lines = [
        f"# Conductivity CNN: {_setting(d['dims'], d['kind'], d['samples'], d['size'], t['transform'])}",
        markdown(*report_table(report)),
        f"- Dataset: seed {d['seed']}, splits {d['splits']}, {d['zero_fraction']:.1%} non-percolating (y = 0); "
        f"{built}.",
        f"- Model: `{m['spec']}`, width {m['width']}, {m['params']:,} parameters.",
        f"- Training: {t['epochs']} epochs x {t['steps_per_epoch']} steps of {t['batch']}{_replicas(report)}, "
        f"{t['optimizer']}, "
        f"peak lr {t['lr']}, {t['schedule']}, MSE on the standardised {t['transform']} target; "
        f"{_calls(env['steps_per_call'])}.",
        f"- Machine: {env['cpus']} CPUs, threads {env['threads']}, load average {env['load_average_start']:.1f} "
        f"at the start, {env['load_average_end']:.1f} at the end. R² and MAE on the test split, original scale; "
        "train time includes the first call's compile; samples/s excludes the first epoch.",
        *(f"- {target} failed: {why}" for target, why in report["failed"].items()),
    ]
    return "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n"


def _replicas(report: dict[str, Any]) -> str:
    """How a data-parallel run split each global batch, and its rate per replica ("" on one replica)."""
    dp, batch = report["training"]["data_parallel"], report["training"]["batch"]
    world = dp["replicas"] * dp["hosts"]
    if world == 1:
        return ""
    hosts = f" x {dp['hosts']} hosts" if dp["hosts"] > 1 else ""
    sync = ", synchronised BatchNorm" if dp["sync_batchnorm"] else ""
    rates = ", ".join(f"{r['target']} {r['samples_per_s'] / world:.1f}" for r in report["results"])
    return (f" over {dp['replicas']} replicas{hosts} ({batch // world} samples each{sync}"
            + (f"; samples/s per replica: {rates}" if rates else "") + ")")


def _calls(steps_per_call: int) -> str:
    if steps_per_call == 1:
        return "one train_step call per step"
    return f"{steps_per_call or 'an epoch of'} steps per run_steps call"


def _setting(dims: int, kind: str, samples: int, size: int, transform: str) -> str:
    return f"{dims}-d {kind}, {samples} samples at {size}^{dims}, {transform} target"


def _physical_memory() -> int:
    """Bytes of RAM, or 0 where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def _set_threads(n: int) -> None:
    """Intra-op thread counts for frameworks loaded after this call (torch/OpenMP, TensorFlow, XLA CPU).

    XLA:CPU sizes its intra-op pool from ``PJRT_NPROC`` (``DefaultThreadPoolSize``,
    xla/pjrt/utils.cc); it has no ``intra_op_parallelism_threads`` flag."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(n)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(n)
    os.environ["PJRT_NPROC"] = str(n)
