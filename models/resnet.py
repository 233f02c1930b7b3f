"""ResNet-18/34/50/101/152, ResNeXt and Wide ResNet in the neutral spec.

Layout and node names mirror torchvision's ``resnet*`` state_dict (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``...), so a
torchvision checkpoint loads with :func:`hal.weights.from_state_dict` without
renaming. ``variant="v1.5"`` (torchvision) puts a bottleneck's stride on its 3x3
conv; ``variant="v1"`` puts it on the first 1x1, as in He et al. (2015) and Keras.
A bottleneck's 3x3 conv has ``groups`` groups of ``width_per_group * planes / 64``
channels each (torchvision's rule): ResNeXt-50 32x4d is ``groups=32, width_per_group=4``,
Wide ResNet-50-2 is ``width_per_group=128``.
"""

from __future__ import annotations

import numbers

from hal.errors import SpecError
from hal.models.common import image_size
from hal.spec import ModelSpec, SpecBuilder

# depth -> (block, blocks per stage)
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def resnet(
    depth: int = 50,
    num_classes: int = 1000,
    input_size: int | tuple[int, int] = 224,
    in_channels: int = 3,
    variant: str = "v1.5",
    groups: int = 1,
    width_per_group: int = 64,
) -> ModelSpec:
    """A ResNet of the given depth for ``(in_channels, H, W)`` inputs; ``groups`` and
    ``width_per_group`` widen or group the bottleneck's 3x3 conv (ResNeXt, Wide ResNet)."""
    if not isinstance(depth, numbers.Integral) or depth not in DEPTHS:
        raise SpecError(f"resnet depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    if not isinstance(variant, str) or variant not in ("v1", "v1.5"):
        raise SpecError(f"resnet variant must be 'v1' or 'v1.5', got {variant!r}")
    h, w = image_size(input_size, "resnet")
    block, counts = DEPTHS[depth]
    for arg, value in (("groups", groups), ("width_per_group", width_per_group)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise SpecError(f"resnet {arg} must be an int >= 1, got {value!r}")
    if block == "basic" and (groups, width_per_group) != (1, 64):
        raise SpecError(f"resnet{depth} has basic blocks: they take only groups=1 and width_per_group=64")
    suffix = "" if variant == "v1.5" else "_v1"
    if groups > 1:
        name = f"resnext{depth}_{groups}x{width_per_group}d"
    elif width_per_group != 64:
        name = f"wide_resnet{depth}_{width_per_group / 64:g}"
    else:
        name = f"resnet{depth}"
    b = SpecBuilder(name + suffix)
    x = b.input((in_channels, h, w))
    x = b.conv(x, 64, 7, stride=2, padding=3, bias=False, name="conv1")
    x = b.relu(b.batch_norm(x, name="bn1"), name="relu")
    x = b.max_pool(x, 3, stride=2, padding=1, name="maxpool")
    for stage, n in enumerate(counts):
        planes = 64 * 2**stage
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            prefix = f"layer{stage + 1}.{i}"
            if block == "basic":
                x = _basic(b, x, prefix, planes, stride)
            else:
                width = planes * width_per_group // 64 * groups
                x = _bottleneck(b, x, prefix, planes, width, groups, stride, variant)
    x = b.global_avg_pool(x, name="avgpool")
    return b.build(b.dense(x, num_classes, name="fc"))


def _shortcut(b: SpecBuilder, x: str, prefix: str, out: int, stride: int) -> str:
    if stride == 1 and b.shape(x)[0] == out:
        return x
    s = b.conv(x, out, 1, stride=stride, bias=False, name=f"{prefix}.downsample.0")
    return b.batch_norm(s, name=f"{prefix}.downsample.1")


def _basic(b: SpecBuilder, x: str, prefix: str, planes: int, stride: int) -> str:
    y = b.conv(x, planes, 3, stride=stride, padding=1, bias=False, name=f"{prefix}.conv1")
    y = b.relu(b.batch_norm(y, name=f"{prefix}.bn1"), name=f"{prefix}.relu1")
    y = b.conv(y, planes, 3, padding=1, bias=False, name=f"{prefix}.conv2")
    y = b.batch_norm(y, name=f"{prefix}.bn2")
    y = b.add(y, _shortcut(b, x, prefix, planes, stride), name=f"{prefix}.add")
    return b.relu(y, name=f"{prefix}.relu2")


def _bottleneck(b: SpecBuilder, x: str, prefix: str, planes: int, width: int, groups: int, stride: int,
                variant: str) -> str:
    s1, s3 = (stride, 1) if variant == "v1" else (1, stride)
    y = b.conv(x, width, 1, stride=s1, bias=False, name=f"{prefix}.conv1")
    y = b.relu(b.batch_norm(y, name=f"{prefix}.bn1"), name=f"{prefix}.relu1")
    y = b.conv(y, width, 3, stride=s3, padding=1, groups=groups, bias=False, name=f"{prefix}.conv2")
    y = b.relu(b.batch_norm(y, name=f"{prefix}.bn2"), name=f"{prefix}.relu2")
    y = b.conv(y, planes * 4, 1, bias=False, name=f"{prefix}.conv3")
    y = b.batch_norm(y, name=f"{prefix}.bn3")
    y = b.add(y, _shortcut(b, x, prefix, planes * 4, stride), name=f"{prefix}.add")
    return b.relu(y, name=f"{prefix}.relu3")
