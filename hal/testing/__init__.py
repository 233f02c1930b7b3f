"""Testing helpers: parity assertions for your own specs, and the backend conformance suite.

>>> from hal.testing import assert_parity, run_conformance
>>> assert_parity(my_spec, "torch:cpu")            # forward, grads, trajectory
>>> print(run_conformance("torch:cpu").table())   # every op, training path and error (hal.testing.conformance)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from hal.parity import CHECKS, ParityReport, normalised_error, run_parity, tolerance
from hal.spec import ModelSpec
from hal.testing.conformance import ConformanceReport, run_conformance

__all__ = ["ConformanceReport", "assert_close_to_reference", "assert_parity", "assert_weights_equal", "run_conformance"]


def assert_parity(
    spec: ModelSpec,
    target: str,
    *,
    checks: Sequence[str] = CHECKS,
    batch: int = 4,
    steps: int = 3,
    require: bool = True,
    **kwargs: Any,
) -> ParityReport:
    """Run :func:`hal.parity.run_parity` for ``target`` and raise ``AssertionError``
    with the report table if any check fails (or, with ``require``, was skipped)."""
    report = run_parity(spec, [target], batch=batch, checks=checks, steps=steps, **kwargs)
    skipped = [r for r in report.results if r.passed is None]
    if not report.passed or (require and skipped):
        raise AssertionError(f"parity of {target} on {spec.name!r} failed:\n{report.table()}")
    return report


def assert_close_to_reference(actual: np.ndarray, reference: np.ndarray, floor: float, precision: str = "fp32") -> None:
    """Assert the normalised max error of ``actual`` against a float64 ``reference``
    is within the parity tolerance for ``precision`` given the measured float32 ``floor``."""
    e_abs, e_rel = normalised_error(actual, reference)
    tol = tolerance(floor, precision)
    if not e_rel <= tol:
        raise AssertionError(f"normalised max error {e_rel:.3e} (abs {e_abs:.3e}) exceeds tolerance {tol:.3e}")


def assert_weights_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    """Bit-exact equality of two canonical weight mappings (names, shapes, dtypes, values)."""
    if set(a) != set(b):
        raise AssertionError(f"weight names differ: {sorted(set(a) ^ set(b))[:5]}")
    for k in a:
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]):
            raise AssertionError(f"weights differ at {k!r}")
