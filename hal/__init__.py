"""hal: define a CNN once, run it on many software stacks, compare them.

The core imports nothing but numpy; frameworks load when a backend is used.
"""

from hal.backend import Availability, Backend, Capabilities, Executable, Target
from hal.errors import (
    BackendUnavailable,
    ConfigError,
    HalError,
    InputError,
    NonFiniteError,
    SpecError,
    TargetError,
    UnsupportedError,
    WeightsError,
)
from hal.registry import available_targets, backend_names, compile, get_backend, register_backend
from hal.spec import ModelSpec, Node, SpecBuilder
from hal.training import SGD, Adam, AdamW, Constant, Cosine, DataParallel, StepDecay, TrainConfig
from hal.weights import check_weights, init_weights, load_weights, save_weights

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``hal.to_onnx`` and ``hal.from_onnx`` load :mod:`hal.onnx`, ``hal.from_torch`` loads
    :mod:`hal.importers.torch`, on first use (``import hal`` stays numpy-only)."""
    if name in ("to_onnx", "from_onnx"):
        from hal import onnx

        return getattr(onnx, name)
    if name == "from_torch":
        from hal.importers.torch import from_torch

        return from_torch
    raise AttributeError(f"module 'hal' has no attribute {name!r}")


__all__ = [
    "Adam", "AdamW", "Availability", "Backend", "BackendUnavailable", "Capabilities", "ConfigError",
    "Constant", "Cosine", "DataParallel", "Executable", "HalError", "InputError", "ModelSpec", "Node", "NonFiniteError", "SGD", "SpecBuilder",
    "SpecError", "StepDecay", "Target", "TargetError", "TrainConfig", "UnsupportedError", "WeightsError",
    "available_targets", "backend_names", "check_weights", "compile", "from_onnx", "from_torch", "get_backend",
    "init_weights", "load_weights", "register_backend", "save_weights", "to_onnx",
]
