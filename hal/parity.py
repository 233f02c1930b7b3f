"""Parity: do two stacks compute the same numbers?

Checks, per target, on the same spec, weights and batch:

``forward``        inference forward vs the float64 numpy reference
``forward_train``  training-mode forward (batch statistics) vs the float64 reference
``grads``          loss and gradients vs a float64 autodiff run (``torch:cpu``, ``precision="fp64"``)
``trajectory``     losses and final weights after N optimizer steps vs the same float64 run

Error metric: the *normalised max error* ``max|a - ref| / max|ref|``; for sets
of tensors (gradients, parameters, BatchNorm buffers) the set is one vector
(see :func:`tensors_error`). The max absolute error is reported beside it.

Tolerances are not picked to pass. They are ``FACTOR * floor``, where ``floor``
is measured on the spot: the normalised max error of the *float32* numpy
reference against the float64 one for the same spec, weights and batch (the
float32 rounding floor of a straightforward implementation; at least one unit
roundoff). Frameworks legitimately round more than direct summation — blocked
and Winograd convolutions, reordered reductions, fused kernels — so a target
may sit up to ``FACTOR`` times above the floor (16 = four bits of slack). Other
precisions scale the floor by their unit roundoff relative to float32's.

``grads`` and ``trajectory`` have floors of their own, because training can
amplify rounding far beyond the forward's (training-mode BatchNorm over
near-constant channels, large steps: a trajectory is chaotic). Their floor is
the error of a plain float32 run of the reference autodiff (eager PyTorch,
NCHW, no fast paths) against the float64 run. (Perturbing a float64 run by
float32-sized noise at every node output was tried first: on ResNet-50 it
underestimated real float32 gradient error a hundredfold, the rounding inside
the backward's long reductions being the larger part.)

A check whose tolerance exceeds ``ILL_CONDITIONED`` cannot tell a bug from
rounding; it is reported as skipped with the floor, never as a pass.

Default weights: ``init_weights(spec, seed, residual_gamma=PARITY_RESIDUAL_GAMMA)``.
At the plain init (gamma 1 everywhere) a deep ResNet's training-mode gradients
are so ill-conditioned that *any* float32 run is ~2% off float64 (measured on
ResNet-50 at 224x224, batch 4: plain eager PyTorch float32 vs float64,
normwise), and a check with that floor cannot catch a bug; BatchNorms closing
residual branches started at gamma 0.2 bring that floor to 4.5e-3 and the
training-mode forward's from 4.4e-5 to 7.4e-7. Pass ``weights`` to test others.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hal.backend import Executable, Target
from hal.errors import ConfigError, HalError
from hal.registry import compile, resolve
from hal.spec import Dropout, ModelSpec
from hal.training import SGD, TrainConfig
from hal.weights import init_weights

FACTOR = 16.0
ILL_CONDITIONED = 0.1  # a tolerance above this cannot tell a bug from rounding: the check is skipped
UNIT_ROUNDOFF = {"fp64": 2.0**-53, "fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
CHECKS = ("forward", "forward_train", "grads", "trajectory")
REFERENCE_AUTODIFF = "torch:cpu"
PARITY_RESIDUAL_GAMMA = 0.2


@dataclass
class CheckResult:
    """One check of one target."""

    target: str
    check: str
    max_abs: float | None = None
    max_rel: float | None = None
    tol: float | None = None
    passed: bool | None = None  # None: skipped (see note)
    note: str = ""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        return "skip" if self.passed is None else "PASS" if self.passed else "FAIL"


@dataclass
class ParityReport:
    model: str
    batch: int
    input_shape: tuple[int, ...]
    floor: dict[str, float]
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No check failed (skipped checks do not fail a report)."""
        return all(r.passed is not False for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def table(self) -> str:
        from hal.table import render

        rows = [
            [r.target, r.check, _sci(r.max_abs), _sci(r.max_rel), _sci(r.tol), r.status, r.note]
            for r in self.results
        ]
        head = (
            f"parity: {self.model}, batch {self.batch}, input {self.input_shape}; "
            f"float32 floor (normalised max err): "
            + ", ".join(f"{k} {v:.2e}" for k, v in self.floor.items())
        )
        return head + "\n" + render(["target", "check", "max abs err", "max rel err", "tolerance", "result", "note"], rows)


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def normalised_error(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """``(max |a - ref|, max |a - ref| / max |ref|)``; shapes must agree."""
    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        raise HalError(f"parity: shape {a.shape} differs from the reference's {ref.shape}")
    if not np.all(np.isfinite(a)):
        return float("inf"), float("inf")
    err = float(np.max(np.abs(a - ref))) if a.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return err, err / scale if scale > 0 else err


def tensors_error(a: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> tuple[float, float, str]:
    """Normwise error of a set of tensors seen as one vector: ``(max abs err,
    max abs err / max |ref|, name of the tensor with the largest abs err)``.

    Normwise, not per tensor: a tensor whose exact value is zero (the gradient of
    a convolution bias followed by BatchNorm) holds only rounding noise, and its
    per-tensor relative error means nothing.
    """
    missing = set(ref) ^ set(a)
    if missing:
        raise HalError(f"parity: tensor names differ from the reference: {sorted(missing)[:5]}")
    worst, err, scale = "", 0.0, 0.0
    for k in ref:
        e_abs, _ = normalised_error(a[k], ref[k])
        scale = max(scale, float(np.max(np.abs(ref[k]))) if ref[k].size else 0.0)
        if e_abs > err or not worst:
            worst, err = k, e_abs
    return err, err / scale if scale > 0 else err, worst


def tolerance(floor: float, precision: str = "fp32", factor: float = FACTOR) -> float:
    """Tolerance for a target computing in ``precision``, from the measured float32 floor."""
    floor = max(floor, UNIT_ROUNDOFF["fp32"])
    return factor * floor * UNIT_ROUNDOFF[precision] / UNIT_ROUNDOFF["fp32"]


def make_batch(spec: ModelSpec, batch: int, loss: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic standard-normal input batch and labels/targets."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *spec.input_shape)).astype(np.float32)
    out = spec.output_shape
    if loss == "cross_entropy":
        y = rng.integers(0, out[0], size=batch)
    else:
        y = rng.standard_normal((batch, *out)).astype(np.float32)
    return x, y


def run_parity(
    spec: ModelSpec,
    targets: Sequence[str],
    batch: int = 4,
    checks: Sequence[str] = CHECKS,
    steps: int = 3,
    config: TrainConfig | None = None,
    seed: int = 0,
    weights: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Compare ``targets`` on ``spec`` (see the module docstring); never raises for a
    failing target: its failure is a FAIL row with the error message."""
    from hal.backends.numpy import NumpyExecutable

    bad = [c for c in checks if c not in CHECKS]
    if bad:
        raise ConfigError(f"unknown parity checks {bad}; choose from {CHECKS}")
    if batch < 2:
        raise ConfigError("parity needs batch >= 2 (training-mode BatchNorm over one sample is degenerate)")
    config = config or TrainConfig(optimizer=SGD(lr=1e-3, momentum=0.9))
    if batch % config.grad_accum:
        raise ConfigError(f"batch {batch} is not divisible by grad_accum {config.grad_accum}")
    say = progress or (lambda _msg: None)
    weights = dict(weights) if weights is not None else init_weights(spec, seed, PARITY_RESIDUAL_GAMMA)
    x, y = make_batch(spec, batch, config.loss, seed)
    report = ParityReport(spec.name, batch, spec.input_shape, {})

    # float64 reference and the float32 floor, per forward mode
    ref: dict[str, np.ndarray] = {}
    train_ok = not any(isinstance(n.op, Dropout) and n.op.rate > 0 for n in spec.nodes)
    modes = [("forward", False)] + ([("forward_train", True)] if train_ok else [])
    for check, training in modes:
        if check not in checks and not (training and {"grads", "trajectory"} & set(checks)):
            continue
        say(f"reference {check}")
        ref[check] = NumpyExecutable(spec, weights, config).predict(x, training)
        f32 = NumpyExecutable(spec, weights, config, "float32").predict(x, training)
        report.floor[check] = max(normalised_error(f32, ref[check])[1], UNIT_ROUNDOFF["fp32"])

    autodiff: dict[str, Any] = {}

    def reference_autodiff() -> dict[str, Any]:
        """float64 loss, gradients and trajectory, and their float32 floors; computed once."""
        if not autodiff:
            say(f"autodiff reference ({REFERENCE_AUTODIFF}): float64, and plain float32 for the floor")
            n = steps if "trajectory" in checks else 0
            clean = _autodiff(spec, weights, config, x, y, n, "fp64")
            plain = _autodiff(spec, weights, config, x, y, n, "fp32")
            autodiff.update(clean)
            report.floor["grads"] = max(_grads_error(plain["loss"], plain["grads"], clean)[1], UNIT_ROUNDOFF["fp32"])
            if n:
                report.floor["trajectory"] = max(
                    _trajectory_error(plain["losses"], plain["weights"], clean, spec)[1], UNIT_ROUNDOFF["fp32"]
                )
        return autodiff

    for name in targets:
        target = str(Target.parse(name))
        if target.split(":")[0] == "numpy":
            for check in (c for c in checks if c in ref):
                report.results.append(CheckResult(target, check, 0.0, 0.0, 0.0, True, "the float64 reference itself"))
            continue
        try:
            _, resolved = resolve(target)
        except HalError as exc:
            report.results.append(CheckResult(target, "compile", passed=False, note=str(exc)))
            continue
        target = str(resolved)
        exe: list[Executable] = []  # compiled on first use, shared by the checks (trajectory runs last)
        for check in (c for c in CHECKS if c in checks):
            t0 = time.perf_counter()
            say(f"{target} {check}")
            try:
                if not exe:
                    exe.append(compile(spec, target, weights, config))
                result = _check(check, spec, target, exe[0], config, x, y, ref, report.floor, steps, reference_autodiff)
            except HalError as exc:
                result = CheckResult(target, check, passed=False, note=str(exc))
            result.seconds = time.perf_counter() - t0
            report.results.append(result)
    return report


def _check(
    check: str,
    spec: ModelSpec,
    target: str,
    exe: Executable,
    config: TrainConfig,
    x: np.ndarray,
    y: np.ndarray,
    ref: Mapping[str, np.ndarray],
    floor: Mapping[str, float],
    steps: int,
    reference_autodiff: Callable[[], dict[str, Any]],
) -> CheckResult:
    if check in ("forward", "forward_train"):
        if check not in ref:
            return CheckResult(target, check, note="spec has active dropout: training-mode outputs are random")
        e_abs, e_rel = normalised_error(exe.predict(x, training=check == "forward_train"), ref[check])
        tol = tolerance(floor[check], config.precision)
        return CheckResult(target, check, e_abs, e_rel, tol, e_rel <= tol)

    if "forward_train" not in ref:
        return CheckResult(target, check, note="spec has active dropout: gradients are random")
    try:
        resolve(REFERENCE_AUTODIFF)
    except HalError as exc:
        return CheckResult(target, check, note=f"no float64 autodiff reference: {exc}")
    if not resolve(target)[0].capabilities().training:
        return CheckResult(target, check, note=f"{target} does not train")
    auto = reference_autodiff()
    tol = tolerance(floor[check], config.precision)
    if check == "grads":
        loss, grads = exe.loss_and_grads(x, y)
        e_abs, rel, note = _grads_error(loss, grads, auto)
    else:
        losses = exe.run_steps(np.stack([x] * steps), np.stack([y] * steps))
        e_abs, rel, note = _trajectory_error(losses, exe.weights(), auto, spec)
        note = f"{steps} steps {type(config.optimizer).__name__}; {note}"
    if tol > ILL_CONDITIONED:
        return CheckResult(target, check, e_abs, rel, tol, None, f"ill-conditioned, float32 rounding alone moves it "
                           f"{floor[check]:.0e}: use a larger batch or smaller steps; {note}")
    return CheckResult(target, check, e_abs, rel, tol, rel <= tol, note)


def _autodiff(
    spec: ModelSpec, weights: Mapping[str, np.ndarray], config: TrainConfig, x: np.ndarray, y: np.ndarray,
    steps: int, precision: str,
) -> dict[str, Any]:
    """Loss, gradients, N-step losses and final weights of plain eager PyTorch on the CPU."""
    from dataclasses import replace

    from hal.backends.torch import TorchExecutable
    from hal.weights import check_weights

    resolve(REFERENCE_AUTODIFF)  # raises BackendUnavailable with the reason if torch is absent
    exe = TorchExecutable(spec, check_weights(spec, weights), "cpu", replace(config, precision=precision), fast=False)
    loss, grads = exe.loss_and_grads(x, y)
    if not steps:  # no trajectory check asked for
        return {"loss": loss, "grads": grads}
    losses = exe.run_steps(np.stack([x] * steps), np.stack([y] * steps))
    return {"loss": loss, "grads": grads, "losses": losses, "weights": exe.weights()}


def _grads_error(loss: float, grads: Mapping[str, np.ndarray], ref: Mapping[str, Any]) -> tuple[float, float, str]:
    g_abs, g_rel, worst = tensors_error(grads, ref["grads"])
    l_rel = abs(loss - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    return g_abs, max(g_rel, l_rel), f"worst tensor {worst}; loss rel err {l_rel:.1e}"


def _trajectory_error(
    losses: np.ndarray, weights: Mapping[str, np.ndarray], ref: Mapping[str, Any], spec: ModelSpec
) -> tuple[float, float, str]:
    l_abs, l_rel = normalised_error(losses, ref["losses"])
    ref_w, trainable = ref["weights"], set(spec.trainable())
    parts = [  # parameters and BatchNorm buffers are compared as two vectors
        tensors_error({k: weights[k] for k in ks}, {k: ref_w[k] for k in ks})
        for ks in ([k for k in ref_w if k in trainable], [k for k in ref_w if k not in trainable])
        if ks
    ]
    w_abs, w_rel, worst = max(parts, key=lambda t: t[1])
    return max(l_abs, w_abs), max(l_rel, w_rel), f"losses rel err {l_rel:.1e}; worst weight {worst}"
