"""The exceptions hal raises for anything a user can cause.

Every message says what was expected and where (node name, parameter name,
target, package to install). Catch :class:`HalError` to catch them all.
"""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 4, 60, 60


def show(value: Any) -> str:
    """``repr`` for error messages, bounded in length and depth (a user's value may be huge or deeply nested)."""
    return _REPR.repr(value)


class HalError(Exception):
    """Base class of every error hal raises on purpose."""


class SpecError(HalError, ValueError):
    """A malformed model spec; the message names the node."""

    def __init__(self, message: str, node: str | None = None) -> None:
        self.node = node
        super().__init__(f"node {node!r}: {message}" if node is not None else message)


class WeightsError(HalError, ValueError):
    """Weights that do not match the spec, or a corrupt weights file."""


class TargetError(HalError, ValueError):
    """An unknown target string or device."""


class BackendUnavailable(HalError, RuntimeError):
    """A known backend whose framework is not installed here; says how to get it."""


class UnsupportedError(HalError, NotImplementedError):
    """A backend cannot run some nodes of a spec or some part of a config."""


class InputError(HalError, ValueError):
    """A batch (inputs or labels) of the wrong shape, dtype or range."""


class ConfigError(HalError, ValueError):
    """An invalid training, parity or benchmark configuration."""


class NonFiniteError(HalError, ArithmeticError):
    """A training step produced a non-finite loss or gradient; it was not applied."""

    def __init__(self, message: str, step: int) -> None:
        self.step = step
        super().__init__(message)


class WorkerError(HalError, RuntimeError):
    """A target's worker process died (crash, out of memory, kill) or failed to start."""
