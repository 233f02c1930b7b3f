"""Effective conductivity of a two-phase voxel medium by finite volumes.

Physics and discretisation
--------------------------
Steady conduction, ``div(sigma grad u) = 0``, on a grid of unit voxels (cells);
cell ``c`` has conductivity ``sigma[phase[c]]`` and one unknown potential ``u_c``
at its centre.

* Interior faces: the conductance between face neighbours ``a`` and ``b`` is the
  harmonic mean ``2 s_a s_b / (s_a + s_b)`` (two half-cells in series; 0 if either
  is 0). Face area and centre distance are both 1 voxel.
* Electrodes: potential 1 on the inlet face (index 0 along ``axis``) and 0 on the
  outlet face (the last index). The Dirichlet value is imposed on the face itself,
  half a cell from the boundary cell's centre, through the conductance
  ``2 s_c`` of that half-cell.
* All other faces are insulated (zero flux).

With these choices a column of cells in series has resistance exactly
``sum(1 / s_c)``, so layered media reproduce the arithmetic (layers along the
field) and harmonic (layers across it) means to round-off.

Normalisation: with ``I`` the total current leaving through the outlet for the
unit potential drop, ``L`` the number of cells along ``axis`` and ``A`` the
number of cells in a cross-section, ``sigma_eff = I * L / A``, reported divided by
``sigma[1]``, the bulk conductivity of the conducting phase (1 for a uniform
phase-1 medium).

Insulating phase (``sigma[0] == 0``): only cells face-connected through phase 1
to both electrodes (``scipy.ndimage.label``) take part; the rest (insulating
cells, isolated islands, clusters touching one electrode) carry no current and
are removed, keeping the system non-singular. Nothing percolating gives 0.

Linear solver: the system is sparse, symmetric and positive definite. 1-d and
2-d grids use a direct sparse LU (SuperLU, minimum-degree ordering on A + A^T);
3-d grids, where direct fill-in grows too fast, use conjugate gradients with a
Jacobi (diagonal) preconditioner to a relative residual of ``rtol`` (1e-12 by
default), falling back to the direct solver if CG does not converge. The CG loop
is written out here (no BLAS calls) so that it runs single-threaded: on a busy
2-core box, OpenBLAS threads made ``scipy.sparse.linalg.cg`` ~10x slower.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import numpy as np
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # scipy loads on first solve: `import hal` and the CLI need only numpy
    import scipy.sparse as sp

from hal.errors import InputError

Method = Literal["auto", "direct", "cg"]


@dataclass(frozen=True)
class ConductionResult:
    """The solution of one conduction problem (see the module docstring).

    ``value``: normalised effective conductivity ``sigma_eff / sigma[1]``.
    ``current``: total outlet current for the unit potential drop, in units of
    ``sigma[1]`` times the voxel edge. ``potential``: cell-centre potential on the
    grid, NaN in removed cells. ``method``: ``"direct"``, ``"cg"``, or ``"none"``
    when nothing percolates; ``iterations``: CG iterations (0 otherwise).
    """

    value: float
    current: float
    potential: np.ndarray
    percolates: bool
    method: str
    iterations: int


def effective_conductivity(
    phases: np.ndarray,
    sigma: float | tuple[float, float] = 0.0,
    axis: int = 0,
    *,
    method: Method = "auto",
    rtol: float = 1e-12,
) -> float:
    """Normalised effective conductivity ``sigma_eff / sigma[1]`` along ``axis``.

    ``phases`` holds 0/1 labels; ``sigma`` is either the pair of phase
    conductivities ``(sigma_0, sigma_1)`` indexed by label, or a float, the
    contrast ``sigma_0 / sigma_1`` (default 0: phase 0 insulates).
    """
    return solve_conduction(phases, sigma, axis, method=method, rtol=rtol).value


def solve_conduction(
    phases: np.ndarray,
    sigma: float | tuple[float, float] = 0.0,
    axis: int = 0,
    *,
    method: Method = "auto",
    rtol: float = 1e-12,
) -> ConductionResult:
    """Solve for the potential; arguments as in :func:`effective_conductivity`."""
    labels = _check_phases(phases)
    contrast = _contrast(sigma)
    axis = _check_axis(axis, labels.ndim)
    if method not in ("auto", "direct", "cg"):
        raise InputError(f"method must be 'auto', 'direct' or 'cg', got {method!r}")
    if not (isinstance(rtol, numbers.Real) and 0 < rtol < 1):
        raise InputError(f"rtol must lie in (0, 1), got {rtol!r}")

    cond = np.where(labels, 1.0, contrast)  # in units of sigma[1]
    active = _percolating(labels, axis) if contrast == 0 else np.ones(labels.shape, bool)
    potential = np.full(labels.shape, np.nan)
    if not active.any():
        return ConductionResult(0.0, 0.0, potential, False, "none", 0)

    matrix, rhs, outlet, outlet_g = _assemble(cond, active, axis)
    if method == "auto":
        method = "direct" if labels.ndim <= 2 else "cg"
    iterations = 0
    solution = None
    if method == "cg":
        solution, iterations = _jacobi_cg(matrix, rhs, rtol)
    if solution is None:
        method = "direct"
        solution = _direct(matrix, rhs)
    potential[active] = solution
    current = float(np.sum(outlet_g * solution[outlet]))
    length = labels.shape[axis]
    area = labels.size // length
    return ConductionResult(current * length / area, current, potential, True, method, iterations)


def _check_phases(phases: np.ndarray) -> np.ndarray:
    """Boolean phase-1 mask of a valid 0/1 grid."""
    a = np.asarray(phases)
    if a.dtype != bool and not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InputError(f"phases must be a bool or real numeric array of 0/1 labels, got dtype {a.dtype}")
    if a.ndim == 0 or min(a.shape) < 2:
        raise InputError(f"the grid needs at least 2 cells along every axis, got shape {a.shape}")
    if a.dtype != bool and not np.all((a == 0) | (a == 1)):
        bad = np.unique(a[(a != 0) & (a != 1)])[:5]
        raise InputError(f"phases must be binary (0/1 labels); found values such as {bad.tolist()}")
    mask = a.astype(bool)
    if not mask.any():
        raise InputError("the conducting phase (label 1) is empty")
    return mask


def _contrast(sigma: float | tuple[float, float]) -> float:
    """``sigma_0 / sigma_1`` from a contrast or a pair of phase conductivities."""
    if isinstance(sigma, numbers.Real):
        pair = (float(sigma), 1.0)
    else:
        try:
            pair = tuple(float(s) for s in sigma)
        except (TypeError, ValueError):
            pair = ()
        if len(pair) != 2:
            raise InputError(f"sigma must be a contrast (float) or a pair (sigma_0, sigma_1), got {sigma!r}")
    if not (all(math.isfinite(s) for s in pair) and pair[0] >= 0 and pair[1] > 0):
        raise InputError(f"phase conductivities must be finite with sigma_0 >= 0 and sigma_1 > 0, got {pair}")
    return pair[0] / pair[1]


def _check_axis(axis: int, ndim: int) -> int:
    if not isinstance(axis, numbers.Integral) or isinstance(axis, bool) or not -ndim <= axis < ndim:
        raise InputError(f"axis must be an int in [{-ndim}, {ndim}) for a {ndim}-d grid, got {axis!r}")
    return int(axis) % ndim


def _percolating(mask: np.ndarray, axis: int) -> np.ndarray:
    """Cells of ``mask`` face-connected within ``mask`` to both end faces along ``axis``."""
    from scipy import ndimage

    clusters, _ = ndimage.label(mask)
    spanning = np.intersect1d(np.take(clusters, 0, axis), np.take(clusters, -1, axis))
    return np.isin(clusters, spanning[spanning > 0])


def _assemble(
    cond: np.ndarray, active: np.ndarray, axis: int
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """The SPD system over active cells; also the outlet cells' unknowns and conductances."""
    import scipy.sparse as sp

    n = int(active.sum())
    index = np.full(cond.shape, -1, np.int64)
    index[active] = np.arange(n)
    rows, cols, conductances = [], [], []
    for d in range(cond.ndim):
        lo = tuple(slice(0, -1) if k == d else slice(None) for k in range(cond.ndim))
        hi = tuple(slice(1, None) if k == d else slice(None) for k in range(cond.ndim))
        both = active[lo] & active[hi]
        a, b = cond[lo][both], cond[hi][both]
        rows.append(index[lo][both])
        cols.append(index[hi][both])
        conductances.append(2.0 * a * b / (a + b))
    i, j, g = np.concatenate(rows), np.concatenate(cols), np.concatenate(conductances)
    diagonal = np.bincount(i, g, n) + np.bincount(j, g, n)
    rhs = np.zeros(n)
    ends = []
    for end, potential in ((0, 1.0), (-1, 0.0)):
        face = np.take(active, end, axis)
        cells = np.take(index, end, axis)[face]
        g_half = 2.0 * np.take(cond, end, axis)[face]  # centre-to-face half-cell conductance
        diagonal[cells] += g_half
        rhs[cells] += g_half * potential
        ends.append((cells, g_half))
    diag = np.arange(n)
    matrix = sp.csr_matrix(
        (np.concatenate([-g, -g, diagonal]), (np.concatenate([i, j, diag]), np.concatenate([j, i, diag]))),
        shape=(n, n),
    )
    outlet, outlet_g = ends[1]
    return matrix, rhs, outlet, outlet_g


def _direct(matrix: sp.csr_matrix, rhs: np.ndarray) -> np.ndarray:
    import scipy.sparse.linalg as spla

    lu = spla.splu(matrix.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                   options={"SymmetricMode": True})
    return lu.solve(rhs)


def _jacobi_cg(matrix: sp.csr_matrix, rhs: np.ndarray, rtol: float) -> tuple[np.ndarray | None, int]:
    """Jacobi-preconditioned CG from 0 to ``|r| <= rtol |b|``; ``(None, k)`` if it fails to."""
    inv_diag = 1.0 / matrix.diagonal()
    x = np.zeros_like(rhs)
    r = rhs.copy()
    z = inv_diag * r
    p = z.copy()
    rz = np.einsum("i,i", r, z)
    tol2 = (rtol**2) * np.einsum("i,i", rhs, rhs)
    for k in range(1, 10 * rhs.size + 1):
        q = matrix @ p
        alpha = rz / np.einsum("i,i", p, q)
        x += alpha * p
        r -= alpha * q
        if np.einsum("i,i", r, r) <= tol2:
            return x, k
        z = inv_diag * r
        rz, rz_old = np.einsum("i,i", r, z), rz
        p *= rz / rz_old
        p += z
    return None, 10 * rhs.size
