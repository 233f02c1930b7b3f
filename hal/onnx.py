"""ONNX export and import: :func:`to_onnx` writes a spec and its weights as an ONNX model,
:func:`from_onnx` reads one back (or a CNN exported by ``torch.onnx.export``).

Export is the inference form (BatchNormalization with running statistics), built with
``onnx.helper``, in the default domain at opset ``DEFAULT_OPSET`` (17: every op here has
had its current form since opset 13, and opset 17 is what most execution providers
support). Any opset from ``MIN_OPSET`` (13) up to the newest the installed ``onnx`` knows
is accepted; at opset 20 and above gelu is ONNX's ``Gelu`` op, below it is the erf or
tanh formula. The model passes ``onnx.checker.check_model(full_check=True)``.

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

import math
import os
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from hal.errors import ConfigError, UnsupportedError
from hal.spec import (
    Activation,
    Add,
    AvgPool,
    BatchNorm,
    Concat,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    Input,
    MaxPool,
    ModelSpec,
    Node,
)
from hal.weights import atomic_write, check_weights, init_weights

if TYPE_CHECKING:
    import onnx

DEFAULT_OPSET = 17
MIN_OPSET = 13
GELU_OPSET = 20  # first opset with a Gelu op
SPEC_KEY, HASH_KEY = "hal.spec", "hal.spec_hash"
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

    def node(self, op_type: str, inputs: list[str], output: str, name: str | None = None, **attrs: Any) -> str:
        """Add a node computing the value ``output``; it is called ``name`` (default: ``output``)."""
        self.nodes.append(self.helper.make_node(op_type, inputs, [output], name=name or output, **attrs))
        return output

    def tensor(self, name: str, value: Any) -> str:
        """Add an initializer (in the model's dtype) and return its name."""
        arr = np.asarray(value, dtype=self.dtype)
        self.initializers.append(_onnx().numpy_helper.from_array(arr, name))
        return name


def _pads(padding: tuple[tuple[int, int], ...]) -> list[int]:
    """ONNX ``pads``: every dim's begin, then every dim's end."""
    return [b for b, _ in padding] + [a for _, a in padding]


def _activation(g: _Graph, n: Node, x: str) -> None:
    op: Activation = n.op  # type: ignore[assignment]
    simple = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
    if op.fn in simple:
        g.node(simple[op.fn], [x], n.name)
    elif op.fn == "leaky_relu":
        g.node("LeakyRelu", [x], n.name, alpha=op.alpha)
    elif op.fn == "silu":
        g.node("Mul", [x, g.node("Sigmoid", [x], f"{n.name}/sigmoid")], n.name)
    elif g.opset >= GELU_OPSET:
        g.node("Gelu", [x], n.name, approximate=op.approximate)
    else:  # 0.5 x (1 + erf(x / sqrt 2)) or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        c = f"{n.name}/"
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


def _export_node(g: _Graph, spec: ModelSpec, n: Node, w: Mapping[str, np.ndarray], value: Mapping[str, str]) -> None:
    """Append the ONNX node(s) computing hal node ``n``."""
    op, xs = n.op, [value[i] for i in n.inputs]
    ins = spec.in_shapes(n)
    p = {k: g.tensor(f"{n.name}.{k}", w[f"{n.name}.{k}"]) for k in (*op.params(ins), *op.buffers(ins))}
    if isinstance(op, Conv):
        ins = [xs[0], p["weight"]] + ([p["bias"]] if op.bias else [])
        g.node("Conv", ins, n.name, kernel_shape=list(op.kernel), strides=list(op.stride), pads=_pads(op.padding),
               dilations=list(op.dilation), group=op.groups)
    elif isinstance(op, BatchNorm):
        ins = [xs[0], p["weight"], p["bias"], p["running_mean"], p["running_var"]]
        g.node("BatchNormalization", ins, n.name, epsilon=op.eps, momentum=1.0 - op.momentum)
    elif isinstance(op, Activation):
        _activation(g, n, xs[0])
    elif isinstance(op, MaxPool):
        g.node("MaxPool", xs, n.name, kernel_shape=list(op.kernel), strides=list(op.stride), pads=_pads(op.padding))
    elif isinstance(op, AvgPool):
        g.node("AveragePool", xs, n.name, kernel_shape=list(op.kernel), strides=list(op.stride),
               pads=_pads(op.padding), count_include_pad=int(op.count_include_pad))
    elif isinstance(op, GlobalAvgPool):  # (N, C, 1, ...) then (N, C)
        pooled = g.node("GlobalAveragePool", xs, f"{n.name}/keepdims", name=n.name)
        g.node("Flatten", [pooled], n.name, name=f"{n.name}/flatten", axis=1)
    elif isinstance(op, Add):
        g.node("Add" if len(xs) == 2 else "Sum", xs, n.name)
    elif isinstance(op, Concat):
        g.node("Concat", xs, n.name, axis=1)
    elif isinstance(op, Flatten):
        g.node("Flatten", xs, n.name, axis=1)
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
    opset or an unwritable path.
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
    w = check_weights(spec, weights) if weights is not None else init_weights(spec, seed)

    g = _Graph(np.dtype(spec.dtype), opset)
    value = {spec.input.name: spec.input.name}
    for n in spec.nodes[1:]:
        _export_node(g, spec, n, w, value)
        value[n.name] = n.name
    elem = getattr(onnx.TensorProto, _TENSOR_TYPES[spec.dtype])
    n_dim: str | int = "batch" if dynamic_batch else batch
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
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        try:
            atomic_write(path, model.SerializeToString())
        except OSError as exc:
            raise ConfigError(f"cannot write the ONNX model to {os.fspath(path)!r}: {exc.strerror or exc}") from exc
    return model


def _version() -> str:
    from hal import __version__

    return __version__
