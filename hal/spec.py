"""The neutral model spec: an immutable, validated DAG of named nodes.

Activations are channels-first ``(N, C, *spatial)``; shapes in the spec are per
sample, ``(C, *spatial)``. Every op has exactly one meaning, PyTorch's
(``torch.nn``, ``torch.nn.functional``, ``torchvision.ops``) unless the table says
otherwise: padding is always explicit ``((before, after), ...)`` per spatial
dimension, so framework ``SAME`` conventions never reach a backend.
:class:`SpecBuilder` turns ``"same"``/``"valid"``/integers into those explicit
numbers and infers shapes as nodes are added. Parameters and buffers carry
torchvision's names and layouts.

Ops (``x`` is the input, ``C`` its channels; attributes in brackets):

================  ==========================================================================
Input             ``[shape, dtype]`` the graph input ``(C, *spatial)``
Conv              ``F.conv{1,2,3}d`` ``[out_channels, kernel, stride, padding, dilation, groups,
                  bias]``; weight ``(O, C/groups, *k)``, bias ``(O,)``
ConvTranspose     ``F.conv_transpose{1,2,3}d`` ``[out_channels, kernel, stride, padding,
                  output_padding, dilation, groups, bias]``; weight ``(C, O/groups, *k)`` as torch;
                  padding ``(before, after)`` crops the full output, output_padding extends it after
BatchNorm         ``F.batch_norm`` over axis 1 ``[eps, momentum]``; weight, bias, running_mean,
                  running_var ``(C,)``; training normalises with the biased batch variance and
                  updates ``running_var`` with the unbiased one (momentum = new statistic's weight)
LayerNorm         ``[eps, affine]`` over the channel axis alone at each position (ConvNeXt's
                  channels-first LayerNorm2d: ``nn.LayerNorm(C)`` on the channels-last tensor)
GroupNorm         ``F.group_norm`` ``[groups, eps, affine]``: ``groups`` consecutive channel groups,
                  each over its channels and all positions
InstanceNorm      ``F.instance_norm`` ``[eps, affine]``, no running statistics (torch's default)
                  LayerNorm, GroupNorm, InstanceNorm: biased variance, the same in training and
                  inference; weight and bias ``(C,)`` when affine (torch's defaults: True, True, False)
Activation        ``[fn, alpha, approximate, beta, threshold]`` elementwise, one of
                  relu, relu6 = ``min(max(x, 0), 6)``, leaky_relu (slope ``alpha``),
                  elu = ``x if x > 0 else alpha * (exp(x) - 1)`` (torch's alpha is 1: pass it),
                  sigmoid, hardsigmoid = ``relu6(x + 3) / 6``, tanh,
                  hardswish = ``x * relu6(x + 3) / 6``, gelu (``approximate`` "none": exact erf,
                  "tanh": the tanh form), silu = ``x * sigmoid(x)``,
                  softplus = ``log(1 + exp(beta x)) / beta``, but ``x`` where ``beta x > threshold``,
                  mish = ``x * tanh(log(1 + exp(x)))``
PReLU             ``x if x >= 0 else a * x`` ``[num_parameters]``; weight ``a`` ``(1,)`` shared or
                  ``(C,)`` per channel
MaxPool           ``[kernel, stride, padding, ceil_mode]``; padding never wins (it is -inf)
AvgPool           ``[kernel, stride, padding, count_include_pad, ceil_mode]``; ceil_mode rounds
                  the output size up but drops a last window that would start in the right padding,
                  and the part of a window past the padding never counts (torch's rules)
AdaptiveAvgPool,  ``[output_size]``; window ``i`` of ``n`` covers
AdaptiveMaxPool   ``[floor(i n / out), ceil((i + 1) n / out))`` (torch's)
Pad               ``[padding, mode, value]`` spatial dims, per side; mode constant (value),
                  reflect (without the edge, pad < n) or replicate (``F.pad``'s modes)
GlobalAvgPool     mean over all spatial dims: ``(C, *spatial) -> (C,)``
Add               n-ary elementwise sum, broadcasting (below)
Mul               n-ary elementwise product, broadcasting (below): squeeze-and-excitation
Scale             ``layer_scale * x`` ``[init_value]``; layer_scale ``(C, 1, ..., 1)``
                  (torchvision ConvNeXt's ``CNBlock.layer_scale``); init_value is its start only
Concat            along channels
Upsample          ``F.interpolate`` ``[size, scale, mode, align_corners]``: nearest or linear
                  (bi/trilinear by rank); ``scale`` () maps coordinates by ``n / size``, else by
                  ``1 / scale`` (torch's ``scale_factor``; ``size = floor(n * scale)``); linear
                  copies a dim whose size does not change (torch's rule)
ChannelShuffle    ``nn.ChannelShuffle`` ``[groups]``: channels viewed as (groups, C/groups), transposed
ChannelSlice      ``x[:, start:stop]`` ``[start, stop]`` (``x.chunk(2, dim=1)`` is two)
Flatten           row-major over ``(C, *spatial)``
Dense             ``F.linear`` over the channel axis: ``(in,) -> (out,)``, and on ``(in, *spatial)`` at
                  every position (ConvNeXt's channels-last ``nn.Linear``); weight ``(out, in)``, bias ``(out,)``
Dropout           ``F.dropout`` ``[rate]``; identity in inference; see "training mode" below
StochasticDepth   ``torchvision.ops.StochasticDepth`` ``[p, mode]``: identity in inference; in
                  training each sample ("row") or the whole batch ("batch") is zeroed with
                  probability p, else scaled by 1 / (1 - p); see "training mode" below
================  ==========================================================================

Broadcasting (Add, Mul): the inputs' per-sample shapes have the same rank and each
dimension is equal across inputs or 1 (numpy broadcasting without rank extension:
SE's ``(C, 1, 1) * (C, H, W)``); the output takes the largest size of each
dimension. Ranks never align from the right, so ``(C,)`` with ``(C, H, W)`` is refused.

Training mode: inference and training-mode forwards are the same for every op but
BatchNorm (batch statistics) and the random ones. Dropout of rate ``p`` zeroes each
element with probability ``p`` and scales the others by ``1 / (1 - p)``;
StochasticDepth does the same to whole samples (or the whole batch). No two
frameworks draw the same masks, and hal does not fix a random stream, so what parity
and the conformance suite can compare is: inference forwards (always; both ops are
the identity there), training-mode forwards, gradients and trajectories only at
``p = 0`` (the numpy reference refuses ``p > 0`` in training), and for ``p > 0`` the
rule (each element, or each sample, is zero or scaled by ``1 / (1 - p)``, at a
plausible rate), never the values. A model with them is compared in training by
giving them ``p = 0``.

Attributes are plain ints, floats, strings and tuples; an attribute added to an op
after it was first published is written to JSON only when it is not at its default,
so specs that do not use it keep their JSON, hash and weights files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence, Union

from hal.errors import SpecError

SCHEMA_VERSION = 1
MAX_ELEMENTS = 2**40  # per-sample activation or parameter tensor: 4 TiB in float32, beyond any device
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
ACTIVATIONS = (
    "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu",
    "relu6", "elu", "hardsigmoid", "hardswish", "softplus", "mish",
)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

Shape = tuple[int, ...]
Padding = tuple[tuple[int, int], ...]
Scales = tuple[float, ...]


def _prod(xs: Iterable[int]) -> int:
    return math.prod(xs)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 4, 60, 60


def _show(v: Any) -> str:
    """``repr`` for error messages, bounded in length and depth (a user value may be huge or deep)."""
    return _REPR.repr(v)


# ---------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------


def _late(default: Any) -> Any:
    """An attribute added after its op was first published: JSON carries it only
    when it is not at ``default`` (see :meth:`Op.json_attrs`)."""
    return field(default=default, metadata={"late": True})


@dataclass(frozen=True)
class Init:
    """How :func:`hal.weights.init_weights` fills a parameter or buffer:
    ``dist`` ``"constant"`` (every value ``value``), ``"normal"`` (mean 0, standard
    deviation ``value``) or ``"uniform"`` (on ``[-value, value]``)."""

    dist: str
    value: float


@dataclass(frozen=True)
class Op:
    """Base of all ops. Subclasses are frozen dataclasses of plain numbers."""

    kind: ClassVar[str] = ""
    arity: ClassVar[tuple[int, int | None]] = (1, 1)  # (min, max) number of inputs

    def infer(self, shapes: list[Shape]) -> Shape:
        """Output shape per sample; raises ``ValueError`` with the reason."""
        return shapes[0]

    def params(self, shapes: list[Shape]) -> dict[str, Shape]:
        """Trainable parameters, name -> shape (canonical PyTorch layout)."""
        return {}

    def buffers(self, shapes: list[Shape]) -> dict[str, Shape]:
        """Non-trainable state, name -> shape."""
        return {}

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        """Forward FLOPs per sample (a multiply-add counts as 2)."""
        return 0

    def init(self, param: str, shape: Shape, shapes: list[Shape]) -> Init:
        """The seeded initial value of parameter or buffer ``param`` (zeros unless the op says)."""
        return Init("constant", 0.0)

    def attrs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name, _ in _fields(type(self))}

    def json_attrs(self) -> dict[str, Any]:
        """:meth:`attrs` less the late attributes at their defaults (what JSON and the hash see)."""
        late = _late_defaults(type(self))
        return {k: v for k, v in self.attrs().items() if not (k in late and v == late[k])}

    def __post_init__(self) -> None:
        for name, kind in _fields(type(self)):  # numpy scalars and lists become plain ints/floats/tuples
            v = _plain(getattr(self, name))
            if kind == "float" and type(v) is int:
                v = float(v)  # eps=1 and eps=1.0 are one graph with one hash
            if kind == "Scales" and type(v) is tuple:
                v = tuple(float(x) if type(x) is int else x for x in v)
            object.__setattr__(self, name, v)

    def check_types(self) -> None:
        """Raise ``ValueError`` naming the first attribute of the wrong type."""
        for name, kind in _fields(type(self)):
            v = getattr(self, name)
            if kind in _TYPES and not _TYPES[kind](v):
                raise ValueError(f"{self.kind}.{name} must be {_TYPE_WORDS[kind]}, got {_show(v)}")


@functools.cache
def _fields(cls: type[Op]) -> tuple[tuple[str, str], ...]:
    """(name, annotation) of each attribute of an op class."""
    return tuple((f.name, str(f.type)) for f in dataclasses.fields(cls))


@functools.cache
def _late_defaults(cls: type[Op]) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.metadata.get("late")}


# The checks see values after Op.__post_init__ made them plain ints, floats and tuples.
_TYPES: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: type(v) is int,
    "bool": lambda v: type(v) is bool,
    "float": lambda v: type(v) is float and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "Shape": lambda v: type(v) is tuple and all(type(x) is int for x in v),
    "Scales": lambda v: type(v) is tuple and all(type(x) is float and math.isfinite(x) for x in v),
    "Padding": lambda v: type(v) is tuple and all(
        type(p) is tuple and len(p) == 2 and type(p[0]) is int and type(p[1]) is int for p in v
    ),
}
_TYPE_WORDS = {
    "int": "an int", "bool": "a bool", "float": "a finite number", "str": "a string",
    "Shape": "a tuple of ints", "Scales": "a tuple of finite numbers", "Padding": "a tuple of (before, after) int pairs",
}


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _plain(v: Any, depth: int = 2) -> Any:
    """Plain ints/floats and tuples down to ``depth`` levels (a Padding has two); deeper
    values stay as given, for :meth:`Op.check_types` to refuse."""
    if v is None or isinstance(v, (bool, str)) or type(v) in (int, float):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (list, tuple)) and depth > 0:
        return tuple(_plain(x, depth - 1) for x in v)
    return v


def _spatial(shape: Shape, what: str, ndim: int) -> Shape:
    if len(shape) != ndim + 1:
        raise ValueError(
            f"{what} with {ndim} spatial dims expects an input of shape (C, {ndim} spatial dims), got {shape}"
        )
    return shape[1:]


def _he_fan_out(shape: Shape) -> Init:
    """He/Kaiming normal with fan-out ``shape[0] * prod(shape[2:])``, gain sqrt(2)
    (``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` of a weight tensor)."""
    return Init("normal", math.sqrt(2.0 / (shape[0] * _prod(shape[2:]))))


def _window_out(n: int, k: int, s: int, d: int, pad: tuple[int, int], where: str) -> int:
    eff = d * (k - 1) + 1
    span = n + pad[0] + pad[1]
    if span < eff:
        raise ValueError(f"{where}: padded size {span} is smaller than the window {eff}")
    return (span - eff) // s + 1


def _check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    if out_channels < 1 or groups < 1:
        raise ValueError(f"out_channels and groups must be >= 1, got {out_channels}, {groups}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"in_channels {in_channels} and out_channels {out_channels} must both be divisible by groups {groups}"
        )


def _check_window(kernel: Shape, stride: Shape, padding: Padding, dilation: Shape | None = None) -> None:
    nd = len(kernel)
    if nd not in (1, 2, 3):
        raise ValueError(f"only 1-d, 2-d and 3-d windows are supported, got kernel {kernel}")
    for label, vals in (("stride", stride), ("padding", padding), ("dilation", dilation or kernel)):
        if len(vals) != nd:
            raise ValueError(f"{label} {vals} has {len(vals)} entries for a {nd}-d kernel {kernel}")
    if any(k < 1 for k in kernel) or any(s < 1 for s in stride) or any(d < 1 for d in (dilation or ())):
        raise ValueError(f"kernel, stride and dilation must be >= 1, got {kernel}, {stride}, {dilation}")
    if any(len(p) != 2 or p[0] < 0 or p[1] < 0 for p in padding):
        raise ValueError(f"padding must be non-negative (before, after) pairs, got {padding}")


@dataclass(frozen=True)
class Input(Op):
    """The graph input: shape ``(C, *spatial)`` per sample."""

    shape: Shape
    dtype: str = "float32"
    kind: ClassVar[str] = "Input"
    arity: ClassVar[tuple[int, int | None]] = (0, 0)

    def infer(self, shapes: list[Shape]) -> Shape:
        if not self.shape or any(d < 1 for d in self.shape):
            raise ValueError(f"input shape must be non-empty with sizes >= 1, got {self.shape}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {_show(self.dtype)}")
        return tuple(self.shape)


@dataclass(frozen=True)
class Conv(Op):
    """N-d convolution (cross-correlation, as in every framework).

    weight ``(out_channels, in_channels/groups, *kernel)``, bias ``(out_channels,)``.
    """

    out_channels: int
    kernel: Shape
    stride: Shape
    padding: Padding
    dilation: Shape
    groups: int = 1
    bias: bool = True
    kind: ClassVar[str] = "Conv"

    def infer(self, shapes: list[Shape]) -> Shape:
        _check_window(self.kernel, self.stride, self.padding, self.dilation)
        spatial = _spatial(shapes[0], "Conv", len(self.kernel))
        _check_groups(shapes[0][0], self.out_channels, self.groups)
        out = tuple(
            _window_out(n, k, s, d, p, f"Conv dim {i}")
            for i, (n, k, s, d, p) in enumerate(zip(spatial, self.kernel, self.stride, self.dilation, self.padding))
        )
        return (self.out_channels, *out)

    def params(self, shapes: list[Shape]) -> dict[str, Shape]:
        p = {"weight": (self.out_channels, shapes[0][0] // self.groups, *self.kernel)}
        if self.bias:
            p["bias"] = (self.out_channels,)
        return p

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        macs = _prod(out) * (shapes[0][0] // self.groups) * _prod(self.kernel)
        return 2 * macs + (_prod(out) if self.bias else 0)

    def init(self, param: str, shape: Shape, shapes: list[Shape]) -> Init:
        """Weight: He/Kaiming normal, fan-out, gain sqrt(2) (torchvision's ResNet init); bias 0."""
        return _he_fan_out(shape) if param == "weight" else Init("constant", 0.0)


@dataclass(frozen=True)
class ConvTranspose(Op):
    """N-d transposed convolution (``F.conv_transpose{1,2,3}d``, the gradient of Conv
    with respect to its input). weight ``(in_channels, out_channels/groups, *kernel)``
    as torch, bias ``(out_channels,)``. Each input pixel scatters ``weight * x`` to
    ``i * stride + j * dilation``; of that full output of length
    ``(n - 1) * stride + dilation * (k - 1) + 1``, ``padding`` ``(before, after)``
    crops each side and ``output_padding`` appends zeros (plus bias) after it: torch's
    ``padding=p, output_padding=q`` is ``((p, p),)`` and ``(q,)``, ``q < max(stride, dilation)``."""

    out_channels: int
    kernel: Shape
    stride: Shape
    padding: Padding
    output_padding: Shape
    dilation: Shape
    groups: int = 1
    bias: bool = True
    kind: ClassVar[str] = "ConvTranspose"

    def infer(self, shapes: list[Shape]) -> Shape:
        _check_window(self.kernel, self.stride, self.padding, self.dilation)
        spatial = _spatial(shapes[0], "ConvTranspose", len(self.kernel))
        _check_groups(shapes[0][0], self.out_channels, self.groups)
        if len(self.output_padding) != len(self.kernel) or any(
            not 0 <= q < max(s, d) for q, s, d in zip(self.output_padding, self.stride, self.dilation)
        ):
            raise ValueError(f"output_padding {self.output_padding} must be >= 0 and smaller than stride {self.stride} "
                             f"or dilation {self.dilation} in each dim (as in torch)")
        out = tuple(
            (n - 1) * s + d * (k - 1) + 1 - a - b + q
            for n, k, s, d, (a, b), q in zip(spatial, self.kernel, self.stride, self.dilation, self.padding,
                                             self.output_padding)
        )
        return (self.out_channels, *out)

    def params(self, shapes: list[Shape]) -> dict[str, Shape]:
        p = {"weight": (shapes[0][0], self.out_channels // self.groups, *self.kernel)}
        if self.bias:
            p["bias"] = (self.out_channels,)
        return p

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        macs = _prod(shapes[0]) * (self.out_channels // self.groups) * _prod(self.kernel)
        return 2 * macs + (_prod(out) if self.bias else 0)

    def init(self, param: str, shape: Shape, shapes: list[Shape]) -> Init:
        """Weight: He normal with the weight tensor's fan-out ``in_channels * prod(kernel)``
        (``kaiming_normal_(mode="fan_out")`` on torch's layout); bias 0."""
        return _he_fan_out(shape) if param == "weight" else Init("constant", 0.0)


@dataclass(frozen=True)
class BatchNorm(Op):
    """Batch normalisation over axis 1 (channels) of any rank >= 1 activation.

    ``momentum`` is the weight of the new batch statistic (PyTorch convention).
    Training normalises with the biased batch variance and updates
    ``running_var`` with the unbiased one.
    """

    eps: float = 1e-5
    momentum: float = 0.1
    kind: ClassVar[str] = "BatchNorm"

    def infer(self, shapes: list[Shape]) -> Shape:
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        return shapes[0]

    def params(self, shapes: list[Shape]) -> dict[str, Shape]:
        c = (shapes[0][0],)
        return {"weight": c, "bias": c}

    def buffers(self, shapes: list[Shape]) -> dict[str, Shape]:
        c = (shapes[0][0],)
        return {"running_mean": c, "running_var": c}

    def init(self, param: str, shape: Shape, shapes: list[Shape]) -> Init:
        return Init("constant", 1.0 if param in ("weight", "running_var") else 0.0)

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return 2 * _prod(out)


@dataclass(frozen=True)
class _Norm(Op):
    """Normalisation by statistics of the sample itself (no running state): the same
    in inference and training. Biased variance; weight (gamma) and bias (beta)
    ``(C,)`` per channel when ``affine``. Subclasses declare ``eps`` and ``affine``."""

    def infer(self, shapes: list[Shape]) -> Shape:
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        return shapes[0]

    def params(self, shapes: list[Shape]) -> dict[str, Shape]:
        c = (shapes[0][0],)
        return {"weight": c, "bias": c} if self.affine else {}

    def init(self, param: str, shape: Shape, shapes: list[Shape]) -> Init:
        return Init("constant", 1.0 if param == "weight" else 0.0)

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return (7 if self.affine else 5) * _prod(out)  # mean 1, variance 2, normalise 2, affine 2


@dataclass(frozen=True)
class LayerNorm(_Norm):
    """Layer normalisation over the channel axis alone, at each position (ConvNeXt's
    channels-first ``LayerNorm2d``: ``nn.LayerNorm(C)`` on the channels-last tensor);
    on ``(features,)`` it is ``nn.LayerNorm(features)``."""

    eps: float = 1e-5
    affine: bool = True
    kind: ClassVar[str] = "LayerNorm"


@dataclass(frozen=True)
class GroupNorm(_Norm):
    """``F.group_norm``: the channels split into ``groups`` consecutive groups, each
    normalised over its channels and all positions."""

    groups: int
    eps: float = 1e-5
    affine: bool = True
    kind: ClassVar[str] = "GroupNorm"

    def infer(self, shapes: list[Shape]) -> Shape:
        if self.groups < 1 or shapes[0][0] % self.groups:
            raise ValueError(f"GroupNorm groups {self.groups} must be >= 1 and divide the {shapes[0][0]} channels")
        return super().infer(shapes)


@dataclass(frozen=True)
class InstanceNorm(_Norm):
    """``F.instance_norm`` without running statistics (torch's default
    ``track_running_stats=False``): each channel of each sample over its positions.
    ``affine`` defaults to False, as in ``nn.InstanceNorm2d``."""

    eps: float = 1e-5
    affine: bool = False
    kind: ClassVar[str] = "InstanceNorm"

    def infer(self, shapes: list[Shape]) -> Shape:
        if len(shapes[0]) < 2:
            raise ValueError(f"InstanceNorm needs spatial dims, got shape {shapes[0]}")
        return super().infer(shapes)


@dataclass(frozen=True)
class Activation(Op):
    """Elementwise activation ``fn`` (see the module's op table). ``alpha`` is
    leaky_relu's negative slope and elu's alpha; ``approximate`` is gelu's form,
    ``"none"`` (exact erf) or ``"tanh"``; ``beta`` and ``threshold`` are softplus's."""

    fn: str
    alpha: float = 0.01
    approximate: str = "none"
    beta: float = _late(1.0)
    threshold: float = _late(20.0)
    kind: ClassVar[str] = "Activation"

    def infer(self, shapes: list[Shape]) -> Shape:
        if self.fn not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {_show(self.fn)}")
        if self.approximate not in ("none", "tanh"):
            raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {_show(self.approximate)}")
        if not self.beta > 0:
            raise ValueError(f"softplus beta must be > 0, got {self.beta}")
        return shapes[0]

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return _prod(out)


@dataclass(frozen=True)
class PReLU(Op):
    """``x if x >= 0 else weight * x`` with a learned slope (``torch.nn.PReLU``):
    weight ``(num_parameters,)``, one slope shared by all channels (1) or one per
    channel (C, axis 1); initialised to 0.25 as in torch."""

    num_parameters: int = 1
    kind: ClassVar[str] = "PReLU"

    def infer(self, shapes: list[Shape]) -> Shape:
        if self.num_parameters not in (1, shapes[0][0]):
            raise ValueError(f"PReLU num_parameters must be 1 or the {shapes[0][0]} channels, got {self.num_parameters}")
        return shapes[0]

    def params(self, shapes: list[Shape]) -> dict[str, Shape]:
        return {"weight": (self.num_parameters,)}

    def init(self, param: str, shape: Shape, shapes: list[Shape]) -> Init:
        return Init("constant", 0.25)

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return _prod(out)


def pool_out(n: int, k: int, s: int, pad: tuple[int, int], ceil_mode: bool) -> int:
    """Output length of a pooling window (PyTorch's rule): with ``ceil_mode`` the
    division rounds up, but a last window that would start in the right padding
    (at or after ``before + n``) is dropped."""
    span = n + pad[0] + pad[1] - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    return out - 1 if ceil_mode and (out - 1) * s >= n + pad[0] else out


@dataclass(frozen=True)
class _Pool(Op):
    kernel: Shape
    stride: Shape
    padding: Padding

    def infer(self, shapes: list[Shape]) -> Shape:
        _check_window(self.kernel, self.stride, self.padding)
        for k, (before, after) in zip(self.kernel, self.padding):
            if before >= k or after >= k:
                raise ValueError(
                    f"pool padding {self.padding} must be smaller than the kernel {self.kernel} on each side "
                    "(a window lying wholly in padding has no value)"
                )
        spatial = _spatial(shapes[0], self.kind, len(self.kernel))
        for i, (n, k, p) in enumerate(zip(spatial, self.kernel, self.padding)):
            _window_out(n, k, 1, 1, p, f"{self.kind} dim {i}")
        out = tuple(
            pool_out(n, k, s, p, self.ceil_mode)  # type: ignore[attr-defined]
            for n, k, s, p in zip(spatial, self.kernel, self.stride, self.padding)
        )
        return (shapes[0][0], *out)

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return _prod(out) * _prod(self.kernel)


@dataclass(frozen=True)
class MaxPool(_Pool):
    """Max pooling; padding never wins (it is -inf). ``ceil_mode``: see :func:`pool_out`."""

    ceil_mode: bool = _late(False)
    kind: ClassVar[str] = "MaxPool"


@dataclass(frozen=True)
class AvgPool(_Pool):
    """Average pooling; ``count_include_pad`` says whether padded zeros count
    in the divisor. ``ceil_mode``: see :func:`pool_out`; the part of a window past
    the right padding never counts (PyTorch's divisor)."""

    count_include_pad: bool = True
    ceil_mode: bool = _late(False)
    kind: ClassVar[str] = "AvgPool"


@dataclass(frozen=True)
class _AdaptivePool(Op):
    """Output ``output_size``; window ``i`` of a dim of size ``n`` covers
    ``[floor(i n / out), ceil((i + 1) n / out))`` (PyTorch's adaptive pooling)."""

    output_size: Shape

    def infer(self, shapes: list[Shape]) -> Shape:
        nd = len(shapes[0]) - 1
        if len(self.output_size) != nd or any(o < 1 for o in self.output_size) or nd == 0:
            raise ValueError(f"output_size must be one size >= 1 for each of the {nd} spatial dims, got {self.output_size}")
        return (shapes[0][0], *self.output_size)

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return _prod(shapes[0]) + _prod(out)  # each window once (overlaps are rare and small)


@dataclass(frozen=True)
class AdaptiveAvgPool(_AdaptivePool):
    kind: ClassVar[str] = "AdaptiveAvgPool"


@dataclass(frozen=True)
class AdaptiveMaxPool(_AdaptivePool):
    kind: ClassVar[str] = "AdaptiveMaxPool"


PAD_MODES = ("constant", "reflect", "replicate")


@dataclass(frozen=True)
class Pad(Op):
    """``F.pad`` of the spatial dims, explicit ``((before, after), ...)`` per dim
    (first spatial dim first, unlike ``F.pad``'s flat last-dim-first list): ``mode``
    ``"constant"`` (``value``), ``"reflect"`` (mirror without the edge: each pad at
    most n - 1) or ``"replicate"`` (repeat the edge)."""

    padding: Padding
    mode: str = "constant"
    value: float = 0.0
    kind: ClassVar[str] = "Pad"

    def infer(self, shapes: list[Shape]) -> Shape:
        spatial = shapes[0][1:]
        if len(self.padding) != len(spatial) or not spatial:
            raise ValueError(f"padding must have one (before, after) pair for each of the {len(spatial)} spatial dims, "
                             f"got {self.padding}")
        if self.mode not in PAD_MODES:
            raise ValueError(f"pad mode must be one of {PAD_MODES}, got {_show(self.mode)}")
        if any(a < 0 or b < 0 for a, b in self.padding):
            raise ValueError(f"padding must be non-negative, got {self.padding}")
        if self.mode != "constant" and self.value != 0.0:
            raise ValueError(f"value is the constant mode's; {self.mode} padding takes none")
        if self.mode == "reflect" and any(max(p) >= n for p, n in zip(self.padding, spatial)):
            raise ValueError(f"reflect padding {self.padding} must be smaller than the input {spatial} in each dim")
        return (shapes[0][0], *(n + a + b for n, (a, b) in zip(spatial, self.padding)))


@dataclass(frozen=True)
class GlobalAvgPool(Op):
    """Mean over all spatial dims: ``(C, *spatial) -> (C,)``."""

    kind: ClassVar[str] = "GlobalAvgPool"

    def infer(self, shapes: list[Shape]) -> Shape:
        if len(shapes[0]) < 2:
            raise ValueError(f"GlobalAvgPool needs spatial dims, got shape {shapes[0]}")
        return (shapes[0][0],)

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return _prod(shapes[0])


def _broadcast(shapes: list[Shape], what: str) -> Shape:
    """The broadcast shape of equal-rank shapes whose sizes agree or are 1 in each dimension."""
    if any(len(s) != len(shapes[0]) for s in shapes):
        raise ValueError(f"{what} needs inputs of equal rank (per sample), got {shapes}")
    out = tuple(max(dims) for dims in zip(*shapes))
    if any(d not in (1, o) for s in shapes for d, o in zip(s, out)):
        raise ValueError(f"{what} needs each dimension equal across inputs or 1 (broadcasting), got {shapes}")
    return out


@dataclass(frozen=True)
class Add(Op):
    """Elementwise sum of two or more inputs, broadcasting (see the module docstring)."""

    kind: ClassVar[str] = "Add"
    arity: ClassVar[tuple[int, int | None]] = (2, None)

    def infer(self, shapes: list[Shape]) -> Shape:
        return _broadcast(shapes, "Add")

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return (len(shapes) - 1) * _prod(out)


@dataclass(frozen=True)
class Mul(Op):
    """Elementwise product of two or more inputs, broadcasting (see the module
    docstring): squeeze-and-excitation's ``x * gate`` with gate ``(C, 1, 1)``."""

    kind: ClassVar[str] = "Mul"
    arity: ClassVar[tuple[int, int | None]] = (2, None)

    def infer(self, shapes: list[Shape]) -> Shape:
        return _broadcast(shapes, "Mul")

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return (len(shapes) - 1) * _prod(out)


@dataclass(frozen=True)
class Scale(Op):
    """``layer_scale * x`` with a learned per-channel ``layer_scale`` of shape
    ``(C, 1, ..., 1)`` (torchvision ConvNeXt's ``CNBlock.layer_scale``, same name and
    layout). ``init_value`` is only the value it starts from (ConvNeXt's 1e-6)."""

    init_value: float = 1e-6
    kind: ClassVar[str] = "Scale"

    def params(self, shapes: list[Shape]) -> dict[str, Shape]:
        return {"layer_scale": (shapes[0][0], *(1 for _ in shapes[0][1:]))}

    def init(self, param: str, shape: Shape, shapes: list[Shape]) -> Init:
        return Init("constant", self.init_value)

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return _prod(out)


@dataclass(frozen=True)
class Concat(Op):
    """Concatenation along channels (axis 1 of the batch)."""

    kind: ClassVar[str] = "Concat"
    arity: ClassVar[tuple[int, int | None]] = (2, None)

    def infer(self, shapes: list[Shape]) -> Shape:
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(f"Concat needs inputs equal in all but the channel dim, got {shapes}")
        return (sum(s[0] for s in shapes), *shapes[0][1:])


@dataclass(frozen=True)
class ChannelShuffle(Op):
    """``nn.ChannelShuffle(groups)`` (ShuffleNet): view the channels as ``(groups, C / groups)``,
    transpose to ``(C / groups, groups)``, flatten; output channel ``j * groups + i`` is
    input channel ``i * (C / groups) + j``."""

    groups: int
    kind: ClassVar[str] = "ChannelShuffle"

    def infer(self, shapes: list[Shape]) -> Shape:
        if self.groups < 1 or shapes[0][0] % self.groups:
            raise ValueError(f"ChannelShuffle groups {self.groups} must be >= 1 and divide the {shapes[0][0]} channels")
        return shapes[0]


@dataclass(frozen=True)
class ChannelSlice(Op):
    """Channels ``start`` to ``stop`` (exclusive): ``x[:, start:stop]`` (ShuffleNet's
    ``x.chunk(2, dim=1)`` is two of them)."""

    start: int
    stop: int
    kind: ClassVar[str] = "ChannelSlice"

    def infer(self, shapes: list[Shape]) -> Shape:
        if not 0 <= self.start < self.stop <= shapes[0][0]:
            raise ValueError(f"ChannelSlice needs 0 <= start < stop <= {shapes[0][0]} channels, "
                             f"got start {self.start}, stop {self.stop}")
        return (self.stop - self.start, *shapes[0][1:])


UPSAMPLE_MODES = ("nearest", "linear")


@dataclass(frozen=True)
class Upsample(Op):
    """``F.interpolate`` to the spatial ``size``. ``mode`` ``"nearest"`` (torch's
    "nearest": source ``min(floor(dst * r), n - 1)``) or ``"linear"`` (torch's linear,
    bilinear, trilinear by rank: source ``r * (dst + 0.5) - 0.5`` clamped at 0, or
    ``dst * (n - 1) / (out - 1)`` with ``align_corners``). ``r`` is ``1 / scale`` when
    ``scale`` is given (torch's ``scale_factor`` without ``recompute_scale_factor``;
    then ``size == floor(n * scale)``) and ``n / size`` when it is ``()``; float64
    arithmetic, as torch's. Linear copies a dim whose size does not change, whatever
    the scale (torch does; nearest does not). See :mod:`hal.lowering` for the indices and weights."""

    size: Shape
    scale: Scales = ()
    mode: str = "nearest"
    align_corners: bool = False
    kind: ClassVar[str] = "Upsample"

    def infer(self, shapes: list[Shape]) -> Shape:
        spatial = shapes[0][1:]
        if len(self.size) != len(spatial) or not spatial or any(o < 1 for o in self.size):
            raise ValueError(f"size must be one size >= 1 for each of the {len(spatial)} spatial dims, got {self.size}")
        if self.mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {_show(self.mode)}")
        if self.align_corners and self.mode == "nearest":
            raise ValueError("align_corners is linear interpolation's; nearest takes none (as in torch)")
        if self.scale:
            if len(self.scale) != len(spatial) or any(not f > 0 for f in self.scale):
                raise ValueError(f"scale must be () or one factor > 0 per spatial dim, got {self.scale}")
            want = tuple(math.floor(n * f) for n, f in zip(spatial, self.scale))
            if want != self.size:
                raise ValueError(f"scale {self.scale} on {spatial} gives size {want} (floor(n * scale)), not {self.size}")
        return (shapes[0][0], *self.size)

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        return _prod(out) * (3 * (len(out) - 1) if self.mode == "linear" else 0)


@dataclass(frozen=True)
class Flatten(Op):
    """Row-major flatten over ``(C, *spatial)``."""

    kind: ClassVar[str] = "Flatten"

    def infer(self, shapes: list[Shape]) -> Shape:
        return (_prod(shapes[0]),)


@dataclass(frozen=True)
class Dense(Op):
    """Fully connected layer over the channel axis: ``(in,) -> (out,)``; on
    ``(in, *spatial)`` it applies at every position, ``-> (out, *spatial)`` (as
    ``nn.Linear`` on a channels-last tensor, ConvNeXt's pointwise layers; a 1x1
    convolution with the weight kept ``(out, in)``). Weight ``(out, in)``, bias ``(out,)``."""

    out_features: int
    bias: bool = True
    kind: ClassVar[str] = "Dense"

    def infer(self, shapes: list[Shape]) -> Shape:
        if self.out_features < 1:
            raise ValueError(f"out_features must be >= 1, got {self.out_features}")
        return (self.out_features, *shapes[0][1:])

    def params(self, shapes: list[Shape]) -> dict[str, Shape]:
        p = {"weight": (self.out_features, shapes[0][0])}
        if self.bias:
            p["bias"] = (self.out_features,)
        return p

    def flops(self, shapes: list[Shape], out: Shape) -> int:
        positions = _prod(shapes[0][1:])
        return positions * (2 * shapes[0][0] * self.out_features + (self.out_features if self.bias else 0))

    def init(self, param: str, shape: Shape, shapes: list[Shape]) -> Init:
        """``torch.nn.Linear``'s default: weight and bias ``U(-1/sqrt(in), 1/sqrt(in))``."""
        return Init("uniform", 1.0 / math.sqrt(shapes[0][0]))


@dataclass(frozen=True)
class Dropout(Op):
    """Dropout with drop probability ``rate``; identity in inference."""

    rate: float = 0.5
    kind: ClassVar[str] = "Dropout"

    def infer(self, shapes: list[Shape]) -> Shape:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {self.rate}")
        return shapes[0]


STOCHASTIC_DEPTH_MODES = ("row", "batch")


@dataclass(frozen=True)
class StochasticDepth(Op):
    """``torchvision.ops.StochasticDepth(p, mode)``: identity in inference; in training
    each sample (``"row"``) or the whole batch (``"batch"``) is zeroed with probability
    ``p`` and otherwise scaled by ``1 / (1 - p)`` (``p = 1`` zeroes everything)."""

    p: float
    mode: str = "row"
    kind: ClassVar[str] = "StochasticDepth"

    def infer(self, shapes: list[Shape]) -> Shape:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"stochastic depth p must be in [0, 1], got {self.p}")
        if self.mode not in STOCHASTIC_DEPTH_MODES:
            raise ValueError(f"stochastic depth mode must be one of {STOCHASTIC_DEPTH_MODES}, got {_show(self.mode)}")
        return shapes[0]


OPS: dict[str, type[Op]] = {
    cls.kind: cls
    for cls in (
        Input, Conv, ConvTranspose, BatchNorm, LayerNorm, GroupNorm, InstanceNorm, Activation, PReLU, MaxPool, AvgPool, AdaptiveAvgPool,
        AdaptiveMaxPool, GlobalAvgPool, Pad, ChannelShuffle, ChannelSlice, Upsample, Add, Mul, Scale, Concat,
        Flatten, Dense, Dropout, StochasticDepth,
    )
}


# ---------------------------------------------------------------------------
# the graph
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One op applied to the outputs of the named input nodes."""

    name: str
    op: Op
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeInfo:
    """Static facts of one node, per sample."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    shape: Shape
    params: int
    buffers: int
    flops: int
    activation_bytes: int


def _infer(node: Node, in_shapes: list[Shape]) -> Shape:
    lo, hi = node.op.arity
    n = len(node.inputs)
    if n < lo or (hi is not None and n > hi):
        want = f"{lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo}..{hi}"
        raise SpecError(f"{node.op.kind} takes {want} inputs, got {n}", node.name)
    try:
        node.op.check_types()
        out = node.op.infer(in_shapes)
    except (ValueError, TypeError, IndexError) as exc:
        raise SpecError(f"{exc} (input shapes {in_shapes})", node.name) from None
    if any(d < 1 for d in out):
        raise SpecError(f"{node.op.kind} gives a non-positive output shape {out} from {in_shapes}", node.name)
    for what, shape in (("output", out), *(("parameter " + p, s) for p, s in node.op.params(in_shapes).items())):
        if _prod(shape) > MAX_ELEMENTS:
            raise SpecError(
                f"{node.op.kind} {what} of shape {shape} has {_prod(shape):.3g} elements per sample; "
                f"hal refuses tensors over {MAX_ELEMENTS:.3g} (2**40) elements",
                node.name,
            )
    return out


def _check_node(node: Any) -> None:
    if not isinstance(node, Node):
        raise SpecError(f"expected a hal.spec.Node, got {type(node).__name__}")
    if not isinstance(node.name, str) or not _NAME.match(node.name):
        raise SpecError("names must be non-empty strings of letters, digits, '_', '.', '-'", _show(node.name))
    if not isinstance(node.op, Op) or type(node.op) not in OPS.values():
        raise SpecError(f"op must be one of hal.spec.{', '.join(OPS)}; got a {type(node.op).__name__}", node.name)
    if not isinstance(node.inputs, tuple) or not all(isinstance(i, str) for i in node.inputs):
        raise SpecError(f"inputs must be a tuple of node names, got {_show(node.inputs)}", node.name)


@dataclass(frozen=True)
class ModelSpec:
    """An immutable, validated model graph.

    ``nodes`` may be given in any order; they are stored in a canonical
    topological order (depth-first from the output, inputs in order), so the same
    graph always has the same JSON and hash. ``output`` defaults to the last node given.
    """

    name: str
    nodes: tuple[Node, ...]
    output: str = ""
    _shapes: dict[str, Shape] = field(init=False, repr=False, compare=False)
    _by_name: dict[str, Node] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise SpecError(f"a spec name must be a string, got {_show(self.name)}")
        if not isinstance(self.output, str):
            raise SpecError(f"spec {self.name!r}: output must be a node name (a string), got {_show(self.output)}")
        if not isinstance(self.nodes, (list, tuple)):
            raise SpecError(f"spec {self.name!r}: nodes must be a tuple of hal.spec.Node, got {type(self.nodes).__name__}")
        nodes = tuple(self.nodes)
        if not nodes:
            raise SpecError(f"spec {self.name!r} has no nodes")
        for n in nodes:
            _check_node(n)
        by_name: dict[str, Node] = {}
        for n in nodes:
            if n.name in by_name:
                raise SpecError("duplicate node name", n.name)
            by_name[n.name] = n
        for n in nodes:
            for i in n.inputs:
                if i not in by_name:
                    raise SpecError(f"unknown input {i!r}", n.name)
        inputs = [n.name for n in nodes if isinstance(n.op, Input)]
        if len(inputs) != 1:
            raise SpecError(f"spec {self.name!r} must have exactly one Input node, has {len(inputs)}: {inputs}")
        output = self.output or nodes[-1].name
        if output not in by_name:
            raise SpecError(f"output {output!r} is not a node of spec {self.name!r}")

        order = _toposort(output, by_name)
        used = {n.name for n in order}
        for n in nodes:
            if n.name not in used:
                raise SpecError(f"node is not used by the output {output!r}", n.name)
        shapes: dict[str, Shape] = {}
        for n in order:
            shapes[n.name] = _infer(n, [shapes[i] for i in n.inputs])
        object.__setattr__(self, "nodes", tuple(order))
        object.__setattr__(self, "output", output)
        object.__setattr__(self, "_shapes", shapes)
        object.__setattr__(self, "_by_name", {n.name: n for n in order})

    # -- structure -----------------------------------------------------------

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def input_shape(self) -> Shape:
        return self._shapes[self.nodes[0].name]

    @property
    def output_shape(self) -> Shape:
        return self._shapes[self.output]

    @property
    def dtype(self) -> str:
        return self.input.op.dtype  # type: ignore[attr-defined]

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        if not isinstance(name, str) or name not in self._by_name:
            raise SpecError(f"spec {self.name!r} has no node {_show(name)}")
        return self._by_name[name]

    def shape(self, name: str) -> Shape:
        """Output shape of a node, per sample."""
        return self._shapes[self.node(name).name]

    def in_shapes(self, node: Node) -> list[Shape]:
        """Per-sample shapes of the inputs of ``node`` (a node of this spec)."""
        if not (isinstance(node, Node) and isinstance(node.name, str) and self._by_name.get(node.name) == node):
            raise SpecError(f"spec {self.name!r}: expected one of its nodes, got {_show(node)}")
        return [self._shapes[i] for i in node.inputs]

    def consumers(self) -> dict[str, list[str]]:
        """Node name -> names of the nodes that read it."""
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n.name)
        return out

    # -- parameters and cost ---------------------------------------------------

    def param_shapes(self, buffers: bool = True) -> dict[str, Shape]:
        """Canonical weight names ``"<node>.<param>"`` -> shape, in node order."""
        if not isinstance(buffers, bool):
            raise SpecError(f"param_shapes: buffers must be a bool, got {_show(buffers)}")
        out: dict[str, Shape] = {}
        for n in self.nodes:
            shapes = self.in_shapes(n)
            items = dict(n.op.params(shapes))
            if buffers:
                items.update(n.op.buffers(shapes))
            for p, s in items.items():
                out[f"{n.name}.{p}"] = s
        return out

    def trainable(self) -> list[str]:
        """Names of the trainable parameters, in node order."""
        return list(self.param_shapes(buffers=False))

    def info(self) -> list[NodeInfo]:
        """Per-node shape, parameter count, forward FLOPs and activation bytes (per sample)."""
        item = DTYPE_BYTES[self.dtype]
        rows = []
        for n in self.nodes:
            ins, out = self.in_shapes(n), self._shapes[n.name]
            rows.append(
                NodeInfo(
                    name=n.name,
                    kind=n.op.kind,
                    inputs=n.inputs,
                    shape=out,
                    params=sum(_prod(s) for s in n.op.params(ins).values()),
                    buffers=sum(_prod(s) for s in n.op.buffers(ins).values()),
                    flops=n.op.flops(ins, out),
                    activation_bytes=_prod(out) * item,
                )
            )
        return rows

    @property
    def num_params(self) -> int:
        return sum(r.params for r in self.info())

    @property
    def flops(self) -> int:
        """Forward FLOPs per sample."""
        return sum(r.flops for r in self.info())

    # -- serialisation -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "output": self.output,
            "nodes": [
                {"name": n.name, "op": n.op.kind, "inputs": list(n.inputs), "attrs": _jsonable(n.op.json_attrs())}
                for n in self.nodes
            ],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """The spec of :meth:`to_dict`'s form; strict: exact types, no unknown or missing keys."""
        if not isinstance(data, Mapping):
            raise SpecError(f"a spec must be a JSON object, got {type(data).__name__}")
        _check_keys(data, _SPEC_KEYS, {"schema_version", "nodes"}, "the spec")
        version = data["schema_version"]
        if type(version) is not int or version != SCHEMA_VERSION:  # neither true nor 1.0
            raise SpecError(f"unsupported spec schema_version {_show(version)}; this hal reads the int {SCHEMA_VERSION}")
        raw_nodes = data["nodes"]
        if not isinstance(raw_nodes, list):
            raise SpecError(f"'nodes' must be a list, got {type(raw_nodes).__name__}")
        nodes = []
        for i, raw in enumerate(raw_nodes):
            where = f"nodes[{i}]"
            if not isinstance(raw, Mapping):
                raise SpecError(f"{where} must be an object, got {type(raw).__name__}")
            _check_keys(raw, _NODE_KEYS, {"name", "op"}, where)
            name, kind, inputs, attrs = raw["name"], raw["op"], raw.get("inputs", []), raw.get("attrs", {})
            if not isinstance(name, str):
                raise SpecError(f"{where}: 'name' must be a string, got {_show(name)}")
            if not isinstance(kind, str) or kind not in OPS:
                raise SpecError(f"unknown op {_show(kind)}; known ops: {sorted(OPS)}", name)
            if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
                raise SpecError(f"'inputs' must be a list of node names, got {_show(inputs)}", name)
            if not isinstance(attrs, Mapping):
                raise SpecError(f"'attrs' must be an object, got {type(attrs).__name__}", name)
            op_cls = OPS[kind]
            fields = dataclasses.fields(op_cls)
            _check_keys(attrs, {f.name for f in fields},
                        {f.name for f in fields if f.default is dataclasses.MISSING}, f"{kind} attrs", name)
            nodes.append(Node(name, op_cls(**attrs), tuple(inputs)))
        for key in ("name", "output"):
            if not isinstance(data.get(key, ""), str):
                raise SpecError(f"the spec's {key!r} must be a string, got {_show(data[key])}")
        return cls(data.get("name", ""), tuple(nodes), data.get("output", ""))

    @classmethod
    def from_json(cls, text: str | bytes) -> "ModelSpec":
        """Parse :meth:`to_json` text (strict as :meth:`from_dict`; duplicate keys are refused)."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise SpecError(f"spec JSON must be str or bytes, got {type(text).__name__}")
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a repeated key
            raise SpecError(f"spec JSON does not parse: {exc}") from None
        except RecursionError:
            raise SpecError("spec JSON is nested too deeply to be a spec") from None
        return cls.from_dict(data)

    @functools.cached_property
    def hash(self) -> str:
        """Stable SHA-256 of the canonical JSON form."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def __repr__(self) -> str:
        return (
            f"ModelSpec({self.name!r}, {len(self.nodes)} nodes, input {self.input_shape}, "
            f"output {self.output_shape}, {self.num_params:,} params)"
        )


_SPEC_KEYS = {"schema_version", "name", "output", "nodes"}
_NODE_KEYS = {"name", "op", "inputs", "attrs"}


def _check_keys(obj: Mapping[str, Any], known: set[str], required: set[str], where: str,
                node: str | None = None) -> None:
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise SpecError(f"{where}: unknown keys {_show(unknown)}; expected {sorted(known)}", node)
    missing = sorted(required - set(obj))
    if missing:
        raise SpecError(f"{where}: missing keys {missing}", node)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _toposort(output: str, by_name: Mapping[str, Node]) -> list[Node]:
    """The nodes the output depends on, in depth-first post-order from the output
    (inputs visited in order): canonical for a graph. Names a node on any cycle."""
    state = {output: 1}  # 1 = on the current path, 2 = done
    order: list[Node] = []
    stack = [(output, 0)]
    while stack:
        name, i = stack.pop()
        node = by_name[name]
        if i < len(node.inputs):
            stack.append((name, i + 1))
            child = node.inputs[i]
            if state.get(child) == 1:
                raise SpecError(f"cycle through input {child!r}", name)
            if child not in state:
                state[child] = 1
                stack.append((child, 0))
        else:
            state[name] = 2
            order.append(node)
    return order


# ---------------------------------------------------------------------------
# the builder
# ---------------------------------------------------------------------------

IntOrTuple = Union[int, Sequence[int]]
PaddingArg = Union[str, int, Sequence[int], Sequence[Sequence[int]]]


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """Explicit (before, after) padding of TensorFlow/JAX ``SAME``: output
    ``ceil(size / stride)``, the odd pixel after."""
    eff = dilation * (kernel - 1) + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + eff - size, 0)
    return (total // 2, total - total // 2)


def _tuple(v: IntOrTuple, nd: int, what: str, node: str) -> Shape:
    if _is_int(v):
        return (int(v),) * nd  # type: ignore[arg-type]
    t = tuple(v) if isinstance(v, (list, tuple)) else ()
    if len(t) != nd or not all(_is_int(x) for x in t):
        raise SpecError(f"{what} must be an int or {nd} ints, got {_show(v)}", node)
    return tuple(int(x) for x in t)


def _padding(p: PaddingArg, spatial: Shape, kernel: Shape, stride: Shape, dilation: Shape, node: str) -> Padding:
    nd = len(spatial)
    bad = SpecError(f"padding must be 'same', 'valid', an int, {nd} ints or {nd} (before, after) int pairs, got {_show(p)}", node)
    if isinstance(p, str):
        if p == "valid":
            return ((0, 0),) * nd
        if p == "same":
            return tuple(same_padding(n, k, s, d) for n, k, s, d in zip(spatial, kernel, stride, dilation))
        raise bad
    if _is_int(p):
        return ((int(p), int(p)),) * nd  # type: ignore[arg-type]
    items = tuple(p) if isinstance(p, (list, tuple)) else ()
    if len(items) != nd:
        raise bad
    if all(_is_int(x) for x in items):
        return tuple((int(x), int(x)) for x in items)  # type: ignore[arg-type]
    if all(isinstance(x, (list, tuple)) and len(x) == 2 and all(_is_int(v) for v in x) for x in items):
        return tuple((int(a), int(b)) for a, b in items)  # type: ignore[misc]
    raise bad


class SpecBuilder:
    """Builds a :class:`ModelSpec` node by node, inferring shapes as it goes.

    Each method returns the new node's name; ``name=`` is optional (an
    automatic ``<kind>_<n>`` name is used otherwise). Errors are raised when the
    offending node is added.

    >>> b = SpecBuilder("tiny")
    >>> x = b.input((3, 32, 32))
    >>> x = b.relu(b.batch_norm(b.conv(x, 8, 3, padding="same")))
    >>> spec = b.build(b.dense(b.global_avg_pool(x), 10))
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise SpecError(f"a spec name must be a string, got {_show(name)}")
        self.name = name
        self._nodes: list[Node] = []
        self._shapes: dict[str, Shape] = {}
        self._count = 0

    def shape(self, name: str) -> Shape:
        """Output shape of a node added so far, per sample."""
        if not isinstance(name, str) or name not in self._shapes:
            raise SpecError(f"spec {self.name!r} has no node {_show(name)} (yet)")
        return self._shapes[name]

    def op(self, op: Op, inputs: Sequence[str] = (), name: str | None = None) -> str:
        """Append any op; returns its name."""
        if name is not None and not isinstance(name, str):
            raise SpecError(f"a node name must be a string, got {_show(name)}")
        if not isinstance(op, Op):
            raise SpecError(f"expected a hal.spec op ({', '.join(OPS)}), got a {type(op).__name__}", name)
        if not isinstance(inputs, (list, tuple)):
            raise SpecError(f"inputs must be a sequence of node names, got {_show(inputs)}", name)
        self._count += 1
        name = name or f"{op.kind.lower()}_{self._count}"
        node = Node(name, op, tuple(inputs))
        _check_node(node)
        if name in self._shapes:
            raise SpecError("duplicate node name", name)
        for i in node.inputs:
            if i not in self._shapes:
                raise SpecError(f"unknown input {i!r}", name)
        self._shapes[name] = _infer(node, [self._shapes[i] for i in node.inputs])
        self._nodes.append(node)
        return name

    def _spatial(self, x: str, name: str | None, what: str) -> Shape:
        if not isinstance(x, str) or x not in self._shapes:
            raise SpecError(f"unknown input {_show(x)}", name or what)
        return self._shapes[x][1:]

    def input(self, shape: Sequence[int], dtype: str = "float32", name: str = "input") -> str:
        """The graph input, ``(C, *spatial)`` per sample."""
        if isinstance(shape, Iterable) and not isinstance(shape, (str, bytes, Mapping)):
            shape = tuple(shape)
        return self.op(Input(shape, dtype), (), name)  # type: ignore[arg-type]

    def conv(
        self,
        x: str,
        out_channels: int,
        kernel: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: PaddingArg = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        name: str | None = None,
    ) -> str:
        spatial = self._spatial(x, name, "conv")
        nd, label = len(spatial), name or "conv"
        k, s, d = (_tuple(v, nd, w, label) for v, w in ((kernel, "kernel"), (stride, "stride"), (dilation, "dilation")))
        pad = _padding(padding, spatial, k, s, d, label)
        return self.op(Conv(out_channels, k, s, pad, d, groups, bias), (x,), name)

    def conv_transpose(
        self,
        x: str,
        out_channels: int,
        kernel: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: PaddingArg = 0,
        output_padding: IntOrTuple = 0,
        groups: int = 1,
        dilation: IntOrTuple = 1,
        bias: bool = True,
        name: str | None = None,
    ) -> str:
        """``nn.ConvTranspose{1,2,3}d``'s arguments, in its order; ``padding`` is an int,
        one int per dim (torch's) or ``(before, after)`` per dim (cropped from the full output)."""
        spatial = self._spatial(x, name, "conv_transpose")
        nd, label = len(spatial), name or "conv_transpose"
        k, s, d, q = (_tuple(v, nd, w, label) for v, w in (
            (kernel, "kernel"), (stride, "stride"), (dilation, "dilation"), (output_padding, "output_padding")))
        if isinstance(padding, str):
            raise SpecError(f"conv_transpose padding takes explicit numbers, not {padding!r}", label)
        pad = _padding(padding, spatial, k, s, d, label)
        return self.op(ConvTranspose(out_channels, k, s, pad, q, d, groups, bias), (x,), name)

    def batch_norm(self, x: str, eps: float = 1e-5, momentum: float = 0.1, name: str | None = None) -> str:
        return self.op(BatchNorm(eps, momentum), (x,), name)

    def layer_norm(self, x: str, eps: float = 1e-5, affine: bool = True, name: str | None = None) -> str:
        """LayerNorm over channels (ConvNeXt's channels-first form; ConvNeXt passes eps=1e-6)."""
        return self.op(LayerNorm(eps, affine), (x,), name)

    def group_norm(self, x: str, groups: int, eps: float = 1e-5, affine: bool = True, name: str | None = None) -> str:
        return self.op(GroupNorm(groups, eps, affine), (x,), name)

    def instance_norm(self, x: str, eps: float = 1e-5, affine: bool = False, name: str | None = None) -> str:
        return self.op(InstanceNorm(eps, affine), (x,), name)

    def activation(self, x: str, fn: str, alpha: float = 0.01, approximate: str = "none", name: str | None = None) -> str:
        return self.op(Activation(fn, alpha, approximate), (x,), name)

    def relu(self, x: str, name: str | None = None) -> str:
        return self.activation(x, "relu", name=name)

    def elu(self, x: str, alpha: float = 1.0, name: str | None = None) -> str:
        """ELU with torch's default ``alpha`` 1."""
        return self.activation(x, "elu", alpha=alpha, name=name)

    def softplus(self, x: str, beta: float = 1.0, threshold: float = 20.0, name: str | None = None) -> str:
        return self.op(Activation("softplus", beta=beta, threshold=threshold), (x,), name)

    def prelu(self, x: str, num_parameters: int = 1, name: str | None = None) -> str:
        """PReLU: one learned slope (``num_parameters=1``) or one per channel (C)."""
        return self.op(PReLU(num_parameters), (x,), name)

    def _pool(self, cls: type[_Pool], x: str, kernel: IntOrTuple, stride: IntOrTuple | None,
              padding: PaddingArg, name: str | None, **extra: Any) -> str:
        spatial = self._spatial(x, name, cls.kind)
        nd, label = len(spatial), name or cls.kind
        k = _tuple(kernel, nd, "kernel", label)
        s = _tuple(k if stride is None else stride, nd, "stride", label)
        pad = _padding(padding, spatial, k, s, (1,) * nd, label)
        return self.op(cls(k, s, pad, **extra), (x,), name)

    def max_pool(self, x: str, kernel: IntOrTuple, stride: IntOrTuple | None = None,
                 padding: PaddingArg = 0, ceil_mode: bool = False, name: str | None = None) -> str:
        """Max pooling; ``stride`` defaults to the kernel, as in PyTorch and Keras."""
        return self._pool(MaxPool, x, kernel, stride, padding, name, ceil_mode=ceil_mode)

    def avg_pool(self, x: str, kernel: IntOrTuple, stride: IntOrTuple | None = None, padding: PaddingArg = 0,
                 count_include_pad: bool = True, ceil_mode: bool = False, name: str | None = None) -> str:
        """Average pooling; ``stride`` defaults to the kernel."""
        return self._pool(AvgPool, x, kernel, stride, padding, name, count_include_pad=count_include_pad,
                          ceil_mode=ceil_mode)

    def adaptive_avg_pool(self, x: str, size: IntOrTuple, name: str | None = None) -> str:
        """Adaptive average pooling to ``size`` (an int for every spatial dim, or one per dim)."""
        nd = len(self._spatial(x, name, "adaptive_avg_pool"))
        return self.op(AdaptiveAvgPool(_tuple(size, nd, "size", name or "adaptive_avg_pool")), (x,), name)

    def adaptive_max_pool(self, x: str, size: IntOrTuple, name: str | None = None) -> str:
        nd = len(self._spatial(x, name, "adaptive_max_pool"))
        return self.op(AdaptiveMaxPool(_tuple(size, nd, "size", name or "adaptive_max_pool")), (x,), name)

    def pad(self, x: str, pads: PaddingArg, mode: str = "constant", value: float = 0.0,
            name: str | None = None) -> str:
        """Pad the spatial dims: an int, one int per dim or ``(before, after)`` per dim,
        first spatial dim first (not ``F.pad``'s flat last-dim-first order)."""
        spatial = self._spatial(x, name, "pad")
        if isinstance(pads, str):
            raise SpecError(f"pad takes explicit numbers, not {pads!r}", name or "pad")
        ones = (1,) * len(spatial)
        return self.op(Pad(_padding(pads, spatial, ones, ones, ones, name or "pad"), mode, value), (x,), name)

    def global_avg_pool(self, x: str, name: str | None = None) -> str:
        return self.op(GlobalAvgPool(), (x,), name)

    def add(self, *xs: str, name: str | None = None) -> str:
        """Elementwise sum of two or more nodes (residual), broadcasting."""
        return self.op(Add(), xs, name)

    def mul(self, *xs: str, name: str | None = None) -> str:
        """Elementwise product of two or more nodes, broadcasting (``x * gate``)."""
        return self.op(Mul(), xs, name)

    def scale(self, x: str, init: float = 1e-6, name: str | None = None) -> str:
        """Learned per-channel scale (layer scale), starting at ``init``."""
        return self.op(Scale(init), (x,), name)

    def concat(self, *xs: str, name: str | None = None) -> str:
        return self.op(Concat(), xs, name)

    def upsample(self, x: str, size: IntOrTuple | None = None, scale: float | Sequence[float] | None = None,
                 mode: str = "nearest", align_corners: bool | None = None, name: str | None = None) -> str:
        """``F.interpolate(x, size, scale_factor, mode, align_corners)``: exactly one of
        ``size`` and ``scale``; ``mode`` "nearest", "linear", "bilinear" or "trilinear"
        (the last three are one "linear" checked against the rank)."""
        spatial = self._spatial(x, name, "upsample")
        nd, label = len(spatial), name or "upsample"
        linear = {"linear": 1, "bilinear": 2, "trilinear": 3}
        if mode in linear and linear[mode] != nd and mode != "linear":
            raise SpecError(f"mode {mode!r} is for {linear[mode]} spatial dims; this input has {nd}", label)
        if (size is None) == (scale is None):
            raise SpecError("upsample takes exactly one of size and scale", label)
        if scale is None:
            out, factors = _tuple(size, nd, "size", label), ()  # type: ignore[arg-type]
        else:
            factors = (scale,) * nd if isinstance(scale, numbers.Real) else tuple(scale)  # type: ignore[arg-type]
            if len(factors) != nd or not all(isinstance(f, numbers.Real) and f > 0 for f in factors):
                raise SpecError(f"scale must be a number > 0 or {nd} of them, got {_show(scale)}", label)
            out = tuple(math.floor(n * float(f)) for n, f in zip(spatial, factors))
        op = Upsample(out, factors, "linear" if mode in linear else mode, bool(align_corners))
        return self.op(op, (x,), name)

    def channel_shuffle(self, x: str, groups: int, name: str | None = None) -> str:
        return self.op(ChannelShuffle(groups), (x,), name)

    def channel_slice(self, x: str, start: int, stop: int, name: str | None = None) -> str:
        """Channels ``start:stop`` of ``x``."""
        return self.op(ChannelSlice(start, stop), (x,), name)

    def flatten(self, x: str, name: str | None = None) -> str:
        return self.op(Flatten(), (x,), name)

    def dense(self, x: str, out_features: int, bias: bool = True, name: str | None = None) -> str:
        return self.op(Dense(out_features, bias), (x,), name)

    def dropout(self, x: str, rate: float = 0.5, name: str | None = None) -> str:
        return self.op(Dropout(rate), (x,), name)

    def stochastic_depth(self, x: str, p: float, mode: str = "row", name: str | None = None) -> str:
        """``torchvision.ops.StochasticDepth(p, mode)``: drop whole residual branches in training."""
        return self.op(StochasticDepth(p, mode), (x,), name)

    def build(self, output: str | None = None) -> ModelSpec:
        """The finished spec; ``output`` defaults to the last node added."""
        if output is not None and not isinstance(output, str):
            raise SpecError(f"spec {self.name!r}: output must be a node name (a string), got {_show(output)}")
        return ModelSpec(self.name, tuple(self._nodes), output or "")
