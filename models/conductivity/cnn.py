"""The effective-conductivity regressor: a small VGG-style CNN in the neutral spec.

Input: one channel of phase labels, ``(1, *size)`` in 2-d or 3-d. Stage ``i``
(0-based) holds ``convs`` 3x3(x3) ``same`` convolutions with ``width * 2**i``
channels, each followed by BatchNorm and ReLU; a 2x max pool halves the grid
between stages. Two convolutions per stage and four stages see 68 voxels, a
whole 64-voxel sample, which matters because conduction hinges on whether
phase 1 percolates from face to face. Global average pooling and a two-layer
dense head give one number (by default): the (transformed, standardised) conductivity.
"""

from __future__ import annotations

import numbers
from typing import Sequence

from hal.errors import SpecError
from hal.spec import ModelSpec, SpecBuilder


def conductivity_cnn(
    dims: int = 2,
    size: int | Sequence[int] = 64,
    width: int = 8,
    stages: int = 4,
    convs: int = 2,
    head: int = 64,
    num_classes: int = 1,
    input_size: int | Sequence[int] | None = None,
) -> ModelSpec:
    """The conductivity CNN for ``dims``-d grids of ``size`` voxels per side (or a tuple of extents).

    Every extent must be at least ``2 ** (stages - 1)`` (the pooled grid keeps one voxel).
    ``num_classes`` (outputs of the head) and ``input_size`` (same as ``size``, which it
    overrides) are the keywords every zoo model takes, as ``hal bench --input-size`` passes them.
    """
    size = size if input_size is None else input_size
    if isinstance(dims, bool) or dims not in (2, 3):
        raise SpecError(f"conductivity_cnn: dims must be 2 or 3, got {dims!r}")
    for name, value in (("width", width), ("stages", stages), ("convs", convs), ("head", head),
                        ("num_classes", num_classes)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise SpecError(f"conductivity_cnn: {name} must be an int >= 1, got {value!r}")
    if isinstance(size, numbers.Integral):
        extents: tuple = (size,) * dims
    else:
        extents = tuple(size) if isinstance(size, Sequence) else ()
    smallest = 2 ** (stages - 1)
    if len(extents) != dims or not all(isinstance(n, numbers.Integral) and n >= smallest for n in extents):
        raise SpecError(f"conductivity_cnn: size must be an int or {dims} ints, each >= {smallest} "
                        f"for {stages} stages, got {size!r}")

    b = SpecBuilder(f"conductivity_cnn{dims}d")
    x = b.input((1, *(int(n) for n in extents)))
    for i in range(stages):
        if i:
            x = b.max_pool(x, 2, name=f"stage{i}.pool")
        for j in range(1, convs + 1):
            x = b.conv(x, width * 2**i, 3, padding="same", bias=False, name=f"stage{i}.conv{j}")
            x = b.relu(b.batch_norm(x, name=f"stage{i}.bn{j}"), name=f"stage{i}.relu{j}")
    x = b.global_avg_pool(x, name="pool")
    x = b.relu(b.dense(x, head, name="head.fc1"), name="head.relu")
    return b.build(b.dense(x, num_classes, name="head.fc2"))
