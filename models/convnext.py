"""ConvNeXt (Liu et al. 2022) tiny, small, base and large in the neutral spec (torchvision's names).

A 4x4 stride-4 stem, then four stages of ConvNeXt blocks with a downsampling layer
(LayerNorm, 2x2 stride-2 conv) between stages. A block is a 7x7 depthwise conv,
LayerNorm over channels, a pointwise MLP (``Dense`` over the channel axis at every
position: torchvision's channels-last ``nn.Linear``, weights unchanged) with exact
GELU, a learned per-channel ``layer_scale`` (node ``features.<s>.<i>``, so its
parameter is torchvision's ``features.<s>.<i>.layer_scale``), stochastic depth and the
residual add. Stochastic depth grows linearly from 0 at the first block to
``stochastic_depth_prob`` at the last.
"""

from __future__ import annotations

from hal.errors import SpecError
from hal.models.common import image_size
from hal.spec import ModelSpec, SpecBuilder

# size -> (channels per stage, blocks per stage, default stochastic depth probability)
SIZES = {
    "tiny": ((96, 192, 384, 768), (3, 3, 9, 3), 0.1),
    "small": ((96, 192, 384, 768), (3, 3, 27, 3), 0.4),
    "base": ((128, 256, 512, 1024), (3, 3, 27, 3), 0.5),
    "large": ((192, 384, 768, 1536), (3, 3, 27, 3), 0.5),
}
EPS = 1e-6  # every LayerNorm's


def convnext(
    size: str = "tiny",
    num_classes: int = 1000,
    input_size: int | tuple[int, int] = 224,
    in_channels: int = 3,
    stochastic_depth_prob: float | None = None,
    layer_scale: float = 1e-6,
) -> ModelSpec:
    """ConvNeXt of ``size`` ("tiny", "small", "base", "large") for ``(in_channels, H, W)``
    inputs (H, W >= 32); ``stochastic_depth_prob`` defaults to the size's."""
    if not isinstance(size, str) or size not in SIZES:
        raise SpecError(f"convnext size must be one of {sorted(SIZES)}, got {size!r}")
    widths, depths, default_sd = SIZES[size]
    sd = default_sd if stochastic_depth_prob is None else stochastic_depth_prob
    h, w = image_size(input_size, f"convnext_{size}")
    b = SpecBuilder(f"convnext_{size}")
    x = b.input((in_channels, h, w))
    x = b.conv(x, widths[0], 4, stride=4, name="features.0.0")
    x = b.layer_norm(x, eps=EPS, name="features.0.1")
    block, total = 0, sum(depths)
    for s, (dim, n) in enumerate(zip(widths, depths)):
        stage = 2 * s + 1
        if s > 0:
            x = b.layer_norm(x, eps=EPS, name=f"features.{stage - 1}.0")
            x = b.conv(x, dim, 2, stride=2, name=f"features.{stage - 1}.1")
        for i in range(n):
            p = f"features.{stage}.{i}"
            y = b.conv(x, dim, 7, padding=3, groups=dim, name=f"{p}.block.0")
            y = b.layer_norm(y, eps=EPS, name=f"{p}.block.2")
            y = b.activation(b.dense(y, 4 * dim, name=f"{p}.block.3"), "gelu", name=f"{p}.block.4")
            y = b.scale(b.dense(y, dim, name=f"{p}.block.5"), init=layer_scale, name=p)
            y = b.stochastic_depth(y, sd * block / (total - 1), name=f"{p}.stochastic_depth")
            x, block = b.add(y, x, name=f"{p}.add"), block + 1
    x = b.layer_norm(b.adaptive_avg_pool(x, 1, name="avgpool"), eps=EPS, name="classifier.0")
    return b.build(b.dense(b.flatten(x, name="classifier.1"), num_classes, name="classifier.2"))
