"""The device interface: ``Target``, ``Backend`` and ``Executable``.

A backend is one module holding one :class:`Backend` subclass, registered under
the ``hal.backends`` entry-point group. Backend modules import their framework
lazily (inside methods), so listing backends imports no framework.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

from hal.errors import ConfigError, InputError, NonFiniteError, TargetError, UnsupportedError
from hal.spec import OPS, BatchNorm, ModelSpec
from hal.training import DataParallel, TrainConfig
from hal.weights import check_weights

if TYPE_CHECKING:
    from hal.ipu import Plan

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Target:
    """``backend[:device]``, e.g. ``numpy``, ``torch:cpu``, ``torch:cuda:0``, ``poptorch:ipu``."""

    backend: str
    device: str = ""

    @classmethod
    def parse(cls, text: "str | Target") -> "Target":
        if isinstance(text, Target):
            return text
        if not isinstance(text, str) or not text.strip():
            raise TargetError(f"a target is a string 'backend[:device]' such as 'torch:cpu', got {text!r}")
        backend, _, device = text.strip().partition(":")
        if not backend:
            raise TargetError(f"target {text!r} has no backend name")
        return cls(backend, device)

    def __str__(self) -> str:
        return f"{self.backend}:{self.device}" if self.device else self.backend


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; ``reason`` says why not and how to fix it."""

    available: bool
    version: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class Capabilities:
    ops: frozenset[str] = frozenset(OPS)
    precisions: tuple[str, ...] = ("fp32",)
    training: bool = True
    pipelining: bool = False
    replication: bool = False
    data_parallel: bool = False  # runs TrainConfig.data_parallel with more than one replica
    sync_batchnorm: bool = False  # ... and DataParallel(sync_batchnorm=True)


@dataclass(frozen=True)
class Option:
    """A backend option, passed as ``hal.compile(..., options={name: value})``."""

    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None  # None: any value of the default's type

    def check(self, backend: str, name: str, value: Any) -> Any:
        """``value`` if it is legal for this option; raises :class:`ConfigError` otherwise."""
        if self.choices is not None:
            if not any(type(value) is type(c) and value == c for c in self.choices):  # 1 is not True here
                raise ConfigError(f"{backend} option {name!r} must be one of {self.choices}, got {value!r}")
        elif self.default is not None and type(value) is not type(self.default) and not (
            isinstance(self.default, float) and type(value) is int
        ):
            raise ConfigError(f"{backend} option {name!r} takes a {type(self.default).__name__}, got {value!r}")
        return value


def package_availability(module: str, dist: str, hint: str) -> Availability:
    """Availability of a framework package without importing it."""
    if importlib.util.find_spec(module) is None:
        return Availability(False, None, f"{module} is not installed: {hint}")
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return Availability(True, version)


class Backend(ABC):
    """A software stack. Subclasses set ``name`` and implement the four methods."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability:
        """Can this backend run here? Must not import the framework if it is absent."""

    @classmethod
    @abstractmethod
    def devices(cls) -> list[str]:
        """Device names usable in a target (``cpu``, ``cuda:0``, ...); the first is the default."""

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities()

    @classmethod
    def options(cls) -> dict[str, Option]:
        """The options ``compile`` takes (name -> default, meaning); none by default."""
        return {}

    @classmethod
    def unsupported(cls, spec: ModelSpec, config: TrainConfig | None = None) -> dict[str, str]:
        """Nodes (or ``"config"``) this backend cannot run, with the reason."""
        caps = cls.capabilities()
        out = {n.name: f"{cls.name} has no {n.op.kind} op" for n in spec.nodes if n.op.kind not in caps.ops}
        if config is not None and config.precision not in caps.precisions:
            out["config"] = f"{cls.name} supports precisions {caps.precisions}, not {config.precision!r}"
        return out

    @classmethod
    def prepare_data_parallel(cls, dp: DataParallel) -> None:
        """Configure the framework for ``dp`` before any device is resolved (JAX fixes its number of host
        devices when it starts); called by :func:`hal.registry.resolve`. Nothing to do by default."""

    @classmethod
    def resolve_device(cls, device: str) -> str:
        """Normalise a device name (``cuda`` -> ``cuda:0``); raise listing the devices here."""
        devices = cls.devices()
        if not device:
            return devices[0]
        if device in devices:
            return device
        if f"{device}:0" in devices:
            return f"{device}:0"
        raise TargetError(f"{cls.name} has no device {device!r} here; devices: {devices or 'none'}")

    @classmethod
    @abstractmethod
    def compile(
        cls, spec: ModelSpec, weights: Weights, device: str, config: TrainConfig, options: Mapping[str, Any],
        plan: "Plan | None",
    ) -> "Executable":
        """Build an executable for ``spec`` with canonical ``weights`` on ``device``.

        Called by :func:`hal.compile` with everything checked: ``device`` resolved,
        ``weights`` complete, ``options`` holding every declared option (defaults
        filled in), ``plan`` an IPU plan only if ``capabilities().pipelining``."""


class Executable(ABC):
    """A compiled model: the same surface on every backend, numpy in and out.

    Inputs are channels-first ``(N, C, *spatial)`` floats; labels are integer
    classes ``(N,)`` for cross-entropy and floats ``(N, *output)`` for MSE.

    The public methods are defined here, once: they validate their arguments
    and then call the backend's hooks (``_predict``, ``_loss_and_grads``,
    ``_train_step`` / ``_run_steps``, ``_load_weights``), which trust what they
    receive. A training hook reports how many leading steps it *applied*: with
    ``config.check_finite`` a step whose loss or any gradient is not finite is
    not applied (weights, optimizer state, BatchNorm statistics and ``step``
    stay as before it), nor is any later step of the same call, and the base
    raises :class:`~hal.errors.NonFiniteError` naming the step.
    """

    def __init__(self, spec: ModelSpec, target: Target, config: TrainConfig) -> None:
        self.spec = spec
        self.target = target
        self.config = config
        self.step = 0  # optimizer steps applied; the backend advances it

    # -- the surface ------------------------------------------------------------

    def predict(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Forward pass. ``training=True`` is the training-mode forward (batch
        statistics in BatchNorm, dropout active) without updating any state."""
        if not isinstance(training, bool):
            raise InputError(f"{self.target}: predict(training=...) takes a bool, got {training!r}")
        x = self.check_x(x)
        if training:
            self._check_batch_statistics(len(x))
        return self._predict(x, training)

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        """Training-mode loss and the gradients of the trainable parameters
        (canonical names and layouts), with gradient accumulation as configured;
        no update of weights or BatchNorm statistics."""
        x, y = self.check_xy(x, y)
        return self._loss_and_grads(x, y)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step (forward, backward, update); returns the mean loss."""
        x, y = self.check_xy(x, y)
        loss, applied = self._train_step(x, y)
        self._raise_if_not_applied(np.array([loss]), int(applied))
        return float(loss)

    def run_steps(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """``len(xs)`` training steps in one call; returns the loss per step."""
        self.check_steps(xs, ys)
        losses, applied = self._run_steps(xs, ys)
        self._raise_if_not_applied(losses, applied)
        return np.asarray(losses, dtype=np.float64)

    @property
    def loss_scale(self) -> float | None:
        """fp16: the current dynamic loss scale (:data:`hal.lowering.LOSS_SCALE`'s rule); otherwise ``None``."""
        return None

    def close(self) -> None:
        """Release what the executable holds beyond memory (data-parallel replica processes); nothing by default.
        ``with hal.compile(...) as exe:`` closes it at the end of the block."""

    def __enter__(self) -> "Executable":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def weights(self) -> Weights:
        """Current weights and buffers, canonical names and layouts, on the host."""

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all weights and buffers. Checked against the spec first: a bad
        tensor raises :class:`~hal.errors.WeightsError` and changes nothing."""
        self._load_weights(check_weights(self.spec, weights, f"{self.target}: load_weights"))

    # -- the backend's hooks ----------------------------------------------------------

    @abstractmethod
    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Forward of a checked batch."""

    @abstractmethod
    def _load_weights(self, weights: Weights) -> None:
        """Load checked canonical weights (all of them; convert before replacing)."""

    def _loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        raise UnsupportedError(f"{self.target} does not compute gradients: it is inference-only")

    def _train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
        """One step on a checked batch: ``(loss, applied)``. Defaults to ``_run_steps`` on a stack of one."""
        losses, applied = self._run_steps(x[None], y[None])
        return float(losses[0]), applied == 1

    def _run_steps(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, int]:
        """Steps on checked stacked batches: ``(losses (S,), leading steps applied)``.
        Defaults to ``_train_step`` per batch, stopping after the first step not applied."""
        if type(self)._train_step is Executable._train_step:
            raise UnsupportedError(f"{self.target} does not train: it is inference-only")
        losses = np.full(len(xs), np.nan)
        for i, (x, y) in enumerate(zip(xs, ys)):
            losses[i], applied = self._train_step(x, y)
            if not applied:
                return losses, i
        return losses, len(xs)

    def _raise_if_not_applied(self, losses: np.ndarray, applied: int) -> None:
        if applied == len(losses):
            return
        loss = losses[applied]
        what = f"the loss is {loss}" if not np.isfinite(loss) else f"the loss is {loss:.6g} but a gradient is not finite"
        where = f" (batch {applied} of this run_steps call)" if len(losses) > 1 else ""
        raise NonFiniteError(
            f"{self.target}: training step {self.step}{where} was not applied: {what}. The weights are as they "
            "were before it. Check the inputs and labels for NaN/inf, or lower the learning rate; "
            "TrainConfig(check_finite=False) applies such steps anyway.",
            step=self.step,
        )

    # -- checks shared by every backend ------------------------------------------

    def check_x(self, x: object) -> np.ndarray:
        want = self.spec.input_shape
        if not isinstance(x, np.ndarray):
            raise InputError(f"{self.target}: input must be a numpy array of shape (N, {_fmt(want)}), got {type(x).__name__}")
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want or x.shape[0] < 1:
            raise InputError(
                f"{self.target}: input of spec {self.spec.name!r} must have shape (N, {_fmt(want)}) "
                f"with N >= 1, got {tuple(x.shape)}"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{self.target}: input must be a floating-point array, got dtype {x.dtype}")
        return x

    def check_xy(self, x: object, y: object) -> tuple[np.ndarray, np.ndarray]:
        x = self.check_x(x)
        n, out = x.shape[0], self.spec.output_shape
        if not isinstance(y, np.ndarray):
            raise InputError(f"{self.target}: labels must be a numpy array, got {type(y).__name__}")
        if self.config.loss == "cross_entropy":
            if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
                raise InputError(
                    f"{self.target}: cross_entropy labels must be integers of shape ({n},), "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if len(out) != 1:
                raise InputError(f"{self.target}: cross_entropy needs (classes,) logits, the spec outputs {out}")
            if y.min() < 0 or y.max() >= out[0]:
                raise InputError(f"{self.target}: labels must lie in [0, {out[0]}), got [{y.min()}, {y.max()}]")
        else:
            if tuple(y.shape) != (n, *out) or not np.issubdtype(y.dtype, np.floating):
                raise InputError(
                    f"{self.target}: mse targets must be floats of shape ({n}, {_fmt(out)}), "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
        g, dp = self.config.grad_accum, self.config.data_parallel
        if n % (dp.replicas * g):
            raise InputError(
                f"{self.target}: batch {n} is not divisible by replicas {dp.replicas} * grad_accum {g}"
                if dp.replicas > 1 else f"{self.target}: batch {n} is not divisible by grad_accum {g}"
            )
        # BatchNorm statistics cover one replica's micro-batch, or the micro-batch of every replica when synchronised
        self._check_batch_statistics(n * dp.hosts // g if dp.sync_batchnorm else n // (dp.replicas * g))
        return x, y

    def _check_batch_statistics(self, micro_batch: int) -> None:
        """Training-mode BatchNorm needs more than one value per channel (torch refuses it too)."""
        for name, positions in self._batchnorm_positions:
            if micro_batch * positions < 2:
                raise InputError(
                    f"{self.target}: training-mode BatchNorm at node {name!r} needs more than one value per "
                    f"channel, got a (micro-)batch of {micro_batch} with {positions} position(s) per channel"
                )

    @functools.cached_property
    def _batchnorm_positions(self) -> list[tuple[str, int]]:
        """``(node, values per channel per sample)`` of every BatchNorm, fewest first."""
        sizes = [(n.name, math.prod(self.spec.in_shapes(n)[0][1:])) for n in self.spec.nodes
                 if isinstance(n.op, BatchNorm)]
        return sorted(sizes, key=lambda t: t[1])[:1]

    def check_steps(self, xs: object, ys: object) -> None:
        if (not isinstance(xs, np.ndarray) or not isinstance(ys, np.ndarray) or xs.ndim < 2 or ys.ndim < 1
                or len(xs) != len(ys) or len(xs) == 0):
            raise InputError(
                f"{self.target}: run_steps takes stacked batches xs (S, N, ...) and ys (S, N, ...) with the same S >= 1"
            )
        for x, y in zip(xs, ys):
            self.check_xy(x, y)


def _fmt(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))
