"""Building blocks the zoo shares, named as torchvision names its modules.

``conv_norm_act`` is torchvision's ``Conv2dNormActivation`` (``<prefix>.0`` conv,
``<prefix>.1`` BatchNorm, ``<prefix>.2`` activation) and ``squeeze_excitation`` its
``SqueezeExcitation`` (``avgpool``, ``fc1``, ``activation``, ``fc2``,
``scale_activation``), so the parameters of a model built from them carry
torchvision's state_dict keys.
"""

from __future__ import annotations

import numbers

from hal.errors import SpecError
from hal.spec import SpecBuilder


def image_size(input_size: int | tuple[int, int], model: str) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair; raises naming ``model`` otherwise."""
    if isinstance(input_size, numbers.Integral) and not isinstance(input_size, bool):
        return int(input_size), int(input_size)
    if isinstance(input_size, (tuple, list)) and len(input_size) == 2:
        return input_size[0], input_size[1]
    raise SpecError(f"{model} input_size must be an int or (height, width), got {input_size!r}")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """The channel rounding of MobileNet and EfficientNet: ``v`` to the nearest multiple
    of ``divisor`` (at least ``min_value``, default ``divisor``), never more than 10% below ``v``."""
    low = divisor if min_value is None else min_value
    out = max(low, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def conv_norm_act(
    b: SpecBuilder,
    x: str,
    out_channels: int,
    kernel: int,
    prefix: str,
    stride: int = 1,
    groups: int = 1,
    act: str | None = "relu",
    eps: float = 1e-5,
    momentum: float = 0.1,
) -> str:
    """Conv (``(kernel - 1) // 2`` padding, no bias), BatchNorm and an optional activation."""
    y = b.conv(x, out_channels, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False,
               name=f"{prefix}.0")
    y = b.batch_norm(y, eps=eps, momentum=momentum, name=f"{prefix}.1")
    return y if act is None else b.activation(y, act, name=f"{prefix}.2")


def squeeze_excitation(b: SpecBuilder, x: str, squeeze_channels: int, prefix: str, act: str = "relu",
                       gate: str = "sigmoid") -> str:
    """``x * gate(fc2(act(fc1(mean(x)))))`` with 1x1 convolutions (with bias) ``fc1``, ``fc2``."""
    s = b.adaptive_avg_pool(x, 1, name=f"{prefix}.avgpool")
    s = b.activation(b.conv(s, squeeze_channels, 1, name=f"{prefix}.fc1"), act, name=f"{prefix}.activation")
    s = b.conv(s, b.shape(x)[0], 1, name=f"{prefix}.fc2")
    return b.mul(x, b.activation(s, gate, name=f"{prefix}.scale_activation"), name=f"{prefix}.mul")
