"""A plainly hand-written Keras ResNet, the baseline that ``hal bench`` times
hal's ``tensorflow`` backend against in the same run.

Nothing here uses hal: it is what a Keras user would write. A functional model of
standard layers (``Conv2D``, ``BatchNormalization``, ``ReLU``, ``Add``...), NHWC,
torchvision's v1.5 layout (stride on the 3x3 convolution, like hal's ``resnet50``)
so both sides do the same arithmetic; the stem pads like ``keras.applications``
(``ZeroPadding2D`` + ``valid``), the other convolutions use ``padding="same"``.
Training is ``model.compile`` (Keras SGD with momentum, sparse cross-entropy on
logits, Keras's default ``jit_compile="auto"``) + ``train_on_batch``; inference
is ``predict_on_batch``.

The bench feeds hal and the native model the same channels-first batch; the
native model's first layer is a ``Permute`` to NHWC, the same in-graph
transpose hal does, so neither side pays a host-side transpose.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402
from tensorflow import keras  # noqa: E402
from tensorflow.keras import layers  # noqa: E402

from hal.native import NoBaseline  # noqa: E402

BLOCKS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}


def conv_bn(x: Any, filters: int, kernel: int, stride: int = 1, relu: bool = True) -> Any:
    x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, kernel_initializer="he_normal")(x)
    x = layers.BatchNormalization(epsilon=1e-5, momentum=0.9)(x)
    return layers.ReLU()(x) if relu else x


def bottleneck(x: Any, planes: int, stride: int) -> Any:
    shortcut = x
    if stride != 1 or x.shape[-1] != planes * 4:
        shortcut = conv_bn(x, planes * 4, 1, stride, relu=False)
    y = conv_bn(x, planes, 1)
    y = conv_bn(y, planes, 3, stride)
    y = conv_bn(y, planes * 4, 1, relu=False)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def basic(x: Any, planes: int, stride: int) -> Any:
    shortcut = x
    if stride != 1 or x.shape[-1] != planes:
        shortcut = conv_bn(x, planes, 1, stride, relu=False)
    y = conv_bn(x, planes, 3, stride)
    y = conv_bn(y, planes, 3, relu=False)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def resnet(depth: int = 50, num_classes: int = 1000, image: int | None = 224) -> keras.Model:
    """``image=None`` accepts any square-or-not spatial size (as torchvision's ResNet does)."""
    block, counts = BLOCKS[depth]
    unit = bottleneck if block == "bottleneck" else basic
    inputs = keras.Input((3, image, image))  # channels-first, like the bench's batch
    x = layers.Permute((2, 3, 1))(inputs)  # -> NHWC
    x = layers.ZeroPadding2D(3)(x)
    x = layers.Conv2D(64, 7, 2, use_bias=False, kernel_initializer="he_normal")(x)
    x = layers.ReLU()(layers.BatchNormalization(epsilon=1e-5, momentum=0.9)(x))
    x = layers.MaxPooling2D(3, 2)(layers.ZeroPadding2D(1)(x))
    for stage, n in enumerate(counts):
        for i in range(n):
            x = unit(x, 64 * 2**stage, 2 if stage > 0 and i == 0 else 1)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs)


class Native:
    """The usual Keras predict and train step, numpy in and out like hal; ``note`` names the
    model in the bench row."""

    def __init__(self, make: Callable[[], keras.Model], device: str = "cpu", note: str = "") -> None:
        self.device = "/CPU:0" if device == "cpu" else f"/{device.upper()}"
        with tf.device(self.device):
            self.model = make()
            self.model.compile(
                optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        self.num_params = sum(int(np.prod(w.shape)) for w in self.model.trainable_weights)
        self.note = note

    def predict(self, x: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            return np.asarray(self.model.predict_on_batch(x))

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        with tf.device(self.device):
            return float(np.asarray(self.model.train_on_batch(x, y)).reshape(-1)[0])


def build(model: str, num_classes: int, device: str, input_shape: tuple[int, ...]) -> Native:
    """The native twin of a hal zoo model (the ResNets, any input size); :class:`NoBaseline` for the others."""
    if not device.startswith(("cpu", "gpu")):
        raise NoBaseline(f"the Keras baselines run on cpu or gpu, not {device}")
    depth = {f"resnet{d}": d for d in BLOCKS}.get(model)
    if depth is None:
        raise NoBaseline(f"no hand-written Keras twin of {model}")
    return Native(lambda: resnet(depth, num_classes, None), device, "hand-written Keras ResNet")
