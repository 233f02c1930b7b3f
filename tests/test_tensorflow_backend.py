"""TensorFlow backend internals: XLA and the ``xla`` option, BatchNorm folding,
the in-graph non-finite guard, all-or-nothing loads, whole-model parity and
speed-relevant lowerings. What every backend must do (ops, gradients, optimizers,
state, errors) is the conformance suite's (``tests/test_conformance.py``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import hal
from hal.backends import ipu_tensorflow, tensorflow as T
from hal.backends.numpy import NumpyExecutable
from hal.errors import ConfigError, HalError, InputError, NonFiniteError, TargetError
from hal.models import get
from hal.parity import FACTOR, normalised_error, tensors_error, tolerance
from hal.spec import SpecBuilder
from hal.training import SGD, Adam, AdamW, Cosine, StepDecay, TrainConfig

if not T.TensorFlowBackend.availability().available:
    pytest.skip("TensorFlow is not installed: pip install 'hal-cnn[tensorflow]'", allow_module_level=True)

TARGET = "tensorflow:cpu"


def batch(spec, n, seed=0, loss="cross_entropy"):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, *spec.input_shape)).astype(np.float32)
    if loss == "cross_entropy":
        return x, r.integers(0, spec.output_shape[0], n)
    return x, r.standard_normal((n, *spec.output_shape)).astype(np.float32)


def reference(spec, w, x, training):
    """float64 output and the measured float32 floor (hal.parity's rule)."""
    ref = NumpyExecutable(spec, w, TrainConfig(precision="fp64")).predict(x, training)
    f32 = NumpyExecutable(spec, w, TrainConfig(precision="fp32")).predict(x, training)
    return ref, normalised_error(f32, ref)[1]


def assert_within(err, floor, factor=FACTOR, what=""):
    tol = tolerance(floor, "fp32", factor)
    assert err <= tol, f"{what} normalised error {err:.2e} > tolerance {tol:.2e} (floor {floor:.2e})"


def torch64(spec, w, config):
    pytest.importorskip("torch", reason="torch is the float64 autodiff reference")
    return hal.compile(spec, "torch:cpu", w, TrainConfig(**{**config.__dict__, "precision": "fp64"}))


@pytest.fixture(scope="module")
def small():
    """small_cnn (every op: asymmetric SAME padding, concat, avg pool without padding
    counts, gelu tanh, flatten) with random weights and BN statistics."""
    from tests.conftest import random_weights

    spec = get("small_cnn")
    return spec, random_weights(spec, 1, np.float32)


# ---------------------------------------------------------------------------
# forward parity against the float64 numpy reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training-mode"])
def test_forward_small_cnn(small, training):
    spec, w = small
    x, _ = batch(spec, 4, seed=2)
    ref, floor = reference(spec, w, x, training)
    got = hal.compile(spec, TARGET, w).predict(x, training=training)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert_within(normalised_error(got, ref)[1], floor)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training-mode"])
def test_forward_resnet18(training):
    from tests.conftest import random_weights

    spec = get("resnet18", num_classes=10, input_size=32)
    w = random_weights(spec, 3, np.float32)
    x, _ = batch(spec, 4, seed=5)
    ref, floor = reference(spec, w, x, training)
    got = hal.compile(spec, TARGET, w).predict(x, training=training)
    assert_within(normalised_error(got, ref)[1], floor)


# ---------------------------------------------------------------------------
# loss, gradients and training against float64 torch autodiff
# ---------------------------------------------------------------------------


def test_mse_grads_fp64_equal_torch_fp64(small):
    spec, w = small
    x, y = batch(spec, 4, seed=7, loss="mse")
    config = TrainConfig(loss="mse", precision="fp64")
    loss, grads = hal.compile(spec, TARGET, w, config).loss_and_grads(x, y)
    loss0, grads0 = torch64(spec, w, config).loss_and_grads(x, y)
    assert abs(loss - loss0) <= 1e-13 * abs(loss0)
    assert tensors_error(grads, grads0)[1] < 1e-12


OPTIMIZERS = {
    "sgd-momentum": TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd-nesterov-steplr": TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9, nesterov=True), schedule=StepDecay(2, 0.5)),
    "adamw-cosine": TrainConfig(optimizer=AdamW(lr=1e-2, weight_decay=0.05), schedule=Cosine(5, 2, 0.1)),
    "adam-l2": TrainConfig(optimizer=Adam(lr=1e-2, weight_decay=1e-2)),
}


def _trajectory(spec, w, config, x, y, steps=5):
    """train_step, run_steps and train_step interleaved (they share the step counter)."""
    exe = hal.compile(spec, TARGET, w, config)
    losses = [exe.train_step(x, y)]
    losses += list(exe.run_steps(np.stack([x] * (steps - 2)), np.stack([y] * (steps - 2))))
    losses.append(exe.train_step(x, y))
    assert exe.step == steps
    ref = torch64(spec, w, config)
    return np.array(losses), exe.weights(), ref.run_steps(np.stack([x] * steps), np.stack([y] * steps)), ref.weights()


def _no_bias_before_bn():
    """small_cnn's conv2 bias feeds a BatchNorm: its exact gradient is 0, and Adam
    with L2 decay turns rounding noise (1e-19) into steps that feed back through
    the decay, so the bias (and bn2's running mean, which sees it) is left out."""
    return lambda k: k not in ("conv2.bias", "bn2.running_mean")


# ---------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------


def test_failed_load_changes_nothing(small, monkeypatch):
    """All or nothing: a conversion failing on the 3rd tensor leaves every weight as it was."""
    spec, w = small
    exe = hal.compile(spec, TARGET, w)
    before = exe.weights()
    third = list(exe.graph.variables)[2]
    var, _, from_tf = exe.graph.variables[third]

    def fail(a):
        raise MemoryError("conversion failed")

    monkeypatch.setitem(exe.graph.variables, third, (var, fail, from_tf))
    with pytest.raises(MemoryError):
        exe.load_weights({k: v + 1 for k, v in w.items()})
    for k, v in exe.weights().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


# ---------------------------------------------------------------------------
# non-finite steps are not applied
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_non_finite_steps_are_not_applied(small, grad_accum):
    """A NaN in the input of train_step, then in the 2nd of 3 batches of run_steps:
    NonFiniteError naming the step; weights, BatchNorm buffers, momentum and the
    step count are those of an executable that only saw the good batches."""
    spec, w = small
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9), grad_accum=grad_accum)
    (x1, y1), (x2, y2), (x3, y3) = (batch(spec, 8, seed=s) for s in (20, 21, 22))
    bad = x2.copy()
    bad[3, 1, 5, 5] = np.nan
    exe = hal.compile(spec, TARGET, w, config)
    exe.train_step(x1, y1)
    with pytest.raises(NonFiniteError, match="training step 1 ") as info:
        exe.train_step(bad, y2)
    assert info.value.step == 1 and exe.step == 1
    with pytest.raises(NonFiniteError, match=r"training step 2 \(batch 1 of this run_steps call\)") as info:
        exe.run_steps(np.stack([x3, bad, x1]), np.stack([y3, y2, y1]))
    assert info.value.step == 2 and exe.step == 2
    ref = hal.compile(spec, TARGET, w, config)  # never sees the bad batch
    ref.train_step(x1, y1)
    ref.run_steps(x3[None], y3[None])
    got, want = exe.weights(), ref.weights()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert exe.train_step(x2, y2) == ref.train_step(x2, y2)  # the momentum buffers agree too
    for k, v in ref.weights().items():
        np.testing.assert_array_equal(exe.weights()[k], v, err_msg=k)
    assert exe.step == ref.step == 3


def test_check_finite_off_applies_the_step(small):
    spec, w = small
    x, y = batch(spec, 8, seed=23)
    x[0, 0, 0, 0] = np.inf
    exe = hal.compile(spec, TARGET, w, TrainConfig(check_finite=False))
    exe.run_steps(x[None], y[None])
    assert exe.step == 1
    assert not all(np.isfinite(v).all() for v in exe.weights().values())


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------


def test_xla_option(small):
    """``xla`` picks jit_compile (None: the measured per-device default); other values are refused."""
    spec, w = small
    x = batch(spec, 2)[0]
    for value, jit in ((None, T.XLA[("cpu", "infer")]), (True, True), (False, False)):
        exe = hal.compile(spec, TARGET, w, options={"xla": value})
        exe.predict(x)
        assert exe._fns["infer"]._jit_compile is jit
    with pytest.raises(ConfigError, match="xla"):
        hal.compile(spec, TARGET, w, options={"xla": 1})
    with pytest.raises(ConfigError, match="xla"):
        hal.compile(spec, TARGET, w, options={"jit": True})


def _volume_spec():
    """3-d windows through each lowering TensorFlow's 3-d kernels constrain: pools (no
    float64 3-d pools), grouped dilated transposed convolution (no native kernel), resampling."""
    b = SpecBuilder("volume")
    x = b.input((4, 5, 6, 5))
    x = b.conv_transpose(x, 4, 3, stride=2, padding=((1, 0), (0, 1), (1, 1)), output_padding=1, groups=2, dilation=2)
    x = b.max_pool(x, 3, 2, padding=1, ceil_mode=True)
    x = b.avg_pool(x, 2, 2, ceil_mode=True, count_include_pad=False)
    x = b.adaptive_max_pool(b.upsample(x, scale=1.5, mode="trilinear", align_corners=True), (2, 3, 2))
    return b.build(b.adaptive_avg_pool(b.pad(x, ((1, 0), (0, 1), (1, 1)), "replicate"), 2))


@pytest.mark.parametrize("options,precision", [({}, "fp64"), ({"xla": True}, "fp32"), ({"xla": True}, "fp64")],
                         ids=["fp64", "xla", "xla-fp64"])
def test_3d_ops_in_float64_and_under_xla(options, precision):
    """The forward equals float64 numpy to float64 rounding in fp64 and to the float32
    floor in fp32, with and without XLA."""
    from tests.conftest import random_weights

    spec = _volume_spec()
    w = random_weights(spec, 2, np.float32)
    x = batch(spec, 2, seed=3)[0]
    ref, floor = reference(spec, w, x, False)
    out = hal.compile(spec, TARGET, w, TrainConfig(precision=precision), options=options).predict(x)
    err = normalised_error(out, ref)[1]
    if precision == "fp64":
        assert err < 1e-12, err
    else:
        assert_within(err, floor)


# ---------------------------------------------------------------------------
# user mistakes: hal errors, never a TensorFlow traceback
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exe(small):
    spec, w = small
    return hal.compile(spec, TARGET, w, TrainConfig(grad_accum=2))


def test_batchnorm_over_one_value_is_refused():
    b = SpecBuilder("one")
    x = b.input((2, 1, 1))
    spec = b.build(b.flatten(b.batch_norm(x, name="bn"), name="f"))
    exe = hal.compile(spec, TARGET, hal.init_weights(spec), TrainConfig(loss="mse"))
    with pytest.raises(InputError, match="more than one value per channel"):
        exe.predict(np.zeros((1, 2, 1, 1), np.float32), training=True)
    assert exe.predict(np.zeros((1, 2, 1, 1), np.float32)).shape == (1, 2)  # inference is fine


def test_graphcore_precisions_are_refused_off_the_ipu(small):
    spec, w = small
    for precision in ("16.16", "16.32"):
        with pytest.raises(hal.UnsupportedError, match="precision"):
            hal.compile(spec, TARGET, w, TrainConfig(precision=precision))


def test_ipu_without_the_sdk_says_why(small):
    if ipu_tensorflow.importable():
        pytest.skip("Graphcore's TensorFlow is installed here: this checks the error raised without it "
                    "(the IPU Model smoke test in test_ipu_tensorflow_contract.py runs instead)")
    spec, w = small
    with pytest.raises(TargetError, match="Poplar SDK"):
        hal.compile(spec, "tensorflow:ipu", w)
    assert "Poplar SDK" in T.TensorFlowBackend.device_notes()["ipu"]
    with pytest.raises(HalError, match="Poplar SDK"):
        ipu_tensorflow.IPUExecutable(spec, w, "ipu", TrainConfig(), None)


def test_config_errors_are_hal_errors(small):
    spec, w = small
    with pytest.raises(ConfigError):
        TrainConfig(grad_accum=0)


# ---------------------------------------------------------------------------
# slower checks (pytest -m slow)
# ---------------------------------------------------------------------------


# resnet18 at 64x64: at 32x32 layer4 is 1x1 and float32 gradients of layer3 are ~10% off
# float64 in *any* framework (plain torch float32 included), which no check can use.
# The floor is hal.parity's rule, computed here: plain float32 torch against float64 torch.


def _against_torch(spec, w, config, x, y, steps=3):
    """(error of tensorflow:cpu, error of plain float32 torch), both against float64
    torch, over the loss, gradients, per-step losses, parameters and BN buffers."""
    trainable = set(spec.trainable())

    def run(target, precision):
        exe = hal.compile(spec, target, w, replace(config, precision=precision))
        loss, grads = exe.loss_and_grads(x, y)
        losses = exe.run_steps(np.stack([x] * steps), np.stack([y] * steps))
        return loss, grads, losses, exe.weights()

    ref = run("torch:cpu", "fp64")

    def error(r):
        parts = [abs(r[0] - ref[0]) / abs(ref[0]), tensors_error(r[1], ref[1])[1], normalised_error(r[2], ref[2])[1]]
        parts += [tensors_error({k: r[3][k] for k in ks}, {k: ref[3][k] for k in ks})[1]
                  for ks in (trainable, set(ref[3]) - trainable)]
        return max(parts)

    pytest.importorskip("torch")
    return error(run(TARGET, "fp32")), error(run("torch:cpu", "fp32"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd-momentum", "adamw-cosine"])
def test_resnet18_grads_and_trajectory_match_torch(name):
    spec = get("resnet18", num_classes=10, input_size=64)
    x, y = batch(spec, 8, seed=12)
    err, floor = _against_torch(spec, hal.init_weights(spec, 2, residual_gamma=0.2), OPTIMIZERS[name], x, y)
    assert err <= tolerance(floor), f"{err:.2e} vs plain float32 torch {floor:.2e}"


@pytest.mark.slow
def test_resnet18_grad_accum_4_matches_torch():
    spec = get("resnet18", num_classes=10, input_size=64)
    x, y = batch(spec, 16, seed=13)
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9), grad_accum=4)
    err, floor = _against_torch(spec, hal.init_weights(spec, 3, residual_gamma=0.2), config, x, y)
    assert err <= tolerance(floor), f"{err:.2e} vs plain float32 torch {floor:.2e}"


@pytest.mark.slow
def test_resnet18_fp64_trajectory_equals_torch_fp64():
    spec = get("resnet18", num_classes=10, input_size=64)
    w = hal.init_weights(spec, 4)
    x, y = batch(spec, 8, seed=14)
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4), precision="fp64")
    exe, ref = hal.compile(spec, TARGET, w, config), torch64(spec, w, config)
    losses = exe.run_steps(np.stack([x] * 3), np.stack([y] * 3))
    assert normalised_error(losses, ref.run_steps(np.stack([x] * 3), np.stack([y] * 3)))[1] < 1e-12
    assert tensors_error(exe.weights(), ref.weights())[1] < 1e-12


@pytest.mark.slow
def test_xla_and_graph_mode_agree(small):
    """Both compilation modes (option ``xla``, see the module docstring) give the same numbers."""
    spec, w = small
    x, y = batch(spec, 8, seed=14)
    _, floor = reference(spec, w, x, True)
    out = {}
    for flag in (False, True):
        exe = hal.compile(spec, TARGET, w, OPTIMIZERS["sgd-momentum"], options={"xla": flag})
        out[flag] = (exe.predict(x), exe.predict(x, training=True), exe.train_step(x, y), exe.weights())
    for a, b in zip(out[False][:2], out[True][:2]):
        assert_within(normalised_error(a, b)[1], floor)
    assert_within(tensors_error(out[False][3], out[True][3])[1], floor, 4 * FACTOR)
