"""The model zoo, written once in the neutral spec (imported as ``hal.models``)."""

from __future__ import annotations

import reprlib
from functools import partial
from typing import Any, Callable

from hal.errors import SpecError
from hal.spec import ModelSpec
from hal.models.conductivity import conductivity_cnn
from hal.models.resnet import resnet
from hal.models.small_cnn import small_cnn

ZOO: dict[str, Callable[..., ModelSpec]] = {
    **{f"resnet{d}": partial(resnet, d) for d in (18, 34, 50, 101, 152)},
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


__all__ = ["ZOO", "conductivity_cnn", "get", "resnet", "small_cnn"]
