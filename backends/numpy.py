"""The numpy reference backend: in float64, the ground truth for forward parity.

Always available; needs nothing but numpy. It computes in the config's
precision exactly (``fp64`` for the reference, ``fp32`` for the parity
harness's float32 rounding floor, ``fp16``) and refuses ``bf16``, which numpy
lacks. Every op is written out plainly from
its canonical definition (DESIGN.md), channels-first, with explicit
padding: convolution is an im2col matrix product per group, pooling a reduction
over strided windows. Inference and training-mode forward only; gradients come
from a float64 autodiff run on another backend (``torch:cpu`` with
``precision="fp64"``).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from hal.backend import Availability, Backend, Capabilities, Executable, Target, Weights
from hal.errors import UnsupportedError
from hal.spec import (
    Activation,
    AdaptiveAvgPool,
    AdaptiveMaxPool,
    Add,
    AvgPool,
    BatchNorm,
    ChannelShuffle,
    ChannelSlice,
    Concat,
    Conv,
    ConvTranspose,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    GroupNorm,
    Input,
    InstanceNorm,
    LayerNorm,
    MaxPool,
    ModelSpec,
    Mul,
    Node,
    Pad,
    PReLU,
    Scale,
    StochasticDepth,
    Upsample,
)
from hal.lowering import (
    COMPUTE_DTYPE,
    adaptive_windows,
    avg_pool_divisor,
    free_after,
    linear_indices,
    nearest_indices,
    pool_padding,
)
from hal.training import TrainConfig

PRECISIONS = ("fp64", "fp32", "fp16")  # numpy has no bfloat16

_erf = np.frompyfunc(math.erf, 1, 1)


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """A per-channel vector ``(C,)`` (or one shared ``(1,)``) shaped to broadcast over ``(N, C, *spatial)``."""
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def _windows(x: np.ndarray, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> np.ndarray:
    """View of ``x`` (N, C, *S) as (N, C, *out, *kernel) strided, dilated windows."""
    nd = len(kernel)
    axes = tuple(range(2, 2 + nd))
    eff = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    w = sliding_window_view(x, eff, axis=axes)
    pos = tuple(slice(None, None, s) for s in stride)
    win = tuple(slice(None, None, d) for d in dilation)
    return w[(slice(None), slice(None), *pos, *win)]


def _pad(x: np.ndarray, padding: tuple[tuple[int, int], ...], value: float = 0.0) -> np.ndarray:
    if not any(a or b for a, b in padding):
        return x
    return np.pad(x, ((0, 0), (0, 0), *padding), constant_values=value)


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, op: Conv) -> np.ndarray:
    n, nd, g = x.shape[0], len(op.kernel), op.groups
    win = _windows(_pad(x, op.padding), op.kernel, op.stride, op.dilation)  # (N, C, *out, *k)
    out_sp = win.shape[2 : 2 + nd]
    cg, og = x.shape[1] // g, op.out_channels // g
    # (N, *out, C, *k) so each group's patch is contiguous after the reshape
    cols = np.moveaxis(win, 1, 1 + nd).reshape(n, *out_sp, g, cg * math.prod(op.kernel))
    wg = w.reshape(g, og, cg * math.prod(op.kernel))
    y = np.einsum("n...gk,gok->n...go", cols, wg, optimize=True).reshape(n, *out_sp, op.out_channels)
    y = np.moveaxis(y, -1, 1)
    if b is not None:
        y = y + _channel(b, y.ndim)
    return np.ascontiguousarray(y)


def conv_transpose(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, op: ConvTranspose) -> np.ndarray:
    """Each input pixel scatters ``w * x`` to ``i * stride + j * dilation`` (per kernel
    offset ``j``, within its group); the full output is then cropped by ``padding``
    and extended by ``output_padding``."""
    n, g = x.shape[0], op.groups
    spatial = x.shape[2:]
    full = [(m - 1) * s + d * (k - 1) + 1 + q
            for m, k, s, d, q in zip(spatial, op.kernel, op.stride, op.dilation, op.output_padding)]
    cg, og = x.shape[1] // g, op.out_channels // g
    xg = x.reshape(n, g, cg, *spatial)
    wg = w.reshape(g, cg, og, *op.kernel)
    y = np.zeros((n, g, og, *full), dtype=x.dtype)
    for j in itertools.product(*(range(k) for k in op.kernel)):
        contrib = np.einsum("ngc...,gco->ngo...", xg, wg[(slice(None), slice(None), slice(None), *j)])
        at = tuple(slice(jj * d, jj * d + (m - 1) * s + 1, s) for jj, d, m, s in zip(j, op.dilation, spatial, op.stride))
        y[(slice(None), slice(None), slice(None), *at)] += contrib
    y = y.reshape(n, op.out_channels, *full)
    out = tuple(slice(a, f - b) for (a, b), f in zip(op.padding, full))
    y = y[(slice(None), slice(None), *out)]
    return np.ascontiguousarray(y + _channel(b, y.ndim) if b is not None else y)


def batch_norm(x: np.ndarray, p: Mapping[str, np.ndarray], op: BatchNorm, training: bool) -> np.ndarray:
    axes = (0, *range(2, x.ndim))
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)  # biased, as in the forward of every framework
    else:
        mean, var = p["running_mean"], p["running_var"]
    inv = p["weight"] / np.sqrt(var + op.eps)
    return (x - _channel(mean, x.ndim)) * _channel(inv, x.ndim) + _channel(p["bias"], x.ndim)


def _normalise(x: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps)`` over ``axes``, biased variance."""
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)


def norm(x: np.ndarray, p: Mapping[str, np.ndarray], op: LayerNorm | GroupNorm | InstanceNorm) -> np.ndarray:
    """LayerNorm over channels, GroupNorm over channel groups and positions, InstanceNorm
    over positions; then the per-channel affine."""
    if isinstance(op, LayerNorm):
        y = _normalise(x, (1,), op.eps)
    elif isinstance(op, InstanceNorm):
        y = _normalise(x, tuple(range(2, x.ndim)), op.eps)
    else:
        grouped = x.reshape(x.shape[0], op.groups, -1)
        y = _normalise(grouped, (2,), op.eps).reshape(x.shape)
    return y * _channel(p["weight"], x.ndim) + _channel(p["bias"], x.ndim) if op.affine else y


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # exact identity, no overflow


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


def _softplus(x: np.ndarray, beta: float, threshold: float) -> np.ndarray:
    z = beta * x
    return np.where(z > threshold, x, np.logaddexp(0.0, z) / beta)  # logaddexp(0, z) = log(1 + exp(z)), no overflow


ACTIVATIONS: dict[str, Callable[[np.ndarray, Activation], np.ndarray]] = {
    "relu": lambda x, op: np.maximum(x, 0.0),
    "relu6": lambda x, op: _relu6(x),
    "leaky_relu": lambda x, op: np.where(x >= 0, x, op.alpha * x),
    "elu": lambda x, op: np.where(x > 0, x, op.alpha * np.expm1(np.minimum(x, 0.0))),
    "sigmoid": lambda x, op: _sigmoid(x),
    "hardsigmoid": lambda x, op: _relu6(x + 3.0) / 6.0,
    "tanh": lambda x, op: np.tanh(x),
    "hardswish": lambda x, op: x * _relu6(x + 3.0) / 6.0,
    "silu": lambda x, op: x * _sigmoid(x),
    "softplus": lambda x, op: _softplus(x, op.beta, op.threshold),
    "mish": lambda x, op: x * np.tanh(np.logaddexp(0.0, x)),
    "gelu": lambda x, op: (
        0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        if op.approximate == "tanh"
        else 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype))
    ),
}


def max_pool(x: np.ndarray, op: MaxPool) -> np.ndarray:
    nd = len(op.kernel)
    win = _windows(_pad(x, pool_padding(x.shape[2:], op), -np.inf), op.kernel, op.stride, (1,) * nd)
    return win.max(axis=tuple(range(-nd, 0)))


def avg_pool(x: np.ndarray, op: AvgPool) -> np.ndarray:
    nd = len(op.kernel)
    total = _windows(_pad(x, pool_padding(x.shape[2:], op)), op.kernel, op.stride, (1,) * nd).sum(
        axis=tuple(range(-nd, 0)))
    return total / avg_pool_divisor(x.shape[2:], op).astype(x.dtype)


def adaptive_pool(x: np.ndarray, op: AdaptiveAvgPool | AdaptiveMaxPool) -> np.ndarray:
    reduce = np.mean if isinstance(op, AdaptiveAvgPool) else np.max
    axes = tuple(range(2, x.ndim))
    out = np.empty((*x.shape[:2], *op.output_size), dtype=x.dtype)
    windows = [adaptive_windows(n, o) for n, o in zip(x.shape[2:], op.output_size)]
    for index in itertools.product(*(range(o) for o in op.output_size)):
        region = tuple(slice(*windows[d][i]) for d, i in enumerate(index))
        out[(..., *index)] = reduce(x[(slice(None), slice(None), *region)], axis=axes)
    return out


def upsample(x: np.ndarray, op: Upsample) -> np.ndarray:
    """Dim by dim: gather (nearest) or the weighted sum of two gathers (linear)."""
    for d in range(len(op.size)):
        axis, n = 2 + d, x.shape[2 + d]
        if op.mode == "nearest":
            x = x.take(nearest_indices(op, d, n), axis=axis)
        else:
            i0, i1, w0, w1 = linear_indices(op, d, n)
            shape = [1] * x.ndim
            shape[axis] = -1
            x = x.take(i0, axis=axis) * w0.reshape(shape).astype(x.dtype) + x.take(i1, axis=axis) * w1.reshape(
                shape).astype(x.dtype)
    return x


_NUMPY_PAD_MODE = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


def pad(x: np.ndarray, op: Pad) -> np.ndarray:
    extra = {"constant_values": op.value} if op.mode == "constant" else {}
    return np.pad(x, ((0, 0), (0, 0), *op.padding), mode=_NUMPY_PAD_MODE[op.mode], **extra)


def run_node(node: Node, xs: list[np.ndarray], p: Mapping[str, np.ndarray], training: bool) -> np.ndarray:
    """One node's canonical float64 forward."""
    op = node.op
    if isinstance(op, Conv):
        return conv(xs[0], p["weight"], p.get("bias"), op)
    if isinstance(op, ConvTranspose):
        return conv_transpose(xs[0], p["weight"], p.get("bias"), op)
    if isinstance(op, BatchNorm):
        return batch_norm(xs[0], p, op, training)
    if isinstance(op, (LayerNorm, GroupNorm, InstanceNorm)):
        return norm(xs[0], p, op)
    if isinstance(op, Activation):
        return ACTIVATIONS[op.fn](xs[0], op)
    if isinstance(op, PReLU):
        return np.where(xs[0] >= 0, xs[0], _channel(p["weight"], xs[0].ndim) * xs[0])
    if isinstance(op, MaxPool):
        return max_pool(xs[0], op)
    if isinstance(op, AvgPool):
        return avg_pool(xs[0], op)
    if isinstance(op, (AdaptiveAvgPool, AdaptiveMaxPool)):
        return adaptive_pool(xs[0], op)
    if isinstance(op, Pad):
        return pad(xs[0], op)
    if isinstance(op, GlobalAvgPool):
        return xs[0].mean(axis=tuple(range(2, xs[0].ndim)))
    if isinstance(op, Add):
        return functools.reduce(np.add, xs)
    if isinstance(op, Mul):
        return functools.reduce(np.multiply, xs)
    if isinstance(op, Scale):
        return xs[0] * p["layer_scale"][None]
    if isinstance(op, Concat):
        return np.concatenate(xs, axis=1)
    if isinstance(op, Upsample):
        return upsample(xs[0], op)
    if isinstance(op, ChannelShuffle):
        x = xs[0]
        return x.reshape(x.shape[0], op.groups, -1, *x.shape[2:]).swapaxes(1, 2).reshape(x.shape)
    if isinstance(op, ChannelSlice):
        return xs[0][:, op.start : op.stop]
    if isinstance(op, Flatten):
        return xs[0].reshape(xs[0].shape[0], -1)
    if isinstance(op, Dense):
        y = np.moveaxis(np.moveaxis(xs[0], 1, -1) @ p["weight"].T, -1, 1)
        return y + p["bias"].reshape(1, -1, *([1] * (y.ndim - 2))) if "bias" in p else y
    if isinstance(op, (Dropout, StochasticDepth)):
        if training and (op.rate if isinstance(op, Dropout) else op.p) > 0:
            raise UnsupportedError(
                f"node {node.name!r}: the reference cannot reproduce random {op.kind} masks; "
                "compare training-mode forwards with rate (p) 0"
            )
        return xs[0]
    raise UnsupportedError(f"node {node.name!r}: numpy has no {op.kind} op")


class NumpyExecutable(Executable):
    """Runs the spec node by node in the config's precision: ``fp64`` for the
    reference, ``fp32`` (the parity harness's float32 rounding floor) or ``fp16``;
    numpy has no bfloat16."""

    def __init__(self, spec: ModelSpec, weights: Weights, config: TrainConfig) -> None:
        super().__init__(spec, Target("numpy", "cpu"), config)
        self._dtype = np.dtype(spec.dtype) if spec.dtype in ("float32", "float64", "float16") else np.dtype("float32")
        self.compute_dtype = np.dtype(COMPUTE_DTYPE[config.precision])
        self._free_after = free_after(spec)
        self.load_weights(weights)

    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        values: dict[str, np.ndarray] = {}
        for node, free in zip(self.spec.nodes, self._free_after):
            if isinstance(node.op, Input):
                values[node.name] = x.astype(self.compute_dtype)
            else:
                values[node.name] = run_node(node, [values[k] for k in node.inputs], self._params[node.name], training)
            for k in free:
                del values[k]
        return values[self.spec.output]

    def weights(self) -> Weights:
        return {f"{n}.{p}": a.astype(self._dtype) for n, ps in self._params.items() for p, a in ps.items()}

    def _load_weights(self, weights: Weights) -> None:
        params: dict[str, dict[str, np.ndarray]] = {n.name: {} for n in self.spec.nodes}
        for k, v in weights.items():
            node, _, p = k.rpartition(".")
            params[node][p] = v.astype(self.compute_dtype)
        self._params = params


class NumpyBackend(Backend):
    """The reference: every op, inference and training-mode forward, no training."""

    name = "numpy"
    description = "numpy reference: float64 ground truth for forward parity (also fp32, fp16)"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True, np.__version__)

    @classmethod
    def devices(cls) -> list[str]:
        return ["cpu"]

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(precisions=PRECISIONS, training=False)

    @classmethod
    def compile(
        cls, spec: ModelSpec, weights: Weights, device: str, config: TrainConfig, options: Mapping[str, Any],
        plan: Any,
    ) -> Executable:
        return NumpyExecutable(spec, weights, config)
