"""JAX backend (Flax linen + Optax) internals: float64 trajectories equal to
torch.optim's, Optax transforms, Flax layouts, precisions, options, the in-graph
non-finite guard and all-or-nothing loads. What every backend must do (each op,
gradients, state, errors) is the conformance suite's (``tests/test_conformance.py``).

Exact-semantics checks run the jax backend in float64 against ``torch:cpu`` in
float64 (any difference of rule — momentum form, bias correction, eps placement,
weight-decay coupling, BatchNorm momentum or variance — shows up as an error many
orders of magnitude above float64 rounding); float32 checks use the parity
tolerances of :mod:`hal.parity` from the measured float32 floor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("jax", reason="the jax backend needs jax, flax and optax: pip install 'hal-cnn[jax]'")
pytest.importorskip("flax", reason="the jax backend needs flax: pip install 'hal-cnn[jax]'")
pytest.importorskip("optax", reason="the jax backend needs optax: pip install 'hal-cnn[jax]'")

import hal  # noqa: E402
from conftest import failing_on_call  # noqa: E402  (tests/ is on sys.path)
import hal.models  # noqa: E402
import hal.testing  # noqa: E402
from hal.backends.jax import JaxBackend  # noqa: E402
from hal.backends.numpy import NumpyExecutable  # noqa: E402
from hal.errors import (  # noqa: E402
    ConfigError,
    InputError,
    NonFiniteError,
    UnsupportedError,
)
from hal.parity import make_batch, normalised_error, tensors_error, tolerance  # noqa: E402
from hal.training import SGD, Adam, AdamW, Cosine, StepDecay, TrainConfig  # noqa: E402

HAS_TORCH = hal.get_backend("torch").availability().available
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch:cpu is the float64 autodiff and torch.optim reference")
EXACT = 1e-9  # float64 vs float64: semantic differences are >> this, rounding << this


def tiny_bn(in_ch: int = 3, size: int = 8, classes: int = 5) -> hal.ModelSpec:
    b = hal.SpecBuilder("tiny_bn")
    x = b.input((in_ch, size, size))
    x = b.relu(b.batch_norm(b.conv(x, 4, 3, padding="same", bias=False, name="c1"), name="bn1", momentum=0.2))
    # no conv bias before a BatchNorm: its true gradient is 0, and Adam turns the rounding
    # noise of a zero gradient into lr-sized steps of random sign (chaotic, on any backend)
    x = b.relu(b.batch_norm(b.conv(x, 6, 3, stride=2, padding="same", bias=False, name="c2"), name="bn2"))
    return b.build(b.dense(b.global_avg_pool(x), classes, name="fc"))


def tiny_plain(size: int = 8, classes: int = 5) -> hal.ModelSpec:
    b = hal.SpecBuilder("tiny_plain")
    x = b.input((3, size, size))
    x = b.activation(b.conv(x, 6, 3, padding=1, name="c1"), "tanh")
    x = b.avg_pool(x, 2, name="p")
    x = b.flatten(x, name="flat")
    return b.build(b.dense(x, classes, name="fc"))


def reference(spec: hal.ModelSpec, w: dict, precision: str = "fp64") -> NumpyExecutable:
    """The numpy reference, float64 unless asked otherwise."""
    return NumpyExecutable(spec, w, TrainConfig(precision=precision))


def floor_of(spec: hal.ModelSpec, w: dict, x: np.ndarray, training: bool) -> float:
    """The measured float32 rounding floor (float32 numpy vs float64 numpy), as hal.parity does."""
    ref = reference(spec, w).predict(x, training)
    f32 = reference(spec, w, "fp32").predict(x, training)
    return normalised_error(f32, ref)[1]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return normalised_error(a, b)[1]


def weights_rel(a: dict, b: dict) -> float:
    return tensors_error(a, b)[1]


def steps_of(x: np.ndarray, y: np.ndarray, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """n different batches shaped like (x, y)."""
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((n, *x.shape)).astype(np.float32)
    ys = np.stack([rng.permutation(y) for _ in range(n)])
    return xs, ys


# ---------------------------------------------------------------------------
# backend facts
# ---------------------------------------------------------------------------


def test_availability_devices_capabilities() -> None:
    assert JaxBackend.availability().available
    devices = JaxBackend.devices()
    assert "cpu" in devices
    assert JaxBackend.resolve_device("cpu") == "cpu"
    assert set(JaxBackend.capabilities().precisions) == {"fp32", "fp64", "bf16", "fp16"}
    assert "jax" in hal.backend_names() and str(hal.registry.resolve("jax")[1]) == f"jax:{devices[0]}"
    spec = tiny_bn()
    why = JaxBackend.unsupported(spec, TrainConfig(precision="16.16"))  # Graphcore's: IPU targets only
    assert "16.16" in why["config"]
    assert JaxBackend.unsupported(spec, TrainConfig()) == {}
    with pytest.raises(UnsupportedError, match="16.16"):
        hal.compile(spec, "jax:cpu", config=TrainConfig(precision="16.16"))


# ---------------------------------------------------------------------------
# forward parity with the float64 reference
# ---------------------------------------------------------------------------

FORWARD_MODELS = {
    "small_cnn": lambda: hal.models.get("small_cnn"),
    "resnet18_32": lambda: hal.models.get("resnet18", num_classes=10, input_size=32),
}


@pytest.mark.parametrize("name", sorted(FORWARD_MODELS))
def test_forward_matches_float64_reference(name: str) -> None:
    spec = FORWARD_MODELS[name]()
    w = hal.init_weights(spec, seed=3)
    # non-trivial BatchNorm statistics, so that inference exercises the folded path
    rng = np.random.default_rng(0)
    for k in w:
        if k.endswith("running_mean"):
            w[k] = rng.normal(0, 0.2, w[k].shape).astype(np.float32)
        elif k.endswith("running_var"):
            w[k] = rng.uniform(0.5, 2.0, w[k].shape).astype(np.float32)
    x, _ = make_batch(spec, 4, "cross_entropy", seed=1)
    exe = hal.compile(spec, "jax:cpu", w)
    ref = reference(spec, w)
    for training in (False, True):
        out = exe.predict(x, training=training)
        assert out.dtype == np.float32 and out.shape == (4, *spec.output_shape)
        err, tol = rel(out, ref.predict(x, training)), tolerance(floor_of(spec, w, x, training))
        assert err <= tol, f"{name} training={training}: normalised error {err:.2e} > tolerance {tol:.2e}"
    # the training-mode forward updates nothing
    hal.testing.assert_weights_equal(exe.weights(), {k: v.astype(np.float32) for k, v in w.items()})


# ---------------------------------------------------------------------------
# gradients vs float64 autodiff
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# optimizers and schedules: torch.optim semantics
# ---------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd_momentum": TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9)),
    "sgd_nesterov_wd": TrainConfig(optimizer=SGD(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    "sgd_plain_stepdecay": TrainConfig(optimizer=SGD(lr=0.1, weight_decay=1e-3), schedule=StepDecay(2, 0.5)),
    "adam_l2": TrainConfig(optimizer=Adam(lr=0.01, betas=(0.8, 0.99), weight_decay=0.05)),
    "adamw": TrainConfig(optimizer=AdamW(lr=0.01, weight_decay=0.1)),
    "adamw_cosine_warmup": TrainConfig(
        optimizer=AdamW(lr=0.02, weight_decay=0.05), schedule=Cosine(total_steps=5, warmup_steps=2, warmup_start=0.1)
    ),
    "sgd_cosine_warmup": TrainConfig(
        optimizer=SGD(lr=0.1, momentum=0.9), schedule=Cosine(total_steps=4, warmup_steps=2, min_factor=0.1)
    ),
}


@needs_torch
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_trajectory_float64_is_torch_optim_exactly(name: str) -> None:
    """5 steps (losses, weights, BatchNorm buffers) vs torch.optim, both float64."""
    spec = tiny_bn()
    cfg = replace(OPTIMIZERS[name], precision="fp64")
    w = hal.init_weights(spec, seed=4)
    x, y = make_batch(spec, 6, "cross_entropy", seed=4)
    xs, ys = steps_of(x, y, 5)
    jexe, texe = hal.compile(spec, "jax:cpu", w, cfg), hal.compile(spec, "torch:cpu", w, cfg)
    jl, tl = jexe.run_steps(xs, ys), texe.run_steps(xs, ys)
    assert jexe.step == texe.step == 5
    assert rel(jl, tl) <= EXACT, (jl, tl)
    jw, tw = jexe.weights(), texe.weights()
    assert all(jw[k].dtype == np.float64 for k in jw)
    assert weights_rel(jw, tw) <= EXACT, tensors_error(jw, tw)
    moved = weights_rel(tw, {k: v.astype(np.float64) for k, v in w.items()})
    assert moved > 1e-3  # the check can see a difference


@needs_torch
def test_small_cnn_parity_harness() -> None:
    """small_cnn (every op): forward, training forward, grads, 3 SGD-momentum steps."""
    hal.testing.assert_parity(hal.models.get("small_cnn"), "jax:cpu", batch=4, steps=3)


def test_optax_transforms_match_torch_optim_on_raw_tensors() -> None:
    """The Optax chains alone (no model), 8 steps with a warm-up cosine schedule, float64."""
    torch = pytest.importorskip("torch")
    import jax
    import optax

    from hal.backends.jax import optimizer
    from hal.backends.torch import make_optimizer
    from hal.lowering import step_scalars

    rng = np.random.default_rng(0)
    p0 = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(8)]
    sched = Cosine(total_steps=8, warmup_steps=3, warmup_start=0.2)
    with jax.enable_x64(True):
        for opt in OPTIMIZERS.values():
            cfg = TrainConfig(optimizer=opt.optimizer, schedule=sched)
            tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
            topt = make_optimizer(tp.values(), cfg)
            tx = optimizer(cfg)
            jp = jax.tree.map(jax.numpy.asarray, p0)
            state = tx.init(jp)
            for t, g in enumerate(grads):
                for k in tp:
                    tp[k].grad = torch.tensor(g[k])
                for group in topt.param_groups:
                    group["lr"] = cfg.lr(t)
                topt.step()
                h = {k: jax.numpy.asarray(v) for k, v in step_scalars(cfg, t).items()}
                u, state = tx.update(jax.tree.map(jax.numpy.asarray, g), state, jp, hyper=h)
                jp = optax.apply_updates(jp, u)
            for k in tp:
                np.testing.assert_allclose(np.asarray(jp[k]), tp[k].detach().numpy(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# weights, steps, state
# ---------------------------------------------------------------------------


def test_fp64_stays_inside_its_executable() -> None:
    import jax

    spec = tiny_bn()
    exe = hal.compile(spec, "jax:cpu", config=TrainConfig(precision="fp64"))
    x, y = make_batch(spec, 4, "cross_entropy")
    assert exe.predict(x).dtype == np.float64
    exe.train_step(x, y)
    assert all(v.dtype == np.float64 for v in exe.weights().values())
    assert not jax.config.jax_enable_x64
    assert jax.numpy.ones(2).dtype == np.float32


def test_bf16_mixed_precision() -> None:
    spec = tiny_bn()
    w = hal.init_weights(spec)
    x, y = make_batch(spec, 4, "cross_entropy")
    exe = hal.compile(spec, "jax:cpu", w, TrainConfig(precision="bf16"))
    out = exe.predict(x)
    assert out.dtype == np.float32
    assert rel(out, reference(spec, w).predict(x)) <= tolerance(floor_of(spec, w, x, False), "bf16")
    assert np.isfinite(exe.train_step(x, y))
    assert all(v.dtype == np.float32 for v in exe.weights().values())  # float32 master weights


# ---------------------------------------------------------------------------
# the ops of modern CNNs: parameters, constant tables, random training rules
# ---------------------------------------------------------------------------


def modern(p: float = 0.0) -> hal.ModelSpec:
    """Every op that has parameters, builds constant tables or draws random masks, behind a
    folded conv + BatchNorm (ops one by one: the conformance suite; here they run together)."""
    b = hal.SpecBuilder("modern")
    y = b.conv(b.input((4, 9, 7)), 6, 3, padding=1, bias=False, name="c")
    y = b.prelu(b.batch_norm(y, name="bn"), 6, name="act")
    y = b.pad(y, [(1, 2), (0, 1)], mode="reflect")
    y = b.conv_transpose(y, 6, 3, stride=2, padding=[(1, 0), (2, 1)], output_padding=1, groups=2, name="up")
    y = b.max_pool(b.group_norm(y, 3, name="gn"), 3, stride=2, ceil_mode=True)
    gate = b.activation(b.conv(b.adaptive_avg_pool(y, 1), 6, 1, name="se"), "sigmoid")
    y = b.avg_pool(b.mul(y, gate), 2, stride=1, padding=1, count_include_pad=False, ceil_mode=True)
    y = b.upsample(b.adaptive_avg_pool(y, (5, 4)), size=(7, 9), mode="bilinear", align_corners=True)
    y = b.channel_slice(b.channel_shuffle(y, 3), 0, 4)
    y = b.scale(b.instance_norm(y, affine=True, name="in"), 0.5, name="ls")
    y = b.layer_norm(b.dense(y, 5, name="pw"), name="ln")  # Dense over the channels of (C, H, W)
    y = b.upsample(b.adaptive_max_pool(b.stochastic_depth(y, p, name="sd"), (3, 2)), scale=2.0)
    return b.build(b.dense(b.flatten(y), 3, name="fc"))


def random_weights(spec: hal.ModelSpec, seed: int = 0) -> dict:
    """Every tensor random (positive variances): a layout mix-up cannot hide behind constant initial values."""
    rng = np.random.default_rng(seed)
    return {k: (rng.uniform(0.5, 2.0, s) if k.endswith("running_var") else rng.normal(0, 0.5, s)).astype(np.float32)
            for k, s in spec.param_shapes().items()}


def test_every_spec_op_is_lowered() -> None:
    assert JaxBackend.capabilities().ops == frozenset(hal.spec.OPS)
    assert JaxBackend.unsupported(modern(0.5), TrainConfig()) == {}


def test_flax_layouts_of_the_new_parameters_round_trip_bit_exact() -> None:
    import jax

    spec = modern()
    w = random_weights(spec)
    exe = hal.compile(spec, "jax:cpu", w, TrainConfig(loss="mse"))
    hal.testing.assert_weights_equal(exe.weights(), w)
    params = jax.device_get(exe.params)
    # the transposed conv as the convolution of the stride-dilated input: (*k, C/groups, O), flipped,
    # in/out swapped within each group: kernel[2 - i, 2 - j, c, g * 3 + o] = weight[g * 3 + c, o, i, j]
    kernel, weight = params["up"]["kernel"], w["up.weight"]
    assert kernel.shape == (3, 3, 3, 6) and weight.shape == (6, 3, 3, 3)
    for g, c, o, i, j in ((0, 0, 0, 0, 0), (1, 2, 0, 0, 1), (1, 0, 2, 2, 1), (0, 1, 2, 1, 2)):
        assert kernel[2 - i, 2 - j, c, g * 3 + o] == weight[g * 3 + c, o, i, j]
    assert params["act"]["negative_slope"].shape == (6,) and params["ls"]["scale"].shape == (4,)
    assert {k: set(params[k]) for k in ("gn", "in", "ln")} == {k: {"scale", "bias"} for k in ("gn", "in", "ln")}
    x, t = make_batch(spec, 3, "mse", seed=1)
    _, grads = exe.loss_and_grads(x, t)
    assert {k: g.shape for k, g in grads.items()} == {k: w[k].shape for k in spec.trainable()}


def test_modern_ops_in_float64_and_bf16() -> None:
    spec = modern()
    w = random_weights(spec, seed=2)
    x, t = make_batch(spec, 3, "mse", seed=2)
    f64 = TrainConfig(loss="mse", precision="fp64")
    exe = hal.compile(spec, "jax:cpu", w, f64)
    ref = reference(spec, w)
    for training in (False, True):
        assert rel(exe.predict(x, training), ref.predict(x, training)) <= EXACT
    if HAS_TORCH:
        loss, grads = exe.loss_and_grads(x, t)
        t_loss, t_grads = hal.compile(spec, "torch:cpu", w, f64).loss_and_grads(x, t)
        assert abs(loss - t_loss) <= EXACT * abs(t_loss) and weights_rel(grads, t_grads) <= EXACT
    bf16 = hal.compile(modern(0.2), "jax:cpu", w, TrainConfig(loss="mse", precision="bf16"))
    assert rel(bf16.predict(x), ref.predict(x)) <= tolerance(floor_of(spec, w, x, False), "bf16")
    assert np.isfinite(bf16.train_step(x, t)) and bf16.step == 1  # stochastic depth draws its masks in training


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_zeroes_whole_samples_or_the_batch_and_scales_the_rest(mode: str) -> None:
    b = hal.SpecBuilder("sd")
    spec = b.build(b.stochastic_depth(b.input((3, 4, 4)), 0.5, mode=mode, name="sd"))
    x = np.random.default_rng(0).uniform(1.0, 2.0, (16, 3, 4, 4)).astype(np.float32)
    exe = hal.compile(spec, "jax:cpu")
    np.testing.assert_array_equal(exe.predict(x), x)
    outs = np.stack([exe.predict(x, training=True) for _ in range(32)])  # (calls, N, ...)
    kept = np.all(outs == 2 * x, axis=(2, 3, 4))  # scaled by 1 / (1 - p), exactly
    dropped = np.all(outs == 0, axis=(2, 3, 4))
    assert np.all(kept | dropped)
    assert 0.2 < kept.mean() < 0.8
    mixed = kept.any(axis=1) & dropped.any(axis=1)  # a call that kept some samples and dropped others
    assert mixed.any() if mode == "row" else not mixed.any()
    b = hal.SpecBuilder("sd1")
    always = hal.compile(b.build(b.stochastic_depth(b.input((3, 4, 4)), 1.0, mode=mode)), "jax:cpu")
    np.testing.assert_array_equal(always.predict(x, training=True), 0 * x)


def test_matmul_precision_option(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tiny_plain()
    monkeypatch.setenv("HAL_JAX_MATMUL_PRECISION", "default")  # the old environment variable is ignored
    exe = hal.compile(spec, "jax:cpu")
    assert exe.matmul_precision == "highest" == JaxBackend.options()["matmul_precision"].default
    fast = hal.compile(spec, "jax:cpu", options={"matmul_precision": "default"})
    assert fast.matmul_precision == "default"
    # the option is part of the program cache key: same option, same jitted programs
    assert fast.programs is not exe.programs
    assert hal.compile(spec, "jax:cpu", options={"matmul_precision": "highest"}).programs is exe.programs
    x, _ = make_batch(spec, 2, "cross_entropy")
    assert rel(fast.predict(x), reference(spec, hal.init_weights(spec)).predict(x)) < 1e-4
    with pytest.raises(ConfigError, match=r"'matmul_precision' must be one of \('highest', 'high', 'default'\)"):
        hal.compile(spec, "jax:cpu", options={"matmul_precision": "fastest"})


def test_load_weights_is_all_or_nothing() -> None:
    import hal.backends.jax as hal_jax

    spec = tiny_bn()
    exe = hal.compile(spec, "jax:cpu", seed=1)
    x, y = make_batch(spec, 4, "cross_entropy")
    exe.predict(x)  # the folded inference copy exists and must stay valid
    before, out = exe.weights(), exe.predict(x)
    with failing_on_call(hal_jax, "to_flax_layout") as calls, pytest.raises(RuntimeError, match="conversion failed"):
        exe.load_weights(hal.init_weights(spec, seed=2))
    assert len(calls) == 3
    hal.testing.assert_weights_equal(exe.weights(), before)
    np.testing.assert_array_equal(exe.predict(x), out)
    other = hal.init_weights(spec, seed=2)
    exe.load_weights(other)
    hal.testing.assert_weights_equal(exe.weights(), other)


# ---------------------------------------------------------------------------
# non-finite steps: computed, not applied
# ---------------------------------------------------------------------------

NONFINITE_CFG = TrainConfig(optimizer=SGD(lr=0.1, momentum=0.9))  # momentum: optimizer state must be kept too


def test_non_finite_train_step_is_not_applied() -> None:
    spec = tiny_bn()
    w = hal.init_weights(spec, seed=10)
    x, y = make_batch(spec, 6, "cross_entropy", seed=10)
    xs, ys = steps_of(x, y, 2)
    bad = xs[1].copy()
    bad[2, 1, 3, 3] = np.nan
    a, b = hal.compile(spec, "jax:cpu", w, NONFINITE_CFG), hal.compile(spec, "jax:cpu", w, NONFINITE_CFG)
    a.train_step(xs[0], ys[0])
    with pytest.raises(NonFiniteError, match="training step 1 was not applied: the loss is nan") as info:
        a.train_step(bad, ys[1])
    assert info.value.step == 1 and a.step == 1
    b.train_step(xs[0], ys[0])  # b never sees the bad batch
    hal.testing.assert_weights_equal(a.weights(), b.weights())  # parameters and BatchNorm buffers
    assert a.train_step(xs[1], ys[1]) == b.train_step(xs[1], ys[1])  # same momentum, same step index
    hal.testing.assert_weights_equal(a.weights(), b.weights())
    assert a.step == b.step == 2


def test_non_finite_step_stops_run_steps() -> None:
    spec = tiny_bn()
    w = hal.init_weights(spec, seed=11)
    x, y = make_batch(spec, 6, "cross_entropy", seed=11)
    xs, ys = steps_of(x, y, 3)
    xs[1, 0, 0, 0, 0] = np.inf  # the 2nd of 3 batches: steps 1 and 2 are not applied
    a, b = hal.compile(spec, "jax:cpu", w, NONFINITE_CFG), hal.compile(spec, "jax:cpu", w, NONFINITE_CFG)
    with pytest.raises(NonFiniteError, match=r"training step 1 \(batch 1 of this run_steps call\)") as info:
        a.run_steps(xs, ys)
    assert info.value.step == 1 and a.step == 1
    b.run_steps(xs[:1], ys[:1])
    hal.testing.assert_weights_equal(a.weights(), b.weights())
    assert a.train_step(xs[2], ys[2]) == b.train_step(xs[2], ys[2])
    hal.testing.assert_weights_equal(a.weights(), b.weights())


def test_non_finite_hooks_report_losses_and_applied_count() -> None:
    spec = tiny_bn()
    x, y = make_batch(spec, 6, "cross_entropy", seed=12)
    xs, ys = steps_of(x, y, 3)
    xs[1, 0, 0, 0, 0] = np.nan
    exe = hal.compile(spec, "jax:cpu", config=NONFINITE_CFG)
    losses, applied = exe._run_steps(xs, ys)
    assert applied == 1 and exe.step == 1
    assert np.isfinite(losses[0]) and np.isnan(losses[1]) and np.isnan(losses[2])  # 2: computed, not applied


def test_cpu_run_steps_and_train_step_share_one_compile() -> None:
    """On the CPU ``run_steps`` calls the training step once per batch without waiting, the
    run's ok flag passed on as a device array; the first step's flag is one too, so a run and
    a single ``train_step`` use one compiled program (a numpy bool compiled it twice)."""
    b = hal.SpecBuilder("one_compile")
    spec = b.build(b.dense(b.global_avg_pool(b.relu(b.conv(b.input((2, 6, 6)), 3, 3, name="c"))), 2, name="fc"))
    x, y = make_batch(spec, 4, "cross_entropy", seed=18)
    xs, ys = steps_of(x, y, 3)
    exe = hal.compile(spec, "jax:cpu", config=TrainConfig())
    losses, applied = exe._run_steps(xs, ys)
    exe.train_step(xs[0], ys[0])
    assert applied == 3 and np.all(np.isfinite(losses))
    assert exe.programs.train._cache_size() == 1


def test_check_finite_false_applies_non_finite_steps() -> None:
    spec = tiny_bn()
    x, y = make_batch(spec, 6, "cross_entropy", seed=13)
    xs, ys = steps_of(x, y, 2)
    xs[0, 0, 0, 0, 0] = np.nan
    exe = hal.compile(spec, "jax:cpu", config=replace(NONFINITE_CFG, check_finite=False))
    losses = exe.run_steps(xs, ys)
    assert np.isnan(losses).all() and exe.step == 2
    assert any(np.isnan(v).any() for v in exe.weights().values())  # the NaN step was applied


# ---------------------------------------------------------------------------
# errors users can cause
# ---------------------------------------------------------------------------


def test_batchnorm_over_one_value_is_refused() -> None:
    """Training-mode BatchNorm over one value per channel has no variance: an InputError, as on torch."""
    b = hal.SpecBuilder("bn_1x1")
    one_pixel = b.build(b.batch_norm(b.conv(b.input((3, 2, 2)), 4, 2), name="bn"))  # BatchNorm sees 1x1 maps
    single = hal.compile(one_pixel, "jax:cpu", config=TrainConfig(loss="mse"))
    x = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(InputError, match="more than one value per channel"):
        single.train_step(x, np.zeros((1, 4, 1, 1), np.float32))
    with pytest.raises(InputError, match="more than one value per channel"):
        single.predict(x, training=True)


# ---------------------------------------------------------------------------
# slow: the full parity harness on a ResNet
# ---------------------------------------------------------------------------


@pytest.mark.slow
@needs_torch
def test_resnet18_full_parity_harness() -> None:
    spec = hal.models.get("resnet18", num_classes=10, input_size=32)
    report = hal.testing.assert_parity(spec, "jax:cpu", batch=4, steps=3)
    print(report.table())


# ---------------------------------------------------------------------------
# max pool gradient (taps, not select_and_scatter) against torch
# ---------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, size", [
    (2, 2, 0, False, 8), (3, 2, 1, False, 9), (3, 2, 1, True, 10), (3, 1, 1, False, 7), (2, 2, 0, True, 7),
    (3, 3, 0, False, 9),  # windows that tile the input: the reshaped form
])
def test_max_pool_gradient_goes_to_the_first_maximum_like_torch(
    kernel: int, stride: int, padding: int, ceil_mode: bool, size: int
) -> None:
    """Integer inputs tie in most windows: every tie must send the whole gradient to the first
    maximum in row-major order (torch's rule), as ``F.max_pool2d``'s float64 backward does."""
    import jax
    import torch

    from hal.backends.jax import flax_module

    rng = np.random.default_rng(kernel * 100 + size)
    x = rng.integers(-2, 3, (2, 3, size, size)).astype(np.float64)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, kernel, stride, padding, ceil_mode=ceil_mode)
    g = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(g))
    b = hal.SpecBuilder("max_pool")
    spec = b.build(b.max_pool(b.input((3, size, size)), kernel, stride, padding=padding, ceil_mode=ceil_mode))
    net = flax_module(spec, "fp64")
    with jax.enable_x64(True):
        y, vjp = jax.vjp(lambda v: net.apply({}, v), x)
        (gx,) = vjp(g)
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy())
    np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy(), rtol=0, atol=EXACT)


# ---------------------------------------------------------------------------
# gradient accumulation on the CPU: unrolled micro-batches (ConvCanonicalization is entry-only)
# ---------------------------------------------------------------------------


def train_program(exe: hal.Executable, x: np.ndarray, y: np.ndarray) -> object:
    """The jitted train step of a jax executable, lowered for ``(x, y)`` (not compiled)."""
    import jax

    from hal.lowering import scalar_table

    with jax.enable_x64(exe.x64):
        return exe.programs.train.lower(
            exe.params, exe.stats, exe.opt_state, x, exe._put_y(y), scalar_table(exe.config, 0, 1)[0], np.int32(0),
            np.asarray(True),
        )


@needs_torch
@pytest.mark.parametrize("unrolled", [True, False])
def test_grad_accum_float64_is_torch_exactly_unrolled_or_scanned(
    monkeypatch: pytest.MonkeyPatch, unrolled: bool
) -> None:
    """grad_accum 3 on convolutions and BatchNorm, 3 AdamW steps, float64, against torch.optim:
    the same trajectory whether the micro-batches are unrolled (the CPU default up to
    ``CPU_UNROLL_ACCUM_MAX``) or a ``lax.scan`` (beyond it); only the unrolled program is
    free of loops, where XLA:CPU can rewrite the weight-gradient convolutions."""
    import hal.backends.jax as hal_jax

    monkeypatch.setattr(hal_jax, "CPU_UNROLL_ACCUM_MAX", 8 if unrolled else 1)
    spec = tiny_bn()
    cfg = TrainConfig(optimizer=AdamW(lr=0.02, weight_decay=0.05), grad_accum=3, precision="fp64")
    w = hal.init_weights(spec, seed=12)
    x, y = make_batch(spec, 6, "cross_entropy", seed=12)
    xs, ys = steps_of(x, y, 3)
    jexe, texe = hal.compile(spec, "jax:cpu", w, cfg), hal.compile(spec, "torch:cpu", w, cfg)
    assert ("stablehlo.while" in train_program(jexe, xs[0], ys[0]).as_text()) is not unrolled
    jl, tl = jexe.run_steps(xs, ys), texe.run_steps(xs, ys)
    assert rel(jl, tl) <= EXACT, (jl, tl)
    assert weights_rel(jexe.weights(), texe.weights()) <= EXACT, tensors_error(jexe.weights(), texe.weights())


def test_unrolled_grad_accum_runs_one_micro_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """XLA's temporary memory for 4 unrolled micro-batches is about that of the scan, which holds
    one micro-batch's activations at a time (unordered, XLA:CPU ran the forward passes together:
    about 4x)."""
    import hal.backends.jax as hal_jax

    spec = tiny_bn(size=32)
    cfg = TrainConfig(optimizer=SGD(lr=0.1, momentum=0.9), grad_accum=4)
    x, y = make_batch(spec, 32, "cross_entropy", seed=13)
    temp = {}
    for limit in (8, 1):
        monkeypatch.setattr(hal_jax, "CPU_UNROLL_ACCUM_MAX", limit)
        exe = hal.compile(spec, "jax:cpu", hal.init_weights(spec, seed=13), cfg)
        temp[limit] = train_program(exe, x, y).compile().memory_analysis().temp_size_in_bytes
    assert temp[8] <= 1.25 * temp[1], temp


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts XLA's threads in /proc; needs 2+ CPUs to tell 1 thread from the default")
def test_set_threads_sizes_xla_cpu_intra_op_pool() -> None:
    """``hal train --threads 1`` leaves XLA:CPU one intra-op (``tf_XLAEigen``) thread: the
    pool is sized by ``PJRT_NPROC`` (XLA's ``DefaultThreadPoolSize``), not by an XLA flag."""
    code = (
        "import os, sys\n"
        "from hal.models.conductivity.train import _set_threads\n"
        "_set_threads(1)\n"
        "import jax.numpy as jnp\n"
        "(jnp.ones((64, 64)) @ jnp.ones((64, 64))).block_until_ready()\n"
        "tasks = os.listdir(f'/proc/{os.getpid()}/task')\n"
        "print(sum(open(f'/proc/{os.getpid()}/task/{t}/comm').read().strip() == 'tf_XLAEigen' for t in tasks))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1", out.stdout


def test_xla_cpu_threads_follow_xla_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    from hal.backends.jax import xla_cpu_threads

    monkeypatch.delenv("NPROC", raising=False)
    monkeypatch.setenv("PJRT_NPROC", "3")
    assert xla_cpu_threads() == 3
    monkeypatch.delenv("PJRT_NPROC")
    monkeypatch.setenv("NPROC", "5")
    assert xla_cpu_threads() == 5
    monkeypatch.delenv("NPROC")
    assert xla_cpu_threads() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("threads, option, ynnpack", [
    (1, "auto", True), (2, "auto", False), (2, "ynnpack", True), (1, "eigen", False),
])
def test_cpu_convolutions_run_on_eigen_with_more_than_one_thread(
    monkeypatch: pytest.MonkeyPatch, threads: int, option: str, ynnpack: bool
) -> None:
    """XLA's YNNPACK convolutions do not use a second thread, Eigen's do: by default, with more
    than one intra-op thread the CPU programs leave convolutions to Eigen, with one they stay on
    YNNPACK; the option ``cpu_convolutions`` chooses either."""
    monkeypatch.setenv("PJRT_NPROC", str(threads))
    b = hal.SpecBuilder("wide")
    spec = b.build(b.conv(b.input((32, 8, 8)), 32, 3, padding=1, name="conv"))
    w = hal.init_weights(spec, seed=16)
    exe = hal.compile(spec, "jax:cpu", w, options={"cpu_convolutions": option})
    x = np.random.default_rng(16).standard_normal((2, 32, 8, 8)).astype(np.float32)
    hlo = exe.programs.infer.lower(exe._variables(), x).compile().as_text()
    assert ("ynn_fusion" in hlo) == ynnpack
    assert rel(exe.predict(x), hal.compile(spec, "numpy", w).predict(x)) <= 1e-5


@needs_torch
def test_narrow_convolutions_are_tap_sums_with_torch_results() -> None:
    """On the CPU, float32 convolutions with one input channel, and those with at most 8 input
    and output channels that only a training-mode BatchNorm reads, run forward as tap sums
    (``CpuConv.tap``) and backward as convolutions, but for the input gradient of a stride-1
    one, a tap sum too; the same 8 -> 8 convolutions are convolutions in the inference copy
    (their BatchNorms folded), and so are an 8 -> 8 one that a ReLU reads and an 8 -> 16 one.
    Strided, dilated, padded, with and without bias, they compute what torch computes in
    float64, within float32 rounding."""
    b = hal.SpecBuilder("narrow")
    x = b.input((1, 12, 12))
    x = b.relu(b.conv(x, 8, 3, stride=2, padding=2, dilation=2, name="stem"))
    x = b.relu(b.batch_norm(b.conv(x, 8, 3, padding=((2, 1), (0, 2)), dilation=(1, 2), bias=False, name="same"),
                            name="bn0"))
    x = b.relu(b.batch_norm(b.conv(x, 8, 3, stride=2, padding=1, bias=False, name="mid"), name="bn"))
    x = b.relu(b.conv(x, 8, 3, padding=1, name="plain"))
    x = b.conv(x, 16, 3, padding=1, name="wide")
    spec = b.build(b.dense(b.global_avg_pool(x), 3, name="fc"))
    w = hal.init_weights(spec, seed=15)
    x, y = make_batch(spec, 4, "cross_entropy", seed=15)
    jexe = hal.compile(spec, "jax:cpu", w, TrainConfig())
    texe = hal.compile(spec, "torch:cpu", w, TrainConfig(precision="fp64"))
    program = train_program(jexe, x.astype(np.float32), y).as_text()
    assert program.count("stablehlo.convolution") == 1 + 1 + 2 + 3 + 3  # stem: weight gradient (its input is
    # the model's); same: weight gradient; mid (stride 2): both gradients; plain and wide: forward and both
    infer = jexe.programs.infer.lower(jexe._variables(), x.astype(np.float32)).as_text()
    assert infer.count("stablehlo.convolution") == 4  # same and mid (BatchNorms folded), plain, wide
    for training in (False, True):
        assert rel(jexe.predict(x, training), texe.predict(x, training)) <= 1e-5
    (jl, jg), (tl, tg) = jexe.loss_and_grads(x, y), texe.loss_and_grads(x, y)
    assert abs(jl - tl) <= 1e-5 * abs(tl)
    assert weights_rel(jg, tg) <= 1e-4, tensors_error(jg, tg)


def test_cpu_convolutions_write_their_input_and_output_gradient_once() -> None:
    """On the CPU every convolution (but 1x1 and depthwise ones) materializes its input and its
    output gradient in training: one conditional each in the training program, which XLA keeps
    (it fuses across ``optimization_barrier``), none in the inference program; the function is
    the identity, bitwise, also when the first element is NaN (the other branch)."""
    import jax
    import jax.numpy as jnp

    from hal.backends.jax import _flax

    spec = tiny_bn()
    convs = sum(isinstance(n.op, hal.spec.Conv) for n in spec.nodes)
    exe = hal.compile(spec, "jax:cpu", config=TrainConfig())
    x, y = make_batch(spec, 4, "cross_entropy", seed=17)
    program = train_program(exe, x.astype(np.float32), y)
    assert program.as_text().count("stablehlo.case") == 2 * convs
    assert "conditional(" in program.compile().as_text()
    assert "stablehlo.case" not in exe.programs.infer.lower(exe._variables(), x.astype(np.float32)).as_text()
    materialize = jax.jit(_flax()["materialize"])
    for first in (1.5, np.nan):
        v = np.random.default_rng(17).standard_normal((3, 4)).astype(np.float32)
        v[0, 0] = first
        assert np.asarray(materialize(jnp.asarray(v))).tobytes() == v.tobytes()


@needs_torch
def test_pointwise_convolutions_are_matrix_products_with_torch_results() -> None:
    """On the CPU, 1x1 convolutions (strided with bias, plain without) lower to ``dot_general``
    (``PointwiseConv``), the 3x3 one stays a convolution; forward, training forward, loss and
    gradients equal torch's in float64, and so does the inference copy with a BatchNorm folded
    into a 1x1 convolution."""
    b = hal.SpecBuilder("pointwise")
    x = b.input((6, 7, 7))
    x = b.relu(b.conv(x, 8, 1, stride=2, name="down"))
    x = b.batch_norm(b.conv(x, 5, 1, bias=False, name="proj"), name="bn")
    x = b.conv(x, 4, 3, padding=1, name="c3")
    spec = b.build(b.dense(b.global_avg_pool(x), 3, name="fc"))
    cfg = TrainConfig(precision="fp64")
    w = hal.init_weights(spec, seed=14)
    x, y = make_batch(spec, 4, "cross_entropy", seed=14)
    jexe, texe = hal.compile(spec, "jax:cpu", w, cfg), hal.compile(spec, "torch:cpu", w, cfg)
    program = train_program(jexe, x, y).as_text()
    assert program.count("stablehlo.convolution") == 3  # c3: forward, input and weight gradients
    for training in (False, True):
        assert rel(jexe.predict(x, training), texe.predict(x, training)) <= EXACT
    (jl, jg), (tl, tg) = jexe.loss_and_grads(x, y), texe.loss_and_grads(x, y)
    assert abs(jl - tl) <= EXACT * abs(tl)
    assert weights_rel(jg, tg) <= EXACT, tensors_error(jg, tg)
