"""``hal.from_torch``: a PyTorch ``nn.Module`` as a hal spec and weights, through ``torch.fx``.

The module is traced symbolically (``torch.nn`` layers and torchvision's
``StochasticDepth`` stay whole), run once on a zero batch to learn every value's
shape, and each call of the graph becomes a spec op:

================================================  =============================================
PyTorch                                           hal.spec
================================================  =============================================
``nn.Conv1d/2d/3d`` (padding mode zeros,          Conv (a Pad before it for the other modes)
reflect, replicate; ``"same"``)
``nn.ConvTranspose1d/2d/3d``                      ConvTranspose (output_padding as torch computed it)
``nn.BatchNorm1d/2d/3d`` (affine, running stats)  BatchNorm
``nn.LayerNorm(C)``, ``F.layer_norm`` over the    LayerNorm; a channels-last region between two
channel axis                                      permutes (ConvNeXt's LayerNorm2d) is followed
``nn.GroupNorm``, ``nn.InstanceNorm*d``           GroupNorm, InstanceNorm
ReLU, ReLU6, LeakyReLU, ELU, Sigmoid, Tanh,       Activation (modules, ``F.*``, ``torch.*`` and
Hardsigmoid, Hardswish, GELU, SiLU, Mish,         tensor methods alike)
Softplus; ``nn.PReLU``                            PReLU
``nn.MaxPool*d``, ``nn.AvgPool*d``, ``F.*pool*``  MaxPool, AvgPool (``ceil_mode`` included)
``nn.AdaptiveAvg/MaxPool*d``, ``F.adaptive_*``    AdaptiveAvgPool, AdaptiveMaxPool
``x.mean(spatial dims)``                          GlobalAvgPool (AdaptiveAvgPool to 1 with keepdim)
``F.pad``, ``nn.ZeroPad/ConstantPad/Reflection    Pad
Pad/ReplicationPad*d``
``+``, ``torch.add``; ``*``, ``torch.mul``        Add, Mul (tensors of equal rank, broadcasting)
``layer_scale * x`` (a parameter ``(C, 1, ..)``)  Scale, on the owner module's path
``torch.cat(dim=1)``; ``x.chunk``/``split``/      Concat; ChannelSlice
``x[:, a:b]`` on channels
``nn.ChannelShuffle``; view-transpose-view        ChannelShuffle
``torch.flatten``, ``x.flatten(1)``, ``x.view(N,  Flatten
-1)``, ``nn.Flatten``
``nn.Linear`` over channels (also channels-last)  Dense
``nn.Upsample``, ``F.interpolate`` (nearest,     Upsample
(bi/tri)linear, by scale or to a size)
``nn.Dropout``, ``F.dropout``                     Dropout
torchvision's ``StochasticDepth``                 StochasticDepth
``nn.Identity``, ``contiguous``, ``clone``,       folded away
dropout at p=0, ``F.dropout(training=False)``,
``StochasticDepth(p=0)``, no-op reshapes and
flattens, ``x.size()``/``x.shape`` bookkeeping
================================================  =============================================

Nodes are named after module paths (a parameterless module called twice gets
``<path>_1``; a function call is ``<enclosing module path>.<function>``), so the
weights are the module's own ``state_dict`` entries under their own names.

The graph is traced in training mode, so that functional dropout written as
``F.dropout(x, p, training=self.training)`` keeps its meaning in both of the spec's
modes; the shape run is in eval mode without gradients, and every submodule's mode
is restored afterwards. Whatever cannot be mapped is reported in one
:class:`~hal.errors.UnsupportedError` listing every such call with its module path or
function and its source line.
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from hal.errors import InputError, SpecError, UnsupportedError, show
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
    Op,
    Pad,
    PReLU,
    Scale,
    SpecBuilder,
    StochasticDepth,
    Upsample,
)
from hal.weights import from_state_dict

if TYPE_CHECKING:
    import torch
    from torch import fx

__all__ = ["from_torch"]

_LEAVES = ("torchvision.ops.stochastic_depth.StochasticDepth",)  # kept whole besides torch.nn's own layers
_DTYPES = {"torch.float32": "float32", "torch.float64": "float64", "torch.float16": "float16",
           "torch.bfloat16": "bfloat16"}


def from_torch(module: "torch.nn.Module", input_shape: Sequence[int] = (3, 224, 224),
               name: str | None = None) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """The spec and weights of ``module`` for inputs of per-sample shape ``input_shape``
    ``(C, *spatial)``; ``name`` defaults to the module's class name.

    Raises :class:`~hal.errors.UnsupportedError` listing every call hal cannot map
    (module path or function, source line, reason), :class:`~hal.errors.InputError`
    for a bad argument or a module that fails on such an input.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise InputError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}")
    shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else ()
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise InputError(f"input_shape must be (C, *spatial) positive ints, got {show(input_shape)}")
    if name is not None and not isinstance(name, str):
        raise InputError(f"name must be a string, got {show(name)}")
    name = type(module).__name__ if name is None else name
    params = [p for p in module.parameters()] + [b for b in module.buffers() if b.is_floating_point()]
    dtype = params[0].dtype if params else torch.get_default_dtype()
    if str(dtype) not in _DTYPES:
        raise InputError(f"module {name!r} holds {dtype} tensors; hal imports {', '.join(_DTYPES)} models")
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.train()
        gm = _trace(module, name)
        module.eval()
        env = _run(gm, torch.zeros((2, *shape), dtype=dtype), name)
    finally:
        for m, training in modes:
            m.training = training
    spec = _Importer(gm, env, name, _DTYPES[str(dtype)]).build()
    state = module.state_dict()
    return spec, from_state_dict(spec, {k: state[k] for k in spec.param_shapes()})


def _trace(module: "torch.nn.Module", name: str) -> "fx.GraphModule":
    from torch import fx

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: "torch.nn.Module", qualname: str) -> bool:
            cls = type(m)
            return f"{cls.__module__}.{cls.__qualname__}" in _LEAVES or super().is_leaf_module(m, qualname)

    tracer = Tracer()
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # TraceError, or control flow on a traced value (TypeError/RuntimeError)
        raise UnsupportedError(f"torch.fx cannot trace {name!r}: {type(exc).__name__}: {exc}") from None
    return fx.GraphModule(tracer.root, graph, name)


def _run(gm: "fx.GraphModule", x: "torch.Tensor", name: str) -> dict["fx.Node", Any]:
    """Every node's value on ``x`` (a batch of 2: the batch axis is told from the others)."""
    import torch
    from torch import fx

    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    try:
        with torch.no_grad():
            interpreter.run(x)
    except Exception as exc:  # the user's module failing on this input shape
        raise InputError(f"{name!r} fails on an input of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}") from None
    return interpreter.env


# ---------------------------------------------------------------------------
# the values of the graph, as hal sees them
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _T:
    """A tensor of the graph: spec node ``name`` whose axes are permuted by ``perm``
    (graph axis ``i`` is spec axis ``perm[i]``; the batch stays axis 0)."""

    name: str
    perm: tuple[int, ...]

    @property
    def channels_first(self) -> bool:
        return self.perm == tuple(range(len(self.perm)))


@dataclass(frozen=True)
class _Split:
    """``x.chunk``/``x.split`` on channels: part ``i`` is channels ``bounds[i]`` of ``source``."""

    source: _T
    bounds: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Grouped:
    """The channels of ``source`` viewed as ``(groups, C / groups)`` (``swapped``: transposed), the
    first steps of a channel shuffle."""

    source: _T
    groups: int
    swapped: bool = False


class _Unmappable(Exception):
    """A call hal has no op for; the message says why."""


class _Importer:
    def __init__(self, gm: "fx.GraphModule", env: Mapping["fx.Node", Any], name: str, dtype: str) -> None:
        import torch

        self.torch = torch
        self.gm, self.env, self.name, self.dtype = gm, env, name, dtype
        self.b = SpecBuilder(name)
        self.out: dict["fx.Node", Any] = {}  # _T, _Split or _Grouped
        self.lost: set["fx.Node"] = set()  # nodes downstream of an unmappable call with no stand-in
        self.problems: list[str] = []
        self.stand_ins = 0
        self.reserved = {p for p, _ in gm.named_modules()}
        self.taken: set[str] = set()
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}

    # -- the walk ----------------------------------------------------------------

    def build(self) -> ModelSpec:
        graph = self.gm.graph
        output = next(n for n in graph.nodes if n.op == "output")
        live = _ancestors(output)
        for node in graph.nodes:
            if node in live and node.op not in ("output", "get_attr"):
                self._visit(node)
        result = output.args[0]
        if self.problems:
            lines = "\n".join(f"  {p}" for p in self.problems)
            raise UnsupportedError(f"cannot import {self.name!r}: {len(self.problems)} "
                                   f"call{'s' if len(self.problems) > 1 else ''} hal cannot map:\n{lines}")
        from torch import fx

        value = self.out.get(result) if isinstance(result, fx.Node) else None
        if not isinstance(value, _T) or not value.channels_first:
            raise UnsupportedError(f"cannot import {self.name!r}: its forward must return one tensor in "
                                   f"channels-first layout, it returns {show(result)}")
        return self.b.build(value.name)

    def _visit(self, node: "fx.Node") -> None:
        value = self.env[node]
        tensor = isinstance(value, self.torch.Tensor)
        if node.op == "placeholder":
            if any(n.op == "placeholder" for n in self.out) or not tensor:
                self._fail(node, "the forward takes more than one tensor input; hal models take one")
                return
            self.out[node] = self._emit(Input(tuple(value.shape[1:]), self.dtype), [], self._unique("input"))
            return
        if any(i in self.lost for i in node.all_input_nodes):
            self._stand_in(node, value)
            return
        if not tensor and not _holds_tensor(value):
            return  # x.size(), x.shape[2], arithmetic on sizes: bookkeeping, read when a call needs it
        try:
            mapped = self._map(node)
        except _Unmappable as exc:
            self._fail(node, str(exc))
            return
        except SpecError as exc:
            self._fail(node, f"hal refuses it: {exc}")
            return
        self.out[node] = mapped

    def _fail(self, node: "fx.Node", reason: str) -> None:
        self.problems.append(f"{_what(node, self.gm)}{_where(node)}: {reason}")
        self._stand_in(node, self.env[node])

    def _stand_in(self, node: "fx.Node", value: Any) -> None:
        """Downstream of a call that failed, a stand-in input of the right shape keeps the walk
        going, so every unmappable call is found in one pass."""
        if isinstance(value, self.torch.Tensor) and value.dim() >= 2:
            self.stand_ins += 1
            like = [x.perm for x in map(self.out.get, node.all_input_nodes)
                    if isinstance(x, _T) and len(x.perm) == value.dim()]
            perm = like[0] if like else tuple(range(value.dim()))  # the layout its input had
            shape = [0] * value.dim()
            for axis, size in zip(perm, value.shape):
                shape[axis] = size
            t = self._emit(Input(tuple(shape[1:]), self.dtype), [], self._unique(f"unmapped_{self.stand_ins}"))
            self.out[node] = _T(t.name, perm)
        else:
            self.lost.add(node)

    # -- dispatch -----------------------------------------------------------------

    def _map(self, node: "fx.Node") -> Any:
        self._check_inplace(node)
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            handler = _module_table().get(type(mod))
            if handler is None:
                raise _Unmappable(f"hal has no op for {_qualname(type(mod))}")
            if node.target in self.taken and any(True for _ in mod.parameters(recurse=False)):
                raise _Unmappable("a module with parameters called twice (shared weights) is not in the spec")
            return handler(self, node, functools.partial(_attr, mod), node.args[0])
        if node.op == "call_function":
            handler = _function_table().get(node.target)
            if handler is None:
                raise _Unmappable(f"hal has no op for {_what(node, self.gm)}")
            args = _normalized(node.target, node.args, node.kwargs)
            return handler(self, node, functools.partial(_kwarg, self, args), args.get("input", node.args[0]))
        if node.op == "call_method":
            handler = _method_table().get(node.target)
            if handler is None:
                raise _Unmappable(f"hal has no op for Tensor.{node.target}")
            fn = getattr(self.torch, node.target.rstrip("_"), None)
            args = _normalized(fn, node.args, node.kwargs) if fn is not None else {}
            return handler(self, node, functools.partial(_kwarg, self, args), node.args[0])
        raise _Unmappable(f"unexpected fx node {node.op}")

    def _check_inplace(self, node: "fx.Node") -> None:
        """An in-place call whose input is read again later cannot be imported: eager PyTorch
        reads the mutated value there, the traced graph the value before the call."""
        if node.op == "call_module":
            inplace = getattr(self.gm.get_submodule(node.target), "inplace", False) is True
        elif node.op == "call_function":
            inplace = node.kwargs.get("inplace") is True or node.target in _INPLACE_OPERATORS
        else:
            inplace = node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")
        src = node.args[0] if node.args else None
        if not inplace or not hasattr(src, "users"):
            return
        later = [u for u in src.users if u is not node and self.order[u] > self.order[node]
                 and isinstance(self.env.get(u), self.torch.Tensor)]
        if later:
            raise _Unmappable(f"it changes its input in place and {later[0].name!r} reads that input afterwards "
                              "(eager PyTorch would see the changed value): use the out-of-place form")

    # -- helpers for the handlers ---------------------------------------------------

    def t(self, arg: Any) -> _T:
        """The spec tensor behind a graph argument (a tensor computed from the input)."""
        from torch import fx

        value = self.out.get(arg) if isinstance(arg, fx.Node) else None
        if isinstance(value, _T):
            return value
        if isinstance(value, _Grouped):
            raise _Unmappable("a reshape splitting the channels into groups is only mapped as a channel shuffle "
                              "(view (N, g, C/g, ...), transpose(1, 2), view (N, C, ...))")
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            raise _Unmappable(f"it uses the tensor attribute {arg.target!r}: constants are not in the spec "
                              "(a learned per-channel scale must be called 'layer_scale')")
        raise _Unmappable(f"an operand is {show(self.value(arg))}, not a tensor computed from the input")

    def value(self, arg: Any) -> Any:
        """The concrete value of a graph argument (sizes, dims, scalars)."""
        from torch import fx

        return fx.node.map_arg(arg, lambda n: self.env[n])

    def shape(self, node: "fx.Node") -> tuple[int, ...]:
        """Per-sample shape of the node's value, in the graph's axis order."""
        return tuple(self.env[node].shape[1:])

    def shape_of(self, x: _T) -> tuple[int, ...]:
        """Per-sample shape of a spec tensor, in the spec's axis order."""
        return self.b.shape(x.name)

    def channels_first(self, x: _T, what: str) -> _T:
        if not x.channels_first:
            raise _Unmappable(f"{what} needs a channels-first input; this one is permuted by {x.perm}")
        return x

    def emit(self, node: "fx.Node", op: Op, inputs: Sequence[_T], name: str | None = None) -> _T:
        """A new spec node on ``inputs`` (all in one layout), named after ``node`` unless ``name``."""
        perms = {x.perm for x in inputs}
        if len(perms) > 1:
            raise _Unmappable(f"its inputs are in different layouts {sorted(perms)}")
        return self._emit(op, inputs, name or self._node_name(node))

    def _emit(self, op: Op, inputs: Sequence[_T], name: str) -> _T:
        out = self.b.op(op, [x.name for x in inputs], name)
        rank = len(self.b.shape(out)) + 1
        keep = inputs and len(inputs[0].perm) == rank  # elementwise ops keep their input's layout
        return _T(out, inputs[0].perm if keep else tuple(range(rank)))

    def _node_name(self, node: "fx.Node") -> str:
        if node.op == "call_module":
            return self._unique(node.target, own=True)
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else ""
        base = re.sub(r"_\d+$", "", node.name)
        return self._unique(f"{path}.{base}" if path else base)

    def owner_name(self, path: str) -> str:
        """The spec node that carries a parameter of the module at ``path`` under its own name."""
        if not path or path in self.taken:
            raise _Unmappable(f"the parameter owner {path or '(the root module)'!r} cannot name a node of its own")
        self.taken.add(path)
        return path

    def _unique(self, base: str, own: bool = False) -> str:
        name, k = base, 0
        while name in self.taken or (name in self.reserved and not (own and k == 0)):
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def _ancestors(output: "fx.Node") -> set["fx.Node"]:
    seen, stack = set(), [output]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _holds_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) or _holds_tensor(v) for v in value)


def _normalized(fn: Any, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments by parameter name (torch's schemas, or the Python signature)."""
    from torch.fx.operator_schemas import normalize_function

    pair = normalize_function(fn, tuple(args), dict(kwargs), normalize_to_only_use_kwargs=True) if fn else None
    return dict(pair.kwargs) if pair is not None else {}


_MISSING = object()


def _attr(mod: Any, key: str, default: Any = _MISSING) -> Any:
    value = getattr(mod, key, default)
    if value is _MISSING:
        raise _Unmappable(f"{type(mod).__name__} has no attribute {key!r}")
    return value


def _kwarg(imp: _Importer, args: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    if key in args:
        return imp.value(args[key])
    if default is _MISSING:
        raise _Unmappable(f"cannot read its argument {key!r}")
    return default


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _fn_name(fn: Any) -> str:
    """``torch.fft.fft``, ``torch.cat``, ``operator.add``: how the user wrote the function."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__name__", repr(fn))
    if module == "_operator":
        return f"operator.{name}"
    if module is None or module.startswith("torch._"):  # torch's builtins: torch.cat, torch._C._fft.fft_fft
        return f"torch.{name}"
    return f"{module}.{name}"


def _what(node: "fx.Node", gm: "fx.GraphModule") -> str:
    if node.op == "call_module":
        return f"{node.target} ({_qualname(type(gm.get_submodule(node.target)))})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function" and node.target is getattr:
        return f"Tensor.{node.args[1]}"
    if node.op == "call_function":
        return _fn_name(node.target)
    return f"{node.op} {node.name}"


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _where(node: "fx.Node") -> str:
    """`` at file:line in function`` of the user's code that made the call (fx's own frames skipped)."""
    import torch

    torch_dir = torch.__file__.rsplit("/", 1)[0] + "/"
    frames = [m for m in _FRAME.finditer(node.stack_trace or "") if not m[1].startswith(torch_dir)]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f[1]}:{f[2]} in {f[3]}"


_INPLACE_OPERATORS = frozenset({operator.iadd, operator.imul, operator.isub, operator.itruediv})

# ---------------------------------------------------------------------------
# the tables: module class / function / tensor method -> handler
# handler(importer, node, get, x) -> _T | _Split | _Grouped; get(key[, default]) reads an attribute
# ---------------------------------------------------------------------------

Handler = Callable[[_Importer, "fx.Node", Callable[..., Any], Any], Any]


def _fold(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    return imp.t(x)


def _activation(fn: str, **attrs: str | float) -> Handler:
    """Activation ``fn``; ``attrs`` maps a spec attribute to the torch attribute or argument that
    holds it (a string), or gives it (a number)."""

    def handler(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
        values = {k: get(v) if isinstance(v, str) else v for k, v in attrs.items()}
        return imp.emit(node, Activation(fn, **values), [imp.t(x)])

    return handler


def _hardtanh(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    lo, hi = get("min_val", -1.0), get("max_val", 1.0)
    if (lo, hi) != (0.0, 6.0):
        raise _Unmappable(f"hardtanh({lo}, {hi}): hal has relu6 = hardtanh(0, 6) only")
    return imp.emit(node, Activation("relu6"), [imp.t(x)])


def _prelu(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    return imp.emit(node, PReLU(get("num_parameters")), [imp.channels_first(imp.t(x), "PReLU")])


def _conv(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    x = imp.channels_first(imp.t(x), "a convolution")
    kernel, dilation = tuple(get("kernel_size")), tuple(get("dilation"))
    padding, mode = get("padding"), get("padding_mode")
    if padding == "same":  # stride 1 (torch's rule): total d (k - 1), the odd one after
        padding = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation))
    elif padding == "valid":
        padding = ((0, 0),) * len(kernel)
    else:
        padding = tuple((p, p) for p in padding)
    if mode != "zeros":
        if mode not in ("reflect", "replicate"):
            raise _Unmappable(f"padding_mode {mode!r}: hal pads with zeros, reflect or replicate")
        x = imp.emit(node, Pad(padding, mode), [x], imp._unique(f"{node.target}.pad"))
        padding = ((0, 0),) * len(kernel)
    op = Conv(get("out_channels"), kernel, tuple(get("stride")), padding, dilation, get("groups"),
              get("bias") is not None)
    return imp.emit(node, op, [x])


def _conv_transpose(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    """``nn.ConvTranspose*d``; ``output_padding`` read from the output torch computed (it may
    come from ``forward``'s ``output_size``)."""
    x = imp.channels_first(imp.t(x), "a transposed convolution")
    if get("padding_mode") != "zeros":
        raise _Unmappable(f"padding_mode {get('padding_mode')!r}: transposed convolutions pad with zeros")
    kernel, stride, dilation, padding = (tuple(get(k)) for k in ("kernel_size", "stride", "dilation", "padding"))
    full = [(n - 1) * s + d * (k - 1) + 1 - 2 * p
            for n, k, s, d, p in zip(imp.shape(node.args[0])[1:], kernel, stride, dilation, padding)]
    extra = tuple(o - f for o, f in zip(imp.shape(node)[1:], full))
    op = ConvTranspose(get("out_channels"), kernel, stride, tuple((p, p) for p in padding), extra, dilation,
                       get("groups"), get("bias") is not None)
    return imp.emit(node, op, [x])


def _upsample(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    """``nn.Upsample``/``F.interpolate``: nearest or (bi/tri)linear, by scale or to a size."""
    x = imp.channels_first(imp.t(x), "upsampling")
    mode = get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear", "trilinear") or get("antialias", False):
        raise _Unmappable(f"interpolation mode {mode!r}{' with antialias' if get('antialias', False) else ''}: "
                          "hal upsamples nearest or (bi/tri)linear")
    scale = get("scale_factor", None)
    nd = len(x.perm) - 2
    if scale is None or get("recompute_scale_factor", None):  # torch's ratio is then n / size
        scale = ()
    else:
        scale = tuple(float(f) for f in scale) if isinstance(scale, (list, tuple)) else (float(scale),) * nd
    op = Upsample(imp.shape(node)[1:], scale, "nearest" if mode == "nearest" else "linear",
                  bool(get("align_corners", None)))
    return imp.emit(node, op, [x])


def _stochastic_depth(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    p = get("p")
    return imp.t(x) if p == 0 else imp.emit(node, StochasticDepth(p, get("mode")), [imp.t(x)])


def _batch_norm(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    if not (get("affine") and get("track_running_stats")) or get("momentum") is None:
        raise _Unmappable("hal's BatchNorm has affine parameters, running statistics and a numeric momentum")
    return imp.emit(node, BatchNorm(get("eps"), get("momentum")), [imp.channels_first(imp.t(x), "BatchNorm")])


def _layer_norm(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    """``nn.LayerNorm(C)`` or ``F.layer_norm(x, (C,), owner.weight, owner.bias)`` over the channel axis."""
    x = imp.t(x)
    if len(tuple(get("normalized_shape"))) != 1 or x.perm[-1] != 1 and len(x.perm) > 1:
        raise _Unmappable(f"layer norm over {tuple(get('normalized_shape'))} of a tensor laid out as {x.perm}: "
                          "hal normalises over the channel axis alone")
    if node.op == "call_module":
        affine = get("elementwise_affine")
        if affine and get("bias") is None:
            raise _Unmappable("LayerNorm without bias: hal's affine LayerNorm has weight and bias")
        return imp.emit(node, LayerNorm(get("eps"), bool(affine)), [x])
    weight, bias = node.kwargs.get("weight", _arg(node, 2)), node.kwargs.get("bias", _arg(node, 3))
    if weight is None and bias is None:
        return imp.emit(node, LayerNorm(get("eps", 1e-5), False), [x])
    owners = {getattr(p, "target", "").rpartition(".")[::2] for p in (weight, bias)}
    paths = {o for o, _ in owners}
    if any(getattr(p, "op", None) != "get_attr" for p in (weight, bias)) or len(paths) != 1 or \
            {n for _, n in owners} != {"weight", "bias"}:
        raise _Unmappable("F.layer_norm maps when its weight and bias are one module's 'weight' and 'bias'")
    return imp.emit(node, LayerNorm(get("eps", 1e-5), True), [x], imp.owner_name(paths.pop()))


def _arg(node: "fx.Node", i: int) -> Any:
    return node.args[i] if len(node.args) > i else None


def _group_norm(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    return imp.emit(node, GroupNorm(get("num_groups"), get("eps"), get("affine")),
                    [imp.channels_first(imp.t(x), "GroupNorm")])


def _instance_norm(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    if get("track_running_stats"):
        raise _Unmappable("InstanceNorm with running statistics: hal's InstanceNorm has none (torch's default)")
    return imp.emit(node, InstanceNorm(get("eps"), get("affine")), [imp.channels_first(imp.t(x), "InstanceNorm")])


def _pool(cls: type[MaxPool] | type[AvgPool]) -> Handler:
    def handler(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
        x = imp.channels_first(imp.t(x), cls.kind)
        nd = len(x.perm) - 2

        def tup(v: Any) -> tuple[int, ...]:
            return tuple(v) if isinstance(v, (list, tuple)) else (v,) * nd

        kernel = tup(get("kernel_size"))
        stride = tup(get("stride", None) or kernel)
        if cls is MaxPool:
            if get("return_indices", False) or any(d != 1 for d in tup(get("dilation", 1))):
                raise _Unmappable("max pooling with dilation or returned indices is not in hal")
            extra = {}
        else:
            if get("divisor_override", None) is not None:
                raise _Unmappable("average pooling with divisor_override is not in hal")
            extra = {"count_include_pad": get("count_include_pad", True)}
        padding = tuple((p, p) for p in tup(get("padding", 0)))
        return imp.emit(node, cls(kernel, stride, padding, ceil_mode=get("ceil_mode", False), **extra), [x])

    return handler


def _adaptive(cls: type[AdaptiveAvgPool] | type[AdaptiveMaxPool]) -> Handler:
    def handler(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
        if get("return_indices", False):
            raise _Unmappable("adaptive max pooling with returned indices is not in hal")
        x = imp.channels_first(imp.t(x), cls.kind)
        return imp.emit(node, cls(imp.shape(node)[1:]), [x])  # the size torch computed (None entries resolved)

    return handler


def _mean(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    x = imp.channels_first(imp.t(x), "a mean")
    rank = len(x.perm)
    dims = get("dim", None)
    dims = {d % rank for d in ((dims,) if isinstance(dims, int) else dims or ())}
    if dims != set(range(2, rank)) or get("dtype", None) is not None:
        raise _Unmappable(f"a mean over dims {sorted(dims)}: hal averages over all spatial dims {list(range(2, rank))}")
    if get("keepdim", False):
        return imp.emit(node, AdaptiveAvgPool((1,) * (rank - 2)), [x])
    return imp.emit(node, GlobalAvgPool(), [x])


def _pad(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    """``F.pad(x, flat, mode, value)`` and the padding modules; the flat list runs last dim first."""
    x = imp.channels_first(imp.t(x), "padding")
    nd = len(x.perm) - 2
    flat = get("padding") if node.op == "call_module" else get("pad")
    flat = tuple(flat) if isinstance(flat, (list, tuple)) else (flat,) * 2 * nd
    if len(flat) % 2 or len(flat) > 2 * nd:
        raise _Unmappable(f"padding {flat} reaches beyond the {nd} spatial dims")
    pairs = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)][::-1]
    padding = tuple([(0, 0)] * (nd - len(pairs)) + pairs)
    if node.op == "call_module":
        mode = {"Reflection": "reflect", "Replication": "replicate"}.get(
            re.sub(r"Pad\dd$", "", type(imp.gm.get_submodule(node.target)).__name__), "constant")
    else:
        mode = get("mode", "constant")
    if mode not in ("constant", "reflect", "replicate"):
        raise _Unmappable(f"padding mode {mode!r}: hal pads constant, reflect or replicate")
    value = get("value", 0.0) if mode == "constant" else 0.0
    return imp.emit(node, Pad(padding, mode, float(value or 0.0)), [x])


def _binary(cls: type[Add] | type[Mul]) -> Handler:
    def handler(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
        from torch import fx

        args = [a for a in node.args[:2]] if len(node.args) >= 2 else [x, get("other")]
        if get("alpha", 1) != 1:
            raise _Unmappable("torch.add with alpha != 1 is not in hal")
        attr = [a for a in args if isinstance(a, fx.Node) and a.op == "get_attr"]
        if cls is Mul and len(attr) == 1 and attr[0].target.rpartition(".")[2] == "layer_scale":
            other = imp.channels_first(imp.t(next(a for a in args if a is not attr[0])), "a layer scale")
            owner = attr[0].target.rpartition(".")[0]
            return imp.emit(node, Scale(), [other], imp.owner_name(owner))
        return imp.emit(node, cls(), [imp.t(a) for a in args])

    return handler


def _cat(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    xs = [imp.t(a) for a in _list_arg(node, "tensors")]
    if len(xs) == 1:
        return xs[0]
    dim = get("dim", 0) % len(xs[0].perm)
    if xs[0].perm[dim] != 1:
        raise _Unmappable(f"concatenation along dim {dim}: hal concatenates channels")
    return imp.emit(node, Concat(), xs)


def _list_arg(node: "fx.Node", key: str) -> list[Any]:
    """The graph arguments (nodes) of a list argument: ``torch.cat``'s tensors."""
    seq = node.kwargs.get(key, node.args[0] if node.args else ())
    return list(seq)


def _split(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _Split:
    """``x.chunk(n, 1)``, ``x.split(size_or_sizes, 1)``, ``torch.chunk``/``torch.split`` on channels."""
    x = imp.t(x)
    dim = get("dim", 0) % len(x.perm)
    if x.perm[dim] != 1:
        raise _Unmappable(f"splitting along dim {dim}: hal slices channels")
    sizes = [int(part.shape[dim]) for part in imp.env[node]]
    starts = np.cumsum([0, *sizes])
    return _Split(x, tuple((int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])))


def _getitem(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    """A part of a channel split, or ``x[:, a:b]`` of a tensor."""
    source, index = imp.out.get(x), imp.value(node.args[1])
    if isinstance(source, _Split):
        start, stop = source.bounds[index]
        return imp.emit(node, ChannelSlice(start, stop), [source.source])
    t = imp.channels_first(imp.t(x), "indexing")
    index = index if isinstance(index, tuple) else (index,)
    rest = [i for i in index[2:] if i != slice(None)]
    if len(index) >= 2 and index[0] == slice(None) and isinstance(index[1], slice) and not rest \
            and index[1].step in (None, 1):
        start, stop, _ = index[1].indices(imp.shape(x)[0])
        return imp.emit(node, ChannelSlice(start, stop), [t])
    raise _Unmappable(f"indexing {show(index)}: hal slices channels only (x[:, a:b])")


def _flatten(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    x_t = imp.out.get(x)
    rank = len(imp.env[x].shape)
    start, end = get("start_dim", 1 if node.op == "call_module" else 0) % rank, get("end_dim", -1) % rank
    if isinstance(x_t, _Grouped) and (start, end) == (1, 2):
        return _shuffle(imp, node, x_t)
    if start != 1 or end != rank - 1:
        raise _Unmappable(f"flatten of dims {start}..{end} of a rank-{rank} tensor: hal flattens (C, *spatial)")
    x = imp.t(x)
    return x if rank == 2 else imp.emit(node, Flatten(), [imp.channels_first(x, "flatten")])


def _reshape(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> Any:
    """``view``/``reshape``: a no-op, a flatten to (N, features), or a step of a channel shuffle."""
    src, out = imp.shape(x), imp.shape(node)
    value = imp.out.get(x)
    if imp.env[node].shape[0] != imp.env[x].shape[0]:
        raise _Unmappable(f"a reshape to {tuple(imp.env[node].shape)} mixes the batch axis with the others")
    if isinstance(value, _Grouped) and value.swapped and out == imp.shape_of(value.source):
        return _shuffle(imp, node, value)
    t = imp.t(x)
    if out == src:
        return t
    if len(out) == 1:
        return imp.emit(node, Flatten(), [imp.channels_first(t, "flatten")])
    if t.channels_first and len(out) == len(src) + 1 and out[0] * out[1] == src[0] and out[2:] == src[1:]:
        return _Grouped(t, out[0])
    raise _Unmappable(f"a reshape {src} -> {out}: hal maps flattens, no-ops and channel shuffles")


def _transpose(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> Any:
    value = imp.out.get(x)
    rank = len(imp.env[x].shape)
    if node.target in ("permute",) or getattr(node.target, "__name__", "") == "permute":
        dims = get("dims", None)
        if dims is None:  # x.permute(0, 2, 3, 1)
            dims = imp.value(node.args[1:]) if not isinstance(imp.value(node.args[1]), (list, tuple)) \
                else imp.value(node.args[1])
        dims = tuple(d % rank for d in dims)
    else:
        d0, d1 = get("dim0") % rank, get("dim1") % rank
        dims = list(range(rank))
        dims[d0], dims[d1] = d1, d0
        dims = tuple(dims)
    if isinstance(value, _Grouped) and not value.swapped and dims == (0, 2, 1, *range(3, rank)):
        return _Grouped(value.source, value.groups, swapped=True)
    t = imp.t(x)
    if dims[0] != 0:
        raise _Unmappable(f"a permutation {dims} moves the batch axis")
    return _T(t.name, tuple(t.perm[d] for d in dims))


def _shuffle(imp: _Importer, node: "fx.Node", grouped: _Grouped) -> _T:
    return imp.emit(node, ChannelShuffle(grouped.groups), [grouped.source])


def _contiguous(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> Any:
    value = imp.out.get(x)
    return value if isinstance(value, _Grouped) else imp.t(x)


def _dropout_module(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    p = get("p")
    return imp.t(x) if p == 0 else imp.emit(node, Dropout(p), [imp.t(x)])


def _dropout_function(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    p = get("p", 0.5)
    return imp.t(x) if p == 0 or not get("training", True) else imp.emit(node, Dropout(p), [imp.t(x)])


def _no_op_at_zero(what: str) -> Handler:
    """Dropout variants hal has no op for: folded at p = 0, else named."""

    def handler(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
        if get("p") != 0:
            raise _Unmappable(f"{what} at p={get('p')}: hal.spec has no such op")
        return imp.t(x)

    return handler


def _linear(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    """``nn.Linear`` over the channel axis: on ``(N, C)``, or at every position of a channels-last tensor."""
    x = imp.t(x)
    if x.perm[-1] != 1:
        raise _Unmappable(f"a Linear over the last axis of a tensor laid out as {x.perm}: hal's Dense maps channels")
    return imp.emit(node, Dense(get("out_features"), get("bias") is not None), [x])


def _channel_shuffle(imp: _Importer, node: "fx.Node", get: Callable[..., Any], x: Any) -> _T:
    return imp.emit(node, ChannelShuffle(get("groups")), [imp.channels_first(imp.t(x), "a channel shuffle")])


@functools.cache
def _module_table() -> dict[type, Handler]:
    import torch.nn as nn

    table: dict[type, Handler] = {
        nn.ReLU: _activation("relu"), nn.ReLU6: _activation("relu6"),
        nn.LeakyReLU: _activation("leaky_relu", alpha="negative_slope"), nn.ELU: _activation("elu", alpha="alpha"),
        nn.Sigmoid: _activation("sigmoid"), nn.Tanh: _activation("tanh"), nn.Hardsigmoid: _activation("hardsigmoid"),
        nn.Hardswish: _activation("hardswish"), nn.GELU: _activation("gelu", approximate="approximate"),
        nn.SiLU: _activation("silu"), nn.Mish: _activation("mish"),
        nn.Softplus: _activation("softplus", beta="beta", threshold="threshold"), nn.Hardtanh: _hardtanh,
        nn.PReLU: _prelu, nn.Linear: _linear, nn.LayerNorm: _layer_norm, nn.GroupNorm: _group_norm,
        nn.Upsample: _upsample, nn.Flatten: _flatten, nn.Identity: _fold, nn.Dropout: _dropout_module,
        nn.ChannelShuffle: _channel_shuffle,
        nn.Dropout1d: _no_op_at_zero("channel dropout"), nn.Dropout2d: _no_op_at_zero("channel dropout"),
        nn.Dropout3d: _no_op_at_zero("channel dropout"), nn.AlphaDropout: _no_op_at_zero("alpha dropout"),
    }
    for nd in (1, 2, 3):
        table.update({
            getattr(nn, f"Conv{nd}d"): _conv, getattr(nn, f"ConvTranspose{nd}d"): _conv_transpose,
            getattr(nn, f"BatchNorm{nd}d"): _batch_norm,
            getattr(nn, f"InstanceNorm{nd}d"): _instance_norm,
            getattr(nn, f"MaxPool{nd}d"): _pool(MaxPool), getattr(nn, f"AvgPool{nd}d"): _pool(AvgPool),
            getattr(nn, f"AdaptiveAvgPool{nd}d"): _adaptive(AdaptiveAvgPool),
            getattr(nn, f"AdaptiveMaxPool{nd}d"): _adaptive(AdaptiveMaxPool),
            getattr(nn, f"ConstantPad{nd}d"): _pad, getattr(nn, f"ReflectionPad{nd}d"): _pad,
            getattr(nn, f"ReplicationPad{nd}d"): _pad, getattr(nn, f"ZeroPad{nd}d"): _pad,
        })
    try:
        from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth
    except ImportError:
        pass
    else:
        table[TorchvisionStochasticDepth] = _stochastic_depth
    return table


@functools.cache
def _function_table() -> dict[Any, Handler]:
    import torch
    import torch.nn.functional as F

    table: dict[Any, Handler] = {
        operator.add: _binary(Add), operator.iadd: _binary(Add), torch.add: _binary(Add),
        operator.mul: _binary(Mul), operator.imul: _binary(Mul), torch.mul: _binary(Mul),
        torch.cat: _cat, torch.concat: _cat, torch.chunk: _split, torch.split: _split,
        operator.getitem: _getitem, torch.flatten: _flatten, torch.reshape: _reshape,
        torch.permute: _transpose, torch.transpose: _transpose, torch.mean: _mean,
        F.dropout: _dropout_function, F.layer_norm: _layer_norm, F.pad: _pad,
        torch.channel_shuffle: _channel_shuffle,
        F.hardtanh: _hardtanh, F.interpolate: _upsample,
        F.leaky_relu: _activation("leaky_relu", alpha="negative_slope"), F.elu: _activation("elu", alpha="alpha"),
        F.gelu: _activation("gelu", approximate="approximate"),
        F.softplus: _activation("softplus", beta="beta", threshold="threshold"),
    }
    for fn in ("relu", "relu6", "sigmoid", "tanh", "hardsigmoid", "hardswish", "silu", "mish"):
        table[getattr(F, fn)] = _activation(fn)
        if hasattr(torch, fn):
            table[getattr(torch, fn)] = _activation(fn)
    for nd in (1, 2, 3):
        table[getattr(F, f"max_pool{nd}d")] = _pool(MaxPool)
        table[getattr(F, f"avg_pool{nd}d")] = _pool(AvgPool)
        table[getattr(F, f"adaptive_avg_pool{nd}d")] = _adaptive(AdaptiveAvgPool)
        table[getattr(F, f"adaptive_max_pool{nd}d")] = _adaptive(AdaptiveMaxPool)
    return table


@functools.cache
def _method_table() -> dict[str, Handler]:
    table: dict[str, Handler] = {
        "add": _binary(Add), "add_": _binary(Add), "mul": _binary(Mul), "mul_": _binary(Mul),
        "flatten": _flatten, "view": _reshape, "reshape": _reshape, "permute": _transpose, "transpose": _transpose,
        "contiguous": _contiguous, "clone": _fold, "mean": _mean, "chunk": _split, "split": _split,
    }
    for fn in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"):
        table[fn] = _activation(fn.rstrip("_"))
    return table
