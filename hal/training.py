"""The neutral training configuration: loss, optimizer, LR schedule, gradient
accumulation and precision, each with one exact meaning.

Optimizers follow ``torch.optim`` exactly (coupled L2 weight decay in SGD and
Adam, decoupled in AdamW; SGD momentum buffer ``b = mu*b + g`` with dampening 0,
Nesterov ``g + mu*b``). Schedules are functions of the optimizer step (0-based):
the step that applies update ``t`` uses ``lr * schedule.factor(t)``. A backend
whose framework default differs implements these rules rather than its own.

Gradient accumulation ``G`` splits each batch into ``G`` equal micro-batches,
runs forward/backward on each (BatchNorm statistics per micro-batch; running
statistics updated once per micro-batch, as on the IPU) and applies the mean of
the micro-batch gradients, i.e. the gradient of the mean micro-batch loss.

Data parallelism (``TrainConfig.data_parallel``, :class:`DataParallel`) runs
``replicas`` replicas on each of ``hosts`` hosts (``world = replicas * hosts``):

- ``train_step``/``run_steps``/``loss_and_grads`` take *this host's* batch
  (global batch / hosts). Replica ``r`` of host ``h`` (global replica
  ``h * replicas + r``) gets rows ``[r*b, (r+1)*b)`` with ``b = batch / replicas``
  and splits them into ``grad_accum`` micro-batches, so the batch must be
  divisible by ``replicas * grad_accum``.
- Gradients are the mean over replicas and micro-batches (the gradient of the
  mean micro-batch loss over all ``world * grad_accum`` micro-batches); the
  returned loss is that mean, the same on every host. Hence ``R`` replicas with
  ``grad_accum`` 1 and host batch ``B`` equal one device with batch ``B`` and
  ``grad_accum`` ``R``: micro-batch ``i`` is rows ``[i*B/R, (i+1)*B/R)`` in both.
- BatchNorm uses each replica's micro-batch statistics. Running statistics are
  replica 0's (the rule of DDP's ``broadcast_buffers=True``: rank 0's buffers
  win), i.e. updated once per micro-batch of replica 0 only; every replica holds
  them after each step. With ``sync_batchnorm`` (where the engine has it)
  statistics cover the same micro-batch index of all replicas, which equals one
  device with batch ``B`` and ``grad_accum`` ``G``.
- The schedule counts optimizer steps; with ``check_finite`` a step is skipped
  on all replicas alike (gradients are reduced before the check).
- ``weights()`` are replica 0's; ``predict`` gives the single-device result.
- A seed fixes which samples each replica sees: ``hal train`` shuffles the
  global dataset per epoch with the seed, cuts global batches, host ``h`` takes
  slice ``h`` and replica ``r`` slice ``r`` of that.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Union

from hal.errors import ConfigError, show

LOSSES = ("cross_entropy", "mse")
PRECISIONS = ("fp32", "fp64", "bf16", "fp16", "16.16", "16.32")


@dataclass(frozen=True)
class SGD:
    """``torch.optim.SGD`` (dampening 0)."""

    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _nonneg(self, "lr", "momentum", "weight_decay")
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"SGD: nesterov must be a bool, got {show(self.nesterov)}")
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("SGD: nesterov requires momentum > 0 (as in torch.optim.SGD)")


@dataclass(frozen=True)
class Adam:
    """``torch.optim.Adam``: weight decay is L2 added to the gradient (coupled)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _nonneg(self, "lr", "eps", "weight_decay")
        betas = self.betas
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(_real(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(f"{type(self).__name__}: betas must be two numbers in [0, 1), got {show(self.betas)}")


@dataclass(frozen=True)
class AdamW(Adam):
    """``torch.optim.AdamW``: decoupled weight decay ``p -= lr * wd * p``."""

    weight_decay: float = 1e-2


Optimizer = Union[SGD, Adam, AdamW]


@dataclass(frozen=True)
class Constant:
    """Constant learning rate."""

    def factor(self, step: int) -> float:
        """The learning-rate factor of optimizer step ``step`` (0-based)."""
        _check_step(step)
        return 1.0


@dataclass(frozen=True)
class StepDecay:
    """``torch.optim.lr_scheduler.StepLR`` stepped once per optimizer step:
    factor ``gamma ** (step // step_size)``."""

    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if not (_int(self.step_size) and self.step_size >= 1):
            raise ConfigError(f"StepDecay: step_size must be an int >= 1, got {show(self.step_size)}")
        _nonneg(self, "gamma")

    def factor(self, step: int) -> float:
        """The learning-rate factor of optimizer step ``step`` (0-based)."""
        _check_step(step)
        try:
            return self.gamma ** (step // self.step_size)
        except OverflowError:
            raise ConfigError(f"StepDecay: the factor gamma ** (step // step_size) overflows at step {step}") from None


@dataclass(frozen=True)
class Cosine:
    """Linear warm-up from ``warmup_start`` to 1 over ``warmup_steps`` steps
    (step ``t < warmup_steps`` gets ``warmup_start + (1 - warmup_start) * t / warmup_steps``),
    then cosine decay to ``min_factor`` at ``total_steps``; constant after."""

    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if not (_int(self.warmup_steps) and _int(self.total_steps) and 0 <= self.warmup_steps < self.total_steps):
            raise ConfigError(
                f"Cosine: need ints 0 <= warmup_steps < total_steps, got {show(self.warmup_steps)}, {show(self.total_steps)}"
            )
        _nonneg(self, "warmup_start", "min_factor")

    def factor(self, step: int) -> float:
        """The learning-rate factor of optimizer step ``step`` (0-based)."""
        _check_step(step)
        if step < self.warmup_steps:
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup_steps
        t = min(step - self.warmup_steps, self.total_steps - self.warmup_steps)
        cos = 0.5 * (1.0 + math.cos(math.pi * t / (self.total_steps - self.warmup_steps)))
        return self.min_factor + (1.0 - self.min_factor) * cos


Schedule = Union[Constant, StepDecay, Cosine]


@dataclass(frozen=True)
class DataParallel:
    """Data parallelism: ``replicas`` per host on ``hosts`` hosts (rules in the module docstring).

    For ``hosts > 1`` every host runs the same program with its own ``host_rank``
    (0 .. hosts-1) and the same ``coordinator`` ``"address:port"``, which host 0
    listens on."""

    replicas: int = 1
    hosts: int = 1
    sync_batchnorm: bool = False
    host_rank: int = 0
    coordinator: str = ""

    def __post_init__(self) -> None:
        for n in ("replicas", "hosts"):
            v = getattr(self, n)
            if not (_int(v) and v >= 1):
                raise ConfigError(f"DataParallel: {n} must be an int >= 1, got {show(v)}")
        if not isinstance(self.sync_batchnorm, bool):
            raise ConfigError(f"DataParallel: sync_batchnorm must be a bool, got {show(self.sync_batchnorm)}")
        if not (_int(self.host_rank) and 0 <= self.host_rank < self.hosts):
            raise ConfigError(
                f"DataParallel: host_rank must be an int in [0, hosts={self.hosts}), got {show(self.host_rank)}"
            )
        if not isinstance(self.coordinator, str):
            raise ConfigError(f"DataParallel: coordinator must be a string 'address:port', got {show(self.coordinator)}")
        if self.coordinator:
            self.coordinator_address()
        elif self.hosts > 1:
            raise ConfigError(
                f"DataParallel: {self.hosts} hosts need coordinator='address:port' (host 0's address, a free port), "
                "the same on every host"
            )

    @property
    def world(self) -> int:
        """Replicas in all: ``replicas * hosts``."""
        return self.replicas * self.hosts

    @property
    def enabled(self) -> bool:
        """More than one replica in all."""
        return self.world > 1

    def coordinator_address(self) -> tuple[str, int]:
        """``coordinator`` as ``(address, port)``; raises :class:`ConfigError` if malformed."""
        host, sep, port = self.coordinator.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                f"DataParallel: coordinator must be 'address:port' with a port in 1..65535, got {show(self.coordinator)}"
            )
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class TrainConfig:
    """How a compiled model trains. ``precision`` is the compute precision:
    ``fp32`` (default), ``fp64`` (reference runs), ``bf16``/``fp16`` mixed
    (fp32 master weights), or Graphcore's IPU precisions ``16.16``/``16.32``
    ("compute.master": activations and gradients in fp16, master weights in
    fp16 or fp32, stochastic rounding, static loss scaling; IPU targets only;
    the partials' type is the plan's ``half_partials``). With ``check_finite`` (default) a training step whose
    loss or any gradient is not finite is not applied: it raises
    :class:`hal.errors.NonFiniteError` naming the step, weights as before it. Under ``fp16`` a
    non-finite gradient with a finite loss is the loss scaler's overflow instead: the step is
    skipped and the scale halved, as ``torch.amp.GradScaler`` does (:mod:`hal.lowering`).
    ``data_parallel`` spreads each step over replicas (module docstring)."""

    loss: str = "cross_entropy"
    optimizer: Optimizer = field(default_factory=SGD)
    schedule: Schedule = field(default_factory=Constant)
    grad_accum: int = 1
    precision: str = "fp32"
    check_finite: bool = True
    data_parallel: DataParallel = field(default_factory=DataParallel)

    def __post_init__(self) -> None:
        if not isinstance(self.data_parallel, DataParallel):
            raise ConfigError(f"data_parallel must be a hal.training.DataParallel, got {show(self.data_parallel)}")
        if not isinstance(self.check_finite, bool):
            raise ConfigError(f"check_finite must be a bool, got {show(self.check_finite)}")
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {show(self.loss)}")
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {show(self.precision)}")
        if not _int(self.grad_accum) or self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be an int >= 1, got {show(self.grad_accum)}")
        if not isinstance(self.optimizer, (SGD, Adam)):
            raise ConfigError(f"optimizer must be hal.training.SGD, Adam or AdamW, got {show(self.optimizer)}")
        if not isinstance(self.schedule, (Constant, StepDecay, Cosine)):
            raise ConfigError(f"schedule must be a Constant, StepDecay or Cosine instance, got {show(self.schedule)}")

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        return self.optimizer.lr * self.schedule.factor(step)


def _real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_step(step: object) -> None:
    if not (_int(step) and step >= 0):  # type: ignore[operator]
        raise ConfigError(f"an optimizer step must be an int >= 0, got {show(step)}")


def _nonneg(obj: object, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not (_real(v) and v >= 0):
            raise ConfigError(f"{type(obj).__name__}: {n} must be a finite number >= 0, got {show(v)}")
