"""A small CNN that uses every op of the spec, for fast tests and parity checks."""

from __future__ import annotations

import numbers

from hal.errors import SpecError
from hal.spec import ModelSpec, SpecBuilder


def small_cnn(num_classes: int = 10, input_size: int = 16, in_channels: int = 3, dropout: float = 0.0) -> ModelSpec:
    """Conv/BN/activations, max and average pooling (asymmetric ``same`` padding
    included), a residual Add, a channel Concat, Flatten and Dense layers."""
    b = SpecBuilder("small_cnn")
    x = b.input((in_channels, input_size, input_size))
    x = b.relu(b.batch_norm(b.conv(x, 8, 3, padding="same", bias=False, name="conv1"), name="bn1"))
    x = b.max_pool(x, 2, name="pool1")
    y = b.conv(x, 8, 3, padding=1, name="conv2")
    y = b.activation(b.batch_norm(y, name="bn2"), "leaky_relu", alpha=0.1)
    x = b.add(x, y, name="res")
    z = b.activation(b.conv(x, 4, 1, name="branch"), "silu")
    x = b.concat(x, z, name="cat")
    x = b.conv(x, 12, 3, stride=2, padding="same", name="conv3")
    x = b.activation(x, "gelu", approximate="tanh")
    x = b.avg_pool(x, 3, stride=1, padding="same", count_include_pad=False, name="pool2")
    x = b.activation(b.flatten(x), "tanh")
    if not (isinstance(dropout, numbers.Real) and not isinstance(dropout, bool)):
        raise SpecError(f"small_cnn: dropout must be a rate in [0, 1), got {dropout!r}")
    if dropout:
        x = b.dropout(x, dropout, name="drop")
    x = b.activation(b.dense(x, 16, name="fc1"), "sigmoid")
    return b.build(b.dense(x, num_classes, name="fc2"))
