"""A plainly hand-written Flax linen ResNet (the layout of flax/examples/imagenet/models.py)
with an Optax SGD-momentum train step: the baseline that ``hal bench`` times hal's
``jax`` backend against in the same run.

Nothing here uses hal: it is what a JAX user would write. NHWC, standard
``nn.Conv``/``nn.BatchNorm`` (Flax's own momentum and fast variance), ``optax.sgd``,
one jitted train step with the train state donated, default matmul precision.
``Native.predict``/``train_step`` take channels-first numpy batches like hal and
``hal.native.torch`` (the same arrays go to every target); the transpose to
NHWC happens inside the jitted function, as in hal.

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


def resnet(depth: int, num_classes: int) -> ResNet:
    return ResNet(LAYERS[depth], ResNetBlock if depth < 50 else BottleneckResNetBlock, num_classes)


class Native:
    """The usual jitted eval function and SGD-momentum train step, numpy in and out like hal."""

    def __init__(self, depth: int, num_classes: int, device: str = "cpu", seed: int = 0) -> None:
        self.device = jax.devices(device.partition(":")[0])[int(device.partition(":")[2] or 0)]
        self.model = resnet(depth, num_classes)
        with jax.default_device(self.device):  # the weights do not depend on the image size: init at 32x32
            init = jax.jit(partial(self.model.init, train=False))
            variables = init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
            self.params, self.batch_stats = variables["params"], variables["batch_stats"]
            self.tx = optax.sgd(0.01, momentum=0.9)
            self.opt_state = self.tx.init(self.params)
        self.num_params = sum(p.size for p in jax.tree_util.tree_leaves(self.params))
        self.note = "hand-written Flax ResNet"
        model, tx = self.model, self.tx

        @jax.jit
        def predict(params: Any, batch_stats: Any, x: jax.Array) -> jax.Array:
            x = jnp.transpose(x, (0, 2, 3, 1))  # the NCHW batch every target gets -> NHWC
            return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

        @partial(jax.jit, donate_argnums=(0, 1, 2))
        def train_step(params: Any, batch_stats: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
            x = jnp.transpose(x, (0, 2, 3, 1))

            def loss_fn(params: Any) -> Any:
                logits, new = model.apply(
                    {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
                )
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

            (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), batch_stats, opt_state, loss

        self._predict, self._train_step = predict, train_step

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._predict(self.params, self.batch_stats, jax.device_put(x, self.device)))

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        x, y = jax.device_put(x, self.device), jax.device_put(y.astype(np.int32), self.device)
        self.params, self.batch_stats, self.opt_state, loss = self._train_step(
            self.params, self.batch_stats, self.opt_state, x, y
        )
        return float(loss)


def build(model: str, num_classes: int, device: str, input_shape: tuple[int, ...]) -> Native:
    """The native twin of a hal zoo model (``resnet18`` ... ``resnet152``); :class:`NoBaseline`
    for the others."""
    depth = {f"resnet{d}": d for d in LAYERS}.get(model)
    if depth is None:
        raise NoBaseline(f"JAX and Flax ship no model zoo, and the hand-written Flax baselines are ResNets, not {model}")
    return Native(depth, num_classes, device)
