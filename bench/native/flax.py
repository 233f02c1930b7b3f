"""A plainly hand-written Flax linen ResNet (the layout of flax/examples/imagenet/models.py)
with an Optax SGD-momentum train step: the baseline that ``hal bench`` times hal's
``jax`` backend against in the same run.

Nothing here uses hal: it is what a JAX user would write. NHWC, standard
``nn.Conv``/``nn.BatchNorm`` (Flax's own momentum and fast variance), ``optax.sgd``,
one jitted train step with the train state donated, default matmul precision.
``Native.predict``/``train_step`` take channels-first numpy batches like hal and
``hal.native.torch`` (the same arrays go to every target); the transpose to
NHWC happens inside the jitted function, as in hal.

``bf16``/``fp16``: Flax's mixed-precision recipe, ``dtype`` (the compute dtype)
on every layer with float32 parameters (``param_dtype``), BatchNorm statistics in
float32 (Flax promotes them), the logits cast to float32 for the loss; fp16 adds
dynamic loss scaling written out in the step, ``torch.amp.GradScaler``'s rule and
defaults (:data:`LOSS_SCALE`): gradients of ``loss * scale`` unscaled, a step with an
inf/nan gradient keeps the old parameters and optimizer state and halves the
scale, 2000 clean steps double it.

JAX and Flax ship no model zoo, so the ResNets are the only baselines here; the
other zoo models have none on ``jax`` (the bench row says so).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hal.native import NoBaseline

COMPUTE = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}  # precision -> compute dtype
LOSS_SCALE = {"init": 2.0**16, "growth": 2.0, "backoff": 0.5, "interval": 2000}  # GradScaler's defaults
LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class ResNetBlock(nn.Module):
    filters: int
    conv: Any
    norm: Any
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)))(x)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters, (3, 3), padding=((1, 1), (1, 1)))(y)
        y = self.norm()(y)
        if residual.shape != y.shape:
            residual = self.norm()(self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual))
        return nn.relu(residual + y)


class BottleneckResNetBlock(nn.Module):
    filters: int
    conv: Any
    norm: Any
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides, padding=((1, 1), (1, 1)))(y)))
        y = self.norm()(self.conv(self.filters * 4, (1, 1))(y))
        if residual.shape != y.shape:
            residual = self.norm()(self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual))
        return nn.relu(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block_cls: Any
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        x = conv(self.num_filters, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2**i, conv=conv, norm=norm, strides=strides)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def resnet(depth: int, num_classes: int, dtype: Any = jnp.float32) -> ResNet:
    return ResNet(LAYERS[depth], ResNetBlock if depth < 50 else BottleneckResNetBlock, num_classes, dtype=dtype)


class Native:
    """The usual jitted eval function and SGD-momentum train step, numpy in and out like hal;
    ``precision`` ``bf16``/``fp16`` computes in that dtype (fp16 with dynamic loss scaling)."""

    def __init__(self, depth: int, num_classes: int, device: str = "cpu", seed: int = 0, precision: str = "fp32") -> None:
        self.device = jax.devices(device.partition(":")[0])[int(device.partition(":")[2] or 0)]
        self.model = resnet(depth, num_classes, COMPUTE[precision])
        scaled = precision == "fp16"
        with jax.default_device(self.device):  # the weights do not depend on the image size: init at 32x32
            init = jax.jit(partial(self.model.init, train=False))
            variables = init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
            self.params, self.batch_stats = variables["params"], variables["batch_stats"]
            self.tx = optax.sgd(0.01, momentum=0.9)
            self.opt_state = self.tx.init(self.params)
            if scaled:  # (scale, consecutive clean steps) beside the optimizer state
                self.opt_state = (self.opt_state, (jnp.float32(LOSS_SCALE["init"]), jnp.int32(0)))
        self.num_params = sum(p.size for p in jax.tree_util.tree_leaves(self.params))
        self.note = "hand-written Flax ResNet" + ("" if precision == "fp32" else f" ({precision} compute, fp32 params"
                                                  + (", dynamic loss scaling)" if scaled else ")"))
        model, tx = self.model, self.tx

        @jax.jit
        def predict(params: Any, batch_stats: Any, x: jax.Array) -> jax.Array:
            x = jnp.transpose(x, (0, 2, 3, 1))  # the NCHW batch every target gets -> NHWC
            return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False).astype(jnp.float32)

        @partial(jax.jit, donate_argnums=(0, 1, 2))
        def train_step(params: Any, batch_stats: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
            x = jnp.transpose(x, (0, 2, 3, 1))

            if scaled:
                opt_state, (scale, clean) = opt_state

            def loss_fn(params: Any) -> Any:
                logits, new = model.apply(
                    {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
                return (loss * scale if scaled else loss), (loss, new["batch_stats"])

            (_, (loss, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            if not scaled:
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), batch_stats, opt_state, loss
            grads = jax.tree.map(lambda g: g / scale, grads)
            finite = jnp.all(jnp.array([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]))
            updates, new_opt = tx.update(grads, opt_state, params)
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (optax.apply_updates(params, updates), new_opt), (params, opt_state))
            grow = finite & (clean + 1 == LOSS_SCALE["interval"])
            scale = jnp.where(finite, jnp.where(grow, scale * LOSS_SCALE["growth"], scale), scale * LOSS_SCALE["backoff"])
            clean = jnp.where(finite & ~grow, clean + 1, 0)
            return params, batch_stats, (opt_state, (scale, clean)), loss

        self._predict, self._train_step = predict, train_step

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._predict(self.params, self.batch_stats, jax.device_put(x, self.device)))

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = jax.device_put(x, self.device), jax.device_put(y.astype(np.int32), self.device)
        self.params, self.batch_stats, self.opt_state, loss = self._train_step(
            self.params, self.batch_stats, self.opt_state, x, y
        )
        return float(loss)


def build(model: str, num_classes: int, device: str, input_shape: tuple[int, ...], precision: str = "fp32") -> Native:
    """The native twin of a hal zoo model (``resnet18`` ... ``resnet152``) in ``precision``;
    :class:`NoBaseline` for the others."""
    depth = {f"resnet{d}": d for d in LAYERS}.get(model)
    if depth is None:
        raise NoBaseline(f"JAX and Flax ship no model zoo, and the hand-written Flax baselines are ResNets, not {model}")
    if precision not in COMPUTE:
        raise NoBaseline(f"the Flax baselines run {', '.join(COMPUTE)}, not {precision}")
    return Native(depth, num_classes, device, precision=precision)
