"""MobileNetV2 and MobileNetV3 (small, large) in the neutral spec (torchvision's names).

Both stack inverted residual blocks: a 1x1 expansion, a depthwise conv, (V3: an
optional squeeze-and-excitation) and a linear 1x1 projection, with a residual add
when the block keeps its shape. Channel counts scale with ``width_mult`` and are
rounded by :func:`~hal.models.common.make_divisible`, as torchvision does.
"""

from __future__ import annotations

import numbers

from hal.errors import SpecError
from hal.models.common import conv_norm_act, image_size, make_divisible, squeeze_excitation
from hal.spec import ModelSpec, SpecBuilder

# MobileNetV2: (expansion t, channels c, blocks n, first stride s) per stage
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))

# MobileNetV3 (Howard et al. 2019, tables 1 and 2): (kernel, expanded, out, SE, activation, stride) per block
V3_BLOCKS = {
    "large": (
        (3, 16, 16, False, "relu", 1), (3, 64, 24, False, "relu", 2), (3, 72, 24, False, "relu", 1),
        (5, 72, 40, True, "relu", 2), (5, 120, 40, True, "relu", 1), (5, 120, 40, True, "relu", 1),
        (3, 240, 80, False, "hardswish", 2), (3, 200, 80, False, "hardswish", 1),
        (3, 184, 80, False, "hardswish", 1), (3, 184, 80, False, "hardswish", 1),
        (3, 480, 112, True, "hardswish", 1), (3, 672, 112, True, "hardswish", 1),
        (5, 672, 160, True, "hardswish", 2), (5, 960, 160, True, "hardswish", 1),
        (5, 960, 160, True, "hardswish", 1),
    ),
    "small": (
        (3, 16, 16, True, "relu", 2), (3, 72, 24, False, "relu", 2), (3, 88, 24, False, "relu", 1),
        (5, 96, 40, True, "hardswish", 2), (5, 240, 40, True, "hardswish", 1), (5, 240, 40, True, "hardswish", 1),
        (5, 120, 48, True, "hardswish", 1), (5, 144, 48, True, "hardswish", 1), (5, 288, 96, True, "hardswish", 2),
        (5, 576, 96, True, "hardswish", 1), (5, 576, 96, True, "hardswish", 1),
    ),
}
V3_LAST = {"large": 1280, "small": 1024}  # width of the classifier's hidden layer


def _check_width(width_mult: float, model: str) -> None:
    if not isinstance(width_mult, numbers.Real) or isinstance(width_mult, bool) or not width_mult > 0:
        raise SpecError(f"{model} width_mult must be a number > 0, got {width_mult!r}")


def mobilenet_v2(
    num_classes: int = 1000,
    input_size: int | tuple[int, int] = 224,
    in_channels: int = 3,
    width_mult: float = 1.0,
    dropout: float = 0.2,
) -> ModelSpec:
    """MobileNetV2 (Sandler et al. 2018) for ``(in_channels, H, W)`` inputs; ReLU6 throughout."""
    _check_width(width_mult, "mobilenet_v2")
    h, w = image_size(input_size, "mobilenet_v2")
    b = SpecBuilder("mobilenet_v2")
    x = b.input((in_channels, h, w))
    x = conv_norm_act(b, x, make_divisible(32 * width_mult), 3, "features.0", stride=2, act="relu6")
    i = 1
    for t, c, n, s in V2_STAGES:
        out = make_divisible(c * width_mult)
        for j in range(n):
            p, cin, stride = f"features.{i}", b.shape(x)[0], s if j == 0 else 1
            y, k = x, 0
            if t != 1:
                y, k = conv_norm_act(b, y, cin * t, 1, f"{p}.conv.0", act="relu6"), 1
            hidden = b.shape(y)[0]
            y = conv_norm_act(b, y, hidden, 3, f"{p}.conv.{k}", stride=stride, groups=hidden, act="relu6")
            y = b.conv(y, out, 1, bias=False, name=f"{p}.conv.{k + 1}")
            y = b.batch_norm(y, name=f"{p}.conv.{k + 2}")
            x = b.add(x, y, name=f"{p}.add") if stride == 1 and cin == out else y
            i += 1
    x = conv_norm_act(b, x, make_divisible(1280 * max(1.0, width_mult)), 1, f"features.{i}", act="relu6")
    x = b.dropout(b.global_avg_pool(x, name="avgpool"), dropout, name="classifier.0")
    return b.build(b.dense(x, num_classes, name="classifier.1"))


def mobilenet_v3(
    arch: str = "large",
    num_classes: int = 1000,
    input_size: int | tuple[int, int] = 224,
    in_channels: int = 3,
    width_mult: float = 1.0,
    dropout: float = 0.2,
) -> ModelSpec:
    """MobileNetV3 ``arch`` ("large" or "small") for ``(in_channels, H, W)`` inputs:
    hardswish, squeeze-and-excitation gated by hardsigmoid, BatchNorm eps 1e-3."""
    if not isinstance(arch, str) or arch not in V3_BLOCKS:
        raise SpecError(f"mobilenet_v3 arch must be one of {sorted(V3_BLOCKS)}, got {arch!r}")
    _check_width(width_mult, f"mobilenet_v3_{arch}")
    h, w = image_size(input_size, f"mobilenet_v3_{arch}")
    bn = {"eps": 1e-3, "momentum": 0.01}
    b = SpecBuilder(f"mobilenet_v3_{arch}")
    x = b.input((in_channels, h, w))
    x = conv_norm_act(b, x, make_divisible(16 * width_mult), 3, "features.0", stride=2, act="hardswish", **bn)
    for i, (k, expanded, out, se, act, stride) in enumerate(V3_BLOCKS[arch], start=1):
        p, cin = f"features.{i}.block", b.shape(x)[0]
        expanded, out = make_divisible(expanded * width_mult), make_divisible(out * width_mult)
        y, j = x, 0
        if expanded != cin:
            y, j = conv_norm_act(b, y, expanded, 1, f"{p}.0", act=act, **bn), 1
        y = conv_norm_act(b, y, expanded, k, f"{p}.{j}", stride=stride, groups=expanded, act=act, **bn)
        if se:
            j += 1
            y = squeeze_excitation(b, y, make_divisible(expanded // 4), f"{p}.{j}", gate="hardsigmoid")
        y = conv_norm_act(b, y, out, 1, f"{p}.{j + 1}", act=None, **bn)
        x = b.add(y, x, name=f"features.{i}.add") if stride == 1 and cin == out else y
    n = len(V3_BLOCKS[arch]) + 1
    x = conv_norm_act(b, x, 6 * b.shape(x)[0], 1, f"features.{n}", act="hardswish", **bn)
    x = b.global_avg_pool(x, name="avgpool")
    x = b.activation(b.dense(x, make_divisible(V3_LAST[arch] * width_mult), name="classifier.0"), "hardswish",
                     name="classifier.1")
    x = b.dropout(x, dropout, name="classifier.2")
    return b.build(b.dense(x, num_classes, name="classifier.3"))
