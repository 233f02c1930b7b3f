"""ShuffleNetV2 (Ma et al. 2018) x0.5, x1.0, x1.5 and x2.0 in the neutral spec (torchvision's names).

A stride-1 unit splits the channels in two halves, transforms the second
(``branch2``: 1x1, depthwise 3x3, 1x1) and concatenates it after the first; a
stride-2 unit concatenates two transformed copies (``branch1``, ``branch2``). Each
unit ends with a channel shuffle of two groups.
"""

from __future__ import annotations

from hal.errors import SpecError
from hal.models.common import image_size
from hal.spec import ModelSpec, SpecBuilder

# width -> channels of conv1, stage2, stage3, stage4, conv5
WIDTHS = {
    "x0_5": (24, 48, 96, 192, 1024),
    "x1_0": (24, 116, 232, 464, 1024),
    "x1_5": (24, 176, 352, 704, 1024),
    "x2_0": (24, 244, 488, 976, 2048),
}
REPEATS = (4, 8, 4)  # units in stage2, stage3, stage4


def _conv_bn(b: SpecBuilder, x: str, out: int, kernel: int, prefix: str, i: int, stride: int = 1,
             depthwise: bool = False, relu: bool = True) -> str:
    """Conv (no bias) ``<prefix>.<i>``, BatchNorm ``<prefix>.<i+1>`` and optionally ReLU ``<prefix>.<i+2>``."""
    groups = b.shape(x)[0] if depthwise else 1
    y = b.conv(x, out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False, name=f"{prefix}.{i}")
    y = b.batch_norm(y, name=f"{prefix}.{i + 1}")
    return b.relu(y, name=f"{prefix}.{i + 2}") if relu else y


def shufflenet_v2(
    width: str = "x1_0",
    num_classes: int = 1000,
    input_size: int | tuple[int, int] = 224,
    in_channels: int = 3,
) -> ModelSpec:
    """ShuffleNetV2 of ``width`` ("x0_5", "x1_0", "x1_5", "x2_0") for ``(in_channels, H, W)`` inputs."""
    if not isinstance(width, str) or width not in WIDTHS:
        raise SpecError(f"shufflenet_v2 width must be one of {sorted(WIDTHS)}, got {width!r}")
    channels = WIDTHS[width]
    h, w = image_size(input_size, f"shufflenet_v2_{width}")
    b = SpecBuilder(f"shufflenet_v2_{width}")
    x = b.input((in_channels, h, w))
    x = _conv_bn(b, x, channels[0], 3, "conv1", 0, stride=2)
    x = b.max_pool(x, 3, stride=2, padding=1, name="maxpool")
    for s, (out, repeats) in enumerate(zip(channels[1:4], REPEATS), start=2):
        half = out // 2
        for j in range(repeats):
            p = f"stage{s}.{j}"
            if j == 0:
                left = _conv_bn(b, x, b.shape(x)[0], 3, f"{p}.branch1", 0, stride=2, depthwise=True, relu=False)
                left = _conv_bn(b, left, half, 1, f"{p}.branch1", 2)
                right = x
            else:
                left = b.channel_slice(x, 0, half, name=f"{p}.chunk0")
                right = b.channel_slice(x, half, 2 * half, name=f"{p}.chunk1")
            right = _conv_bn(b, right, half, 1, f"{p}.branch2", 0)
            right = _conv_bn(b, right, half, 3, f"{p}.branch2", 3, stride=2 if j == 0 else 1, depthwise=True,
                             relu=False)
            right = _conv_bn(b, right, half, 1, f"{p}.branch2", 5)
            x = b.channel_shuffle(b.concat(left, right, name=f"{p}.cat"), 2, name=f"{p}.shuffle")
    x = _conv_bn(b, x, channels[4], 1, "conv5", 0)
    return b.build(b.dense(b.global_avg_pool(x, name="globalpool"), num_classes, name="fc"))
