"""DenseNet-121/161/169/201 (DenseNet-BC) in the neutral spec (torchvision's names).

Each dense layer reads the concatenation of the block's input and every earlier
layer's output (``norm1``, ``relu1``, 1x1 ``conv1`` to ``bn_size * growth_rate``
channels, ``norm2``, ``relu2``, 3x3 ``conv2`` to ``growth_rate``); the graph keeps
that concatenation as a running ``Concat`` (``...denselayer<i>.cat``), which holds
the same channels in the same order as torchvision's ``torch.cat(features, 1)``.
A transition halves the channels (1x1 conv) and the resolution (2x2 average pool).
"""

from __future__ import annotations

import numbers

from hal.errors import SpecError
from hal.models.common import image_size
from hal.spec import ModelSpec, SpecBuilder

# depth -> (growth rate, initial features, layers per dense block)
DEPTHS = {
    121: (32, 64, (6, 12, 24, 16)),
    161: (48, 96, (6, 12, 36, 24)),
    169: (32, 64, (6, 12, 32, 32)),
    201: (32, 64, (6, 12, 48, 32)),
}


def densenet(
    depth: int = 121,
    num_classes: int = 1000,
    input_size: int | tuple[int, int] = 224,
    in_channels: int = 3,
    bn_size: int = 4,
) -> ModelSpec:
    """DenseNet of the given depth for ``(in_channels, H, W)`` inputs (H, W >= 29)."""
    if not isinstance(depth, numbers.Integral) or depth not in DEPTHS:
        raise SpecError(f"densenet depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    growth, features, blocks = DEPTHS[depth]
    h, w = image_size(input_size, "densenet")
    b = SpecBuilder(f"densenet{depth}")
    x = b.input((in_channels, h, w))
    x = b.conv(x, features, 7, stride=2, padding=3, bias=False, name="features.conv0")
    x = b.relu(b.batch_norm(x, name="features.norm0"), name="features.relu0")
    x = b.max_pool(x, 3, stride=2, padding=1, name="features.pool0")
    for i, layers in enumerate(blocks, start=1):
        for j in range(1, layers + 1):
            p = f"features.denseblock{i}.denselayer{j}"
            y = b.relu(b.batch_norm(x, name=f"{p}.norm1"), name=f"{p}.relu1")
            y = b.conv(y, bn_size * growth, 1, bias=False, name=f"{p}.conv1")
            y = b.relu(b.batch_norm(y, name=f"{p}.norm2"), name=f"{p}.relu2")
            y = b.conv(y, growth, 3, padding=1, bias=False, name=f"{p}.conv2")
            x = b.concat(x, y, name=f"{p}.cat")
        if i < len(blocks):
            p = f"features.transition{i}"
            x = b.relu(b.batch_norm(x, name=f"{p}.norm"), name=f"{p}.relu")
            x = b.conv(x, b.shape(x)[0] // 2, 1, bias=False, name=f"{p}.conv")
            x = b.avg_pool(x, 2, name=f"{p}.pool")
    x = b.relu(b.batch_norm(x, name="features.norm5"), name="relu")
    return b.build(b.dense(b.global_avg_pool(x, name="avgpool"), num_classes, name="classifier"))
