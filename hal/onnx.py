"""ONNX export and import: :func:`to_onnx` writes a spec and its weights as an ONNX model,
:func:`from_onnx` reads one back (or a CNN exported by ``torch.onnx.export``).

Export is the inference form (BatchNormalization with running statistics), built with
``onnx.helper``, in the default domain at opset ``DEFAULT_OPSET`` = ``MIN_OPSET`` = 17 (the
first with LayerNormalization; what most execution providers support). Any opset up to
the newest the installed ``onnx`` knows is accepted: gelu is ONNX's ``Gelu`` from opset 20
and the erf or tanh formula below it, mish is ``Mish`` from opset 18 and
``x * tanh(softplus(x))`` below it; GroupNorm is written as InstanceNormalization over
the grouped tensor (ONNX's GroupNormalization changed meaning at opset 21). The model
passes ``onnx.checker.check_model(full_check=True)``.

Naming: the ONNX node that computes hal node ``n`` is called ``n`` and outputs the value
``n``; its parameters are the initializers ``n.<param>`` (``n.weight``, ``n.running_mean``);
helper nodes and constants of ``n`` are called ``n/<what>``. The graph input is named
after the spec's Input node (``"input"`` for the zoo and :class:`~hal.spec.SpecBuilder`),
the graph output after ``spec.output``. ``metadata_props`` hold ``hal.spec`` (the spec's
JSON) and ``hal.spec_hash``.

Weights are stored in the spec's dtype (float32, float64 or float16), so
``from_onnx(to_onnx(spec, w))`` returns ``w`` bit for bit when ``w`` is in that dtype
(``init_weights`` gives it).

``onnx`` is imported when a function here runs: ``import hal`` stays numpy-only.
"""

from __future__ import annotations

import ast
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from hal.errors import ConfigError, HalError, SpecError, UnsupportedError
from hal.spec import (
    ACTIVATIONS,
    Activation,
    AdaptiveAvgPool,
    AdaptiveMaxPool,
    Add,
    ChannelShuffle,
    ChannelSlice,
    ConvTranspose,
    AvgPool,
    BatchNorm,
    Concat,
    Conv,
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
    SpecBuilder,
    StochasticDepth,
    Upsample,
)
from hal.weights import atomic_write, check_weights, init_weights

if TYPE_CHECKING:
    import onnx

DEFAULT_OPSET = 17
MIN_OPSET = 17  # LayerNormalization
MISH_OPSET = 18  # first opset with a Mish op
GELU_OPSET = 20  # first opset with a Gelu op
SPEC_KEY, HASH_KEY = "hal.spec", "hal.spec_hash"
_PROTOBUF_LIMIT = 2**31 - 2**24  # a protobuf message is under 2 GiB; room for the graph itself
_DTYPES = ("float32", "float64", "float16")  # spec dtypes an ONNX model can compute in (onnx.TensorProto names below)
_TENSOR_TYPES = {"float32": "FLOAT", "float64": "DOUBLE", "float16": "FLOAT16"}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError("ONNX export and import need the onnx package: pip install 'hal-cnn[onnx]'") from None
    return onnx


def _check_opset(opset: Any) -> int:
    newest = _onnx().defs.onnx_opset_version()
    if not (isinstance(opset, int) and not isinstance(opset, bool) and MIN_OPSET <= opset <= newest):
        raise ConfigError(f"to_onnx: opset must be an int from {MIN_OPSET} to {newest} (the newest this onnx "
                          f"knows), got {opset!r}")
    return opset


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------


class _Graph:
    """The nodes and initializers of the model being written."""

    def __init__(self, dtype: np.dtype, opset: int) -> None:
        self.helper = _onnx().helper
        self.dtype = dtype
        self.opset = opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # per-sample hal shapes of the values hal nodes read

    def node(self, op_type: str, inputs: list[str], output: str, name: str | None = None, **attrs: Any) -> str:
        """Add a node computing the value ``output``; it is called ``name`` (default: ``output``)."""
        self.nodes.append(self.helper.make_node(op_type, inputs, [output], name=name or output, **attrs))
        return output

    def tensor(self, name: str, value: Any, dtype: Any = None) -> str:
        """Add an initializer (in the model's dtype unless given) and return its name."""
        arr = np.asarray(value, dtype=dtype or self.dtype)
        self.initializers.append(_onnx().numpy_helper.from_array(arr, name))
        return name


def _pads(padding: tuple[tuple[int, int], ...]) -> list[int]:
    """ONNX ``pads``: every dim's begin, then every dim's end."""
    return [b for b, _ in padding] + [a for _, a in padding]


def _per_channel(g: _Graph, name: str, v: np.ndarray, rank: int) -> str:
    """A ``(C,)`` (or shared ``(1,)``) vector as an initializer ``(C, 1, ...)``: it broadcasts over
    ``(N, C, *spatial)``."""
    return g.tensor(name, np.reshape(v, (-1, *[1] * (rank - 2))))


def _activation(g: _Graph, n: Node, x: str) -> None:
    op: Activation = n.op  # type: ignore[assignment]
    c = f"{n.name}/"
    simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish"}
    if op.fn in simple:
        g.node(simple[op.fn], [x], n.name)
    elif op.fn == "relu6":
        g.node("Clip", [x, g.tensor(c + "min", 0.0), g.tensor(c + "max", 6.0)], n.name)
    elif op.fn in ("leaky_relu", "elu"):
        g.node("LeakyRelu" if op.fn == "leaky_relu" else "Elu", [x], n.name, alpha=op.alpha)
    elif op.fn == "hardsigmoid":
        g.node("HardSigmoid", [x], n.name, alpha=1.0 / 6.0, beta=0.5)
    elif op.fn == "silu":
        g.node("Mul", [x, g.node("Sigmoid", [x], c + "sigmoid")], n.name)
    elif op.fn == "mish" and g.opset >= MISH_OPSET:
        g.node("Mish", [x], n.name)
    elif op.fn == "mish":
        g.node("Mul", [x, g.node("Tanh", [g.node("Softplus", [x], c + "softplus")], c + "tanh")], n.name)
    elif op.fn == "softplus" and (op.beta, op.threshold) == (1.0, 20.0):
        g.node("Softplus", [x], n.name)  # beyond x = 20, log(1 + e^x) and x differ by < e^-20 x: invisible
    elif op.fn == "softplus":  # where(beta x > threshold, x, softplus(beta x) / beta)
        beta = g.tensor(c + "beta", op.beta)
        z = g.node("Mul", [x, beta], c + "beta_x")
        smooth = g.node("Div", [g.node("Softplus", [z], c + "softplus"), beta], c + "smooth")
        linear = g.node("Greater", [z, g.tensor(c + "threshold", op.threshold)], c + "linear")
        g.node("Where", [linear, x, smooth], n.name)
    elif g.opset >= GELU_OPSET:
        g.node("Gelu", [x], n.name, approximate=op.approximate)
    else:  # 0.5 x (1 + erf(x / sqrt 2)) or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        if op.approximate == "tanh":
            cube = g.node("Mul", [x, g.node("Mul", [x, x], c + "square")], c + "cube")
            inner = g.node("Add", [x, g.node("Mul", [cube, g.tensor(c + "k", 0.044715)], c + "k_cube")], c + "inner")
            z = g.node("Tanh", [g.node("Mul", [inner, g.tensor(c + "s", math.sqrt(2.0 / math.pi))], c + "scaled")],
                       c + "tanh")
        else:
            z = g.node("Erf", [g.node("Mul", [x, g.tensor(c + "rsqrt2", 1.0 / math.sqrt(2.0))], c + "scaled")],
                       c + "erf")
        one_plus = g.node("Add", [z, g.tensor(c + "one", 1.0)], c + "one_plus")
        g.node("Mul", [g.node("Mul", [x, g.tensor(c + "half", 0.5)], c + "half_x"), one_plus], n.name)


def _norm(g: _Graph, n: Node, x: str, rank: int, p: Mapping[str, str], w: Mapping[str, np.ndarray]) -> None:
    """LayerNorm (channels at each position), InstanceNorm and GroupNorm (with ONNX ops whose meaning
    has not changed across opsets: LayerNormalization over the last axis, InstanceNormalization)."""
    op = n.op
    c, channels = f"{n.name}/", w.get(f"{n.name}.weight")
    ones = lambda k: g.tensor(c + "scale", np.ones(k))  # noqa: E731
    zeros = lambda k: g.tensor(c + "bias", np.zeros(k))  # noqa: E731
    if isinstance(op, LayerNorm):
        k = g.shapes[x][0]
        last = [p["weight"], p["bias"]] if op.affine else [ones(k), zeros(k)]
        if rank == 2:
            g.node("LayerNormalization", [x, *last], n.name, axis=-1, epsilon=op.eps)
            return
        perm = [0, *range(2, rank), 1]
        t = g.node("Transpose", [x], c + "channels_last", perm=perm)
        y = g.node("LayerNormalization", [t, *last], c + "normalised", axis=-1, epsilon=op.eps)
        g.node("Transpose", [y], n.name, perm=[0, rank - 1, *range(1, rank - 1)])
        return
    if isinstance(op, InstanceNorm):
        k = g.shapes[x][0]
        affine = [p["weight"], p["bias"]] if op.affine else [ones(k), zeros(k)]
        g.node("InstanceNormalization", [x, *affine], n.name, epsilon=op.eps)
        return
    groups: int = op.groups  # type: ignore[attr-defined]  # GroupNorm: each group as one instance
    grouped = g.node("Reshape", [x, g.tensor(c + "groups", np.array([0, groups, -1]), np.int64)], c + "grouped")
    y = g.node("InstanceNormalization", [grouped, ones(groups), zeros(groups)], c + "normalised", epsilon=op.eps)
    y = g.node("Reshape", [y, g.node("Shape", [x], c + "shape")], c + "ungrouped" if op.affine else n.name)
    if op.affine:
        scaled = g.node("Mul", [y, _per_channel(g, p["weight"], channels, rank)], c + "scaled")
        g.node("Add", [scaled, _per_channel(g, p["bias"], w[f"{n.name}.bias"], rank)], n.name)


def _export_pool(g: _Graph, n: Node, x: str, spatial: tuple[int, ...], out: tuple[int, ...]) -> None:
    """MaxPool or AveragePool with ``ceil_mode=0``: PyTorch's ceil mode (whose last window may
    overhang the padding, and is dropped when it would start in it; ONNX's rule differs by
    opset) is the floor rule with the end padding that gives exactly those windows. Overhang
    is -inf for max and never counts for average; an average that counts the declared padding
    pads explicitly first, so that the overhang alone is left uncounted."""
    op: MaxPool | AvgPool = n.op  # type: ignore[assignment]
    pads = op.padding
    if op.ceil_mode:
        pads = tuple((b, max((o - 1) * s + k - b - size, 0)) for (b, _), o, s, k, size in
                     zip(op.padding, out, op.stride, op.kernel, spatial))
    attrs = {"kernel_shape": list(op.kernel), "strides": list(op.stride)}
    if isinstance(op, MaxPool):
        g.node("MaxPool", [x], n.name, pads=_pads(pads), **attrs)
    elif op.count_include_pad and any(e > a for (_, e), (_, a) in zip(pads, op.padding)):
        rank = len(spatial) + 2
        flat = [0, 0, *_pads(op.padding)[: rank - 2], 0, 0, *_pads(op.padding)[rank - 2:]]
        padded = g.node("Pad", [x, g.tensor(f"{n.name}/pads", flat, np.int64)], f"{n.name}/padded", mode="constant")
        overhang = tuple((0, e - a) for (_, e), (_, a) in zip(pads, op.padding))
        g.node("AveragePool", [padded], n.name, pads=_pads(overhang), count_include_pad=0, **attrs)
    else:
        g.node("AveragePool", [x], n.name, pads=_pads(pads), count_include_pad=int(op.count_include_pad), **attrs)


def _upsample(g: _Graph, n: Node, x: str, spatial: tuple[int, ...]) -> None:
    """Dim by dim, hal's own source indices and weights (:mod:`hal.lowering`, exactly torch's):
    a Gather (nearest), or two Gathers weighted and summed (linear). Resize's coordinate modes
    would have to reproduce torch's rules; these constants are them."""
    from hal.lowering import linear_indices, nearest_indices

    op: Upsample = n.op  # type: ignore[assignment]
    c = f"{n.name}/"
    for d, size in enumerate(spatial):
        axis, out = d + 2, c + f"d{d}" if d < len(spatial) - 1 else n.name
        if op.mode == "nearest":
            x = g.node("Gather", [x, g.tensor(f"{c}d{d}_index", nearest_indices(op, d, size), np.int64)], out,
                       axis=axis)
            continue
        i0, i1, w0, w1 = linear_indices(op, d, size)
        shape = (-1, *[1] * (len(spatial) - 1 - d))  # broadcast along dim d of (N, C, *spatial)
        terms = [g.node("Mul", [g.node("Gather", [x, g.tensor(f"{c}d{d}_index{k}", i, np.int64)], f"{c}d{d}_gather{k}",
                                       axis=axis), g.tensor(f"{c}d{d}_weight{k}", np.reshape(wk, shape))],
                        f"{c}d{d}_term{k}") for k, (i, wk) in enumerate(((i0, w0), (i1, w1)))]
        x = g.node("Add", terms, out)


def _adaptive_pool(g: _Graph, n: Node, x: str, spatial: tuple[int, ...]) -> None:
    """PyTorch's adaptive pooling: one pool when every window is alike (the size divides), else
    per dim (a mean or max over a box is one over each of its dims in turn) a Slice and Reduce per
    output position, concatenated."""
    op = n.op
    out: tuple[int, ...] = op.output_size  # type: ignore[attr-defined]
    is_max = isinstance(op, AdaptiveMaxPool)
    if all(s % o == 0 for s, o in zip(spatial, out)):
        k = [s // o for s, o in zip(spatial, out)]
        g.node("MaxPool" if is_max else "AveragePool", [x], n.name, kernel_shape=k, strides=k)
        return
    reduce = "ReduceMax" if is_max else "ReduceMean"
    c = f"{n.name}/"
    for d, (size, o) in enumerate(zip(spatial, out)):
        axis = d + 2
        parts = []
        for i in range(o):
            lo, hi = i * size // o, -(-(i + 1) * size // o)
            ends = [g.tensor(f"{c}d{d}_{i}_{k}", [v], np.int64)
                    for k, v in (("start", lo), ("end", hi), ("axis", axis))]
            part = g.node("Slice", [x, *ends], f"{c}d{d}_{i}_slice")
            if g.opset >= 18:  # the axes of Reduce* became an input
                parts.append(g.node(reduce, [part, ends[2]], f"{c}d{d}_{i}", keepdims=1))
            else:
                parts.append(g.node(reduce, [part], f"{c}d{d}_{i}", axes=[axis], keepdims=1))
        x = g.node("Concat", parts, n.name if d == len(spatial) - 1 else f"{c}d{d}", axis=axis)


def _export_node(g: _Graph, spec: ModelSpec, n: Node, w: Mapping[str, np.ndarray], value: Mapping[str, str]) -> None:
    """Append the ONNX node(s) computing hal node ``n``."""
    op, xs = n.op, [value[i] for i in n.inputs]
    ins = spec.in_shapes(n)
    names = [k for k in (*op.params(ins), *op.buffers(ins))]
    rank = len(ins[0]) + 1 if ins else 0
    if isinstance(op, (PReLU, Scale, GroupNorm)):  # per-channel vectors as (C, 1, ...), or used as such
        p = {k: f"{n.name}.{k}" for k in names}
        if not isinstance(op, GroupNorm):
            _per_channel(g, p[names[0]], w[p[names[0]]], rank)
    elif isinstance(op, Dense) and rank > 2:  # at every position: a 1x1 convolution, weight (out, in, 1, ...)
        p = {k: g.tensor(f"{n.name}.{k}", w[f"{n.name}.{k}"]) for k in names if k != "weight"}
        weight = w[f"{n.name}.weight"]
        p["weight"] = g.tensor(f"{n.name}.weight", weight.reshape(*weight.shape, *[1] * (rank - 2)))
    else:
        p = {k: g.tensor(f"{n.name}.{k}", w[f"{n.name}.{k}"]) for k in names}
    g.shapes.update({x: s for x, s in zip(xs, ins)})
    if isinstance(op, Conv):
        g.node("Conv", [xs[0], p["weight"]] + ([p["bias"]] if op.bias else []), n.name, kernel_shape=list(op.kernel),
               strides=list(op.stride), pads=_pads(op.padding), dilations=list(op.dilation), group=op.groups)
    elif isinstance(op, ConvTranspose):
        g.node("ConvTranspose", [xs[0], p["weight"]] + ([p["bias"]] if op.bias else []), n.name,
               kernel_shape=list(op.kernel), strides=list(op.stride), pads=_pads(op.padding),
               output_padding=list(op.output_padding), dilations=list(op.dilation), group=op.groups)
    elif isinstance(op, Upsample):
        _upsample(g, n, xs[0], ins[0][1:])
    elif isinstance(op, StochasticDepth):  # identity in inference
        g.node("Identity", xs, n.name)
    elif isinstance(op, BatchNorm):
        ins_ = [xs[0], p["weight"], p["bias"], p["running_mean"], p["running_var"]]
        g.node("BatchNormalization", ins_, n.name, epsilon=op.eps, momentum=1.0 - op.momentum)
    elif isinstance(op, (LayerNorm, InstanceNorm, GroupNorm)):
        _norm(g, n, xs[0], rank, p, w)
    elif isinstance(op, Activation):
        _activation(g, n, xs[0])
    elif isinstance(op, PReLU):
        g.node("PRelu", [xs[0], p["weight"]], n.name)
    elif isinstance(op, (MaxPool, AvgPool)):
        _export_pool(g, n, xs[0], ins[0][1:], spec.shape(n.name)[1:])
    elif isinstance(op, (AdaptiveAvgPool, AdaptiveMaxPool)):
        _adaptive_pool(g, n, xs[0], ins[0][1:])
    elif isinstance(op, ChannelSlice):
        ends = [g.tensor(f"{n.name}/{k}", [v], np.int64)
                for k, v in (("start", op.start), ("stop", op.stop), ("axis", 1))]
        g.node("Slice", [xs[0], *ends], n.name)
    elif isinstance(op, ChannelShuffle):  # (N, g, C/g, rest) -> (N, C/g, g, rest) -> the input's shape
        split = g.tensor(f"{n.name}/split", [0, op.groups, ins[0][0] // op.groups, -1], np.int64)
        grouped = g.node("Reshape", [xs[0], split], f"{n.name}/grouped")
        swapped = g.node("Transpose", [grouped], f"{n.name}/swapped", perm=[0, 2, 1, 3])
        g.node("Reshape", [swapped, g.node("Shape", [xs[0]], f"{n.name}/shape")], n.name)
    elif isinstance(op, Pad):
        mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[op.mode]
        pads = g.tensor(f"{n.name}/pads", [0, 0, *_pads(op.padding)[: rank - 2], 0, 0, *_pads(op.padding)[rank - 2:]],
                        np.int64)
        extra = [g.tensor(f"{n.name}/value", op.value)] if op.mode == "constant" else []
        g.node("Pad", [xs[0], pads, *extra], n.name, mode=mode)
    elif isinstance(op, GlobalAvgPool):  # (N, C, 1, ...) then (N, C)
        pooled = g.node("GlobalAveragePool", xs, f"{n.name}/keepdims", name=n.name)
        g.node("Flatten", [pooled], n.name, name=f"{n.name}/flatten", axis=1)
    elif isinstance(op, Add):
        g.node("Add" if len(xs) == 2 else "Sum", xs, n.name)
    elif isinstance(op, Mul):  # ONNX's Mul is binary: a chain, the last step named after the node
        acc = xs[0]
        for k, x in enumerate(xs[1:], 1):
            acc = g.node("Mul", [acc, x], n.name if k == len(xs) - 1 else f"{n.name}/mul{k}")
    elif isinstance(op, Scale):
        g.node("Mul", [xs[0], p["layer_scale"]], n.name)
    elif isinstance(op, Concat):
        g.node("Concat", xs, n.name, axis=1)
    elif isinstance(op, Flatten):
        g.node("Flatten", xs, n.name, axis=1)
    elif isinstance(op, Dense) and rank > 2:
        g.node("Conv", [xs[0], p["weight"]] + ([p["bias"]] if op.bias else []), n.name, kernel_shape=[1] * (rank - 2))
    elif isinstance(op, Dense):
        g.node("Gemm", [xs[0], p["weight"]] + ([p["bias"]] if op.bias else []), n.name, transB=1)
    elif isinstance(op, Dropout):  # identity in inference; the rate is kept as the ratio input
        g.node("Dropout", [xs[0], g.tensor(f"{n.name}/ratio", op.rate)], n.name)
    else:  # a new op in hal.spec.OPS without an export rule
        raise UnsupportedError(f"to_onnx: node {n.name!r}: no ONNX export for op {op.kind}")


def to_onnx(
    spec: ModelSpec,
    weights: Mapping[str, Any] | None = None,
    path: str | os.PathLike | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    batch: int = 1,
    seed: int = 0,
) -> "onnx.ModelProto":
    """``spec`` with ``weights`` (default ``init_weights(spec, seed)``) as an ONNX model in
    inference form; written atomically to ``path`` when given.

    The batch dim is the symbol ``"batch"`` when ``dynamic_batch``, else ``batch``. See the
    module docstring for names, opsets and dtypes. Raises :class:`~hal.errors.WeightsError`
    for weights that do not match the spec, :class:`~hal.errors.ConfigError` for a bad
    opset or an unwritable path, :class:`~hal.errors.UnsupportedError` for weights of 2 GiB
    or more (protobuf's limit; e.g. regnet_y_128gf) or a dtype ONNX export does not take.
    """
    onnx = _onnx()
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"to_onnx: expected a hal.ModelSpec, got {type(spec).__name__}")
    opset = _check_opset(opset)
    if spec.dtype not in _DTYPES:
        raise UnsupportedError(f"to_onnx: spec {spec.name!r} computes in {spec.dtype}; ONNX export supports "
                               f"{', '.join(_DTYPES)}")
    if not isinstance(dynamic_batch, bool):
        raise ConfigError(f"to_onnx: dynamic_batch must be a bool, got {dynamic_batch!r}")
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1):
        raise ConfigError(f"to_onnx: batch must be an int >= 1, got {batch!r}")
    size = sum(math.prod(shape) for shape in spec.param_shapes().values()) * np.dtype(spec.dtype).itemsize
    if size >= _PROTOBUF_LIMIT:
        raise UnsupportedError(f"to_onnx: the weights of {spec.name!r} take {size / 2**30:.1f} GiB; an ONNX file "
                               "holds under 2 GiB in one protobuf (external data is not written yet)")
    w = check_weights(spec, weights) if weights is not None else init_weights(spec, seed)
    model = _build(spec, w, opset, "batch" if dynamic_batch else batch)
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        try:
            atomic_write(path, model.SerializeToString())
        except OSError as exc:
            raise ConfigError(f"cannot write the ONNX model to {os.fspath(path)!r}: {exc.strerror or exc}") from exc
    return model


def _build(spec: ModelSpec, w: Mapping[str, np.ndarray], opset: int, n_dim: str | int) -> "onnx.ModelProto":
    """The ONNX model of ``spec`` with checked weights ``w``; batch dim ``n_dim`` (a symbol or a size)."""
    onnx = _onnx()
    g = _Graph(np.dtype(spec.dtype), opset)
    value = {spec.input.name: spec.input.name}
    for n in spec.nodes[1:]:
        _export_node(g, spec, n, w, value)
        value[n.name] = n.name
    elem = getattr(onnx.TensorProto, _TENSOR_TYPES[spec.dtype])
    graph = onnx.helper.make_graph(
        g.nodes, spec.name or "hal",
        [onnx.helper.make_tensor_value_info(spec.input.name, elem, [n_dim, *spec.input_shape])],
        [onnx.helper.make_tensor_value_info(value[spec.output], elem, [n_dim, *spec.output_shape])],
        initializer=g.initializers,
    )
    opsets = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="hal", producer_version=_version(),
                                   doc_string=f"hal spec {spec.name!r} in inference form")
    model.ir_version = onnx.helper.find_min_ir_version_for(opsets)
    onnx.helper.set_model_props(model, {SPEC_KEY: spec.to_json(), HASH_KEY: spec.hash})
    return model


def _version() -> str:
    from hal import __version__

    return __version__


# ---------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------

# ONNX ops that act elementwise on one tensor (with scalar constants): chains of them are
# matched, by value, against hal's activations (torch writes silu as x * sigmoid(x), and
# gelu before opset 20 as erf or tanh formulas, in several orders)
_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Min", "Max", "Clip",
    "Greater", "Less", "Where", "Erf", "Tanh", "Sigmoid", "HardSigmoid", "HardSwish", "Relu", "LeakyRelu", "Elu",
    "Gelu", "Softplus", "Mish",
})
_PROBE = np.linspace(-6.0, 6.0, 241)  # points at which an elementwise chain is compared with each activation
_MATCH_TOL = 1e-5  # float32 constants (sqrt(2), 0.044715) move a chain ~1e-7; gelu's two forms differ by 2e-4
_ONNX_DTYPES = {1: "float32", 11: "float64", 10: "float16"}  # TensorProto.FLOAT, DOUBLE, FLOAT16
_SENTINEL_BATCH = 2**31 - 1  # stands for a symbolic batch size in folded shape arithmetic


@dataclass(frozen=True)
class _Value:
    """An ONNX value computed by hal node ``node``: its ONNX shape is hal's with ``keep``
    trailing 1s (a pooled ``(N, C, 1, 1)`` is hal's ``(C,)`` with keep 2), or hal's tensor
    seen through ``view``: ``("last",)`` channels moved last (``Transpose``), ``("groups", G)``
    reshaped to ``(N, G, rest)`` (before a group norm), ``("normed", G)`` that group-normalised
    (the hal node is the GroupNorm), ``("split", G)`` reshaped to ``(N, G, C / G, *spatial)``,
    ``("shuffled", G)`` that with axes 1 and 2 swapped (a channel shuffle before its reshape)."""

    node: str
    keep: int = 0
    view: tuple[Any, ...] = ()


class _Unsupported(Exception):
    """One ONNX node hal cannot express: the reason."""


def _float(v: float) -> float:
    """A float32 attribute as the shortest decimal that rounds to it (``1e-05``, not ``9.99999974e-06``)."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))


class _Importer:
    """ONNX graph -> hal nodes and weights, one ONNX node at a time in graph order."""

    def __init__(self, model: Any) -> None:
        self.onnx = _onnx()
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.consts: dict[str, np.ndarray] = {  # writable copies: they become the weights
            t.name: np.array(self.onnx.numpy_helper.to_array(t)) for t in self.graph.initializer
        }
        self.initializers = set(self.consts)
        self.values: dict[str, _Value] = {}
        self.sequences: dict[str, list[str]] = {}  # SplitToSequence outputs: their hal nodes
        self.lazy: dict[str, tuple[str, Any]] = {}  # elementwise chain value -> (root value, producing node)
        self.poisoned: set[str] = set()
        self.unsupported: list[str] = []
        self.order = {o: i for i, n in enumerate(self.graph.node) for o in n.output}
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.by_name: dict[str, Node] = {}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.done: set[str] = set()  # first outputs of nodes translated with an earlier one (MatMul's bias Add)
        self.scopes = [_scope(n) for n in self.graph.node]
        self.containers = {s[0][:i] for s in self.scopes for i in range(1, len(s[0]))}
        self.builder = SpecBuilder(_sanitise(self.graph.name) or "onnx")  # infers and checks shapes
        self.nodes: list[Node] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.batch: int | None = None

    # -- bookkeeping -------------------------------------------------------

    def add(self, op: Any, inputs: list[str], onnx_node: Any, params: Mapping[str, Any] | None = None) -> str:
        """Append a hal node for ``onnx_node``; returns its name."""
        name = self.name_of(onnx_node, params or {})
        try:
            self.shapes[name] = self.builder.shape(self.builder.op(op, inputs, name))
        except SpecError as exc:  # it names the hal node: the caller names the ONNX node
            raise _Unsupported(f"not a valid hal {op.kind}: {exc}") from None
        self.nodes.append(Node(name, op, tuple(inputs)))
        self.by_name[name] = self.nodes[-1]
        for p, arr in (params or {}).items():
            self.weights[f"{name}.{p}"] = arr
        return name

    def name_of(self, n: Any, params: Mapping[str, Any]) -> str:
        """hal's name for the node computing ``n``: the module path its weights are named after
        (``layer1.0.conv1`` of ``layer1.0.conv1.weight``), else the module path the exporter
        recorded, else the ONNX node's own name; unique."""
        base = ""
        if params:
            weight = next(iter(params))
            prefixes = {v.rpartition(".")[0] for v in n.input if v.rpartition(".")[2] == weight}
            base = next(iter(prefixes)) if len(prefixes) == 1 else ""
        if not base:
            path, word = _scope(n)
            scope = ".".join(path)
            if scope and path not in self.containers:
                base = scope
            elif scope or word:
                base = ".".join(filter(None, (scope, word)))
        base = _sanitise(base) or n.op_type.lower()
        name, k = base, 0
        while name in self.shapes:
            k += 1
            name = f"{base}_{k}"
        return name

    def const(self, v: str, what: str) -> np.ndarray:
        if v not in self.consts:
            raise _Unsupported(f"{what} {v!r} must be a constant (an initializer or folded from constants)")
        return self.consts[v]

    def fold(self, v: str) -> np.ndarray | None:
        """The constant ``v``, folding the nodes that compute it ahead of the walk (a look-ahead
        reads constants the exporter wrote after the node being translated); None if not constant."""
        if v in self.values or v in self.lazy:
            return None
        if v not in self.consts:
            n = self.producers.get(v)
            if n is None or n.op_type in ("Shape", "RandomNormal", "RandomUniform"):
                return None
            if n.op_type == "CastLike":  # to the type of a tensor; of a hal value: the model's
                x, like = self.fold(n.input[0]), self.consts.get(n.input[1])
                if x is not None:
                    self.consts[v] = x.astype(like.dtype if like is not None else self.nodes[0].op.dtype)
                return None if x is None else self.consts[v]
            inputs = [self.fold(i) for i in n.input if i]
            if any(i is None for i in inputs):
                return None
            outputs = [self.evaluate(n, [])] if n.op_type == "Constant" else self.evaluate(n, inputs)  # type: ignore
            self.consts.update(zip(n.output, outputs))
        return self.consts[v]

    def value(self, v: str) -> _Value:
        """The hal value of ONNX value ``v`` (an elementwise chain ending there becomes an activation)."""
        if v in self.lazy:
            self.values[v] = self.resolve(v)
            del self.lazy[v]
        if v not in self.values:
            raise _Unsupported(f"input {v!r} is a constant; hal ops take constants only as weights")
        return self.values[v]

    def flat(self, v: str) -> str:
        """A hal node name whose hal shape equals the ONNX value's (no trailing 1s kept)."""
        val = self.value(v)
        if val.keep:
            raise _Unsupported(f"input {v!r} is a pooled (N, C, 1, ...) tensor; hal's pooled tensors are (N, C)")
        if val.view:
            raise _Unsupported(f"input {v!r} is a transposed or reshaped tensor ({val.view[0]}) that no hal op reads")
        return val.node

    # -- the walk ----------------------------------------------------------

    def run(self) -> tuple[ModelSpec, dict[str, np.ndarray]]:
        self.add_input()
        for n in self.graph.node:
            if n.output[0] in self.done:
                continue
            if any(i in self.poisoned for i in n.input) or n.domain not in ("", "ai.onnx"):
                if n.domain not in ("", "ai.onnx") or n.op_type not in _HANDLERS and not self.foldable(n):
                    self.unsupported.append(f"{n.name or n.output[0]!r} ({n.domain + '.' if n.domain else ''}"
                                            f"{n.op_type}: no hal op)")
                self.poisoned.update(n.output)
                continue
            try:
                self.translate(n)
            except _Unsupported as exc:
                self.unsupported.append(f"{n.name or n.output[0]!r} ({n.op_type}: {exc})")
                self.poisoned.update(n.output)
        outputs = [o.name for o in self.graph.output]
        out = ""
        if len(outputs) != 1:
            self.unsupported.append(f"graph outputs {outputs} (a hal spec has exactly one output)")
        elif outputs[0] not in self.poisoned:
            try:
                out = self.flat(outputs[0])
            except _Unsupported as exc:
                self.unsupported.append(f"graph output {outputs[0]!r} ({exc})")
        if self.unsupported:
            raise UnsupportedError(f"from_onnx: {len(self.unsupported)} ONNX node(s) hal cannot import: "
                                   + "; ".join(self.unsupported))
        used, todo = set(), [out]
        by_name = {n.name: n for n in self.nodes}
        while todo:  # keep what the output depends on (a sigmoid read only by its silu is gone)
            name = todo.pop()
            if name not in used:
                used.add(name)
                todo.extend(by_name[name].inputs)
        nodes = tuple(n for n in self.nodes if n.name in used)
        spec = ModelSpec(self.builder.name, nodes, out)
        weights = {k: v for k, v in self.weights.items() if k.rpartition(".")[0] in used}
        return spec, check_weights(spec, weights, "weights of the ONNX model")

    def add_input(self) -> None:
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise UnsupportedError(f"from_onnx: the graph has {len(inputs)} inputs {[i.name for i in inputs]}; "
                                   "a hal spec has exactly one")
        i = inputs[0]
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        dtype = _ONNX_DTYPES.get(t.elem_type)
        if dtype is None or len(dims) < 2 or any(d is None for d in dims[1:]):
            raise UnsupportedError(f"from_onnx: graph input {i.name!r} must be a float32/float64/float16 tensor of "
                                   f"shape (batch, C, *spatial) with static C and spatial sizes, got element type "
                                   f"{t.elem_type} and dims {dims}")
        self.batch = dims[0]
        name = _sanitise(i.name) or "input"
        self.shapes[name] = self.builder.shape(self.builder.input(dims[1:], dtype, name))
        self.nodes.append(Node(name, Input(tuple(dims[1:]), dtype)))
        self.values[i.name] = _Value(name)

    def foldable(self, n: Any) -> bool:
        return all(i in self.consts or not i for i in n.input) and n.op_type not in ("RandomNormal", "RandomUniform")

    def translate(self, n: Any) -> None:
        if n.op_type == "Constant":
            self.consts[n.output[0]] = self.evaluate(n, [])
        elif n.op_type == "Identity":
            for store in (self.consts, self.values, self.lazy):
                if n.input[0] in store:
                    store[n.output[0]] = store[n.input[0]]  # type: ignore[index]
        elif n.op_type == "Shape" and n.input[0] not in self.consts:
            self.consts[n.output[0]] = self.shape_of(n)
        elif n.op_type == "CastLike" and n.input[0] in self.consts:
            self.fold(n.output[0])
        elif self.foldable(n) and n.input:
            for o, arr in zip(n.output, self.evaluate(n, [self.consts[i] for i in n.input if i] )):
                self.consts[o] = arr
        elif n.op_type in _ELEMENTWISE and self.chain(n):
            pass
        elif n.op_type in _HANDLERS:
            extra = [o for o in n.output[1:] if o and self.consumers.get(o)]
            if extra and n.op_type != "Split":
                raise _Unsupported(f"its extra outputs {extra} are used; hal computes only the first")
            _HANDLERS[n.op_type](self, n)
        else:
            raise _Unsupported("no hal op")

    def evaluate(self, n: Any, inputs: list[np.ndarray]) -> list[np.ndarray] | np.ndarray:
        """Fold a node of constants with ONNX's reference implementation."""
        from onnx.reference import ReferenceEvaluator

        if n.op_type == "Constant":
            return ReferenceEvaluator(n, opsets={"": self.opset}).run(None, {})[0]
        names = [i for i in n.input if i]
        return ReferenceEvaluator(n, opsets={"": self.opset}).run(None, dict(zip(names, inputs)))

    def shape_of(self, n: Any) -> np.ndarray:
        """``Shape`` of a hal value: the batch (a sentinel when symbolic), its hal shape, its kept 1s."""
        val = self.value(n.input[0])
        if val.view:
            raise _Unsupported(f"the shape of a transposed or reshaped tensor ({val.view[0]})")
        full = np.array([self.batch or _SENTINEL_BATCH, *self.shapes[val.node], *[1] * val.keep], dtype=np.int64)
        attrs = _attrs(n)
        return full[attrs.get("start", 0): attrs.get("end", len(full))]

    # -- elementwise chains -------------------------------------------------

    def root(self, v: str) -> str | None:
        if v in self.lazy:
            return self.lazy[v][0]
        return v if v in self.values else None

    def chain(self, n: Any) -> bool:
        """Record ``n`` as a step of an elementwise chain of one value (scalar constants
        aside); False when it is not one (e.g. a residual Add of two values)."""
        ins = [i for i in n.input if i]
        variables = [i for i in ins if i not in self.consts]
        roots = {self.root(i) for i in variables}
        if len(roots) != 1 or None in roots or any(self.consts[i].size != 1 for i in ins if i in self.consts):
            return False
        self.lazy[n.output[0]] = (roots.pop(), n)  # type: ignore[arg-type]
        return True

    def resolve(self, v: str) -> _Value:
        """The hal node(s) of an elementwise chain ending in ``v``: the activation from the nearest
        value ``u`` that every path to ``v`` passes through (itself resolved the same way), or, when
        none fits, the sum or product of the chain's last step."""
        last = self.lazy[v][1]
        for u in self.cuts(v):
            others = [i for i in last.input[1:] if i]
            direct = (_direct_activation(last, [self.consts[i] for i in others])
                      if last.input[0] == u and all(i in self.consts for i in others) else None)
            op = direct or self.match(v, u)
            if op is not None:  # elementwise: the result is seen as its input is
                val = self.value(u)
                return _Value(self.add(op, [val.node], last), val.keep, val.view)
        if last.op_type in ("Add", "Sum", "Mul") and not any(i in self.consts for i in last.input):
            op = Mul() if last.op_type == "Mul" else Add()
            return _Value(self.add(op, [self.flat(i) for i in last.input], last))
        raise _Unsupported(f"the elementwise ops ending in {last.name or v!r} compute none of hal's activations "
                           f"({', '.join(ACTIVATIONS)})")

    def cuts(self, v: str) -> list[str]:
        """The values of the chain ending in ``v`` that every path to ``v`` passes through, nearest first."""
        inner, todo = set(), [v]
        while todo:
            u = todo.pop()
            if u in self.lazy and u not in inner:
                inner.add(u)
                todo.extend(i for i in self.lazy[u][1].input if i and i not in self.consts)
        candidates = sorted({i for u in inner for i in self.lazy[u][1].input if i and i not in self.consts},
                            key=lambda u: -self.order.get(u, -1))
        return [u for u in candidates if self.leaves(v, u) == {u}]

    def leaves(self, v: str, u: str) -> set[str]:
        """The non-constant values walking back from ``v`` ends at, stopping at ``u``."""
        out, todo, seen = set(), [v], set()
        while todo:
            w = todo.pop()
            if w in seen or w in self.consts:
                continue
            seen.add(w)
            if w == u or w not in self.lazy:
                out.add(w)
            else:
                todo.extend(i for i in self.lazy[w][1].input if i)
        return out

    def match(self, v: str, root: str) -> Activation | None:
        """The activation the chain from ``root`` to ``v`` computes, compared by value."""
        from onnx.reference import ReferenceEvaluator

        from hal.backends.numpy import ACTIVATIONS as FORWARD  # the float64 reference of each activation

        steps, todo, seen = [], [v], set()
        while todo:
            u = todo.pop()
            if u == root or u in seen or u in self.consts:
                continue
            seen.add(u)
            node = self.lazy[u][1]
            steps.append(node)
            todo.extend(i for i in node.input if i)
        steps.sort(key=lambda node: self.order[node.output[0]])
        oh = self.onnx.helper
        consts = {i for node in steps for i in node.input if i in self.consts}
        graph = oh.make_graph(
            steps, "chain", [oh.make_tensor_value_info(root, self.onnx.TensorProto.DOUBLE, [None])],
            [oh.make_tensor_value_info(v, self.onnx.TensorProto.DOUBLE, None)],
            initializer=[self.onnx.numpy_helper.from_array(self.consts[c].astype(np.float64), c) for c in consts],
        )
        thresholds = [float(self.consts[c]) for c in consts]
        points = np.concatenate([_PROBE, *[[t - 1e-3, t + 1e-3] for t in thresholds]]) if thresholds else _PROBE
        points = np.concatenate([[-1.0, 0.0], points, points / 2])  # / 2: a threshold on beta x, for beta 2
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", max(self.opset, MIN_OPSET))])
        try:
            y = np.asarray(ReferenceEvaluator(model).run(None, {root: points})[0], dtype=np.float64)
        except Exception:  # an op the reference cannot run on these points: no match
            return None
        at = dict(zip(points.tolist(), y.tolist()))
        fitted = [Activation("leaky_relu", alpha=_float(-at[-1.0])),
                  Activation("elu", alpha=_float(at[-1.0] / math.expm1(-1)))]
        if at[0.0] > 0:
            beta = _float(math.log(2.0) / at[0.0])
            fitted += [Activation("softplus", beta=beta, threshold=_float(t)) for t in (20.0, *thresholds)]
        plain = [Activation(fn) for fn in FORWARD if fn not in ("leaky_relu", "elu", "softplus")]
        for op in [*plain, Activation("gelu", approximate="tanh"), *fitted]:
            ref = FORWARD[op.fn](points, op)
            if y.shape == ref.shape and np.all(np.abs(y - ref) <= _MATCH_TOL * np.maximum(1.0, np.abs(ref))):
                return op
        return None


def _attrs(n: Any) -> dict[str, Any]:
    from onnx.helper import get_attribute_value

    out = {}
    for a in n.attribute:
        v = get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _scope(n: Any) -> tuple[tuple[str, ...], str]:
    """(module path, op word) an exporter recorded for node ``n``: the dynamo exporter's
    ``pkg.torch.onnx.name_scopes``, the TorchScript exporter's ``/layer1/layer1.0/conv1/Conv``
    names; else ``((), node name)``."""
    meta = {p.key: p.value for p in n.metadata_props}
    if "pkg.torch.onnx.name_scopes" in meta:
        try:
            scopes = [s for s in ast.literal_eval(meta["pkg.torch.onnx.name_scopes"]) if s]
        except (ValueError, SyntaxError):
            scopes = []
        if scopes:
            return tuple(scopes[-2].split(".")) if len(scopes) > 1 else (), _word(scopes[-1])
    if n.name.startswith("/"):
        parts = n.name.strip("/").split("/")
        path: list[str] = []
        for p in parts[:-1]:  # "layer1", "layer1.0", "conv1" -> layer1.0.conv1
            full = ".".join(path)
            path = p.split(".") if full and p.startswith(full + ".") else [*path, p]
        return tuple(path), _word(parts[-1])
    return (), n.name


def _word(op: str) -> str:
    """``Add_1`` -> ``add``; ``relu_2`` -> ``relu``."""
    return re.sub(r"_\d+$", "", op).lower()


def _sanitise(name: str) -> str:
    """A valid hal node name from an ONNX one."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name).lstrip(".-")


def _direct_activation(n: Any, consts: list[np.ndarray]) -> Activation | None:
    """The activation one ONNX op is, exactly (attributes and constant inputs included), or None."""
    a = _attrs(n)
    if n.op_type == "Clip":
        bounds = [float(c) for c in consts] if consts else [a.get("min"), a.get("max")]
        bounds += [None] * (2 - len(bounds))
        known = {(0.0, None): Activation("relu"), (0.0, 6.0): Activation("relu6")}
        return known.get(tuple(bounds))  # type: ignore[arg-type]
    if n.op_type in ("LeakyRelu", "Elu"):
        return Activation("leaky_relu" if n.op_type == "LeakyRelu" else "elu",
                          alpha=_float(a.get("alpha", 0.01 if n.op_type == "LeakyRelu" else 1.0)))
    if n.op_type == "Gelu":
        return Activation("gelu", approximate=a.get("approximate", "none"))
    if n.op_type == "HardSigmoid":
        exact = np.float32(a.get("alpha", 0.2)) == np.float32(1 / 6) and a.get("beta", 0.5) == 0.5
        return Activation("hardsigmoid") if exact else None
    fn = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hardswish", "Softplus": "softplus",
          "Mish": "mish"}.get(n.op_type)
    return Activation(fn) if fn else None


def _window(imp: _Importer, n: Any, x: str, kernel: tuple[int, ...], dilation: tuple[int, ...] | None = None
            ) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(stride, explicit padding) of a Conv or pool node, from ``pads`` or ``auto_pad``."""
    from hal.spec import same_padding

    a, nd = _attrs(n), len(kernel)
    stride = tuple(a.get("strides", [1] * nd))
    dil = dilation or (1,) * nd
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [same_padding(s, k, st, d) for s, k, st, d in zip(imp.shapes[x][1:], kernel, stride, dil)]
        padding = tuple(p if auto == "SAME_UPPER" else p[::-1] for p in pads)
    elif auto == "VALID":
        padding = ((0, 0),) * nd
    else:
        p = list(a.get("pads", [0] * 2 * nd))
        padding = tuple(zip(p[:nd], p[nd:]))
    if a.get("ceil_mode", 0):
        floor = [(s + b + e - (k - 1) * d - 1) // st + 1 for s, k, st, d, (b, e)
                 in zip(imp.shapes[x][1:], kernel, stride, dil, padding)]
        ceil = [-(-(s + b + e - (k - 1) * d - 1) // st) + 1 for s, k, st, d, (b, e)
                in zip(imp.shapes[x][1:], kernel, stride, dil, padding)]
        if floor != ceil:
            raise _Unsupported("ceil_mode=1 gives a larger output than hal's floor rule here")
    return stride, padding


def _conv(imp: _Importer, n: Any) -> None:
    x = imp.flat(n.input[0])
    w = imp.const(n.input[1], "weight")
    a = _attrs(n)
    kernel = tuple(a.get("kernel_shape", w.shape[2:]))
    dilation = tuple(a.get("dilations", [1] * len(kernel)))
    stride, padding = _window(imp, n, x, kernel, dilation)
    params = {"weight": w}
    if len(n.input) > 2 and n.input[2]:
        bias = imp.const(n.input[2], "bias")
        if n.input[2] in imp.initializers or np.any(bias):  # not the zeros an exporter computes for bias=False
            params["bias"] = bias
    op = Conv(int(w.shape[0]), kernel, stride, padding, dilation, int(a.get("group", 1)), "bias" in params)
    imp.values[n.output[0]] = _Value(imp.add(op, [x], n, params))


def _batchnorm(imp: _Importer, n: Any) -> None:
    a = _attrs(n)
    if a.get("training_mode", 0):
        raise _Unsupported("training_mode=1 (hal imports the inference form)")
    x = imp.flat(n.input[0])
    names = ("weight", "bias", "running_mean", "running_var")
    params = {k: imp.const(v, k) for k, v in zip(names, n.input[1:5])}
    momentum = float(1 - _decimal(a.get("momentum", 0.9)))
    op = BatchNorm(eps=_float(a.get("epsilon", 1e-5)), momentum=momentum)
    imp.values[n.output[0]] = _Value(imp.add(op, [x], n, params))


def _decimal(v: float) -> Any:
    from decimal import Decimal

    return Decimal(np.format_float_positional(np.float32(v), unique=True, trim="-"))


def _pool(imp: _Importer, n: Any) -> None:
    a = _attrs(n)
    if any(d != 1 for d in a.get("dilations", [])):
        raise _Unsupported(f"dilations {a['dilations']} (hal pools have none)")
    x = imp.flat(n.input[0])
    kernel = tuple(a["kernel_shape"])
    stride, padding = _window(imp, n, x, kernel)
    op = (MaxPool(kernel, stride, padding) if n.op_type == "MaxPool"
          else AvgPool(kernel, stride, padding, bool(a.get("count_include_pad", 0))))
    imp.values[n.output[0]] = _Value(imp.add(op, [x], n))


def _global_pool(imp: _Importer, n: Any, axes: list[int] | None = None, keepdims: bool = True) -> None:
    x = imp.flat(n.input[0])
    nd = len(imp.shapes[x]) - 1
    if axes is not None and sorted(a % (nd + 2) for a in axes) != list(range(2, nd + 2)):
        raise _Unsupported(f"a mean over axes {axes}; hal's GlobalAvgPool is the mean over all spatial axes")
    if keepdims and not all(_to_features(imp, c) for c in imp.consumers.get(n.output[0], [])):
        imp.values[n.output[0]] = _Value(imp.add(AdaptiveAvgPool((1,) * nd), [x], n))  # read as (N, C, 1, ...)
        return
    imp.values[n.output[0]] = _Value(imp.add(GlobalAvgPool(), [x], n), nd if keepdims else 0)


def _to_features(imp: _Importer, n: Any) -> bool:
    """Whether node ``n`` reshapes its input to (batch, features) (as far as its constants tell)."""
    if n.op_type == "Reshape":
        target = imp.fold(n.input[1])
        return target is None or target.size == 2
    return n.op_type in ("Flatten", "Squeeze")


def _reduce_mean(imp: _Importer, n: Any) -> None:
    a = _attrs(n)
    axes = a.get("axes")
    if len(n.input) > 1 and n.input[1]:
        axes = imp.const(n.input[1], "axes").tolist()
    if axes is None:
        raise _Unsupported("a mean over all axes, batch included")
    _global_pool(imp, n, list(axes), bool(a.get("keepdims", 1)))


def _to_matrix(imp: _Importer, n: Any, x: str) -> None:
    """Flatten/Reshape/Squeeze to (N, features): an alias of a pooled value, else a hal Flatten."""
    val = imp.value(x)
    if val.keep or len(imp.shapes[val.node]) == 1:
        imp.values[n.output[0]] = _Value(val.node)
    else:
        imp.values[n.output[0]] = _Value(imp.add(Flatten(), [val.node], n))


def _flatten(imp: _Importer, n: Any) -> None:
    if _attrs(n).get("axis", 1) != 1:
        raise _Unsupported(f"axis {_attrs(n)['axis']} (hal flattens from axis 1)")
    _to_matrix(imp, n, n.input[0])


def _reshape(imp: _Importer, n: Any) -> None:
    """To (batch, features); and the reshapes of a group norm (``(N, G, rest)`` and back) and of a
    channel shuffle (``(N, G, C / G, *spatial)``, then back after the transpose)."""
    val = imp.value(n.input[0])
    full = [imp.batch or _SENTINEL_BATCH, *imp.shapes[val.node], *[1] * val.keep]
    target = [int(t) for t in imp.const(n.input[1], "shape")]
    if not _attrs(n).get("allowzero", 0):
        target = [full[i] if t == 0 and i < len(full) else t for i, t in enumerate(target)]
    if target.count(-1) == 1:
        known = math.prod(t for t in target if t != -1)
        target[target.index(-1)] = math.prod(full) // known if known else -1
    out = n.output[0]
    if val.view and val.view[0] in ("normed", "shuffled") and target == full:
        node = val.node if val.view[0] == "normed" else imp.add(ChannelShuffle(val.view[1]), [val.node], n)
        imp.values[out] = _Value(node)
        return
    if not val.view and not val.keep and len(full) > 2 and target[0] == full[0] and target[1] >= 1:
        c, groups = full[1], target[1]
        if target == [full[0], groups, math.prod(full[1:]) // groups] and c % groups == 0:
            imp.values[out] = _Value(val.node, view=("groups", groups))
            return
        if target == [full[0], groups, c // groups, *full[2:]] and c % groups == 0:
            imp.values[out] = _Value(val.node, view=("split", groups))
            return
    if not val.view and not val.keep and target == [math.prod(full)] and imp.batch:
        imp.values[out] = _Value(val.node, view=("flat",))  # torch's as_strided: this, then a Gather
        return
    if val.view or target != [full[0], math.prod(full[1:])]:
        raise _Unsupported(f"a reshape of {full}{f' ({val.view[0]})' if val.view else ''} to {target}; hal reshapes "
                           "only to (batch, features) and as group norms and channel shuffles do")
    _to_matrix(imp, n, n.input[0])


def _gather(imp: _Importer, n: Any) -> None:
    """The Gather of every element in order from a flattened tensor (the dynamo exporter's as_strided
    of a contiguous tensor to its own shape): the tensor itself."""
    val = imp.value(n.input[0])
    index = imp.const(n.input[1], "indices")
    full = (imp.batch, *imp.shapes[val.node])
    if val.view != ("flat",) or index.shape != full or np.any(index.reshape(-1) != np.arange(index.size)):
        raise _Unsupported("a gather other than of every element in order of a flattened tensor (an identity)")
    imp.values[n.output[0]] = _Value(val.node)


def _transpose(imp: _Importer, n: Any) -> None:
    """Channels to the last axis and back (ConvNeXt's LayerNorm and MLP), or a channel shuffle's swap."""
    val = imp.value(n.input[0])
    perm = list(_attrs(n).get("perm", []))
    if not val.view:
        rank = 1 + len(imp.shapes[imp.flat(n.input[0])])
        if perm == [0, *range(2, rank), 1]:
            imp.values[n.output[0]] = _Value(val.node, view=("last",))
            return
    rank = 1 + len(imp.shapes[val.node])
    if val.view == ("last",) and perm == [0, rank - 1, *range(1, rank - 1)]:
        imp.values[n.output[0]] = _Value(val.node)
        return
    if val.view[:1] == ("split",) and perm == [0, 2, 1, *range(3, rank + 1)]:
        imp.values[n.output[0]] = _Value(val.node, view=("shuffled", val.view[1]))
        return
    raise _Unsupported(f"perm {perm}{f' of a {val.view[0]} view' if val.view else ''}: hal transposes only channels "
                       "to the last axis and back, and within a channel shuffle")


def _squeeze(imp: _Importer, n: Any) -> None:
    val = imp.value(n.input[0])
    axes = _attrs(n).get("axes")
    if len(n.input) > 1 and n.input[1]:
        axes = imp.const(n.input[1], "axes").tolist()
    rank = 1 + len(imp.shapes[val.node]) + val.keep
    if not val.keep or sorted(a % rank for a in (axes or range(2, rank))) != list(range(rank - val.keep, rank)):
        raise _Unsupported(f"a squeeze of axes {axes}; hal squeezes only a global pool's kept axes")
    imp.values[n.output[0]] = _Value(val.node)


def _dense(imp: _Importer, n: Any) -> None:
    a = _attrs(n)
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        raise _Unsupported("transA=1, alpha != 1 or beta != 1 (hal's Dense is x @ W.T + b)")
    x = imp.flat(n.input[0])
    w = imp.const(n.input[1], "weight")
    params = {"weight": w if a.get("transB", 0) else np.ascontiguousarray(w.T)}
    if len(n.input) > 2 and n.input[2]:
        params["bias"] = imp.const(n.input[2], "bias").reshape(-1)
    imp.values[n.output[0]] = _Value(imp.add(Dense(int(w.shape[0 if a.get("transB", 0) else 1]),
                                                   "bias" in params), [x], n, params))


def _matmul(imp: _Importer, n: Any) -> None:
    """x @ W, and a following Add of a constant bias, as one Dense; on channels-last
    ``(N, *spatial, C)`` (ConvNeXt's MLP) as a 1x1 Conv."""
    val = imp.value(n.input[0])
    last = val.view == ("last",)
    x = val.node if last else imp.flat(n.input[0])
    w = imp.const(n.input[1], "weight")
    if w.ndim != 2 or len(imp.shapes[x]) != 1 and not last:
        raise _Unsupported(f"a matmul of {(None, *imp.shapes[x])} by {w.shape}; hal's Dense takes (batch, features)")
    params = {"weight": np.ascontiguousarray(w.T)}
    out = n.output[0]
    users = imp.consumers.get(out, [])
    if len(users) == 1 and users[0].op_type == "Add" and out not in [o.name for o in imp.graph.output]:
        bias = [i for i in users[0].input if i != out]
        if len(bias) == 1 and bias[0] in imp.consts and imp.consts[bias[0]].size == w.shape[1]:
            params["bias"] = imp.consts[bias[0]].reshape(-1)
            imp.done.add(users[0].output[0])
            out = users[0].output[0]
    if last:
        nd = len(imp.shapes[x]) - 1
        params["weight"] = params["weight"].reshape(*w.T.shape, *[1] * nd)
        op = Conv(int(w.shape[1]), (1,) * nd, (1,) * nd, ((0, 0),) * nd, (1,) * nd, 1, "bias" in params)
        imp.values[out] = _Value(imp.add(op, [x], n, params), view=("last",))
        return
    imp.values[out] = _Value(imp.add(Dense(int(w.shape[1]), "bias" in params), [x], n, params))


def _add(imp: _Importer, n: Any) -> None:
    imp.values[n.output[0]] = _Value(imp.add(Add(), [imp.flat(i) for i in n.input], n))


def _concat(imp: _Importer, n: Any) -> None:
    xs = [imp.flat(i) for i in n.input]
    axis = _attrs(n)["axis"]
    if axis % (1 + len(imp.shapes[xs[0]])) != 1:
        raise _Unsupported(f"axis {axis} (hal concatenates channels, axis 1)")
    imp.values[n.output[0]] = _Value(imp.add(Concat(), xs, n))


def _mul(imp: _Importer, n: Any) -> None:
    """A product of tensors (hal Mul; to_onnx's chain ``n/mul1``, ..., ``n`` is one n-ary Mul), or of a
    tensor and a per-channel constant ``(C, 1, ...)`` (hal Scale)."""
    consts = [i for i in n.input if i in imp.consts]
    if consts:
        x = imp.flat(next(i for i in n.input if i not in imp.consts))
        scale = imp.consts[consts[0]]
        if scale.shape != (imp.shapes[x][0], *[1] * (len(imp.shapes[x]) - 1)):
            raise _Unsupported(f"a product with a constant of shape {scale.shape}; hal's Scale takes (C, 1, ...)")
        imp.values[n.output[0]] = _Value(imp.add(Scale(), [x], n, {"layer_scale": scale}))
        return
    xs: list[str] = []
    for i in n.input:
        x = imp.flat(i)
        inner = imp.by_name.get(x)
        step = imp.producers.get(i)
        chained = step is not None and step.op_type == "Mul" and step.name.startswith(f"{n.name}/mul")
        xs += list(inner.inputs) if chained and inner is not None and isinstance(inner.op, Mul) else [x]
    imp.values[n.output[0]] = _Value(imp.add(Mul(), xs, n))


def _prelu(imp: _Importer, n: Any) -> None:
    x = imp.flat(n.input[0])
    slope = imp.const(n.input[1], "slope")
    if slope.size not in (1, imp.shapes[x][0]) or slope.size > 1 and slope.reshape(-1).shape[0] != slope.shape[0]:
        raise _Unsupported(f"a slope of shape {slope.shape}; hal's PReLU has one slope or one per channel")
    imp.values[n.output[0]] = _Value(imp.add(PReLU(slope.size), [x], n, {"weight": slope.reshape(-1)}))


def _normalization(imp: _Importer, n: Any) -> None:
    """InstanceNormalization (a GroupNorm on a ``(N, G, rest)`` view), and LayerNormalization over
    the last axis of a (batch, features) or channels-last tensor."""
    a = _attrs(n)
    val = imp.value(n.input[0])
    if val.view[:1] == ("groups",) and n.op_type == "InstanceNormalization":
        _group_norm(imp, n, val)
        return
    last = val.view == ("last",) and n.op_type == "LayerNormalization"
    x = val.node if last else imp.flat(n.input[0])
    rank = 1 + len(imp.shapes[x])
    if n.op_type == "LayerNormalization" and (rank != 2 and not last or a.get("axis", -1) not in (-1, rank - 1)):
        raise _Unsupported("a layer norm over more than the channels (hal's LayerNorm normalises channels)")
    scale = imp.const(n.input[1], "scale")
    bias = imp.const(n.input[2], "bias") if len(n.input) > 2 and n.input[2] else np.zeros_like(scale)
    learned = n.input[1].endswith(".weight") or not (np.all(scale == 1) and np.all(bias == 0))
    cls = InstanceNorm if n.op_type == "InstanceNormalization" else LayerNorm
    params = {"weight": scale, "bias": bias} if learned else {}
    op = cls(eps=_float(a.get("epsilon", 1e-5)), affine=learned)
    imp.values[n.output[0]] = _Value(imp.add(op, [x], n, params), view=val.view if last else ())


def _group_norm(imp: _Importer, n: Any, val: _Value) -> None:
    """torch's group norm: InstanceNormalization (scale 1, bias 0) of the ``(N, G, rest)`` view, then
    (read from the graph here) the reshape back and, when affine, a Mul and an Add of ``(C, 1, ...)``
    constants, which become the GroupNorm's weight and bias."""
    groups = val.view[1]
    scale, bias = (imp.const(i, "scale") if i else np.zeros(groups) for i in [*n.input[1:3], ""][:2])
    if not (np.all(scale == 1) and np.all(bias == 0)):
        raise _Unsupported("an instance norm of channel groups with a learned scale or bias (hal's GroupNorm "
                           "has per-channel ones, after the reshape back)")
    shape = imp.shapes[val.node]
    per_channel = (shape[0], *[1] * (len(shape) - 1))
    params, steps = {}, [n]
    for op_type, param in (("Reshape", ""), ("Mul", "weight"), ("Add", "bias")):
        out = steps[-1].output[0]
        users = [u for u in imp.consumers.get(out, []) if u.op_type != "CastLike" or u.input[0] == out]  # not types
        if len(users) != 1 or users[0].op_type != op_type:
            break
        if param:
            consts = [imp.fold(i) for i in users[0].input if i != out]
            if len(consts) != 1 or consts[0] is None or consts[0].shape not in (per_channel, shape[:1]):
                break
            params[param] = consts[0].reshape(-1)
        steps.append(users[0])
    if len(params) != 2:  # the product alone would be a Scale: keep them apart
        params, steps = {}, steps[:2]
    op = GroupNorm(groups, eps=_float(_attrs(n).get("epsilon", 1e-5)), affine=bool(params))
    node = imp.add(op, [val.node], n, params)
    imp.values[n.output[0]] = _Value(node, view=("normed", groups))
    for step in steps[2:]:
        imp.done.add(step.output[0])
        imp.values[step.output[0]] = _Value(node)


def _group_normalization(imp: _Importer, n: Any) -> None:
    """ONNX's GroupNormalization from opset 21 (per-channel scale and bias)."""
    a = _attrs(n)
    x = imp.flat(n.input[0])
    scale, bias = imp.const(n.input[1], "scale"), imp.const(n.input[2], "bias")
    if imp.opset < 21 or scale.size != imp.shapes[x][0]:
        raise _Unsupported(f"opset {imp.opset} with scale of shape {scale.shape}: hal's GroupNorm is the opset-21 "
                           "form, with a scale and bias per channel")
    op = GroupNorm(int(a["num_groups"]), eps=_float(a.get("epsilon", 1e-5)), affine=True)
    imp.values[n.output[0]] = _Value(imp.add(op, [x], n, {"weight": scale, "bias": bias}))


def _split(imp: _Importer, n: Any) -> None:
    """A split of channels (torch's chunk and split): a ChannelSlice per output; SplitToSequence
    (the dynamo exporter unoptimised) gives a sequence of them, read by SequenceAt."""
    a = _attrs(n)
    x = imp.flat(n.input[0])
    c = imp.shapes[x][0]
    if a.get("axis", 0) % (1 + len(imp.shapes[x])) != 1:
        raise _Unsupported(f"axis {a.get('axis', 0)} (hal slices channels, axis 1)")
    split = [int(v) for v in imp.const(n.input[1], "split").reshape(-1)] if len(n.input) > 1 and n.input[1] else []
    if n.op_type == "SplitToSequence":
        if not split:
            raise _Unsupported("no split sizes (a sequence of single channels)")
        k = len(split) if len(split) > 1 else -(-c // split[0])
    else:
        split = split or list(a.get("split", []))
        k = len(n.output)
    if len(split) <= 1:  # equal parts, the last smaller (ONNX's num_outputs, a SplitToSequence's scalar size)
        step = split[0] if split else -(-c // a.get("num_outputs", k))
        split = [min(step, c - i * step) for i in range(k)]
    if sum(split) != c or len(split) != k or min(split) < 1:
        raise _Unsupported(f"sizes {split} do not split {c} channels into {k} parts")
    bounds = np.cumsum([0, *split]).tolist()
    slices = [imp.add(ChannelSlice(lo, hi), [x], n) for lo, hi in zip(bounds, bounds[1:])]
    if n.op_type == "SplitToSequence":
        imp.sequences[n.output[0]] = slices
    else:
        imp.values.update((out, _Value(s)) for out, s in zip(n.output, slices))


def _sequence_at(imp: _Importer, n: Any) -> None:
    if n.input[0] not in imp.sequences:
        raise _Unsupported(f"input {n.input[0]!r} is not a split of channels")
    slices = imp.sequences[n.input[0]]
    i = int(imp.const(n.input[1], "position"))
    if not -len(slices) <= i < len(slices):
        raise _Unsupported(f"position {i} of a sequence of {len(slices)}")
    imp.values[n.output[0]] = _Value(slices[i])


def _conv_transpose(imp: _Importer, n: Any) -> None:
    a = _attrs(n)
    x = imp.flat(n.input[0])
    w = imp.const(n.input[1], "weight")
    kernel = tuple(a.get("kernel_shape", w.shape[2:]))
    nd = len(kernel)
    stride = tuple(a.get("strides", [1] * nd))
    dilation = tuple(a.get("dilations", [1] * nd))
    out_pad = tuple(a.get("output_padding", [0] * nd))
    auto = a.get("auto_pad", "NOTSET")
    full = [(s - 1) * st + q + (k - 1) * d + 1 for s, st, q, k, d in zip(imp.shapes[x][1:], stride, out_pad, kernel,
                                                                           dilation)]
    if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):
        want = list(a["output_shape"])[-nd:] if "output_shape" in a else [s * st for s, st in
                                                                          zip(imp.shapes[x][1:], stride)]
        total = [f - o for f, o in zip(full, want)]
        if min(total) < 0:
            raise _Unsupported(f"output_shape {want} is larger than the full output {full}")
        padding = tuple((t // 2, t - t // 2) if auto == "SAME_UPPER" else (t - t // 2, t // 2) for t in total)
    elif auto == "VALID":
        padding = ((0, 0),) * nd
    else:
        p = list(a.get("pads", [0] * 2 * nd))
        padding = tuple(zip(p[:nd], p[nd:]))
    groups = int(a.get("group", 1))
    params = {"weight": w}
    if len(n.input) > 2 and n.input[2]:
        params["bias"] = imp.const(n.input[2], "bias")
    op = ConvTranspose(int(w.shape[1]) * groups, kernel, stride, padding, out_pad, dilation, groups, "bias" in params)
    imp.values[n.output[0]] = _Value(imp.add(op, [x], n, params))


def _resize(imp: _Importer, n: Any) -> None:
    """Resize as torch writes ``F.interpolate``: nearest with asymmetric coordinates and floor
    (torch's "nearest"), linear with half_pixel (or pytorch_half_pixel) or align_corners
    coordinates; by ``scales`` (hal's ``scale``) or ``sizes``."""
    a = _attrs(n)
    x = imp.flat(n.input[0])
    shape = imp.shapes[x]
    mode, coords = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
    nearest = (coords, a.get("nearest_mode", "round_prefer_floor")) == ("asymmetric", "floor")
    if mode == "nearest" and nearest:
        align = False
    elif mode == "linear" and coords in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        align = coords == "align_corners"
    else:
        rounding = f" and nearest_mode {a.get('nearest_mode', 'round_prefer_floor')!r}" if mode == "nearest" else ""
        raise _Unsupported(f"mode {mode!r} with coordinate_transformation_mode {coords!r}{rounding}: hal's Upsample "
                           "is torch's nearest (asymmetric, floor) or linear (half_pixel, pytorch_half_pixel or "
                           "align_corners)")
    if a.get("antialias", 0) or a.get("axes") is not None:
        raise _Unsupported("antialias or axes (hal resizes every spatial dim, without antialiasing)")
    scales = [float(v) for v in imp.const(n.input[2], "scales")] if len(n.input) > 2 and n.input[2] else []
    sizes = [int(v) for v in imp.const(n.input[3], "sizes")] if len(n.input) > 3 and n.input[3] else []
    if scales:
        if scales[:2] != [1.0, 1.0] or len(scales) != 1 + len(shape):
            raise _Unsupported(f"scales {scales}: hal scales the spatial dims only")
        scale = tuple(_float(f) for f in scales[2:])
        size = tuple(math.floor(s * f) for s, f in zip(shape[1:], scales[2:]))
    elif sizes:
        if sizes[1] != shape[0] or len(sizes) != 1 + len(shape) or imp.batch and sizes[0] != imp.batch:
            raise _Unsupported(f"sizes {sizes}: hal resizes the spatial dims only")
        if a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise _Unsupported(f"keep_aspect_ratio_policy {a['keep_aspect_ratio_policy']!r} (hal stretches)")
        scale, size = (), tuple(sizes[2:])
    else:
        raise _Unsupported("neither scales nor sizes given")
    if coords == "pytorch_half_pixel" and any(o == 1 < s for o, s in zip(size, shape[1:])):
        raise _Unsupported("pytorch_half_pixel to an output size of 1 (it samples 0, torch's linear does not)")
    op = Upsample(size, scale, "linear" if mode == "linear" else "nearest", align)
    imp.values[n.output[0]] = _Value(imp.add(op, [x], n))


def _slice(imp: _Importer, n: Any) -> None:
    """A slice of channels (axis 1, step 1): hal's ChannelSlice."""
    x = imp.flat(n.input[0])
    starts, ends, axes, steps = ([int(v) for v in imp.const(i, "slice bound").reshape(-1)] if i else None
                                 for i in [*n.input[1:5], *[""] * (5 - len(n.input))])
    rank, c = 1 + len(imp.shapes[x]), imp.shapes[x][0]
    if axes is None or len(axes) != 1 or axes[0] % rank != 1 or (steps or [1]) != [1]:
        raise _Unsupported("a slice other than of channels with step 1 (hal has ChannelSlice)")
    start, stop = (min(max(v + c if v < 0 else v, 0), c) for v in (starts[0], ends[0]))  # type: ignore[index]
    imp.values[n.output[0]] = _Value(imp.add(ChannelSlice(start, stop), [x], n))


def _pad(imp: _Importer, n: Any) -> None:
    a = _attrs(n)
    x = imp.flat(n.input[0])
    rank = 1 + len(imp.shapes[x])
    pads = [int(v) for v in (imp.const(n.input[1], "pads") if len(n.input) > 1 else a["pads"])]
    if len(n.input) > 3 and n.input[3]:
        raise _Unsupported("an axes input (hal pads every spatial dim)")
    if any(pads[i] or pads[rank + i] for i in (0, 1)) or min(pads) < 0:
        raise _Unsupported(f"pads {pads}: hal pads spatial dims only, by >= 0")
    value = float(imp.const(n.input[2], "constant_value")) if len(n.input) > 2 and n.input[2] else a.get("value", 0.0)
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}
    if a.get("mode", "constant") not in modes:
        raise _Unsupported(f"mode {a['mode']!r}")
    op = Pad(tuple(zip(pads[2:rank], pads[rank + 2:])), modes[a.get("mode", "constant")], _float(value))
    imp.values[n.output[0]] = _Value(imp.add(op, [x], n))


def _dropout(imp: _Importer, n: Any) -> None:
    rate = _attrs(n).get("ratio", 0.5)
    if len(n.input) > 1 and n.input[1]:
        rate = float(imp.const(n.input[1], "ratio"))
    if len(n.input) > 2 and n.input[2] and bool(imp.const(n.input[2], "training_mode")):
        raise _Unsupported("training_mode=True (hal imports the inference form)")
    imp.values[n.output[0]] = _Value(imp.add(Dropout(_float(rate)), [imp.flat(n.input[0])], n))


def _activation_op(imp: _Importer, n: Any) -> None:
    """An activation op whose input is not a chain of one value (reached only for odd graphs)."""
    op = _direct_activation(n, [])
    if op is None:
        raise _Unsupported("elementwise arithmetic hal has no op for (it has Add of tensors and activations)")
    imp.values[n.output[0]] = _Value(imp.add(op, [imp.flat(n.input[0])], n))


_HANDLERS = {
    "Conv": _conv, "BatchNormalization": _batchnorm, "MaxPool": _pool, "AveragePool": _pool,
    "GlobalAveragePool": _global_pool, "ReduceMean": _reduce_mean, "Flatten": _flatten, "Reshape": _reshape,
    "Squeeze": _squeeze, "Gemm": _dense, "MatMul": _matmul, "Add": _add, "Sum": _add, "Concat": _concat,
    "Dropout": _dropout, "Slice": _slice, "Pad": _pad, "PRelu": _prelu, "InstanceNormalization": _normalization,
    "LayerNormalization": _normalization, "GroupNormalization": _group_normalization, "Split": _split,
    "SplitToSequence": _split, "SequenceAt": _sequence_at, "Transpose": _transpose, "ConvTranspose": _conv_transpose,
    "Resize": _resize, "Gather": _gather, **{k: _activation_op for k in _ELEMENTWISE if k not in ("Add", "Mul")},
    "Mul": _mul,
}


def from_onnx(source: "str | os.PathLike | bytes | onnx.ModelProto") -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """The spec and weights of an ONNX model (a path, serialized bytes or a ``ModelProto``).

    The spec is rebuilt from the graph: Conv, ConvTranspose, BatchNormalization,
    InstanceNormalization, GroupNormalization (opset 21), the activation ops (and chains of
    elementwise ops, matched by value against hal's activations: torch's silu, pre-opset-20 gelu,
    mish), PRelu, MaxPool, AveragePool, GlobalAveragePool/ReduceMean (an AdaptiveAvgPool to 1
    where the kept 1s are read), Pad, Flatten/Reshape/Squeeze to (batch, features), Gemm and
    MatMul+Add, Add/Sum, Mul, Concat, Slice and Split/SplitToSequence of channels, Resize as
    torch's nearest and (bi/tri)linear interpolation, Dropout; and the forms
    ``torch.onnx.export`` writes for ConvNeXt's channels-last blocks (Transpose, then
    LayerNormalization over the last axis and MatMul as 1x1 Conv, Transpose back), group norm
    (Reshape, InstanceNormalization, Reshape, Mul, Add), channel shuffle (Reshape, Transpose,
    Reshape) and ``as_strided`` to a tensor's own shape. Identity, Constant and constant
    shape arithmetic are folded. (The multi-node forms ``to_onnx`` writes for ChannelShuffle,
    Upsample and uneven adaptive pools come back through the metadata, not from the graph.)
    Node names come from the weights' names (``layer1.0.conv1.weight``), else the module path
    the exporter recorded, else the ONNX node name. When the model was
    written by :func:`to_onnx` and its graph is exactly what ``to_onnx`` writes for the
    ``hal.spec`` metadata, that spec is returned (exact floats, names and all) with the
    weights bit for bit; metadata that does not describe the graph (an edited model) is
    ignored with a warning: the graph is what computes.

    Raises :class:`~hal.errors.UnsupportedError` listing every node hal cannot express.
    """
    onnx = _onnx()
    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        try:
            model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(os.fspath(source))
        except (OSError, TypeError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
            raise ConfigError(f"from_onnx: cannot read an ONNX model from {source!r:.200}: {exc}") from None
        except Exception as exc:  # protobuf's DecodeError: not an ONNX file
            raise ConfigError(f"from_onnx: {source!r:.200} is not an ONNX model: {exc}") from None
    stored = _stored(model)
    if stored is not None:
        return stored
    if any(p.key == SPEC_KEY for p in model.metadata_props):
        warnings.warn(f"from_onnx: the model's {SPEC_KEY} metadata does not describe its graph (edited after "
                      "export?); the spec is rebuilt from the graph", stacklevel=2)
    return _Importer(model).run()


def _stored(model: Any) -> tuple[ModelSpec, dict[str, np.ndarray]] | None:
    """The spec in the metadata and the weights, when the graph is exactly what :func:`to_onnx`
    writes for them (so nothing was edited); else None."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        spec = ModelSpec.from_json(meta.get(SPEC_KEY, ""))
    except SpecError:
        return None
    inits = {t.name: t for t in model.graph.initializer}
    shapes = spec.param_shapes()
    if meta.get(HASH_KEY) != spec.hash or any(k not in inits for k in shapes) or len(model.graph.input) != 1:
        return None
    numpy_helper = _onnx().numpy_helper
    weights = {k: np.array(numpy_helper.to_array(inits[k]).reshape(s)) for k, s in shapes.items()}  # writable
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    try:
        again = _build(spec, weights, opset, dim.dim_param if dim.HasField("dim_param") else dim.dim_value)
    except (HalError, ValueError):
        return None
    return (spec, weights) if again.graph == model.graph else None
