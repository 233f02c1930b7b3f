"""Native models, the baselines ``hal bench`` times hal against (installed as ``hal.native``).

One module per framework: ``torch`` (PyTorch: torchvision's models, a hand-written
``small_cnn``), ``flax`` (JAX: a hand-written Flax
linen ResNet + Optax), ``keras`` (TensorFlow: a hand-written Keras ResNet,
``keras.applications`` where Keras ships the architecture). Each is what a user of
that framework would write or pick, with no hal in it, and has
``build(model, num_classes, device, input_shape, precision="fp32")`` (``bf16``/``fp16``:
that framework's usual mixed-precision recipe) returning an object with
``predict(x)`` and ``train_step(x, y)`` (numpy in and out, channels-first batches,
like hal), ``num_params`` (its trainable parameter count) and ``note`` (what it is
and, where it is not numerically hal's model, how it differs), or raising
:class:`NoBaseline` with the reason there is none. Importing this package imports no
framework; :data:`MODULES` maps a hal backend to its module.
"""

MODULES = {"torch": "hal.native.torch", "jax": "hal.native.flax", "tensorflow": "hal.native.keras"}


class NoBaseline(Exception):
    """Raised by a ``build`` with no native twin of the model; the message says why."""
