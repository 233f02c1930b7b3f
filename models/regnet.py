"""RegNetX and RegNetY (Radosavovic et al. 2020) in the neutral spec (torchvision's names).

A RegNet is four stages of residual bottleneck blocks (1x1, grouped 3x3 with
``group_width`` channels per group, RegNetY: squeeze-and-excitation, 1x1). The
per-stage widths and depths follow from four numbers (``depth``, ``w_0``, ``w_a``,
``w_m``) by the paper's quantised linear rule, computed here as torchvision computes it.
"""

from __future__ import annotations

import math

from hal.errors import SpecError
from hal.models.common import conv_norm_act, image_size, make_divisible, squeeze_excitation
from hal.spec import ModelSpec, SpecBuilder

# name -> (depth, w_0, w_a, w_m, group_width, SE ratio or 0): torchvision's regnet_* settings
SETTINGS = {
    "regnet_y_400mf": (16, 48, 27.89, 2.09, 8, 0.25),
    "regnet_y_800mf": (14, 56, 38.84, 2.4, 16, 0.25),
    "regnet_y_1_6gf": (27, 48, 20.71, 2.65, 24, 0.25),
    "regnet_y_3_2gf": (21, 80, 42.63, 2.66, 24, 0.25),
    "regnet_y_8gf": (17, 192, 76.82, 2.19, 56, 0.25),
    "regnet_y_16gf": (18, 200, 106.23, 2.48, 112, 0.25),
    "regnet_y_32gf": (20, 232, 115.89, 2.53, 232, 0.25),
    "regnet_y_128gf": (27, 456, 160.83, 2.52, 264, 0.25),
    "regnet_x_400mf": (22, 24, 24.48, 2.54, 16, 0.0),
    "regnet_x_800mf": (16, 56, 35.73, 2.28, 16, 0.0),
    "regnet_x_1_6gf": (18, 80, 34.01, 2.25, 24, 0.0),
    "regnet_x_3_2gf": (25, 88, 26.31, 2.25, 48, 0.0),
    "regnet_x_8gf": (23, 80, 49.56, 2.88, 120, 0.0),
    "regnet_x_16gf": (22, 216, 55.59, 2.1, 128, 0.0),
    "regnet_x_32gf": (23, 320, 69.86, 2.0, 168, 0.0),
}


def stages(depth: int, w_0: int, w_a: float, w_m: float, group_width: int) -> list[tuple[int, int, int]]:
    """``(width, blocks, group width)`` per stage: block ``j`` would have width
    ``w_0 + j w_a``, snapped to ``w_0 w_m^k`` (``k`` a whole number) and to a multiple of
    8; consecutive blocks of one width form a stage; then each width is made a
    multiple of its group width (``group_width``, at most the stage's width)."""
    widths = [round(w_0 * w_m ** round(math.log((j * w_a + w_0) / w_0) / math.log(w_m)) / 8) * 8
              for j in range(depth)]
    out: list[tuple[int, int, int]] = []
    for width in widths:
        if out and out[-1][0] == width:
            out[-1] = (width, out[-1][1] + 1, 0)
        else:
            out.append((width, 1, 0))
    return [(make_divisible(wd, min(group_width, wd)), n, min(group_width, wd)) for wd, n, _ in out]


def regnet(
    name: str = "regnet_y_400mf",
    num_classes: int = 1000,
    input_size: int | tuple[int, int] = 224,
    in_channels: int = 3,
) -> ModelSpec:
    """The RegNet ``name`` (one of :data:`SETTINGS`) for ``(in_channels, H, W)`` inputs."""
    if not isinstance(name, str) or name not in SETTINGS:
        raise SpecError(f"regnet name must be one of {sorted(SETTINGS)}, got {name!r}")
    depth, w_0, w_a, w_m, group_width, se_ratio = SETTINGS[name]
    h, w = image_size(input_size, name)
    b = SpecBuilder(name)
    x = b.input((in_channels, h, w))
    x = conv_norm_act(b, x, 32, 3, "stem", stride=2)
    for i, (width, blocks, gw) in enumerate(stages(depth, w_0, w_a, w_m, group_width), start=1):
        for j in range(blocks):
            p, cin, stride = f"trunk_output.block{i}.block{i}-{j}", b.shape(x)[0], 2 if j == 0 else 1
            y = conv_norm_act(b, x, width, 1, f"{p}.f.a")
            y = conv_norm_act(b, y, width, 3, f"{p}.f.b", stride=stride, groups=width // gw)
            if se_ratio:
                y = squeeze_excitation(b, y, round(se_ratio * cin), f"{p}.f.se")
            y = conv_norm_act(b, y, width, 1, f"{p}.f.c", act=None)
            if stride != 1 or cin != width:
                x = conv_norm_act(b, x, width, 1, f"{p}.proj", stride=stride, act=None)
            x = b.relu(b.add(x, y, name=f"{p}.add"), name=f"{p}.activation")
    x = b.global_avg_pool(x, name="avgpool")
    return b.build(b.dense(x, num_classes, name="fc"))
