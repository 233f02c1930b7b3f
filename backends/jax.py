"""JAX backend: ``jax:cpu``, ``jax:gpu[:N]`` and ``jax:tpu[:N]`` — Flax linen, Optax, XLA.

The spec becomes a Flax **linen** module (:func:`flax_module`): one submodule per
node that holds parameters, at the canonical node name (``params["layer1.0.conv1"]``),
the rest plain ``jax.numpy`` calls — a table from op to framework call
(``Conv -> nn.Conv`` with explicit per-side padding and ``feature_group_count``;
``ConvTranspose -> nn.Conv`` over the stride-dilated input (``input_dilation``,
padding :func:`hal.lowering.conv_transpose_padding`, flipped kernel);
``Dense -> nn.Dense`` on the last axis, so also at every position;
``LayerNorm/InstanceNorm -> nn.LayerNorm`` over channels or positions and
``GroupNorm -> nn.GroupNorm``, both two-pass (``use_fast_variance=False``);
``MaxPool/AvgPool -> nn.max_pool/nn.avg_pool`` with :func:`hal.lowering.pool_padding`
(the max pool's gradient written as a sum over kernel taps, torch's first-maximum rule),
the divisor :func:`hal.lowering.avg_pool_divisor` where it is not ``prod(kernel)``;
``Pad -> jnp.pad`` (numpy's ``reflect`` and ``edge`` are torch's reflect and
replicate); ``StochasticDepth -> nn.Dropout`` broadcast over each sample or the
batch, which is torchvision's rule; ``BatchNorm ->`` :class:`BatchNorm` below, which
implements the canonical rule). Upsampling and adaptive pools of non-dividing sizes
gather along one axis at a time with constant index tables from :mod:`hal.lowering`
(built at trace time: XLA sees constant gathers, no per-call host work);
``jax.image.resize`` is not torch's ``F.interpolate`` (half-pixel sampling,
antialiasing when shrinking).

Linen, not nnx: a linen module is a pure function ``apply(variables, x)`` of
immutable pytrees, which is exactly what one jitted, donated XLA step wants —
parameters, BatchNorm statistics and optimizer state go in as buffers and come out
as new ones, with no graph/state split and merge per call (nnx needs
``nnx.split``/``nnx.merge`` or ``nnx.jit`` bookkeeping around every step to get
the same program).

Layout: NHWC inside. Inputs arrive channels-first at the API boundary and are
transposed once, inside the compiled program; a spatial output is transposed
back once. ``Flatten`` must flatten in channels-first row-major order, so it
transposes its (usually small, post-convolution) input to NCHW and reshapes —
one small transpose where a Flatten appears, exact for every graph (the other
option, permuting the following Dense weight once at load, is only valid when
the Flatten feeds Dense layers through elementwise ops alone, and would make the
exported weights depend on graph analysis). ResNets have no Flatten.

Parameters load from canonical weights and export back (:func:`to_flax_layout`):
conv ``OIHW <-> HWIO`` (``(O, I/groups, *k) <-> (*k, I/groups, O)``), dense
``(out, in) <-> (in, out)``, transposed conv ``(I, O/groups, *k) <-> (*k, I/groups, O)``
flipped, BatchNorm ``weight/bias/running_mean/running_var <-> scale/bias/mean/var``,
norms ``weight/bias <-> scale/bias``, PReLU ``weight <-> negative_slope``, layer scale
``(C, 1, ..., 1) <-> scale (C,)``; the conversions are transposes, reversals and
reshapes, so a round trip is bit-exact, and gradients come back the same way.

Canonical semantics, not Flax's defaults: BatchNorm uses the PyTorch momentum
convention (``running = m * batch + (1 - m) * running``), normalises with the
biased batch variance (two-pass, not Flax's ``E[x^2] - E[x]^2``) and tracks the
unbiased one. Optimizers are Optax gradient transformations with ``torch.optim``
semantics (:func:`optimizer`): SGD is ``add_decayed_weights`` (coupled L2) ->
``trace`` (``b = mu*b + g``, first step ``b = g``; Nesterov ``g + mu*b``, which is
exactly torch's rule) -> ``-lr``; Adam/AdamW use :func:`scale_by_torch_adam`,
torch's update written out (``m.lerp_(g, 1-b1)``, ``sqrt(v)/sqrt(bc2) + eps``;
AdamW's decoupled ``-lr*wd*p`` added beside it). ``optax.adamw`` has the same
semantics (measured in float64: 3e-15 from torch.optim.AdamW after 10 steps,
as this transform), but it computes its bias corrections ``1 - b**t`` in float32
from an int32 count and keeps the LR inside its state; here every step-dependent
scalar (the scheduled LR ``config.lr(t)`` of step ``t``, 0-based, and Adam's
bias corrections at torch's 1-based step ``t + 1``) is computed on the host in
float64 exactly as torch computes it (:func:`hal.lowering.scalar_table`) and
enters the compiled step as a traced argument: any schedule, no recompilation,
no drift.

Non-finite steps (``config.check_finite``, the default): the step computes
``ok = isfinite(loss) & all(isfinite(grads))`` inside the program and selects the
new or the old parameters, BatchNorm statistics and optimizer state with
``jnp.where`` (elementwise, fused by XLA into the update); ``run_steps`` carries
the flag from step to step (through its ``lax.scan``, or on the CPU from one call
of the step to the next), so no step after a failed one is applied. The number of
applied steps comes back with the losses: no extra host sync.

Speed: the training step (forward, backward, optimizer update, BatchNorm
statistics, gradient accumulation as a ``lax.scan`` over micro-batches) is one
jitted XLA program with parameters, statistics and optimizer state donated;
``run_steps`` is a ``lax.scan`` of that step over stacked batches, except on the
CPU, where it calls the jitted step once per batch, each call dispatched without
waiting for the one before (the next batch goes in while a step runs; 1.6 ms per
step of the conductivity CNN's 37 ms): XLA:CPU rewrites convolutions
that Eigen cannot run as they are (every weight gradient) into its canonical
NHWC/HWIO form only in the entry computation (``ConvCanonicalization``,
xla/service/cpu/conv_canonicalization.cc), so inside a scan's while loop they
fall back to a naive loop nest, 9-14x slower per step on the conductivity CNN
(bench/results/jax_speed). For the same reason the micro-batch scan is unrolled
on the CPU up to :data:`CPU_UNROLL_ACCUM_MAX` micro-batches, each one ordered
after the previous one's gradients (so the temporary memory stays that of one
micro-batch). Also on the CPU, 1x1 convolutions are matrix products
(``PointwiseConv``: their weight gradients need no layout transposes; ResNet-50
at 224x224, batch 16, trains 1.27x and infers 1.18x faster), depthwise ones sums
of taps, and so are the forward passes of convolutions with one input channel, or
at most 8 channels where training-mode BatchNorms read them (:func:`narrow`: XLA
leaves them to Eigen); these and the other convolutions (:class:`CpuConv`) write
their input and output gradient once instead of recomputing them in the weight
gradient's layout transposes; with more than one intra-op thread the
programs leave convolutions to Eigen, whose kernels use the threads, where XLA's
YNNPACK ones do not (:data:`CPU_CONVOLUTIONS_ON_EIGEN`); inference runs
a copy with every BatchNorm that only reads a convolution folded into it,
rebuilt (by a small jitted function) only when the weights change. ``jax.jit``
caches one executable per batch shape, and executables of the same spec and
config share their jitted functions (:func:`programs`), so compiling a model
again (parity runs, sweeps over learning rates) reuses the XLA code. Measured on
a 2-core CPU (bench/jax_vs_native.py): the two-pass BatchNorm variance costs the
same CPU time as Flax's one-pass form (A/B on ResNet-50 training); folding saves
3-4% of inference CPU time on ResNet-50 at 224x224, batch 16, but is ~7% slower
than the unfolded program on ResNet-18 at 32x32, batch 4 (XLA CPU's choice of
kernels; not investigated further).

Options (``hal.compile(..., options={...})``): ``cpu_convolutions`` (:data:`CPU_CONVOLUTIONS`);
``matmul_precision`` —
``highest`` (default, parity mode: convolutions and dense layers run with
``lax.Precision.HIGHEST``, full float32; matters on GPU TF32 and TPU bf16
passes, not on CPU), ``high`` or ``default`` to trade precision for speed;
``exe.matmul_precision`` reports it.

Precisions: ``fp32``; ``fp64`` (``jax.enable_x64`` is switched on only around
this executable's own compiles and calls, never globally; not on TPU); ``bf16``
and ``fp16`` mixed (hal.lowering's precision rules: low-precision
convolutions/matmuls, float32 master weights, BatchNorm statistics, loss and
optimizer). fp16 scales the loss dynamically inside the jitted step (GradScaler's
rule, :data:`hal.lowering.LOSS_SCALE`): the :class:`LossScaleState` travels with
the optimizer state (through ``run_steps``' ``lax.scan`` carry), a step with an
inf/nan gradient selects the old parameters and optimizer state with
``jnp.where`` and backs the scale off; ``check_finite`` then fails a step only
for a non-finite loss. Adam's bias corrections follow the count of applied
updates in the program (:func:`adam_scalars_at`), the schedule the step counter,
as torch's ``GradScaler.step`` and ``scheduler.step()`` do.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np

from hal import spec as S
from hal.backend import Availability, Backend, Capabilities, Executable, Option, Target, Weights, package_availability
from hal.errors import InputError, TargetError, UnsupportedError
from hal.lowering import (
    COMPUTE_DTYPE,
    LOSS_SCALE,
    LOSS_SCALED,
    MASTER_DTYPE,
    LossScale,
    adam_bias_corrections,
    adaptive_windows,
    avg_pool_divisor,
    conv_transpose_padding,
    fold_batchnorm,
    foldable_batchnorms,
    linear_indices,
    loss_scale_step,
    nearest_indices,
    nhwc_pad,
    pool_padding,
    scalar_table,
    step_scalar_names,
)
from hal.training import SGD, Adam, AdamW, DataParallel, TrainConfig

if TYPE_CHECKING:  # jax is imported lazily: listing backends must not import it
    import jax

PRECISIONS = ("fp32", "fp64", "bf16", "fp16")
MATMUL_PRECISIONS = ("highest", "high", "default")
INSTALL_HINT = "pip install 'hal-cnn[jax]'"


# ---------------------------------------------------------------------------
# the Flax module: one table from op to framework call
# ---------------------------------------------------------------------------

_FLAX: dict[str, Any] = {}


def _flax() -> dict[str, Any]:
    """Module classes, defined on first use so that importing this file needs no jax."""
    if _FLAX:
        return _FLAX
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax import lax

    class BatchNorm(nn.Module):
        """Canonical BatchNorm over the last (channel) axis: PyTorch momentum
        convention, biased batch variance to normalise, unbiased to track.
        Statistics are computed in the parameter (master) dtype."""

        eps: float
        momentum: float
        dtype: Any
        param_dtype: Any
        axis_name: Any = None  # synchronised over this mapped axis (data-parallel sync BatchNorm)

        @nn.compact
        def __call__(self, x: Any, train: bool, update_stats: bool) -> Any:
            c = x.shape[-1]
            scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
            bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
            ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), self.param_dtype))
            ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), self.param_dtype))
            xs = x.astype(self.param_dtype)
            if train:
                axes = tuple(range(x.ndim - 1))
                n = x.size // c
                mean = jnp.mean(xs, axes)
                if self.axis_name is not None:  # equal shards: the mean of the replicas' means
                    mean = lax.pmean(mean, self.axis_name)
                sq = jnp.sum(jnp.square(xs - mean), axes)  # two-pass: no E[x^2] - E[x]^2 cancellation
                if self.axis_name is not None:
                    sq, n = lax.psum(sq, self.axis_name), n * lax.psum(1, self.axis_name)
                var = sq / n
                if update_stats and not self.is_initializing():
                    m = self.momentum
                    ra_mean.value = m * mean + (1.0 - m) * ra_mean.value
                    ra_var.value = m * (sq / (n - 1)) + (1.0 - m) * ra_var.value
            else:
                mean, var = ra_mean.value, ra_var.value
            a = scale / jnp.sqrt(var + self.eps)
            return (xs * a + (bias - mean * a)).astype(self.dtype)

    def tap_sum(x: Any, kernel: Any, strides: tuple[int, ...], padding: tuple[tuple[int, int], ...],
                dilation: tuple[int, ...], dtype: Any, depthwise: bool) -> Any:
        """The convolution of channels-last ``x`` with a ``(*k, I, features)`` kernel as a sum over
        kernel taps of strided slices times weights, accumulated in at least float32: elementwise,
        so XLA fuses it into one loop. ``depthwise`` (``I == 1``): output channel ``o`` reads input
        channel ``o // (features // C)``; otherwise every output channel reads all ``I == C`` inputs."""
        c, k, features = x.shape[-1], kernel.shape[:-2], kernel.shape[-1]
        acc = jnp.promote_types(dtype, jnp.float32)
        x = jnp.pad(x.astype(dtype), [(0, 0), *padding, (0, 0)])
        if depthwise and 1 < c < features:
            x = jnp.repeat(x, features // c, axis=-1)
        out = [(n - d * (kk - 1) - 1) // s + 1 for n, kk, s, d in zip(x.shape[1:-1], k, strides, dilation)]
        y = jnp.zeros((x.shape[0], *out, features), acc)
        for tap in itertools.product(*map(range, k)):
            start = [t * d for t, d in zip(tap, dilation)]
            limit = [a + (o - 1) * s + 1 for a, o, s in zip(start, out, strides)]
            window = lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *strides, 1)).astype(acc)
            w = kernel[tap].astype(acc)
            if depthwise:
                y = y + window * w[0]
            else:
                for i in range(c):
                    y = y + window[..., i:i + 1] * w[i]
        return y

    class TapConv(nn.Module):
        """The fields of a convolution that runs (forward) as :func:`tap_sum`: ``nn.Conv``'s."""

        features: int
        kernel_size: tuple[int, ...]
        strides: tuple[int, ...]
        padding: tuple[tuple[int, int], ...]
        kernel_dilation: tuple[int, ...]
        use_bias: bool
        dtype: Any
        param_dtype: Any

    class DepthwiseConv(TapConv):
        """A convolution with ``groups == in_channels`` (channel multiplier ``features // C``)
        as :func:`tap_sum`: the function of ``nn.Conv(feature_group_count=C)``, with its
        parameters, but about 10x faster on XLA:CPU, whose grouped convolution is slow (3x3
        over 16x56x56x144: 21 ms against 210 ms forward, 104 against 732 ms with gradients,
        measured on the 2-core dev box)."""

        @nn.compact
        def __call__(self, x: Any) -> Any:
            kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel_size, 1, self.features),
                                self.param_dtype)
            y = tap_sum(x, kernel, self.strides, self.padding, self.kernel_dilation, self.dtype, depthwise=True)
            if self.use_bias:
                y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
            return y.astype(self.dtype)

    def materialize(v: Any) -> Any:
        """``v``, bitwise, written once to a buffer of its own. XLA:CPU fuses a cheap elementwise
        producer into every consumer and recomputes it there, the layout transposes included
        that ``ConvCanonicalization`` puts before a convolution's weight gradient, which read
        the producer's operands with a channel-major stride. ``lax.optimization_barrier`` does
        not stop it (XLA:CPU removes barriers before fusion); a conditional does, and costs no
        copy. Both branches return ``v`` (the second as ``v * 1``: JAX drops a conditional whose
        branches all pass their input through), so the predicate (the first element equals
        itself, false only for NaN) never changes the value."""
        first = v.reshape(-1)[0]
        return lax.cond(first == first, lambda v: v, lambda v: v * 1, v)

    class CpuConv(TapConv):
        """A convolution on XLA:CPU, with ``nn.Conv``'s function and parameters. Its input and
        its output gradient are materialized (:func:`materialize`): the weight gradient's
        transposes and the convolutions read one buffer each instead of recomputing the
        BatchNorm and activation that produce them (the conductivity CNN trains 1.11x faster,
        two threads, ``bench/jax_speed_conductivity.py``). ``tap`` (:func:`narrow`): the forward pass is
        :func:`tap_sum`, one fused loop; XLA:CPU hands a float32 convolution to YNNPACK only
        with more than 16 input or output channels (``IsConvolutionOpSupportedByYnn``,
        xla/backends/cpu/ynn_support.cc), and Eigen's kernels are slow for so few channels (the
        conductivity CNN's 64x64 1->8 convolution: 6.5 ms, the tap sum 0.4 ms, batch 32, one
        thread). The gradients are the convolution's (``jax.custom_vjp``): the tap sum's own
        would be a reduction per weight. The input gradient of a stride-1 tap-sum convolution
        with at most :data:`NARROW_MAX_CHANNELS` channels each way is a tap sum too, where its
        padding is not negative (the conductivity CNN's training step: 1.2 ms of 36 faster, the
        mean of five interleaved A/Bs, 0.2-3.1 ms)."""

        groups: int = 1
        tap: bool = False
        precision: Any = None

        @nn.compact
        def __call__(self, x: Any) -> Any:
            nd = x.ndim - 2
            kernel = self.param("kernel", nn.initializers.lecun_normal(),
                                (*self.kernel_size, x.shape[-1] // self.groups, self.features), self.param_dtype)
            channels_last = (0, nd + 1, *range(1, nd + 1))
            conv = functools.partial(
                lax.conv_general_dilated, window_strides=self.strides, padding=self.padding,
                rhs_dilation=self.kernel_dilation, feature_group_count=self.groups, precision=self.precision,
                dimension_numbers=lax.ConvDimensionNumbers(channels_last, (nd + 1, nd, *range(nd)), channels_last),
            )

            def forward(x: Any, kernel: Any) -> Any:
                if not self.tap:
                    return conv(x, kernel)
                y = tap_sum(x, kernel, self.strides, self.padding, self.kernel_dilation, self.dtype, depthwise=False)
                return y.astype(self.dtype)

            def forward_saving(x: Any, kernel: Any) -> Any:
                x = materialize(x)
                return forward(x, kernel), (x, kernel)

            def backward(res: Any, g: Any) -> Any:
                x, kernel = res
                g, k = materialize(g), kernel.shape[:-2]
                transposed_pad = tuple((d * (n - 1) - lo, d * (n - 1) - hi)
                                       for (lo, hi), n, d in zip(self.padding, k, self.kernel_dilation))
                if not (self.tap and max(kernel.shape[-2:]) <= NARROW_MAX_CHANNELS and set(self.strides) == {1}
                        and min(itertools.chain.from_iterable(transposed_pad)) >= 0):
                    return jax.vjp(conv, x, kernel)[1](g)
                # the input gradient, a stride-1 convolution of g with the flipped, transposed kernel, as a
                # tap sum too (materialized: XLA would read that kernel through a transposed layout)
                flipped = materialize(jnp.swapaxes(jnp.flip(kernel, tuple(range(len(k)))), -1, -2))
                dx = tap_sum(g, flipped, self.strides, transposed_pad, self.kernel_dilation, self.dtype, depthwise=False)
                return dx.astype(x.dtype), jax.vjp(lambda kernel: conv(x, kernel), kernel)[1](g)[0]

            f = jax.custom_vjp(forward)
            f.defvjp(forward_saving, backward)
            y = f(x.astype(self.dtype), kernel.astype(self.dtype))
            if self.use_bias:
                y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
            return y

    class PointwiseConv(nn.Module):
        """A 1x1 convolution without padding or groups as a matrix product over channels
        (``dot_general``) of the strided input: the function of ``nn.Conv``, with its
        parameters. On XLA:CPU a convolution's weight gradient transposes the activation
        and the output gradient to (C, H, W, N) first (``ConvCanonicalization``); a dot's
        contracts them as they lie: forward+backward of ResNet-50's 1x1 convolutions took
        0.53-0.65x the time (0.37x strided), measured on the 2-core dev box."""

        features: int
        strides: tuple[int, ...]
        use_bias: bool
        dtype: Any
        param_dtype: Any
        precision: Any

        @nn.compact
        def __call__(self, x: Any) -> Any:
            c, nd = x.shape[-1], x.ndim - 2
            kernel = self.param("kernel", nn.initializers.lecun_normal(), (*(1,) * nd, c, self.features),
                                self.param_dtype)
            x = x[(slice(None), *(slice(None, None, s) for s in self.strides))].astype(self.dtype)
            w = kernel.reshape(c, self.features).astype(self.dtype)
            y = lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
            if self.use_bias:
                y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
            return y

    class PReLU(nn.Module):
        """``x if x >= 0 else a * x``; ``negative_slope`` ``(1,)`` or ``(C,)`` over the last axis."""

        num_parameters: int
        param_dtype: Any

        @nn.compact
        def __call__(self, x: Any) -> Any:
            a = self.param("negative_slope", nn.initializers.constant(0.25), (self.num_parameters,), self.param_dtype)
            return jnp.where(x >= 0, x, a.astype(x.dtype) * x)

    class Scale(nn.Module):
        """``x * scale`` with a learned ``scale`` ``(C,)`` over the last axis (layer scale)."""

        param_dtype: Any

        @nn.compact
        def __call__(self, x: Any) -> Any:
            return x * self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype).astype(x.dtype)

    def softplus(x: Any, beta: float, threshold: float) -> Any:  # torch's: linear above the threshold
        return jnp.where(beta * x > threshold, x, jnp.logaddexp(0.0, beta * x) / beta)

    activations: dict[str, Callable[[Any, S.Activation], Any]] = {
        "relu": lambda x, op: jax.nn.relu(x),
        "relu6": lambda x, op: jax.nn.relu6(x),
        "leaky_relu": lambda x, op: jax.nn.leaky_relu(x, op.alpha),
        "elu": lambda x, op: jax.nn.elu(x, op.alpha),
        "sigmoid": lambda x, op: jax.nn.sigmoid(x),
        "hardsigmoid": lambda x, op: jax.nn.hard_sigmoid(x),  # relu6(x + 3) / 6
        "tanh": lambda x, op: jnp.tanh(x),
        "hardswish": lambda x, op: jax.nn.hard_swish(x),
        "silu": lambda x, op: jax.nn.silu(x),
        "softplus": lambda x, op: softplus(x, op.beta, op.threshold),
        "mish": lambda x, op: x * jnp.tanh(jnp.logaddexp(0.0, x)),
        "gelu": lambda x, op: jax.nn.gelu(x, approximate=op.approximate == "tanh"),
    }

    def take(x: Any, index: np.ndarray, axis: int) -> Any:
        """``x`` gathered along ``axis`` at constant in-range indices (XLA sees a constant gather)."""
        return jnp.take(x, index, axis=axis, mode="clip")

    def along(v: np.ndarray, axis: int, ndim: int, dtype: Any) -> Any:
        """``v`` as a constant that broadcasts against an ``ndim``-dim array, its first axis at ``axis``."""
        return jnp.asarray(v.reshape(*v.shape, *(1,) * (ndim - axis - v.ndim)), dtype)

    def avg_pool(x: Any, op: S.AvgPool) -> Any:
        """Flax's pool where the divisor is ``prod(kernel)`` everywhere, else the window sums
        divided by :func:`hal.lowering.avg_pool_divisor` (a constant)."""
        padding, divisor = pool_padding(x.shape[1:-1], op), avg_pool_divisor(x.shape[1:-1], op)
        if np.all(divisor == math.prod(op.kernel)):
            return nn.avg_pool(x, op.kernel, op.stride, padding)
        return nn.pool(x, 0.0, lax.add, op.kernel, op.stride, padding) / along(divisor, 1, x.ndim, x.dtype)

    def max_pool(x: Any, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[tuple[int, int], ...]) -> Any:
        """``nn.max_pool`` (padding is -inf) whose gradient goes to the first maximum of each
        window in row-major order, torch's rule, written as a sum over kernel taps of strided
        pads. JAX differentiates ``nn.max_pool`` into a ``select_and_scatter``, which XLA:CPU
        expands into a variadic reduce-window over index iotas and a scatter: on the
        conductivity CNN's training step that was 40% of the CPU time (bench/results/jax_speed).
        Windows that tile the input (stride == kernel, no padding) take the taps from a reshape
        of the input instead, and interleave the results back: half the time of the strided
        pads at 32x64x64x8 (0.9 against 1.8 ms)."""

        @jax.custom_vjp
        def pool(x: Any) -> Any:
            return nn.max_pool(x, kernel, stride, padding)

        def forward(x: Any) -> Any:
            y = pool(x)
            return y, (x, y)

        def backward(res: Any, g: Any) -> Any:
            x, y = res
            if tuple(stride) == tuple(kernel) and not any(map(any, padding)) and all(
                    n == o * k for n, o, k in zip(x.shape[1:-1], y.shape[1:-1], kernel)):
                return (tiled_backward(x, y, g),)
            pads = [(0, 0), *padding, (0, 0)]
            xp = jnp.pad(x, pads, constant_values=-jnp.inf)
            real = np.pad(np.ones(x.shape[1:-1], bool), padding)[None, ..., None]  # a window's padding never wins
            found, dxp = jnp.zeros(y.shape, bool), jnp.zeros(xp.shape, g.dtype)
            for tap in itertools.product(*map(range, kernel)):
                limit = [t + (o - 1) * s + 1 for t, o, s in zip(tap, y.shape[1:-1], stride)]
                at = (slice(None), *(slice(t, end, s) for t, end, s in zip(tap, limit, stride)), slice(None))
                first = (xp[at] == y) & real[at] & ~found
                found = found | first
                spread = [(0, 0, 0), *((t, n - end, s - 1) for t, end, n, s in zip(tap, limit, xp.shape[1:-1], stride)),
                          (0, 0, 0)]
                dxp = dxp + lax.pad(jnp.where(first, g, jnp.zeros((), g.dtype)), jnp.zeros((), g.dtype), spread)
            return (dxp[tuple(slice(a, a + n) for (a, _), n in zip(pads, x.shape))],)

        def tiled_backward(x: Any, y: Any, g: Any) -> Any:
            """The backward pass where windows tile ``x``: ``x`` as (N, O1, K1, O2, K2, ..., C) blocks."""
            n, c, out, nd = x.shape[0], x.shape[-1], y.shape[1:-1], len(kernel)
            blocks = x.reshape(n, *itertools.chain.from_iterable(zip(out, kernel)), c)
            found, taps = jnp.zeros(y.shape, bool), []
            for tap in itertools.product(*map(range, kernel)):
                at = (slice(None), *itertools.chain.from_iterable((slice(None), t) for t in tap))
                first = (blocks[at] == y) & ~found
                found = found | first
                taps.append(jnp.where(first, g, jnp.zeros((), g.dtype)))
            dx = jnp.stack(taps).reshape(*kernel, *y.shape)
            order = [nd, *itertools.chain.from_iterable((nd + 1 + i, i) for i in range(nd)), 2 * nd + 1]
            return dx.transpose(order).reshape(x.shape)

        pool.defvjp(forward, backward)
        return pool(x)

    def adaptive_pool(x: Any, op: S.AdaptiveAvgPool | S.AdaptiveMaxPool) -> Any:
        """Flax's pool where every output size divides its input size (uniform windows);
        otherwise one axis at a time (a box window's mean or max is the mean or max along
        each axis in turn): the windows gathered, padded to the longest by repeating their
        last index, reduced (the mean over the real elements only)."""
        is_max, spatial = isinstance(op, S.AdaptiveMaxPool), x.shape[1:-1]
        if all(n % o == 0 for n, o in zip(spatial, op.output_size)):
            k = tuple(n // o for n, o in zip(spatial, op.output_size))
            return max_pool(x, k, k, ((0, 0),) * len(k)) if is_max else nn.avg_pool(x, k, k)
        for axis, (n, o) in enumerate(zip(spatial, op.output_size), start=1):
            windows = adaptive_windows(n, o)
            longest = max(b - a for a, b in windows)
            index = np.array([[min(a + j, b - 1) for j in range(longest)] for a, b in windows])
            w = take(x, index, axis)  # (..., o, longest, ...)
            if is_max:
                x = w.max(axis + 1)
            else:
                real = np.array([[j < b - a for j in range(longest)] for a, b in windows])
                count = np.array([b - a for a, b in windows])
                x = jnp.where(along(real, axis, w.ndim, bool), w, 0).sum(axis + 1) / along(count, axis, x.ndim, x.dtype)
        return x

    def upsample(x: Any, op: S.Upsample) -> Any:
        """One spatial axis at a time with :mod:`hal.lowering`'s source indices (and linear
        weights): torch's coordinate rules in any dtype (``jax.image.resize`` samples at
        half-pixel centres and antialiases when shrinking, which torch does not)."""
        for dim, n in enumerate(x.shape[1:-1]):
            axis = dim + 1
            if op.mode == "nearest":
                index = nearest_indices(op, dim, n)
                if not np.array_equal(index, np.arange(n)):
                    x = take(x, index, axis)
            elif op.size[dim] != n:
                i0, i1, w0, w1 = linear_indices(op, dim, n)
                x = take(x, i0, axis) * along(w0, axis, x.ndim, x.dtype) + take(x, i1, axis) * along(
                    w1, axis, x.ndim, x.dtype)
        return x

    def channel_shuffle(x: Any, groups: int) -> Any:  # (..., groups, C/groups) -> (..., C/groups, groups)
        return x.reshape(*x.shape[:-1], groups, -1).swapaxes(-1, -2).reshape(x.shape)

    pad_modes = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}  # numpy's reflect is torch's

    class SpecNet(nn.Module):
        """A hal spec as a linen module. Takes and returns channels-first arrays
        (the hal boundary); NHWC between. ``folded`` names the BatchNorm nodes
        folded into their convolution (the inference copy)."""

        spec: S.ModelSpec
        dtype: Any
        param_dtype: Any
        precision: Any
        folded: frozenset = frozenset()
        cpu: bool = False  # XLA:CPU's forms: Depthwise-, Pointwise- and CpuConv
        bn_axis_name: Any = None  # training-mode BatchNorm statistics synchronised over this mapped axis

        @nn.compact
        def __call__(self, x: Any, train: bool = False, update_stats: bool = False) -> Any:
            spec = self.spec
            fold_convs = {spec.node(b).inputs[0] for b in self.folded}
            consumers = spec.consumers()

            def batchnorms_only_read(name: str) -> bool:  # in training their statistics reduce it
                return bool(consumers[name]) and all(isinstance(spec.node(c).op, S.BatchNorm) for c in consumers[name])

            types = {"dtype": self.dtype, "param_dtype": self.param_dtype}
            if x.ndim > 2:
                x = jnp.moveaxis(x, 1, -1)  # channels-first -> channels-last, once
            vals: dict[str, Any] = {spec.input.name: x.astype(self.dtype)}
            for node in spec.nodes[1:]:
                op, xs, name = node.op, [vals[k] for k in node.inputs], node.name
                if isinstance(op, S.Conv) and self.cpu and 1 < op.groups == spec.in_shapes(node)[0][0]:
                    y = DepthwiseConv(
                        op.out_channels, op.kernel, op.stride, op.padding, op.dilation,
                        op.bias or name in fold_convs, name=name, **types,
                    )(xs[0])
                elif isinstance(op, S.Conv) and self.cpu and pointwise(op):
                    y = PointwiseConv(op.out_channels, op.stride, op.bias or name in fold_convs,
                                      precision=self.precision, name=name, **types)(xs[0])
                elif isinstance(op, S.Conv) and self.cpu:
                    y = CpuConv(
                        op.out_channels, op.kernel, op.stride, op.padding, op.dilation,
                        op.bias or name in fold_convs, groups=op.groups, precision=self.precision, name=name,
                        tap=narrow(op, spec.in_shapes(node)[0], self.dtype, train and batchnorms_only_read(name)),
                        **types,
                    )(xs[0])
                elif isinstance(op, S.Conv):
                    y = nn.Conv(
                        op.out_channels, op.kernel, op.stride, padding=op.padding, kernel_dilation=op.dilation,
                        feature_group_count=op.groups, use_bias=op.bias or name in fold_convs,
                        precision=self.precision, name=name, **types,
                    )(xs[0])
                elif isinstance(op, S.ConvTranspose):  # stride-1 conv of the stride-dilated input, kernel flipped
                    y = nn.Conv(
                        op.out_channels, op.kernel, 1, padding=conv_transpose_padding(op), input_dilation=op.stride,
                        kernel_dilation=op.dilation, feature_group_count=op.groups, use_bias=op.bias,
                        precision=self.precision, name=name, **types,
                    )(xs[0])
                elif isinstance(op, S.BatchNorm):
                    y = xs[0] if name in self.folded else BatchNorm(
                        op.eps, op.momentum, axis_name=self.bn_axis_name, name=name, **types
                    )(xs[0], train, update_stats)
                elif isinstance(op, S.GroupNorm):
                    y = nn.GroupNorm(
                        op.groups, epsilon=op.eps, use_bias=op.affine, use_scale=op.affine, use_fast_variance=False,
                        name=name, **types,
                    )(xs[0])
                elif isinstance(op, (S.LayerNorm, S.InstanceNorm)):  # over channels, or over positions
                    axes = -1 if isinstance(op, S.LayerNorm) else tuple(range(1, xs[0].ndim - 1))
                    y = nn.LayerNorm(
                        epsilon=op.eps, reduction_axes=axes, use_bias=op.affine, use_scale=op.affine,
                        use_fast_variance=False, name=name, **types,
                    )(xs[0])
                elif isinstance(op, S.Activation):
                    y = activations[op.fn](xs[0], op)
                elif isinstance(op, S.PReLU):
                    y = PReLU(op.num_parameters, self.param_dtype, name=name)(xs[0])
                elif isinstance(op, S.MaxPool):  # pads with -inf
                    y = max_pool(xs[0], op.kernel, op.stride, pool_padding(xs[0].shape[1:-1], op))
                elif isinstance(op, S.AvgPool):
                    y = avg_pool(xs[0], op)
                elif isinstance(op, (S.AdaptiveAvgPool, S.AdaptiveMaxPool)):
                    y = adaptive_pool(xs[0], op)
                elif isinstance(op, S.Pad):
                    value = {"constant_values": op.value} if op.mode == "constant" else {}
                    y = jnp.pad(xs[0], nhwc_pad(op.padding), pad_modes[op.mode], **value)
                elif isinstance(op, S.GlobalAvgPool):
                    y = jnp.mean(xs[0], axis=tuple(range(1, xs[0].ndim - 1)))
                elif isinstance(op, S.Add):  # equal ranks: NHWC broadcasts as NCHW does
                    y = functools.reduce(jnp.add, xs)
                elif isinstance(op, S.Mul):
                    y = functools.reduce(jnp.multiply, xs)
                elif isinstance(op, S.Scale):
                    y = Scale(self.param_dtype, name=name)(xs[0])
                elif isinstance(op, S.Concat):
                    y = jnp.concatenate(xs, axis=-1)
                elif isinstance(op, S.Upsample):
                    y = upsample(xs[0], op)
                elif isinstance(op, S.ChannelShuffle):
                    y = channel_shuffle(xs[0], op.groups)
                elif isinstance(op, S.ChannelSlice):
                    y = xs[0][..., op.start:op.stop]
                elif isinstance(op, S.Flatten):  # channels-first row-major: back to (N, C, *spatial) first
                    y = xs[0] if xs[0].ndim == 2 else jnp.moveaxis(xs[0], -1, 1)
                    y = y.reshape(y.shape[0], -1)
                elif isinstance(op, S.Dense):  # over the last axis: the channels, at every position
                    y = nn.Dense(op.out_features, use_bias=op.bias, precision=self.precision, name=name, **types)(xs[0])
                elif isinstance(op, S.Dropout):
                    y = nn.Dropout(op.rate, deterministic=not train or op.rate == 0.0, name=name)(xs[0])
                elif isinstance(op, S.StochasticDepth):  # dropout of whole samples ("row") or the whole batch
                    first = 1 if op.mode == "row" else 0
                    y = nn.Dropout(
                        op.p, broadcast_dims=tuple(range(first, xs[0].ndim)), deterministic=not train or op.p == 0.0,
                        name=name,
                    )(xs[0])
                else:  # pragma: no cover - unsupported() rejects unknown ops first
                    raise UnsupportedError(f"node {name!r}: jax has no {op.kind} op")
                vals[name] = y
            out = vals[spec.output]
            return jnp.moveaxis(out, -1, 1) if out.ndim > 2 else out

    _FLAX.update(SpecNet=SpecNet, CpuConv=CpuConv, materialize=materialize)
    return _FLAX


def flax_module(
    spec: S.ModelSpec, precision: str = "fp32", matmul: str = "highest", folded: frozenset = frozenset(),
    bn_axis_name: str | None = None, cpu: bool = False,
) -> Any:
    """The linen module of ``spec``: ``apply({"params", "batch_stats"}, x_nchw, train, update_stats)``;
    ``cpu`` lowers depthwise convolutions as sums of taps, 1x1 convolutions as matrix products
    and the others as :class:`CpuConv` (narrow ones forward as tap sums; all faster on XLA:CPU);
    ``bn_axis_name`` synchronises training-mode BatchNorm statistics over a mapped axis."""
    from jax import lax

    prec = {"highest": lax.Precision.HIGHEST, "high": lax.Precision.HIGH, "default": None}[matmul]
    return _flax()["SpecNet"](
        spec, COMPUTE_DTYPE[precision], MASTER_DTYPE[precision], prec, frozenset(folded), cpu, bn_axis_name,
    )


def pointwise(op: S.Conv) -> bool:
    """A 1x1 convolution without padding or groups: a matrix product over channels of the strided input."""
    return op.groups == 1 and all(k == 1 for k in op.kernel) and not any(map(any, op.padding))


NARROW_MAX_CHANNELS = 8


def narrow(op: S.Conv, in_shape: S.Shape, dtype: Any, reduced: bool) -> bool:
    """A float32 2-d convolution without groups that :class:`CpuConv` runs faster as a tap sum:
    one input channel, or, where ``reduced`` (every reader of its output is a training-mode
    BatchNorm), at most :data:`NARROW_MAX_CHANNELS` input and output channels.

    XLA:CPU fuses an elementwise producer into each consumer that reads it, recomputing it
    there: a tap sum is recomputed wherever its output is read through elementwise ops (ReLU,
    the padding for the next layer, a max pool's gradient, the transposes of a weight
    gradient), at 9C multiply-adds per output with C input channels (9 with one channel). A
    reader XLA does not fuse into, such as the reductions of a BatchNorm's statistics, makes it
    write the output once. The conductivity CNN (``bench/jax_narrow_rule.py``, two threads)
    with its 8 -> 8 convolutions as tap sums everywhere: without BatchNorm training takes 129
    against 36 ms per step, folded inference at batch 256 182 against 104 ms. At 8 -> 16
    channels the tap sum is slower than the convolution even alone (3.6 against 1.9 ms at
    32x32, batch 32, one thread)."""
    return (op.groups == 1 and len(op.kernel) == 2 and np.dtype(dtype) == np.float32
            and (in_shape[0] == 1 or reduced and max(in_shape[0], op.out_channels) <= NARROW_MAX_CHANNELS))


# ---------------------------------------------------------------------------
# canonical weights <-> flax variables
# ---------------------------------------------------------------------------


_FLAX_NAMES = {"bias": "bias", "running_mean": "mean", "running_var": "var", "layer_scale": "scale"}


def flax_name(op: S.Op, param: str) -> str:
    """The flax variable holding canonical parameter or buffer ``param`` of ``op``."""
    if param != "weight":
        return _FLAX_NAMES[param]
    if isinstance(op, (S.Conv, S.ConvTranspose, S.Dense)):
        return "kernel"
    return "negative_slope" if isinstance(op, S.PReLU) else "scale"  # PReLU; BatchNorm and the other norms


def _conv_transpose_kernel(w: np.ndarray, groups: int) -> np.ndarray:
    """Torch's ``(C, O/groups, *k)`` -> the kernel of the equivalent convolution over the
    stride-dilated input: in/out swapped within each group, ``(*k, C/groups, O)``, flipped."""
    nd, (c, og, *k) = w.ndim - 2, w.shape
    w = w.reshape(groups, c // groups, og, *k).transpose(*range(3, 3 + nd), 1, 0, 2)
    return w.reshape(*k, c // groups, groups * og)[(slice(None, None, -1),) * nd]


def _torch_conv_transpose_kernel(a: np.ndarray, groups: int) -> np.ndarray:
    """The inverse of :func:`_conv_transpose_kernel`."""
    nd, (*k, cg, o) = a.ndim - 2, a.shape
    a = a[(slice(None, None, -1),) * nd].reshape(*k, cg, groups, o // groups)
    return a.transpose(nd + 1, nd, nd + 2, *range(nd)).reshape(groups * cg, o // groups, *k)


def to_flax_layout(op: S.Op, param: str, a: np.ndarray, dtype: Any) -> np.ndarray:
    """One canonical tensor in its flax layout, a contiguous ``dtype`` array: conv
    ``(O, I/groups, *k) -> (*k, I/groups, O)``, dense ``(out, in) -> (in, out)``, transposed
    conv (:func:`_conv_transpose_kernel`), layer scale ``(C, 1, ..., 1) -> (C,)``. Only axis
    permutations, reversals and reshapes: a round trip is bit-exact."""
    if param == "weight" and isinstance(op, S.Conv):
        a = a.transpose(*range(2, a.ndim), 1, 0)
    elif param == "weight" and isinstance(op, S.Dense):
        a = a.T
    elif param == "weight" and isinstance(op, S.ConvTranspose):
        a = _conv_transpose_kernel(a, op.groups)
    elif param == "layer_scale":
        a = a.reshape(-1)
    return np.ascontiguousarray(a, dtype=dtype)


def to_canonical_layout(op: S.Op, param: str, a: np.ndarray, shape: S.Shape) -> np.ndarray:
    """The inverse of :func:`to_flax_layout` (``shape``: the canonical one), a writable C-contiguous copy."""
    if param == "weight" and isinstance(op, S.Conv):
        a = a.transpose(a.ndim - 1, a.ndim - 2, *range(a.ndim - 2))
    elif param == "weight" and isinstance(op, S.Dense):
        a = a.T
    elif param == "weight" and isinstance(op, S.ConvTranspose):
        a = _torch_conv_transpose_kernel(a, op.groups)
    return np.array(a.reshape(shape), order="C", copy=True)


def to_flax(spec: S.ModelSpec, weights: Mapping[str, np.ndarray], dtype: Any) -> tuple[dict, dict]:
    """Canonical weights -> (params, batch_stats) numpy trees in ``dtype`` (:func:`to_flax_layout`)."""
    params: dict[str, dict[str, np.ndarray]] = {}
    stats: dict[str, dict[str, np.ndarray]] = {}
    for node in spec.nodes:
        ins = spec.in_shapes(node)
        for tree, names in ((params, node.op.params(ins)), (stats, node.op.buffers(ins))):
            for p in names:
                a = to_flax_layout(node.op, p, np.asarray(weights[f"{node.name}.{p}"]), dtype)
                tree.setdefault(node.name, {})[flax_name(node.op, p)] = a
    return params, stats


def to_canonical(spec: S.ModelSpec, params: Mapping[str, Any], stats: Mapping[str, Any] | None = None) -> Weights:
    """Flax trees (numpy) -> canonical names and layouts; with ``stats=None`` only the
    trainable entries (e.g. gradients)."""
    out: Weights = {}
    for node in spec.nodes:
        ins = spec.in_shapes(node)
        trees = [(params, node.op.params(ins))] + ([(stats, node.op.buffers(ins))] if stats is not None else [])
        for tree, shapes in trees:
            for p, shape in shapes.items():
                a = np.asarray(tree[node.name][flax_name(node.op, p)])
                out[f"{node.name}.{p}"] = to_canonical_layout(node.op, p, a, shape)
    return out


# ---------------------------------------------------------------------------
# Optax optimizers with torch.optim semantics
# ---------------------------------------------------------------------------


def scale_by_hyper(name: str) -> Any:
    """``updates * -hyper[name]``: the per-step learning rate, passed in as a traced
    extra argument (``opt.update(g, s, p, hyper={...})``, the names of
    :func:`hal.lowering.step_scalars`)."""
    import jax
    import optax

    def update(updates: Any, state: Any, params: Any = None, *, hyper: Mapping[str, Any], **_: Any) -> Any:
        s = -hyper[name]
        return jax.tree.map(lambda u: s.astype(u.dtype) * u, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def scale_by_torch_adam(b1: float, b2: float, eps: float) -> Any:
    """``torch.optim.Adam``'s step direction, times ``-step_size``:
    ``m.lerp_(g, 1-b1)``; ``v = b2*v + (1-b2)*g*g``;
    ``u = -(lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)``, with ``step_size = lr/bc1``
    and ``bc2_sqrt = sqrt(1 - b2**t)`` from ``hyper`` (host float64, torch's 1-based t)."""
    from typing import NamedTuple

    import jax
    import jax.numpy as jnp
    import optax

    class TorchAdamState(NamedTuple):
        exp_avg: Any
        exp_avg_sq: Any

    def init(params: Any) -> TorchAdamState:
        return TorchAdamState(jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))

    def update(updates: Any, state: TorchAdamState, params: Any = None, *, hyper: Mapping[str, Any], **_: Any) -> Any:
        m = jax.tree.map(lambda m, g: m + (1.0 - b1) * (g - m), state.exp_avg, updates)
        v = jax.tree.map(lambda v, g: b2 * v + ((1.0 - b2) * g) * g, state.exp_avg_sq, updates)
        step_size, bc2_sqrt = hyper["step_size"], hyper["bc2_sqrt"]
        u = jax.tree.map(
            lambda m, v: (-step_size).astype(m.dtype) * (m / (jnp.sqrt(v) / bc2_sqrt.astype(v.dtype) + eps)), m, v
        )
        return u, TorchAdamState(m, v)

    return optax.GradientTransformationExtraArgs(init, update)


def decoupled_weight_decay() -> Any:
    """AdamW's ``p *= decay`` (``decay = 1 - lr*wd``, ``hyper["decay"]``) as an additive
    update ``(decay - 1) * p`` (the subtraction is exact for ``lr*wd <= 0.5``)."""
    import jax
    import optax

    def update(updates: Any, state: Any, params: Any = None, *, hyper: Mapping[str, Any], **_: Any) -> Any:
        s = hyper["decay"] - 1.0
        return jax.tree.map(lambda u, p: u + s.astype(p.dtype) * p, updates, params), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def optimizer(config: TrainConfig) -> Any:
    """The Optax transformation of a hal config (torch.optim semantics); its
    ``update`` takes ``hyper=`` the step's :func:`hal.lowering.step_scalars`."""
    import optax

    o = config.optimizer
    parts = []
    if isinstance(o, SGD):
        if o.weight_decay:
            parts.append(optax.add_decayed_weights(o.weight_decay))  # g + wd*p, before momentum (coupled)
        if o.momentum:
            parts.append(optax.trace(decay=o.momentum, nesterov=o.nesterov))  # b = mu*b + g; nesterov g + mu*b
        parts.append(scale_by_hyper("lr"))
    else:
        assert isinstance(o, Adam)
        if o.weight_decay and not isinstance(o, AdamW):
            parts.append(optax.add_decayed_weights(o.weight_decay))  # Adam: coupled L2
        parts.append(scale_by_torch_adam(o.betas[0], o.betas[1], o.eps))
        if o.weight_decay and isinstance(o, AdamW):
            parts.append(decoupled_weight_decay())
    return optax.chain(*parts)


# ---------------------------------------------------------------------------
# fp16: dynamic loss scaling (hal.lowering.LOSS_SCALE), inside the step
# ---------------------------------------------------------------------------


class LossScaleState(NamedTuple):
    """fp16's loss scale, carried beside the optimizer state: the ``scale``, the count of
    consecutive ``clean`` steps, and ``count``, the optimizer updates applied (Adam's
    ``t - 1``: torch's ``state["step"]`` does not advance on a step GradScaler skips)."""

    scale: Any
    clean: Any
    count: Any


def initial_loss_scale() -> LossScaleState:
    return LossScaleState(np.asarray(LOSS_SCALE.init, np.float32), np.asarray(0, np.int32), np.asarray(0, np.int32))


def update_loss_scale(s: LossScaleState, found_inf: Any, rule: LossScale = LOSS_SCALE) -> LossScaleState:
    """:func:`hal.lowering.next_loss_scale` (``GradScaler.update``) in the program; ``count``
    advances unless ``found_inf``."""
    import jax.numpy as jnp

    scale, clean = loss_scale_step(s.scale, s.clean, found_inf, jnp.where, rule)
    return LossScaleState(scale, clean, s.count + jnp.where(found_inf, 0, 1))


def adam_scalars_at(hyper: Mapping[str, Any], count: Any, betas: tuple[float, float]) -> dict[str, Any]:
    """``hyper`` with Adam's ``step_size`` and ``bc2_sqrt`` at torch's ``t = count + 1`` of a traced
    ``count`` (:func:`hal.lowering.adam_bias_corrections`; optax's ``1 - b**t`` in float32 is less exact)."""
    import jax.numpy as jnp

    t = (count + 1).astype(jnp.float32)
    step_size, bc2_sqrt = adam_bias_corrections(hyper["lr"], t, betas, jnp.expm1, jnp.sqrt)
    return {**hyper, "step_size": step_size, "bc2_sqrt": bc2_sqrt}


# ---------------------------------------------------------------------------
# the compiled programs, shared by executables of the same spec and config
# ---------------------------------------------------------------------------

_PROGRAMS: dict[tuple, Any] = {}
_PROGRAMS_MAX = 32
CPU_CONVOLUTIONS_ON_EIGEN = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
"""XLA:CPU options that leave convolutions to Eigen (matrix products and reductions stay on YNNPACK),
used with more than one intra-op thread. XLA's YNNPACK convolutions do not use the second thread
on the 2-core dev box (ResNet-50's 56x56 64->64: 117 ms with one thread, 97 with two), Eigen's do
(64x64 8->8: 10.6 against 4.1 ms; bench/results/session4/layers-*.md). Two threads, one process,
interleaved: ResNet-50 at 224x224, batch 16, trains 1.16x and infers 1.23x faster, the conductivity
CNN trains 1.17x faster. With one thread YNNPACK is faster (ResNet-50 training 1.46x), so it stays."""


CPU_CONVOLUTIONS: dict[str, Callable[[], bool]] = {
    "auto": lambda: xla_cpu_threads() > 1, "ynnpack": lambda: False, "eigen": lambda: True,
}
"""The jax backend option ``cpu_convolutions``: whether the CPU programs use :data:`CPU_CONVOLUTIONS_ON_EIGEN`."""


def xla_cpu_threads() -> int:
    """The threads XLA:CPU's convolutions may use: its intra-op pool's size (``PJRT_NPROC``, else
    ``NPROC``, else the CPUs this process may run on: xla/pjrt/utils.cc ``DefaultThreadPoolSize``).
    ``--xla_cpu_multi_thread_eigen=false`` does not limit them in this jaxlib (0.10.2: a
    16x56x56x64 Eigen convolution takes the same two threads with and without it)."""
    for name in ("PJRT_NPROC", "NPROC"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return max(1, int(value))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


CPU_UNROLL_ACCUM_MAX = 8
"""On the CPU, gradient accumulation over at most this many micro-batches is unrolled
(the module docstring's ``ConvCanonicalization`` note: a scan's weight gradients run as
naive loops); compile time grows with the count, so beyond it the micro-batches stay a
``lax.scan`` (bench/results/jax_speed/README.md: the measurements behind the limit)."""


def programs(
    spec: S.ModelSpec, config: TrainConfig, matmul: str, cpu: bool = False, mesh: Any = None,
    cpu_convolutions: str = "auto",
) -> Any:
    """The jitted programs of ``(spec, config, matmul, cpu)``, built once per process; ``cpu``:
    XLA:CPU's lowering choices (depthwise and narrow convolutions as taps, 1x1 convolutions
    as matrix products, micro-batches unrolled up to :data:`CPU_UNROLL_ACCUM_MAX`, and
    convolutions on Eigen where ``cpu_convolutions`` says so: :data:`CPU_CONVOLUTIONS`).

    The learning rate and schedule are traced arguments, so executables that differ
    only there (or in weights or device) share one set of jitted functions, hence
    one XLA compile per argument shape (``jax.jit`` caches compiled code per function
    object, shapes and devices): the parity harness, a notebook or a sweep compiles
    the same model many times. With a ``mesh`` (data parallelism, :class:`JaxDataParallelExecutable`)
    the training programs are data-parallel over its axis ``"data"``.
    """
    from dataclasses import replace

    unroll_accum = cpu and config.grad_accum <= CPU_UNROLL_ACCUM_MAX
    eigen_convolutions = cpu and CPU_CONVOLUTIONS[cpu_convolutions]()
    key = (
        spec.hash, config.loss, config.grad_accum, config.precision, replace(config.optimizer, lr=0.0),
        config.check_finite, matmul, cpu, mesh, mesh is not None and config.data_parallel.sync_batchnorm,
        unroll_accum, eigen_convolutions,
    )
    if key not in _PROGRAMS:
        while len(_PROGRAMS) >= _PROGRAMS_MAX:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[key] = _build_programs(spec, config, matmul, cpu, mesh, unroll_accum, eigen_convolutions)
    return _PROGRAMS[key]


def _build_programs(
    spec: S.ModelSpec, config: TrainConfig, matmul: str, cpu: bool, mesh: Any, unroll_accum: bool,
    eigen_convolutions: bool,
) -> Any:
    """The jitted train step, run_steps scan, gradients, training-mode forward,
    BatchNorm folding and folded inference of one spec and config (traced on first call).
    ``unroll_accum``: the micro-batch scan is unrolled (XLA:CPU, :data:`CPU_UNROLL_ACCUM_MAX`);
    ``eigen_convolutions``: compiled with :data:`CPU_CONVOLUTIONS_ON_EIGEN`."""
    import types

    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    net = flax_module(spec, config.precision, matmul, cpu=cpu)
    if mesh is not None and config.data_parallel.sync_batchnorm:
        train_net = flax_module(spec, config.precision, matmul, bn_axis_name=DATA_AXIS, cpu=cpu)
    else:
        train_net = net
    fold = foldable_batchnorms(spec)
    net_infer = flax_module(spec, config.precision, matmul, frozenset(fold), cpu=cpu)
    tx = optimizer(config)
    names = step_scalar_names(config)
    g, master = config.grad_accum, np.dtype(MASTER_DTYPE[config.precision])
    loss_scaled = config.precision in LOSS_SCALED
    cross_entropy = config.loss == "cross_entropy"
    dropout = any(isinstance(n.op, S.Dropout) and n.op.rate > 0 or isinstance(n.op, S.StochasticDepth) and n.op.p > 0
                  for n in spec.nodes)
    base_key = jax.random.key(0)  # dropout and stochastic depth masks: fold_in(step), then fold_in(micro-batch)

    def loss_value(out: Any, y: Any) -> Any:
        out = out.astype(master)
        if cross_entropy:
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return jnp.mean(jnp.square(out - y))

    def micro_loss(params: Any, stats: Any, x: Any, y: Any, key: Any, update: bool, scale: Any) -> Any:
        rngs = {"dropout": key} if dropout else None
        v = {"params": params, "batch_stats": stats}
        if update:
            out, new = train_net.apply(v, x, True, True, mutable=["batch_stats"], rngs=rngs)
            stats = new.get("batch_stats", stats)
        else:
            out = train_net.apply(v, x, True, False, rngs=rngs)
        loss = loss_value(out, y) / g  # grads of loss/G summed over micro-batches, as torch
        return (loss if scale is None else loss * scale), stats  # fp16: the gradients of loss * scale

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def unscaled(loss: Any, grads: Any, stats: Any, scale: Any) -> tuple[Any, Any, Any]:
        """fp16: loss and gradients times ``1 / scale`` in float32 (GradScaler's unscale; exact, a power of 2)."""
        if scale is None:
            return loss, grads, stats
        inv = 1.0 / scale
        return loss * inv, jax.tree.map(lambda d: d * inv, grads), stats

    def after(x: Any, tree: Any) -> Any:
        """``x``, computed after every array of ``tree``: plus 0 times a finite scalar of each (exact).
        Unrolled micro-batches need this data dependency: XLA:CPU removes ``optimization_barrier``
        before it schedules, and it would run their forward passes together (memory growing with G)."""
        dep = sum(v.ravel()[0] for v in jax.tree.leaves(tree))
        return x + 0 * jnp.where(jnp.isfinite(dep), dep, 0).astype(x.dtype)

    def loss_grads(params: Any, stats: Any, x: Any, y: Any, key: Any, update: bool, scale: Any = None) -> Any:
        """Mean loss and mean gradient over the G micro-batches; BatchNorm
        statistics of each micro-batch, running statistics updated sequentially. Data-parallel:
        this replica's micro-batches, then :func:`replica_mean`. fp16: ``scale`` is the loss scale."""
        first = 0  # the index of the first micro-batch among all replicas' (dropout keys)
        if mesh is not None:  # this replica's own gradients (replica_mean reduces them), not shard_map's implicit sum
            first, params = lax.axis_index(DATA_AXIS) * g, lax.pcast(params, DATA_AXIS, to="varying")
        if g == 1:
            (loss, stats), grads = grad_fn(params, stats, x, y, jax.random.fold_in(key, first), update, scale)
            return unscaled(*replica_mean(loss, grads, stats, mesh, config), scale)
        xs, ys = x.reshape(g, -1, *x.shape[1:]), y.reshape(g, -1, *y.shape[1:])

        def body(carry: Any, inp: Any) -> Any:
            stats, gsum, lsum = carry
            xi, yi, i = inp
            if unroll_accum:
                xi = after(xi, gsum)
            (loss, stats), grads = grad_fn(params, stats, xi, yi, jax.random.fold_in(key, i), update, scale)
            return (stats, jax.tree.map(jnp.add, gsum, grads), lsum + loss), None

        init = (stats, jax.tree.map(jnp.zeros_like, params), jnp.zeros((), master))
        (stats, grads, loss), _ = lax.scan(body, init, (xs, ys, first + jnp.arange(g)), unroll=unroll_accum)
        return unscaled(*replica_mean(loss, grads, stats, mesh, config), scale)

    def all_finite(tree: Any) -> Any:
        return jnp.all(jnp.stack([jnp.isfinite(v).all() for v in jax.tree.leaves(tree)]))

    def step(state: Any, x: Any, y: Any, scalars: Any, t: Any, ok: Any) -> Any:
        """One optimizer step from ``state = (params, stats, opt_state)`` with the step's
        scalar row and index ``t``. ``ok``: every earlier step of the call was applied.
        Returns the state after it (the old one if it is not applied), its loss, and
        whether it was applied. fp16: ``opt_state`` is ``(optimizer state, LossScaleState)``;
        an inf/nan gradient leaves parameters and optimizer state as they were (GradScaler's
        skip: the BatchNorm statistics keep the forward's update) and is not a failure."""
        params, stats, opt_state = state
        hyper, scale = dict(zip(names, scalars)), None
        if loss_scaled:
            opt_state, ls = opt_state
            scale = ls.scale
            if isinstance(config.optimizer, Adam):
                hyper = adam_scalars_at(hyper, ls.count, config.optimizer.betas)
        loss, grads, stats = loss_grads(params, stats, x, y, jax.random.fold_in(base_key, t), True, scale)
        updates, new_opt = tx.update(grads, opt_state, params, hyper=hyper)
        new_params = optax.apply_updates(params, updates)
        if loss_scaled:
            found_inf = ~all_finite(grads)
            new_params, new_opt = jax.tree.map(
                lambda a, b: jnp.where(found_inf, b, a), (new_params, new_opt), (params, opt_state))
            new_opt = (new_opt, update_loss_scale(ls, found_inf))
        new = (new_params, stats, new_opt)
        if not config.check_finite:
            return new, loss, ok
        ok = ok & (jnp.isfinite(loss) if loss_scaled else jnp.isfinite(loss) & all_finite(grads))
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state), loss, ok

    def train_step(params: Any, stats: Any, opt_state: Any, x: Any, y: Any, scalars: Any, t: Any, ok: Any) -> Any:
        """:func:`step`; ``ok``: every earlier step of the run was applied. A step after one not
        applied is computed but neither applied nor reported (its loss is nan)."""
        (params, stats, opt_state), loss, applied = step((params, stats, opt_state), x, y, scalars, t, ok)
        return params, stats, opt_state, jnp.where(ok, loss, jnp.nan), applied

    def run_steps(params: Any, stats: Any, opt_state: Any, xs: Any, ys: Any, table: Any, ts: Any) -> Any:
        """``lax.scan`` of :func:`train_step`."""

        def body(carry: Any, inp: Any) -> Any:
            state, ok = carry
            *state, loss, applied = train_step(*state, *inp, ok)
            return (tuple(state), applied), (loss, applied)

        init = ((params, stats, opt_state), jnp.array(True))
        ((params, stats, opt_state), _), (losses, applied) = lax.scan(body, init, (xs, ys, table, ts))
        return params, stats, opt_state, losses, applied.sum()

    def grads_only(params: Any, stats: Any, x: Any, y: Any, key: Any, scale: Any) -> Any:
        loss, grads, _ = loss_grads(params, stats, x, y, key, False, scale)
        return loss, grads

    def init_opt_state(params: Any) -> Any:
        return (tx.init(params), initial_loss_scale()) if loss_scaled else tx.init(params)

    def forward_train(params: Any, stats: Any, x: Any, key: Any) -> Any:
        rngs = {"dropout": key} if dropout else None
        return net.apply({"params": params, "batch_stats": stats}, x, True, False, rngs=rngs).astype(master)

    def fold_bn(params: Any, stats: Any) -> Any:
        """Inference variables with each foldable BatchNorm folded into its conv."""
        params, stats = dict(params), dict(stats)
        for bn, conv in fold.items():
            p, s, c = params.pop(bn), stats.pop(bn), params[conv]
            kernel, bias = fold_batchnorm(  # output channels first, as the formula takes them
                jnp.moveaxis(c["kernel"], -1, 0), c.get("bias"), p["scale"], p["bias"], s["mean"], s["var"],
                spec.node(bn).op.eps,
            )
            params[conv] = {"kernel": jnp.moveaxis(kernel, 0, -1), "bias": bias}
        return {"params": params, "batch_stats": stats}

    def infer(variables: Any, x: Any) -> Any:
        return net_infer.apply(variables, x).astype(master)

    if mesh is not None:
        train_step, run_steps, grads_only = data_parallel(mesh, train_step, run_steps, grads_only)
    jit = functools.partial(jax.jit, compiler_options=CPU_CONVOLUTIONS_ON_EIGEN if eigen_convolutions else None)
    return types.SimpleNamespace(
        net=net, net_infer=net_infer, tx=tx, key=base_key, init_opt_state=init_opt_state,
        train=jit(train_step, donate_argnums=(0, 1, 2)),  # parameters, statistics, optimizer state
        run=jit(run_steps, donate_argnums=(0, 1, 2)),
        grads=jit(grads_only),
        forward_train=jit(forward_train),
        fold=jit(fold_bn),
        infer=jit(infer),
    )


# ---------------------------------------------------------------------------
# the executable
# ---------------------------------------------------------------------------


class JaxExecutable(Executable):
    """Parameters, BatchNorm statistics and optimizer state as device pytrees, updated
    by the shared jitted :func:`programs` (donated: the old buffers are reused)."""

    mesh: Any = None  # the data-parallel mesh (JaxDataParallelExecutable)

    def __init__(self, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, matmul: str,
                 cpu_convolutions: str = "auto") -> None:
        super().__init__(spec, Target("jax", device), config)
        self.device = _jax_device(device)
        if config.precision == "fp64" and self.device.platform == "tpu":
            raise UnsupportedError(f"jax:{device}: TPUs have no float64 arithmetic; use fp32")
        self.matmul_precision = matmul
        self.x64 = config.precision == "fp64"
        self.master = np.dtype(MASTER_DTYPE[config.precision])
        self._calls = 0  # counter for dropout keys of predict(training=True)
        self._infer_vars: Any = None  # folded inference variables, rebuilt when weights change
        with self._scope():
            self.programs = programs(spec, config, matmul, cpu=self.device.platform == "cpu", mesh=self.mesh,
                                     cpu_convolutions=cpu_convolutions)
            self._key = self.programs.key
            self._load_weights(weights)
            self.opt_state = self._put_tree(self.programs.init_opt_state(self.params))
            self._true = self._put_tree(np.asarray(True))  # the first step of a run: a device array, as
            # the later steps' ok flags are (a numpy bool would compile the step a second time)

    # -- helpers ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _scope(self) -> Iterator[None]:
        """float64 on for this executable's traces and calls only; device errors as hal errors."""
        import jax

        with contextlib.ExitStack() as stack:
            if self.x64:
                stack.enter_context(jax.enable_x64(True))
            try:
                yield
            except Exception as exc:  # noqa: BLE001 - only device memory exhaustion is translated
                if "RESOURCE_EXHAUSTED" in str(exc) or "Out of memory" in str(exc):
                    raise InputError(
                        f"{self.target}: out of device memory ({str(exc).splitlines()[0][:200]}); "
                        "use a smaller batch or gradient accumulation"
                    ) from None
                raise

    def _put_tree(self, tree: Any) -> Any:
        """Arrays (a pytree) where the parameters live."""
        import jax

        return jax.device_put(tree, self.device)

    def _put(self, a: np.ndarray, dtype: Any = None) -> Any:
        return self._put_tree(np.ascontiguousarray(a, dtype=dtype or self.master))

    def _put_batch(self, a: np.ndarray, dtype: Any = None, stacked: bool = False) -> Any:
        """A training batch (``stacked``: batches stacked on a leading axis); data parallelism shards it."""
        return self._put(a, dtype)

    def _put_y(self, y: np.ndarray, stacked: bool = False) -> Any:
        return self._put_batch(y, np.int32 if self.config.loss == "cross_entropy" else None, stacked)

    def _loss_scale_array(self) -> Any:
        return self.opt_state[1].scale if self.config.precision in LOSS_SCALED else None

    @property
    def loss_scale(self) -> float | None:
        """fp16: the current dynamic loss scale (:data:`hal.lowering.LOSS_SCALE`); otherwise ``None``."""
        scale = self._loss_scale_array()
        return None if scale is None else float(scale)

    def _variables(self) -> Any:
        if self._infer_vars is None:
            self._infer_vars = self.programs.fold(self.params, self.stats)
        return self._infer_vars

    # -- the hooks ---------------------------------------------------------------------

    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        import jax

        with self._scope():
            if training:
                self._calls += 1
                key = jax.random.fold_in(jax.random.fold_in(self._key, 2**31 - 1), self._calls)
                out = self.programs.forward_train(self.params, self.stats, self._put(x), key)
            else:
                out = self.programs.infer(self._variables(), self._put(x))
            return np.array(out)

    def _loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        import jax

        with self._scope():
            key = jax.random.fold_in(self._key, self.step)
            loss, grads = self.programs.grads(
                self.params, self.stats, self._put_batch(x), self._put_y(y), key, self._loss_scale_array()
            )
            return float(loss), to_canonical(self.spec, jax.device_get(grads))

    def _train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
        import jax

        with self._scope():
            scalars = self._put(scalar_table(self.config, self.step, 1)[0])
            self.params, self.stats, self.opt_state, loss, ok = self.programs.train(
                self.params, self.stats, self.opt_state, self._put_batch(x), self._put_y(y), scalars,
                np.asarray(self.step, np.int32), self._true,
            )
            self._infer_vars = None  # built from donated buffers
            loss, ok = jax.device_get((loss, ok))
        self.step += int(ok)
        return float(loss), bool(ok)

    def _run_steps(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, int]:
        import jax

        n = len(xs)
        with self._scope():
            table = scalar_table(self.config, self.step, n)
            ts = np.arange(self.step, self.step + n, dtype=np.int32)
            if self.device.platform == "cpu":  # a loop of jitted steps: XLA:CPU runs the scan's convolutions slowly
                losses, applied, ok = [], [], self._true
                for i in range(n):  # dispatched without waiting: the next step's inputs go while this one runs
                    self.params, self.stats, self.opt_state, loss, ok = self.programs.train(
                        self.params, self.stats, self.opt_state, self._put_batch(xs[i]), self._put_y(ys[i]),
                        self._put(table[i]), ts[i], ok,
                    )
                    losses.append(loss)
                    applied.append(ok)
            else:
                self.params, self.stats, self.opt_state, losses, applied = self.programs.run(
                    self.params, self.stats, self.opt_state, self._put_batch(xs, stacked=True),
                    self._put_y(ys, True), self._put(table), ts,
                )
            self._infer_vars = None
            losses, applied = jax.device_get((losses, applied))
        applied = int(np.sum(applied))
        self.step += applied
        return np.asarray(losses, dtype=np.float64), applied

    def weights(self) -> Weights:
        import jax

        with self._scope():
            params, stats = jax.device_get((self.params, self.stats))
        return to_canonical(self.spec, params, stats)

    def _load_weights(self, weights: Weights) -> None:
        with self._scope():
            params, stats = self._put_tree(to_flax(self.spec, weights, self.master))
        self.params, self.stats, self._infer_vars = params, stats, None


# ---------------------------------------------------------------------------
# data parallelism: one SPMD program over a device mesh (hal.training.DataParallel)
# ---------------------------------------------------------------------------

DATA_AXIS = "data"


_DISTRIBUTED_ERRORS: dict[DataParallel, str] = {}  # why jax.distributed.initialize failed, per setting


def prepare_data_parallel(dp: DataParallel) -> None:
    """What JAX must be told before it initialises: ``dp.replicas`` CPU devices
    (``jax_num_cpu_devices``, the option behind XLA's ``--xla_force_host_platform_device_count``)
    and, with several hosts, ``jax.distributed.initialize(coordinator, hosts, host_rank)``.
    Called too late (JAX already running), it changes nothing: :func:`data_mesh` then says
    what is missing and how to get it."""
    import jax

    if dp.hosts > 1 and not jax.distributed.is_initialized():
        host, port = dp.coordinator_address()
        try:
            jax.distributed.initialize(f"{host}:{port}", dp.hosts, dp.host_rank)
        except RuntimeError as exc:  # JAX already initialised its backends, or the coordinator is unreachable
            _DISTRIBUTED_ERRORS[dp] = f"{type(exc).__name__}: {exc}"
    if dp.replicas > 1 and jax.config.jax_num_cpu_devices < dp.replicas:
        try:
            jax.config.update("jax_num_cpu_devices", dp.replicas)
        except RuntimeError:
            pass


def data_mesh(device: str, dp: DataParallel) -> "jax.sharding.Mesh":
    """The 1-d mesh (axis ``"data"``) of every host's ``dp.replicas`` devices of ``device``'s
    platform, from ``device``'s index on; global replica ``host_rank * replicas + r`` is host
    ``host_rank``'s ``r``-th device. Raises :class:`TargetError` naming the fix if JAX has too
    few devices or processes."""
    import jax
    from jax.sharding import Mesh

    platform, _, index = device.partition(":")
    first = int(index or 0)
    if jax.process_count() != dp.hosts:
        raise TargetError(
            f"jax:{device}: DataParallel(hosts={dp.hosts}) needs jax.distributed initialised with {dp.hosts} "
            f"processes, JAX runs {jax.process_count()}: compile the first data-parallel executable of the process "
            "before anything else uses JAX (hal.compile initialises jax.distributed from DataParallel.coordinator), "
            "or call jax.distributed.initialize yourself first"
            + (f"; initialising it failed with {_DISTRIBUTED_ERRORS[dp]}" if dp in _DISTRIBUTED_ERRORS else "")
        )
    local = sorted(jax.local_devices(backend=platform), key=lambda d: d.id)[first:first + dp.replicas]
    if len(local) < dp.replicas:
        fix = (
            f"start the process with XLA_FLAGS=--xla_force_host_platform_device_count={first + dp.replicas} "
            f"(or jax.config.update('jax_num_cpu_devices', {first + dp.replicas}) right after importing jax), "
            "before JAX runs anything; `hal train`/`hal parity` do this in their worker processes"
            if platform == "cpu" else f"use at most {len(local)} replicas"
        )
        raise TargetError(
            f"jax:{device}: DataParallel(replicas={dp.replicas}) needs {dp.replicas} {platform} devices from "
            f"index {first}, this process has {len(local)}: {fix}"
        )
    hosts = [sorted((d for d in jax.devices(platform) if d.process_index == h), key=lambda d: d.id)
             for h in range(dp.hosts)]
    return Mesh(np.array([d for devices in hosts for d in devices[first:first + dp.replicas]]), (DATA_AXIS,))


def replica_mean(loss: Any, grads: Any, stats: Any, mesh: Any, config: TrainConfig) -> tuple[Any, Any, Any]:
    """Inside a data-parallel step (identity without a ``mesh``): the loss and gradients
    averaged over the replicas (``lax.pmean``), the BatchNorm running statistics replica 0's
    (a ``psum`` of the statistics masked to replica 0: exact); synchronised BatchNorm keeps
    equal statistics on every replica already."""
    if mesh is None:
        return loss, grads, stats
    import jax
    import jax.numpy as jnp
    from jax import lax

    loss, grads = lax.pmean((loss, grads), DATA_AXIS)
    if not config.data_parallel.sync_batchnorm:
        first = lax.axis_index(DATA_AXIS) == 0
        stats = jax.tree.map(lambda s: lax.psum(jnp.where(first, s, jnp.zeros_like(s)), DATA_AXIS), stats)
    return loss, grads, stats


def data_parallel(mesh: Any, train_step: Callable, run_steps: Callable, grads_only: Callable) -> tuple[Callable, ...]:
    """:func:`_build_programs`'s step functions as SPMD programs over ``mesh`` (``jax.shard_map``):
    batches split over axis ``"data"`` (run_steps' stacked batches on their second axis),
    parameters, statistics, optimizer state, scalars and results replicated."""
    import jax
    from jax.sharding import PartitionSpec as P

    rep, batch, steps = P(), P(DATA_AXIS), P(None, DATA_AXIS)
    return (
        jax.shard_map(train_step, mesh=mesh, in_specs=(rep, rep, rep, batch, batch, rep, rep, rep), out_specs=rep),
        jax.shard_map(run_steps, mesh=mesh, in_specs=(rep, rep, rep, steps, steps, rep, rep), out_specs=rep),
        jax.shard_map(grads_only, mesh=mesh, in_specs=(rep, rep, batch, batch, rep, rep), out_specs=rep),
    )


class JaxDataParallelExecutable(JaxExecutable):
    """Data-parallel training (``config.data_parallel``, rules in :mod:`hal.training`) on a
    :func:`data_mesh`: each step is one SPMD program (:func:`data_parallel`) in which every
    replica runs the single-device step on its rows of the host batch (its ``grad_accum``
    micro-batches, its BatchNorm statistics, or all replicas' with ``sync_batchnorm``:
    ``BatchNorm(axis_name="data")``), then :func:`replica_mean`, then the same optimizer
    update. Several hosts: ``jax.distributed`` (:func:`prepare_data_parallel`), each host
    passing its own batch (``jax.make_array_from_process_local_data``). ``predict`` runs
    the single-device program replicated, ``weights()`` are replica 0's."""

    def __init__(self, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, matmul: str,
                 cpu_convolutions: str = "auto") -> None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        prepare_data_parallel(config.data_parallel)
        self.mesh = data_mesh(device, config.data_parallel)
        self._replicated = NamedSharding(self.mesh, P())
        self._batch = NamedSharding(self.mesh, P(DATA_AXIS))
        self._stacked = NamedSharding(self.mesh, P(None, DATA_AXIS))  # run_steps' batches
        super().__init__(spec, weights, device, config, matmul, cpu_convolutions)

    def _put_tree(self, tree: Any) -> Any:
        import jax

        def put(a: Any) -> Any:
            if isinstance(a, jax.Array):  # e.g. optimizer state made from replicated parameters
                return jax.device_put(a, self._replicated)
            return jax.make_array_from_process_local_data(self._replicated, np.asarray(a))

        return jax.tree.map(put, tree)

    def _put_batch(self, a: np.ndarray, dtype: Any = None, stacked: bool = False) -> Any:
        import jax

        a = np.ascontiguousarray(a, dtype=dtype or self.master)
        return jax.make_array_from_process_local_data(self._stacked if stacked else self._batch, a)


def _jax_device(device: str) -> "jax.Device":
    """The jax device of a resolved device name (``cpu``, ``gpu:N``, ``tpu:N``)."""
    import jax

    platform, _, index = device.partition(":")
    return jax.devices(platform)[int(index or 0)]


def _precision_reason(precision: str) -> str:
    return f"jax supports precisions {PRECISIONS}, not {precision!r}"


class JaxBackend(Backend):
    """JAX with Flax linen modules and Optax optimizers, XLA-compiled."""

    name = "jax"
    description = "JAX/Flax/Optax, one XLA program per step (CPU, GPU, TPU)"

    @classmethod
    def availability(cls) -> Availability:
        for module, dist in (("jax", "jax"), ("flax", "flax"), ("optax", "optax")):
            a = package_availability(module, dist, INSTALL_HINT)
            if not a.available:
                return a
        return package_availability("jax", "jax", INSTALL_HINT)

    @classmethod
    def devices(cls) -> list[str]:
        """``cpu``, ``gpu:N``, ``tpu:N``; JAX's default platform first (what ``jax`` alone means)."""
        import jax

        found: dict[str, list[str]] = {}
        for platform in ("cpu", "gpu", "tpu"):
            try:
                devs = jax.devices(platform)
            except Exception:  # noqa: BLE001 - no such platform, or its plugin failed to initialise
                continue
            found[platform] = ["cpu"] if platform == "cpu" else [f"{platform}:{i}" for i in range(len(devs))]
        default = jax.default_backend()
        default = "gpu" if default in ("cuda", "rocm") else default
        order = sorted(found, key=lambda p: p != default)
        return [d for p in order for d in found[p]]

    @classmethod
    def resolve_device(cls, device: str) -> str:
        if device in ("cpu", "cpu:0"):  # always there: resolved without starting JAX, which data parallelism
            return "cpu"  # must configure first (prepare_data_parallel)
        return super().resolve_device(device)

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(precisions=PRECISIONS, data_parallel=True, sync_batchnorm=True)

    @classmethod
    def prepare_data_parallel(cls, dp: DataParallel) -> None:
        """Before JAX initialises: :func:`prepare_data_parallel`."""
        prepare_data_parallel(dp)

    @classmethod
    def options(cls) -> dict[str, Option]:
        return {
            "matmul_precision": Option(
                "highest",
                "precision of convolutions and matmuls: 'highest' (full float32, parity), 'high' or 'default' "
                "(faster TF32/bf16 passes on GPU and TPU; no effect on CPU)",
                MATMUL_PRECISIONS,
            ),
            "cpu_convolutions": Option(
                "auto",
                "which library XLA:CPU runs convolutions on: 'auto' (Eigen with more than one intra-op thread, "
                "YNNPACK with one: XLA's YNNPACK convolutions do not use more threads), 'ynnpack' (XLA's own "
                "choice) or 'eigen'; no effect off the CPU",
                tuple(CPU_CONVOLUTIONS),
            ),
        }

    @classmethod
    def unsupported(cls, spec: S.ModelSpec, config: TrainConfig | None = None) -> dict[str, str]:
        out = super().unsupported(spec, config)
        if "config" in out and config is not None:
            out["config"] = _precision_reason(config.precision)
        return out

    @classmethod
    def compile(
        cls, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, options: Mapping[str, Any],
        plan: Any,
    ) -> Executable:
        exe = JaxDataParallelExecutable if config.data_parallel.enabled else JaxExecutable
        return exe(spec, weights, device, config, options["matmul_precision"], options["cpu_convolutions"])
