"""The Keras baselines that ``hal bench`` times hal's ``tensorflow`` backend against in
the same run: a plainly hand-written ResNet, and ``keras.applications``' own model
where Keras ships the architecture (:data:`APPLICATIONS`).

Nothing here uses hal: it is what a Keras user would write or pick. The ResNet is a functional model of
standard layers (``Conv2D``, ``BatchNormalization``, ``ReLU``, ``Add``...), NHWC,
torchvision's v1.5 layout (stride on the 3x3 convolution, like hal's ``resnet50``)
so both sides do the same arithmetic; the stem pads like ``keras.applications``
(``ZeroPadding2D`` + ``valid``), the other convolutions use ``padding="same"``.
Training is ``model.compile`` (Keras SGD with momentum, sparse cross-entropy on
logits, Keras's default ``jit_compile="auto"``) + ``train_on_batch``; inference
is ``predict_on_batch``.

The ``keras.applications`` models are built with ``weights=None``,
``include_top=True``, ``classes=num_classes``, ``classifier_activation=None``
(logits, like hal) and the spec's input shape in NHWC. They have exactly hal's
(torchvision's) trainable parameter count, but they are the architecture as Keras
ships it, not numerically hal's model; they are a speed reference:

- ``MobileNetV2``, ``EfficientNetB0``..``B7``: stride-2 convolutions pad
  TensorFlow's "same" way (``correct_pad``: one pixel less at the top and left where
  the side is even; torch pads ``k // 2`` on both sides): same shapes, windows
  shifted. BatchNorm epsilon 1e-3 (torchvision 1e-5, but 1e-3 for EfficientNet
  B5-B7) and Keras momenta. ``MobileNetV2`` has no dropout before the classifier
  (torchvision 0.2). ``EfficientNet`` normalises its input in the model
  (``Rescaling(1/255)`` and a ``Normalization``); both are removed here (the
  leading ``Rescaling``/``Normalization`` layers of any application), as hal's
  model has no input normalisation: they are elementwise passes over the input,
  under 1% of the work, but not the architecture. Its dropout and stochastic
  depth schedule are torchvision's.
- ``DenseNet121``/``169``/``201``: torchvision's layers and padding (the zero
  padding before the stem's max pool cannot win after a ReLU); BatchNorm epsilon
  1.001e-5 (torchvision 1e-5).
- ``ConvNeXtTiny``..``Large``: torchvision's layers, padding and epsilons, and
  the input ``Normalization`` likewise removed; but no stochastic depth (Keras
  fixes ``drop_path_rate=0``; torchvision 0.1 to 0.5): training does a little
  less work.

``bf16``/``fp16``: Keras's mixed-precision recipe, the ``mixed_bfloat16`` /
``mixed_float16`` dtype policy while the model is built (float32 variables,
low-precision compute, BatchNormalization in float32) and a float32 ``linear``
activation on the logits, as the Keras guide does; fp16 trains through
``keras.optimizers.LossScaleOptimizer`` with GradScaler's constants
(``initial_scale=2**16``: Keras's default is 2**15; ``dynamic_growth_steps=2000``).
Its rule is GradScaler's (halve on an inf/nan gradient and skip the update, double
after 2000 clean steps) except that a skipped step does not advance the optimizer's
``iterations``, so a learning-rate schedule stands still where torch's and hal's
advance; the constant-LR SGD timed here is unaffected.

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

POLICY = {"fp32": None, "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}  # precision -> Keras dtype policy
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


_PAD = "stride-2 convs pad TF 'same' (1 pixel less at the top/left of even sides)"
APPLICATIONS: dict[str, tuple[str, str]] = {
    "mobilenet_v2": ("MobileNetV2", f"{_PAD}, BatchNorm eps 1e-3, no classifier dropout"),
    **{f"efficientnet_b{i}": (f"EfficientNetB{i}", _PAD + (", BatchNorm eps 1e-3" if i < 5 else "")
                              + ", input Rescaling and Normalization removed") for i in range(8)},
    **{f"densenet{d}": (f"DenseNet{d}", "BatchNorm eps 1.001e-5") for d in (121, 169, 201)},
    **{f"convnext_{s}": (f"ConvNeXt{s.title()}", "no stochastic depth in training, input Normalization removed")
       for s in ("tiny", "small", "base", "large")},
}
"""Zoo name -> (``keras.applications`` model, how it differs from hal's model in brief)."""


def application(model: str, num_classes: int, input_shape: tuple[int, ...]) -> keras.Model:
    """``keras.applications``' ``model`` for channels-first ``input_shape`` batches, without
    input normalisation (see the module docstring)."""
    name = APPLICATIONS[model][0]
    c, h, w = input_shape
    try:
        app = getattr(keras.applications, name)(
            weights=None, include_top=True, classes=num_classes, input_shape=(h, w, c), classifier_activation=None
        )
    except ValueError as exc:  # an input shape it refuses (a side under 32)
        raise NoBaseline(f"keras.applications.{name}: {exc}") from None
    start = next(layer for layer in app.layers[1:] if not isinstance(layer, (layers.Rescaling, layers.Normalization)))
    body = app if start is app.layers[1] else keras.Model(start.input, app.output)
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, body(layers.Permute((2, 3, 1))(inputs)))


class Native:
    """The usual Keras predict and train step, numpy in and out like hal; ``note`` names the
    model in the bench row; ``precision`` ``bf16``/``fp16`` builds it under Keras's mixed policy."""

    def __init__(self, make: Callable[[], keras.Model], device: str = "cpu", note: str = "",
                 precision: str = "fp32") -> None:
        self.device = "/CPU:0" if device == "cpu" else f"/{device.upper()}"
        policy = POLICY[precision]
        optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
        if precision == "fp16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0**16, dynamic_growth_steps=2000)
        with tf.device(self.device):
            previous = keras.mixed_precision.global_policy()
            keras.mixed_precision.set_global_policy(policy or previous)  # layers take the policy when built
            try:
                self.model = make()
                if policy:  # float32 logits (the Keras mixed-precision guide)
                    out = layers.Activation("linear", dtype="float32")(self.model.output)
                    self.model = keras.Model(self.model.input, out)
            finally:
                keras.mixed_precision.set_global_policy(previous)
            self.model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        self.num_params = sum(int(np.prod(w.shape)) for w in self.model.trainable_weights)
        self.note = note

    def predict(self, x: np.ndarray) -> np.ndarray:
        with tf.device(self.device):
            return np.asarray(self.model.predict_on_batch(x))

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        with tf.device(self.device):
            return float(np.asarray(self.model.train_on_batch(x, y)).reshape(-1)[0])


def build(model: str, num_classes: int, device: str, input_shape: tuple[int, ...], precision: str = "fp32") -> Native:
    """The native twin of a hal zoo model in ``precision``: the hand-written ResNets (any input
    size), else ``keras.applications``' model (:data:`APPLICATIONS`); :class:`NoBaseline` for the others."""
    if not device.startswith(("cpu", "gpu")):
        raise NoBaseline(f"the Keras baselines run on cpu or gpu, not {device}")
    if precision not in POLICY:
        raise NoBaseline(f"the Keras baselines run {', '.join(POLICY)}, not {precision}")
    mixed = f" ({POLICY[precision]}{', LossScaleOptimizer' if precision == 'fp16' else ''})" if POLICY[precision] else ""
    depth = {f"resnet{d}": d for d in BLOCKS}.get(model)
    if depth:
        return Native(lambda: resnet(depth, num_classes, None), device, f"hand-written Keras ResNet{mixed}", precision)
    if model not in APPLICATIONS:
        raise NoBaseline(f"keras.applications has no {model}")
    if len(input_shape) != 3:
        raise NoBaseline(f"keras.applications.{APPLICATIONS[model][0]} takes (C, H, W) images, not {input_shape}")
    name, differences = APPLICATIONS[model]
    return Native(lambda: application(model, num_classes, input_shape), device,
                  f"keras.applications.{name}{mixed} (not hal's numbers: {differences})", precision)
