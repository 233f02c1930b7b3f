"""Two-phase voxel microstructures in 2-d and 3-d, reproducible from a seed.

Conventions
-----------
* A medium is an ``np.ndarray`` of dtype ``uint8`` holding phase labels:
  ``1`` = the conducting phase (e.g. the electrode's solid), ``0`` = the other
  phase (pore/electrolyte, insulating unless a solver is told otherwise).
* Lengths (correlation length, radii) are in voxels; voxel ``i`` along an axis
  occupies ``[i, i + 1)`` and has its centre at ``i + 0.5``.
* Both generators are periodic (the field and the spheres wrap around the box),
  so the medium is statistically homogeneous right up to its faces.
* The volume fraction of phase 1 is exact to one voxel: the number of phase-1
  voxels is ``round(fraction * size)``.
* Randomness comes from ``numpy.random.default_rng(seed)``: the same seed (an
  int, a ``SeedSequence`` or a ``Generator``) gives the same medium.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from hal.errors import InputError

SeedLike = int | np.random.SeedSequence | np.random.Generator


def gaussian_random_field(
    size: int | Sequence[int],
    fraction: float,
    correlation_length: float,
    *,
    dims: int | None = None,
    seed: SeedLike = 0,
) -> np.ndarray:
    """Thresholded Gaussian random field: phase 1 where the field is largest.

    White noise is smoothed by a periodic Gaussian filter of standard deviation
    ``correlation_length`` voxels, applied exactly in Fourier space (multiplication
    by ``exp(-2 pi^2 l^2 |k|^2)``, ``k`` in cycles per voxel; the field's covariance
    is then a Gaussian of standard deviation ``sqrt(2) l``); ``0`` keeps white
    noise. The field is then thresholded at its empirical quantile: the
    ``round(fraction * N)`` largest values become phase 1.

    ``size`` is an int (a cube/square of ``dims`` dimensions, default 2) or a
    2- or 3-tuple of extents.
    """
    shape = grid_shape(size, dims)
    n_one = _phase_count(fraction, shape)
    if not (isinstance(correlation_length, numbers.Real) and math.isfinite(correlation_length)
            and correlation_length >= 0):
        raise InputError(f"correlation_length must be a finite number >= 0 (voxels), got {correlation_length!r}")
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape)
    k2 = sum(np.meshgrid(*[np.fft.fftfreq(n) ** 2 for n in shape[:-1]], np.fft.rfftfreq(shape[-1]) ** 2,
                         indexing="ij", sparse=True))
    axes = tuple(range(len(shape)))
    spectrum = np.fft.rfftn(noise) * np.exp(-2.0 * math.pi**2 * correlation_length**2 * k2)
    field = np.fft.irfftn(spectrum, s=shape, axes=axes)
    flat = field.ravel()
    medium = np.zeros(flat.size, np.uint8)
    medium[np.argpartition(flat, flat.size - n_one)[flat.size - n_one:]] = 1
    return medium.reshape(shape)


def overlapping_spheres(
    size: int | Sequence[int],
    fraction: float,
    radius: tuple[float, float],
    *,
    dims: int | None = None,
    seed: SeedLike = 0,
) -> np.ndarray:
    """Random overlapping spheres (discs in 2-d) of phase 1 in a phase-0 matrix.

    Centres are uniform in the (periodic) box and radii uniform in ``radius =
    (r_min, r_max)`` voxels; a voxel belongs to a sphere when its centre lies
    within the radius. Spheres are added until phase 1 fills
    ``round(fraction * N)`` voxels; the last sphere keeps only as many of its new
    voxels as are needed, those nearest its centre (a smaller, still round cap),
    so the fraction is exact. ``size``/``dims`` as in :func:`gaussian_random_field`.
    """
    shape = grid_shape(size, dims)
    n_one = _phase_count(fraction, shape)
    try:
        r_min, r_max = (float(r) for r in radius)
    except (TypeError, ValueError):
        raise InputError(f"radius must be a pair (r_min, r_max) of numbers, got {radius!r}") from None
    if not (math.isfinite(r_max) and 0 < r_min <= r_max):
        raise InputError(f"radius must satisfy 0 < r_min <= r_max < inf, got {radius!r}")
    rng = np.random.default_rng(seed)
    d, total = len(shape), math.prod(shape)
    # Offsets (from the voxel holding a centre) of every voxel a sphere of r_max can reach.
    reach = math.ceil(r_max + 0.5)
    offsets = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1)] * d, indexing="ij"), -1).reshape(-1, d)
    mean_volume = math.pi ** (d / 2) / math.gamma(d / 2 + 1) * (0.5 * (r_min + r_max)) ** d
    medium = np.zeros(total, np.uint8)
    filled = 0
    while filled < n_one:
        # A batch of about as many spheres as should fill the deficit, bounded in memory.
        batch = math.ceil((n_one - filled) / (mean_volume * (1 - filled / total)))
        batch = min(batch, max(1, 2**20 // len(offsets)))
        centres = rng.uniform(0.0, np.array(shape, dtype=float), (batch, d))
        radii = rng.uniform(r_min, r_max, batch)
        base = np.floor(centres)
        dist2 = np.sum((offsets[None] + (base + 0.5 - centres)[:, None]) ** 2, axis=-1)
        sphere, offset = np.nonzero(dist2 <= radii[:, None] ** 2)
        # Claims in painting order: sphere by sphere, nearest voxels first.
        order = np.lexsort((dist2[sphere, offset], sphere))
        voxels = (base[sphere[order]].astype(np.int64) + offsets[offset[order]]) % np.array(shape)
        flat = np.ravel_multi_index(tuple(voxels.T), shape)
        flat = flat[np.sort(np.unique(flat, return_index=True)[1])]  # each voxel's first claim
        new = flat[medium[flat] == 0][: n_one - filled]
        medium[new] = 1
        filled += new.size
    return medium.reshape(shape)


def grid_shape(size: int | Sequence[int], dims: int | None = None) -> tuple[int, ...]:
    """The grid shape for ``size`` (an int or a 2-/3-tuple) and ``dims`` (2 or 3)."""
    if dims is not None and (isinstance(dims, bool) or dims not in (2, 3)):
        raise InputError(f"dims must be 2 or 3, got {dims!r}")
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        shape: tuple = (int(size),) * (dims or 2)
    elif isinstance(size, Sequence) and not isinstance(size, str):
        shape = tuple(size)
        if len(shape) not in (2, 3):
            raise InputError(f"size must have 2 or 3 extents, got {size!r}")
        if dims is not None and dims != len(shape):
            raise InputError(f"size {size!r} has {len(shape)} extents but dims={dims}")
    else:
        raise InputError(f"size must be an int or a tuple of 2 or 3 ints, got {size!r}")
    for n in shape:
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 2:
            raise InputError(f"every extent must be an int >= 2, got size {size!r}")
    return tuple(int(n) for n in shape)


def _phase_count(fraction: float, shape: tuple[int, ...]) -> int:
    """Number of phase-1 voxels for ``fraction``; both phases must be non-empty."""
    if not (isinstance(fraction, numbers.Real) and 0.0 < fraction < 1.0):
        raise InputError(f"fraction must lie in the open interval (0, 1), got {fraction!r}")
    total = math.prod(shape)
    count = round(fraction * total)
    if not 0 < count < total:
        raise InputError(f"fraction {fraction} of a {shape} grid ({total} voxels) leaves one phase empty")
    return count
