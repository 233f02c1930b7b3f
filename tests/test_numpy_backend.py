"""The float64 numpy reference, op by op, against torch.nn.functional in float64
(and, where torch has no equivalent, e.g. asymmetric pooling, brute-force loops)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import hal
from hal.errors import UnsupportedError
from hal.spec import SpecBuilder
from hal.training import TrainConfig

FP64 = TrainConfig(precision="fp64")  # the reference

torch = pytest.importorskip("torch")
F = torch.nn.functional


def close(got, want):
    want = np.asarray(want)
    assert got.shape == want.shape
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(want).max())))


def one_op(shape, add, seed=0, batch=3):
    """Spec ``input -> add(builder, x)``, random float64 weights, a random batch."""
    b = SpecBuilder("op")
    x = b.input(shape, dtype="float64")
    spec = b.build(add(b, x))
    r = np.random.default_rng(seed)
    w = {}
    for k, s in spec.param_shapes().items():
        w[k] = r.uniform(0.5, 1.5, s) if k.endswith("running_var") else r.standard_normal(s)
    xb = r.standard_normal((batch, *shape))
    return spec, w, xb, hal.compile(spec, "numpy", w, FP64)


def T(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def flat_pad(padding):
    return [v for pair in reversed(padding) for v in pair]


# ---------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------

CONVS = [
    # shape, out, kernel, stride, padding (explicit per side), dilation, groups, bias
    ((4, 11), 6, 3, 2, ((1, 2),), 2, 2, True),
    ((3, 9), 5, 1, 1, ((0, 0),), 1, 1, False),
    ((4, 8, 9), 6, (3, 2), (2, 1), ((0, 2), (1, 0)), (1, 2), 2, True),
    ((3, 7, 7), 3, 3, 1, ((1, 1), (1, 1)), 1, 3, True),  # depthwise
    ((6, 10, 6), 4, (5, 1), (3, 2), ((2, 0), (0, 1)), (1, 1), 2, False),
    ((2, 5, 6, 4), 4, (3, 2, 1), (1, 2, 1), ((1, 1), (0, 1), (2, 0)), (2, 1, 1), 2, True),
    ((3, 4, 4, 4), 2, 2, 1, ((0, 0),) * 3, 1, 1, True),
]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{len(c[0]) - 1}d-{c[0]}-g{c[6]}")
def test_conv(case):
    shape, out, k, s, pad, d, g, bias = case
    spec, w, x, exe = one_op(shape, lambda b, x: b.conv(x, out, k, s, pad, d, g, bias, name="c"))
    nd = len(shape) - 1
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    op = spec.node("c").op
    want = fn(F.pad(T(x), flat_pad(pad)), T(w["c.weight"]), T(w["c.bias"]) if bias else None, op.stride, 0, op.dilation, g)
    close(exe.predict(x), want.numpy())


def test_conv_symmetric_padding_matches_torch_padding_argument():
    spec, w, x, exe = one_op((3, 8, 8), lambda b, x: b.conv(x, 4, 3, stride=2, padding=1, dilation=2, name="c"))
    want = F.conv2d(T(x), T(w["c.weight"]), T(w["c.bias"]), 2, 1, 2)
    close(exe.predict(x), want.numpy())


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------


def brute_pool(x, kernel, stride, padding, mode, count_include_pad=True):
    """Textbook pooling with explicit loops: every window of the padded input."""
    n, c, *sp = x.shape
    out_sp = [(s + a + b - k) // st + 1 for s, k, st, (a, b) in zip(sp, kernel, stride, padding)]
    out = np.empty((n, c, *out_sp))
    for pos in itertools.product(*(range(o) for o in out_sp)):
        vals, count = [], 0
        for off in itertools.product(*(range(k) for k in kernel)):
            idx = [p * st + o - a for p, st, o, (a, _) in zip(pos, stride, off, padding)]
            count += 1
            if all(0 <= i < s for i, s in zip(idx, sp)):
                vals.append(x[(slice(None), slice(None), *idx)])
            elif mode == "avg" and count_include_pad:
                vals.append(np.zeros((n, c)))
        stack = np.stack(vals)
        out[(slice(None), slice(None), *pos)] = stack.max(0) if mode == "max" else stack.sum(0) / len(vals)
    return out


POOLS = [
    ((2, 9), (3,), (2,), ((1, 2),)),
    ((2, 7, 8), (3, 2), (2, 1), ((0, 2), (1, 0))),
    ((2, 6, 6), (2, 2), (2, 2), ((1, 1), (1, 1))),
    ((3, 5, 7), (3, 3), (1, 2), ((2, 1), (0, 0))),
    ((2, 4, 5, 3), (2, 3, 2), (1, 2, 1), ((1, 0), (2, 1), (0, 1))),
]


@pytest.mark.parametrize("case", POOLS, ids=lambda c: str(c[0]))
def test_max_pool(case):
    shape, k, s, pad = case
    spec, w, x, exe = one_op(shape, lambda b, x: b.max_pool(x, k, s, pad, name="p"))
    got = exe.predict(x)
    close(got, brute_pool(x, k, s, pad, "max"))
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(k) - 1]
    close(got, fn(F.pad(T(x), flat_pad(pad), value=-math.inf), k, s).numpy())
    if all(a == b_ and a <= kk // 2 for (a, b_), kk in zip(pad, k)):
        close(got, fn(T(x), k, s, [a for a, _ in pad]).numpy())


def test_max_pool_padding_never_wins():
    spec, w, x, exe = one_op((2, 4, 4), lambda b, x: b.max_pool(x, 3, 1, 1, name="p"))
    x = -np.abs(x) - 10.0  # every value is below the zero a padded pixel would hold
    got = exe.predict(x)
    assert got.max() < -10.0
    close(got, F.max_pool2d(T(x), 3, 1, 1).numpy())


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("case", POOLS, ids=lambda c: str(c[0]))
def test_avg_pool(case, count_include_pad):
    shape, k, s, pad = case
    spec, w, x, exe = one_op(shape, lambda b, x: b.avg_pool(x, k, s, pad, count_include_pad, name="p"))
    got = exe.predict(x)
    close(got, brute_pool(x, k, s, pad, "avg", count_include_pad))
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(k) - 1]
    if all(a == b_ and a <= kk // 2 for (a, b_), kk in zip(pad, k)):
        close(got, fn(T(x), k, s, [a for a, _ in pad], count_include_pad=count_include_pad).numpy())
    elif count_include_pad:
        close(got, fn(F.pad(T(x), flat_pad(pad)), k, s).numpy())


def test_global_avg_pool():
    for shape in [(3, 7), (3, 5, 6), (2, 3, 4, 5)]:
        spec, w, x, exe = one_op(shape, lambda b, x: b.global_avg_pool(x))
        close(exe.predict(x), T(x).mean(dim=tuple(range(2, len(shape) + 1))).numpy())


# ---------------------------------------------------------------------------
# batch norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (4, 7), (3, 5, 6), (2, 3, 4, 3)])
@pytest.mark.parametrize("training", [False, True])
def test_batch_norm(shape, training):
    spec, w, x, exe = one_op(shape, lambda b, x: b.batch_norm(x, eps=1e-3, momentum=0.3, name="bn"), batch=4)
    x = 3.0 * x + 1.5  # batch statistics far from the running ones
    rm, rv = T(w["bn.running_mean"]).clone(), T(w["bn.running_var"]).clone()
    want = F.batch_norm(T(x), rm, rv, T(w["bn.weight"]), T(w["bn.bias"]), training, 0.3, 1e-3)
    close(exe.predict(x, training=training), want.numpy())
    # the reference never updates state, even in training mode
    for k, v in exe.weights().items():
        assert np.array_equal(v, w[k]), k


def test_training_mode_forward_uses_batch_statistics():
    b = SpecBuilder("cbn")
    x = b.input((3, 6, 6), dtype="float64")
    spec = b.build(b.relu(b.batch_norm(b.conv(x, 4, 3, padding=1, name="c"), name="bn")))
    r = np.random.default_rng(3)
    w = {k: r.standard_normal(s) for k, s in spec.param_shapes().items()}
    w["bn.running_var"] = np.abs(w["bn.running_var"]) + 0.5
    x = r.standard_normal((5, 3, 6, 6))
    exe = hal.compile(spec, "numpy", w, FP64)
    conv = F.conv2d(T(x), T(w["c.weight"]), T(w["c.bias"]), 1, 1)
    mean, var = conv.mean(dim=(0, 2, 3)), conv.var(dim=(0, 2, 3), unbiased=False)
    want = torch.relu((conv - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
                      * T(w["bn.weight"])[None, :, None, None] + T(w["bn.bias"])[None, :, None, None])
    close(exe.predict(x, training=True), want.numpy())
    # in inference the running statistics are used: a different answer
    assert not np.allclose(exe.predict(x, training=False), want.numpy())
    # and the batch statistics make the result depend on the rest of the batch
    assert not np.allclose(exe.predict(x[:2], training=True), want.numpy()[:2])
    close(exe.predict(x[:2], training=False), exe.predict(x, training=False)[:2])


# ---------------------------------------------------------------------------
# activations, flatten, dense, add, concat, dropout
# ---------------------------------------------------------------------------

ACTS = [
    ("relu", {}, F.relu),
    ("leaky_relu", {"alpha": 0.2}, lambda t: F.leaky_relu(t, 0.2)),
    ("sigmoid", {}, torch.sigmoid),
    ("tanh", {}, torch.tanh),
    ("silu", {}, F.silu),
    ("gelu", {"approximate": "none"}, lambda t: F.gelu(t, approximate="none")),
    ("gelu", {"approximate": "tanh"}, lambda t: F.gelu(t, approximate="tanh")),
]


@pytest.mark.parametrize("fn,kw,ref", ACTS, ids=[f"{a}-{k.get('approximate', '')}" for a, k, _ in ACTS])
def test_activation(fn, kw, ref):
    spec, w, x, exe = one_op((3, 4, 5), lambda b, x: b.activation(x, fn, **kw))
    x = x * 4.0
    x[0, 0, 0, :] = [-800.0, -30.0, 0.0, 30.0, 800.0]  # saturation, no overflow warnings or NaN
    with np.errstate(all="raise"):
        got = exe.predict(x)
    assert np.all(np.isfinite(got))
    close(got, ref(T(x)).numpy())


def test_gelu_exact_and_tanh_differ():
    x = np.linspace(-3, 3, 13).reshape(1, 13)
    _, _, _, exact = one_op((13,), lambda b, x: b.activation(x, "gelu"))
    _, _, _, approx = one_op((13,), lambda b, x: b.activation(x, "gelu", approximate="tanh"))
    assert 1e-5 < np.abs(exact.predict(x) - approx.predict(x)).max() < 1e-2
    # exact gelu at 1: 0.5 * (1 + erf(1/sqrt 2)) = Phi(1)
    assert exact.predict(np.array([[1.0] * 13]))[0, 0] == pytest.approx(0.8413447460685429, rel=1e-14)


def test_flatten_is_row_major_over_c_then_spatial():
    spec, w, x, exe = one_op((3, 4, 5), lambda b, x: b.flatten(x))
    got = exe.predict(x)
    close(got, torch.flatten(T(x), 1).numpy())
    assert got[1, 1 * 20 + 2 * 5 + 3] == x[1, 1, 2, 3]


@pytest.mark.parametrize("bias", [True, False])
def test_dense(bias):
    spec, w, x, exe = one_op((7,), lambda b, x: b.dense(x, 4, bias=bias, name="fc"))
    close(exe.predict(x), F.linear(T(x), T(w["fc.weight"]), T(w["fc.bias"]) if bias else None).numpy())


def test_flatten_then_dense():
    spec, w, x, exe = one_op((2, 3, 3), lambda b, x: b.dense(b.flatten(x), 5, name="fc"))
    close(exe.predict(x), F.linear(torch.flatten(T(x), 1), T(w["fc.weight"]), T(w["fc.bias"])).numpy())


def test_add_and_concat():
    def graph(b, x):
        a = b.activation(x, "tanh")
        s = b.activation(x, "sigmoid")
        return b.concat(b.add(x, a, s), a)

    spec, w, x, exe = one_op((2, 3, 4), graph)
    t = T(x)
    close(exe.predict(x), torch.cat([t + torch.tanh(t) + torch.sigmoid(t), torch.tanh(t)], 1).numpy())


def test_dropout_is_identity_in_inference_and_refuses_random_training():
    spec, w, x, exe = one_op((3, 4), lambda b, x: b.dropout(x, 0.5))
    close(exe.predict(x), x)
    with pytest.raises(UnsupportedError):
        exe.predict(x, training=True)
    spec, w, x, exe = one_op((3, 4), lambda b, x: b.dropout(x, 0.0))
    close(exe.predict(x, training=True), x)


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_is_identity_in_inference_and_refuses_random_training(mode):
    tv = pytest.importorskip("torchvision")
    spec, w, x, exe = one_op((3, 4), lambda b, x: b.stochastic_depth(x, 0.3, mode))
    close(exe.predict(x), tv.ops.StochasticDepth(0.3, mode).eval()(T(x)))
    with pytest.raises(UnsupportedError, match="StochasticDepth"):
        exe.predict(x, training=True)
    spec, w, x, exe = one_op((3, 4), lambda b, x: b.stochastic_depth(x, 0.0, mode))
    close(exe.predict(x, training=True), tv.ops.StochasticDepth(0.0, mode).train()(T(x)))


# ---------------------------------------------------------------------------
# the executable
# ---------------------------------------------------------------------------


def test_whole_small_cnn_against_torch_functional_float64(make_weights):
    """small_cnn written out with torch.nn.functional by hand, float64."""
    from hal.models import small_cnn

    spec = small_cnn(num_classes=7, input_size=12)
    w = make_weights(spec, 5)
    x = np.random.default_rng(9).standard_normal((3, 3, 12, 12))
    W = {k: T(v) for k, v in w.items()}

    def bn(t, n, training):
        return F.batch_norm(t, W[f"{n}.running_mean"].clone(), W[f"{n}.running_var"].clone(), W[f"{n}.weight"],
                            W[f"{n}.bias"], training, 0.1, 1e-5)

    def forward(t, training):
        t = F.relu(bn(F.conv2d(F.pad(t, [1, 1, 1, 1]), W["conv1.weight"]), "bn1", training))
        t = F.max_pool2d(t, 2)
        y = F.leaky_relu(bn(F.conv2d(t, W["conv2.weight"], W["conv2.bias"], padding=1), "bn2", training), 0.1)
        t = t + y
        z = F.silu(F.conv2d(t, W["branch.weight"], W["branch.bias"]))
        t = torch.cat([t, z], 1)
        t = F.conv2d(F.pad(t, [0, 1, 0, 1]), W["conv3.weight"], W["conv3.bias"], stride=2)  # SAME, 6 -> 3
        t = F.gelu(t, approximate="tanh")
        t = F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)
        t = torch.tanh(torch.flatten(t, 1))
        t = torch.sigmoid(F.linear(t, W["fc1.weight"], W["fc1.bias"]))
        return F.linear(t, W["fc2.weight"], W["fc2.bias"])

    assert spec.node("conv3").op.padding == ((0, 1), (0, 1))
    exe = hal.compile(spec, "numpy", w, FP64)
    for training in (False, True):
        close(exe.predict(x, training=training), forward(T(x), training).numpy())


def test_float32_input_is_computed_in_float64():
    spec, w, x, exe = one_op((3, 5), lambda b, x: b.dense(b.flatten(x), 2, name="fc"))
    x32 = x.astype(np.float32)
    close(exe.predict(x32), F.linear(torch.flatten(T(x32), 1), T(w["fc.weight"]), T(w["fc.bias"])).numpy())


