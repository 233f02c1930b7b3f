"""U-Net (Ronneberger et al. 2015; 3-d: Çiçek et al. 2016) for dense outputs, in the neutral spec.

An encoder of ``depth`` levels (two 3x3 conv-BatchNorm-ReLU, then a 2x2 max pool,
channels doubling from ``features``), a bottom level, and a decoder that upsamples
with a 2x2 stride-2 transposed convolution (halving the channels), concatenates the
encoder's output at that resolution (the skip connection: skip first, then the
upsampled tensor) and applies two 3x3 conv-BatchNorm-ReLU. A 1x1 conv (``head``)
gives ``num_classes`` values per pixel (voxel): the output is ``(num_classes, *input_size)``,
e.g. segmentation logits or a regressed field. Convs are padded, so the output has the
input's size, which must be divisible by ``2 ** depth`` in each dimension.
"""

from __future__ import annotations

import numbers

from hal.errors import SpecError
from hal.spec import ModelSpec, SpecBuilder


def _double_conv(b: SpecBuilder, x: str, channels: int, prefix: str) -> str:
    for i in (1, 2):
        x = b.conv(x, channels, 3, padding=1, bias=False, name=f"{prefix}.conv{i}")
        x = b.relu(b.batch_norm(x, name=f"{prefix}.bn{i}"), name=f"{prefix}.relu{i}")
    return x


def unet(
    num_classes: int = 2,
    input_size: int | tuple[int, ...] = 128,
    in_channels: int = 1,
    features: int = 64,
    depth: int = 4,
    ndim: int = 2,
) -> ModelSpec:
    """A ``ndim``-d U-Net (2 or 3) for ``(in_channels, *input_size)`` inputs; an int
    ``input_size`` is the same in every spatial dimension."""
    if ndim not in (2, 3) or isinstance(ndim, bool):
        raise SpecError(f"unet ndim must be 2 or 3, got {ndim!r}")
    for arg, value in (("features", features), ("depth", depth)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise SpecError(f"unet {arg} must be an int >= 1, got {value!r}")
    if isinstance(input_size, numbers.Integral) and not isinstance(input_size, bool):
        size = (int(input_size),) * ndim
    elif isinstance(input_size, (tuple, list)) and len(input_size) == ndim:
        size = tuple(input_size)
    else:
        raise SpecError(f"unet{ndim}d input_size must be an int or {ndim} sizes, got {input_size!r}")
    if any(not isinstance(n, numbers.Integral) or n < 1 or n % 2**depth for n in size):
        raise SpecError(f"unet{ndim}d input_size {size} must be positive multiples of 2 ** depth = {2**depth} "
                        "(each level halves it, and the skip connections need the halves exact)")
    b = SpecBuilder(f"unet{ndim}d")
    x = b.input((in_channels, *size))
    skips = []
    for i in range(depth):
        skips.append(_double_conv(b, x, features * 2**i, f"down{i}"))
        x = b.max_pool(skips[-1], 2, name=f"pool{i}")
    x = _double_conv(b, x, features * 2**depth, "bottom")
    for i in reversed(range(depth)):
        x = b.conv_transpose(x, features * 2**i, 2, stride=2, name=f"up{i}.upconv")
        x = _double_conv(b, b.concat(skips[i], x, name=f"up{i}.cat"), features * 2**i, f"up{i}")
    return b.build(b.conv(x, num_classes, 1, name="head"))
