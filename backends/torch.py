"""PyTorch backend: ``torch:cpu`` and ``torch:cuda:N``.

The spec becomes a :class:`TorchGraph`, an ``nn.Module`` whose submodules sit
at the canonical dotted node names, so ``state_dict()`` keys *are* the canonical
weight names (a torchvision ResNet checkpoint loads as is). Each op is one small
module, read as a table from op to torch call (``_modules``); the decisions that
do not depend on torch (padding split, average-pool divisor, which BatchNorms
fold, liveness, precision dtypes) come from :mod:`hal.lowering`. The PopTorch
backend builds the same module with :func:`build_module`. Most ops are torch's own
(the spec's meaning is torch's); where a torch call says something else, the module
says how it gets the spec's: pools whose ``ceil_mode`` adds a window pad explicitly
(:func:`hal.lowering.pool_padding`), transposed convolutions crop an asymmetric
padding, nearest upsampling gathers the spec's indices where torch's CPU kernel rounds
its own way, and the channels-first LayerNorm normalises the channels-last view.

Option ``fast`` (default True) buys speed without changing numbers beyond
rounding: inference runs under ``torch.inference_mode`` on a copy with BatchNorm
folded into the preceding convolution, rebuilt only when the weights change, and
2-d models run channels_last (NHWC memory, NCHW semantics: measured faster for
ResNet50 on the CPU with oneDNN, and the layout cuDNN prefers); activations, Add
and Mul write into their first input where nothing else reads its memory (under
autograd only where no backward reads the overwritten value: ``TorchGraph``), as
torchvision's in-place ReLU and residual add do (fresh buffers cost page faults:
on the CPU ResNet50 infers 1.2x and trains 1.1x faster). ``fast=False``
is plain eager NCHW PyTorch, the float64 autodiff reference of the parity harness.
Either way the optimizer uses torch's ``foreach`` kernels and ``run_steps``
copies its batches to the device once per call.

Option ``compile`` (default None: eager) puts ``torch.compile`` (inductor) around the
module that ``predict`` runs and the one the training forward runs; the backward is
compiled with it (AOTAutograd). Everything around those calls stays eager, so the
semantics are eager torch's: gradient accumulation, the loss in master precision,
the non-finite check and its rollback (the compiled forward writes the BatchNorm
running statistics back into the same buffers), the optimizer. The folded inference
copy is refolded in place after a weight change, so a compiled copy stays valid.
Each new shape, precision or mode (training, statistics updated or not) compiles on
its first call; on the CPU inductor needs a C++ compiler.

Non-finite steps (``config.check_finite``): after the backward of a step,
``torch.amp.GradScaler``'s own check (``torch._amp_foreach_non_finite_check_and_unscale_``
with scale 1: one read of every gradient, exact where a norm could overflow) and
one host sync decide, as GradScaler does before its step. A bad step never
reaches ``optimizer.step()``, and the BatchNorm running statistics, which the
training forward updates in place, are restored from a snapshot taken before it.
With fp16, a gradient overflow is loss scaling's business (``GradScaler`` skips
the update and lowers the scale); only a non-finite loss stops training.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import operator
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from hal import spec as S
from hal.backend import (
    Availability,
    Backend,
    Capabilities,
    Executable,
    Option,
    Target,
    Weights,
    package_availability,
)
from hal.errors import TargetError, UnsupportedError
from hal.lowering import (
    COMPUTE_DTYPE,
    LOSS_SCALE,
    LOSS_SCALED,
    MASTER_DTYPE,
    avg_pool_divisor,
    fold_batchnorm,
    foldable_batchnorms,
    free_after,
    nearest_indices,
    pool_padding,
    symmetric,
    torch_conv_transpose,
    torch_pad,
)
from hal.training import SGD, AdamW, TrainConfig

if TYPE_CHECKING:  # torch is imported lazily: listing backends must not import it
    import torch
    from torch import nn

    from hal.ipu import Plan


def _native_pad(sizes: S.Shape, op: S.MaxPool | S.AvgPool) -> tuple[int, ...] | None:
    """The per-dimension pad a torch pooling op applies itself, else None (then ``F.pad`` first): the
    padding is symmetric, at most half the kernel, and ``ceil_mode`` adds no window. ``ceil_mode``
    always becomes explicit padding (:func:`hal.lowering.pool_padding`), so PopTorch's pools, which
    round up by ONNX's rule rather than torch's, never see it."""
    pad = symmetric(op.padding)
    if pad is None or any(p > k // 2 for p, k in zip(pad, op.kernel)) or pool_padding(sizes, op) != op.padding:
        return None
    return pad


def _over_channels(fn: Callable[["torch.Tensor"], "torch.Tensor"], x: "torch.Tensor") -> "torch.Tensor":
    """``fn`` of the last axis applied over the channel axis of ``x``, on the channels-last view: no
    copy when the memory is channels_last already (the fast path), else made NCHW-contiguous again."""
    y = fn(x.movedim(1, -1)).movedim(-1, 1)
    return y if x.stride(1) == 1 else y.contiguous()


def _modules() -> dict[type[S.Op], type]:
    """op -> module class; defined on first use so that importing this file needs no torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, op: S.Conv, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            shapes = op.params(in_shapes)
            self.weight = nn.Parameter(torch.empty(shapes["weight"]))
            self.bias = nn.Parameter(torch.empty(shapes["bias"])) if op.bias else None
            self.fn = (F.conv1d, F.conv2d, F.conv3d)[len(op.kernel) - 1]
            self.op = op
            self.pad = symmetric(op.padding)  # None: F.pad first
            self.flat = torch_pad(op.padding)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            op = self.op
            if self.pad is None:
                return self.fn(F.pad(x, self.flat), self.weight, self.bias, op.stride, 0, op.dilation, op.groups)
            return self.fn(x, self.weight, self.bias, op.stride, self.pad, op.dilation, op.groups)

    class ConvTranspose(nn.Module):
        def __init__(self, op: S.ConvTranspose, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            shapes = op.params(in_shapes)
            self.weight = nn.Parameter(torch.empty(shapes["weight"]))
            self.bias = nn.Parameter(torch.empty(shapes["bias"])) if op.bias else None
            self.fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(op.kernel) - 1]
            self.op = op
            self.pad, crop = torch_conv_transpose(op)  # torch pads both sides alike: crop the rest
            out = op.infer(in_shapes)[1:]
            self.crop = None if not any(map(any, crop)) else (
                slice(None), slice(None), *(slice(a, a + n) for (a, _), n in zip(crop, out)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            op = self.op
            y = self.fn(x, self.weight, self.bias, op.stride, self.pad, op.output_padding, op.groups, op.dilation)
            return y if self.crop is None else y[self.crop]

    class BatchNorm(nn.Module):
        def __init__(self, op: S.BatchNorm, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            c = in_shapes[0][0]
            self.weight, self.bias = nn.Parameter(torch.empty(c)), nn.Parameter(torch.empty(c))
            self.register_buffer("running_mean", torch.empty(c))
            self.register_buffer("running_var", torch.empty(c))
            self.op = op
            self.update_stats = True  # training mode: update running statistics?
            self.sync: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None  # synchronised training forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            op = self.op
            if not self.training:
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, op.eps)
            if self.sync is not None and torch.is_grad_enabled():  # predict(training=True) is replica 0's alone
                return self.sync(self, x)
            if self.update_stats:  # torch's rule is the canonical one: biased to normalise, unbiased to track
                return F.batch_norm(
                    x, self.running_mean, self.running_var, self.weight, self.bias, True, op.momentum, op.eps
                )
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, op.eps)

    class Norm(nn.Module):
        """The per-sample norms: per-channel weight and bias when ``op.affine``."""

        def __init__(self, op: S.LayerNorm | S.GroupNorm | S.InstanceNorm, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            c = in_shapes[0][0]
            self.weight = nn.Parameter(torch.empty(c)) if op.affine else None
            self.bias = nn.Parameter(torch.empty(c)) if op.affine else None
            self.op = op

    class LayerNorm(Norm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _over_channels(lambda t: F.layer_norm(t, t.shape[-1:], self.weight, self.bias, self.op.eps), x)

    class GroupNorm(Norm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.group_norm(x, self.op.groups, self.weight, self.bias, self.op.eps)

    class InstanceNorm(Norm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.op.eps)

    class Activation(nn.Module):
        FNS = {
            "relu": lambda x, op: F.relu(x),
            "leaky_relu": lambda x, op: F.leaky_relu(x, op.alpha),
            "sigmoid": lambda x, op: torch.sigmoid(x),
            "tanh": lambda x, op: torch.tanh(x),
            "silu": lambda x, op: F.silu(x),
            "gelu": lambda x, op: F.gelu(x, approximate=op.approximate),
            "relu6": lambda x, op: F.relu6(x),
            "elu": lambda x, op: F.elu(x, op.alpha),
            "hardsigmoid": lambda x, op: F.hardsigmoid(x),
            "hardswish": lambda x, op: F.hardswish(x),
            "softplus": lambda x, op: F.softplus(x, op.beta, op.threshold),
            "mish": lambda x, op: F.mish(x),
        }

        IN_PLACE = {  # the same kernels, writing into x
            "relu": lambda x, op: x.relu_(),
            "leaky_relu": lambda x, op: F.leaky_relu_(x, op.alpha),
            "sigmoid": lambda x, op: x.sigmoid_(),
            "tanh": lambda x, op: x.tanh_(),
            "silu": lambda x, op: F.silu(x, inplace=True),
            "relu6": lambda x, op: F.relu6(x, inplace=True),
            "elu": lambda x, op: F.elu_(x, op.alpha),
            "hardsigmoid": lambda x, op: F.hardsigmoid(x, inplace=True),
            "hardswish": lambda x, op: F.hardswish(x, inplace=True),
            "mish": lambda x, op: F.mish(x, inplace=True),
        }

        def __init__(self, op: S.Activation, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.op, self.fn = op, self.FNS[op.fn]

        def forward(self, x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
            """``in_place``: write into ``x`` where torch has the in-place form."""
            return (self.IN_PLACE.get(self.op.fn, self.fn) if in_place else self.fn)(x, self.op)

    class PReLU(nn.Module):
        def __init__(self, op: S.PReLU, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(op.num_parameters))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.prelu(x, self.weight)

    class MaxPool(nn.Module):
        def __init__(self, op: S.MaxPool, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.op, self.fn = op, (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(op.kernel) - 1]
            self.pad = _native_pad(in_shapes[0][1:], op)  # torch pads max-pool with -inf itself
            self.flat = torch_pad(pool_padding(in_shapes[0][1:], op))  # else -inf, ceil_mode's windows included

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            op = self.op
            if self.pad is not None:
                return self.fn(x, op.kernel, op.stride, self.pad)
            return self.fn(F.pad(x, self.flat, value=float("-inf")), op.kernel, op.stride)

    class AvgPool(nn.Module):
        def __init__(self, op: S.AvgPool, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            sizes = in_shapes[0][1:]
            self.op, self.fn = op, (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(op.kernel) - 1]
            # torch's avg_pool3d rejects an input smaller than the kernel, padded or not
            self.pad = _native_pad(sizes, op) if all(n >= k for n, k in zip(sizes, op.kernel)) else None
            self.flat = torch_pad(pool_padding(sizes, op))
            # F.pad then a plain average divides by prod(kernel): rescale to the canonical divisor
            scale = math.prod(op.kernel) / avg_pool_divisor(sizes, op)
            self.register_buffer("scale", torch.from_numpy(scale) if (scale != 1).any() else None, persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            op = self.op
            if self.pad is not None:
                return self.fn(x, op.kernel, op.stride, self.pad, count_include_pad=op.count_include_pad)
            out = self.fn(F.pad(x, self.flat), op.kernel, op.stride)
            return out if self.scale is None else out * self.scale

    class AdaptivePool(nn.Module):
        FNS = {
            S.AdaptiveAvgPool: (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d),
            S.AdaptiveMaxPool: (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d),
        }

        def __init__(self, op: S.AdaptiveAvgPool | S.AdaptiveMaxPool, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.size, self.fn = op.output_size, self.FNS[type(op)][len(op.output_size) - 1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fn(x, self.size)

    class Pad(nn.Module):
        def __init__(self, op: S.Pad, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.flat, self.mode = torch_pad(op.padding), op.mode
            self.value = op.value if op.mode == "constant" else None  # F.pad's other modes take no value

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, self.flat, self.mode, self.value)

    class GlobalAvgPool(nn.Module):
        def __init__(self, op: S.GlobalAvgPool, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.dims = tuple(range(2, len(in_shapes[0]) + 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=self.dims)

    class Elementwise(nn.Module):
        FNS = {S.Add: operator.add, S.Mul: operator.mul}
        IN_PLACE = {S.Add: torch.Tensor.add_, S.Mul: torch.Tensor.mul_}

        def __init__(self, op: S.Add | S.Mul, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.fn, self.fn_ = self.FNS[type(op)], self.IN_PLACE[type(op)]

        def forward(self, *xs: torch.Tensor, in_place: bool = False) -> torch.Tensor:
            """``in_place``: write into ``xs[0]`` (in the same order) where the result has its shape and dtype."""
            if in_place and torch.broadcast_shapes(*(x.shape for x in xs)) == xs[0].shape and all(
                    torch.result_type(xs[0], x) == xs[0].dtype for x in xs[1:]):
                return functools.reduce(self.fn_, xs)
            return functools.reduce(self.fn, xs)  # torch broadcasts as the spec does (equal ranks)

    class Scale(nn.Module):
        def __init__(self, op: S.Scale, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.layer_scale = nn.Parameter(torch.empty(op.params(in_shapes)["layer_scale"]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer_scale * x

    class Upsample(nn.Module):
        def __init__(self, op: S.Upsample, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            linear = op.mode == "linear"
            self.mode = ("linear", "bilinear", "trilinear")[len(op.size) - 1] if linear else op.mode
            self.align_corners = op.align_corners if linear else None
            # a scale maps coordinates by 1 / scale (torch's scale_factor), a size by n / size
            self.size, self.scale = (None, op.scale) if op.scale else (op.size, None)
            # torch's 2-d and 3-d nearest kernels on the CPU copy a dim whose size is unchanged and halve a
            # doubled one, whatever scale_factor says: there, gather the spec's source indices instead
            sizes = in_shapes[0][1:]
            self.gather = op.mode == "nearest" and any(
                o in (n, 2 * n) and f != o / n for n, o, f in zip(sizes, op.size, op.scale)
            )
            for d, n in enumerate(sizes if self.gather else ()):
                self.register_buffer(f"index{d}", torch.from_numpy(nearest_indices(op, d, n)), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.gather:
                for d in range(x.dim() - 2):
                    x = x.index_select(2 + d, getattr(self, f"index{d}"))
                return x
            return F.interpolate(x, self.size, self.scale, self.mode, self.align_corners)

    class ChannelShuffle(nn.Module):
        def __init__(self, op: S.ChannelShuffle, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.groups = op.groups
            self.native = len(in_shapes[0]) > 1  # F.channel_shuffle needs spatial dims
            self.differentiable = torch.__version__ >= (2, 5)  # F.channel_shuffle's derivative: torch 2.5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.native and x.device.type in ("cpu", "cuda"):  # torch's kernel, CPU/CUDA only: keeps channels_last
                if self.differentiable:
                    return F.channel_shuffle(x, self.groups)
                return _over_channels(self._shuffle_last, x)  # before: the permutation, keeping channels_last too
            return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)  # elsewhere (PopTorch's IPU)

        def _shuffle_last(self, x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.groups, -1)).transpose(-1, -2).flatten(-2)

    class ChannelSlice(nn.Module):
        def __init__(self, op: S.ChannelSlice, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.start, self.stop = op.start, op.stop

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, self.start : self.stop]

    class Concat(nn.Module):
        def __init__(self, op: S.Concat, in_shapes: list[S.Shape]) -> None:
            super().__init__()

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return torch.cat(xs, dim=1)

    class Flatten(nn.Module):
        def __init__(self, op: S.Flatten, in_shapes: list[S.Shape]) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.flatten(x, 1)  # logical (C, *spatial) order, whatever the memory format

    class Dense(nn.Module):
        def __init__(self, op: S.Dense, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            shapes = op.params(in_shapes)
            self.weight = nn.Parameter(torch.empty(shapes["weight"]))
            self.bias = nn.Parameter(torch.empty(shapes["bias"])) if op.bias else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _over_channels(lambda t: F.linear(t, self.weight, self.bias), x)  # at every position

    class Dropout(nn.Module):
        def __init__(self, op: S.Dropout, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.rate = op.rate

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(x, self.rate, self.training)

    class StochasticDepth(nn.Module):
        """``torchvision.ops.stochastic_depth``: in training, each sample (row) or the batch is
        zeroed with probability p, else scaled by 1 / (1 - p)."""

        def __init__(self, op: S.StochasticDepth, in_shapes: list[S.Shape]) -> None:
            super().__init__()
            self.p, self.row = op.p, op.mode == "row"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training or self.p == 0.0:
                return x
            keep = 1.0 - self.p
            shape = (x.shape[0] if self.row else 1,) + (1,) * (x.dim() - 1)
            noise = torch.bernoulli(x.new_full(shape, keep))
            return x * (noise / keep if keep > 0.0 else noise)

    return {
        S.Conv: Conv, S.ConvTranspose: ConvTranspose, S.BatchNorm: BatchNorm, S.LayerNorm: LayerNorm,
        S.GroupNorm: GroupNorm, S.InstanceNorm: InstanceNorm, S.Activation: Activation, S.PReLU: PReLU,
        S.MaxPool: MaxPool, S.AvgPool: AvgPool, S.AdaptiveAvgPool: AdaptivePool, S.AdaptiveMaxPool: AdaptivePool,
        S.Pad: Pad, S.GlobalAvgPool: GlobalAvgPool, S.Upsample: Upsample, S.ChannelShuffle: ChannelShuffle,
        S.ChannelSlice: ChannelSlice, S.Add: Elementwise, S.Mul: Elementwise, S.Scale: Scale, S.Concat: Concat,
        S.Flatten: Flatten, S.Dense: Dense, S.Dropout: Dropout, S.StochasticDepth: StochasticDepth,
    }


_MODULES: dict[type[S.Op], type] = {}


def _graph_class() -> type:
    import torch
    from torch import nn

    class TorchGraph(nn.Module):
        """The spec as an ``nn.Module``: one submodule per node, at its dotted name. With ``reuse_buffers``
        an activation, Add or Mul writes its result into its first input where nothing else reads that
        input's memory (as torchvision's in-place ReLU and residual add do); under autograd only where the
        overwritten value is no saved tensor: a ReLU-like activation (whose backward reads its result) or
        an Add after a convolution or BatchNorm (whose backwards read their inputs), or the activation after
        such an Add."""

        RESULT_BACKWARD = ("relu", "relu6", "leaky_relu", "elu", "sigmoid", "tanh")

        def __init__(self, spec: S.ModelSpec) -> None:
            super().__init__()
            self.reuse_buffers = False
            if not _MODULES:
                _MODULES.update(_modules())
            self.spec = spec
            mods = {n.name: _MODULES[type(n.op)](n.op, spec.in_shapes(n)) for n in spec.nodes[1:]}
            for name in sorted(mods, key=lambda k: k.count(".")):  # parents before children
                parent_path, _, leaf = name.rpartition(".")
                parent = self
                for part in parent_path.split(".") if parent_path else ():
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                if hasattr(parent, leaf):
                    raise UnsupportedError(f"node {name!r}: its name clashes with another node's module path")
                parent.add_module(leaf, mods[name])
            free = free_after(spec)
            self._plan = [(n.name, mods[n.name], n.inputs, free[i], hasattr(mods[n.name], "IN_PLACE"),
                           self._autograd_writable(n, mods)) for i, n in enumerate(spec.nodes) if i > 0]

        def _autograd_writable(self, node: S.Node, mods: dict[str, nn.Module]) -> nn.Module | None:
            """The module whose output ``node`` may overwrite under autograd (None: not under autograd)."""
            src = self.spec.node(node.inputs[0])
            if isinstance(node.op, S.Activation) and node.op.fn in self.RESULT_BACKWARD:
                ok = (S.Conv, S.BatchNorm, S.Add)
            elif isinstance(node.op, S.Add):
                ok = (S.Conv, S.BatchNorm)
            else:
                return None
            return mods[src.name] if isinstance(src.op, ok) else None

        def node_module(self, name: str) -> nn.Module:
            return self.get_submodule(name)

        def set_update_stats(self, flag: bool) -> None:
            for m in self.modules():
                if hasattr(m, "update_stats"):
                    m.update_stats = flag

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            vals = {self.spec.input.name: x}
            autograd = torch.is_grad_enabled()
            for name, mod, ins, free, has_in_place, src in self._plan:
                args = [vals[k] for k in ins]
                # under autograd: not after a synchronised BatchNorm (an autograd function of its own)
                if (self.reuse_buffers and has_in_place and ins[0] in free
                        and (not autograd or src is not None and getattr(src, "sync", None) is None)
                        and self._sole(vals, ins[0], x)):
                    vals[name] = mod(*args, in_place=True)
                else:
                    vals[name] = mod(*args)
                for k in free:
                    del vals[k]
            return vals[self.spec.output]

        @staticmethod
        def _sole(vals: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> bool:
            """Whether ``vals[key]``'s memory is neither the caller's input's nor any other live value's."""
            ptr = vals[key].untyped_storage().data_ptr()
            return ptr != x.untyped_storage().data_ptr() and all(
                v.untyped_storage().data_ptr() != ptr for k, v in vals.items() if k != key)

        def fused(self) -> "TorchGraph":
            """An inference copy with every foldable BatchNorm (:func:`hal.lowering.foldable_batchnorms`)
            folded into its convolution's weight and bias, by :func:`hal.lowering.fold_batchnorm`'s formula;
            :meth:`refold` brings it up to date with this graph's weights."""
            g = copy.deepcopy(self)
            folds = foldable_batchnorms(self.spec)
            for i, (name, _, ins, free, _, src) in enumerate(g._plan):
                if name in folds:
                    conv = g.get_submodule(folds[name])
                    if conv.bias is None:
                        conv.bias = nn.Parameter(conv.weight.new_empty(conv.weight.shape[0]))
                    g._plan[i] = (name, nn.Identity(), ins, free, False, src)
            self.refold(g)
            return g.eval()

        def refold(self, fused: "TorchGraph") -> None:
            """Copy this graph's weights into its :meth:`fused` copy, folding the BatchNorms again: in place,
            so that a ``torch.compile`` of the copy stays valid."""
            folds = foldable_batchnorms(self.spec)
            convs = set(folds.values())
            mine = self.state_dict()
            with torch.no_grad():
                for k, v in fused.state_dict().items():
                    if k.rpartition(".")[0] not in convs:
                        v.copy_(mine[k])
                for bn_name, conv_name in folds.items():
                    conv, bn, out = (self.get_submodule(conv_name), self.get_submodule(bn_name),
                                     fused.get_submodule(conv_name))
                    w, b = fold_batchnorm(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                          bn.running_var, bn.op.eps)
                    out.weight.copy_(w)
                    out.bias.copy_(b)

    return TorchGraph


_GRAPH: list[type] = []


def build_module(spec: S.ModelSpec, weights: Mapping[str, np.ndarray], dtype: str = "float32") -> "nn.Module":
    """A ``TorchGraph`` for ``spec`` holding checked canonical ``weights`` in ``dtype``, on the CPU."""
    import torch

    if not _GRAPH:
        _GRAPH.append(_graph_class())
    graph = _GRAPH[0](spec).to(getattr(torch, dtype))  # before loading: fp64 weights stay exact
    graph.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=dtype)) for k, v in weights.items()}, strict=True)
    return graph


def make_optimizer(params: Any, config: TrainConfig) -> "torch.optim.Optimizer":
    """The ``torch.optim`` optimizer of a hal config (the canonical semantics by definition)."""
    import torch

    o = config.optimizer
    if isinstance(o, SGD):
        return torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay, foreach=True
        )
    cls = torch.optim.AdamW if isinstance(o, AdamW) else torch.optim.Adam
    return cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, foreach=True)


# -- torch-version differences (hal supports torch 2.0 on, the torch that PopTorch 3.3/3.4 pins) -------------------


COMPILE_MODES = (None, "inductor", "max-autotune", "reduce-overhead")


def _check_torch_compile(mode: str, device_type: str, target: str) -> None:
    """Refuse a ``compile`` mode this torch, Python or device cannot run, saying why (torch 2.0's
    ``torch.compile`` does not run on Python 3.11+; CUDA graphs are CUDA's)."""
    import torch
    import torch._dynamo

    if mode == "reduce-overhead" and device_type != "cuda":
        raise UnsupportedError(f"{target}: compile='reduce-overhead' is CUDA graphs, CUDA only; use 'inductor'")
    try:
        torch._dynamo.eval_frame.check_if_dynamo_supported()
    except RuntimeError as exc:
        raise UnsupportedError(
            f"{target}: option compile={mode!r} needs torch.compile, which torch {torch.__version__} cannot run "
            f"here ({exc}); use compile=None"
        ) from None


def _grad_scaler(device_type: str) -> Any:
    """A new ``GradScaler`` for ``device_type`` with :data:`hal.lowering.LOSS_SCALE`'s constants:
    ``torch.amp.GradScaler(device_type)`` from torch 2.3 (CPU and CUDA), ``torch.cuda.amp``'s (CUDA only) before."""
    import torch

    rule = {"init_scale": LOSS_SCALE.init, "growth_factor": LOSS_SCALE.growth, "backoff_factor": LOSS_SCALE.backoff,
            "growth_interval": LOSS_SCALE.interval}
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, **rule)
    return torch.cuda.amp.GradScaler(**rule)


@contextlib.contextmanager
def _cuda_math(tf32: bool) -> Iterator[None]:
    """cuDNN with its autotuner and ``allow_tf32=tf32``, and cuBLAS matmuls with ``allow_tf32=tf32``, restored after."""
    import torch

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = tf32
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=tf32):
            yield
    finally:
        matmul.allow_tf32 = before


def _foreach_copy_(dst: list["torch.Tensor"], src: list["torch.Tensor"]) -> None:
    """``d.copy_(s)`` for each pair, fused as ``torch._foreach_copy_`` (torch 2.1) where torch has it."""
    import torch

    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def _flag_non_finite(grads: list["torch.Tensor"], found_inf: "torch.Tensor", one: "torch.Tensor") -> None:
    """Add 1 to ``found_inf`` if a gradient holds an inf or a NaN, without a host sync: GradScaler's own check
    with scale ``one``. Its CPU kernel came with torch 2.3; before that the CPU gets the same exact test as one
    ``isfinite`` per gradient."""
    import torch

    if grads[0].is_cuda or torch.__version__ >= (2, 3):
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)
    else:
        found_inf += ~torch.stack([g.isfinite().all() for g in grads]).all()


class TorchExecutable(Executable):
    """A spec on one torch device; ``options`` as declared by :meth:`TorchBackend.options`."""

    def __init__(
        self, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, options: Mapping[str, Any]
    ) -> None:
        import torch
        import torch.nn.functional as F

        super().__init__(spec, Target("torch", device), config)
        self.device = torch.device(device)
        if config.precision in LOSS_SCALED and self.device.type != "cuda" and not hasattr(torch.amp, "GradScaler"):
            raise UnsupportedError(
                f"torch:{device}: {config.precision} mixed precision off CUDA needs torch >= 2.3 "
                f"(torch.amp.GradScaler on the CPU), this is torch {torch.__version__}; use bf16"
            )
        master, compute = MASTER_DTYPE[config.precision], COMPUTE_DTYPE[config.precision]
        self.dtype, self.np_dtype = getattr(torch, master), np.dtype(master)
        self.autocast = getattr(torch, compute) if compute != master else None
        self.fast = options["fast"]
        self.tf32 = options["tf32"]
        self.compile_mode = options["compile"]
        if self.compile_mode is not None:
            _check_torch_compile(self.compile_mode, self.device.type, f"torch:{device}")
        self.channels_last = self.fast and len(spec.input_shape) == 3  # 2-d: measured faster on CPU (oneDNN) and CUDA
        self.module = build_module(spec, weights, master).to(self.device)
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.module.reuse_buffers = self.fast and self.compile_mode is None  # inductor plans its own memory
        self.params = dict(self.module.named_parameters())
        self.stats = [t for k, t in self.module.state_dict().items() if k not in self.params]  # BatchNorm buffers
        self._saved_stats = [t.clone() for t in self.stats]  # their snapshot before a checked step
        self._found_inf, self._one = torch.zeros(1, device=self.device), torch.ones(1, device=self.device)
        self.optimizer = make_optimizer(self.params.values(), config) if self.params else None
        self.scaler = _grad_scaler(self.device.type) if config.precision in LOSS_SCALED else None
        self.loss = F.cross_entropy if config.loss == "cross_entropy" else F.mse_loss
        self._infer: Any = None  # what predict runs; None: the weights changed since
        self._fused: nn.Module | None = None  # the BatchNorm-folded copy (fast), refolded in place
        self._compiled: dict[str, nn.Module] = {}  # torch.compile wrappers: "infer", "train"
        self.train_module: nn.Module = self.module  # what the training forward calls (a DDP wrapper in a replica)

    @property
    def loss_scale(self) -> float | None:
        """fp16: GradScaler's current scale; otherwise ``None``."""
        return float(self.scaler.get_scale()) if self.scaler else None

    # -- I/O boundary -----------------------------------------------------------

    def _tensor(self, a: np.ndarray, dtype: np.dtype) -> "torch.Tensor":
        import torch

        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)).to(self.device, non_blocking=True)

    def _x(self, x: np.ndarray) -> "torch.Tensor":
        return self._tensor(x, self.np_dtype)

    def _y(self, y: np.ndarray) -> "torch.Tensor":
        return self._tensor(y, np.dtype(np.int64) if self.config.loss == "cross_entropy" else self.np_dtype)

    def _ctx(self) -> Any:
        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _run(self, module: "nn.Module", x: "torch.Tensor") -> "torch.Tensor":
        """``module(x)`` in the executable's layout and precision."""
        import torch

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._ctx():
            return module(x)

    def _math(self) -> contextlib.AbstractContextManager:
        """CUDA's fp32 math for one call: TF32 tensor cores for convolutions and matmuls only with the ``tf32``
        option (torch's own default turns them on for cuDNN convolutions), cuDNN's autotuner on. No-op off CUDA."""
        return _cuda_math(self.tf32) if self.device.type == "cuda" else contextlib.nullcontext()

    # -- hooks ----------------------------------------------------------------------

    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        with self._math():
            return self._predict_here(x, training)

    def _predict_here(self, x: np.ndarray, training: bool) -> np.ndarray:
        import torch

        if training:
            self.module.train()
            self.module.set_update_stats(False)
            with torch.no_grad():
                out = self._run(self.module, self._x(x))
        else:
            if self._infer is None:
                self._infer = self._inference_module()
            if not self.fast:
                self.module.eval()
            with torch.inference_mode():
                out = self._run(self._infer, self._x(x))
        return out.cpu().numpy() if out.dtype == torch.float64 else out.float().cpu().numpy()

    def _accumulate(self, x: "torch.Tensor", y: "torch.Tensor", update_stats: bool) -> "torch.Tensor":
        """Forward/backward over the G micro-batches; leaves the mean gradient in ``.grad``
        and returns the mean loss (on the device)."""
        if self.optimizer is None:
            raise UnsupportedError(f"{self.target}: spec {self.spec.name!r} has no trainable parameters")
        g = self.config.grad_accum
        self.module.train()
        self.module.set_update_stats(update_stats)
        self.optimizer.zero_grad(set_to_none=True)
        total = None
        for i, (xm, ym) in enumerate(zip(x.chunk(g), y.chunk(g))):
            with self._grad_sync(i == g - 1):
                loss = self.loss(self._run(self._compile("train", self.train_module), xm).to(self.dtype), ym) / g
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total  # type: ignore[return-value]

    def _grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward (data-parallel replicas reduce on the last)."""
        return contextlib.nullcontext()

    def _inference_module(self) -> "nn.Module":
        """What ``predict`` runs, current with the weights: the module itself, or with ``fast`` its BatchNorm-folded
        copy, made once and refolded in place after a weight change (a compiled copy stays valid)."""
        if not self.fast:
            return self._compile("infer", self.module)
        if self._fused is None:
            self._fused = self.module.fused()
        else:
            self.module.refold(self._fused)
        return self._compile("infer", self._fused)

    def _compile(self, role: str, module: "nn.Module") -> "nn.Module":
        """``module`` under ``torch.compile`` in the ``compile`` option's mode (as is for None), wrapped once
        per role: torch compiles on the first call of each shape, precision and mode (training, BatchNorm
        statistics updated or not), and the executable's semantics stay those of eager torch around it."""
        import torch

        if self.compile_mode is None:
            return module
        if role not in self._compiled:
            self._compiled[role] = torch.compile(module, mode=None if self.compile_mode == "inductor" else self.compile_mode)
        return self._compiled[role]

    def _loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        with self._math():
            loss = self._accumulate(self._x(x), self._y(y), update_stats=False)
        scale = float(self.scaler.get_scale()) if self.scaler else 1.0
        grads = {k: (p.grad.float() / scale if scale != 1.0 else p.grad).cpu().numpy() for k, p in self.params.items()}
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss), grads

    def _finite(self, loss: "torch.Tensor") -> bool:
        """Whether the loss and (unless GradScaler owns them) every gradient are finite: one host sync."""
        self._found_inf.zero_()
        if not self.scaler:
            _flag_non_finite([p.grad for p in self.params.values()], self._found_inf, self._one)
        return bool(loss.isfinite() & (self._found_inf == 0))

    def _run_steps(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, int]:
        with self._math():
            return self._steps(xs, ys)

    def _steps(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, int]:
        import torch

        check = self.config.check_finite
        xs_t, ys_t = self._x(xs), self._y(ys)  # one copy to the device per call
        losses = []
        for i, (x, y) in enumerate(zip(xs_t, ys_t)):
            if check and self.stats:
                _foreach_copy_(self._saved_stats, self.stats)
            loss = self._accumulate(x, y, update_stats=True)
            if check and not self._finite(loss):
                if self.stats:
                    _foreach_copy_(self.stats, self._saved_stats)
                self.optimizer.zero_grad(set_to_none=True)
                out = np.full(len(xs), np.nan)
                out[: i + 1] = [float(v) for v in losses + [loss]]
                return out, i
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.lr(self.step)
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.step += 1
            self._infer = None
            losses.append(loss)
        return torch.stack(losses).double().cpu().numpy(), len(xs)  # without the check: one host sync per call

    def weights(self) -> Weights:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.module.state_dict().items()}

    def _load_weights(self, weights: Weights) -> None:
        import torch

        new = {k: self._tensor(v, self.np_dtype) for k, v in weights.items()}  # every conversion before any change
        with torch.no_grad():
            for k, v in self.module.state_dict().items():
                v.copy_(new[k])
        self._infer = None


class TorchBackend(Backend):
    """PyTorch eager, CPU and CUDA."""

    name = "torch"
    description = "PyTorch (CPU, CUDA)"

    @classmethod
    def availability(cls) -> Availability:
        return package_availability("torch", "torch", "pip install 'hal-cnn[torch]'")

    @classmethod
    def devices(cls) -> list[str]:
        import torch

        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(precisions=("fp32", "fp64", "bf16", "fp16"), data_parallel=True, sync_batchnorm=True)

    @classmethod
    def options(cls) -> dict[str, Option]:
        return {
            "fast": Option(
                True,
                "channels_last for 2-d models and BatchNorm folded into convolutions for inference; "
                "False: plain eager NCHW PyTorch (the parity harness's float64 autodiff reference)",
            ),
            "tf32": Option(
                False,
                "NVIDIA GPUs: TF32 tensor cores for fp32 convolutions and matmuls (10-bit mantissa: faster, not "
                "fp32-exact; torch's default turns them on for cuDNN convolutions). False: fp32 as specified",
            ),
            "compile": Option(
                None,
                "torch.compile the inference and the training forward/backward (loss, gradient accumulation, "
                "the non-finite check and the optimizer stay eager): 'inductor' (its default mode), "
                "'max-autotune' (inductor tunes its kernels; CUDA graphs on CUDA), 'reduce-overhead' (CUDA graphs, "
                "CUDA only); the first call of each shape compiles. None: eager",
                choices=COMPILE_MODES,
            ),
        }

    @classmethod
    def compile(
        cls, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, options: Mapping[str, Any],
        plan: "Plan | None",
    ) -> Executable:
        if config.data_parallel.enabled:
            return _launch_replicas(spec, weights, device, config, options)
        return TorchExecutable(spec, weights, device, config, options)


# -- data parallelism: one process per replica, DistributedDataParallel ------------------------------------------


def _launch_replicas(
    spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, options: Mapping[str, Any]
) -> Executable:
    """This host's replica processes (:mod:`hal.distributed`); on CUDA local replica ``r`` takes the ``r``-th
    device from ``device`` on."""
    import torch

    from hal.distributed import launch

    dp = config.data_parallel
    if device.startswith("cuda"):
        first = torch.device(device).index or 0
        if first + dp.replicas > torch.cuda.device_count():
            raise TargetError(
                f"torch:{device}: {dp.replicas} replicas need CUDA devices {first}..{first + dp.replicas - 1}, "
                f"this host has {torch.cuda.device_count()}"
            )
    return launch(_replica, spec, Target("torch", device), config, weights=weights, device=device, options=options)


def _replica(
    spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, options: Mapping[str, Any], rank: int,
    local_rank: int, world: int, coordinator: tuple[str, int],
) -> "DDPExecutable":
    """A replica's executable, built in its own process by :func:`hal.distributed.launch`."""
    import torch

    if device.startswith("cuda"):
        device = f"cuda:{(torch.device(device).index or 0) + local_rank}"
    return DDPExecutable(spec, weights, device, config, options, rank, world, coordinator)


class DDPExecutable(TorchExecutable):
    """One replica of a data-parallel run (the rules of :mod:`hal.training`): ``DistributedDataParallel`` over
    a gloo (CPU) or NCCL (CUDA) process group, ``no_sync()`` for all but the last micro-batch, the loss
    all-reduced to the mean over replicas, and rank 0's BatchNorm running statistics broadcast after each
    ``run_steps`` call (``broadcast_buffers=False``: DDP would broadcast them at the *next* forward, so a
    replica's ``weights()``/``predict`` would lag a step). With ``sync_batchnorm`` each training-mode
    BatchNorm takes its statistics over every replica's micro-batch (:func:`_synced_batch_norm`)."""

    def __init__(
        self, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, options: Mapping[str, Any],
        rank: int, world: int, coordinator: tuple[str, int],
    ) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        host, port = coordinator
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=f"tcp://{host}:{port}",
                                rank=rank, world_size=world)
        super().__init__(spec, weights, device, config, options)
        self.world = world
        if config.data_parallel.sync_batchnorm:
            for m in self.module.modules():
                if hasattr(m, "sync"):
                    m.sync = _synced_batch_norm
        self.train_module = DistributedDataParallel(
            self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    def _grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.train_module.no_sync()

    def _accumulate(self, x: "torch.Tensor", y: "torch.Tensor", update_stats: bool) -> "torch.Tensor":
        import torch.distributed as dist

        loss = super()._accumulate(x, y, update_stats)
        dist.all_reduce(loss)  # gloo has no AVG
        return loss / self.world

    def _run_steps(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, int]:
        import torch.distributed as dist

        out = super()._run_steps(xs, ys)
        for t in self.stats:
            dist.broadcast(t, 0)
        return out


def _synced_batch_norm(bn: "nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    """Training-mode BatchNorm over the micro-batches of all replicas (equal sizes), in master precision.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors (its kernels, ``torch.batch_norm_stats``, are CUDA-only), so
    the statistics are two autograd-aware all-reduces (``torch.distributed.nn.functional.all_reduce``: the
    backward sums the gradients of every replica's loss, as SyncBatchNorm's own backward does), the mean then the
    biased variance; running statistics as torch's BatchNorm (unbiased variance, ``momentum``), once per call."""
    import torch
    from torch.distributed.nn.functional import all_reduce

    dims = [0, *range(2, x.ndim)]
    shape = (1, -1, *([1] * (x.ndim - 2)))
    xf = x.to(bn.running_mean.dtype)
    count = torch.distributed.get_world_size() * (x.numel() // x.shape[1])
    mean = all_reduce(xf.sum(dims)) / count
    centred = xf - mean.view(shape)
    var = all_reduce(centred.square().sum(dims)) / count
    if bn.update_stats:
        with torch.no_grad():
            bn.running_mean.lerp_(mean, bn.op.momentum)
            bn.running_var.lerp_(var * (count / max(count - 1, 1)), bn.op.momentum)
    out = centred * torch.rsqrt(var + bn.op.eps).view(shape) * bn.weight.view(shape) + bn.bias.view(shape)
    return out.to(x.dtype)
