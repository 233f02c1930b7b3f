"""The model zoo, written once in the neutral spec (imported as ``hal.models``)."""

from __future__ import annotations

import reprlib
from functools import partial
from typing import Any, Callable

from hal.errors import SpecError
from hal.spec import ModelSpec
from hal.models.conductivity import conductivity_cnn
from hal.models.convnext import SIZES as CONVNEXT_SIZES
from hal.models.convnext import convnext
from hal.models.densenet import densenet
from hal.models.efficientnet import VARIANTS as EFFICIENTNETS
from hal.models.efficientnet import efficientnet
from hal.models.mobilenet import mobilenet_v2, mobilenet_v3
from hal.models.regnet import SETTINGS as REGNETS
from hal.models.regnet import regnet
from hal.models.resnet import resnet
from hal.models.shufflenet import WIDTHS as SHUFFLENET_WIDTHS
from hal.models.shufflenet import shufflenet_v2
from hal.models.small_cnn import small_cnn
from hal.models.squeezenet import squeezenet
from hal.models.unet import unet
from hal.models.vgg import vgg

ZOO: dict[str, Callable[..., ModelSpec]] = {
    **{f"resnet{d}": partial(resnet, d) for d in (18, 34, 50, 101, 152)},
    "resnext50_32x4d": partial(resnet, 50, groups=32, width_per_group=4),
    "resnext101_32x8d": partial(resnet, 101, groups=32, width_per_group=8),
    "resnext101_64x4d": partial(resnet, 101, groups=64, width_per_group=4),
    "wide_resnet50_2": partial(resnet, 50, width_per_group=128),
    "wide_resnet101_2": partial(resnet, 101, width_per_group=128),
    **{f"vgg{d}{bn}": partial(vgg, d, bn == "_bn") for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    **{f"densenet{d}": partial(densenet, d) for d in (121, 161, 169, 201)},
    "squeezenet1_0": partial(squeezenet, "1_0"),
    "squeezenet1_1": partial(squeezenet, "1_1"),
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_large": partial(mobilenet_v3, "large"),
    "mobilenet_v3_small": partial(mobilenet_v3, "small"),
    **{name: partial(regnet, name) for name in REGNETS},
    **{f"efficientnet_{v}": partial(efficientnet, v) for v in EFFICIENTNETS},
    **{f"shufflenet_v2_{w}": partial(shufflenet_v2, w) for w in SHUFFLENET_WIDTHS},
    **{f"convnext_{s}": partial(convnext, s) for s in CONVNEXT_SIZES},
    "unet": unet,
    "unet3d": partial(unet, features=32, depth=3, ndim=3),
    "small_cnn": small_cnn,
    "conductivity_cnn": conductivity_cnn,
}


def get(name: str, **kwargs: Any) -> ModelSpec:
    """Build a zoo model by name, e.g. ``get("resnet50", num_classes=10, input_size=64)``."""
    if not isinstance(name, str) or name not in ZOO:
        raise SpecError(f"unknown model {reprlib.repr(name)}; the zoo has {sorted(ZOO)}")
    try:
        return ZOO[name](**kwargs)
    except TypeError as exc:
        raise SpecError(f"bad arguments for model {name!r}: {exc}") from None


__all__ = [
    "ZOO", "conductivity_cnn", "convnext", "densenet", "efficientnet", "get", "mobilenet_v2", "mobilenet_v3", "regnet", "resnet",
    "shufflenet_v2", "small_cnn", "squeezenet", "unet", "vgg",
]
