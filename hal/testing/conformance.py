"""The conformance suite: one set of cases that proves a backend against the reference.

Modelled on ONNX's backend test runner (cases named by what they test, selected
with ``include``/``exclude`` regular expressions) and Keras 3's one-suite-many-
backends tests. Every in-tree backend runs it; a plug-in runs the same suite::

    import pytest
    from hal.testing.conformance import check_case, conformance_cases

    @pytest.mark.parametrize("case", conformance_cases("mybackend:cpu"), ids=str)
    def test_conformance(case):
        check_case("mybackend:cpu", case)

or, as a report: ``hal.testing.run_conformance("mybackend:cpu").table()``.

Groups of cases (a case name is ``group/what``):

``op/``         each op alone in a tiny spec (1/2/3-d, asymmetric and edge paddings,
                strides, dilations, groups, odd sizes, batch 1): the inference
                forward, and for BatchNorm, Dropout and StochasticDepth also the
                training-mode forward, against the float64 numpy reference; for the
                random ops at p > 0 the training-mode rule, not values (see hal.spec)
``grad/``       the same ops behind a BatchNorm: ``loss_and_grads`` (MSE) against
                float64 autodiff, so each op's backward is checked on its own
``loss/``       ``loss_and_grads`` of a small MLP, cross-entropy and MSE
``train/``      3-step trajectories: SGD (plain, momentum, Nesterov, weight decay),
                Adam, AdamW, the StepDecay and Cosine schedules (every other case
                uses Constant), gradient accumulation with and without BatchNorm
``precision/``  forward, gradients and a trajectory in fp64 and in mixed bf16 and fp16
                (floors measured in that precision, see below)
``state/``      ``predict``/``loss_and_grads`` change nothing, bit-exact weights
                round trip, ``run_steps`` equals repeated ``train_step``, unchecked
                non-finite steps are applied
``error/``      every documented bad input raises its hal error; failed loads and
                non-finite steps leave the executable as it was
``import/``     loading the backend class imports no framework

Training cases avoid convolutions (the MLP is Flatten, Dense, BatchNorm, tanh),
so a wrong op fails the ``op/`` and ``grad/`` cases named after it, and nothing else.

Tolerances are those of :mod:`hal.parity`: ``FACTOR`` times the float32 floor
measured on the same case (forward: float32 numpy against float64 numpy;
gradients and trajectories: plain float32 PyTorch autodiff against float64),
scaled by unit roundoff for other precisions; mixed precision's floors are measured in
it (:func:`hal.parity.mixed_forward`; plain PyTorch autodiff under ``torch.autocast``). The float64 autodiff reference is
``torch:cpu``; without torch those cases are SKIP, never PASS.

What a backend declares it cannot do (``capabilities()``, ``unsupported()``), or
refuses at run time with :class:`~hal.errors.UnsupportedError`, is reported
UNSUPPORTED with the reason, never PASS; a report passes when no case FAILs,
so an inference-only backend can pass.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hal.backend import Backend, Executable, Target, Weights
from hal.errors import (
    ConfigError,
    HalError,
    InputError,
    NonFiniteError,
    TargetError,
    UnsupportedError,
    WeightsError,
)
from hal.parity import (
    FLOOR_NAMES,
    ILL_CONDITIONED,
    REFERENCE_AUTODIFF,
    UNIT_ROUNDOFF,
    floor_precision,
    grads_error,
    mixed_forward,
    trajectory_error,
    make_batch,
    normalised_error,
    tolerance,
)
from hal.registry import compile, get_backend, resolve
from hal.spec import ModelSpec, SpecBuilder
from hal.table import render
from hal.training import SGD, Adam, AdamW, Cosine, StepDecay, TrainConfig

PASS, FAIL, UNSUPPORTED, SKIP = "PASS", "FAIL", "UNSUPPORTED", "SKIP"
FRAMEWORKS = ("torch", "jax", "tensorflow", "flax", "optax", "keras", "poptorch", "onnxruntime")
BATCH = 4  # training and gradient cases
STEPS = 3  # trajectory length

Patterns = str | Sequence[str] | None


# ---------------------------------------------------------------------------
# cases and results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One conformance case: ``check(session, case)`` raises on failure or returns
    the measured error and its tolerance. ``spec`` and ``config`` say what the
    backend must support for the case to apply; ``training`` that it must train."""

    name: str
    check: Callable[["_Session", "Case"], "_Measured"] = field(repr=False, compare=False)
    spec: ModelSpec | None = None
    config: TrainConfig = field(default_factory=TrainConfig)
    training: bool = False
    doc: str = ""

    @property
    def group(self) -> str:
        return self.name.partition("/")[0]

    @property
    def ops(self) -> frozenset[str]:
        """Op kinds of the case's spec."""
        return frozenset(n.op.kind for n in self.spec.nodes) if self.spec is not None else frozenset()

    def __str__(self) -> str:
        return self.name


@dataclass
class CaseResult:
    """One row of a report. ``error`` and ``tolerance`` are normalised max errors
    (see :func:`hal.parity.normalised_error`); None for exact checks."""

    name: str
    group: str
    status: str
    error: float | None = None
    tolerance: float | None = None
    note: str = ""
    seconds: float = 0.0


@dataclass
class ConformanceReport:
    """The rows of one target's run."""

    target: str
    rows: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """No case failed (UNSUPPORTED and SKIP rows do not fail a report)."""
        return all(r.status != FAIL for r in self.rows)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.rows) for s in (PASS, FAIL, UNSUPPORTED, SKIP)}

    def table(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        head = f"conformance of {self.target}: {counts or 'no cases'} ({self.seconds:.1f} s)"
        rows = [[r.name, r.status, _sci(r.error), _sci(r.tolerance), f"{r.seconds:.2f}", r.note] for r in self.rows]
        return head + "\n" + render(["case", "result", "error", "tolerance", "seconds", "note"], rows, "llrrrl")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "passed": self.passed, "counts": self.counts(), "seconds": self.seconds,
            "rows": [asdict(r) for r in self.rows],
        }


@dataclass(frozen=True)
class _Measured:
    error: float | None = None
    tol: float | None = None
    note: str = ""


class _Failed(Exception):
    """An exact check did not hold."""


class _Skipped(Exception):
    """The case cannot be decided here (no reference, ill-conditioned)."""


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------


class _Session:
    """A resolved target, the backend options its executables are compiled with, and the executables its
    read-only cases share."""

    def __init__(self, target: str, options: Mapping[str, Any] | None = None) -> None:
        self.backend, t = resolve(target)
        self.target = str(t)
        self.options = dict(options or {})
        self._shared: dict[tuple[str, TrainConfig], Executable] = {}

    def compile(self, spec: ModelSpec, weights: Weights, config: TrainConfig) -> Executable:
        return compile(spec, self.target, weights, config, options=self.options)

    def shared(self, spec: ModelSpec, config: TrainConfig) -> Executable:
        """One executable per (spec, config) for cases that only feed it bad inputs."""
        key = (spec.hash, config)
        if key not in self._shared:
            self._shared[key] = self.compile(spec, _weights(spec), config)
        return self._shared[key]


def _declared_unsupported(backend: type[Backend], case: Case) -> str:
    caps = backend.capabilities()
    if case.training and not caps.training:
        return f"{backend.name} is inference-only (capabilities().training is False)"
    if case.config.precision not in caps.precisions:
        reason = backend.unsupported(case.spec, case.config).get("config") if case.spec is not None else None
        return reason or f"{backend.name} declares precisions {caps.precisions}, not {case.config.precision}"
    if case.spec is None:
        return ""
    missing = sorted(case.ops - caps.ops)
    if missing:
        return f"{backend.name} declares no {', '.join(missing)} op"
    return "; ".join(f"{k}: {v}" for k, v in backend.unsupported(case.spec, case.config).items())


def _run_case(session: _Session, case: Case) -> CaseResult:
    t0 = time.perf_counter()
    row = CaseResult(case.name, case.group, PASS)
    try:
        reason = _declared_unsupported(session.backend, case)
        if reason:
            row.status, row.note = UNSUPPORTED, reason
        else:
            m = case.check(session, case)
            row.error, row.tolerance, row.note = m.error, m.tol, m.note
            if m.error is not None and not m.error <= m.tol:  # a NaN error fails
                row.status = FAIL
    except UnsupportedError as exc:
        row.status, row.note = UNSUPPORTED, f"refused at run time: {exc}"
    except _Skipped as exc:
        row.status, row.note = SKIP, str(exc)
    except (_Failed, HalError) as exc:
        row.status, row.note = FAIL, str(exc)
    except Exception as exc:  # a backend raising anything but a hal error fails the case
        row.status, row.note = FAIL, f"{type(exc).__name__}: {exc}"
    row.seconds = time.perf_counter() - t0
    return row


def _compile_patterns(patterns: Patterns, what: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    out = []
    for p in items:
        try:
            out.append(re.compile(p))
        except (re.error, TypeError) as exc:
            raise ConfigError(f"conformance {what}: {p!r} is not a regular expression: {exc}") from None
    return out


def conformance_cases(target: str, include: Patterns = None, exclude: Patterns = None) -> list[Case]:
    """The cases for ``target``, in run order: those whose name matches (``re.search``)
    any ``include`` pattern (all when None) and no ``exclude`` pattern.

    Imports no framework (only the backend's module, for its options), so a
    plug-in's test file can call it at collection time even where the backend is
    not available."""
    backend = get_backend(Target.parse(target).backend)
    inc, exc = _compile_patterns(include, "include"), _compile_patterns(exclude, "exclude")
    return [
        c for c in (*_static_cases(), *_option_cases(backend))
        if (not inc or any(p.search(c.name) for p in inc)) and not any(p.search(c.name) for p in exc)
    ]


def run_conformance(
    target: str,
    include: Patterns = None,
    exclude: Patterns = None,
    progress: Callable[[str], None] | None = None,
    options: Mapping[str, Any] | None = None,
) -> ConformanceReport:
    """Run the suite on ``target`` (see the module docstring), its executables compiled with the backend
    ``options`` (``hal.compile``'s). A target that is not available here raises its hal error; a failing
    case never raises: it is a row."""
    cases = conformance_cases(target, include, exclude)
    session = _Session(target, options)
    report = ConformanceReport(session.target)
    t0 = time.perf_counter()
    for case in cases:
        if progress:
            progress(case.name)
        report.rows.append(_run_case(session, case))
    report.seconds = time.perf_counter() - t0
    return report


_SESSIONS: dict[tuple[str, str], _Session] = {}


def check_case(target: str, case: Case, options: Mapping[str, Any] | None = None) -> CaseResult:
    """Run one case under pytest, compiled with the backend ``options``: a FAIL raises ``AssertionError``,
    UNSUPPORTED and SKIP call ``pytest.skip`` with the reason. Cases of one target and options share a session."""
    key = (target, repr(sorted((options or {}).items())))
    if key not in _SESSIONS:
        _SESSIONS[key] = _Session(target, options)
    row = _run_case(_SESSIONS[key], case)
    if row.status == FAIL:
        measured = f" (error {row.error:.2e} > tolerance {row.tolerance:.2e})" if row.error is not None else ""
        raise AssertionError(f"{case.name} on {target}{measured}: {row.note}")
    if row.status in (UNSUPPORTED, SKIP):
        import pytest

        pytest.skip(f"{row.status}: {row.note}")
    return row


# ---------------------------------------------------------------------------
# references and data
# ---------------------------------------------------------------------------


def _weights(spec: ModelSpec, seed: int = 0) -> Weights:
    """float32 weights in which every value matters: random parameters, BatchNorm
    statistics away from 0 and 1 (running_var positive)."""
    r = np.random.default_rng(seed)
    out = {}
    for k, shape in spec.param_shapes().items():
        if k.endswith(("running_var", ".weight")) and len(shape) == 1:  # variance and BatchNorm gamma
            a = r.uniform(0.5, 1.5, shape)
        elif k.endswith(("running_mean", ".bias")):
            a = r.normal(0.0, 0.2, shape)
        else:
            a = r.normal(0.0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)
        out[k] = a.astype(np.float32)
    return out


def _reference_forward(spec: ModelSpec, w: Weights, x: np.ndarray, training: bool, precision: str) -> np.ndarray:
    from hal.backends.numpy import NumpyExecutable

    return NumpyExecutable(spec, w, TrainConfig(precision=precision)).predict(x, training)


def _autodiff(spec: ModelSpec, w: Weights, config: TrainConfig, precision: str) -> Executable:
    """Plain eager PyTorch (no fast paths) in ``precision``: the autodiff reference."""
    try:
        resolve(REFERENCE_AUTODIFF)
    except HalError as exc:
        raise _Skipped(f"no float64 autodiff reference: {exc}") from None
    return compile(spec, REFERENCE_AUTODIFF, w, replace(config, precision=precision), options={"fast": False})


def _decided(error: float, tol: float, floor: float, note: str, measured_in: str = "fp32") -> _Measured:
    if tol > ILL_CONDITIONED:
        raise _Skipped(f"ill-conditioned: {FLOOR_NAMES[measured_in]} rounding alone moves it {floor:.0e}; {note}")
    return _Measured(error, tol, note)


def _tolerance(floor: float, precision: str) -> float:
    """:func:`hal.parity.tolerance` of a floor measured in ``floor_precision(precision)``."""
    return tolerance(floor, precision, measured_in=floor_precision(precision))


def _check_forward(
    s: _Session, case: Case, batch: int = 2, shift: float = 0.0, scale: float = 1.0,
    modes: tuple[bool, ...] = (False, True),
) -> _Measured:
    """``predict`` in each mode against float64 numpy on a normal input times ``scale``
    plus ``shift``; tolerance from float32 numpy (mixed precision: :func:`hal.parity.mixed_forward`)."""
    spec, w = case.spec, _weights(case.spec)
    x = make_batch(spec, batch, "mse")[0] * np.float32(scale) + np.float32(shift)
    exe = s.compile(spec, w, case.config)
    measured, notes = [], []
    precision = case.config.precision
    measured_in = floor_precision(precision)
    for training in modes:
        ref = _reference_forward(spec, w, x, training, "fp64")
        low = (mixed_forward(spec, w, x, training, precision) if measured_in != "fp32"
               else _reference_forward(spec, w, x, training, "fp32"))
        floor = max(normalised_error(low, ref)[1], UNIT_ROUNDOFF[measured_in])
        err = normalised_error(exe.predict(x, training), ref)[1]
        mode = "training" if training else "inference"
        measured.append(_decided(err, _tolerance(floor, precision), floor, mode, measured_in))
        notes.append(f"{mode} {err:.1e}")
    return replace(max(measured, key=lambda m: m.error / m.tol), note=f"{_describe(spec)}; " + ", ".join(notes))


def _describe(spec: ModelSpec) -> str:
    """The op under test (the output node) and its attributes."""
    op = spec.node(spec.output).op
    attrs = ", ".join(f"{k}={v}" for k, v in op.attrs().items())
    return f"{op.kind}({attrs}) on {spec.input_shape}"


def _check_dropout_scaling(s: _Session, case: Case, batch: int = 4) -> _Measured:
    """Training-mode dropout of rate p keeps each value scaled by 1/(1-p) or zeroes it;
    random masks are not comparable, so the rule is checked, not the values."""
    spec, rate = case.spec, case.spec.node(case.spec.output).op.rate  # type: ignore[attr-defined]
    x = make_batch(spec, batch, "mse")[0]
    out = s.compile(spec, _weights(spec), case.config).predict(x, True)
    kept = out != 0
    err = normalised_error(out[kept], x[kept] / (1.0 - rate))[1]
    dropped = 1.0 - kept.mean()
    if not abs(dropped - rate) < 0.2:  # 240 values: a fair mask is this far off with probability < 1e-9
        raise _Failed(f"dropout rate {rate} zeroed a fraction {dropped:.2f} of {out.size} values")
    return _Measured(err, tolerance(UNIT_ROUNDOFF["fp32"], case.config.precision), f"zeroed {dropped:.2f}")


def _check_stochastic_depth(s: _Session, case: Case, batch: int = 32) -> _Measured:
    """Training-mode stochastic depth: each sample (row) or the whole batch is zero or
    ``x / (1 - p)``; in row mode both outcomes occur (all alike: probability 2**-31)."""
    op = case.spec.node(case.spec.output).op
    x = make_batch(case.spec, batch, "mse")[0]
    out = s.compile(case.spec, _weights(case.spec), case.config).predict(x, True)
    flat, scaled = out.reshape(batch, -1), (x / (1.0 - op.p)).reshape(batch, -1)  # type: ignore[attr-defined]
    dropped = np.all(flat == 0, axis=1)
    kept = ~dropped
    err = normalised_error(flat[kept], scaled[kept])[1] if kept.any() else 0.0
    if op.mode == "batch" and dropped.any() and kept.any():  # type: ignore[attr-defined]
        raise _Failed(f"batch mode dropped {dropped.sum()} of {batch} samples: it drops all or none")
    if op.mode == "row" and (dropped.all() or kept.all()):  # type: ignore[attr-defined]
        raise _Failed(f"row mode with p=0.5 {'dropped' if dropped.all() else 'kept'} all {batch} samples")
    return _Measured(err, tolerance(UNIT_ROUNDOFF["fp32"], case.config.precision), f"dropped {dropped.sum()}/{batch}")


def _check_grads(s: _Session, case: Case) -> _Measured:
    """``loss_and_grads`` against float64 autodiff; floor: plain float32 (mixed precision: plain mixed) autodiff."""
    spec, w, config = case.spec, _weights(case.spec), case.config
    x, y = make_batch(spec, BATCH, config.loss)
    measured_in = floor_precision(config.precision)
    refs = {}
    for p in ("fp64", measured_in):
        loss, grads = _autodiff(spec, w, config, p).loss_and_grads(x, y)
        refs[p] = {"loss": loss, "grads": grads}
    low = refs[measured_in]
    floor = max(grads_error(low["loss"], low["grads"], refs["fp64"])[1], UNIT_ROUNDOFF[measured_in])
    _, err, note = grads_error(*s.compile(spec, w, config).loss_and_grads(x, y), refs["fp64"])
    return _decided(err, _tolerance(floor, config.precision), floor, note, measured_in)


def _steps_batches(spec: ModelSpec, loss: str) -> tuple[np.ndarray, np.ndarray]:
    """``STEPS`` different batches, stacked."""
    xs, ys = zip(*(make_batch(spec, BATCH, loss, seed) for seed in range(STEPS)))
    return np.stack(xs), np.stack(ys)


def _trajectory_floor(
    spec: ModelSpec, w: Weights, config: TrainConfig, xs: np.ndarray, ys: np.ndarray
) -> tuple[dict[str, Any], float]:
    """The float64 reference trajectory and the float32 (mixed precision: its own) floor against it."""
    measured_in = floor_precision(config.precision)
    refs = {}
    for p in ("fp64", measured_in):
        exe = _autodiff(spec, w, config, p)
        refs[p] = {"losses": exe.run_steps(xs, ys), "weights": exe.weights()}
    floor = trajectory_error(refs[measured_in]["losses"], refs[measured_in]["weights"], refs["fp64"], spec)[1]
    return refs["fp64"], max(floor, UNIT_ROUNDOFF[measured_in])


def _check_trajectory(s: _Session, case: Case) -> _Measured:
    """``STEPS`` optimizer steps (``run_steps``) against the float64 reference trajectory."""
    spec, w, config = case.spec, _weights(case.spec), case.config
    xs, ys = _steps_batches(spec, config.loss)
    ref, floor = _trajectory_floor(spec, w, config, xs, ys)
    exe = s.compile(spec, w, config)
    losses = exe.run_steps(xs, ys)
    if exe.step != STEPS:
        raise _Failed(f"after run_steps of {STEPS} batches, step is {exe.step}")
    _, err, note = trajectory_error(losses, exe.weights(), ref, spec)
    return _decided(err, _tolerance(floor, config.precision), floor, note, floor_precision(config.precision))


# ---------------------------------------------------------------------------
# state checks
# ---------------------------------------------------------------------------


def _unchanged(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray], what: str) -> None:
    """Bit-exact equality of two weight mappings, or :class:`_Failed` naming the first difference."""
    from hal.testing import assert_weights_equal

    try:
        assert_weights_equal(before, after)
    except AssertionError as exc:
        raise _Failed(f"{what}: {exc}") from None


def _check_predict_pure(s: _Session, case: Case) -> _Measured:
    spec = case.spec
    exe = s.compile(spec, _weights(spec), case.config)
    x = make_batch(spec, BATCH, case.config.loss)[0]
    x0, before = x.copy(), exe.weights()
    for training in (True, False, True):
        exe.predict(x, training)
    _unchanged(before, exe.weights(), "predict (training-mode and inference) changed the weights or buffers")
    if not np.array_equal(x, x0) or exe.step != 0:
        raise _Failed("predict changed its input array or the step count")
    return _Measured()


def _check_loss_and_grads_pure(s: _Session, case: Case) -> _Measured:
    spec = case.spec
    exe = s.compile(spec, _weights(spec), case.config)
    x, y = make_batch(spec, BATCH, case.config.loss)
    before, out0 = exe.weights(), exe.predict(x)
    first = exe.loss_and_grads(x, y)
    _unchanged(before, exe.weights(), "loss_and_grads changed the weights or buffers")
    if exe.step != 0 or not np.array_equal(exe.predict(x), out0):
        raise _Failed("loss_and_grads changed the step count or later predictions")
    second = exe.loss_and_grads(x, y)
    if first[0] != second[0]:
        raise _Failed(f"two loss_and_grads calls on the same batch gave losses {first[0]!r} and {second[0]!r}")
    return _Measured()


def _check_round_trip(s: _Session, case: Case) -> _Measured:
    """Weights in the master dtype come back bit-exact, through compile and load_weights."""
    from hal.lowering import MASTER_DTYPE

    spec, dtype = case.spec, np.dtype(MASTER_DTYPE[case.config.precision])
    w0, w1 = ({k: v.astype(dtype) for k, v in _weights(spec, seed).items()} for seed in (0, 1))
    exe = s.compile(spec, w0, case.config)
    _unchanged(w0, exe.weights(), "weights() after compile(weights=w)")
    exe.load_weights(w1)
    _unchanged(w1, exe.weights(), "weights() after load_weights(w)")
    return _Measured()


def _check_predict_sees_new_weights(s: _Session, case: Case) -> _Measured:
    """After a training step, and after load_weights, predict computes with the new
    weights (no stale cache): compared with float64 numpy on ``weights()``."""
    spec, config = case.spec, case.config
    exe = s.compile(spec, _weights(spec, 0), config)
    x, y = make_batch(spec, BATCH, config.loss)
    exe.predict(x)  # fills any inference cache
    measured = []
    changes = {"train_step": lambda: exe.train_step(x, y), "load_weights": lambda: exe.load_weights(_weights(spec, 1))}
    for what, change in changes.items():
        change()
        w = exe.weights()
        ref = _reference_forward(spec, w, x, False, "fp64")
        floor = max(normalised_error(_reference_forward(spec, w, x, False, "fp32"), ref)[1], UNIT_ROUNDOFF["fp32"])
        err = normalised_error(exe.predict(x), ref)[1]
        measured.append(_Measured(err, tolerance(floor, config.precision), f"after {what} {err:.1e}"))
    return replace(max(measured, key=lambda m: m.error / m.tol), note=", ".join(m.note for m in measured))


def _check_run_steps_vs_train_step(s: _Session, case: Case) -> _Measured:
    spec, w, config = case.spec, _weights(case.spec), case.config
    xs, ys = _steps_batches(spec, config.loss)
    _, floor = _trajectory_floor(spec, w, config, xs, ys)
    stepped = s.compile(spec, w, config)
    ref = {"losses": np.array([stepped.train_step(x, y) for x, y in zip(xs, ys)]), "weights": stepped.weights()}
    run = s.compile(spec, w, config)
    _, err, note = trajectory_error(run.run_steps(xs, ys), run.weights(), ref, spec)
    if (run.step, stepped.step) != (STEPS, STEPS):
        raise _Failed(f"step counts after {STEPS} steps: run_steps {run.step}, train_step {stepped.step}")
    return _decided(err, tolerance(floor, config.precision), floor, note)


def _check_unchecked_nonfinite(s: _Session, case: Case) -> _Measured:
    """With ``check_finite=False`` a NaN step is applied, as asked."""
    spec = case.spec
    exe = s.compile(spec, _weights(spec), case.config)
    x, y = make_batch(spec, BATCH, case.config.loss)
    x[0] = np.nan
    loss = exe.train_step(x, y)
    if not np.isnan(loss) or exe.step != 1:
        raise _Failed(f"with check_finite=False a NaN batch gave loss {loss} and step {exe.step}, expected nan and 1")
    return _Measured()


# ---------------------------------------------------------------------------
# error checks
# ---------------------------------------------------------------------------


def _expect(error: type[HalError], action: Callable[[], object], what: str) -> str:
    """Run ``action``; it must raise ``error``. Returns the message."""
    try:
        action()
    except error as exc:
        return str(exc)
    except Exception as exc:
        raise _Failed(f"{what} raised {type(exc).__name__} ({exc}), expected {error.__name__}") from None
    raise _Failed(f"{what} raised nothing, expected {error.__name__}")


def _error_case(error: type[HalError], action: Callable[[Executable, np.ndarray, np.ndarray], object], what: str):
    def check(s: _Session, case: Case) -> _Measured:
        exe = s.shared(case.spec, case.config)
        x, y = make_batch(case.spec, BATCH, case.config.loss)
        return _Measured(note=_expect(error, lambda: action(exe, x, y), what)[:120])

    return check


def _bad_weights(kind: str) -> Callable[[_Session, Case], _Measured]:
    """New weights whose *last* tensor (or name) is bad: a loader that copies as it
    goes would have replaced the others first; the load must change nothing."""

    def check(s: _Session, case: Case) -> _Measured:
        spec = case.spec
        exe = s.compile(spec, _weights(spec, 0), case.config)
        x = make_batch(spec, BATCH, case.config.loss)[0]
        before, out0 = exe.weights(), exe.predict(x)
        w = _weights(spec, 1)
        last = list(w)[-1]
        if kind == "missing":
            del w[last]
        elif kind == "extra":
            w["no_such_node.weight"] = np.zeros(3, np.float32)
        elif kind == "wrong_shape":
            w[last] = np.zeros((*w[last].shape, 2), np.float32)
        else:
            w[last] = np.full_like(w[last], np.nan)
        note = _expect(WeightsError, lambda: exe.load_weights(w), f"load_weights with a {kind} tensor")
        _unchanged(before, exe.weights(), f"a failed load_weights ({kind}) changed the weights")
        if not np.array_equal(exe.predict(x), out0):
            raise _Failed(f"a failed load_weights ({kind}) changed what predict computes")
        return _Measured(note=note[:120])

    return check


def _check_nonfinite_step(s: _Session, case: Case) -> _Measured:
    """A NaN batch raises NonFiniteError naming the step and applies nothing; in
    run_steps the steps before it are applied and none after it."""
    spec = case.spec
    exe = s.compile(spec, _weights(spec), case.config)
    x, y = make_batch(spec, BATCH, case.config.loss)
    bad = x.copy()
    bad[0] = np.nan
    before = exe.weights()
    _expect(NonFiniteError, lambda: exe.train_step(bad, y), "train_step on a NaN batch")
    _unchanged(before, exe.weights(), "a train_step that raised NonFiniteError changed the weights")
    if exe.step != 0:
        raise _Failed(f"a train_step that raised NonFiniteError advanced step to {exe.step}")
    try:
        exe.run_steps(np.stack([x, bad, x]), np.stack([y, y, y]))
        raise _Failed("run_steps with a NaN second batch raised nothing, expected NonFiniteError")
    except NonFiniteError as exc:
        if exc.step != 1 or exe.step != 1:
            raise _Failed(f"run_steps with a NaN second batch: error names step {exc.step}, step is {exe.step}; "
                          "expected 1 and 1 (the first batch applied, nothing after the bad one)") from None
    after = exe.weights()
    if not all(np.all(np.isfinite(v)) for v in after.values()):
        raise _Failed("run_steps with a NaN second batch left non-finite weights")
    if all(np.array_equal(after[k], before[k]) for k in spec.trainable()):
        raise _Failed("run_steps with a NaN second batch did not apply the first batch")
    return _Measured()


def _check_unknown_option(s: _Session, case: Case) -> _Measured:
    return _Measured(note=_expect(
        ConfigError, lambda: compile(case.spec, s.target, options={"no_such_option": 1}), "an unknown option"
    )[:120])


def _check_unknown_device(s: _Session, case: Case) -> _Measured:
    target = f"{s.backend.name}:no_such_device"
    return _Measured(note=_expect(TargetError, lambda: compile(case.spec, target), f"target {target!r}")[:120])


def _option_case(name: str, value: object) -> Callable[[_Session, Case], _Measured]:
    def check(s: _Session, case: Case) -> _Measured:
        return _Measured(note=_expect(
            ConfigError, lambda: compile(case.spec, s.target, options={name: value}), f"option {name}={value!r}"
        )[:120])

    return check


# ---------------------------------------------------------------------------
# the import check
# ---------------------------------------------------------------------------

_IMPORT_PROBE = """
import importlib, json, sys
from hal.registry import backend_names
backend_names()
cls = importlib.import_module(sys.argv[1])
for part in sys.argv[2].split("."):
    cls = getattr(cls, part)
cls.availability(), cls.capabilities(), cls.options()
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in sys.argv[3].split(","))))
"""


def _check_no_framework_import(s: _Session, case: Case) -> _Measured:
    """A fresh interpreter lists backends, imports the backend class and asks its
    availability, capabilities and options: no framework may be imported."""
    cls = s.backend
    if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
        raise _Skipped(f"{cls.__qualname__} is not importable by name from a fresh interpreter")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, cls.__module__, cls.__qualname__, ",".join(FRAMEWORKS)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    if proc.returncode:
        raise _Failed(f"loading {cls.__module__}.{cls.__qualname__} failed: {proc.stderr.strip()[-300:]}")
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    if loaded:
        raise _Failed(f"loading {cls.__module__}.{cls.__qualname__} imported {', '.join(loaded[:8])}")
    return _Measured(note=f"{cls.__module__}: no framework imported")


# ---------------------------------------------------------------------------
# the case table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    """An op case: ``build(builder, input)`` adds the op under test."""

    name: str
    shape: tuple[int, ...]
    build: Callable[[SpecBuilder, str], str]
    batch: int = 2
    shift: float = 0.0  # added to the standard-normal input (max-pool: all below the zero padding)
    scale: float = 1.0  # multiplies it first (activations: reach the kinks at -3, 3 and 6)
    modes: tuple[bool, ...] = (False,)  # predict(training=...) compared; grad/ cases run the others' training path

    def spec(self, behind_batchnorm: bool = False) -> ModelSpec:
        b = SpecBuilder(self.name)
        x = b.input(self.shape)
        return b.build(self.build(b, b.batch_norm(x) if behind_batchnorm else x))


def _conv(*args: Any, **kw: Any) -> Callable[[SpecBuilder, str], str]:
    return lambda b, x: b.conv(x, *args, **kw)


def _tconv(*args: Any, **kw: Any) -> Callable[[SpecBuilder, str], str]:
    return lambda b, x: b.conv_transpose(x, *args, **kw)


def _act(fn: str, **kw: Any) -> Callable[[SpecBuilder, str], str]:
    return lambda b, x: b.activation(x, fn, **kw)


def _pool_cases() -> list[_Op]:
    windows = [  # name, shape, kernel, stride, padding
        ("2d_k3_s2_pad1", (3, 7, 7), 3, 2, 1),
        ("2d_k2_odd_size", (3, 6, 7), 2, None, 0),
        ("2d_asym_pad", (3, 7, 6), 2, 2, ((0, 1), (1, 0))),
        ("2d_pad_kernel_minus_1", (2, 5, 5), 3, 1, 2),  # as large as legal: one real pixel in a corner window
        ("1d_k3_s2_pad_after", (3, 8), 3, 2, [(0, 2)]),
        ("3d_asym", (2, 4, 5, 4), 2, (1, 2, 2), ((1, 0), (0, 1), (0, 0))),
        ("3d_input_smaller_than_kernel", (2, 2, 2, 2), 3, 1, 1),
    ]
    out = [
        _Op(f"maxpool{n}", shape, lambda b, x, k=k, s=s, p=p: b.max_pool(x, k, s, p), shift=-3.0)
        for n, shape, k, s, p in windows
    ]
    for incl in (True, False):
        out += [
            _Op(f"avgpool{n}_{'incl' if incl else 'excl'}_pad", shape,
                lambda b, x, k=k, s=s, p=p, incl=incl: b.avg_pool(x, k, s, p, count_include_pad=incl))
            for n, shape, k, s, p in windows if p
        ]
    ceil = [  # name, shape, kernel, stride, padding: ceil_mode adds a window, or would start one in the padding
        ("2d_k3_s2", (2, 6, 7), 3, 2, 0),  # 6: ceil gives 3 windows, floor 2
        ("2d_k2_s2_pad1_last_window_dropped", (2, 5, 7), 2, 2, 1),  # ceil's 4th (5th) window would start in padding
        ("1d_k2_s3_asym_pad", (3, 8), 2, 3, [(1, 0)]),
        ("3d_k2_s2", (2, 3, 5, 4), 2, 2, 0),
    ]
    out += [_Op(f"maxpool{n}_ceil", shape, lambda b, x, k=k, s=s, p=p: b.max_pool(x, k, s, p, ceil_mode=True),
                shift=-3.0) for n, shape, k, s, p in ceil]
    for incl in (True, False):
        out += [
            _Op(f"avgpool{n}_ceil_{'incl' if incl else 'excl'}_pad", shape,
                lambda b, x, k=k, s=s, p=p, incl=incl: b.avg_pool(x, k, s, p, count_include_pad=incl, ceil_mode=True))
            for n, shape, k, s, p in ceil
        ]
    adaptive = [("2d_to_1", (3, 5, 6), 1), ("2d_5x7_to_3x2", (3, 5, 7), (3, 2)), ("2d_to_larger", (2, 3, 2), (4, 5)),
                ("1d_10_to_4", (3, 10), 4), ("3d_to_2x3x1", (2, 4, 5, 3), (2, 3, 1))]
    for kind in ("avg", "max"):
        out += [_Op(f"adaptive_{kind}pool{n}", shape, lambda b, x, o=o, kind=kind: getattr(b, f"adaptive_{kind}_pool")(x, o))
                for n, shape, o in adaptive]
    pads = [("2d_asym", (2, 4, 5), ((1, 2), (0, 3))), ("1d", (3, 6), [(2, 1)]), ("3d", (2, 3, 2, 4), ((1, 0), (1, 1), (0, 2)))]
    for mode in ("constant", "replicate"):
        out += [_Op(f"pad{n}_{mode}", shape, lambda b, x, p=p, mode=mode: b.pad(x, p, mode)) for n, shape, p in pads]
    out += [
        _Op("pad2d_constant_value1.5", (2, 4, 5), lambda b, x: b.pad(x, 1, "constant", 1.5)),
        _Op("pad2d_reflect_n_minus_1", (2, 4, 5), lambda b, x: b.pad(x, ((3, 1), (4, 2)), "reflect")),
        _Op("pad1d_reflect", (3, 6), lambda b, x: b.pad(x, [(2, 5)], "reflect")),
        _Op("pad3d_reflect", (2, 3, 4, 3), lambda b, x: b.pad(x, ((2, 1), (0, 3), (1, 2)), "reflect")),
    ]
    return out


def _op_cases() -> list[_Op]:
    return [
        _Op("input_identity", (3, 5), lambda b, x: x),
        _Op("conv1d_k3_pad1", (3, 9), _conv(4, 3, padding=1)),
        _Op("conv1d_stride2_dilation2_pad_before", (3, 11), _conv(4, 3, stride=2, dilation=2, padding=[(3, 0)])),
        _Op("conv1d_depthwise_pad_after", (4, 8), _conv(4, 3, padding=[(0, 2)], groups=4)),
        _Op("conv2d_k3_pad1", (3, 6, 5), _conv(4, 3, padding=1)),
        _Op("conv2d_stride2_asym_pad", (3, 8, 7), _conv(4, 3, stride=2, padding=((0, 1), (1, 0)))),
        _Op("conv2d_pad_before_only", (3, 6, 6), _conv(4, 3, padding=((2, 0), (1, 0)))),
        _Op("conv2d_pad_after_only", (3, 6, 6), _conv(4, 3, padding=((0, 2), (0, 1)))),
        _Op("conv2d_tf_same_even_kernel", (3, 7, 6), _conv(4, 4, padding="same")),  # odd split (1, 2)
        _Op("conv2d_tf_same_stride2", (3, 8, 8), _conv(4, 3, stride=2, padding="same")),  # (0, 1)
        _Op("conv2d_pad_beyond_kernel", (2, 4, 5), _conv(3, 3, padding=((3, 4), (0, 3)))),  # windows of padding only
        _Op("conv2d_dilation2", (3, 8, 7), _conv(4, 3, dilation=2, padding=2)),
        _Op("conv2d_kernel5_stride2", (3, 9, 9), _conv(4, 5, stride=2, padding=2)),
        _Op("conv2d_kernel2_stride3", (3, 8, 7), _conv(4, 2, stride=3)),
        _Op("conv2d_rect_kernel", (3, 6, 7), _conv(4, (1, 3), stride=(2, 1), padding=((0, 0), (2, 1)))),
        _Op("conv2d_groups2", (4, 5, 5), _conv(6, 3, padding=1, groups=2)),
        _Op("conv2d_depthwise_multiplier2", (4, 5, 5), _conv(8, 3, padding=1, groups=4)),
        _Op("conv2d_no_bias", (3, 5, 5), _conv(4, 3, bias=False)),
        _Op("conv2d_batch1", (3, 6, 6), _conv(4, 3, padding=1), batch=1),
        _Op("conv3d_k3_pad1", (2, 4, 5, 4), _conv(3, 3, padding=1)),
        _Op("conv3d_stride_dilation_asym_pad", (2, 6, 5, 6),
            _conv(4, (3, 2, 3), stride=(2, 1, 2), padding=((1, 0), (0, 1), (1, 1)), dilation=(1, 2, 1))),
        _Op("conv3d_groups2", (4, 3, 4, 3), _conv(4, 2, groups=2)),
        # transposed convolutions: named "transposed" (a wrong Conv lowering must not fail them)
        _Op("transposed1d_k3_s2_pad1_outpad1", (3, 5), _tconv(4, 3, 2, 1, 1)),
        _Op("transposed1d_groups2_dilation2", (4, 6), _tconv(6, 3, 1, 2, 0, groups=2, dilation=2)),
        _Op("transposed2d_k2_s2_unet", (3, 4, 5), _tconv(2, 2, 2)),
        _Op("transposed2d_k3_s2_pad1_outpad1", (3, 4, 5), _tconv(4, 3, 2, 1, 1)),
        _Op("transposed2d_asym_pad_stride_dilation", (4, 3, 4),
            _tconv(6, (3, 2), (2, 3), ((2, 0), (0, 1)), (1, 2), groups=2, dilation=(1, 2))),
        _Op("transposed2d_depthwise_no_bias", (4, 3, 3), _tconv(4, 3, 1, 1, groups=4, bias=False)),
        _Op("transposed3d_k3_s2_pad1_outpad1", (2, 2, 3, 2), _tconv(4, 3, 2, 1, 1)),
        _Op("transposed3d_groups2_dilation", (4, 2, 2, 3),
            _tconv(2, (2, 3, 2), (1, 2, 2), (0, 1, 1), (0, 1, 0), groups=2, dilation=(2, 1, 1))),
        _Op("batchnorm_features", (5,), lambda b, x: b.batch_norm(x), modes=(False, True)),
        _Op("batchnorm1d", (3, 7), lambda b, x: b.batch_norm(x), modes=(False, True)),
        _Op("batchnorm2d", (3, 4, 5), lambda b, x: b.batch_norm(x), modes=(False, True)),
        _Op("batchnorm2d_eps1e-3_batch1", (3, 4, 5), lambda b, x: b.batch_norm(x, eps=1e-3), batch=1,
            modes=(False, True)),
        _Op("batchnorm3d", (2, 3, 4, 3), lambda b, x: b.batch_norm(x), modes=(False, True)),
        _Op("layernorm2d", (3, 4, 5), lambda b, x: b.layer_norm(x), shift=3.0),
        _Op("layernorm_features_eps1e-6", (6,), lambda b, x: b.layer_norm(x, eps=1e-6), shift=3.0),
        _Op("layernorm3d_no_affine", (2, 3, 2, 3), lambda b, x: b.layer_norm(x, affine=False)),
        _Op("groupnorm2d_groups2", (4, 3, 5), lambda b, x: b.group_norm(x, 2), shift=3.0),
        _Op("groupnorm2d_groups_per_channel", (4, 3, 5), lambda b, x: b.group_norm(x, 4)),
        _Op("groupnorm1d_one_group_batch1", (6, 5), lambda b, x: b.group_norm(x, 1), batch=1),
        _Op("groupnorm3d_no_affine", (4, 2, 3, 2), lambda b, x: b.group_norm(x, 2, affine=False)),
        _Op("instancenorm2d", (3, 4, 5), lambda b, x: b.instance_norm(x), shift=3.0),
        _Op("instancenorm1d_affine_eps1e-3", (3, 7), lambda b, x: b.instance_norm(x, eps=1e-3, affine=True)),
        _Op("instancenorm3d_affine", (2, 3, 2, 3), lambda b, x: b.instance_norm(x, affine=True)),
        _Op("relu", (3, 4, 5), _act("relu")),
        _Op("leaky_relu_alpha0.2", (3, 4, 5), _act("leaky_relu", alpha=0.2)),
        _Op("sigmoid", (3, 4, 5), _act("sigmoid")),
        _Op("tanh", (3, 4, 5), _act("tanh")),
        _Op("gelu_erf", (3, 4, 5), _act("gelu")),
        _Op("gelu_tanh", (3, 4, 5), _act("gelu", approximate="tanh")),
        _Op("silu", (3, 4, 5), _act("silu")),
        _Op("relu6", (3, 4, 5), _act("relu6"), scale=4.0, shift=2.0),
        _Op("hardsigmoid", (3, 4, 5), _act("hardsigmoid"), scale=3.0),
        _Op("hardswish", (3, 4, 5), _act("hardswish"), scale=3.0),
        _Op("elu_alpha0.7", (3, 4, 5), _act("elu", alpha=0.7)),
        _Op("softplus", (3, 4, 5), lambda b, x: b.softplus(x), scale=10.0),  # past the threshold 20 too
        _Op("softplus_beta2_threshold1", (3, 4, 5), lambda b, x: b.softplus(x, beta=2.0, threshold=1.0)),
        _Op("mish", (3, 4, 5), _act("mish"), scale=3.0),
        _Op("prelu_shared", (3, 4, 5), lambda b, x: b.prelu(x)),
        _Op("prelu_per_channel", (3, 4, 5), lambda b, x: b.prelu(x, 3)),
        _Op("prelu_features", (6,), lambda b, x: b.prelu(x, 6)),
        *_pool_cases(),
        _Op("global_avgpool1d", (3, 7), lambda b, x: b.global_avg_pool(x)),
        _Op("global_avgpool2d", (3, 4, 5), lambda b, x: b.global_avg_pool(x)),
        _Op("global_avgpool3d", (2, 3, 4, 3), lambda b, x: b.global_avg_pool(x)),
        _Op("add3", (3, 4, 5), lambda b, x: b.add(x, b.relu(x), b.activation(x, "tanh"))),
        _Op("add_same_input_twice", (3, 4), lambda b, x: b.add(x, x)),
        _Op("add_broadcast_channel", (3, 4, 5), lambda b, x: b.add(b.avg_pool(x, (4, 5)), x)),  # (3,1,1) + (3,4,5)
        _Op("add_outer_broadcast", (3, 4, 5), lambda b, x: b.add(b.avg_pool(x, (4, 1)), b.avg_pool(x, (1, 5)))),
        _Op("mul_squeeze_excitation", (3, 4, 5),
            lambda b, x: b.mul(x, b.activation(b.avg_pool(x, (4, 5)), "sigmoid"))),
        _Op("mul3_broadcast", (2, 3, 4, 3), lambda b, x: b.mul(x, b.avg_pool(x, (3, 1, 1)), b.avg_pool(x, (1, 4, 3)))),
        _Op("mul_features", (5,), lambda b, x: b.mul(x, b.activation(x, "tanh"))),
        _Op("scale2d", (3, 4, 5), lambda b, x: b.scale(x)),
        _Op("scale_features", (6,), lambda b, x: b.scale(x)),
        _Op("scale3d", (2, 3, 2, 3), lambda b, x: b.scale(x)),
        _Op("concat3", (2, 3, 4), lambda b, x: b.concat(x, b.activation(x, "sigmoid"), x)),
        _Op("concat_features", (4,), lambda b, x: b.concat(x, b.activation(x, "tanh"))),
        _Op("upsample2d_nearest_scale2", (2, 3, 4), lambda b, x: b.upsample(x, scale=2)),
        _Op("upsample2d_nearest_scale1.5", (2, 5, 3), lambda b, x: b.upsample(x, scale=1.5)),
        _Op("upsample2d_nearest_size", (2, 5, 3), lambda b, x: b.upsample(x, (7, 8))),
        _Op("upsample1d_nearest_scale3", (3, 4), lambda b, x: b.upsample(x, scale=3)),
        _Op("upsample3d_nearest_size", (2, 2, 3, 2), lambda b, x: b.upsample(x, (3, 5, 4))),
        _Op("upsample2d_bilinear_scale2", (2, 3, 4), lambda b, x: b.upsample(x, scale=2, mode="bilinear")),
        _Op("upsample2d_bilinear_scale1.5_odd", (2, 5, 3), lambda b, x: b.upsample(x, scale=1.5, mode="bilinear")),
        _Op("upsample2d_bilinear_align_corners", (2, 5, 3),
            lambda b, x: b.upsample(x, (8, 7), mode="bilinear", align_corners=True)),
        _Op("upsample2d_bilinear_size_down", (2, 7, 6), lambda b, x: b.upsample(x, (4, 3), mode="bilinear")),
        _Op("upsample1d_linear_scale3_align_corners", (3, 4),
            lambda b, x: b.upsample(x, scale=3, mode="linear", align_corners=True)),
        _Op("upsample3d_trilinear_scale", (2, 2, 3, 2),
            lambda b, x: b.upsample(x, scale=(2, 1.5, 3), mode="trilinear")),
        _Op("upsample3d_trilinear_align_corners", (2, 2, 3, 2),
            lambda b, x: b.upsample(x, (3, 5, 4), mode="trilinear", align_corners=True)),
        _Op("channel_shuffle2d_groups2", (6, 3, 4), lambda b, x: b.channel_shuffle(x, 2)),
        _Op("channel_shuffle2d_groups3", (6, 2, 3), lambda b, x: b.channel_shuffle(x, 3)),
        _Op("channel_shuffle1d_groups4", (8, 3), lambda b, x: b.channel_shuffle(x, 4)),
        _Op("channel_shuffle3d_groups2", (4, 2, 2, 3), lambda b, x: b.channel_shuffle(x, 2)),
        _Op("channel_slice_chunk_halves", (6, 3, 4),  # ShuffleNet: x1, x2 = x.chunk(2, dim=1); cat(x1, f(x2))
            lambda b, x: b.concat(b.channel_slice(x, 0, 3), b.activation(b.channel_slice(x, 3, 6), "tanh"))),
        _Op("channel_slice_middle_features", (7,), lambda b, x: b.channel_slice(x, 2, 5)),
        _Op("flatten2d", (3, 4, 5), lambda b, x: b.flatten(x)),
        _Op("flatten3d", (2, 3, 2, 2), lambda b, x: b.flatten(x)),
        _Op("dense", (7,), lambda b, x: b.dense(x, 5)),
        _Op("dense_no_bias", (7,), lambda b, x: b.dense(x, 5, bias=False)),
        _Op("dense_batch1", (7,), lambda b, x: b.dense(x, 5), batch=1),
        _Op("flatten_dense", (3, 2, 4), lambda b, x: b.dense(b.flatten(x), 5)),
        _Op("dense_pointwise2d", (3, 2, 5), lambda b, x: b.dense(x, 4)),
        _Op("dense_pointwise3d_no_bias", (3, 2, 3, 2), lambda b, x: b.dense(x, 4, bias=False)),
        _Op("dropout_rate0", (3, 4, 5), lambda b, x: b.dropout(x, 0.0), modes=(False, True)),
        _Op("dropout_rate_half", (3, 4, 5), lambda b, x: b.dropout(x, 0.5), modes=(False,)),
        _Op("stochastic_depth_row_p0", (3, 4, 5), lambda b, x: b.stochastic_depth(x, 0.0), modes=(False, True)),
        _Op("stochastic_depth_row_half", (3, 4, 5), lambda b, x: b.stochastic_depth(x, 0.5)),
        _Op("stochastic_depth_batch_half", (3, 4), lambda b, x: b.stochastic_depth(x, 0.5, "batch")),
    ]


# op cases whose backward is also checked (grad/): every kind of op, and each way of
# padding, striding and grouping a window whose backward a framework computes differently
_GRADS = frozenset({
    "conv1d_k3_pad1", "conv1d_stride2_dilation2_pad_before", "conv2d_stride2_asym_pad", "conv2d_pad_before_only",
    "conv2d_tf_same_even_kernel", "conv2d_tf_same_stride2", "conv2d_pad_beyond_kernel", "conv2d_dilation2",
    "conv2d_kernel5_stride2", "conv2d_kernel2_stride3", "conv2d_depthwise_multiplier2",
    "conv3d_stride_dilation_asym_pad", "conv3d_groups2", "transposed1d_groups2_dilation2",
    "transposed2d_k3_s2_pad1_outpad1", "transposed2d_asym_pad_stride_dilation", "transposed3d_groups2_dilation", "batchnorm_features", "batchnorm2d",
    "layernorm2d", "layernorm_features_eps1e-6", "groupnorm2d_groups2", "instancenorm2d",
    "instancenorm1d_affine_eps1e-3",
    "relu", "leaky_relu_alpha0.2", "sigmoid", "tanh", "gelu_erf", "gelu_tanh", "silu",
    "relu6", "hardsigmoid", "hardswish", "elu_alpha0.7", "softplus_beta2_threshold1", "mish", "prelu_per_channel",
    "maxpool2d_asym_pad", "maxpool2d_pad_kernel_minus_1", "maxpool3d_asym", "avgpool2d_asym_pad_incl_pad",
    "avgpool2d_asym_pad_excl_pad", "avgpool1d_k3_s2_pad_after_excl_pad", "avgpool3d_input_smaller_than_kernel_excl_pad",
    "maxpool2d_k2_s2_pad1_last_window_dropped_ceil", "avgpool2d_k2_s2_pad1_last_window_dropped_ceil_incl_pad",
    "avgpool1d_k2_s3_asym_pad_ceil_excl_pad", "adaptive_avgpool2d_5x7_to_3x2", "adaptive_maxpool2d_5x7_to_3x2",
    "adaptive_avgpool2d_to_larger", "pad2d_asym_replicate", "pad2d_reflect_n_minus_1", "pad2d_asym_constant",
    "upsample2d_nearest_scale1.5", "upsample2d_bilinear_scale1.5_odd", "upsample2d_bilinear_align_corners",
    "upsample3d_trilinear_scale", "channel_shuffle2d_groups3", "channel_slice_chunk_halves",
    "global_avgpool2d", "add3", "add_same_input_twice", "add_outer_broadcast", "mul_squeeze_excitation",
    "mul3_broadcast", "scale2d", "concat3", "dense", "dense_pointwise2d", "dropout_rate0", "stochastic_depth_row_p0",
})


def _mlp(batchnorm: bool = True, name: str = "mlp") -> ModelSpec:
    """Flatten, Dense, [BatchNorm], tanh, Dense: the training cases' model (no convolution)."""
    b = SpecBuilder(name)
    x = b.dense(b.flatten(b.input((3, 4))), 6, bias=False)  # a bias before BatchNorm has no gradient
    x = b.activation(b.batch_norm(x) if batchnorm else x, "tanh")
    return b.build(b.dense(x, 3))


@functools.lru_cache(maxsize=1)
def _static_cases() -> tuple[Case, ...]:
    cases: list[Case] = []
    for op in _op_cases():
        check = functools.partial(_check_forward, batch=op.batch, shift=op.shift, scale=op.scale, modes=op.modes)
        doc = "inference and training-mode forward" if len(op.modes) == 2 else "inference forward"
        if op.name == "dropout_rate0":
            doc += " (training mode is comparable at rate 0 only: random masks are not)"
        cases.append(Case(f"op/{op.name}", check, op.spec(), doc=doc))
    by_name = {op.name: op for op in _op_cases()}
    cases.append(Case("op/dropout_rate_half_training_scaling", _check_dropout_scaling,
                      by_name["dropout_rate_half"].spec(), doc="training-mode dropout zeroes or scales by 1/(1-rate)"))
    cases += [
        Case(f"op/{name}_training_rule", _check_stochastic_depth, by_name[name].spec(),
             doc="training-mode stochastic depth zeroes or scales whole samples (row) or the whole batch (batch)")
        for name in ("stochastic_depth_row_half", "stochastic_depth_batch_half")
    ]
    mse = TrainConfig(loss="mse")
    cases += [
        Case(f"grad/{op.name}", _check_grads, op.spec(behind_batchnorm=True), mse, training=True,
             doc="loss_and_grads (MSE) of the op behind a BatchNorm against float64 autodiff")
        for op in _op_cases() if op.name in _GRADS
    ]
    mlp, mlp_plain = _mlp(), _mlp(batchnorm=False, name="mlp_no_batchnorm")
    cases += [
        Case("loss/cross_entropy", _check_grads, mlp, training=True),
        Case("loss/mse", _check_grads, mlp, mse, training=True),
    ]
    momentum = SGD(lr=0.1, momentum=0.9)
    trajectories = {
        "sgd": (mlp, TrainConfig(optimizer=SGD(lr=0.1))),
        "sgd_momentum": (mlp, TrainConfig(optimizer=momentum)),
        "sgd_nesterov_wd": (mlp, TrainConfig(optimizer=SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05))),
        "sgd_wd": (mlp, TrainConfig(optimizer=SGD(lr=0.1, weight_decay=0.05))),
        "adam": (mlp, TrainConfig(optimizer=Adam(lr=0.01))),
        "adam_wd": (mlp, TrainConfig(optimizer=Adam(lr=0.01, weight_decay=0.1))),
        "adamw": (mlp, TrainConfig(optimizer=AdamW(lr=0.01, weight_decay=0.1))),
        "adam_mse": (mlp, TrainConfig(loss="mse", optimizer=Adam(lr=0.01))),
        "step_decay": (mlp, TrainConfig(optimizer=momentum, schedule=StepDecay(step_size=1, gamma=0.5))),
        "cosine_warmup": (mlp, TrainConfig(optimizer=momentum, schedule=Cosine(
            total_steps=STEPS, warmup_steps=1, warmup_start=0.1, min_factor=0.1))),
        "grad_accum2": (mlp_plain, TrainConfig(optimizer=momentum, grad_accum=2)),
        "grad_accum2_batchnorm": (mlp, TrainConfig(optimizer=momentum, grad_accum=2)),
    }
    cases += [
        Case(f"train/{name}", _check_trajectory, spec, config, training=True,
             doc=f"{STEPS} steps of run_steps against the float64 reference trajectory")
        for name, (spec, config) in trajectories.items()
    ]
    for p in ("fp64", "bf16", "fp16"):  # bf16/fp16: mixed, floors measured in them (hal.parity.mixed_forward)
        cases += [
            Case(f"precision/{p}_forward", functools.partial(_check_forward, modes=(False, True)), mlp,
                 TrainConfig(precision=p)),
            Case(f"precision/{p}_grads", _check_grads, mlp_plain if p == "bf16" else mlp, TrainConfig(precision=p),
                 training=True, doc="bf16: without BatchNorm, whose backward alone amplifies bf16 rounding past "
                 "ILL_CONDITIONED" if p == "bf16" else ""),
            Case(f"precision/{p}_trajectory", _check_trajectory, mlp, replace(
                trajectories["cosine_warmup"][1], optimizer=AdamW(lr=1e-3 if p == "fp16" else 0.01, weight_decay=0.1),
                precision=p), training=True,
                doc="fp16: lr 1e-3, at 1e-2 fp16 rounding alone moves the trajectory 1e-2 (ILL_CONDITIONED)"
                if p == "fp16" else ""),
        ]
    default = TrainConfig(optimizer=momentum)
    cases += [
        Case("state/predict_pure", _check_predict_pure, mlp, default,
             doc="predict in both modes changes no weight, buffer, input or step"),
        Case("state/loss_and_grads_pure", _check_loss_and_grads_pure, mlp, default, training=True,
             doc="loss_and_grads changes no weight, buffer, step or later prediction; repeatable"),
        Case("state/weights_round_trip", _check_round_trip, mlp, default,
             doc="master-dtype weights come back bit-exact through compile and load_weights"),
        Case("state/predict_sees_new_weights", _check_predict_sees_new_weights, mlp, default, training=True),
        Case("state/run_steps_equals_train_step", _check_run_steps_vs_train_step, mlp, default, training=True),
        Case("state/unchecked_nonfinite_step_applies", _check_unchecked_nonfinite, mlp,
             replace(default, check_finite=False), training=True),
    ]
    bad_x = {
        "input_shape": (lambda e, x, y: e.predict(x[:, :, :-1]), "predict with a wrong input shape"),
        "input_rank": (lambda e, x, y: e.predict(x[0]), "predict without the batch dimension"),
        "input_dtype_int": (lambda e, x, y: e.predict(x.astype(np.int32)), "predict with an int array"),
        "input_not_array": (lambda e, x, y: e.predict(x.tolist()), "predict with a list"),
        "predict_training_not_bool": (lambda e, x, y: e.predict(x, "yes"), "predict(training='yes')"),
    }
    cases += [
        Case(f"error/{name}", _error_case(InputError, action, what), mlp, default, doc=f"{what}: InputError")
        for name, (action, what) in bad_x.items()
    ]
    bad_xy = {
        "labels_out_of_range": (lambda e, x, y: e.loss_and_grads(x, np.full_like(y, 3)), "labels >= classes"),
        "labels_negative": (lambda e, x, y: e.train_step(x, np.full_like(y, -1)), "negative labels"),
        "labels_float": (lambda e, x, y: e.loss_and_grads(x, y.astype(np.float32)), "float cross-entropy labels"),
        "labels_batch_mismatch": (lambda e, x, y: e.train_step(x, y[:-1]), "fewer labels than inputs"),
        "mse_target_shape": (lambda e, x, y: e.loss_and_grads(x, np.zeros((len(x), 3, 1), np.float32)),
                             "MSE targets of shape (N, 3, 1) for outputs (3,)"),
        "run_steps_mismatched_stacks": (lambda e, x, y: e.run_steps(np.stack([x, x]), y[None]),
                                        "run_steps with 2 input batches and 1 label batch"),
    }
    cases += [
        Case(f"error/{name}", _error_case(InputError, action, what), mlp,
             TrainConfig(loss="mse", optimizer=momentum) if name.startswith("mse") else default, training=True,
             doc=f"{what}: InputError")
        for name, (action, what) in bad_xy.items()
    ]
    cases.append(Case("error/batchnorm_over_one_value",
                      _error_case(InputError, lambda e, x, y: e.predict(x[:1], training=True),
                                  "a training-mode forward of one sample through BatchNorm over features"),
                      mlp, default, doc="training-mode BatchNorm needs more than one value per channel: InputError"))
    accum = TrainConfig(optimizer=momentum, grad_accum=3)
    cases.append(Case("error/batch_not_divisible_by_grad_accum",
                      _error_case(InputError, lambda e, x, y: e.train_step(x, y), f"batch {BATCH} with grad_accum 3"),
                      mlp, accum, training=True))
    cases += [
        Case(f"error/load_weights_{kind}", _bad_weights(kind), mlp, default,
             doc=f"load_weights with a {kind} tensor raises WeightsError and changes nothing")
        for kind in ("missing", "extra", "wrong_shape", "non_finite")
    ]
    cases += [
        Case("error/nonfinite_step", _check_nonfinite_step, mlp, default, training=True,
             doc="NonFiniteError naming the step; nothing of that step or later ones applied"),
        Case("error/unknown_option", _check_unknown_option, mlp, default),
        Case("error/unknown_device", _check_unknown_device, mlp, default),
        Case("import/no_framework_at_listing", _check_no_framework_import),
    ]
    return tuple(cases)


def _option_cases(backend: type[Backend]) -> list[Case]:
    """Per declared option with choices: a value outside them raises ConfigError."""
    out = []
    for name, option in backend.options().items():
        if option.choices is not None:
            out.append(Case(f"error/option_{name}_value", _option_case(name, "not-a-choice"), _mlp(),
                            doc=f"option {name} outside its choices {option.choices}: ConfigError"))
    return out
