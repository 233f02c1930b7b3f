"""SqueezeNet 1.0 and 1.1 in the neutral spec (torchvision's names).

A Fire module squeezes with a 1x1 conv, then concatenates a 1x1 and a 3x3
expansion. The 3x3 max pools round their output size up (``ceil_mode``), and
the classifier is a 1x1 conv to ``num_classes`` followed by global average pooling.
"""

from __future__ import annotations

from hal.errors import SpecError
from hal.models.common import image_size
from hal.spec import ModelSpec, SpecBuilder

# version -> stem (channels, kernel), then the features: "M" a max pool, (squeeze, expand) a Fire
VERSIONS: dict[str, tuple[tuple[int, int], tuple[tuple[int, int] | str, ...]]] = {
    "1_0": ((96, 7), ("M", (16, 64), (16, 64), (32, 128), "M", (32, 128), (48, 192), (48, 192), (64, 256), "M",
                      (64, 256))),
    "1_1": ((64, 3), ("M", (16, 64), (16, 64), "M", (32, 128), (32, 128), "M", (48, 192), (48, 192), (64, 256),
                      (64, 256))),
}


def squeezenet(
    version: str = "1_1",
    num_classes: int = 1000,
    input_size: int | tuple[int, int] = 224,
    in_channels: int = 3,
    dropout: float = 0.5,
) -> ModelSpec:
    """SqueezeNet ``version`` ("1_0" or "1_1") for ``(in_channels, H, W)`` inputs."""
    if not isinstance(version, str) or version not in VERSIONS:
        raise SpecError(f"squeezenet version must be one of {sorted(VERSIONS)}, got {version!r}")
    (stem, k), layers = VERSIONS[version]
    h, w = image_size(input_size, "squeezenet")
    b = SpecBuilder(f"squeezenet{version}")
    x = b.input((in_channels, h, w))
    x = b.relu(b.conv(x, stem, k, stride=2, name="features.0"), name="features.1")
    for i, layer in enumerate(layers, start=2):
        p = f"features.{i}"
        if layer == "M":
            x = b.max_pool(x, 3, stride=2, ceil_mode=True, name=p)
            continue
        squeeze, expand = layer
        x = b.relu(b.conv(x, squeeze, 1, name=f"{p}.squeeze"), name=f"{p}.squeeze_activation")
        e1 = b.relu(b.conv(x, expand, 1, name=f"{p}.expand1x1"), name=f"{p}.expand1x1_activation")
        e3 = b.relu(b.conv(x, expand, 3, padding=1, name=f"{p}.expand3x3"), name=f"{p}.expand3x3_activation")
        x = b.concat(e1, e3, name=f"{p}.cat")
    x = b.dropout(x, dropout, name="classifier.0")
    x = b.relu(b.conv(x, num_classes, 1, name="classifier.1"), name="classifier.2")
    return b.build(b.global_avg_pool(x, name="classifier.3"))
