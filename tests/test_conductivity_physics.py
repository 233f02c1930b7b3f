"""Exact and analytic checks of the effective-conductivity physics (hal.models.conductivity).

Truths used: a uniform medium conducts like its phase; layers along the field give
the volume-weighted arithmetic mean and layers across it the harmonic mean (the
finite-volume scheme reproduces both exactly); mirror symmetry; charge
conservation; the scheme's own definition, re-assembled densely by hand on tiny
grids; Hashin-Shtrikman bounds for isotropic two-phase media; convergence under
refinement.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hal.errors import InputError
from hal.models.conductivity import (
    build_dataset,
    effective_conductivity,
    gaussian_random_field,
    overlapping_spheres,
    solve_conduction,
)

METHODS = ("direct", "cg")


def layered(shape: tuple[int, ...], along: int, pattern: np.ndarray) -> np.ndarray:
    """A medium whose phase depends only on the index along axis ``along``."""
    view = [1] * len(shape)
    view[along] = shape[along]
    return np.broadcast_to(pattern.reshape(view), shape).astype(np.uint8)


def hashin_shtrikman(f1: float, s1: float, s0: float, d: int) -> tuple[float, float]:
    """HS bounds on an isotropic d-dimensional two-phase medium (phase 1 fraction f1, s1 > s0)."""
    f0 = 1.0 - f1
    lower = s0 + f1 / (1.0 / (s1 - s0) + f0 / (d * s0))
    upper = s1 + f0 / (1.0 / (s0 - s1) + f1 / (d * s1))
    return lower, upper


SHAPES = [(12, 10), (8, 7, 6)]


# --- exact results -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(2, 2)])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sigma", [0.0, 0.1, 7.5, (0.0, 3.0)])
def test_uniform_medium_is_exactly_one(shape, method, sigma):
    ones = np.ones(shape, np.uint8)
    for axis in range(len(shape)):
        assert effective_conductivity(ones, sigma, axis, method=method) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("contrast", [0.1, 7.5])
def test_layers_give_arithmetic_and_harmonic_means(shape, method, contrast):
    rng = np.random.default_rng(len(shape))
    for axis in range(len(shape)):
        for across in (d for d in range(len(shape)) if d != axis):
            pattern = rng.permutation(np.arange(shape[across]) % 3 == 0)  # both phases present
            f1 = pattern.mean()
            parallel = effective_conductivity(layered(shape, across, pattern), contrast, axis, method=method)
            assert parallel == pytest.approx(f1 + (1 - f1) * contrast, rel=1e-8)
        pattern = rng.permutation(np.arange(shape[axis]) % 3 == 0)
        f1 = pattern.mean()
        series = effective_conductivity(layered(shape, axis, pattern), contrast, axis, method=method)
        assert series == pytest.approx(1.0 / (f1 + (1 - f1) / contrast), rel=1e-8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", METHODS)
def test_layers_with_an_insulating_phase(shape, method):
    pattern = np.arange(shape[1]) % 4 != 1
    parallel = solve_conduction(layered(shape, 1, pattern), 0.0, 0, method=method)
    assert parallel.percolates and parallel.value == pytest.approx(pattern.mean(), rel=1e-8)
    blocked = np.ones(shape[0], bool)
    blocked[shape[0] // 2] = False
    series = solve_conduction(layered(shape, 0, blocked), 0.0, 0, method=method)
    assert series.value == 0.0 and not series.percolates and np.isnan(series.potential).all()


@pytest.mark.parametrize("method", METHODS)
def test_dead_ends_and_islands_carry_no_current(method):
    """One straight channel in an insulator conducts 1/width, whatever hangs off it."""
    medium = np.zeros((10, 7), np.uint8)
    medium[:, 2] = 1  # the channel
    medium[4, 3:6] = 1  # a dead-end branch off it
    medium[1:3, 5] = 1  # an island
    medium[-1, 4:7] = 1  # touches the outlet only
    result = solve_conduction(medium, 0.0, 0, method=method)
    assert result.value == pytest.approx(1 / 7, rel=1e-10)
    assert np.isnan(result.potential[1, 5]) and np.isnan(result.potential[-1, 5])
    branch = result.potential[4, 3:6]
    assert np.allclose(branch, result.potential[4, 2], rtol=1e-10)  # no current: one potential
    medium[5, 2] = 0
    assert effective_conductivity(medium, 0.0, 0, method=method) == 0.0


def brute_force(labels: np.ndarray, contrast: float, axis: int) -> float:
    """The documented scheme, assembled cell by cell into a dense matrix (all cells conduct)."""
    shape = labels.shape
    cells = list(np.ndindex(shape))
    number = {c: k for k, c in enumerate(cells)}
    s = np.where(labels == 1, 1.0, contrast)
    matrix = np.zeros((len(cells), len(cells)))
    rhs = np.zeros(len(cells))
    for c in cells:
        for d in range(len(shape)):
            n = list(c)
            n[d] += 1
            n = tuple(n)
            if n[d] < shape[d]:
                g = 2 * s[c] * s[n] / (s[c] + s[n])
                i, j = number[c], number[n]
                matrix[i, i] += g
                matrix[j, j] += g
                matrix[i, j] -= g
                matrix[j, i] -= g
        if c[axis] == 0:
            matrix[number[c], number[c]] += 2 * s[c]
            rhs[number[c]] += 2 * s[c]
        if c[axis] == shape[axis] - 1:
            matrix[number[c], number[c]] += 2 * s[c]
    u = np.linalg.solve(matrix, rhs)
    current = sum(2 * s[c] * u[number[c]] for c in cells if c[axis] == shape[axis] - 1)
    return current * shape[axis] / (labels.size / shape[axis])


@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 3)])
@pytest.mark.parametrize("method", METHODS)
def test_matches_hand_assembled_scheme(shape, method):
    labels = np.random.default_rng(7).integers(0, 2, shape)
    labels.flat[0] = 1
    for axis in range(len(shape)):
        for contrast in (0.25, 4.0):
            got = effective_conductivity(labels, contrast, axis, method=method)
            assert got == pytest.approx(brute_force(labels, contrast, axis), rel=1e-10)


def test_only_the_conductivity_ratio_matters():
    medium = gaussian_random_field(20, 0.6, 2.0, seed=3)
    ref = effective_conductivity(medium, 0.1)
    assert effective_conductivity(medium, (0.2, 2.0)) == pytest.approx(ref, rel=1e-12)
    assert effective_conductivity(medium.astype(bool), 0.1) == effective_conductivity(medium.astype(float), 0.1)


@pytest.mark.parametrize("shape", [(24, 20), (12, 11, 10)])
@pytest.mark.parametrize("contrast", [0.0, 0.1])
def test_mirror_symmetry_and_conservation(shape, contrast):
    medium = gaussian_random_field(shape, 0.7, 1.5, seed=11)
    for axis in range(len(shape)):
        result = solve_conduction(medium, contrast, axis)
        assert result.percolates and result.value > 0
        for flip in range(len(shape)):  # along the field and across it
            mirrored = effective_conductivity(np.flip(medium, flip), contrast, axis)
            assert mirrored == pytest.approx(result.value, rel=1e-10)
        # Charge conservation: what enters through the inlet leaves through the outlet.
        s = np.where(medium == 1, 1.0, contrast)
        inlet = np.take(result.potential, 0, axis)
        conducting = ~np.isnan(inlet)
        inflow = np.sum(2 * np.take(s, 0, axis)[conducting] * (1 - inlet[conducting]))
        assert inflow == pytest.approx(result.current, rel=1e-9)


# --- analytic bounds and convergence --------------------------------------------------------------


@pytest.mark.parametrize("shape, length, radius", [((128, 128), 3.0, (2.0, 4.0)), ((28, 28, 28), 2.0, (2.0, 4.0))])
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_random_media_lie_within_hashin_shtrikman_bounds(shape, length, radius, fraction):
    """Statistically isotropic media; the apparent conductivity is averaged over the axes."""
    contrast = 0.1
    lower, upper = hashin_shtrikman(fraction, 1.0, contrast, len(shape))
    media = [gaussian_random_field(shape, fraction, length, seed=5),
             overlapping_spheres(shape, fraction, radius, seed=5)]
    for medium in media:
        value = np.mean([effective_conductivity(medium, contrast, axis) for axis in range(len(shape))])
        assert lower < value < upper, (value, lower, upper)


@pytest.mark.parametrize("shape, factors", [((16, 16), (1, 2, 4, 8)), ((8, 8, 8), (1, 2, 4))])
def test_refinement_converges(shape, factors):
    """Replicating each voxel k^d times keeps the geometry; successive changes must shrink."""
    medium = gaussian_random_field(shape, 0.5, 1.0, seed=2)
    values = []
    for k in factors:
        fine = medium
        for d in range(len(shape)):
            fine = np.repeat(fine, k, axis=d)
        values.append(effective_conductivity(fine, 0.1, 0))
    changes = np.abs(np.diff(values))
    assert np.all(changes[1:] < changes[:-1]), values


# --- microstructures ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(40, 30), (14, 12, 10)])
@pytest.mark.parametrize("fraction", [0.2, 0.55, 0.8])
def test_microstructures_hit_the_fraction_and_are_reproducible(size, fraction):
    total = np.prod(size)
    grf = lambda seed: gaussian_random_field(size, fraction, 2.0, seed=seed)  # noqa: E731
    spheres = lambda seed: overlapping_spheres(size, fraction, (1.5, 4.0), seed=seed)  # noqa: E731
    for make in (grf, spheres):
        medium = make(4)
        assert medium.shape == size and medium.dtype == np.uint8
        assert set(np.unique(medium)) == {0, 1}
        assert abs(medium.mean() - fraction) <= 0.5 / total
        assert np.array_equal(make(4), medium)
        assert np.array_equal(make(np.random.default_rng(4)), medium)
        assert not np.array_equal(make(5), medium)


def test_int_size_and_dims():
    assert gaussian_random_field(6, 0.5, 1.0).shape == (6, 6)
    assert overlapping_spheres(6, 0.5, (1.0, 2.0), dims=3).shape == (6, 6, 6)
    assert gaussian_random_field((5, 7), 0.5, 0.0, dims=2).shape == (5, 7)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fraction=0.0), dict(fraction=1.0), dict(fraction=-0.2), dict(fraction=float("nan")),
        dict(size=1), dict(size=(8,)), dict(size=(4, 4, 4, 4)), dict(size=(8, 1)), dict(size=8.0),
        dict(dims=4), dict(size=(8, 8), dims=3), dict(size=4, fraction=0.01),
    ],
)
def test_generator_errors(kwargs):
    args = dict(size=8, fraction=0.5) | kwargs
    with pytest.raises(InputError):
        gaussian_random_field(correlation_length=1.0, **args)
    with pytest.raises(InputError):
        overlapping_spheres(radius=(1.0, 2.0), **args)


@pytest.mark.parametrize("call", [
    lambda: gaussian_random_field(8, 0.5, -1.0),
    lambda: gaussian_random_field(8, 0.5, float("inf")),
    lambda: overlapping_spheres(8, 0.5, (0.0, 2.0)),
    lambda: overlapping_spheres(8, 0.5, (3.0, 2.0)),
    lambda: overlapping_spheres(8, 0.5, 2.0),
])
def test_length_errors(call):
    with pytest.raises(InputError):
        call()


GOOD = np.ones((4, 4), np.uint8)


@pytest.mark.parametrize("phases, kwargs, reason", [
    (np.full((4, 4), 2), {}, "binary"),
    (np.full((4, 4), 0.5), {}, "binary"),
    (np.full((4, 4), np.nan), {}, "binary"),
    (np.zeros((4, 4)), {}, "empty"),
    (np.ones((1, 5)), {}, "at least 2"),
    (np.array(1), {}, "at least 2"),
    (np.array([["1", "0"], ["0", "1"]]), {}, "dtype"),
    (GOOD, dict(axis=2), "axis"),
    (GOOD, dict(axis=-3), "axis"),
    (GOOD, dict(axis=True), "axis"),
    (GOOD, dict(sigma=-0.1), "sigma_0 >= 0"),
    (GOOD, dict(sigma=(1.0, 0.0)), "sigma_1 > 0"),
    (GOOD, dict(sigma=(1.0, 2.0, 3.0)), "pair"),
    (GOOD, dict(sigma=float("inf")), "finite"),
    (GOOD, dict(method="lu"), "method"),
])
def test_solver_errors(phases, kwargs, reason):
    with pytest.raises(InputError, match=reason):
        effective_conductivity(phases, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(n=0), dict(kind="voronoi"), dict(fraction_range=(0.0, 0.5)), dict(length_range=(2.0, 1.0)),
    dict(split=(0.8, 0.1, 0.2)), dict(contrast=-1.0), dict(axis=2), dict(seed=-1),
])
def test_dataset_errors(kwargs, tmp_path):
    with pytest.raises(InputError):
        build_dataset(**(dict(n=2, size=8, cache_dir=tmp_path, progress=False) | kwargs))
    assert not list(tmp_path.iterdir())


# --- dataset --------------------------------------------------------------------------------------


def test_dataset_builds_caches_and_reloads(tmp_path, capsys):
    settings = dict(n=8, size=16, seed=3, kind="mixed", contrast=0.05)
    first = build_dataset(**settings, cache_dir=tmp_path)
    assert "8/8" in capsys.readouterr().err
    assert not first.from_cache and first.rate > 0
    assert first.x.shape == (8, 1, 16, 16) and first.x.dtype == np.float32 and first.y.dtype == np.float64
    manifests = list(tmp_path.glob("*.json"))
    assert len(manifests) == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["count"] == 8 and manifest["seed"] == 3 and manifest["generation_seconds"] > 0
    recorded = manifest["settings"]
    assert (recorded["n"], recorded["size"], recorded["kind"], recorded["contrast"]) == (8, [16, 16], "mixed", 0.05)
    assert manifest["hal_version"]

    # Labels are the solver's answers on the stored media; fractions as recorded.
    for i in range(8):
        assert first.y[i] == effective_conductivity(first.x[i, 0], 0.05, 0)
        assert abs(first.x[i].mean() - first.params["fraction"][i]) <= 0.5 / 256
    assert set(first.params["kind"]) <= {"grf", "spheres"}
    assert np.all((first.params["fraction"] >= 0.3) & (first.params["fraction"] <= 0.8))
    parts = [first.splits[name] for name in ("train", "val", "test")]
    assert [len(p) for p in parts] == [6, 1, 1]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(8))

    again = build_dataset(**settings, cache_dir=tmp_path, progress=False)
    assert again.from_cache and again.rate == first.rate
    for a, b in [(again.x, first.x), (again.y, first.y), *zip(again.params.values(), first.params.values()),
                 *zip(again.splits.values(), first.splits.values())]:
        assert np.array_equal(a, b)

    # Sample i does not depend on n; other settings miss the cache.
    fewer = build_dataset(**(settings | dict(n=4)), cache_dir=tmp_path, progress=False)
    assert not fewer.from_cache and np.array_equal(fewer.x, first.x[:4]) and np.array_equal(fewer.y, first.y[:4])
    assert len(list(tmp_path.glob("*.json"))) == 2

    # A damaged archive is regenerated, not trusted.
    npz = manifests[0].with_suffix(".npz")
    npz.write_bytes(npz.read_bytes()[:-10])
    rebuilt = build_dataset(**settings, cache_dir=tmp_path, progress=False)
    assert not rebuilt.from_cache and np.array_equal(rebuilt.y, first.y)
    assert build_dataset(**settings, cache_dir=tmp_path, progress=False).from_cache
