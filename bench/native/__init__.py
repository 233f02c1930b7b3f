"""Hand-written native models, the baselines ``hal bench`` times hal against (installed as ``hal.native``).

One module per framework: ``torch`` (PyTorch), ``flax`` (JAX: Flax linen + Optax),
``keras`` (TensorFlow). Each is what a user of that framework would write, with no
hal in it, and has ``build(model, num_classes, device, input_shape)`` returning an object with
``predict(x)`` and ``train_step(x, y)`` (numpy in and out, channels-first batches,
like hal), or ``None`` when it has no twin of that zoo model. Importing this
package imports no framework; :data:`MODULES` maps a hal backend to its module.
"""

MODULES = {"torch": "hal.native.torch", "jax": "hal.native.flax", "tensorflow": "hal.native.keras"}
