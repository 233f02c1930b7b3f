"""TensorFlow backend: ``tensorflow:cpu``, ``tensorflow:gpu[:N]`` and ``tensorflow:ipu[:N]``.

The spec becomes a Keras *functional* model (the form Graphcore's IPU Keras
pipelines through stage assignment) of small layers, one per op, read as a table
from op to TensorFlow call (:func:`_layer_classes`). The layers use
only API present both in current TensorFlow 2.x with Keras 3 and in Graphcore's
TensorFlow 2.6 / Keras 2 port (``keras.layers.Layer``, ``add_weight``,
``keras.Input``, ``keras.Model(inputs, outputs)`` and plain ``tf.nn`` ops).

Canonical rules, not TensorFlow's defaults:

* **Layout.** NHWC (channels-last) inside; the API boundary stays channels-first:
  the model's first layer transposes the input once, and a spatial output is
  transposed back once. Conv weights are HWIO inside (canonical OIHW transposed
  once at load, back at ``weights()``/gradients), Dense weights ``(in, out)``.
* **Padding** is the spec's explicit ``(before, after)`` per side. TF's ``SAME``
  is used only where it is provably the same numbers (its split equals the
  spec's; for pools also: max pool, or average pool with
  ``count_include_pad=False``); otherwise ``tf.pad`` (``-inf`` for max pooling,
  so padding never wins) and ``VALID``. Not ``tf.nn.conv2d``'s explicit
  paddings: their backward pass on the CPU measured 4x slower on ResNet-18 at
  64x64 (0.50 s vs 0.13 s per training step), 10 % at ResNet-50 224x224. Average
  pooling without counting padding divides by a per-position count map
  computed once in numpy.
* **BatchNorm** is a custom layer: PyTorch momentum convention (``m`` weighs the
  new statistic), the spec's ``eps`` (1e-5 by default, not Keras's 1e-3),
  normalisation with the biased batch variance and running-variance update with
  the unbiased one. 4-d/5-d float32 uses the fused kernel
  (``tf.raw_ops.FusedBatchNormV3``, whose batch-variance output is the unbiased
  one and which, unlike ``tf.compat.v1.nn.fused_batch_norm``, does not raise eps
  to 1.001e-5); other ranks/dtypes use two-pass moments.
* **Flatten** is channels-first row-major: the layer transposes NHWC -> NCHW and
  reshapes (one small transpose where the feature map is smallest). The
  alternative, permuting the next Dense weight once at load, only works when a
  Dense reads the Flatten directly (or through elementwise ops); it would tie the
  weight layout to the graph's topology and leak into ``weights()``/gradients.
* **Optimizers** are ``torch.optim`` on raw ``tf.Variable`` s, not Keras's (Keras
  SGD keeps ``v = mu*v - lr*g``): SGD ``b = mu*b + g`` (zero-initialised, so the
  first step gives ``b = g`` exactly), Nesterov ``g + mu*b``, coupled weight decay;
  Adam with coupled L2, AdamW decoupled. Scalars that torch computes in Python
  (lr from the schedule, ``lr / (1 - b1^t)``, ``sqrt(1 - b2^t)``) are computed on
  the host in float64 and fed per step.
* **Gradient accumulation** runs G micro-batches inside the compiled step
  (``tf.while_loop``), BatchNorm statistics per micro-batch, running statistics
  updated after each micro-batch in order, gradients averaged.
* **Steps per call.** ``run_steps`` runs S steps in one ``tf.function`` (a loop
  over the stacked batches); ``train_step`` is the same step body without the
  outer loop.

**XLA.** Each compiled function is a ``tf.function``; ``jit_compile`` is chosen
per device and mode (``XLA``) from measurements: ResNet50, batch 16, fp32,
TensorFlow 2.21 on a shared 2-core x86 CPU (``bench/tf_vs_native.py --xla-sweep``,
hal and a native Keras model interleaved, medians of 7): XLA off / on took
1.82 s / 2.05 s per inference batch and 4.27 s / 8.63 s per training step, so
the CPU runs *without* XLA (Grappler's oneDNN fusions win; Keras 3's own
``jit_compile="auto"`` also turns XLA off on CPU-only machines). GPUs (not
measured here) use XLA, as Keras does. ``HAL_TF_XLA=0/1`` overrides the choice.

**IPU.** ``tensorflow:ipu[:N]`` needs Graphcore's TensorFlow (``tensorflow.python.ipu``,
shipped with the Poplar SDK, not on PyPI). The translation of hal's IPU plan into
IPU TensorFlow's Keras API (IPUConfig, IPUStrategy, pipeline stage assignment,
pipelining / gradient-accumulation options, ``steps_per_execution``) lives in
:class:`IPUExecutable`; see its docstring for the mapping and the documentation
it follows.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from hal import spec as S
from hal.backend import Availability, Backend, Capabilities, Executable, Target, Weights
from hal.errors import BackendUnavailable, ConfigError, HalError, InputError, TargetError, UnsupportedError
from hal.training import SGD, AdamW, Constant, Cosine, StepDecay, TrainConfig
from hal.weights import check_weights

# TensorFlow is imported lazily (``_tf()``): listing backends, ``availability()`` and
# ``device_notes()`` never import it.

INSTALL_HINT = "pip install 'hal-cnn[tensorflow]'"
IPU_REASON = (
    "IPU TensorFlow ships with Graphcore's Poplar SDK (it is not on PyPI): install the SDK's "
    "TensorFlow 2 wheel and enable the SDK (source enable.sh); set TF_POPLAR_FLAGS=--use_ipu_model "
    "to run on the IPU Model simulator without hardware"
)
DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos", "intel-tensorflow")
DTYPES = {"fp32": "float32", "fp64": "float64"}
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


def _tf() -> Any:
    """Import TensorFlow once, quieting its start-up logging (only here, never at hal import)."""
    if _TF:
        return _TF[0]
    if "tensorflow" in sys.modules:
        import tensorflow as tf
    else:
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


def _ipu_importable() -> bool:
    """Is Graphcore's ``tensorflow.python.ipu`` here? Checked on disk, without importing TensorFlow."""
    if "tensorflow.python.ipu" in sys.modules:
        return True
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "python" / "ipu" / "__init__.py").is_file() for p in spec.submodule_search_locations)


def _ipu() -> Any:
    """``tensorflow.python.ipu`` (Graphcore's SDK), or a hal error saying how to get it."""
    if not _ipu_importable():
        raise BackendUnavailable(f"tensorflow:ipu is not available: {IPU_REASON}")
    _tf()
    try:
        from tensorflow.python import ipu  # Graphcore's docs: import it directly, not via tf.*
    except Exception as exc:
        raise BackendUnavailable(
            f"tensorflow:ipu: importing tensorflow.python.ipu failed: {exc!r}. {IPU_REASON}"
        ) from exc
    return ipu


# ---------------------------------------------------------------------------
# the layers: one per op, each a few lines of tf.nn
# ---------------------------------------------------------------------------


def _explicit(padding: S.Padding) -> list[list[int]]:
    """NHWC explicit paddings for ``tf.nn.conv2d``/``tf.pad``: batch and channels unpadded."""
    return [[0, 0], *[[a, b] for a, b in padding], [0, 0]]


def _tf_same(sizes: S.Shape, kernel: S.Shape, stride: S.Shape, dilation: S.Shape | None = None) -> S.Padding:
    """TensorFlow's SAME padding as explicit numbers (odd pixel after)."""
    dilation = dilation or (1,) * len(kernel)
    return tuple(S.same_padding(n, k, s, d) for n, k, s, d in zip(sizes, kernel, stride, dilation))


class _Mode:
    """Trace-time switch read by BatchNorm layers: update running statistics in training mode?

    It is set inside each traced Python function (never between calls), so any
    retrace of that function sees the same value.
    """

    def __init__(self) -> None:
        self.update_stats = False

    @contextlib.contextmanager
    def updating(self, flag: bool) -> Iterator[None]:
        old, self.update_stats = self.update_stats, flag
        try:
            yield
        finally:
            self.update_stats = old


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
            zero = not any(a or b for a, b in op.padding)
            same = not self.subsample and op.padding == _tf_same(spatial, op.kernel, op.stride, op.dilation)
            self.mode = "SAME" if same and not zero else "VALID"
            self.pad = None if zero or same else _explicit(op.padding)

        def call(self, x: Any) -> Any:
            op = self.op
            if self.pad is not None:
                x = tf.pad(x, self.pad)
            if self.nd == 2:
                y = tf.nn.conv2d(x, self.kernel, self.stride, self.mode, dilations=op.dilation)
            else:
                y = tf.nn.convolution(x, self.kernel, self.stride, self.mode, dilations=op.dilation)
                if self.subsample:
                    y = y[(slice(None), *(slice(None, None, s) for s in op.stride))]
            return tf.nn.bias_add(y, self.bias) if self.bias is not None else y

    class BatchNorm(Layer):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            c = self.in_shapes[0][0]
            self.gamma, self.beta = self.weight("gamma", (c,)), self.weight("beta", (c,))
            self.running_mean = self.weight("running_mean", (c,), trainable=False)
            self.running_var = self.weight("running_var", (c,), trainable=False)
            rank = len(self.in_shapes[0]) + 1
            self.axes = [0, *range(1, rank - 1)]
            self.fused = rank in (4, 5) and self.dtype == "float32"

        def call(self, x: Any, training: Any = None) -> Any:
            op = self.op
            if not training:
                if self.fused:
                    return tf.raw_ops.FusedBatchNormV3(
                        x=x, scale=self.gamma, offset=self.beta, mean=self.running_mean, variance=self.running_var,
                        epsilon=op.eps, data_format="NHWC" if x.shape.rank == 4 else "NDHWC", is_training=False,
                    )[0]
                return self._normalise(x, self.running_mean, self.running_var)
            if self.fused:
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
            if self.mode.update_stats:
                m = tf.constant(op.momentum, x.dtype)
                self.running_mean.assign(m * tf.stop_gradient(mean) + (1.0 - m) * self.running_mean)
                self.running_var.assign(m * tf.stop_gradient(unbiased) + (1.0 - m) * self.running_var)
            return y

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
            return x * c(0.5) * (c(1.0) + tf.math.erf(x * c(math.sqrt(0.5))))

    class MaxPool(Layer):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            op = self.op
            self.same = op.padding == _tf_same(self.in_shapes[0][1:], op.kernel, op.stride)  # TF SAME ignores padding
            self.zero = not any(a or b for a, b in op.padding)

        def call(self, x: Any) -> Any:
            op = self.op
            if self.same or self.zero:
                return tf.nn.max_pool(x, op.kernel, op.stride, "SAME" if self.same and not self.zero else "VALID")
            x = tf.pad(x, _explicit(op.padding), constant_values=float("-inf"))
            return tf.nn.max_pool(x, op.kernel, op.stride, "VALID")

    class AvgPool(Layer):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            op, spatial = self.op, self.in_shapes[0][1:]
            self.zero = not any(a or b for a, b in op.padding)
            # TF SAME average pooling divides by the count of real pixels: count_include_pad=False
            self.same = not op.count_include_pad and op.padding == _tf_same(spatial, op.kernel, op.stride)
            self.scale = None
            if not (self.zero or self.same or op.count_include_pad):
                ones = np.pad(np.ones(spatial), op.padding)
                win = np.lib.stride_tricks.sliding_window_view(ones, op.kernel)
                win = win[tuple(slice(None, None, s) for s in op.stride)]
                count = win.sum(axis=tuple(range(-len(op.kernel), 0)))
                self.scale = (math.prod(op.kernel) / count)[..., None].astype(self.dtype)  # (*out, 1)

        def call(self, x: Any) -> Any:
            op = self.op
            if self.zero or self.same:
                return tf.nn.avg_pool(x, op.kernel, op.stride, "SAME" if self.same and not self.zero else "VALID")
            y = tf.nn.avg_pool(tf.pad(x, _explicit(op.padding)), op.kernel, op.stride, "VALID")
            return y if self.scale is None else y * tf.constant(self.scale)

    class GlobalAvgPool(Layer):
        def call(self, x: Any) -> Any:
            return tf.reduce_mean(x, list(range(1, x.shape.rank - 1)))

    class Add(Layer):
        def call(self, xs: list[Any]) -> Any:
            out = xs[0] + xs[1]
            for x in xs[2:]:
                out = out + x
            return out

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

        def call(self, x: Any) -> Any:
            y = tf.matmul(x, self.kernel)
            return tf.nn.bias_add(y, self.bias) if self.bias is not None else y

    class Dropout(Layer):
        def call(self, x: Any, training: Any = None) -> Any:
            if training and self.op.rate > 0:
                return tf.nn.dropout(x, rate=self.op.rate)
            return x

    class Transpose(keras.layers.Layer):
        """The once-per-call layout change at the API boundary."""

        def __init__(self, perm: list[int], name: str, dtype: str) -> None:
            super().__init__(name=name, dtype=dtype)
            self.perm = perm

        def call(self, x: Any) -> Any:
            return tf.transpose(x, self.perm)

    _LAYERS.update({
        S.Conv: Conv, S.BatchNorm: BatchNorm, S.Activation: Activation, S.MaxPool: MaxPool, S.AvgPool: AvgPool,
        S.GlobalAvgPool: GlobalAvgPool, S.Add: Add, S.Concat: Concat, S.Flatten: Flatten, S.Dense: Dense,
        S.Dropout: Dropout, "transpose": Transpose,
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


def build_keras_model(spec: S.ModelSpec, dtype: str = "float32", batch_size: int | None = None) -> KerasGraph:
    """The spec as a Keras functional model: channels-first input of per-sample
    shape ``spec.input_shape`` (``batch_size`` fixes the batch dim, as the IPU
    needs), one layer per node (named after it), NHWC in between."""
    keras = _keras()
    classes = _layer_classes()
    mode = _Mode()
    taken: set[str] = set()
    names = {n.name: _layer_name(n.name, taken) for n in spec.nodes}
    rank = len(spec.input_shape) + 1
    inp = keras.Input(shape=spec.input_shape, batch_size=batch_size, dtype=dtype, name=names[spec.input.name])
    to_last = classes["transpose"]([0, *range(2, rank), 1], _layer_name(CHANNELS_LAST, taken), dtype)
    values = {spec.input.name: to_last(inp)}
    layers: dict[str, Any] = {}
    for node in spec.nodes[1:]:
        layer = classes[type(node.op)](node.op, spec.in_shapes(node), names[node.name], dtype, mode)
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
    if isinstance(op, S.Dense):
        out = [("weight", layer.kernel, np.transpose, np.transpose)]
        return out + ([("bias", layer.bias, *same)] if op.bias else [])
    if isinstance(op, S.BatchNorm):
        return [("weight", layer.gamma, *same), ("bias", layer.beta, *same),
                ("running_mean", layer.running_mean, *same), ("running_var", layer.running_var, *same)]
    return []


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


def host_scalars(config: TrainConfig, first_step: int, steps: int) -> np.ndarray:
    """Per optimizer step, the float64 scalars torch computes in Python: SGD ``[lr]``;
    Adam/AdamW ``[lr, lr / (1 - b1^t), sqrt(1 - b2^t), 1 - lr * wd]`` with ``t`` 1-based."""
    o = config.optimizer
    rows = []
    for step in range(first_step, first_step + steps):
        lr = config.lr(step)
        if isinstance(o, SGD):
            rows.append([lr])
        else:
            t = step + 1
            rows.append([lr, lr / (1.0 - o.betas[0] ** t), math.sqrt(1.0 - o.betas[1] ** t), 1.0 - lr * o.weight_decay])
    return np.asarray(rows, dtype=np.float64).reshape(steps, -1)


def torch_update(o: Any, p: Any, g: Any, slots: Mapping[str, Any], h: list[Any]) -> list[Any]:
    """One ``torch.optim`` update of variable ``p`` with gradient ``g``, operation for
    operation as torch's single-tensor CPU path; ``h`` holds the :func:`host_scalars`
    of this step as tensors of ``p``'s dtype. Returns the assign ops (Keras 2
    optimizers must return them)."""
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
        return ops + [p.assign(p_val - h[0] * g)]
    _, step_size, bc2_sqrt, decay = h
    m, v = slots["exp_avg"], slots["exp_avg_sq"]
    if isinstance(o, AdamW):
        if o.weight_decay:
            p_val = p_val * decay  # decoupled: p *= 1 - lr * wd
    elif o.weight_decay:
        g = g + c(o.weight_decay) * p_val  # coupled L2
    m_new = m + c(1.0 - o.betas[0]) * (g - m)  # torch's lerp (weight < 0.5 branch)
    v_new = v * c(o.betas[1]) + c(1.0 - o.betas[1]) * g * g
    denom = tf.sqrt(v_new) / bc2_sqrt + c(o.eps)
    return [m.assign(m_new), v.assign(v_new), p.assign(p_val - step_size * (m_new / denom))]


def _slot_names(config: TrainConfig) -> tuple[str, ...]:
    o = config.optimizer
    if isinstance(o, SGD):
        return ("momentum",) if o.momentum else ()
    return ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------------
# the executable (CPU and GPU)
# ---------------------------------------------------------------------------


def _device_kind(device: str) -> str:
    return device.split(":")[0]


def _xla(device: str, mode: str) -> bool:
    env = os.environ.get("HAL_TF_XLA")
    if env in ("0", "1"):
        return env == "1"
    return XLA.get((_device_kind(device), mode), True)


class TensorFlowExecutable(Executable):
    """A spec compiled for TensorFlow on a CPU or GPU: the Keras functional model,
    torch.optim optimizer state on tf.Variables, and ``tf.function`` s traced on
    first use (one per mode and input shape)."""

    def __init__(self, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig,
                 target: Target | None = None) -> None:
        super().__init__(spec, target or Target("tensorflow", device), config)
        tf = _tf()
        self.device = device
        self.tf_device = "/CPU:0" if device == "cpu" else f"/{device.upper()}"
        self.dtype = DTYPES[config.precision]
        self.np_dtype = np.dtype(self.dtype)
        with self._placement():
            self.graph = build_keras_model(spec, self.dtype)
            self.train_names = spec.trainable()
            self.train_vars = [self.graph.variables[k][0] for k in self.train_names]
            self.slots = [
                {s: tf.Variable(tf.zeros_like(v), trainable=False, name=f"{s}") for s in _slot_names(config)}
                for v in self.train_vars
            ]
        self.per_sample_loss = _loss(config)
        self._fns: dict[str, Any] = {}
        self._bn_counts = [
            (n.name, math.prod(spec.in_shapes(n)[0][1:])) for n in spec.nodes if isinstance(n.op, S.BatchNorm)
        ]
        self.load_weights(weights)

    # -- plumbing ---------------------------------------------------------------------

    def _placement(self) -> Any:
        return _tf().device(self.tf_device)

    def _fn(self, name: str, python_fn: Callable[..., Any], mode: str) -> Any:
        if name not in self._fns:
            self._fns[name] = _tf().function(python_fn, jit_compile=_xla(self.device, mode))
        return self._fns[name]

    def _call(self, name: str, python_fn: Callable[..., Any], mode: str, *args: Any) -> Any:
        tf = _tf()
        fn = self._fn(name, python_fn, mode)
        try:
            with self._placement():
                return fn(*args)
        except tf.errors.ResourceExhaustedError as exc:
            n = len(args[0]) if args and hasattr(args[0], "__len__") else "?"
            raise HalError(f"{self.target}: out of memory running {name} on a batch of {n}: "
                           f"use a smaller batch or grad_accum ({exc.message.splitlines()[0][:200]})") from None

    def _x(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=self.np_dtype)

    def _y(self, y: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(y, dtype=np.int32 if self.config.loss == "cross_entropy" else self.np_dtype)

    def _check_bn_batch(self, micro_batch: int) -> None:
        """Training-mode BatchNorm needs more than one value per channel (torch raises too)."""
        for name, spatial in self._bn_counts:
            if micro_batch * spatial < 2:
                raise InputError(
                    f"{self.target}: training-mode BatchNorm at node {name!r} needs more than one value per "
                    f"channel, got a (micro-)batch of {micro_batch} with {spatial} spatial position(s)"
                )

    # -- traced bodies (Python; run inside tf.function) ------------------------------

    def _forward(self, x: Any, training: bool) -> Any:
        with self.graph.mode.updating(False):
            return self.graph.model(x, training=training)

    def _grads(self, x: Any, y: Any, update: bool) -> tuple[Any, list[Any]]:
        """Mean loss and mean gradients over G micro-batches, BatchNorm statistics per
        micro-batch (running statistics updated after each one when ``update``)."""
        tf = _tf()
        g = self.config.grad_accum

        def micro(xm: Any, ym: Any) -> tuple[Any, list[Any]]:
            with self.graph.mode.updating(update):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(self.per_sample_loss(ym, self.graph.model(xm, training=True)))
                    scaled = loss / g if g > 1 else loss  # as torch: backward of loss / G per micro-batch
                grads = tape.gradient(scaled, self.train_vars)
            return scaled, [tf.zeros_like(v) if d is None else d for v, d in zip(self.train_vars, grads)]

        if g == 1:
            return micro(x, y)
        xs = tf.reshape(x, [g, -1, *x.shape[1:]])
        ys = tf.reshape(y, [g, -1, *y.shape[1:]])

        def body(i: Any, loss: Any, acc: list[Any]) -> tuple[Any, Any, list[Any]]:
            l_i, g_i = micro(xs[i], ys[i])
            return i + 1, loss + l_i, [a + b for a, b in zip(acc, g_i)]

        zero = (tf.constant(0), tf.zeros([], self.dtype), [tf.zeros_like(v) for v in self.train_vars])
        _, loss, grads = tf.while_loop(lambda i, *_: i < g, body, zero, parallel_iterations=1)
        return loss, grads

    def _apply(self, grads: list[Any], hyper: Any) -> None:
        tf = _tf()
        h = [tf.cast(hyper[i], self.dtype) for i in range(hyper.shape[0])]
        for v, d, slots in zip(self.train_vars, grads, self.slots):
            torch_update(self.config.optimizer, v, d, slots, h)

    def _train_one(self, x: Any, y: Any, hyper: Any) -> Any:
        loss, grads = self._grads(x, y, update=True)
        self._apply(grads, hyper)
        return loss

    def _train_many(self, xs: Any, ys: Any, hypers: Any) -> Any:
        tf = _tf()
        steps = tf.shape(xs)[0]
        losses = tf.TensorArray(self.dtype, size=steps)
        for s in tf.range(steps):
            losses = losses.write(s, self._train_one(xs[s], ys[s], hypers[s]))
        return losses.stack()

    # -- the surface ------------------------------------------------------------------

    def predict(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        x = self.check_x(x)
        if training:
            self._check_bn_batch(len(x))
            out = self._call("forward_train", lambda a: self._forward(a, True), "train", self._x(x))
        else:
            out = self._call("infer", lambda a: self._forward(a, False), "infer", self._x(x))
        return out.numpy()

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        x, y = self.check_xy(x, y)
        self._check_bn_batch(len(x) // self.config.grad_accum)
        loss, grads = self._call("grads", lambda a, b: self._grads(a, b, update=False), "train", self._x(x), self._y(y))
        return float(loss), {k: self.graph.variables[k][2](d.numpy()) for k, d in zip(self.train_names, grads)}

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = self.check_xy(x, y)
        self._check_bn_batch(len(x) // self.config.grad_accum)
        hyper = host_scalars(self.config, self.step, 1)[0]
        loss = self._call("train_step", self._train_one, "train", self._x(x), self._y(y), hyper)
        self.step += 1
        return float(loss)

    def run_steps(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        self.check_steps(xs, ys)
        for x, y in zip(xs[1:], ys[1:]):  # labels of every step are checked, not only the first
            self.check_xy(x, y)
        self._check_bn_batch(xs.shape[1] // self.config.grad_accum)
        hypers = host_scalars(self.config, self.step, len(xs))
        losses = self._call("run_steps", self._train_many, "train", self._x(xs), self._y(ys), hypers)
        self.step += len(xs)
        return losses.numpy().astype(np.float64)

    def weights(self) -> Weights:
        return {k: from_tf(v.numpy()).copy() for k, (v, _, from_tf) in self.graph.variables.items()}

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        w = check_weights(self.spec, weights)
        with self._placement():
            for k, (v, to_tf, _) in self.graph.variables.items():
                v.assign(to_tf(np.asarray(w[k], dtype=self.np_dtype)))


# ---------------------------------------------------------------------------
# Graphcore IPU: hal's IPU plan -> IPU TensorFlow's Keras API
# ---------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def ipu_plan(spec: S.ModelSpec, config: TrainConfig, num_ipus: int | None) -> Any:
    """hal's IPU plan for ``tensorflow:ipu[:N]``: an N-stage pipeline (default 1),
    one replica, balanced by :func:`hal.ipu.plan`; other layouts (replicas, device
    iterations, recomputation) are passed as an explicit plan to :func:`compile_ipu`."""
    from hal import ipu as planner

    try:
        return planner.plan(spec, ipus=num_ipus or 1, grad_accum=config.grad_accum,
                            optimizer=config.optimizer, precision="fp32")
    except HalError as exc:
        raise ConfigError(f"tensorflow:ipu:{num_ipus or 1}: {exc}") from None


def _stage_assignment(model: Any, graph: KerasGraph, stage_of: Mapping[str, int], stages: int) -> list[Any]:
    """Set ``pipeline_stage`` on each of ``model.get_pipeline_stage_assignment()``
    (one per layer invocation, input layers excluded, in post order): a node's
    layer goes to the node's stage; the boundary transposes go to the first and
    last stages."""
    by_layer = {id(layer): stage_of[name] for name, layer in graph.layers.items()}
    assignments = model.get_pipeline_stage_assignment()
    for a in assignments:
        name = a.layer.name
        if id(a.layer) in by_layer:
            a.pipeline_stage = by_layer[id(a.layer)]
        elif name.startswith(CHANNELS_LAST):
            a.pipeline_stage = 0
        elif name.startswith(CHANNELS_FIRST):
            a.pipeline_stage = stages - 1
        else:
            raise UnsupportedError(f"tensorflow:ipu: layer {name!r} of the Keras model belongs to no node of the spec")
    return assignments


_KERAS_OPT: list[type] = []


def _keras_torch_optimizer() -> type:
    """A Keras optimizer running :func:`torch_update`, for ``model.fit`` on the IPU.

    IPU TensorFlow's ``fit`` wraps ``model.optimizer`` (gradient accumulation,
    replication) and calls its ``apply_gradients``, so the canonical update must
    live in a Keras optimizer: Keras 2's ``OptimizerV2`` hooks (``_create_slots``,
    ``_resource_apply_dense``; Graphcore's port) and Keras 3's (``build``,
    ``update_step``) both call the same :func:`torch_update`; ``minimize`` is not
    overridden (Graphcore's Keras rejects optimizers that override it). The
    learning rate is a ``LearningRateSchedule`` of the optimizer step, the torch
    scalars are computed in the graph from it. ``grad_scale`` turns the
    cross-replica *sum* of gradients that IPU TensorFlow performs into hal's mean.
    """
    if _KERAS_OPT:
        return _KERAS_OPT[0]
    tf, keras = _tf(), _keras()
    keras3 = int(str(getattr(keras, "__version__", "3")).split(".")[0]) >= 3

    class Schedule(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, config: TrainConfig) -> None:
            self.config = config

        def __call__(self, step: Any) -> Any:
            return _lr_graph(self.config, tf.cast(step, tf.float32))

        def get_config(self) -> dict[str, Any]:
            return {"config": repr(self.config)}

    class TorchOptimizer(keras.optimizers.Optimizer):
        def __init__(self, config: TrainConfig, grad_scale: float = 1.0, name: str = "hal_torch_optimizer") -> None:
            if keras3:
                super().__init__(learning_rate=Schedule(config), name=name)
            else:
                super().__init__(name=name)
                self._set_hyper("learning_rate", Schedule(config))
            self.hal_config, self.grad_scale, self.slot_names = config, grad_scale, _slot_names(config)

        def _scalars(self, lr: Any, dtype: Any) -> list[Any]:
            o = self.hal_config.optimizer
            lr = tf.cast(lr, dtype)
            if isinstance(o, SGD):
                return [lr]
            t = tf.cast(self.iterations + 1, dtype)
            b1, b2 = tf.constant(o.betas[0], dtype), tf.constant(o.betas[1], dtype)
            return [lr, lr / (1.0 - tf.pow(b1, t)), tf.sqrt(1.0 - tf.pow(b2, t)), 1.0 - lr * o.weight_decay]

        def _update(self, grad: Any, var: Any, slots: Mapping[str, Any], lr: Any) -> list[Any]:
            g = grad * tf.constant(self.grad_scale, grad.dtype) if self.grad_scale != 1.0 else grad
            return torch_update(self.hal_config.optimizer, var, g, slots, self._scalars(lr, grad.dtype))

        # Keras 3
        def build(self, var_list: list[Any]) -> None:
            if getattr(self, "built", False):
                return
            super().build(var_list)
            self.hal_slots = [
                {s: self.add_variable_from_reference(v, name=s) for s in self.slot_names} for v in var_list
            ]

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            self._update(gradient, variable, self.hal_slots[self._get_variable_index(variable)], learning_rate)

        # Keras 2 (OptimizerV2, Graphcore's TensorFlow 2.6)
        def _create_slots(self, var_list: list[Any]) -> None:
            for v in var_list:
                for s in self.slot_names:
                    self.add_slot(v, s)

        def _resource_apply_dense(self, grad: Any, var: Any, apply_state: Any = None) -> Any:
            slots = {s: self.get_slot(var, s) for s in self.slot_names}
            return tf.group(*self._update(grad, var, slots, self._decayed_lr(var.dtype.base_dtype)))

        def _resource_apply_sparse(self, grad: Any, var: Any, indices: Any, apply_state: Any = None) -> Any:
            raise UnsupportedError("hal's optimizers have no sparse update")

        def get_config(self) -> dict[str, Any]:
            return {"name": self.name, "hal_config": repr(self.hal_config), "grad_scale": self.grad_scale}

    _KERAS_OPT.append(TorchOptimizer)
    return TorchOptimizer


def _lr_graph(config: TrainConfig, step: Any) -> Any:
    """``config.lr(step)`` as TensorFlow ops (float32), for schedules evaluated on the device."""
    tf = _tf()
    lr, sched = config.optimizer.lr, config.schedule
    if isinstance(sched, Constant):
        return tf.constant(lr, tf.float32) + 0.0 * step
    if isinstance(sched, StepDecay):
        return lr * tf.pow(tf.constant(sched.gamma, tf.float32), tf.floor(step / sched.step_size))
    if isinstance(sched, Cosine):
        warm = sched.warmup_start + (1.0 - sched.warmup_start) * step / max(sched.warmup_steps, 1)
        span = float(sched.total_steps - sched.warmup_steps)
        t = tf.minimum(step - sched.warmup_steps, span)
        cos = sched.min_factor + (1.0 - sched.min_factor) * 0.5 * (1.0 + tf.cos(math.pi * t / span))
        return lr * tf.where(step < sched.warmup_steps, warm, cos)
    raise UnsupportedError(f"tensorflow:ipu has no device-side form of schedule {sched!r}")


class IPUExecutable(TensorFlowExecutable):
    """A spec compiled for Graphcore IPUs through IPU TensorFlow's Keras API.

    hal's plan (:mod:`hal.ipu`: pipeline stages, G, device iterations D, replicas
    R) maps to the SDK as follows (Graphcore, *Targeting the IPU from TensorFlow 2*,
    https://docs.graphcore.ai/projects/tensorflow-user-guide/en/latest/ : "Keras
    with IPUs" keras/keras.html, "Keras Python API" keras/api.html, "Targeting the
    Poplar XLA device" device_selection.html; the IPU Keras sources,
    github.com/graphcore/keras ``keras/ipu/extensions/functional_extensions.py``):

    ==========================  ==================================================
    hal                         IPU TensorFlow
    ==========================  ==================================================
    N IPUs                      ``cfg = ipu.config.IPUConfig()``;
                                ``cfg.auto_select_ipus = N``;
                                ``cfg.configure_ipu_system()``. N = R x S rounded
                                up to a power of two per replica (IPU Keras
                                replicates ``num_ipus // 2**ceil(log2(S))`` times)
    placement                   model built, compiled and run inside
                                ``ipu.ipu_strategy.IPUStrategy().scope()``
    stage of each node          ``model.get_pipeline_stage_assignment()``, set
                                ``assignment.pipeline_stage`` per layer call,
                                ``model.set_pipeline_stage_assignment(...)``
    G, S > 1                    ``model.set_pipelining_options(
                                gradient_accumulation_steps_per_replica=G,
                                gradient_accumulation_reduction_method="mean")``
    G > 1, one stage            ``model.set_gradient_accumulation_options(...)``,
                                same keywords
    D optimizer steps per call  ``model.compile(..., steps_per_execution=D x G)``:
                                an IPU Keras "step" is one micro-batch per
                                replica, the weights update every G steps
    micro-batch, static shapes  ``tf.data`` batches of ``micro`` with
                                ``drop_remainder=True``; data in hal's
                                ``[D, G, R, micro]`` host layout
    loss per step               ``model.set_asynchronous_callbacks(True)`` and a
                                callback reading each step's running-mean loss
    R > 1 metrics               ``model.set_replication_options(
                                replicated_metric_reduction_method="MEAN")``
                                (SDK >= 3.2; earlier SDKs report replica 0)
    ==========================  ==================================================

    ``fit`` applies ``model.optimizer`` (a Keras optimizer running the canonical
    torch update, :func:`_keras_torch_optimizer`) after IPU TensorFlow's own
    gradient accumulation and cross-replica *sum* (``IPUStrategy`` reports one
    replica in sync and reduces with ``cross_replica_sum``: graphcore/tensorflow
    ``tensorflow/python/ipu/ipu_strategy.py``), which the optimizer divides by R. ``predict(x)`` is ``model.predict``
    (pipelined where the plan is); ``predict(x, training=True)`` and
    ``loss_and_grads`` run hal's traced bodies through ``strategy.run`` on a
    ``tf.function`` (not pipelined: IPU Keras ignores stage assignments outside
    ``fit``/``evaluate``/``predict``). The IPU computes in float32 (no float64).
    """

    def __init__(self, spec: S.ModelSpec, weights: Weights, config: TrainConfig, plan: Any,
                 num_ipus: int | None = None) -> None:
        ipu = _ipu()
        check_ipu_plan(spec, plan, config)
        self.plan = plan
        self.stages = len(plan.stages)
        self.replicas = plan.batch.replicas
        self.iterations = plan.batch.device_iterations
        self.num_ipus = num_ipus or _pow2(self.stages) * self.replicas
        if self.num_ipus != _pow2(self.stages) * self.replicas:
            raise ConfigError(
                f"tensorflow:ipu:{self.num_ipus}: the plan needs {self.stages} stage(s) x {self.replicas} replica(s) = "
                f"{_pow2(self.stages) * self.replicas} IPUs (IPU Keras gives each replica a power of two of IPUs)"
            )
        Executable.__init__(self, spec, Target("tensorflow", f"ipu:{self.num_ipus}"), config)
        self.device, self.tf_device, self.dtype, self.np_dtype = "ipu", "/device:IPU:0", "float32", np.dtype("float32")
        self.ipu = ipu

        cfg = ipu.config.IPUConfig()
        cfg.auto_select_ipus = self.num_ipus
        cfg.configure_ipu_system()
        self.strategy = ipu.ipu_strategy.IPUStrategy()
        g = config.grad_accum
        with self.strategy.scope():
            self.graph = build_keras_model(spec, self.dtype)
            self.graph.mode.update_stats = True  # fit() trains; traced forward-only bodies switch it off
            model = self.graph.model
            missing = [m for m in ("get_pipeline_stage_assignment", "set_pipelining_options",
                                   "set_gradient_accumulation_options") if not hasattr(model, m)]
            if missing:
                raise BackendUnavailable(f"tensorflow:ipu: this Keras model has no IPU extensions ({missing}): "
                                         f"{IPU_REASON}")
            stage_of = {n: s.index for s in plan.stages for n in s.nodes}
            if self.stages > 1:
                model.set_pipeline_stage_assignment(_stage_assignment(model, self.graph, stage_of, self.stages))
                model.set_pipelining_options(gradient_accumulation_steps_per_replica=g,
                                             gradient_accumulation_reduction_method="mean")
            elif g > 1:
                model.set_gradient_accumulation_options(gradient_accumulation_steps_per_replica=g,
                                                        gradient_accumulation_reduction_method="mean")
            if self.replicas > 1 and hasattr(model, "set_replication_options"):
                model.set_replication_options(replicated_metric_reduction_method="MEAN")
            model.set_asynchronous_callbacks(True)
            self.train_names = spec.trainable()
            self.train_vars = [self.graph.variables[k][0] for k in self.train_names]
            self.slots = [{} for _ in self.train_vars]
            self.per_sample_loss = _loss(config)
            self._spe, self._optimizer = 0, None
            self._compile_keras(g * self.iterations)
        self._fns = {}
        self._bn_counts = [
            (n.name, math.prod(spec.in_shapes(n)[0][1:])) for n in spec.nodes if isinstance(n.op, S.BatchNorm)
        ]
        self.load_weights(weights)

    def _compile_keras(self, steps_per_execution: int) -> None:
        """``model.compile`` for ``steps_per_execution``; one optimizer for the
        executable's life, so its state survives a recompile."""
        if steps_per_execution == self._spe:
            return
        if self._optimizer is None:
            self._optimizer = _keras_torch_optimizer()(self.config, grad_scale=1.0 / self.replicas)
        self.graph.model.compile(optimizer=self._optimizer, loss=self.per_sample_loss,
                                 steps_per_execution=steps_per_execution)
        self._spe = steps_per_execution

    def _placement(self) -> Any:
        return self.strategy.scope()

    def _call(self, name: str, python_fn: Callable[..., Any], mode: str, *args: Any) -> Any:
        tf = _tf()
        if name not in self._fns:
            self._fns[name] = tf.function(python_fn, jit_compile=True)  # Graphcore: tf.function + strategy.run
        with self.strategy.scope():
            return self.strategy.run(self._fns[name], args=args)

    # -- fit / predict: the pipelined, steps_per_execution paths -------------------------

    def _dataset(self, *arrays: np.ndarray, micro: int) -> Any:
        tf = _tf()
        data = tf.data.Dataset.from_tensor_slices(arrays if len(arrays) > 1 else arrays[0])
        return data.batch(micro, drop_remainder=True)  # static shapes for the IPU

    def predict(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        if training:
            return super().predict(x, training=True)
        x = self._x(self.check_x(x))
        per_call = self.replicas * self._spe
        micro = -(-len(x) // per_call)
        pad = micro * per_call - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        with self.strategy.scope():
            out = self.graph.model.predict(self._dataset(x, micro=micro), steps=self._spe, verbose=0)
        return np.asarray(out)[: len(x) - pad]

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = self.check_xy(x, y)
        return float(self.run_steps(x[None], y[None])[0])

    def run_steps(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        self.check_steps(xs, ys)
        for x, y in zip(xs[1:], ys[1:]):
            self.check_xy(x, y)
        steps, n = xs.shape[0], xs.shape[1]
        g, r = self.config.grad_accum, self.replicas
        if n % (g * r):
            raise InputError(f"{self.target}: batch {n} is not divisible by grad_accum x replicas = {g} x {r}")
        micro = n // (g * r)
        self._check_bn_batch(micro)
        self._compile_keras(g * math.gcd(steps, self.iterations))
        keras = _keras()
        seen: list[tuple[int, float]] = []

        class Losses(keras.callbacks.Callback):  # per step (asynchronous callbacks) or per execution
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                seen.append((int(batch), float((logs or {}).get("loss", float("nan")))))

        flat_x, flat_y = self._x(xs).reshape(-1, *xs.shape[2:]), self._y(ys).reshape(-1, *ys.shape[2:])
        data = self._dataset(flat_x, flat_y, micro=micro)
        with self.strategy.scope():
            self.graph.model.optimizer.iterations.assign(self.step)
            self.graph.model.fit(data, epochs=1, steps_per_epoch=steps * g, callbacks=[Losses()], shuffle=False,
                                 verbose=0)
        self.step += steps
        return _step_losses(seen, steps, g)


def _step_losses(seen: list[tuple[int, float]], steps: int, g: int) -> np.ndarray:
    """Per optimizer step losses from Keras's running-mean ``loss`` logged after
    micro-batch steps ``batch`` (0-based): running sums differenced give each
    logged span's mean; a span covering several optimizer steps gives each of
    them the span's mean."""
    per_micro = np.full(steps * g, np.nan)
    last_b, last_sum = -1, 0.0
    for b, mean in seen:
        total = (b + 1) * mean
        per_micro[last_b + 1: b + 1] = (total - last_sum) / (b - last_b)
        last_b, last_sum = b, total
    return per_micro.reshape(steps, g).mean(axis=1)


def check_ipu_plan(spec: S.ModelSpec, plan: Any, config: TrainConfig) -> None:
    """The plan must be for this spec and agree with the training config."""
    from hal import ipu as planner

    if plan.spec_hash != spec.hash:
        raise ConfigError(f"the IPU plan was made for model {plan.model!r} with another spec than {spec.name!r}")
    if plan.precision != "fp32" or config.precision != "fp32":
        raise UnsupportedError(
            f"tensorflow:ipu computes in fp32 here; plan {plan.precision!r}, config {config.precision!r}"
        )
    if plan.training and plan.batch.grad_accum != config.grad_accum:
        raise ConfigError(f"the IPU plan accumulates {plan.batch.grad_accum} micro-batches, the training config "
                          f"says grad_accum={config.grad_accum}: make them equal")
    if plan.training and plan.state_tensors != planner.optimizer_state_tensors(config.optimizer):
        raise ConfigError(f"the IPU plan was made for {plan.optimizer}, the training config uses {config.optimizer!r}")


def compile_ipu(spec: S.ModelSpec, weights: Weights, config: TrainConfig | None = None, plan: Any = None,
                num_ipus: int | None = None) -> IPUExecutable:
    """Compile ``spec`` for IPUs with an explicit :class:`hal.ipu.Plan` (stages,
    replicas, device iterations) or the default plan for ``num_ipus``."""
    _ipu_available_or_raise()
    config = config or TrainConfig()
    if config.precision != "fp32":
        raise UnsupportedError(f"tensorflow:ipu computes in fp32 here, not {config.precision!r}")
    plan = plan if plan is not None else ipu_plan(spec, config, num_ipus)
    check_ipu_plan(spec, plan, config)
    return IPUExecutable(spec, check_weights(spec, weights), config, plan, num_ipus)


def _ipu_available_or_raise() -> None:
    if not _ipu_importable():
        raise BackendUnavailable(f"tensorflow:ipu is not available: {IPU_REASON}")


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
        return {} if _ipu_importable() else {"ipu": IPU_REASON}

    @classmethod
    def devices(cls) -> list[str]:
        tf = _tf()
        gpus = [f"gpu:{i}" for i in range(len(tf.config.list_physical_devices("GPU")))]
        return ["cpu", *gpus, *(["ipu"] if _ipu_importable() else [])]

    @classmethod
    def resolve_device(cls, device: str) -> str:
        kind, _, index = device.partition(":")
        if kind == "ipu":
            if not _ipu_importable():
                raise TargetError(f"tensorflow has no device {device!r} here: {IPU_REASON}")
            if index and not (index.isdigit() and int(index) >= 1):
                raise TargetError(f"tensorflow:ipu:N takes the number of IPUs N >= 1, got {device!r}")
            return device
        return super().resolve_device(device)

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(precisions=tuple(DTYPES), pipelining=_ipu_importable(), replication=_ipu_importable())

    @classmethod
    def compile_plan(cls, spec: S.ModelSpec, plan: Any, weights: Mapping[str, np.ndarray] | None = None,
                     config: TrainConfig | None = None, device: str = "ipu", seed: int = 0) -> IPUExecutable:
        """Compile ``spec`` for IPUs with a :class:`hal.ipu.Plan` (pipeline stages,
        replicas, device iterations); ``config`` defaults to SGD with the plan's G."""
        from hal.weights import init_weights

        if cls.resolve_device(device).partition(":")[0] != "ipu":
            raise TargetError(f"an IPU plan needs an IPU target, got tensorflow:{device}")
        config = config or TrainConfig(grad_accum=plan.batch.grad_accum)
        w = check_weights(spec, weights) if weights is not None else init_weights(spec, seed)
        index = device.partition(":")[2]
        return compile_ipu(spec, w, config, plan=plan, num_ipus=int(index) if index else None)

    @classmethod
    def compile(cls, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig) -> Executable:
        if device.startswith("ipu"):
            index = device.partition(":")[2]
            return compile_ipu(spec, weights, config, num_ipus=int(index) if index else None)
        return TensorFlowExecutable(spec, weights, device, config)
