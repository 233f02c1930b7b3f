"""VGG-11/13/16/19, with or without BatchNorm, in the neutral spec (torchvision's names).

``features.<i>`` numbers the layers as torchvision's ``nn.Sequential`` does (a conv,
its BatchNorm when ``batch_norm``, its ReLU; a 2x2 max pool at each ``"M"``), so
``features.0.weight``, ``features.1.running_var`` and ``classifier.6.weight`` are
torchvision's keys. The head pools to 7x7 whatever the input size (adaptive
average pooling), as torchvision does, so the classifier is the same at any size.
"""

from __future__ import annotations

import numbers

from hal.errors import SpecError
from hal.models.common import image_size
from hal.spec import ModelSpec, SpecBuilder

# depth -> conv widths, "M" for a max pool (Simonyan & Zisserman's configurations A, B, D, E)
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def vgg(
    depth: int = 16,
    batch_norm: bool = True,
    num_classes: int = 1000,
    input_size: int | tuple[int, int] = 224,
    in_channels: int = 3,
    dropout: float = 0.5,
) -> ModelSpec:
    """VGG of the given depth for ``(in_channels, H, W)`` inputs (H, W >= 32: five 2x2 pools)."""
    if not isinstance(depth, numbers.Integral) or depth not in CONFIGS:
        raise SpecError(f"vgg depth must be one of {sorted(CONFIGS)}, got {depth!r}")
    if not isinstance(batch_norm, bool):
        raise SpecError(f"vgg batch_norm must be True or False, got {batch_norm!r}")
    h, w = image_size(input_size, "vgg")
    b = SpecBuilder(f"vgg{depth}{'_bn' if batch_norm else ''}")
    x = b.input((in_channels, h, w))
    i = 0
    for v in CONFIGS[depth]:
        if v == "M":
            x = b.max_pool(x, 2, name=f"features.{i}")
            i += 1
            continue
        x = b.conv(x, v, 3, padding=1, name=f"features.{i}")
        if batch_norm:
            x = b.batch_norm(x, name=f"features.{i + 1}")
        i += 2 if batch_norm else 1
        x = b.relu(x, name=f"features.{i}")
        i += 1
    x = b.flatten(b.adaptive_avg_pool(x, 7, name="avgpool"), name="flatten")
    for j in (0, 3):
        x = b.relu(b.dense(x, 4096, name=f"classifier.{j}"), name=f"classifier.{j + 1}")
        x = b.dropout(x, dropout, name=f"classifier.{j + 2}")
    return b.build(b.dense(x, num_classes, name="classifier.6"))
