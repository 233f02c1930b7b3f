"""The PyTorch backend against independent truths: the float64 numpy reference,
finite differences of that reference, hand-rolled torch.optim loops, and
hand-computed BatchNorm statistics."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

import hal
from conftest import failing_on_call  # tests/ is on sys.path (pytest's default import mode)
from hal import models
from hal.backends.numpy import NumpyExecutable
from hal.parity import FACTOR, normalised_error, tolerance
from hal.spec import SpecBuilder
from hal.training import SGD, Adam, AdamW, StepDecay, TrainConfig

torch = pytest.importorskip("torch")
F = torch.nn.functional

from hal.backends.torch import build_module  # noqa: E402


def reference(spec, w, precision="fp64"):
    """The numpy reference executable in ``precision``."""
    return NumpyExecutable(spec, w, TrainConfig(precision=precision))


def _floor(spec, w, x, training):
    """float64 reference output and the measured float32 rounding floor (hal.parity's rule)."""
    ref = reference(spec, w).predict(x, training)
    f32 = reference(spec, w, "fp32").predict(x, training)
    return ref, normalised_error(f32, ref)[1]


def assert_near_reference(got, ref, floor, precision="fp32", factor=FACTOR):
    err = normalised_error(got, ref)[1]
    tol = tolerance(floor, precision, factor)
    assert err <= tol, f"normalised error {err:.2e} > tolerance {tol:.2e} (floor {floor:.2e})"


def small(num_classes=10, input_size=16):
    from hal.models import small_cnn

    return small_cnn(num_classes=num_classes, input_size=input_size)


def batch(spec, n, seed=0, loss="cross_entropy"):
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, *spec.input_shape)).astype(np.float32)
    if loss == "cross_entropy":
        return x, r.integers(0, spec.output_shape[0], n)
    return x, r.standard_normal((n, *spec.output_shape)).astype(np.float32)


def no_bn_spec():
    b = SpecBuilder("nobn")
    x = b.input((3, 8, 8))
    x = b.activation(b.conv(x, 6, 3, padding=1, name="c1"), "tanh")
    x = b.max_pool(x, 2, name="mp")
    x = b.activation(b.conv(x, 4, 3, stride=2, padding="same", name="c2"), "silu")
    return b.build(b.dense(b.flatten(x), 5, name="fc"))


def bn_only_spec(momentum=0.3):
    b = SpecBuilder("bn_only")
    return b.build(b.batch_norm(b.input((3, 4, 5)), momentum=momentum, name="bn"))


# ---------------------------------------------------------------------------
# forward parity
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18(make_weights):
    """resnet18 at 32x32 with random weights and BN statistics, one batch, its torch executable."""
    from hal.models import get

    spec = get("resnet18", num_classes=10, input_size=32)
    w = make_weights(spec, 3, np.float32)
    x, _ = batch(spec, 4, seed=5)  # batch 4: layer4 is 1x1, BN statistics over 2 values are degenerate
    return spec, w, x, hal.compile(spec, "torch:cpu", w)


@pytest.mark.parametrize("training", [False, True])
def test_predict_matches_float64_reference_small_cnn(training, make_weights):
    spec = small(input_size=32)
    w = make_weights(spec, 1, np.float32)
    x, _ = batch(spec, 3, seed=2)
    ref, floor = _floor(spec, w, x, training)
    exe = hal.compile(spec, "torch:cpu", w)
    got = exe.predict(x, training=training)
    assert got.dtype == np.float32 and got.shape == (3, 10)
    assert_near_reference(got, ref, floor)
    # the check can fail: another model's weights are far outside the tolerance
    other = hal.compile(spec, "torch:cpu", make_weights(spec, 2, np.float32)).predict(x, training=training)
    assert normalised_error(other, ref)[1] > 100 * tolerance(floor)


@pytest.mark.parametrize("training", [False, True])
def test_predict_matches_float64_reference_resnet18(training, resnet18):
    spec, w, x, exe = resnet18
    ref, floor = _floor(spec, w, x, training)
    got = exe.predict(x, training=training)
    assert got.dtype == np.float32 and got.shape == (4, 10)
    assert_near_reference(got, ref, floor)
    assert normalised_error(exe.predict(x[::-1].copy(), training=training)[::-1], ref)[1] <= tolerance(floor)


def test_bn_folded_inference_equals_unfolded_eval(resnet18):
    spec, w, x, exe = resnet18
    fused = exe.predict(x)
    folded = getattr(exe, "_infer", None) or exe.module.fused()  # the inference copy predict used
    assert sum(isinstance(m, torch.nn.Identity) for _, m, *_ in folded._plan) == 20  # every BN of resnet18
    module = build_module(spec, w).eval()
    with torch.no_grad():
        plain = module(torch.from_numpy(x)).numpy()
    _, floor = _floor(spec, w, x, False)
    assert_near_reference(fused, plain.astype(np.float64), floor)


def test_bn_after_a_shared_conv_is_not_folded(make_weights):
    b = SpecBuilder("shared")
    x = b.input((3, 6, 6))
    c = b.conv(x, 4, 3, padding=1, name="c")
    y = b.add(b.batch_norm(c, name="bn"), c, name="add")  # the conv output is read twice
    spec = b.build(y)
    w = make_weights(spec, 0, np.float32)
    xb = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    ref, floor = _floor(spec, w, xb, False)
    assert_near_reference(hal.compile(spec, "torch", w).predict(xb), ref, floor)


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------


def _ref_loss(spec, w, x, y, loss="cross_entropy"):
    """Training-mode loss from the float64 numpy reference and a hand-written loss."""
    out = reference(spec, w).predict(x, training=True)
    if loss == "mse":
        return float(np.mean((out - y) ** 2))
    z = out - out.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean())


def _finite_difference_check(spec, w, x, y, loss, coords_per_tensor=1, h=1e-5, seed=0):
    exe = hal.compile(spec, "torch:cpu", w, TrainConfig(loss=loss, precision="fp64"))
    value, grads = exe.loss_and_grads(x, y)
    assert set(grads) == set(spec.trainable())
    assert value == pytest.approx(_ref_loss(spec, w, x, y, loss), rel=1e-12)
    scale = max(float(np.abs(g).max()) for g in grads.values())
    r = np.random.default_rng(seed)
    checked = 0
    for k in spec.trainable():
        for _ in range(coords_per_tensor):
            idx = tuple(int(r.integers(0, s)) for s in w[k].shape)
            wp, wm = dict(w), dict(w)
            wp[k], wm[k] = w[k].copy(), w[k].copy()
            wp[k][idx] += h
            wm[k][idx] -= h
            fd = (_ref_loss(spec, wp, x, y, loss) - _ref_loss(spec, wm, x, y, loss)) / (2 * h)
            assert grads[k][idx] == pytest.approx(fd, rel=1e-5, abs=1e-8 * scale), (k, idx)
            checked += 1
    return checked


def test_gradients_match_finite_differences_small_cnn(make_weights):
    spec = small(num_classes=5, input_size=8)
    w = make_weights(spec, 7)
    r = np.random.default_rng(3)
    x, y = r.standard_normal((4, 3, 8, 8)), r.integers(0, 5, 4)
    assert _finite_difference_check(spec, w, x, y, "cross_entropy", coords_per_tensor=2) == 2 * len(spec.trainable())


def test_gradients_match_finite_differences_mse(make_weights):
    spec = no_bn_spec()
    w = make_weights(spec, 2)
    r = np.random.default_rng(4)
    x, y = r.standard_normal((3, 3, 8, 8)), r.standard_normal((3, 5))
    _finite_difference_check(spec, w, x, y, "mse", coords_per_tensor=3)


def test_gradients_can_fail(monkeypatch, make_weights):
    """The finite-difference check notices a gradient that is 0.1% off."""
    from hal.backends.torch import TorchExecutable

    real = TorchExecutable._loss_and_grads
    monkeypatch.setattr(
        TorchExecutable, "_loss_and_grads",
        lambda self, x, y: (lambda lg: (lg[0], {k: g * 1.001 for k, g in lg[1].items()}))(real(self, x, y)),
    )
    spec = no_bn_spec()
    w = make_weights(spec, 2)
    r = np.random.default_rng(4)
    x, y = r.standard_normal((3, 3, 8, 8)), r.integers(0, 5, 3)
    with pytest.raises(AssertionError):
        _finite_difference_check(spec, w, x, y, "cross_entropy")


def _plain_grads(spec, w, x, y, dtype):
    """Loss and gradients of a plain eager PyTorch run (NCHW, default kernels) in dtype."""
    module = build_module(spec, w, dtype).train()
    loss = F.cross_entropy(module(torch.from_numpy(x.astype(dtype))), torch.from_numpy(y))
    loss.backward()
    return loss.item(), {k: p.grad.numpy().copy() for k, p in module.named_parameters()}


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


def _hand_loop(spec, w, xs, ys, make_opt, sched=None, loss_fn=F.cross_entropy, channels_last=False):
    """The usual PyTorch training loop on the same module layout (optionally in
    channels_last memory, as hal's backend runs 2-d models)."""
    module = build_module(spec, w).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    module = module.to(memory_format=fmt)
    opt = make_opt(module.parameters())
    lr_sched = sched(opt) if sched else None
    losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = loss_fn(module(torch.from_numpy(x).contiguous(memory_format=fmt)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        if lr_sched:
            lr_sched.step()
        losses.append(loss.item())
    return losses, {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _pure_noise_keys(spec):
    """Conv biases read only by a BatchNorm (their exact gradient is 0) and that BN's running mean."""
    from hal.spec import BatchNorm, Conv

    out = set()
    consumers = spec.consumers()
    for n in spec.nodes:
        if isinstance(n.op, Conv) and n.op.bias and len(consumers[n.name]) == 1:
            bn = spec.node(consumers[n.name][0])
            if isinstance(bn.op, BatchNorm):
                out |= {f"{n.name}.bias", f"{bn.name}.running_mean"}
    return out


OPTIMIZERS = [
    (SGD(lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    (SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (Adam(lr=1e-2, weight_decay=1e-3), lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3)),
    (AdamW(lr=1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
]


@pytest.mark.parametrize("opt,torch_opt", OPTIMIZERS, ids=["sgd-momentum", "sgd-nesterov-wd", "adam", "adamw"])
def test_train_step_equals_hand_rolled_torch_loop(opt, torch_opt, make_weights):
    spec = small()
    w = make_weights(spec, 1, np.float32)
    data = [batch(spec, 4, seed=s) for s in range(3)]
    xs, ys = [d[0] for d in data], [d[1] for d in data]
    exe = hal.compile(spec, "torch:cpu", w, TrainConfig(optimizer=opt))
    losses = [exe.train_step(x, y) for x, y in zip(xs, ys)]
    got = exe.weights()
    assert exe.step == 3
    assert not np.allclose(got["fc2.weight"], w["fc2.weight"])  # the weights moved

    # 1. the plain loop (contiguous NCHW, default optimizer kernels): equal up to rounding
    want_losses, want_w = _hand_loop(spec, w, xs, ys, torch_opt)
    assert set(got) == set(want_w)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    if isinstance(opt, Adam):
        # Adam normalises each coordinate's step to ~lr, so gradient rounding (another
        # convolution algorithm; large *relative* error on a coordinate whose gradient
        # is tiny) moves a weight by a small fraction of lr, whatever its size. A conv
        # bias right before BatchNorm has an exact gradient of 0 and pure-noise steps of
        # +-lr (it and that BN's running mean are skipped). Part 2 below is the tight check.
        noise = _pure_noise_keys(spec)
        for k in want_w:
            if k not in noise:
                np.testing.assert_allclose(got[k], want_w[k], rtol=0, atol=1e-2 * opt.lr, err_msg=k)
    else:
        for k in want_w:
            np.testing.assert_allclose(got[k], want_w[k], rtol=1e-5, atol=1e-7, err_msg=k)

    # 2. the same loop in hal's memory layout: the same arithmetic, so (nearly) the same bits
    want_losses, want_w = _hand_loop(spec, w, xs, ys, torch_opt, channels_last=True)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    for k in want_w:
        np.testing.assert_allclose(got[k], want_w[k], rtol=1e-6, atol=1e-8, err_msg=k)


def test_schedule_equals_torch_step_lr(make_weights):
    spec = no_bn_spec()
    w = make_weights(spec, 2, np.float32)
    data = [batch(spec, 3, seed=s, loss="mse") for s in range(5)]
    xs, ys = [d[0] for d in data], [d[1] for d in data]
    cfg = TrainConfig(loss="mse", optimizer=SGD(lr=0.1, momentum=0.5), schedule=StepDecay(2, 0.3))
    exe = hal.compile(spec, "torch", w, cfg)
    losses = exe.run_steps(np.stack(xs), np.stack(ys))
    want_losses, want_w = _hand_loop(
        spec, w, xs, ys, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5),
        lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.3), F.mse_loss,
    )
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    for k, v in exe.weights().items():
        np.testing.assert_allclose(v, want_w[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_grad_accum_without_bn_equals_one_batch():
    spec = no_bn_spec()
    w = {k: v.astype(np.float64) for k, v in hal.init_weights(spec, 3).items()}
    x, y = batch(spec, 6, seed=1)
    l1, g1 = hal.compile(spec, "torch", w, TrainConfig(precision="fp64")).loss_and_grads(x, y)
    l2, g2 = hal.compile(spec, "torch", w, TrainConfig(precision="fp64", grad_accum=2)).loss_and_grads(x, y)
    l3, g3 = hal.compile(spec, "torch", w, TrainConfig(precision="fp64", grad_accum=3)).loss_and_grads(x, y)
    assert l1 == pytest.approx(l2, rel=1e-13) and l1 == pytest.approx(l3, rel=1e-13)
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(g3[k], g1[k], rtol=1e-11, atol=1e-14)
    # and a train step with G=2 lands where the G=1 step does
    a = hal.compile(spec, "torch", w, TrainConfig(precision="fp64", optimizer=SGD(0.1, 0.9)))
    b = hal.compile(spec, "torch", w, TrainConfig(precision="fp64", optimizer=SGD(0.1, 0.9), grad_accum=2))
    for _ in range(2):
        a.train_step(x, y), b.train_step(x, y)
    for k, v in a.weights().items():
        np.testing.assert_allclose(b.weights()[k], v, rtol=1e-10, atol=1e-13)


def test_grad_accum_with_bn_uses_per_micro_batch_statistics(make_weights):
    spec = small()
    w = make_weights(spec, 3)
    x, y = batch(spec, 6, seed=2)
    cfg = TrainConfig(precision="fp64")
    one = hal.compile(spec, "torch", w, cfg)
    la, ga = one.loss_and_grads(x[:3], y[:3])
    lb, gb = one.loss_and_grads(x[3:], y[3:])
    lg, gg = hal.compile(spec, "torch", w, TrainConfig(precision="fp64", grad_accum=2)).loss_and_grads(x, y)
    assert lg == pytest.approx((la + lb) / 2, rel=1e-12)
    for k in gg:
        np.testing.assert_allclose(gg[k], (ga[k] + gb[k]) / 2, rtol=1e-9, atol=1e-12)
    # whole-batch statistics give another answer: the check is not vacuous
    lf, gf = one.loss_and_grads(x, y)
    assert abs(lf - lg) > 1e-6


def _bn_stats(x, mean0, var0, m):
    """Running statistics after one PyTorch-convention update with batch x (N, C, ...)."""
    axes = (0, *range(2, x.ndim))
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    unbiased = x.var(axis=axes) * n / (n - 1)
    return (1 - m) * mean0 + m * mean, (1 - m) * var0 + m * unbiased


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_running_stats_use_unbiased_variance(precision):
    spec = bn_only_spec(momentum=0.3)
    w = hal.init_weights(spec)
    w["bn.running_mean"] = np.array([0.5, -1.0, 2.0], np.float32)
    w["bn.running_var"] = np.array([2.0, 0.5, 1.0], np.float32)
    r = np.random.default_rng(0)
    x = (r.standard_normal((4, 3, 4, 5)) * [[[[3.0]], [[0.5]], [[1.0]]]] + 1.0).astype(np.float32)
    y = np.zeros((4, 3, 4, 5), np.float32)
    exe = hal.compile(spec, "torch", w, TrainConfig(loss="mse", optimizer=SGD(lr=0.0), precision=precision))
    exe.train_step(x, y)
    mean, var = _bn_stats(x.astype(np.float64), w["bn.running_mean"].astype(np.float64),
                          w["bn.running_var"].astype(np.float64), 0.3)
    got = exe.weights()
    rtol = 1e-6 if precision == "fp32" else 1e-12
    np.testing.assert_allclose(got["bn.running_mean"], mean, rtol=rtol)
    np.testing.assert_allclose(got["bn.running_var"], var, rtol=rtol)
    # biased variance would be off by n/(n-1) = 80/79 in the batch term
    _, biased = (1 - 0.3) * w["bn.running_mean"], 0.7 * w["bn.running_var"] + 0.3 * x.var(axis=(0, 2, 3))
    assert not np.allclose(got["bn.running_var"], biased, rtol=1e-4)


def test_running_stats_updated_once_per_micro_batch():
    spec = bn_only_spec(momentum=0.2)
    w = hal.init_weights(spec)
    r = np.random.default_rng(1)
    x = (r.standard_normal((6, 3, 4, 5)) * 2 + 0.5).astype(np.float64)
    y = np.zeros((6, 3, 4, 5))
    exe = hal.compile(spec, "torch", w, TrainConfig(loss="mse", optimizer=SGD(lr=0.0), precision="fp64", grad_accum=3))
    exe.train_step(x, y)
    mean, var = np.zeros(3), np.ones(3)
    for part in np.split(x, 3):
        mean, var = _bn_stats(part, mean, var, 0.2)
    np.testing.assert_allclose(exe.weights()["bn.running_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(exe.weights()["bn.running_var"], var, rtol=1e-12)


def test_running_stats_after_a_conv_and_a_real_step(make_weights):
    """Statistics come from the forward of the step (pre-update weights)."""
    b = SpecBuilder("cbn")
    x = b.input((2, 5, 5))
    spec = b.build(b.dense(b.flatten(b.batch_norm(b.conv(x, 3, 3, name="c"), name="bn")), 2, name="fc"))
    w = make_weights(spec, 0)
    r = np.random.default_rng(2)
    xb, yb = r.standard_normal((4, 2, 5, 5)), r.integers(0, 2, 4)
    exe = hal.compile(spec, "torch", w, TrainConfig(optimizer=SGD(0.5), precision="fp64"))
    exe.train_step(xb, yb)
    conv = F.conv2d(torch.from_numpy(xb), torch.from_numpy(w["c.weight"]), torch.from_numpy(w["c.bias"])).numpy()
    mean, var = _bn_stats(conv, w["bn.running_mean"], w["bn.running_var"], 0.1)
    np.testing.assert_allclose(exe.weights()["bn.running_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(exe.weights()["bn.running_var"], var, rtol=1e-12)
    assert not np.allclose(exe.weights()["c.weight"], w["c.weight"])


def test_load_weights_is_all_or_nothing(make_weights):
    """A conversion that fails on the third tensor leaves every weight, and predict, as before."""
    spec = small()
    exe = hal.compile(spec, "torch", make_weights(spec, 0, np.float32))
    x, _ = batch(spec, 2)
    before, out = exe.weights(), exe.predict(x)
    with failing_on_call(torch, "from_numpy") as calls, pytest.raises(RuntimeError, match="conversion failed"):
        exe.load_weights(make_weights(spec, 1, np.float32))
    assert len(calls) == 3
    after = exe.weights()
    assert all(np.array_equal(after[k], v) for k, v in before.items())
    np.testing.assert_array_equal(exe.predict(x), out)


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------


def test_fast_option_off_is_plain_eager_nchw(make_weights):
    spec = small()
    w = make_weights(spec, 0, np.float32)
    x, y = batch(spec, 4)
    fast, plain = hal.compile(spec, "torch", w), hal.compile(spec, "torch", w, options={"fast": False})
    assert fast.channels_last and not plain.channels_last
    assert not plain.module.get_parameter("conv1.weight").is_contiguous(memory_format=torch.channels_last)
    plain.predict(x)
    assert plain._infer is plain.module  # no folded copy
    ref, floor = _floor(spec, w, x, False)
    assert_near_reference(plain.predict(x), ref, floor)
    assert plain.train_step(x, y) == pytest.approx(fast.train_step(x, y), rel=1e-6)
    with pytest.raises(hal.ConfigError, match="fast"):
        hal.compile(spec, "torch", w, options={"fast": 1})
    with pytest.raises(hal.ConfigError, match="no option channels_last; its options: fast"):
        hal.compile(spec, "torch", w, options={"channels_last": True})


def test_channels_last_survives_layer_norm_pointwise_dense_and_channel_shuffle(make_weights):
    """The channels-first LayerNorm and the pointwise Dense run on the channels-last view and the
    shuffle keeps the layout, so the fast path does not fall back to NCHW in the middle of a ConvNeXt
    or ShuffleNet block; without it (fast=False) every output stays NCHW."""
    b = SpecBuilder("cl")
    x = b.conv(b.input((4, 5, 6)), 8, 3, padding=1)
    x = b.dense(b.channel_shuffle(b.layer_norm(x, name="ln"), 2, name="shuffle"), 6, name="pointwise")
    spec = b.build(b.conv(x, 4, 1))
    w = make_weights(spec, 0, np.float32)
    x = batch(spec, 2)[0]
    for fast, layout in ((True, torch.channels_last), (False, torch.contiguous_format)):
        exe = hal.compile(spec, "torch", w, options={"fast": fast})
        outs = {}
        for name in ("ln", "shuffle", "pointwise"):
            exe.module.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: outs.update({name: out}))
        ref, floor = _floor(spec, w, x, True)
        assert_near_reference(exe.predict(x, training=True), ref, floor)
        assert all(out.is_contiguous(memory_format=layout) for out in outs.values()), fast


def test_inference_writes_in_place_only_where_nothing_else_reads(make_weights):
    """With ``fast``, predict runs activations, Add and Mul in place where their first input's memory is read
    by nothing else: not the caller's input (a Flatten is a view of it), not a value read again later, not an
    alias (eval Dropout returns its input), not a Mul's broadcast first operand. The output is bitwise the
    out-of-place one and matches the float64 reference; the caller's input is unchanged."""
    b = SpecBuilder("in_place")
    x = b.flatten(b.input((4, 6)), name="flat")  # (N, 24), a view of the input (no layout copy in 1-d)
    r = b.relu(x, name="r_input")
    d = b.dense(r, 8, name="d1")
    s = b.activation(d, "silu", name="s_shared")  # d is read again below
    m = b.mul(s, d, name="m")
    h = b.activation(m, "hardswish", name="h")
    a = b.add(h, d, name="a")
    g = b.activation(a, "sigmoid", name="g")
    p = b.dropout(g, name="drop")  # eval: the same tensor as g, which the last add reads
    r2 = b.relu(p, name="r_alias")
    t = b.add(r2, g, name="t")
    u = b.mul(b.dense(t, 1, name="gate"), t, name="u_broadcast")  # (N, 1) * (N, 8): not into the gate
    spec = b.build(b.dense(b.activation(u, "tanh", name="last"), 3, name="fc"))
    w = make_weights(spec, 0, np.float32)
    x = batch(spec, 5)[0]
    x_before = x.copy()
    fast, plain = hal.compile(spec, "torch", w), hal.compile(spec, "torch", w, options={"fast": False})
    in_place = {}
    for name in ("r_input", "s_shared", "m", "h", "a", "g", "r_alias", "t", "u_broadcast", "last"):
        fast.module.get_submodule(name).register_forward_hook(  # copied into the inference copy too
            lambda mod, args, kwargs, out, name=name: in_place.update({name: kwargs.get("in_place", False)}),
            with_kwargs=True)
    got = fast.predict(x)
    assert in_place == {"r_input": False, "s_shared": False, "m": True, "h": True, "a": True, "g": True,
                        "r_alias": False, "t": True, "u_broadcast": True, "last": True}  # u_broadcast: asked, and
    # the module declines (torch would raise: the (N, 1) gate cannot hold the (N, 8) result)
    np.testing.assert_array_equal(x, x_before)
    fast._infer.reuse_buffers = False
    np.testing.assert_array_equal(got, fast.predict(x))
    assert not any(in_place.values())
    assert not plain.module.reuse_buffers
    ref, floor = _floor(spec, w, x, False)
    assert_near_reference(got, ref, floor)


def test_training_writes_in_place_only_over_values_no_backward_reads(make_weights):
    """Under autograd (fast), a ReLU-like activation after a convolution, BatchNorm or Add, and an Add into a
    convolution's or BatchNorm's output, write in place (their backwards read no overwritten value); SiLU
    (its backward reads its input), an Add into a ReLU's output (saved by the ReLU) and Mul (saves both
    inputs) do not. Loss and gradients are bitwise those without in-place writes, and near float64
    autodiff's."""
    b = SpecBuilder("in_place_train")
    x = b.input((3, 8, 8))
    c = b.batch_norm(b.conv(x, 8, 3, padding=1, bias=False, name="c1"), name="bn1")
    r = b.relu(c, name="r_bn")
    c2 = b.batch_norm(b.conv(r, 8, 3, padding=1, bias=False, name="c2"), name="bn2")
    a = b.add(c2, r, name="a_bn")  # residual: into bn2's output
    r2 = b.relu(a, name="r_add")
    a2 = b.add(r2, b.conv(r2, 8, 1, name="c3"), name="a_relu")  # into a ReLU's output: saved by the ReLU
    s = b.activation(b.conv(a2, 8, 3, padding=1, name="c4"), "silu", name="s_conv")
    g = b.activation(b.conv(s, 8, 1, name="c5"), "sigmoid", name="g_conv")
    m = b.mul(b.batch_norm(b.conv(g, 8, 1, bias=False, name="c6"), name="bn6"), g, name="m_bn")
    spec = b.build(b.dense(b.global_avg_pool(m), 3, name="fc"))
    w = make_weights(spec, 0, np.float32)
    x, y = batch(spec, 4)
    fast = hal.compile(spec, "torch", w)
    in_place = {}
    for name in ("r_bn", "a_bn", "r_add", "a_relu", "s_conv", "g_conv", "m_bn"):
        fast.module.get_submodule(name).register_forward_hook(
            lambda mod, args, kwargs, out, name=name: in_place.update({name: kwargs.get("in_place", False)}),
            with_kwargs=True)
    loss, grads = fast.loss_and_grads(x, y)
    assert in_place == {"r_bn": True, "a_bn": True, "r_add": True, "a_relu": False, "s_conv": False, "g_conv": True,
                        "m_bn": False}
    fast.module.reuse_buffers = False
    loss_plain, grads_plain = fast.loss_and_grads(x, y)
    assert loss == loss_plain and all(np.array_equal(grads[k], grads_plain[k]) for k in grads)
    ref_loss, ref_grads = hal.compile(spec, "torch", w, TrainConfig(precision="fp64"),
                                      options={"fast": False}).loss_and_grads(x, y)  # float64 autodiff
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert max(normalised_error(grads[k], ref_grads[k])[1] for k in grads) < 1e-4


@pytest.mark.parametrize("fn", ["relu", "leaky_relu", "sigmoid", "tanh", "silu", "relu6", "elu", "hardsigmoid",
                                "hardswish", "mish"])
def test_in_place_activations_are_bitwise_the_out_of_place_ones(fn):
    from hal.backends.torch import _modules
    from hal.spec import Activation

    act = _modules()[Activation](Activation(fn=fn, alpha=0.3), [(8,)])
    assert fn in act.IN_PLACE
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for x in (torch.randn(64, 37) * 4, torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)):
            x = x.to(dtype)
            y = x.clone()
            out = act(y, in_place=True)
            assert out.data_ptr() == y.data_ptr()
            assert torch.equal(out, act(x))


def test_channel_shuffle_without_torchs_kernel():
    """F.channel_shuffle needs spatial dims and exists on CPU/CUDA only; elsewhere (features here, PopTorch's
    IPU) the view-transpose form runs: the same permutation as the reference's."""
    b = SpecBuilder("shuffle")
    spec = b.build(b.channel_shuffle(b.input((12,)), 3))
    x = np.arange(24.0).reshape(2, 12)
    got = hal.compile(spec, "torch", {}, TrainConfig(precision="fp64")).predict(x)
    np.testing.assert_array_equal(got, reference(spec, {}).predict(x))
    assert got[0, :4].tolist() == [0.0, 4.0, 8.0, 1.0]


def test_nearest_upsample_where_torchs_cpu_kernel_rounds_otherwise():
    """torch's 2-d/3-d nearest kernels on the CPU copy a dim of unchanged size and halve a doubled one
    whatever scale_factor says; the spec's source index floor(dst / scale) holds."""
    b = SpecBuilder("up")
    spec = b.build(b.upsample(b.input((2, 3, 2)), scale=(2.2, 1.4)))  # sizes 3 -> 6 and 2 -> 2
    x = np.random.default_rng(0).standard_normal((2, 2, 3, 2))
    ref = reference(spec, {}).predict(x)
    kernel = F.interpolate(torch.from_numpy(x), scale_factor=(2.2, 1.4), mode="nearest").numpy()
    assert np.abs(kernel - ref).max() > 0.1  # the case matters
    for fast in (True, False):
        exe = hal.compile(spec, "torch", {}, TrainConfig(precision="fp64"), options={"fast": fast})
        np.testing.assert_array_equal(exe.predict(x), ref)


# ---------------------------------------------------------------------------
# non-finite steps are not applied
# ---------------------------------------------------------------------------

NON_FINITE_OPTIMIZERS = [SGD(lr=0.05, momentum=0.9), Adam(lr=1e-2, weight_decay=1e-3)]


def _bit_equal(a, b):
    wa, wb = a.weights(), b.weights()
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    assert a.step == b.step


@pytest.mark.parametrize("opt", NON_FINITE_OPTIMIZERS, ids=["sgd-momentum", "adam"])
def test_nan_input_of_train_step_is_not_applied(opt, make_weights):
    spec = small()  # with BatchNorm: the training forward updates running statistics in place
    w = make_weights(spec, 1, np.float32)
    (x0, y0), (x1, y1), (x2, y2) = (batch(spec, 4, seed=s) for s in range(3))
    x1[2, 0, 3, 3] = np.nan
    exe, clean = (hal.compile(spec, "torch", w, TrainConfig(optimizer=opt)) for _ in range(2))
    exe.train_step(x0, y0)
    with pytest.raises(hal.NonFiniteError, match="training step 1 was not applied: the loss is nan") as info:
        exe.train_step(x1, y1)
    assert info.value.step == 1
    clean.train_step(x0, y0)
    _bit_equal(exe, clean)
    # the optimizer state (momentum, Adam moments and step count) is untouched too
    assert exe.train_step(x2, y2) == clean.train_step(x2, y2)
    _bit_equal(exe, clean)


@pytest.mark.parametrize("opt", NON_FINITE_OPTIMIZERS, ids=["sgd-momentum", "adam"])
def test_nan_in_the_second_batch_of_run_steps_stops_there(opt, make_weights):
    spec = small()
    w = make_weights(spec, 2, np.float32)
    data = [batch(spec, 4, seed=s) for s in range(4)]
    xs, ys = np.stack([d[0] for d in data[:3]]), np.stack([d[1] for d in data[:3]])
    xs[1, 0, 1, 2, 2] = np.inf
    cfg = TrainConfig(optimizer=opt, grad_accum=2)
    exe, clean = (hal.compile(spec, "torch", w, cfg) for _ in range(2))
    with pytest.raises(hal.NonFiniteError, match=r"training step 1 \(batch 1 of this run_steps call\)") as info:
        exe.run_steps(xs, ys)
    assert info.value.step == 1 and exe.step == 1  # batch 0 applied; batches 1 and 2 not
    clean.run_steps(xs[:1], ys[:1])
    _bit_equal(exe, clean)
    x3, y3 = data[3]
    assert exe.train_step(x3, y3) == clean.train_step(x3, y3)
    _bit_equal(exe, clean)


def _inf_gradient_case():
    """-inf into a 1x1 conv with a positive weight, then ReLU: the forward sees 0 (finite
    loss), the weight's gradient 0 * -inf = nan."""
    b = SpecBuilder("inf_grad")
    x = b.input((1, 4, 4))
    spec = b.build(b.dense(b.flatten(b.relu(b.conv(x, 1, 1, name="c"))), 3, name="fc"))
    w = hal.init_weights(spec)
    w["c.weight"] = np.full((1, 1, 1, 1), 0.5, np.float32)
    xb = np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    xb[0, 0, 1, 1] = -np.inf
    return spec, w, xb, np.array([0, 1])


def test_a_non_finite_gradient_with_a_finite_loss_is_not_applied():
    spec, w, x, y = _inf_gradient_case()
    exe = hal.compile(spec, "torch", w, TrainConfig(optimizer=SGD(0.1)))
    loss, grads = exe.loss_and_grads(x, y)
    assert np.isfinite(loss) and not np.isfinite(grads["c.weight"]).all()  # the case is what it claims
    with pytest.raises(hal.NonFiniteError, match="but a gradient is not finite"):
        exe.run_steps(x[None], y[None])
    assert exe.step == 0
    assert all(np.array_equal(v, w[k]) for k, v in exe.weights().items())


def test_check_finite_off_applies_the_step():
    spec, w, x, y = _inf_gradient_case()
    exe = hal.compile(spec, "torch", w, TrainConfig(optimizer=SGD(0.1), check_finite=False))
    loss = exe.train_step(x, y)
    assert np.isfinite(loss) and exe.step == 1
    assert np.isnan(exe.weights()["c.weight"]).all()


# ---------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# property-based: random valid graphs compute the reference's numbers
# ---------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402

from test_spec import valid_graphs  # noqa: E402  (tests/ is on sys.path: pytest's default import mode)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_graphs())
def test_random_graphs_match_reference_in_fp64(graph):
    """1/2/3-d convs with groups, dilation and asymmetric padding, asymmetric pools
    (count_include_pad both ways), BN, every activation, Add/Concat, heads: the torch
    backend in float64 equals the float64 numpy reference."""
    from hal.spec import Dropout, ModelSpec

    from conftest import random_weights

    nodes, _ = graph
    spec = ModelSpec("rand", tuple(nodes))
    if not spec.trainable():
        return  # parameter-free specs: see test_parameter_free_spec_compiles_and_predicts
    w = random_weights(spec, 0)
    x = np.random.default_rng(1).standard_normal((3, *spec.input_shape))
    exe = hal.compile(spec, "torch:cpu", w, TrainConfig(precision="fp64"))
    modes = [False] + ([] if any(isinstance(n.op, Dropout) for n in spec.nodes) else [True])
    for training in modes:
        ref = reference(spec, w).predict(x, training)
        got = exe.predict(x, training)
        assert got.shape == ref.shape == (3, *spec.output_shape)
        assert normalised_error(got, ref)[1] < 1e-10, training




# ---------------------------------------------------------------------------
# option compile: torch.compile
# ---------------------------------------------------------------------------


def test_folded_copy_is_refolded_in_place_after_a_weight_change(make_weights):
    """predict keeps one BatchNorm-folded copy (what a torch.compile of it needs) and refolds it after a training
    step and a load: its output follows the new weights, as the float64 reference says."""
    spec = models.get("small_cnn")
    exe = hal.compile(spec, "torch:cpu", make_weights(spec, 0, np.float32), TrainConfig(optimizer=SGD(lr=0.5)))
    x = np.random.default_rng(0).standard_normal((4, *spec.input_shape)).astype(np.float32)
    exe.predict(x)
    folded = exe._fused
    for change in (lambda: exe.train_step(x, np.arange(4)), lambda: exe.load_weights(make_weights(spec, 1, np.float32))):
        before = exe.predict(x)
        change()
        ref, floor = _floor(spec, exe.weights(), x, False)
        got = exe.predict(x)
        assert_near_reference(got, ref, floor)
        assert normalised_error(before, ref)[1] > 100 * tolerance(floor)  # the change shows
        assert exe._fused is folded


def test_compile_refuses_what_cannot_run_here():
    with pytest.raises(hal.errors.UnsupportedError, match="reduce-overhead.*CUDA only"):
        hal.compile(models.get("small_cnn"), "torch:cpu", options={"compile": "reduce-overhead"})
    with pytest.raises(hal.errors.ConfigError, match="must be one of"):
        hal.compile(models.get("small_cnn"), "torch:cpu", options={"compile": "eager"})


@pytest.mark.skipif(torch.__version__ >= (2, 1) or sys.version_info < (3, 11),
                    reason="checks the refusal where torch.compile cannot run (torch 2.0 on Python >= 3.11, "
                    "make test-torch20); this torch and Python can compile")
def test_compile_refused_on_torch_2_0_with_python_3_11():
    with pytest.raises(hal.errors.UnsupportedError, match="needs torch.compile, which torch 2.0"):
        hal.compile(models.get("small_cnn"), "torch:cpu", options={"compile": "inductor"})


COMPILED_CASES = (  # a representative subset of the conformance suite: ops, backward, optimizers, state, rollback
    "op/conv2d_stride2_asym_pad", "op/maxpool2d_asym_pad", "op/batchnorm2d", "grad/conv2d_stride2_asym_pad",
    "train/sgd_momentum", "train/adamw", "train/grad_accum2_batchnorm", "precision/bf16_forward",
    "state/predict_sees_new_weights", "state/run_steps_equals_train_step", "error/nonfinite_step",
)


@pytest.mark.slow
@pytest.mark.parametrize("case", COMPILED_CASES)
def test_conformance_with_torch_compile(case, monkeypatch):
    """The conformance cases above pass on torch:cpu with compile='inductor' (inductor compiles each on the CPU
    with the C++ compiler: tens of seconds per case on a loaded 2-core machine)."""
    from hal.testing.conformance import PASS, run_conformance

    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled.append(a[0]) or real(*a, **k))
    (row,) = run_conformance("torch:cpu", include=f"^{re.escape(case)}$", options={"compile": "inductor"}).rows
    assert row.status == PASS, row.note
    assert compiled  # the case ran through torch.compile


def test_plain_predict_after_a_training_mode_predict_is_in_inference_mode(make_weights):
    """fast=False runs the module itself: a training-mode predict must not leave it in training mode (it did:
    0.05 off on small_cnn, the BatchNorms normalising with the batch's statistics)."""

    spec = models.get("small_cnn")
    w = make_weights(spec, 0, np.float32)
    exe = hal.compile(spec, "torch:cpu", w, options={"fast": False})
    x = np.random.default_rng(0).standard_normal((4, *spec.input_shape)).astype(np.float32)
    exe.predict(x)
    exe.predict(x, training=True)
    ref, floor = _floor(spec, w, x, False)
    assert_near_reference(exe.predict(x), ref, floor)


def test_cuda_fp32_math_is_exact_unless_tf32_is_asked_for():
    """torch turns TF32 on for cuDNN convolutions by default; hal's fp32 on CUDA runs inside _cuda_math, which
    sets cuDNN's and cuBLAS's TF32 flags from the option and restores them after (checked on the flags)."""
    torch = pytest.importorskip("torch")
    from hal.backends.torch import _cuda_math

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    for tf32 in (False, True):
        with _cuda_math(tf32):
            assert (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark) == (tf32, tf32, True)
        assert (cudnn.allow_tf32, matmul.allow_tf32) == before
    assert hal.get_backend("torch").options()["tf32"].default is False
