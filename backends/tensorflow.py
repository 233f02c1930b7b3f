"""TensorFlow backend: ``tensorflow:cpu``, ``tensorflow:gpu:N`` and ``tensorflow:ipu[:N]``.

The spec becomes a Keras *functional* model (the form Graphcore's IPU Keras
pipelines through stage assignment) of small layers, one per op, read as a table
from op to TensorFlow call (:func:`_layer_classes`). The layers use
only API present both in current TensorFlow 2.x with Keras 3 and in Graphcore's
TensorFlow 2.6 / Keras 2 port (``keras.layers.Layer``, ``add_weight``,
``keras.Input``, ``keras.Model(inputs, outputs)`` and plain ``tf.nn`` ops).
What does not depend on TensorFlow (padding split, average-pool divisor,
optimizer step scalars, precision dtypes) comes from :mod:`hal.lowering`.

Canonical rules, not TensorFlow's defaults:

* **Layout.** NHWC (channels-last) inside; the API boundary stays channels-first:
  the model's first layer transposes the input once, and a spatial output is
  transposed back once. Conv weights are HWIO inside (canonical OIHW transposed
  once at load, back at ``weights()``/gradients), Dense weights ``(in, out)``.
* **Padding** is the spec's explicit ``(before, after)`` per side. TF's ``SAME``
  is used only where it is provably the same numbers (:func:`hal.lowering.padding_mode`
  says ``"same"``; for average pools also ``count_include_pad=False``); otherwise
  ``tf.pad`` (``-inf`` for max pooling, so padding never wins) and ``VALID``. Not
  ``tf.nn.conv2d``'s explicit paddings: their backward pass on the CPU measured 4x
  slower on ResNet-18 at 64x64 (0.50 s vs 0.13 s per training step), 10 % at
  ResNet-50 224x224. Average pooling without counting padding rescales by
  :func:`hal.lowering.avg_pool_divisor`, computed once.
* **BatchNorm** is a custom layer: PyTorch momentum convention (``m`` weighs the
  new statistic), the spec's ``eps`` (1e-5 by default, not Keras's 1e-3),
  normalisation with the biased batch variance and running-variance update with
  the unbiased one. 4-d/5-d float32 uses the fused kernel
  (``tf.raw_ops.FusedBatchNormV3``, whose batch-variance output is the unbiased
  one and which, unlike ``tf.compat.v1.nn.fused_batch_norm``, does not raise eps
  to 1.001e-5); other ranks/dtypes use two-pass moments. The layer never writes
  its running statistics itself: it reports its batch statistics to whoever
  traces it (:class:`_Mode`), and the training step commits them.
* **Resampling and padding ops** follow torch, not the nearest TF call:
  ``Upsample`` gathers along one axis at a time with :mod:`hal.lowering`'s source
  indices and weights (``tf.image.resize`` maps coordinates by ``n / size`` where
  torch uses ``1 / scale``, rounds nearest differently and computes in float32);
  ``Pad`` replicate gathers with clamped indices (TF's ``SYMMETRIC`` mirrors after
  the edge; its ``REFLECT`` is torch's reflect); adaptive pooling is a native pool
  where the sizes divide, else one axis at a time (window means as a matrix, window
  maxima over gathered indices); ``ceil_mode`` is extra padding
  (:func:`hal.lowering.pool_padding`). 3-d pools in float64, which TF lacks, are a
  2-d pool then a 1-d one.
* **ConvTranspose** is ``tf.nn.conv_transpose`` of the full output, then cropped or
  extended by zeros, where TF's CPU kernels exist (no groups, no dilation); otherwise
  the equivalent stride-1 convolution of the input dilated by the stride with the
  flipped kernel (:func:`hal.lowering.conv_transpose_padding`), stored in that
  layout so that no call transposes the weight.
* **Flatten** is channels-first row-major: the layer transposes NHWC -> NCHW and
  reshapes (one small transpose where the feature map is smallest). The
  alternative, permuting the next Dense weight once at load, only works when a
  Dense reads the Flatten directly (or through elementwise ops); it would tie the
  weight layout to the graph's topology and leak into ``weights()``/gradients.
* **Optimizers** are ``torch.optim`` on raw ``tf.Variable`` s, not Keras's (Keras
  SGD keeps ``v = mu*v - lr*g``): SGD ``b = mu*b + g`` (zero-initialised, so the
  first step gives ``b = g`` exactly), Nesterov ``g + mu*b``, coupled weight decay;
  Adam with coupled L2, AdamW decoupled. Scalars that torch computes in Python
  (:func:`hal.lowering.step_scalars`) are computed on the host in float64 and fed
  per step.
* **Gradient accumulation** runs G micro-batches inside the compiled step
  (``tf.while_loop``), BatchNorm statistics per micro-batch, running statistics
  updated after each micro-batch in order, gradients averaged.
* **Steps per call.** ``run_steps`` runs S steps in one ``tf.function`` (a
  ``tf.while_loop`` over the stacked batches); ``train_step`` is the same step
  body without the loop.
* **Non-finite steps** (``config.check_finite``) are decided inside the traced
  step: the weights, optimizer slots and BatchNorm running statistics are
  assigned under one ``tf.cond`` on "loss and every gradient finite", and the
  ``run_steps`` loop stops at the first step not applied. The only extra work is
  one ``is_finite`` reduction over the gradients; no extra host sync.
* **Mixed precision** (``bf16``, ``fp16``; :mod:`hal.lowering`'s rules): Keras's
  ``mixed_bfloat16``/``mixed_float16`` policy on every layer but the
  normalisations; float32 variables, loss, gradients and optimizer state. fp16
  scales the loss dynamically inside the ``tf.function`` with GradScaler's rule
  and constants (:data:`hal.lowering.LOSS_SCALE`, not Keras's
  ``LossScaleOptimizer``, whose scale grows every 2000 steps from 2**15): the
  scale lives in ``tf.Variable`` s, a step with an inf/nan gradient assigns no
  weight or slot (a ``tf.cond``) and backs the scale off, and ``check_finite``
  fails a step only for a non-finite loss.

**XLA** (option ``xla``). Each compiled function is a ``tf.function``;
``jit_compile`` is chosen per device and mode (``XLA``) from measurements:
ResNet50, batch 16, fp32, TensorFlow 2.21 on a shared 2-core x86 CPU
(``bench/tf_vs_native.py --xla-sweep``, hal and a native Keras model
interleaved, medians of 7): XLA off / on took 1.82 s / 2.05 s per inference
batch and 4.27 s / 8.63 s per training step, so the CPU runs *without* XLA
(Grappler's oneDNN fusions win; Keras 3's own ``jit_compile="auto"`` also turns
XLA off on CPU-only machines). GPUs (not measured here) use XLA, as Keras does.
``options={"xla": True}`` or ``False`` overrides the choice.

**IPU.** ``tensorflow:ipu[:N]`` needs Graphcore's TensorFlow (Poplar SDK); its
translation of hal's IPU plan lives in :mod:`hal.backends.ipu_tensorflow`,
imported only when an IPU target is compiled.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from hal import spec as S
from hal.backend import Availability, Backend, Capabilities, Executable, Option, Target, Weights
from hal.errors import BackendUnavailable, ConfigError, HalError, TargetError, UnsupportedError
from hal.lowering import (
    FP32_OPS,
    IPU_PRECISIONS,
    LOSS_SCALE,
    LOSS_SCALED,
    MASTER_DTYPE,
    LossScale,
    adam_bias_corrections,
    adaptive_windows,
    avg_pool_divisor,
    conv_transpose_padding,
    linear_indices,
    loss_scale_step,
    nearest_indices,
    nhwc_pad,
    padding_mode,
    pool_padding,
    scalar_table,
    step_scalar_names,
)
from hal.training import SGD, Adam, AdamW, DataParallel, TrainConfig

if TYPE_CHECKING:
    from hal.ipu import Plan

# TensorFlow is imported lazily (``_tf()``): listing backends, ``availability()`` and
# ``device_notes()`` never import it.

INSTALL_HINT = "pip install 'hal-cnn[tensorflow]'"
DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos", "intel-tensorflow")
PRECISIONS = ("fp32", "fp64", "bf16", "fp16")
MIXED_POLICY = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}  # Keras's: float32 variables, low-precision compute
CHANNELS_LAST = "hal_to_channels_last"
CHANNELS_FIRST = "hal_to_channels_first"

# jit_compile per (device kind, mode): measured on the CPU, see the module docstring
XLA = {
    ("cpu", "infer"): False,
    ("cpu", "train"): False,
    ("gpu", "infer"): True,  # not measured here (no GPU): Keras's own "auto" choice on GPUs
    ("gpu", "train"): True,
}


# ---------------------------------------------------------------------------
# importing TensorFlow (lazily and quietly)
# ---------------------------------------------------------------------------

_TF: list[Any] = []


@contextlib.contextmanager
def _stderr_to(path: str) -> Iterator[None]:
    """Point file descriptor 2 at ``path`` (C++ logging that TF_CPP_MIN_LOG_LEVEL no longer covers)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _load_triton_first() -> None:
    """Load Triton's native library if it is installed. Triton ships with CUDA builds of torch
    (``torch.optim`` loads it) and segfaults when it loads after TensorFlow (torch 2.14 / Triton
    3.8 with TensorFlow 2.21): loaded first, torch and TensorFlow share one process."""
    if "triton._C.libtriton" not in sys.modules and importlib.util.find_spec("triton") is not None:
        with contextlib.suppress(ImportError):
            importlib.import_module("triton._C.libtriton")


def _tf() -> Any:
    """Import TensorFlow once, quieting its start-up logging (only here, never at hal import)."""
    if _TF:
        return _TF[0]
    if "tensorflow" in sys.modules:
        import tensorflow as tf
    else:
        _load_triton_first()
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with tempfile.TemporaryDirectory() as tmp:
            log = os.path.join(tmp, "tf-import.log")
            try:
                with _stderr_to(log):
                    import tensorflow as tf
            except Exception as exc:
                text = Path(log).read_text(errors="replace")[-2000:] if os.path.exists(log) else ""
                raise BackendUnavailable(f"tensorflow failed to import: {exc!r}\n{text}".rstrip()) from exc
    _TF.append(tf)
    return tf


def _keras() -> Any:
    return _tf().keras


def _raw(v: Any) -> Any:
    """The ``tf.Variable`` behind a Keras variable (Keras 3 wraps it; Keras 2 is one)."""
    tf = _tf()
    return v if isinstance(v, tf.Variable) else v.value


# ---------------------------------------------------------------------------
# the layers: one per op, each a few lines of tf.nn
# ---------------------------------------------------------------------------

StatsSink = Callable[[Any, Any, Any], None]  # (BatchNorm layer, batch mean, unbiased batch variance)


class _Mode(threading.local):
    """Trace-time switch read by BatchNorm layers in training mode: where their
    batch statistics go (``None``: nowhere, the forward changes no state), and
    ``moments``, which computes them across replicas (synchronised BatchNorm).

    It is set inside each traced Python function (never between calls), so any
    retrace of that function sees the same value. Per thread: ``MirroredStrategy``
    traces each replica in its own thread.
    """

    def __init__(self) -> None:
        self.sink: StatsSink | None = None
        self.moments: Callable[[Any, list[int]], tuple[Any, Any, Any]] | None = None

    @contextlib.contextmanager
    def reporting(self, sink: StatsSink | None) -> Iterator[None]:
        old, self.sink = self.sink, sink
        try:
            yield
        finally:
            self.sink = old


_LAYERS: dict[Any, type] = {}


def _layer_classes() -> dict[Any, type]:
    """op -> Keras layer class; defined on first use so that importing this file needs no TensorFlow."""
    if _LAYERS:
        return _LAYERS
    tf = _tf()
    keras = _keras()

    class Layer(keras.layers.Layer):
        """Base: the op, its input shapes (channels-first, per sample) and the dtype."""

        def __init__(self, op: S.Op, in_shapes: list[S.Shape], name: str, dtype: str, mode: _Mode) -> None:
            super().__init__(name=name, dtype=dtype)
            self.op, self.in_shapes, self.mode = op, in_shapes, mode

        def weight(self, name: str, shape: tuple[int, ...], trainable: bool = True) -> Any:
            return self.add_weight(name=name, shape=shape, dtype=self.dtype, initializer="zeros", trainable=trainable)

    def convolve(x: Any, kernel: Any, stride: Any, padding: str, dilation: Any, groups: int) -> Any:
        """Convolution of NHWC ``x`` with an HWIO kernel of ``groups`` groups."""
        if x.shape.rank == 4:
            return tf.nn.conv2d(x, kernel, stride, padding, dilations=dilation)
        if x.shape.rank == 5 and groups > 1:  # conv3d refuses groups on the CPU: one conv per group
            xs, ks = tf.split(x, groups, axis=-1), tf.split(kernel, groups, axis=-1)
            return tf.concat([tf.nn.convolution(a, k, stride, padding, dilations=dilation)
                              for a, k in zip(xs, ks)], axis=-1)
        return tf.nn.convolution(x, kernel, stride, padding, dilations=dilation)

    def pool(x: Any, is_max: bool, kernel: Any, stride: Any, padding: str) -> Any:
        """``tf.nn.max_pool`` or ``avg_pool``; in 3-d float64, which TF's 3-d pools lack, a 2-d
        pool over (H, W) then one over D (a box's max or mean, SAME's too, is taken axis by axis)."""
        fn = tf.nn.max_pool if is_max else tf.nn.avg_pool
        if x.shape.rank != 5 or x.dtype != tf.float64:
            return fn(x, kernel, stride, padding)
        _, d, h, w, c = x.shape.as_list()
        y = fn(tf.reshape(x, [-1, h, w, c]), kernel[1:], stride[1:], padding)
        _, h, w, _ = y.shape.as_list()
        y = fn(tf.reshape(y, [-1, d, h * w, c]), [kernel[0], 1], [stride[0], 1], padding)
        return tf.reshape(y, [-1, y.shape[1], h, w, c])

    def dilate(x: Any, stride: tuple[int, ...]) -> Any:
        """NHWC ``x`` with ``stride - 1`` zeros between neighbouring pixels along each spatial axis."""
        for axis, s in enumerate(stride, start=1):
            if s > 1:
                shape = x.shape.as_list()  # (N, ..., n, ...) -> (N, ..., n, s, ...) -> (N, ..., n * s, ...)
                zeros = [[0, 0]] * (axis + 1) + [[0, s - 1]] + [[0, 0]] * (len(shape) - axis - 1)
                x = tf.pad(tf.expand_dims(x, axis + 1), zeros)
                x = tf.reshape(x, [-1, *shape[1:axis], shape[axis] * s, *shape[axis + 1:]])
                x = x[(slice(None),) * axis + (slice(None, (shape[axis] - 1) * s + 1),)]
        return x

    class Conv(Layer):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            op, cin, spatial = self.op, self.in_shapes[0][0], self.in_shapes[0][1:]
            self.kernel = self.weight("kernel", (*op.kernel, cin // op.groups, op.out_channels))  # HWIO
            self.bias = self.weight("bias", (op.out_channels,)) if op.bias else None
            self.nd = len(op.kernel)
            # tf.nn.convolution (1-d, 3-d) refuses stride > 1 with dilation > 1: stride 1, then subsample
            self.subsample = self.nd != 2 and max(op.stride) > 1 and max(op.dilation) > 1
            self.stride = (1,) * self.nd if self.subsample else op.stride
            mode = padding_mode(op.padding, spatial, op.kernel, op.stride, op.dilation)
            if self.subsample and mode == "same":  # SAME of the strided conv, not of the stride-1 one
                mode = "explicit"
            self.padding = "SAME" if mode == "same" else "VALID"
            self.pad = nhwc_pad(op.padding) if mode in ("symmetric", "explicit") else None

        def call(self, x: Any) -> Any:
            op = self.op
            if self.pad is not None:
                x = tf.pad(x, self.pad)
            y = convolve(x, self.kernel, self.stride, self.padding, op.dilation, op.groups)
            if self.subsample:
                y = y[(slice(None), *(slice(None, None, s) for s in op.stride))]
            return tf.nn.bias_add(y, self.bias) if self.bias is not None else y

    class ConvTranspose(Layer):
        """Native ``tf.nn.conv_transpose`` (of the full output, then cropped or
        extended) where the CPU kernels allow it: no groups, no dilation. Otherwise
        the equivalent stride-1 convolution over the input dilated by the stride,
        kernel flipped (:func:`hal.lowering.conv_transpose_padding`)."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            op, (cin, *spatial) = self.op, self.in_shapes[0]
            self.native = op.groups == 1 and set(op.dilation) == {1}
            if self.native:  # (*k, out, in), what conv_transpose takes
                self.kernel = self.weight("kernel", (*op.kernel, op.out_channels, cin))
                full = [(n - 1) * s + k for n, k, s in zip(spatial, op.kernel, op.stride)]
                self.full = [*full, op.out_channels]
                pads = [(-a, q - b) for (a, b), q in zip(op.padding, op.output_padding)]  # of the full output
            else:  # HWIO of the flipped, swapped kernel: (*k, in/groups, out)
                self.kernel = self.weight("kernel", (*op.kernel, cin // op.groups, op.out_channels))
                pads = list(conv_transpose_padding(op))  # of the dilated input
            zeros = tuple((max(a, 0), max(b, 0)) for a, b in pads)  # a positive pad is zeros, a negative one crops
            self.pad = nhwc_pad(zeros) if any(map(any, zeros)) else None
            crop = (slice(None), *(slice(max(-a, 0), b if b < 0 else None) for a, b in pads))
            self.crop = crop if any(min(p) < 0 for p in pads) else None
            self.bias = self.weight("bias", (op.out_channels,)) if op.bias else None

        def call(self, x: Any) -> Any:
            op = self.op
            if self.native:
                batch = tf.shape(x)[:1]
                y = tf.nn.conv_transpose(x, self.kernel, tf.concat([batch, self.full], 0), op.stride, "VALID")
                y = y if self.pad is None else tf.pad(y, self.pad)
            else:
                x = dilate(x, op.stride)
                x = x if self.pad is None else tf.pad(x, self.pad)
                y = convolve(x, self.kernel, 1, "VALID", op.dilation, op.groups)
            y = y if self.crop is None else y[self.crop]
            return tf.nn.bias_add(y, self.bias) if self.bias is not None else y

    class BatchNorm(Layer):
        def __init__(self, *args: Any, statistics_as_gradients: bool = False) -> None:
            super().__init__(*args)
            c = self.in_shapes[0][0]
            self.gamma, self.beta = self.weight("gamma", (c,)), self.weight("beta", (c,))
            self.statistics_as_gradients = statistics_as_gradients  # trainable, so that the tape watches them
            self.running_mean = self.weight("running_mean", (c,), trainable=statistics_as_gradients)
            self.running_var = self.weight("running_var", (c,), trainable=statistics_as_gradients)
            rank = len(self.in_shapes[0]) + 1
            self.axes = [0, *range(1, rank - 1)]
            self.fused = rank in (4, 5) and self.dtype == "float32"

        def call(self, x: Any, training: Any = None) -> Any:
            op = self.op
            if training and self.mode.moments is not None:  # synchronised over replicas
                mean, var, unbiased = self.mode.moments(x, self.axes)
                y = self._normalise(x, mean, var)
            elif not training:
                if self.fused:
                    return tf.raw_ops.FusedBatchNormV3(
                        x=x, scale=self.gamma, offset=self.beta, mean=self.running_mean, variance=self.running_var,
                        epsilon=op.eps, data_format="NHWC" if x.shape.rank == 4 else "NDHWC", is_training=False,
                    )[0]
                return self._normalise(x, self.running_mean, self.running_var)
            elif self.fused:
                y, mean, unbiased = tf.raw_ops.FusedBatchNormV3(
                    x=x, scale=self.gamma, offset=self.beta,
                    mean=tf.zeros([0], x.dtype), variance=tf.zeros([0], x.dtype),
                    epsilon=op.eps, exponential_avg_factor=1.0, data_format="NHWC" if x.shape.rank == 4 else "NDHWC",
                    is_training=True,
                )[:3]
            else:
                mean = tf.reduce_mean(x, self.axes)
                var = tf.reduce_mean(tf.square(x - mean), self.axes)  # biased, two-pass
                y = self._normalise(x, mean, var)
                n = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
                unbiased = var * n / (n - 1.0)
            if self.statistics_as_gradients:
                return self._statistics_as_gradients(y, tf.stop_gradient(mean), tf.stop_gradient(unbiased))
            if self.mode.sink is not None:
                self.mode.sink(self, tf.stop_gradient(mean), tf.stop_gradient(unbiased))
            return y

        def _statistics_as_gradients(self, y: Any, mean: Any, unbiased: Any) -> Any:
            """``y``, whose backward hands ``running_mean`` and ``running_var`` this
            batch's mean and unbiased variance as their gradients: the optimizer, not
            the forward, updates the running statistics (``tensorflow:ipu`` pipelines)."""

            @tf.custom_gradient
            def through(y: Any, running_mean: Any, running_var: Any) -> Any:
                return tf.identity(y), lambda dy: (dy, tf.cast(mean, running_mean.dtype),
                                                   tf.cast(unbiased, running_var.dtype))

            return through(y, tf.convert_to_tensor(self.running_mean), tf.convert_to_tensor(self.running_var))

        def updated(self, mean: Any, unbiased: Any, running: tuple[Any, Any]) -> tuple[Any, Any]:
            """Running ``(mean, var)`` after a batch with these statistics (PyTorch's momentum)."""
            m = tf.constant(self.op.momentum, mean.dtype)
            return m * mean + (1.0 - m) * running[0], m * unbiased + (1.0 - m) * running[1]

        def _normalise(self, x: Any, mean: Any, var: Any) -> Any:
            inv = self.gamma * tf.math.rsqrt(var + tf.constant(self.op.eps, x.dtype))
            return x * inv + (self.beta - mean * inv)

    class Activation(Layer):
        def call(self, x: Any) -> Any:
            op, c = self.op, lambda v: tf.constant(v, x.dtype)
            if op.fn == "relu":
                return tf.nn.relu(x)
            if op.fn == "leaky_relu":  # tf.nn.leaky_relu's alpha is a float32 attribute: exact only in float32
                if x.dtype == tf.float32:
                    return tf.nn.leaky_relu(x, alpha=op.alpha)
                return tf.where(x >= 0, x, c(op.alpha) * x)
            if op.fn == "sigmoid":
                return tf.sigmoid(x)
            if op.fn == "tanh":
                return tf.tanh(x)
            if op.fn == "silu":
                return x * tf.sigmoid(x)
            if op.approximate == "tanh":  # written out: tf.nn.gelu rounds its constants through float32
                inner = c(math.sqrt(2.0 / math.pi)) * (x + c(0.044715) * (x * x * x))
                return c(0.5) * x * (c(1.0) + tf.tanh(inner))
            if op.fn == "relu6":
                return tf.nn.relu6(x)
            if op.fn == "elu":  # tf.nn.elu has no alpha
                return tf.where(x > 0, x, c(op.alpha) * tf.math.expm1(tf.minimum(x, c(0.0))))
            if op.fn == "hardsigmoid":
                return tf.nn.relu6(x + c(3.0)) / c(6.0)
            if op.fn == "hardswish":
                return x * (tf.nn.relu6(x + c(3.0)) / c(6.0))
            if op.fn == "softplus":  # torch's threshold: linear where beta x > threshold
                z = c(op.beta) * x
                return tf.where(z > c(op.threshold), x, tf.math.softplus(tf.minimum(z, c(op.threshold))) / c(op.beta))
            if op.fn == "mish":
                return x * tf.tanh(tf.math.softplus(x))
            return x * c(0.5) * (c(1.0) + tf.math.erf(x * c(math.sqrt(0.5))))

    class PReLU(Layer):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.slope = self.weight("weight", (self.op.num_parameters,))  # (1,) or (C,): broadcasts over NHWC

        def call(self, x: Any) -> Any:
            return tf.where(x >= 0, x, self.slope * x)

    class Norm(Layer):
        """LayerNorm (channels), GroupNorm (channel groups and positions) and
        InstanceNorm (positions): two-pass biased moments, then the per-channel affine."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            c, rank = self.in_shapes[0][0], len(self.in_shapes[0]) + 1
            spatial = list(range(1, rank - 1))
            self.groups = self.op.groups if isinstance(self.op, S.GroupNorm) else None
            if isinstance(self.op, S.LayerNorm):
                self.axes = [rank - 1]
            elif isinstance(self.op, S.InstanceNorm):
                self.axes = spatial
            else:  # (N, *S, C) -> (N, *S, G, C/G): each group over its positions and channels
                self.axes = [*spatial, rank]
            self.gamma = self.weight("gamma", (c,)) if self.op.affine else None
            self.beta = self.weight("beta", (c,)) if self.op.affine else None

        def call(self, x: Any) -> Any:
            shape = tf.shape(x)
            y = x if self.groups is None else tf.reshape(x, tf.concat([shape[:-1], [self.groups, -1]], 0))
            mean = tf.reduce_mean(y, self.axes, keepdims=True)
            centred = y - mean
            var = tf.reduce_mean(tf.square(centred), self.axes, keepdims=True)
            y = centred * tf.math.rsqrt(var + tf.constant(self.op.eps, x.dtype))
            if self.groups is not None:
                y = tf.reshape(y, shape)
            return y * self.gamma + self.beta if self.gamma is not None else y

    class MaxPool(Layer):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            op, spatial = self.op, self.in_shapes[0][1:]
            padding = pool_padding(spatial, op)  # with ceil_mode's extra padding after
            mode = padding_mode(padding, spatial, op.kernel, op.stride)  # TF SAME ignores padding: -inf
            self.padding = "SAME" if mode == "same" else "VALID"
            self.pad = nhwc_pad(padding) if mode in ("symmetric", "explicit") else None

        def call(self, x: Any) -> Any:
            if self.pad is not None:
                x = tf.pad(x, self.pad, constant_values=float("-inf"))
            return pool(x, True, self.op.kernel, self.op.stride, self.padding)

    class AvgPool(Layer):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            op, spatial = self.op, self.in_shapes[0][1:]
            padding = pool_padding(spatial, op)  # with ceil_mode's extra padding after
            mode = padding_mode(padding, spatial, op.kernel, op.stride)
            if mode == "same" and op.count_include_pad:  # TF SAME divides by the count of real pixels
                mode = "explicit"
            self.padding = "SAME" if mode == "same" else "VALID"
            self.pad = nhwc_pad(padding) if mode in ("symmetric", "explicit") else None
            self.scale = None  # VALID over tf.pad divides by prod(kernel): rescale to the spec's divisor
            if self.pad is not None:
                scale = math.prod(op.kernel) / avg_pool_divisor(spatial, op)
                self.scale = None if np.all(scale == 1.0) else scale[..., None].astype(self.compute_dtype)  # (*out, 1)

        def call(self, x: Any) -> Any:
            if self.pad is not None:
                x = tf.pad(x, self.pad)
            y = pool(x, False, self.op.kernel, self.op.stride, self.padding)
            return y if self.scale is None else y * tf.constant(self.scale)

    class AdaptivePool(Layer):
        """Native pooling where every output size divides its input size (uniform
        windows); otherwise one spatial axis at a time (a box window's mean or max is
        the mean or max along each axis in turn): the mean as a matrix of window
        weights, the max over gathered windows, short windows repeating their last index."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            spatial, out = self.in_shapes[0][1:], self.op.output_size
            self.is_max = isinstance(self.op, S.AdaptiveMaxPool)
            uniform = all(n % o == 0 for n, o in zip(spatial, out))
            self.kernel = [n // o for n, o in zip(spatial, out)] if uniform else None
            # per axis: the mean matrix (out, n) or the max's indices (out, longest window)
            self.axes = [] if uniform else [(i + 1, self.table(n, o)) for i, (n, o) in enumerate(zip(spatial, out))]

        def table(self, n: int, out: int) -> np.ndarray:
            windows = adaptive_windows(n, out)
            if self.is_max:
                longest = max(b - a for a, b in windows)
                return np.array([[min(a + j, b - 1) for j in range(longest)] for a, b in windows])
            table = np.zeros((out, n), self.compute_dtype)
            for i, (a, b) in enumerate(windows):
                table[i, a:b] = 1.0 / (b - a)
            return table

        def call(self, x: Any) -> Any:
            if self.kernel is not None:
                return pool(x, self.is_max, self.kernel, self.kernel, "VALID")
            letters = "abcdefgh"[: x.shape.rank]
            for axis, table in self.axes:
                if self.is_max:
                    x = tf.reduce_max(tf.gather(x, table, axis=axis), axis=axis + 1)
                else:  # x[..., n, ...] -> x[..., out, ...] through the (out, n) matrix
                    out = letters.replace(letters[axis], "z")
                    x = tf.einsum(f"{letters},z{letters[axis]}->{out}", x, tf.constant(table))
            return x

    class Pad(Layer):
        """``tf.pad`` for constant and reflect (TF's REFLECT leaves out the edge, as torch's
        reflect); replicate gathers with clamped indices (TF's SYMMETRIC repeats the edge
        once and then mirrors, which is not torch's replicate)."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            op, spatial = self.op, self.in_shapes[0][1:]
            self.pad = nhwc_pad(op.padding)
            self.gathers = [
                (axis, np.clip(np.arange(-a, n + b), 0, n - 1))
                for axis, (n, (a, b)) in enumerate(zip(spatial, op.padding), start=1) if a or b
            ] if op.mode == "replicate" else []

        def call(self, x: Any) -> Any:
            op = self.op
            if op.mode == "constant":
                return tf.pad(x, self.pad, constant_values=op.value)
            if op.mode == "reflect":
                return tf.pad(x, self.pad, mode="REFLECT")
            for axis, index in self.gathers:
                x = tf.gather(x, index, axis=axis)
            return x

    class Upsample(Layer):
        """One spatial axis at a time with the source indices (and linear weights) of
        :mod:`hal.lowering`: torch's coordinate rules exactly, in any dtype
        (``tf.image.resize`` maps coordinates by ``n / size`` even where torch uses
        ``1 / scale``, rounds nearest differently and computes bilinear in float32)."""

        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            op, spatial, rank = self.op, self.in_shapes[0][1:], len(self.in_shapes[0]) + 1
            self.axes = []  # (axis, index) for nearest, (axis, i0, i1, w0, w1) for linear; unchanged axes left out
            for dim, n in enumerate(spatial):
                axis, shape = dim + 1, [-1 if a == dim + 1 else 1 for a in range(rank)]
                if op.mode == "nearest":
                    index = nearest_indices(op, dim, n)
                    if not np.array_equal(index, np.arange(n)):
                        self.axes.append((axis, index))
                elif op.size[dim] != n:
                    i0, i1, w0, w1 = linear_indices(op, dim, n)
                    self.axes.append((axis, i0, i1, *(w.reshape(shape).astype(self.compute_dtype) for w in (w0, w1))))

        def call(self, x: Any) -> Any:
            for axis, *rule in self.axes:
                if len(rule) == 1:
                    x = tf.gather(x, rule[0], axis=axis)
                else:
                    i0, i1, w0, w1 = rule
                    x = tf.gather(x, i0, axis=axis) * tf.constant(w0) + tf.gather(x, i1, axis=axis) * tf.constant(w1)
            return x

    class ChannelShuffle(Layer):
        def call(self, x: Any) -> Any:  # (..., groups, C/groups) -> (..., C/groups, groups) -> (..., C)
            rank, g = x.shape.rank, self.op.groups
            y = tf.reshape(x, [-1, *x.shape[1:-1], g, x.shape[-1] // g])
            return tf.reshape(tf.transpose(y, [*range(rank - 1), rank, rank - 1]), [-1, *x.shape[1:]])

    class ChannelSlice(Layer):
        def call(self, x: Any) -> Any:
            return x[..., self.op.start:self.op.stop]

    class GlobalAvgPool(Layer):
        def call(self, x: Any) -> Any:
            return tf.reduce_mean(x, list(range(1, x.shape.rank - 1)))

    class Add(Layer):
        def call(self, xs: list[Any]) -> Any:  # broadcasting: equal ranks, so NHWC broadcasts as NCHW does
            return functools.reduce(tf.add, xs)

    class Mul(Layer):
        def call(self, xs: list[Any]) -> Any:
            return functools.reduce(tf.multiply, xs)

    class Scale(Layer):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.layer_scale = self.weight("layer_scale", (self.in_shapes[0][0],))  # (C,) over the last axis

        def call(self, x: Any) -> Any:
            return x * self.layer_scale

    class Concat(Layer):
        def call(self, xs: list[Any]) -> Any:
            return tf.concat(xs, axis=-1)

    class Flatten(Layer):
        def call(self, x: Any) -> Any:
            rank = x.shape.rank
            if rank > 2:  # channels-first row-major order: NHWC -> NCHW, then flatten
                x = tf.transpose(x, [0, rank - 1, *range(1, rank - 1)])
            return tf.reshape(x, [-1, math.prod(self.in_shapes[0])])

    class Dense(Layer):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            op = self.op
            self.kernel = self.weight("kernel", (self.in_shapes[0][0], op.out_features))  # (in, out)
            self.bias = self.weight("bias", (op.out_features,)) if op.bias else None

        def call(self, x: Any) -> Any:  # (N, in) or, pointwise, NHWC (N, *spatial, in)
            y = tf.matmul(x, self.kernel) if x.shape.rank == 2 else tf.tensordot(x, self.kernel, 1)
            return tf.nn.bias_add(y, self.bias) if self.bias is not None else y

    class Dropout(Layer):
        def call(self, x: Any, training: Any = None) -> Any:
            if training and self.op.rate > 0:
                return tf.nn.dropout(x, rate=self.op.rate)
            return x

    class StochasticDepth(Layer):
        def call(self, x: Any, training: Any = None) -> Any:
            p = self.op.p
            if not training or p == 0:
                return x
            shape = [tf.shape(x)[0] if self.op.mode == "row" else 1] + [1] * (x.shape.rank - 1)
            keep = tf.cast(tf.random.uniform(shape, dtype=x.dtype) >= p, x.dtype)  # survives with probability 1 - p
            return x * (keep / tf.constant(1.0 - p, x.dtype) if p < 1 else keep)

    class Transpose(keras.layers.Layer):
        """The once-per-call layout change at the API boundary."""

        def __init__(self, perm: list[int], name: str, dtype: str) -> None:
            super().__init__(name=name, dtype=dtype)
            self.perm = perm

        def call(self, x: Any) -> Any:
            return tf.transpose(x, self.perm)

    _LAYERS.update({
        S.Conv: Conv, S.ConvTranspose: ConvTranspose, S.BatchNorm: BatchNorm, S.LayerNorm: Norm, S.GroupNorm: Norm,
        S.InstanceNorm: Norm, S.Activation: Activation, S.PReLU: PReLU, S.MaxPool: MaxPool, S.AvgPool: AvgPool,
        S.AdaptiveAvgPool: AdaptivePool, S.AdaptiveMaxPool: AdaptivePool, S.GlobalAvgPool: GlobalAvgPool, S.Pad: Pad,
        S.ChannelShuffle: ChannelShuffle, S.ChannelSlice: ChannelSlice, S.Upsample: Upsample, S.Add: Add, S.Mul: Mul,
        S.Scale: Scale, S.Concat: Concat, S.Flatten: Flatten, S.Dense: Dense, S.Dropout: Dropout,
        S.StochasticDepth: StochasticDepth, "transpose": Transpose,
    })
    return _LAYERS


def _layer_name(node: str, taken: set[str]) -> str:
    """A Keras layer name for a node: the node name itself where TensorFlow's name
    scopes allow it (they may not start with '_' or '-')."""
    name = node if node[0].isalnum() or node[0] == "." else f"n{node}"
    while name in taken:
        name += "_"
    taken.add(name)
    return name


@dataclass
class KerasGraph:
    """The functional model and, per node, its layer and the canonical <-> TF weight map."""

    model: Any
    layers: dict[str, Any]
    mode: _Mode
    variables: dict[str, tuple[Any, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = field(
        default_factory=dict
    )  # canonical name -> (tf.Variable, canonical->tf, tf->canonical)


def build_keras_model(
    spec: S.ModelSpec, dtype: str = "float32", batch_size: int | None = None, mixed: str | None = None,
    statistics_as_gradients: bool = False,
) -> KerasGraph:
    """The spec as a Keras functional model: channels-first input of per-sample
    shape ``spec.input_shape`` (``batch_size`` fixes the batch dim, as the IPU
    needs), one layer per node (named after it), NHWC in between. ``mixed`` (a
    Keras mixed policy name) gives every layer but the normalisations
    (:data:`hal.lowering.FP32_OPS`, which keep ``dtype``) that policy: Keras casts
    their inputs and variables to its compute dtype (:mod:`hal.lowering`'s precision rules).
    ``statistics_as_gradients``: BatchNorm running statistics are trainable Keras
    variables whose gradient is the batch statistic, for an optimizer to apply
    (``tensorflow:ipu`` pipelines); they stay out of ``spec.trainable()``."""
    keras = _keras()
    classes = _layer_classes()
    mode = _Mode()
    taken: set[str] = set()
    names = {n.name: _layer_name(n.name, taken) for n in spec.nodes}
    rank = len(spec.input_shape) + 1
    inp = keras.Input(shape=spec.input_shape, batch_size=batch_size, dtype=dtype, name=names[spec.input.name])
    to_last = classes["transpose"]([0, *range(2, rank), 1], _layer_name(CHANNELS_LAST, taken), mixed or dtype)
    values = {spec.input.name: to_last(inp)}
    layers: dict[str, Any] = {}
    for node in spec.nodes[1:]:
        layer_dtype = dtype if mixed is None or isinstance(node.op, FP32_OPS) else mixed
        extra = {"statistics_as_gradients": statistics_as_gradients} if isinstance(node.op, S.BatchNorm) else {}
        layer = classes[type(node.op)](node.op, spec.in_shapes(node), names[node.name], layer_dtype, mode, **extra)
        args = [values[i] for i in node.inputs]
        values[node.name] = layer(args if len(args) > 1 else args[0])
        layers[node.name] = layer
    out = values[spec.output]
    out_rank = len(spec.output_shape) + 1
    if out_rank > 2:  # a spatial output goes back to channels-first
        perm = [0, out_rank - 1, *range(1, out_rank - 1)]
        out = classes["transpose"](perm, _layer_name(CHANNELS_FIRST, taken), dtype)(out)
    model = keras.Model(inputs=inp, outputs=out, name=_layer_name(spec.name or "hal", set()))
    graph = KerasGraph(model, layers, mode)
    for node in spec.nodes[1:]:
        for p, var, to_tf, from_tf in _weight_map(node.op, layers[node.name]):
            graph.variables[f"{node.name}.{p}"] = (_raw(var), to_tf, from_tf)
    return graph


def _weight_map(op: S.Op, layer: Any) -> list[tuple[str, Any, Callable, Callable]]:
    """(canonical param, variable, canonical->TF layout, TF->canonical layout) for one node."""
    same = (lambda a: a, lambda a: a)
    if isinstance(op, S.Conv):
        nd = len(op.kernel)
        to_tf = tuple(range(2, 2 + nd)) + (1, 0)  # (O, I, *k) -> (*k, I, O)
        back = tuple(int(i) for i in np.argsort(to_tf))
        out = [("weight", layer.kernel, lambda a, t=to_tf: np.transpose(a, t), lambda a, b=back: np.transpose(a, b))]
        return out + ([("bias", layer.bias, *same)] if op.bias else [])
    if isinstance(op, S.ConvTranspose):
        to_tf, from_tf = _conv_transpose_layout(op, layer.in_shapes[0][0], layer.native)
        return [("weight", layer.kernel, to_tf, from_tf)] + ([("bias", layer.bias, *same)] if op.bias else [])
    if isinstance(op, S.Dense):
        out = [("weight", layer.kernel, np.transpose, np.transpose)]
        return out + ([("bias", layer.bias, *same)] if op.bias else [])
    if isinstance(op, S.BatchNorm):
        return [("weight", layer.gamma, *same), ("bias", layer.beta, *same),
                ("running_mean", layer.running_mean, *same), ("running_var", layer.running_var, *same)]
    if isinstance(op, (S.LayerNorm, S.GroupNorm, S.InstanceNorm)):
        return [("weight", layer.gamma, *same), ("bias", layer.beta, *same)] if op.affine else []
    if isinstance(op, S.PReLU):
        return [("weight", layer.slope, *same)]
    if isinstance(op, S.Scale):
        shape = (-1, *(1 for _ in layer.in_shapes[0][1:]))  # canonical (C, 1, ..., 1)
        return [("layer_scale", layer.layer_scale, lambda a: a.reshape(-1), lambda a, s=shape: a.reshape(s))]
    return []


def _conv_transpose_layout(op: S.ConvTranspose, cin: int, native: bool) -> tuple[Callable, Callable]:
    """canonical <-> TF layouts of a transposed convolution's weight ``(in, out/groups, *k)``:
    ``(*k, out, in)`` for ``tf.nn.conv_transpose`` (no groups), else the HWIO kernel
    ``(*k, in/groups, out)`` of the equivalent convolution, flipped in space."""
    nd, g = len(op.kernel), op.groups
    space = tuple(range(nd))
    if native:
        perm = (*range(2, 2 + nd), 1, 0)
        back = tuple(int(i) for i in np.argsort(perm))
        return lambda a: np.transpose(a, perm), lambda a: np.transpose(a, back)
    grouped = (g, cin // g, op.out_channels // g, *op.kernel)  # (g, in/g, out/g, *k)
    perm = (*range(3, 3 + nd), 1, 0, 2)  # -> (*k, in/g, g, out/g)
    back = tuple(int(i) for i in np.argsort(perm))

    def to_tf(a: np.ndarray) -> np.ndarray:
        return np.flip(np.transpose(a.reshape(grouped), perm), space).reshape(*op.kernel, cin // g, op.out_channels)

    def from_tf(a: np.ndarray) -> np.ndarray:
        hwio = np.flip(a, space).reshape(*op.kernel, cin // g, g, op.out_channels // g)
        return np.transpose(hwio, back).reshape(cin, op.out_channels // g, *op.kernel)

    return to_tf, from_tf


# ---------------------------------------------------------------------------
# loss and optimizers (torch.optim semantics on tf.Variables)
# ---------------------------------------------------------------------------


def _loss(config: TrainConfig) -> Callable[[Any, Any], Any]:
    """Per-sample loss ``(y_true, y_pred) -> (N,)``; hal's loss is its mean over the batch."""
    tf = _tf()

    if config.loss == "cross_entropy":
        def per_sample(y: Any, out: Any) -> Any:
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=out)
    else:
        def per_sample(y: Any, out: Any) -> Any:
            sq = tf.square(out - tf.cast(y, out.dtype))
            return tf.reduce_mean(tf.reshape(sq, [tf.shape(sq)[0], -1]), axis=1)
    return per_sample


def torch_update(o: Any, p: Any, g: Any, slots: Mapping[str, Any], h: Mapping[str, Any]) -> list[Any]:
    """One ``torch.optim`` update of variable ``p`` with gradient ``g``, operation for
    operation as torch's single-tensor CPU path; ``h`` holds this step's
    :func:`hal.lowering.step_scalars` as tensors of ``p``'s dtype. Returns the
    assign ops (Keras 2 optimizers must return them)."""
    tf = _tf()
    dt = g.dtype
    c = lambda v: tf.constant(v, dt)  # noqa: E731 - Python floats rounded to the dtype, as torch does
    p_val = tf.convert_to_tensor(p)
    if isinstance(o, SGD):
        if o.weight_decay:
            g = g + c(o.weight_decay) * p_val
        ops = []
        if o.momentum:
            b = slots["momentum"]
            buf = b * c(o.momentum) + g  # zero-initialised buffer: the first step gives b = g exactly
            ops.append(b.assign(buf))
            g = g + c(o.momentum) * buf if o.nesterov else buf
        return ops + [p.assign(p_val - h["lr"] * g)]
    m, v = slots["exp_avg"], slots["exp_avg_sq"]
    if isinstance(o, AdamW):
        if o.weight_decay:
            p_val = p_val * h["decay"]  # decoupled: p *= 1 - lr * wd
    elif o.weight_decay:
        g = g + c(o.weight_decay) * p_val  # coupled L2
    m_new = m + c(1.0 - o.betas[0]) * (g - m)  # torch's lerp (weight < 0.5 branch)
    v_new = v * c(o.betas[1]) + c(1.0 - o.betas[1]) * g * g
    denom = tf.sqrt(v_new) / h["bc2_sqrt"] + c(o.eps)
    return [m.assign(m_new), v.assign(v_new), p.assign(p_val - h["step_size"] * (m_new / denom))]


def update_loss_scale(scale: Any, clean: Any, found_inf: Any, rule: LossScale = LOSS_SCALE) -> tuple[Any, Any]:
    """:func:`hal.lowering.next_loss_scale` on tensors: ``(scale, clean steps)`` after a step."""
    return loss_scale_step(scale, clean, found_inf, _tf().where, rule)


def slot_names(config: TrainConfig) -> tuple[str, ...]:
    """The optimizer state kept per trainable variable (``torch.optim``'s names)."""
    o = config.optimizer
    if isinstance(o, SGD):
        return ("momentum",) if o.momentum else ()
    return ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------------
# the executable (CPU and GPU)
# ---------------------------------------------------------------------------


class TensorFlowExecutable(Executable):
    """A spec compiled for TensorFlow on a CPU or GPU: the Keras functional model,
    torch.optim optimizer state on tf.Variables, and ``tf.function`` s traced on
    first use (one per mode and input shape)."""

    def __init__(self, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig,
                 xla: bool | None = None, target: Target | None = None) -> None:
        super().__init__(spec, target or Target("tensorflow", device), config)
        tf = _tf()
        self.device, self.xla = device, xla
        self.tf_device = "/CPU:0" if device == "cpu" else f"/{device.upper()}"
        self.dtype = MASTER_DTYPE[config.precision]  # variables, loss, gradients, optimizer state
        self.np_dtype = np.dtype(self.dtype)
        with self._placement():
            self.graph = build_keras_model(spec, self.dtype, mixed=MIXED_POLICY.get(config.precision))
            self.train_names = spec.trainable()
            self.train_vars = [self.graph.variables[k][0] for k in self.train_names]
            self.slots = [
                {s: tf.Variable(tf.zeros_like(v), trainable=False, name=s) for s in slot_names(config)}
                for v in self.train_vars
            ]
            # fp16: GradScaler's (scale, consecutive clean steps, optimizer updates applied = Adam's t - 1)
            self.loss_scale_vars = (
                tf.Variable(LOSS_SCALE.init, dtype=tf.float32, trainable=False, name="loss_scale"),
                tf.Variable(0, dtype=tf.int32, trainable=False, name="loss_scale_clean_steps"),
                tf.Variable(0, dtype=tf.int32, trainable=False, name="optimizer_updates"),
            ) if config.precision in LOSS_SCALED else None
        self.batch_norms = [layer for layer in self.graph.layers.values() if isinstance(layer.op, S.BatchNorm)]
        self.per_sample_loss = _loss(config)
        self.scalar_names = step_scalar_names(config)
        self._fns: dict[str, Any] = {}
        self._load_weights(weights)

    # -- plumbing ---------------------------------------------------------------------

    def _placement(self) -> Any:
        return _tf().device(self.tf_device)

    def _jit(self, mode: str) -> bool:
        return XLA.get((self.device.split(":")[0], mode), True) if self.xla is None else self.xla

    def _call(self, name: str, python_fn: Callable[..., Any], mode: str, *args: Any) -> Any:
        tf = _tf()
        if name not in self._fns:
            self._fns[name] = tf.function(python_fn, jit_compile=self._jit(mode))
        try:
            with self._placement():
                return self._fns[name](*args)
        except tf.errors.ResourceExhaustedError as exc:
            n = len(args[0]) if args and hasattr(args[0], "__len__") else "?"
            raise HalError(f"{self.target}: out of memory running {name} on a batch of {n}: "
                           f"use a smaller batch or grad_accum ({exc.message.splitlines()[0][:200]})") from None

    def _x(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=self.np_dtype)

    def _y(self, y: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(y, dtype=np.int32 if self.config.loss == "cross_entropy" else self.np_dtype)

    # -- traced bodies (Python; run inside tf.function) ------------------------------

    def _forward(self, x: Any, training: bool) -> Any:
        tf = _tf()
        with self.graph.mode.reporting(None):
            return tf.cast(self.graph.model(x, training=training), self.dtype)

    def _grads(self, x: Any, y: Any) -> tuple[Any, list[Any], list[tuple[Any, Any]]]:
        """Mean loss, mean gradients and the BatchNorm running statistics after G
        micro-batches (statistics per micro-batch, running statistics updated after
        each one in order); no state is written."""
        tf = _tf()
        g = self.config.grad_accum
        running = [(tf.convert_to_tensor(layer.running_mean), tf.convert_to_tensor(layer.running_var))
                   for layer in self.batch_norms]

        def micro(xm: Any, ym: Any, running: list[tuple[Any, Any]]) -> tuple[Any, list[Any], list[tuple[Any, Any]]]:
            stats: dict[int, tuple[Any, Any]] = {}
            with self.graph.mode.reporting(lambda layer, mean, var: stats.__setitem__(id(layer), (mean, var))):
                with tf.GradientTape() as tape:
                    out = tf.cast(self.graph.model(xm, training=True), self.dtype)  # the loss in fp32 (mixed precision)
                    loss = tf.reduce_mean(self.per_sample_loss(ym, out))
                    scaled = loss / g if g > 1 else loss  # as torch: backward of loss / G per micro-batch
                    target = scaled if self.loss_scale_vars is None else scaled * self.loss_scale_vars[0]
                grads = tape.gradient(target, self.train_vars)
                if self.loss_scale_vars is not None:  # fp16: the gradients of loss * scale, times 1 / scale
                    grads = [None if d is None else d * (1.0 / self.loss_scale_vars[0]) for d in grads]
            running = [layer.updated(*stats[id(layer)], r) if id(layer) in stats else r
                       for layer, r in zip(self.batch_norms, running)]
            return scaled, [tf.zeros_like(v) if d is None else d for v, d in zip(self.train_vars, grads)], running

        if g == 1:
            return micro(x, y, running)
        xs = tf.reshape(x, [g, -1, *x.shape[1:]])
        ys = tf.reshape(y, [g, -1, *y.shape[1:]])

        def body(i: Any, loss: Any, acc: list[Any], running: list[tuple[Any, Any]]) -> tuple[Any, ...]:
            l_i, g_i, running = micro(xs[i], ys[i], running)
            return i + 1, loss + l_i, [a + b for a, b in zip(acc, g_i)], running

        zero = (tf.constant(0), tf.zeros([], self.dtype), [tf.zeros_like(v) for v in self.train_vars], running)
        _, loss, grads, running = tf.while_loop(lambda i, *_: i < g, body, zero, parallel_iterations=1)
        return loss, grads, running

    def _step(self, x: Any, y: Any, scalars: Any) -> tuple[Any, Any]:
        """One optimizer step: ``(loss, applied)``. With ``check_finite`` every
        assignment (weights, slots, running statistics) sits under one ``tf.cond``
        on a finite loss and finite gradients (fp16: a finite loss; an inf/nan
        gradient is :meth:`_loss_scaled_update`'s skip, not a failure)."""
        tf = _tf()
        loss, grads, running = self._grads(x, y)
        h = {k: tf.cast(scalars[i], self.dtype) for i, k in enumerate(self.scalar_names)}

        def update() -> list[Any]:
            return [op for v, d, slots in zip(self.train_vars, grads, self.slots)
                    for op in torch_update(self.config.optimizer, v, d, slots, h)]

        def commit() -> Any:
            ops = update() if self.loss_scale_vars is None else self._loss_scaled_update(grads, h, update)
            for layer, (mean, var) in zip(self.batch_norms, running):
                ops += [layer.running_mean.assign(mean), layer.running_var.assign(var)]
            with tf.control_dependencies(ops):
                return tf.constant(True)

        if not self.config.check_finite:
            return loss, commit()
        checked = (loss,) if self.loss_scale_vars is not None else (loss, *grads)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in checked])
        return loss, tf.cond(finite, commit, lambda: tf.constant(False))

    def _loss_scaled_update(self, grads: list[Any], h: dict[str, Any], update: Callable[[], list[Any]]) -> list[Any]:
        """fp16 (GradScaler's rule, :func:`hal.lowering.next_loss_scale`): the ``update`` ops
        run only if every gradient is finite, then the scale backs off or grows. Adam's
        ``step_size``/``bc2_sqrt`` in ``h`` are replaced by their values at torch's ``t`` = updates
        applied + 1 (a skipped step does not count; ``1 - b**t = -expm1(t * log(b))`` in float32,
        a few ulps from torch's float64); the schedule's ``lr`` stays the step counter's."""
        tf = _tf()
        scale, clean, count = self.loss_scale_vars
        o = self.config.optimizer
        if isinstance(o, Adam):  # read before the update below assigns the count
            step_size, bc2_sqrt = adam_bias_corrections(h["lr"], tf.cast(count + 1, self.dtype), o.betas,
                                                        tf.math.expm1, tf.sqrt)
            h.update(step_size=step_size, bc2_sqrt=bc2_sqrt)
        found_inf = tf.logical_not(tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in grads]))

        def applied() -> Any:
            with tf.control_dependencies(update()):
                return tf.constant(True)

        done = tf.cond(found_inf, lambda: tf.constant(False), applied)
        new_scale, new_clean = update_loss_scale(scale, clean, found_inf)
        with tf.control_dependencies([done]):
            return [scale.assign(new_scale), clean.assign(new_clean), count.assign_add(tf.cast(done, tf.int32))]

    @property
    def loss_scale(self) -> float | None:
        """fp16: the current dynamic loss scale (:data:`hal.lowering.LOSS_SCALE`); otherwise ``None``."""
        return None if self.loss_scale_vars is None else float(self.loss_scale_vars[0].numpy())

    def _steps(self, xs: Any, ys: Any, scalars: Any) -> tuple[Any, Any]:
        """Steps over stacked batches until one is not applied: ``(losses, applied)``,
        losses NaN after the last step attempted."""
        tf = _tf()
        steps = tf.shape(xs)[0]

        def body(s: Any, ok: Any, losses: Any) -> tuple[Any, Any, Any]:
            loss, applied = self._step(xs[s], ys[s], scalars[s])
            return s + 1, applied, tf.tensor_scatter_nd_update(losses, [[s]], [loss])

        start = (tf.constant(0), tf.constant(True), tf.fill([steps], tf.constant(np.nan, self.dtype)))
        s, ok, losses = tf.while_loop(lambda s, ok, _: ok & (s < steps), body, start, parallel_iterations=1)
        return losses, s - tf.cast(tf.logical_not(ok), s.dtype)  # the step that stopped the loop was not applied

    # -- the hooks --------------------------------------------------------------------

    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        if training:
            out = self._call("forward_train", lambda a: self._forward(a, True), "train", self._x(x))
        else:
            out = self._call("infer", lambda a: self._forward(a, False), "infer", self._x(x))
        return out.numpy()

    def _loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        loss, grads = self._call("grads", lambda a, b: self._grads(a, b)[:2], "train", self._x(x), self._y(y))
        return float(loss), {k: self.graph.variables[k][2](d.numpy()) for k, d in zip(self.train_names, grads)}

    def _train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
        scalars = scalar_table(self.config, self.step, 1)[0]
        loss, applied = self._call("train_step", self._step, "train", self._x(x), self._y(y), scalars)
        self.step += int(applied)
        return float(loss), bool(applied)

    def _run_steps(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, int]:
        scalars = scalar_table(self.config, self.step, len(xs))
        losses, applied = self._call("run_steps", self._steps, "train", self._x(xs), self._y(ys), scalars)
        self.step += int(applied)
        return losses.numpy().astype(np.float64), int(applied)

    def weights(self) -> Weights:
        return {k: from_tf(v.numpy()).copy() for k, (v, _, from_tf) in self.graph.variables.items()}

    def _load_weights(self, weights: Weights) -> None:
        new = {k: to_tf(np.asarray(weights[k], dtype=self.np_dtype)) for k, (_, to_tf, _) in self.graph.variables.items()}
        with self._placement():
            for k, (v, _, _) in self.graph.variables.items():
                v.assign(new[k])


def _precision_reason(precision: str, where: str) -> str:
    """Why ``where`` (``tensorflow`` or a target) refuses ``precision``."""
    return f"precision {precision!r} runs on tensorflow:ipu only, not {where}"


# ---------------------------------------------------------------------------
# data parallelism: tf.distribute (hal.training.DataParallel)
# ---------------------------------------------------------------------------

_STRATEGIES: dict[DataParallel, Any] = {}  # MultiWorkerMirroredStrategy, made at program start
_STRATEGY_ERRORS: dict[DataParallel, str] = {}  # why one could not be made


def prepare_data_parallel(dp: DataParallel) -> None:
    """What TensorFlow must be told before its runtime initialises: ``dp.replicas`` logical
    CPU devices (``tf.config.set_logical_device_configuration``) and, with several hosts,
    the ``MultiWorkerMirroredStrategy`` of ``TF_CONFIG`` (created now: TensorFlow allows it
    only at program start). Called too late, it changes nothing:
    :func:`data_parallel_strategy` then says what is missing."""
    tf = _tf()
    if dp.hosts > 1 and dp not in _STRATEGIES:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        workers = resolver.cluster_spec().as_dict().get("worker", [])
        if len(workers) != dp.hosts or resolver.task_type != "worker" or resolver.task_id != dp.host_rank:
            raise ConfigError(
                f"tensorflow: DataParallel(hosts={dp.hosts}, host_rank={dp.host_rank}) needs TF_CONFIG naming "
                f"{dp.hosts} workers with this one as task {{'type': 'worker', 'index': {dp.host_rank}}}, got "
                f"{len(workers)} workers, task {resolver.task_type!r} {resolver.task_id!r} (TF_CONFIG="
                f"{os.environ.get('TF_CONFIG', '')!r})"
            )
        try:
            _STRATEGIES[dp] = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        except RuntimeError as exc:  # the runtime is running already, or the cluster cannot be set up
            _STRATEGY_ERRORS[dp] = f"{type(exc).__name__}: {exc}"
    cpus = tf.config.list_physical_devices("CPU")
    if dp.replicas > 1 and cpus:
        try:
            tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * dp.replicas)
        except RuntimeError:  # the runtime is running already
            pass


def data_parallel_strategy(device: str, dp: DataParallel) -> Any:
    """The ``tf.distribute`` strategy of ``dp`` on ``device``'s kind: ``MirroredStrategy`` over
    ``dp.replicas`` (logical) devices from ``device``'s index on; with several hosts the
    ``MultiWorkerMirroredStrategy`` made by :func:`prepare_data_parallel`, whose replicas are
    each worker's one CPU or all its GPUs (TensorFlow's rule). Raises :class:`TargetError` naming
    the fix when there are too few devices."""
    tf = _tf()
    kind, _, index = device.partition(":")
    first = int(index or 0)
    if dp.hosts > 1:
        strategy = _STRATEGIES.get(dp)
        if strategy is None:
            raise TargetError(
                f"tensorflow:{device}: DataParallel(hosts={dp.hosts}) needs its MultiWorkerMirroredStrategy created "
                "before TensorFlow runs anything: make the data-parallel hal.compile the first TensorFlow use of the "
                "process (hal train does)" + (f"; creating it failed with {_STRATEGY_ERRORS[dp]}"
                                              if dp in _STRATEGY_ERRORS else "")
            )
        if strategy.num_replicas_in_sync != dp.world:
            raise TargetError(
                f"tensorflow:{device}: MultiWorkerMirroredStrategy runs {strategy.num_replicas_in_sync} replicas "
                f"({strategy.num_replicas_in_sync // dp.hosts} per worker: one CPU, or every GPU), DataParallel asks "
                f"{dp.replicas} per host: use replicas={strategy.num_replicas_in_sync // dp.hosts}"
            )
        return strategy
    devices = tf.config.list_logical_devices(kind.upper())[first:first + dp.replicas]
    if len(devices) < dp.replicas:
        fix = ("configure the logical CPU devices before TensorFlow's runtime starts: make the data-parallel "
               "hal.compile the first TensorFlow use of the process (hal train and hal parity run it in a fresh "
               "worker process)") if kind == "cpu" else f"use at most {len(devices)} replicas"
        raise TargetError(
            f"tensorflow:{device}: DataParallel(replicas={dp.replicas}) needs {dp.replicas} {kind} devices from "
            f"index {first}, TensorFlow has {len(devices)}: {fix}"
        )
    # Reductions through merge_call, which lines the replicas up: with MirroredStrategy's default
    # collective all-reduce, synchronised BatchNorm's reductions (forward and gradient) were measured
    # to abort intermittently with a collective shape mismatch between replicas (TensorFlow 2.21, CPU).
    return tf.distribute.MirroredStrategy([d.name for d in devices],
                                          cross_device_ops=tf.distribute.ReductionToOneDevice())


def _synchronised_moments(x: Any, axes: list[int]) -> tuple[Any, Any, Any]:
    """Batch mean, biased and unbiased variance of ``x`` over ``axes`` and every replica
    (two-pass: the global mean, then the sum of squared deviations), via the replica
    context's all_reduce."""
    tf = _tf()
    ctx, add = tf.distribute.get_replica_context(), tf.distribute.ReduceOp.SUM
    total, count = ctx.all_reduce(add, [tf.reduce_sum(x, axes), tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)])
    mean = total / count
    sq = ctx.all_reduce(add, tf.reduce_sum(tf.square(x - mean), axes))
    return mean, sq / count, sq / (count - 1.0)


class TensorFlowDataParallelExecutable(TensorFlowExecutable):
    """Data-parallel training (``config.data_parallel``, rules in :mod:`hal.training`) with
    ``tf.distribute``: variables and optimizer slots are mirrored (created in the strategy's
    scope); inside each step ``strategy.run`` gives every replica its rows of the host batch,
    on which it runs the single-device forward/backward (its ``grad_accum`` micro-batches, its
    BatchNorm statistics, or all replicas' with ``sync_batchnorm``); the replica context's
    ``all_reduce`` averages loss and gradients and hands every replica replica 0's running
    statistics; the single-device update then assigns the same values to every mirror.
    ``predict`` and ``weights()`` use the primary (replica 0's) copies."""

    def __init__(self, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig,
                 xla: bool | None = None) -> None:
        if config.data_parallel.sync_batchnorm and config.grad_accum > 1:
            raise UnsupportedError(
                f"tensorflow:{device}: synchronised BatchNorm with grad_accum {config.grad_accum} is not supported: "
                "MirroredStrategy cannot all-reduce (merge_call) inside the micro-batch loop (a tf.while_loop); "
                "use grad_accum 1 or DataParallel(sync_batchnorm=False)"
            )
        prepare_data_parallel(config.data_parallel)
        self.strategy = data_parallel_strategy(device, config.data_parallel)
        super().__init__(spec, weights, device, config, xla)

    def _placement(self) -> Any:
        return self.strategy.scope()

    def _grads(self, x: Any, y: Any) -> tuple[Any, list[Any], list[tuple[Any, Any]]]:
        per_replica = self.strategy.run(self._replica_grads, args=(x, y))
        return _tf().nest.map_structure(lambda v: self.strategy.experimental_local_results(v)[0], per_replica)

    def _replica_grads(self, x: Any, y: Any) -> tuple[Any, list[Any], list[tuple[Any, Any]]]:
        """One replica's part of :meth:`_grads`: its rows, then the cross-replica reductions."""
        tf = _tf()
        dp, ctx = self.config.data_parallel, tf.distribute.get_replica_context()
        replica, b = ctx.replica_id_in_sync_group, tf.shape(x)[0] // dp.replicas
        start = (replica % dp.replicas) * b  # rows of this host's batch
        mode = self.graph.mode
        mode.moments = _synchronised_moments if dp.sync_batchnorm else None
        try:
            loss, grads, running = super()._grads(x[start:start + b], y[start:start + b])
        finally:
            mode.moments = None
        loss, *grads = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [loss, *grads])
        if not dp.sync_batchnorm:  # replica 0's running statistics everywhere (they are equal when synchronised)
            first = tf.equal(replica, 0)
            running = ctx.all_reduce(
                tf.distribute.ReduceOp.SUM, [[tf.where(first, s, tf.zeros_like(s)) for s in r] for r in running]
            )
        return loss, grads, [tuple(r) for r in running]


# ---------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------


def _version() -> str | None:
    for dist in DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _ipu_module() -> Any:
    """:mod:`hal.backends.ipu_tensorflow`, imported on demand (it imports no TensorFlow itself)."""
    from hal.backends import ipu_tensorflow

    return ipu_tensorflow


class TensorFlowBackend(Backend):
    """TensorFlow 2 with Keras functional models: CPU, GPU and (Graphcore's port) IPU."""

    name = "tensorflow"
    description = "TensorFlow / Keras (CPU, GPU; Graphcore IPU with the Poplar SDK)"

    @classmethod
    def availability(cls) -> Availability:
        """Installed? Works with any TensorFlow distribution (``tensorflow``,
        ``tensorflow-cpu``, Graphcore's SDK wheel...); imports nothing."""
        if importlib.util.find_spec("tensorflow") is None:
            return Availability(False, None, f"tensorflow is not installed: {INSTALL_HINT}")
        notes = "; ".join(f"tensorflow:{d} unavailable: {why}" for d, why in cls.device_notes().items())
        return Availability(True, _version(), notes)

    @classmethod
    def device_notes(cls) -> dict[str, str]:
        """Devices this backend knows but cannot use here, and why (for ``hal info``)."""
        ipu = _ipu_module()
        return {} if ipu.importable() else {"ipu": ipu.IPU_REASON}

    @classmethod
    def devices(cls) -> list[str]:
        tf = _tf()
        gpus = [f"gpu:{i}" for i in range(len(tf.config.list_physical_devices("GPU")))]
        return ["cpu", *gpus, *(["ipu"] if _ipu_module().importable() else [])]

    @classmethod
    def resolve_device(cls, device: str) -> str:
        kind, _, index = device.partition(":")
        if kind == "ipu":
            ipu = _ipu_module()
            if not ipu.importable():
                raise TargetError(f"tensorflow has no device {device!r} here: {ipu.IPU_REASON}")
            if index and not (index.isdigit() and int(index) >= 1):
                raise TargetError(f"tensorflow:ipu:N takes the number of IPUs N >= 1, got {device!r}")
            return device
        return super().resolve_device(device)

    @classmethod
    def capabilities(cls) -> Capabilities:
        ipu = _ipu_module().importable()
        precisions = PRECISIONS + (IPU_PRECISIONS if ipu else ())
        return Capabilities(precisions=precisions, pipelining=ipu, replication=ipu, data_parallel=True,
                            sync_batchnorm=True)

    @classmethod
    def unsupported(cls, spec: S.ModelSpec, config: TrainConfig | None = None) -> dict[str, str]:
        out = super().unsupported(spec, config)
        if "config" in out and config is not None:
            out["config"] = _precision_reason(config.precision, "tensorflow")
        return out

    @classmethod
    def prepare_data_parallel(cls, dp: DataParallel) -> None:
        """Before TensorFlow's runtime starts: :func:`prepare_data_parallel`."""
        prepare_data_parallel(dp)

    @classmethod
    def options(cls) -> dict[str, Option]:
        return {"xla": Option(None, "jit_compile every tf.function (None: the measured default per device and "
                                    "mode, off on CPUs, on on GPUs)", choices=(None, True, False))}

    @classmethod
    def compile(cls, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig,
                options: Mapping[str, Any], plan: "Plan | None") -> Executable:
        """CPUs and GPUs here; ``ipu[:N]`` devices (with an optional plan) in :mod:`hal.backends.ipu_tensorflow`."""
        if device.startswith("ipu"):
            if plan is None and config.data_parallel.enabled:
                raise UnsupportedError(
                    f"tensorflow:{device} replicates through an IPU plan: pass "
                    "plan=hal.ipu.plan(spec, framework='tensorflow', replicas=N, ...) instead of DataParallel"
                )
            return _ipu_module().IPUExecutable(spec, weights, device, config, plan)
        if plan is not None:
            raise TargetError(f"an IPU plan needs an IPU target (tensorflow:ipu[:N]), got tensorflow:{device}")
        if config.precision not in PRECISIONS:
            raise TargetError(_precision_reason(config.precision, f"tensorflow:{device}"))
        exe = TensorFlowDataParallelExecutable if config.data_parallel.enabled else TensorFlowExecutable
        return exe(spec, weights, device, config, xla=options["xla"])
