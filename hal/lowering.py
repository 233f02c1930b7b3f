"""What every backend needs to lower a spec, written once (numpy and the standard library only).

A backend module is a table from op to framework call plus its executable;
the decisions that do not depend on the framework live here, so that two
backends cannot disagree on them:

- liveness: which values die after each node (:func:`free_after`);
- padding: whether an explicit padding is symmetric, TensorFlow's ``SAME`` or
  neither, and its layouts for ``torch.nn.functional.pad`` and channels-last pads;
- pooling: the average-pool divisor per output position, ``ceil_mode`` as explicit
  extra padding, adaptive pooling windows;
- transposed convolution as a convolution of the stride-dilated input, and as torch's arguments;
- upsampling: source indices (and linear weights) per output position;
- which BatchNorms fold into the convolution before them, and the folding formula;
- optimizer step scalars (learning rate from the schedule, Adam's bias
  corrections, AdamW's decay) in float64, as ``torch.optim`` computes them;
- precision: compute and master dtype, which ops compute in low precision, loss scaling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from hal.spec import (
    AvgPool, BatchNorm, Conv, ConvTranspose, Dense, GroupNorm, InstanceNorm, LayerNorm, MaxPool, ModelSpec, Padding, Shape,
    Upsample, pool_out, same_padding,
)
from hal.training import SGD, AdamW, TrainConfig

# ---------------------------------------------------------------------------
# liveness
# ---------------------------------------------------------------------------


def free_after(spec: ModelSpec) -> list[tuple[str, ...]]:
    """Per node index, the names of the values last read by that node (never the
    output): a backend running the graph node by node frees them there. Linear."""
    last: dict[str, int] = {}
    for i, n in enumerate(spec.nodes):
        for name in n.inputs:
            last[name] = i
    out: list[list[str]] = [[] for _ in spec.nodes]
    for name, i in last.items():
        if name != spec.output:
            out[i].append(name)
    return [tuple(names) for names in out]


# ---------------------------------------------------------------------------
# padding
# ---------------------------------------------------------------------------

PaddingMode = Literal["valid", "same", "symmetric", "explicit"]


def symmetric(padding: Padding) -> tuple[int, ...] | None:
    """The per-dimension pad if every dimension pads as much before as after, else None."""
    if all(a == b for a, b in padding):
        return tuple(a for a, _ in padding)
    return None


def tf_same(sizes: Shape, kernel: Shape, stride: Shape, dilation: Shape | None = None) -> Padding:
    """TensorFlow's ``SAME`` padding as explicit numbers (the odd pixel goes after)."""
    dilation = dilation or (1,) * len(kernel)
    return tuple(same_padding(n, k, s, d) for n, k, s, d in zip(sizes, kernel, stride, dilation))


def padding_mode(
    padding: Padding, sizes: Shape, kernel: Shape, stride: Shape, dilation: Shape | None = None
) -> PaddingMode:
    """How a framework can express ``padding`` of a window op over ``sizes``:
    ``valid`` (none), ``same`` (exactly TF ``SAME``), ``symmetric`` (before ==
    after in every dimension) or ``explicit`` (anything else)."""
    if not any(a or b for a, b in padding):
        return "valid"
    if padding == tf_same(sizes, kernel, stride, dilation):
        return "same"
    return "symmetric" if symmetric(padding) is not None else "explicit"


def torch_pad(padding: Padding) -> tuple[int, ...]:
    """``padding`` as ``torch.nn.functional.pad`` takes it: last dimension first."""
    return tuple(x for a, b in reversed(padding) for x in (a, b))


def nhwc_pad(padding: Padding) -> list[list[int]]:
    """``padding`` for a channels-last ``(N, *spatial, C)`` tensor (``tf.pad``, ``jnp.pad``)."""
    return [[0, 0], *[[a, b] for a, b in padding], [0, 0]]


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------


def pool_padding(sizes: Shape, op: MaxPool | AvgPool) -> Padding:
    """``op.padding`` plus, with ``ceil_mode``, the extra padding after each dim that
    makes a floor-mode pool give the ceil-mode output size: what a framework without
    ``ceil_mode`` pads (max pool with -inf; average pool with zeros that
    :func:`avg_pool_divisor` never counts)."""
    out: list[tuple[int, int]] = []
    for n, k, s, (a, b), o in zip(sizes, op.kernel, op.stride, op.padding, _pool_out(sizes, op)):
        out.append((a, max((o - 1) * s + k - (n + a + b), 0) + b))
    return tuple(out)


def _pool_out(sizes: Shape, op: MaxPool | AvgPool) -> Shape:
    return tuple(pool_out(n, k, s, p, op.ceil_mode) for n, k, s, p in zip(sizes, op.kernel, op.stride, op.padding))


def avg_pool_divisor(sizes: Shape, op: AvgPool) -> np.ndarray:
    """The divisor of each output position, shape ``(*out)``: with ``count_include_pad``
    the window's elements inside the padded input (``prod(kernel)`` but where a
    ``ceil_mode`` window runs past the padding), else its real pixels."""
    counted = np.pad(np.ones(sizes), op.padding, constant_values=1.0 if op.count_include_pad else 0.0)
    full = pool_padding(sizes, op)
    extra = tuple((0, b - p[1]) for (_, b), p in zip(full, op.padding))
    win = np.lib.stride_tricks.sliding_window_view(np.pad(counted, extra), op.kernel)
    return win[tuple(slice(None, None, s) for s in op.stride)].sum(axis=tuple(range(-len(op.kernel), 0)))


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling's ``(start, end)`` of each of ``out`` windows over ``size``
    elements: ``[floor(i size / out), ceil((i + 1) size / out))``, PyTorch's."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


# ---------------------------------------------------------------------------
# transposed convolution
# ---------------------------------------------------------------------------


def conv_transpose_padding(op: ConvTranspose) -> Padding:
    """The padding of the equivalent stride-1 convolution over the input dilated by
    ``stride`` (``stride - 1`` zeros between pixels; ``lax.conv_general_dilated``'s
    ``lhs_dilation``), with the kernel flipped and its in/out axes swapped:
    ``(dilation (k - 1) - before, dilation (k - 1) - after + output_padding)``. A
    negative entry crops (lax accepts it; elsewhere slice the result)."""
    return tuple(
        (d * (k - 1) - a, d * (k - 1) - b + q)
        for k, d, (a, b), q in zip(op.kernel, op.dilation, op.padding, op.output_padding)
    )


def torch_conv_transpose(op: ConvTranspose) -> tuple[tuple[int, ...], Padding]:
    """``(padding, crop)``: call ``F.conv_transpose`` with ``padding`` (one int per dim,
    ``min(before, after)``) and ``output_padding=op.output_padding``, then drop ``crop``
    ``(before, after)`` elements per dim (all zero when ``op.padding`` is symmetric)."""
    pad = tuple(min(a, b) for a, b in op.padding)
    return pad, tuple((a - p, b - p) for (a, b), p in zip(op.padding, pad))


# ---------------------------------------------------------------------------
# upsampling
# ---------------------------------------------------------------------------


def _ratio(n: int, out: int, scale: float | None) -> float:
    """Source step per output step, as torch's ``compute_scales_value`` (float64)."""
    return 1.0 / scale if scale else n / out


def nearest_indices(op: Upsample, dim: int, n: int) -> np.ndarray:
    """Upsample ``nearest``: the source index of each output position along spatial
    ``dim`` (input size ``n``): ``min(floor(dst * r), n - 1)``."""
    out = op.size[dim]
    r = _ratio(n, out, op.scale[dim] if op.scale else None)
    return np.minimum(np.floor(np.arange(out) * r).astype(np.int64), n - 1)


def linear_indices(op: Upsample, dim: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Upsample ``linear`` along spatial ``dim`` (input size ``n``): per output position
    the two source indices and their weights ``(i0, i1, w0, w1)``; the output is
    ``w0 * x[i0] + w1 * x[i1]``, dim by dim (torch's area_pixel_compute_source_index).
    A dim whose size does not change is copied, whatever the scale (torch's rule)."""
    out = op.size[dim]
    dst = np.arange(out, dtype=np.float64)
    if out == n:
        src = dst
    elif op.align_corners:
        src = dst * ((n - 1) / (out - 1) if out > 1 else 0.0)
    else:
        src = np.maximum(_ratio(n, out, op.scale[dim] if op.scale else None) * (dst + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w1 = np.clip(src - i0, 0.0, 1.0)
    return i0, i1, 1.0 - w1, w1


# ---------------------------------------------------------------------------
# BatchNorm folding (inference)
# ---------------------------------------------------------------------------


def foldable_batchnorms(spec: ModelSpec) -> dict[str, str]:
    """BatchNorm node -> the convolution it folds into: the BatchNorm reads a Conv
    whose output nothing else reads."""
    consumers = spec.consumers()
    out = {}
    for n in spec.nodes:
        if isinstance(n.op, BatchNorm):
            src = spec.node(n.inputs[0])
            if isinstance(src.op, Conv) and consumers[src.name] == [n.name]:
                out[n.name] = src.name
    return out


def fold_batchnorm(
    w: np.ndarray, b: np.ndarray | None, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Weight ``(O, ...)`` and bias ``(O,)`` of ``BatchNorm(conv(x))`` in inference:
    ``w * s`` and ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``.
    Plain arithmetic: works on numpy arrays and framework tensors alike."""
    scale = gamma / (var + eps) ** 0.5
    bias = beta - mean * scale if b is None else beta + (b - mean) * scale
    return w * scale.reshape(-1, *([1] * (w.ndim - 1))), bias


# ---------------------------------------------------------------------------
# optimizer step scalars
# ---------------------------------------------------------------------------


def step_scalar_names(config: TrainConfig) -> tuple[str, ...]:
    """Names of :func:`step_scalars` for ``config``'s optimizer, in table order."""
    o = config.optimizer
    if isinstance(o, SGD):
        return ("lr",)
    return ("lr", "step_size", "bc2_sqrt", "decay") if isinstance(o, AdamW) else ("lr", "step_size", "bc2_sqrt")


def step_scalars(config: TrainConfig, step: int) -> dict[str, float]:
    """The host scalars of 0-based optimizer step ``step``, in float64 exactly as
    ``torch.optim`` computes them in Python: ``lr`` (schedule applied); Adam and
    AdamW ``step_size = lr / (1 - b1**t)`` and ``bc2_sqrt = sqrt(1 - b2**t)`` with
    torch's 1-based ``t = step + 1``; AdamW ``decay = 1 - lr * weight_decay``."""
    o = config.optimizer
    lr = config.lr(step)
    if isinstance(o, SGD):
        return {"lr": lr}
    t = step + 1
    out = {"lr": lr, "step_size": lr / (1.0 - o.betas[0] ** t), "bc2_sqrt": math.sqrt(1.0 - o.betas[1] ** t)}
    if isinstance(o, AdamW):
        out["decay"] = 1.0 - lr * o.weight_decay
    return out


def scalar_table(config: TrainConfig, first_step: int, steps: int) -> np.ndarray:
    """:func:`step_scalars` of steps ``first_step .. first_step + steps - 1`` as a
    float64 array ``(steps, len(step_scalar_names(config)))``."""
    names = step_scalar_names(config)
    rows = [[step_scalars(config, s)[k] for k in names] for s in range(first_step, first_step + steps)]
    return np.asarray(rows, dtype=np.float64).reshape(steps, len(names))


# ---------------------------------------------------------------------------
# precision
# ---------------------------------------------------------------------------
#
# Mixed precision ("bf16", "fp16"), one meaning on every backend:
#
# - Master weights, gradients as the optimizer sees them, optimizer state,
#   BatchNorm running statistics and the step scalars are fp32 (MASTER_DTYPE).
# - LOW_PRECISION_OPS (convolutions, transposed convolutions, dense layers)
#   cast their input, weight and bias to the compute dtype and return the
#   compute dtype (accumulating in fp32 where the kernel does): the ops of
#   torch.autocast's lower-precision list (CPU and CUDA) that a CNN has, and
#   what a Keras "mixed_*" policy computes in low precision.
# - FP32_OPS (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) compute their
#   statistics and the normalisation in fp32 with fp32 parameters, and return
#   their input's dtype (torch's mixed-type batch_norm; Keras casts norms to fp32).
# - Every other op computes in the compute dtype on values of the compute
#   dtype (activations, pooling, Add/Mul/Concat, Scale/PReLU with their
#   parameters cast down): the input is cast to the compute dtype on entry
#   (Keras's and Flax's rule; torch.autocast leaves the input, and an fp32
#   operand that meets a low-precision one, in fp32 until the next
#   LOW_PRECISION_OP: it rounds less, never more).
# - The output is cast to fp32 before the loss; loss, softmax and gradients of
#   the loss are fp32 (torch.autocast's fp32 list; Keras's float32 output).
# - fp16 (not bf16) scales the loss dynamically with torch.amp.GradScaler's rule
#   and constants (LOSS_SCALE, next_loss_scale): the gradients of
#   ``loss * scale`` are unscaled in fp32; a step whose unscaled gradients hold
#   an inf or a nan is *skipped* (no change to the weights or the optimizer
#   state, Adam's bias-correction count included; BatchNorm running statistics
#   keep its forward's update; the executable's step counter, hence the
#   schedule, advances: a torch loop calling ``scheduler.step()`` every
#   iteration) and the scale is multiplied by ``backoff``; after ``interval``
#   consecutive clean steps it is multiplied by ``growth``. Such a skip is the
#   scaler's rule, not a failure: ``check_finite`` raises NonFiniteError under
#   fp16 only for a non-finite *loss*. The scale lives as long as the executable.

COMPUTE_DTYPE = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16",
                 "16.16": "float16", "16.32": "float16"}
MASTER_DTYPE = {"fp32": "float32", "fp64": "float64", "bf16": "float32", "fp16": "float32",
                "16.16": "float16", "16.32": "float32"}
# Graphcore's IPU precisions, "<compute>.<master weights>" (graphcore/examples
# vision/cnns/pytorch/utils/argparser.py); partial sums are a separate choice (a plan's half_partials).
IPU_PRECISIONS = ("16.16", "16.32")
# Their static loss scale: Graphcore's ResNet50 configurations train both with loss scaling 128
# (graphcore/examples vision/cnns/pytorch/train/configs.yml, vision/cnns/tensorflow2/configs.yml).
IPU_STATIC_LOSS_SCALE = 128.0

LOW_PRECISION_OPS = (Conv, ConvTranspose, Dense)
FP32_OPS = (BatchNorm, GroupNorm, LayerNorm, InstanceNorm)
MIXED_PRECISIONS = ("bf16", "fp16")  # fp32 master weights, compute in COMPUTE_DTYPE (rules above)
LOSS_SCALED = ("fp16",)  # dynamic loss scaling (bf16 has fp32's exponent range)


@dataclass(frozen=True)
class LossScale:
    """``torch.amp.GradScaler``'s defaults: ``init_scale``, ``growth_factor``,
    ``backoff_factor``, ``growth_interval``."""

    init: float = 2.0**16
    growth: float = 2.0
    backoff: float = 0.5
    interval: int = 2000


LOSS_SCALE = LossScale()


def next_loss_scale(scale: float, clean_steps: int, found_inf: bool, rule: LossScale = LOSS_SCALE) -> tuple[float, int]:
    """``(scale, clean_steps)`` after a step (GradScaler's ``_amp_update_scale_``): on an
    inf/nan gradient the scale is multiplied by ``backoff`` and the count of consecutive
    clean steps reset; otherwise the count grows, and at ``interval`` the scale is
    multiplied by ``growth`` and the count reset."""
    if found_inf:
        return scale * rule.backoff, 0
    if clean_steps + 1 == rule.interval:
        return scale * rule.growth, 0
    return scale, clean_steps + 1


def loss_scale_step(scale: Any, clean_steps: Any, found_inf: Any, where: Any, rule: LossScale = LOSS_SCALE
                    ) -> tuple[Any, Any]:
    """:func:`next_loss_scale` on a framework's tensors inside a compiled program (``where``:
    ``jnp.where``, ``tf.where``): ``(scale, clean_steps)`` after a step."""
    grown = clean_steps + 1
    grow = (grown == rule.interval) & ~found_inf
    return (where(found_inf, scale * rule.backoff, where(grow, scale * rule.growth, scale)),
            where(found_inf | grow, 0 * grown, grown))


def adam_bias_corrections(lr: Any, t: Any, betas: tuple[float, float], expm1: Any, sqrt: Any) -> tuple[Any, Any]:
    """Adam's ``step_size`` and ``bc2_sqrt`` (:func:`step_scalars`) at a traced step ``t``
    (torch's count, from 1) inside a compiled program, with the framework's ``expm1`` and
    ``sqrt``: ``1 - b**t = -expm1(t * log(b))`` stays within a few float32 ulps of torch's
    float64 value (``1 - b**t`` in float32 loses ~3e-5 relative at ``b = 0.999, t = 1``)."""
    with np.errstate(divide="ignore"):  # b = 0: log is -inf, 1 - b**t is 1
        log_b1, log_b2 = np.log(np.float64(betas[0])), np.log(np.float64(betas[1]))
    return lr / -expm1(t * log_b1), sqrt(-expm1(t * log_b2))


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` (``float16``, ``bfloat16`` or wider; nearest, ties to even),
    as float32. numpy has no bfloat16: its rounding is done on float32's bits."""
    x = np.asarray(x, dtype=np.float32)
    if dtype != "bfloat16":
        with np.errstate(over="ignore"):  # beyond the dtype's range: inf, as the cast on a device
            return x.astype(dtype).astype(np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(x), x, rounded.view(np.float32))
