"""Shared fixtures for the core tests (kept small on purpose)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# One intra-op thread per framework: the CI box has 2 cores shared with other jobs,
# where torch's spinning OpenMP workers make small tests 3x slower. Set before any
# framework is imported; an explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_weights(spec, seed: int = 0, dtype=np.float64) -> dict[str, np.ndarray]:
    """Non-trivial weights for ``spec``: random parameters and BatchNorm statistics
    (running_var positive), so that every parameter matters in a forward."""
    r = np.random.default_rng(seed)
    out = {}
    for k, shape in spec.param_shapes().items():
        if k.endswith("running_var"):
            a = r.uniform(0.5, 1.5, shape)
        elif k.endswith("running_mean") or k.endswith(".bias"):
            a = r.normal(0.0, 0.2, shape)
        elif k.endswith(".weight") and len(shape) == 1:  # BatchNorm gamma
            a = r.uniform(0.5, 1.5, shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            a = r.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        out[k] = a.astype(dtype)
    return out


@pytest.fixture(scope="session")
def make_weights():
    """``make_weights(spec, seed=0, dtype=np.float64)`` -> random canonical weights."""
    return random_weights


@contextlib.contextmanager
def failing_on_call(obj: object, name: str, n: int = 3) -> Iterator[list[int]]:
    """Inside the block, ``obj.name`` raises ``RuntimeError("conversion failed")`` on its
    ``n``-th call (an all-or-nothing load must then change nothing); yields the calls made."""
    real, calls = getattr(obj, name), []

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("conversion failed")
        return real(*args, **kwargs)

    setattr(obj, name, failing)
    try:
        yield calls
    finally:
        setattr(obj, name, real)
