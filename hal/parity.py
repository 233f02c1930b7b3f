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
precisions scale the floor by their unit roundoff relative to float32's, except
mixed precision (``bf16``, ``fp16``), whose floors are measured in that precision:
the forward's is a float64 run of the numpy reference rounded where
:mod:`hal.lowering`'s precision rules round (:func:`mixed_forward`), the
gradients' and trajectory's a plain eager PyTorch run under ``torch.autocast``
(and ``GradScaler`` for fp16); their tolerance is ``FACTOR`` times that floor.

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
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hal.backend import Backend, Target, Weights
from hal.lowering import COMPUTE_DTYPE, FP32_OPS, MIXED_PRECISIONS, free_after, round_to
from hal.errors import BackendUnavailable, ConfigError, HalError
from hal.registry import compile, get_backend, options_per_backend, resolve
from hal.spec import Dropout, ModelSpec
from hal.training import SGD, AdamW, DataParallel, TrainConfig
from hal.weights import check_weights, init_weights
from hal.worker import describe, run_inline, run_isolated

FACTOR = 16.0
ILL_CONDITIONED = 0.1  # a tolerance above this cannot tell a bug from rounding: the check is skipped
UNIT_ROUNDOFF = {"fp64": 2.0**-53, "fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11,
                 "16.16": 2.0**-11, "16.32": 2.0**-11}  # Graphcore's precisions compute in fp16
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
    precision: str = "fp32"  # the targets' precision; floors are measured in floor_precision(precision)

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
            f"{FLOOR_NAMES[floor_precision(self.precision)]} floor (normalised max err): "
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


def tolerance(floor: float, precision: str = "fp32", factor: float = FACTOR, measured_in: str = "fp32") -> float:
    """Tolerance for a target computing in ``precision``, from a floor measured in ``measured_in``
    (at least its unit roundoff), scaled by the two precisions' unit roundoffs."""
    floor = max(floor, UNIT_ROUNDOFF[measured_in])
    return factor * floor * UNIT_ROUNDOFF[precision] / UNIT_ROUNDOFF[measured_in]


FLOOR_NAMES = {"fp32": "float32", "bf16": "bf16 mixed", "fp16": "fp16 mixed"}


def floor_precision(precision: str) -> str:
    """The precision a floor for targets in ``precision`` is measured in: mixed precisions their own, others fp32."""
    return precision if precision in MIXED_PRECISIONS else "fp32"


def mixed_forward(spec: ModelSpec, weights: Weights, x: np.ndarray, training: bool, precision: str) -> np.ndarray:
    """The forward of ``spec`` in mixed ``precision`` as :mod:`hal.lowering`'s rules define it, computed
    straightforwardly: the numpy reference's ops in float64 on values rounded to the compute dtype (the input
    on entry, every op's output, the parameters of all but ``FP32_OPS``); the output as float32. Its error
    against float64 is the mixed-precision rounding floor."""
    from hal.backends.numpy import run_node

    low = COMPUTE_DTYPE[precision]
    params: dict[str, dict[str, np.ndarray]] = {n.name: {} for n in spec.nodes}
    for k, v in weights.items():
        node, _, name = k.rpartition(".")
        master = np.asarray(v, np.float32)
        params[node][name] = (master if isinstance(spec.node(node).op, FP32_OPS) else round_to(master, low)).astype(
            np.float64)
    values = {spec.input.name: round_to(x, low).astype(np.float64)}
    for node, free in zip(spec.nodes[1:], free_after(spec)[1:]):
        y = run_node(node, [values[k] for k in node.inputs], params[node.name], training)
        values[node.name] = round_to(y, low).astype(np.float64)
        for k in free:
            del values[k]
    return values[spec.output].astype(np.float32)


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
    isolate: bool = True,
    options: Mapping[str, Any] | None = None,
) -> ParityReport:
    """Compare ``targets`` on ``spec`` (see the module docstring). ``options`` are backend options
    (``hal.compile``'s), each given to the targets whose backend declares it; one no target declares is a
    ConfigError.

    Bad arguments raise :class:`~hal.errors.ConfigError`; a failing target never
    raises: each of its checks is a FAIL row with the error. With ``isolate``
    (the default) each target, and the float64 autodiff reference, runs in its
    own worker process (:mod:`hal.worker`): a framework that crashes or runs out
    of memory fails its rows and the run goes on, and this process loads no
    framework. The numpy references run here.
    """
    from hal.backends.numpy import NumpyExecutable

    targets, checks = _check_args(spec, targets, batch, checks, steps, config, seed, progress)
    per_backend = _options_per_backend(targets, options)
    config = config or TrainConfig(optimizer=SGD(lr=1e-3, momentum=0.9))
    if batch % config.grad_accum:
        raise ConfigError(f"parity: batch {batch} is not divisible by grad_accum {config.grad_accum}")
    say = progress or (lambda _msg: None)
    run = run_isolated if isolate else run_inline
    weights = check_weights(spec, weights) if weights is not None else init_weights(spec, seed, PARITY_RESIDUAL_GAMMA)
    x, y = make_batch(spec, batch, config.loss, seed)
    report = ParityReport(spec.name, batch, spec.input_shape, {}, precision=config.precision)

    # float64 reference and the float32 (or mixed-precision) floor, per forward mode
    ref: dict[str, np.ndarray] = {}
    train_ok = not any(isinstance(n.op, Dropout) and n.op.rate > 0 for n in spec.nodes)
    modes = [("forward", False)] + ([("forward_train", True)] if train_ok else [])
    for check, training in modes:
        if check not in checks and not (training and {"grads", "trajectory"} & set(checks)):
            continue
        say(f"reference {check}")
        ref[check] = NumpyExecutable(spec, weights, replace(config, precision="fp64")).predict(x, training)
        if config.precision in MIXED_PRECISIONS:
            low = mixed_forward(spec, weights, x, training, config.precision)
        else:
            low = NumpyExecutable(spec, weights, replace(config, precision="fp32")).predict(x, training)
        report.floor[check] = max(normalised_error(low, ref[check])[1], UNIT_ROUNDOFF[floor_precision(config.precision)])

    auto: dict[str, Any] = {}  # the float64 autodiff reference, computed once, when first needed
    trajectory_steps = steps if "trajectory" in checks else 0

    def autodiff_reference() -> dict[str, Any]:
        if not auto:
            say(f"autodiff reference ({REFERENCE_AUTODIFF}): float64, and plain "
                f"{FLOOR_NAMES[floor_precision(config.precision)]} for the floor")
            try:
                clean, floor = run(_autodiff_reference, spec, weights, config, x, y, trajectory_steps,
                                   label=f"float64 autodiff reference ({REFERENCE_AUTODIFF})")
            except HalError as exc:
                auto["error"] = str(exc)
            else:
                auto["clean"] = clean
                report.floor.update(floor)
        return auto

    for name in targets:
        try:
            target, cls = available_backend(name)
        except HalError as exc:
            report.results.append(CheckResult(str(name), "compile", passed=False, note=str(exc)))
            continue
        if target.backend == "numpy":
            for check in (c for c in checks if c in ref):
                report.results.append(CheckResult(str(target), check, 0.0, 0.0, 0.0, True, "the float64 reference itself"))
            continue
        rows: dict[str, CheckResult] = {}
        for check in (c for c in CHECKS if c in checks):
            reason = _not_applicable(check, ref, cls)
            if reason is None and check in ("grads", "trajectory") and "error" in autodiff_reference():
                rows[check] = CheckResult(str(target), check, passed=False, note=auto["error"])
            elif reason is not None:
                rows[check] = CheckResult(str(target), check, note=reason)
        todo = [c for c in CHECKS if c in checks and c not in rows]
        if todo:
            say(f"{target}: {', '.join(todo)}" + (" (in a worker process)" if isolate else ""))
            try:
                resolved, outputs = run(_run_target, spec, str(target), weights, config, todo, x, y, trajectory_steps,
                                        per_backend.get(cls.name, {}), label=str(target), progress=say)
            except HalError as exc:
                rows.update({c: CheckResult(str(target), c, passed=False, note=str(exc)) for c in todo})
            else:
                for check, (value, error, seconds) in outputs.items():
                    rows[check] = (
                        CheckResult(resolved, check, passed=False, note=error) if error is not None
                        else _compare(check, resolved, value, config, ref, report.floor, auto, spec, steps)
                    )
                    rows[check].seconds = seconds
                for row in rows.values():  # the skipped rows too: one name per target (``torch`` -> ``torch:cpu``)
                    row.target = resolved
        report.results.extend(rows[c] for c in CHECKS if c in rows)
    return report


def _options_per_backend(targets: Sequence[str], options: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per backend name of ``targets``, the ``options`` it declares; a ConfigError for an option that no
    target's backend declares (its values are checked by ``hal.compile``)."""
    if not options:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"parity: options must map an option name to a value, got {type(options).__name__}")
    backends = {}
    for name in targets:
        try:
            backends[Target.parse(name).backend] = get_backend(Target.parse(name).backend)
        except HalError:
            continue  # reported as that target's FAIL row
    names = options_per_backend("parity", list(backends.values()), list(options))
    return {b: {k: options[k] for k in ks} for b, ks in names.items()}


def _check_args(
    spec: Any, targets: Any, batch: Any, checks: Any, steps: Any, config: Any, seed: Any, progress: Any
) -> tuple[list[str], list[str]]:
    """Argument checks of :func:`run_parity`, as ConfigErrors naming the argument; returns the target and
    check lists."""
    check_common("parity", spec, config)
    targets, checks = check_names("parity", "targets", targets), check_names("parity", "checks", checks)
    bad = [c for c in checks if c not in CHECKS]
    if bad:
        raise ConfigError(f"parity: unknown checks {bad}; choose from {CHECKS}")
    check_int("parity", "batch", batch, 2, " (training-mode BatchNorm over one sample is degenerate)")
    if "trajectory" in checks:
        check_int("parity", "steps", steps, 1, " for the trajectory check")
    check_int("parity", "seed", seed, 0)
    if progress is not None and not callable(progress):
        raise ConfigError(f"parity: progress must be callable, got {type(progress).__name__}")
    return targets, checks


def check_common(where: str, spec: Any, config: Any) -> None:
    """``spec`` is a ModelSpec and ``config`` a TrainConfig or None, else a ConfigError."""
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"{where}: spec must be a hal ModelSpec, got {type(spec).__name__}")
    if config is not None and not isinstance(config, TrainConfig):
        raise ConfigError(f"{where}: config must be a hal.TrainConfig, got {type(config).__name__}")


def check_int(where: str, arg: str, value: Any, low: int, why: str = "") -> None:
    """``value`` is an int (not a bool) >= ``low``, else a ConfigError."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{where}: {arg} must be an int >= {low}{why}, got {value!r}")


def check_names(where: str, arg: str, values: Any) -> list[str]:
    """A non-empty list of strings, else a ConfigError (a lone string is refused: it would be
    read letter by letter; an empty list would check nothing and pass)."""
    if isinstance(values, str) or not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}: {arg} must be a list of strings, got {values!r}")
    if not values:
        raise ConfigError(f"{where}: no {arg} given: a run that checks nothing cannot pass")
    return list(values)


def available_backend(name: str) -> tuple[Target, type[Backend]]:
    """The parsed target and its backend class, if available here; raises a HalError saying
    why not. Imports no framework: the device is resolved where the target is compiled
    (:func:`hal.registry.resolve` may load the framework to list devices)."""
    target = Target.parse(name)
    cls = get_backend(target.backend)
    a = cls.availability()
    if not a.available:
        raise BackendUnavailable(f"target {str(target)!r} is not available: {a.reason}")
    return target, cls


def _not_applicable(check: str, ref: Mapping[str, np.ndarray], cls: type[Backend]) -> str | None:
    """Why ``check`` cannot be run on a target of backend ``cls`` (a skipped row), or None."""
    if check == "forward":
        return None
    if "forward_train" not in ref:
        what = "outputs" if check == "forward_train" else "gradients"
        return f"spec has active dropout: training-mode {what} are random"
    if check == "forward_train":
        return None
    try:
        available_backend(REFERENCE_AUTODIFF)
    except HalError as exc:
        return f"no float64 autodiff reference: {exc}"
    if not cls.capabilities().training:
        return f"{cls.name} does not train"
    return None


def _run_target(
    spec: ModelSpec, target: str, weights: Weights, config: TrainConfig, checks: Sequence[str], x: np.ndarray,
    y: np.ndarray, steps: int, options: Mapping[str, Any] | None = None, progress: Callable[[str], None] | None = None,
) -> tuple[str, dict[str, tuple[Any, str | None, float]]]:
    """Compile ``target`` once and compute what each check compares (run in a worker):
    ``(resolved target, {check: (value, error or None, seconds)})``; the first check's
    seconds include the compile."""
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    _, resolved = resolve(target, config.data_parallel)
    exe = compile(spec, resolved, weights, config, options=options)
    out: dict[str, tuple[Any, str | None, float]] = {}
    for check in checks:
        say(f"{resolved} {check}")
        value, error = None, None
        try:
            if check in ("forward", "forward_train"):
                value = exe.predict(x, training=check == "forward_train")
            elif check == "grads":
                value = exe.loss_and_grads(x, y)
            else:
                value = (exe.run_steps(np.stack([x] * steps), np.stack([y] * steps)), exe.weights())
        except Exception as exc:  # a check that raises fails alone; the next one still runs
            error = describe(exc)
        out[check] = (value, error, time.perf_counter() - t0)
        t0 = time.perf_counter()
    return str(resolved), out


def _compare(
    check: str, target: str, value: Any, config: TrainConfig, ref: Mapping[str, np.ndarray],
    floor: Mapping[str, float], auto: Mapping[str, Any], spec: ModelSpec, steps: int,
) -> CheckResult:
    """The row of one check from what the target computed."""
    measured_in = floor_precision(config.precision)
    tol = tolerance(floor[check], config.precision, measured_in=measured_in)
    if check in ("forward", "forward_train"):
        e_abs, rel = normalised_error(value, ref[check])
        note = ""
    elif check == "grads":
        e_abs, rel, note = grads_error(*value, auto["clean"])
    else:
        e_abs, rel, note = trajectory_error(*value, auto["clean"], spec)
        note = f"{steps} steps {type(config.optimizer).__name__}; {note}"
    if tol > ILL_CONDITIONED:
        return CheckResult(target, check, e_abs, rel, tol, None, f"ill-conditioned, {FLOOR_NAMES[measured_in]} "
                           "rounding alone moves it "
                           f"{floor[check]:.0e}: use a larger batch or smaller steps" + (f"; {note}" if note else ""))
    return CheckResult(target, check, e_abs, rel, tol, rel <= tol, note)


def _autodiff_reference(
    spec: ModelSpec, weights: Weights, config: TrainConfig, x: np.ndarray, y: np.ndarray, steps: int
) -> tuple[dict[str, Any], dict[str, float]]:
    """The float64 autodiff run and the floors of ``grads`` (and ``trajectory`` when
    ``steps``): the error of a plain float32 run (mixed precision: a plain run in it) against it
    (run in a worker)."""
    measured_in = floor_precision(config.precision)
    clean = _autodiff(spec, weights, config, x, y, steps, "fp64")
    plain = _autodiff(spec, weights, config, x, y, steps, measured_in)
    least = UNIT_ROUNDOFF[measured_in]
    floor = {"grads": max(grads_error(plain["loss"], plain["grads"], clean)[1], least)}
    if steps:
        floor["trajectory"] = max(trajectory_error(plain["losses"], plain["weights"], clean, spec)[1], least)
    return clean, floor


def _autodiff(
    spec: ModelSpec, weights: Weights, config: TrainConfig, x: np.ndarray, y: np.ndarray, steps: int, precision: str
) -> dict[str, Any]:
    """Loss, gradients, N-step losses and final weights of plain eager PyTorch on the CPU."""
    exe = compile(spec, REFERENCE_AUTODIFF, weights, replace(config, precision=precision), options={"fast": False})
    loss, grads = exe.loss_and_grads(x, y)
    if not steps:  # no trajectory check asked for
        return {"loss": loss, "grads": grads}
    losses = exe.run_steps(np.stack([x] * steps), np.stack([y] * steps))
    return {"loss": loss, "grads": grads, "losses": losses, "weights": exe.weights()}


def grads_error(loss: float, grads: Mapping[str, np.ndarray], ref: Mapping[str, Any]) -> tuple[float, float, str]:
    """Error of a loss and its gradients against ``ref`` (``{"loss", "grads"}``): ``(max abs, normalised, note)``."""
    g_abs, g_rel, worst = tensors_error(grads, ref["grads"])
    l_rel = abs(loss - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    return g_abs, max(g_rel, l_rel), f"worst tensor {worst}; loss rel err {l_rel:.1e}"


def trajectory_error(
    losses: np.ndarray, weights: Mapping[str, np.ndarray], ref: Mapping[str, Any], spec: ModelSpec
) -> tuple[float, float, str]:
    """Error of per-step losses and final weights against ``ref`` (``{"losses", "weights"}``); parameters
    and BatchNorm buffers are two separate vectors. ``(max abs, normalised, note)``."""
    l_abs, l_rel = normalised_error(losses, ref["losses"])
    ref_w, trainable = ref["weights"], set(spec.trainable())
    parts = [  # parameters and BatchNorm buffers are compared as two vectors
        tensors_error({k: weights[k] for k in ks}, {k: ref_w[k] for k in ks})
        for ks in ([k for k in ref_w if k in trainable], [k for k in ref_w if k not in trainable])
        if ks
    ]
    w_abs, w_rel, worst = max(parts, key=lambda t: t[1])
    return max(l_abs, w_abs), max(l_rel, w_rel), f"losses rel err {l_rel:.1e}; worst weight {worst}"


# -- data parallelism ------------------------------------------------------------------------


DP_OPTIMIZERS = (SGD(lr=0.05, momentum=0.9), AdamW(lr=0.01))


def run_dp_parity(
    spec: ModelSpec,
    targets: Sequence[str],
    replicas: int = 2,
    batch: int = 8,
    steps: int = 5,
    seed: int = 0,
    weights: Mapping[str, np.ndarray] | None = None,
    optimizers: Sequence[Any] = DP_OPTIMIZERS,
    progress: Callable[[str], None] | None = None,
    isolate: bool = True,
) -> ParityReport:
    """Data-parallel parity, the equivalences of :mod:`hal.training`, per target and optimizer:

    ``replicas``       ``replicas`` replicas, host batch ``batch``, grad_accum 1 vs one device with
                       grad_accum ``replicas``: per-step losses and parameters; BatchNorm running statistics
                       vs replica 0's rule (the single-device run's statistics updated from micro-batch 0 only:
                       a float64 executable with lr 0 fed micro-batch 0 at each step's weights)
    ``replicas_sync``  with ``sync_batchnorm`` (targets that have it) vs one device with grad_accum 1

    Each step gets its own batch. The reference is the float64 autodiff run (``torch:cpu``, plain eager); the
    tolerance is ``FACTOR`` times the error of the same run in float32 (the trajectory floor). With ``isolate``
    targets and the reference run in worker processes (replicas are processes either way); a target that fails
    fails its rows.
    """
    targets = check_names("parity", "targets", targets)
    check_common("parity", spec, None)
    check_int("parity", "replicas", replicas, 2, " for data-parallel parity")
    check_int("parity", "steps", steps, 1)
    check_int("parity", "seed", seed, 0)
    check_int("parity", "batch", batch, 2 * replicas, " (two samples per replica at least)")
    if batch % replicas:
        raise ConfigError(f"parity: batch {batch} is not divisible by replicas {replicas}")
    say = progress or (lambda _msg: None)
    run = run_isolated if isolate else run_inline
    weights = check_weights(spec, weights) if weights is not None else init_weights(spec, seed, PARITY_RESIDUAL_GAMMA)
    loss = "cross_entropy" if len(spec.output_shape) == 1 else "mse"
    batches = [make_batch(spec, batch, loss, seed + i) for i in range(steps)]
    xs, ys = np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])
    report = ParityReport(spec.name, batch, spec.input_shape, {})
    refs: dict[tuple[str, bool], Any] = {}

    def reference(opt: Any, sync: bool) -> dict[str, Any]:
        key = (repr(opt), sync)
        if key not in refs:
            say(f"float64 reference: {type(opt).__name__}{', synchronised BatchNorm' if sync else ''}")
            config = TrainConfig(loss=loss, optimizer=opt, data_parallel=DataParallel(replicas, sync_batchnorm=sync))
            try:
                refs[key] = run(_dp_reference, spec, weights, config, xs, ys, label="float64 reference")
            except HalError as exc:
                refs[key] = {"error": str(exc)}
        return refs[key]

    for name in targets:
        try:
            target, cls = available_backend(name)
        except HalError as exc:
            report.results.append(CheckResult(str(name), "compile", passed=False, note=str(exc)))
            continue
        caps = cls.capabilities()
        for sync in (False, True):
            check = "replicas_sync" if sync else "replicas"
            for opt in optimizers:
                what = f"{check}/{type(opt).__name__}"
                if not caps.data_parallel or (sync and not caps.sync_batchnorm):
                    report.results.append(CheckResult(str(target), what, note=f"{cls.name} has no "
                                                      + ("synchronised BatchNorm" if caps.data_parallel else
                                                         "data parallelism")))
                    continue
                ref = reference(opt, sync)
                if "error" in ref:
                    report.results.append(CheckResult(str(target), what, passed=False, note=ref["error"]))
                    continue
                config = TrainConfig(loss=loss, optimizer=opt, data_parallel=DataParallel(replicas, sync_batchnorm=sync))
                say(f"{target}: {what} ({replicas} replica processes, {steps} steps)")
                t0 = time.perf_counter()
                try:
                    resolved, losses, final = run(_dp_run, spec, str(target), weights, config, xs, ys,
                                                           label=str(target))
                except HalError as exc:
                    report.results.append(CheckResult(str(target), what, passed=False, note=str(exc)))
                    continue
                floor = report.floor.setdefault(what, ref["floor"])
                e_abs, rel, note = trajectory_error(losses, final, ref, spec)
                tol = tolerance(floor)
                report.results.append(CheckResult(
                    resolved, what, e_abs, rel, tol, rel <= tol if tol <= ILL_CONDITIONED else None,
                    f"{steps} steps, {replicas} replicas vs one device; {note}", time.perf_counter() - t0))
    return report


def _dp_run(
    spec: ModelSpec, target: str, weights: Weights, config: TrainConfig, xs: np.ndarray, ys: np.ndarray
) -> tuple[str, np.ndarray, Weights]:
    """Losses of ``run_steps`` and final weights of a data-parallel run (in a worker)."""
    _, resolved = resolve(target, config.data_parallel)
    exe = compile(spec, resolved, weights, config)
    try:
        return str(resolved), exe.run_steps(xs, ys), exe.weights()
    finally:
        exe.close()


def _dp_reference(
    spec: ModelSpec, weights: Weights, config: TrainConfig, xs: np.ndarray, ys: np.ndarray
) -> dict[str, Any]:
    """What a data-parallel ``config`` must compute, from single-device float64 runs, and the floor: the
    normalised error of the same runs in float32 (in a worker)."""
    clean = _dp_expected(spec, weights, config, xs, ys, "fp64")
    plain = _dp_expected(spec, weights, config, xs, ys, "fp32")
    return {**clean, "floor": max(trajectory_error(plain["losses"], plain["weights"], clean, spec)[1],
                                  UNIT_ROUNDOFF["fp32"])}


def _dp_expected(
    spec: ModelSpec, weights: Weights, config: TrainConfig, xs: np.ndarray, ys: np.ndarray, precision: str
) -> dict[str, Any]:
    """Per-step losses and final weights of one device with grad_accum ``replicas`` (grad_accum 1 with synchronised
    BatchNorm); without it the BatchNorm running statistics follow replica 0's micro-batches only."""
    dp = config.data_parallel
    single = replace(config, precision=precision, data_parallel=DataParallel(),
                     grad_accum=config.grad_accum * (1 if dp.sync_batchnorm else dp.replicas))
    exe = compile(spec, REFERENCE_AUTODIFF, weights, single, options={"fast": False})
    trainable = set(spec.trainable())
    stats = {k: v for k, v in weights.items() if k not in trainable}
    replica0 = None if dp.sync_batchnorm or not stats else compile(
        spec, REFERENCE_AUTODIFF, weights, TrainConfig(loss=config.loss, optimizer=SGD(lr=0.0), precision=precision,
                                                       grad_accum=config.grad_accum), options={"fast": False})
    b = xs.shape[1] // dp.replicas
    losses = []
    for x, y in zip(xs, ys):
        if replica0 is not None:  # replica 0's statistics, updated from its rows at this step's weights
            replica0.load_weights({**exe.weights(), **stats})
            replica0.train_step(x[:b], y[:b])
            stats = {k: v for k, v in replica0.weights().items() if k not in trainable}
        losses.append(exe.train_step(x, y))
    final = exe.weights()
    return {"losses": np.array(losses), "weights": {**final, **stats} if replica0 is not None else final}
