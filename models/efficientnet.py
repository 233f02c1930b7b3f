"""EfficientNet-B0 to B7 (Tan & Le 2019) in the neutral spec (torchvision's names).

B0 is seven stages of MBConv blocks (1x1 expansion, depthwise conv, squeeze-and-
excitation, linear 1x1 projection; SiLU). B1-B7 scale it by compound scaling:
each variant multiplies every stage's channels by ``width_mult`` (rounded to a
multiple of 8, never more than 10% down: :func:`~hal.models.common.make_divisible`)
and its number of blocks by ``depth_mult`` (rounded up), and is meant for a larger
input (``resolution``, the default ``input_size``). A residual block's branch passes
through stochastic depth whose drop probability grows linearly with the block's
index over the whole network: ``stochastic_depth_prob * i / blocks``.
"""

from __future__ import annotations

import math

from hal.errors import SpecError
from hal.models.common import conv_norm_act, image_size, make_divisible, squeeze_excitation
from hal.spec import ModelSpec, SpecBuilder

# B0 stages: (expansion, kernel, first stride, out channels, blocks); stem 32 channels
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))

# variant -> (width_mult, depth_mult, resolution, dropout), torchvision's (the paper's, rounded)
VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}


def efficientnet(
    variant: str = "b0",
    num_classes: int = 1000,
    input_size: int | tuple[int, int] | None = None,
    in_channels: int = 3,
    stochastic_depth_prob: float = 0.2,
    dropout: float | None = None,
) -> ModelSpec:
    """EfficientNet ``variant`` ("b0".."b7") for ``(in_channels, H, W)`` inputs;
    ``input_size`` and ``dropout`` default to the variant's."""
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise SpecError(f"efficientnet variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    width, depth, resolution, default_dropout = VARIANTS[variant]
    h, w = image_size(resolution if input_size is None else input_size, f"efficientnet_{variant}")
    bn = {"eps": 1e-3, "momentum": 0.01} if variant in ("b5", "b6", "b7") else {}
    b = SpecBuilder(f"efficientnet_{variant}")
    x = b.input((in_channels, h, w))
    x = conv_norm_act(b, x, make_divisible(32 * width), 3, "features.0", stride=2, act="silu", **bn)
    counts = [math.ceil(n * depth) for *_, n in STAGES]
    block = 0
    for s, ((t, k, stride, out, _), n) in enumerate(zip(STAGES, counts), start=1):
        out = make_divisible(out * width)
        for j in range(n):
            p, cin, stride_j = f"features.{s}.{j}", b.shape(x)[0], stride if j == 0 else 1
            expanded, i = make_divisible(cin * t), 0
            y = x
            if expanded != cin:
                y, i = conv_norm_act(b, y, expanded, 1, f"{p}.block.0", act="silu", **bn), 1
            y = conv_norm_act(b, y, expanded, k, f"{p}.block.{i}", stride=stride_j, groups=expanded, act="silu", **bn)
            y = squeeze_excitation(b, y, max(1, cin // 4), f"{p}.block.{i + 1}", act="silu")
            y = conv_norm_act(b, y, out, 1, f"{p}.block.{i + 2}", act=None, **bn)
            if stride_j == 1 and cin == out:
                y = b.stochastic_depth(y, stochastic_depth_prob * block / sum(counts), name=f"{p}.stochastic_depth")
                y = b.add(y, x, name=f"{p}.add")
            x, block = y, block + 1
    x = conv_norm_act(b, x, 4 * b.shape(x)[0], 1, f"features.{len(STAGES) + 1}", act="silu", **bn)
    x = b.global_avg_pool(x, name="avgpool")
    x = b.dropout(x, default_dropout if dropout is None else dropout, name="classifier.0")
    return b.build(b.dense(x, num_classes, name="classifier.1"))
