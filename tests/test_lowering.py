"""hal.lowering: the shared semantics, each against an independent truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hal import lowering as L
from hal.backends.numpy import avg_pool, batch_norm, conv
from hal.models import get
from hal.spec import AvgPool, BatchNorm, Conv, SpecBuilder
from hal.training import SGD, Adam, AdamW, Cosine, TrainConfig


def test_free_after_matches_the_quadratic_definition_on_resnet():
    spec = get("resnet18", input_size=32)
    free = L.free_after(spec)
    for i, _ in enumerate(spec.nodes):
        last = {k for j, n in enumerate(spec.nodes) for k in n.inputs if j == i}
        dying = {k for k in last if all(k not in n.inputs for n in spec.nodes[i + 1 :]) and k != spec.output}
        assert set(free[i]) == dying


def test_free_after_is_linear_on_a_long_chain():
    b = SpecBuilder("chain")
    x = b.input((1, 4))
    for _ in range(30_000):
        x = b.relu(x)
    spec = b.build(x)
    free = L.free_after(spec)  # a quadratic pass takes minutes here
    assert sum(len(f) for f in free) == len(spec.nodes) - 1


@pytest.mark.parametrize("n,k,s,d", [(7, 3, 2, 1), (8, 3, 2, 1), (5, 4, 1, 1), (9, 3, 3, 2), (1, 5, 1, 1), (6, 1, 4, 1)])
def test_tf_same_follows_tensorflows_rule(n, k, s, d):
    # TensorFlow's documented rule: out = ceil(n / s); total pad = max((out - 1) * s + eff - n, 0); odd pixel after
    eff = d * (k - 1) + 1
    out = math.ceil(n / s)
    total = max((out - 1) * s + eff - n, 0)
    assert L.tf_same((n,), (k,), (s,), (d,)) == ((total // 2, total - total // 2),)


def test_padding_modes():
    assert L.padding_mode(((0, 0), (0, 0)), (8, 8), (3, 3), (1, 1)) == "valid"
    assert L.padding_mode(((1, 1), (1, 1)), (8, 8), (3, 3), (1, 1)) == "same"
    assert L.padding_mode(((0, 1), (0, 1)), (8, 8), (3, 3), (2, 2)) == "same"
    assert L.padding_mode(((1, 1),), (8,), (3,), (2,)) == "symmetric"  # TF SAME would be (0, 1)
    assert L.padding_mode(((2, 0),), (8,), (3,), (1,)) == "explicit"
    assert L.symmetric(((2, 2), (1, 1))) == (2, 1) and L.symmetric(((2, 1),)) is None


def test_pad_layouts_against_numpy_pad():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4, 5))
    padding = ((1, 2), (0, 3), (2, 0))
    want = np.pad(x, ((0, 0), (0, 0), *padding))
    got = torch.nn.functional.pad(torch.from_numpy(x), L.torch_pad(padding)).numpy()
    np.testing.assert_array_equal(got, want)
    nhwc = np.pad(np.moveaxis(x, 1, -1), L.nhwc_pad(padding))
    np.testing.assert_array_equal(np.moveaxis(nhwc, -1, 1), want)


@pytest.mark.parametrize("include", [True, False])
def test_avg_pool_divisor_against_the_reference(include):
    op = AvgPool(kernel=(3, 2), stride=(2, 1), padding=((1, 2), (0, 1)), count_include_pad=include)
    x = np.random.default_rng(1).standard_normal((1, 1, 7, 5))
    sums = avg_pool(x, AvgPool(op.kernel, op.stride, op.padding, True)) * math.prod(op.kernel)
    np.testing.assert_allclose(sums[0, 0] / L.avg_pool_divisor((7, 5), op), avg_pool(x, op)[0, 0], rtol=1e-13)


def test_foldable_batchnorms_and_the_folding_formula():
    b = SpecBuilder("f")
    x = b.input((3, 6, 6))
    c1 = b.conv(x, 4, 3, padding="same", bias=True, name="c1")
    n1 = b.batch_norm(c1, name="n1")  # folds
    c2 = b.conv(n1, 4, 1, name="c2")
    n2 = b.batch_norm(c2, name="n2")  # c2 is also read by the add: does not fold
    spec = b.build(b.add(n2, c2))
    assert L.foldable_batchnorms(spec) == {"n1": "c1"}

    rng = np.random.default_rng(2)
    w, bias = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    p = {"weight": rng.uniform(0.5, 2, 4), "bias": rng.standard_normal(4), "running_mean": rng.standard_normal(4),
         "running_var": rng.uniform(0.5, 2, 4)}
    xin = rng.standard_normal((2, 3, 6, 6))
    op = spec.node("c1").op
    assert isinstance(op, Conv)
    want = batch_norm(conv(xin, w, bias, op), p, BatchNorm(), training=False)
    fw, fb = L.fold_batchnorm(w, bias, p["weight"], p["bias"], p["running_mean"], p["running_var"], 1e-5)
    np.testing.assert_allclose(conv(xin, fw, fb, op), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opt", [Adam(lr=0.01, weight_decay=0.1), AdamW(lr=0.01, weight_decay=0.1)])
def test_adam_step_scalars_reproduce_torch_optim(opt):
    """Three steps of torch.optim on one float64 tensor, redone from the shared scalars."""
    torch = pytest.importorskip("torch")
    config = TrainConfig(optimizer=opt, schedule=Cosine(total_steps=3, warmup_steps=1, warmup_start=0.5))
    p0 = np.array([0.5, -1.5, 2.0])
    grads = [np.array([0.1, -0.2, 0.3]), np.array([-0.4, 0.5, 0.0]), np.array([0.7, 0.1, -0.9])]

    param = torch.nn.Parameter(torch.tensor(p0))
    cls = torch.optim.AdamW if isinstance(opt, AdamW) else torch.optim.Adam
    topt = cls([param], lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, config.schedule.factor)
    for g in grads:
        param.grad = torch.tensor(g)
        topt.step()
        sched.step()

    table = L.scalar_table(config, 0, 3)
    names = L.step_scalar_names(config)
    p, m, v = p0.copy(), np.zeros(3), np.zeros(3)
    b1, b2 = opt.betas
    for row, g in zip(table, grads):
        h = dict(zip(names, row))
        if isinstance(opt, AdamW):
            p = p * h["decay"]
        else:
            g = g + opt.weight_decay * p
        m = m + (1 - b1) * (g - m)
        v = b2 * v + (1 - b2) * g * g
        p = p - h["step_size"] * (m / (np.sqrt(v) / h["bc2_sqrt"] + opt.eps))
    np.testing.assert_allclose(p, param.detach().numpy(), rtol=1e-14, atol=1e-15)


def test_sgd_scalars_are_the_scheduled_lr():
    config = TrainConfig(optimizer=SGD(lr=0.1), schedule=Cosine(total_steps=4))
    assert L.step_scalar_names(config) == ("lr",)
    np.testing.assert_allclose(L.scalar_table(config, 1, 3)[:, 0], [0.1 * config.schedule.factor(s) for s in (1, 2, 3)])
