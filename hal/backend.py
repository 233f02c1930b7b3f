"""The device interface: ``Target``, ``Backend`` and ``Executable``.

A backend is one module holding one :class:`Backend` subclass, registered under
the ``hal.backends`` entry-point group. Backend modules import their framework
lazily (inside methods), so listing backends imports no framework.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np

from hal.errors import InputError, TargetError, UnsupportedError
from hal.spec import OPS, ModelSpec
from hal.training import TrainConfig

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
    def unsupported(cls, spec: ModelSpec, config: TrainConfig | None = None) -> dict[str, str]:
        """Nodes (or ``"config"``) this backend cannot run, with the reason."""
        caps = cls.capabilities()
        out = {n.name: f"{cls.name} has no {n.op.kind} op" for n in spec.nodes if n.op.kind not in caps.ops}
        if config is not None and config.precision not in caps.precisions:
            out["config"] = f"{cls.name} supports precisions {caps.precisions}, not {config.precision!r}"
        return out

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
    def compile(cls, spec: ModelSpec, weights: Weights, device: str, config: TrainConfig) -> "Executable":
        """Build an executable for ``spec`` with canonical ``weights`` on ``device``."""


class Executable(ABC):
    """A compiled model: the same surface on every backend, numpy in and out.

    Inputs are channels-first ``(N, C, *spatial)`` floats; labels are integer
    classes ``(N,)`` for cross-entropy and floats ``(N, *output)`` for MSE.
    """

    def __init__(self, spec: ModelSpec, target: Target, config: TrainConfig) -> None:
        self.spec = spec
        self.target = target
        self.config = config
        self.step = 0  # optimizer steps taken

    # -- the surface ------------------------------------------------------------

    @abstractmethod
    def predict(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Forward pass. ``training=True`` is the training-mode forward (batch
        statistics in BatchNorm, dropout active) without updating any state."""

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        """Training-mode loss and the gradients of the trainable parameters
        (canonical names and layouts), with gradient accumulation as configured;
        no update of weights or BatchNorm statistics."""
        raise UnsupportedError(f"{self.target} does not compute gradients")

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step (forward, backward, update); returns the mean loss."""
        raise UnsupportedError(f"{self.target} does not train")

    def run_steps(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """``len(xs)`` training steps in one call; returns the loss per step."""
        self.check_steps(xs, ys)
        return np.array([self.train_step(x, y) for x, y in zip(xs, ys)], dtype=np.float64)

    @abstractmethod
    def weights(self) -> Weights:
        """Current weights and buffers, canonical names and layouts, on the host."""

    @abstractmethod
    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all weights and buffers (checked against the spec)."""

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
        g = self.config.grad_accum
        if n % g:
            raise InputError(f"{self.target}: batch {n} is not divisible by grad_accum {g}")
        return x, y

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
