"""Mixed precision (bf16, fp16): hal.lowering's canonical rules, the measured floors, loss scaling."""

from __future__ import annotations

import numpy as np
import pytest

from hal.errors import NonFiniteError
from hal.lowering import LOSS_SCALE, next_loss_scale, round_to
from hal.models.small_cnn import small_cnn
from hal.parity import make_batch, mixed_forward
from hal.registry import compile
from hal.spec import SpecBuilder
from hal.training import SGD, Adam, StepDecay, TrainConfig
from hal.weights import init_weights


def test_round_to_bfloat16_is_ml_dtypes_rounding() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(50_000) * 1e3, rng.standard_normal(50_000) * 1e-30,
                        [np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38]]).astype(np.float32)
    np.testing.assert_array_equal(round_to(x, "bfloat16"), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    with np.errstate(over="ignore"):  # 3.4e38 overflows float16 to inf, as it should
        half = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(round_to(x, "float16"), half)


def test_mixed_forward_rounds_where_the_rules_say() -> None:
    """A Dense layer in bf16: input, weight and bias rounded, exact product, output rounded (ml_dtypes' bf16)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    b = SpecBuilder("dense")
    b.dense(b.input((6,)), 5, name="fc")
    spec = b.build()
    w = init_weights(spec, 0)
    x = make_batch(spec, 3, "mse")[0]

    def bf(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)

    want = bf(bf(x) @ bf(w["fc.weight"]).T + bf(w["fc.bias"])).astype(np.float32)
    np.testing.assert_array_equal(mixed_forward(spec, w, x, False, "bf16"), want)


def test_next_loss_scale_is_torch_grad_scaler_update() -> None:
    """hal's rule against torch's own kernel (``torch._amp_update_scale_``), interval shortened to 3."""
    torch = pytest.importorskip("torch")
    rule = type(LOSS_SCALE)(interval=3)
    scale, tracker = torch.tensor([LOSS_SCALE.init]), torch.tensor([0], dtype=torch.int32)
    ours = (LOSS_SCALE.init, 0)
    for found in [0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]:
        torch._amp_update_scale_(scale, tracker, torch.tensor([float(found)]), rule.growth, rule.backoff, rule.interval)
        ours = next_loss_scale(*ours, bool(found), rule)
        assert ours == (scale.item(), tracker.item())


def test_loss_scale_constants_are_grad_scaler_defaults() -> None:
    torch = pytest.importorskip("torch")
    s = torch.amp.GradScaler("cpu")
    assert (s.get_scale(), s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval()) == (
        LOSS_SCALE.init, LOSS_SCALE.growth, LOSS_SCALE.backoff, LOSS_SCALE.interval)


FP16_TARGETS = ["torch:cpu", "jax:cpu", "tensorflow:cpu"]


def _loss_scale(exe: object) -> float:
    scaler = getattr(exe, "scaler", None)  # torch: its GradScaler
    return float(scaler.get_scale()) if scaler is not None else exe.loss_scale  # type: ignore[attr-defined]


def _fp16(target: str, config: TrainConfig) -> tuple[object, np.ndarray]:
    pytest.importorskip(target.split(":")[0])
    spec = small_cnn(input_size=8)
    return compile(spec, target, init_weights(spec, 0), config), make_batch(spec, 4, "mse")[0]


OVERFLOW = np.full((4, 10), 1e4, np.float32)  # MSE ~1e8: finite in fp32, its gradient times 2**16 overflows fp16


@pytest.mark.parametrize("target", FP16_TARGETS)
def test_fp16_skips_an_overflowing_step_halves_the_scale_and_advances_the_schedule_only(target: str) -> None:
    """GradScaler's rule: the overflowing step 0 changes no weight and raises no NonFiniteError, the scale
    halves. As torch, whose ``scheduler.step()`` runs every iteration and Adam's ``state["step"]`` only when
    GradScaler steps, the clean step 1 uses lr(1) = lr/2 (StepDecay) at Adam's t = 1, where every element's
    update is ``lr_t * g / (|g| + eps)``: |dw| = lr/2 (t = 2 would give 0.37 lr, an unadvanced schedule lr)."""
    lr = 1e-3
    config = TrainConfig(loss="mse", optimizer=Adam(lr=lr), schedule=StepDecay(step_size=1, gamma=0.5),
                         precision="fp16")
    exe, x = _fp16(target, config)
    trainable = exe.spec.trainable()
    before = exe.weights()
    assert _loss_scale(exe) == LOSS_SCALE.init
    assert np.isfinite(exe.train_step(x, OVERFLOW))
    assert _loss_scale(exe) == LOSS_SCALE.init * LOSS_SCALE.backoff
    assert exe.step == 1
    skipped = exe.weights()
    assert all(np.array_equal(before[k], skipped[k]) for k in trainable)
    exe.train_step(x, np.zeros((4, 10), np.float32))
    after = exe.weights()
    dw = np.concatenate([np.abs(after[k] - skipped[k]).ravel() for k in trainable]) / lr
    assert dw.max() <= 0.5 * (1 + 1e-3)
    assert np.median(dw) == pytest.approx(0.5, rel=1e-3)
    assert _loss_scale(exe) == LOSS_SCALE.init * LOSS_SCALE.backoff


@pytest.mark.parametrize("target", [
    "torch:cpu", pytest.param("jax:cpu", marks=pytest.mark.slow), pytest.param("tensorflow:cpu", marks=pytest.mark.slow),
])
def test_fp16_check_finite_fails_a_non_finite_loss_and_keeps_the_scale(target: str) -> None:
    """Under fp16 ``check_finite`` raises for a non-finite *loss* (as torch's backend returns before
    ``scaler.update``): nothing changes, the scale included."""
    exe, x = _fp16(target, TrainConfig(loss="mse", optimizer=SGD(lr=1e-3), precision="fp16"))
    before = exe.weights()
    with pytest.raises(NonFiniteError):
        exe.train_step(x, np.full((4, 10), np.nan, np.float32))
    assert _loss_scale(exe) == LOSS_SCALE.init and exe.step == 0
    assert all(np.array_equal(before[k], v) for k, v in exe.weights().items())


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_in_program_loss_scale_update_is_next_loss_scale(backend: str) -> None:
    """The jax and tensorflow in-program updates against hal.lowering.next_loss_scale (itself checked
    against torch's kernel above), interval shortened to 3."""
    pytest.importorskip(backend)
    rule = type(LOSS_SCALE)(interval=3)
    ours = (LOSS_SCALE.init, 0)
    if backend == "jax":
        from hal.backends.jax import initial_loss_scale, update_loss_scale

        state = initial_loss_scale()
        step = lambda found: update_loss_scale(state, np.bool_(found), rule)  # noqa: E731
    else:
        from hal.backends.tensorflow import update_loss_scale

        state = (np.float32(LOSS_SCALE.init), np.int32(0))
        step = lambda found: update_loss_scale(*state[:2], np.bool_(found), rule)  # noqa: E731
    for found in [0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]:
        state = step(found)
        ours = next_loss_scale(*ours, bool(found), rule)
        assert ours == (float(state[0]), int(state[1]))


@pytest.mark.parametrize("target", ["torch:cpu"])
def test_mixed_precision_conformance(target: str) -> None:
    """The precision/ cases (bf16 everywhere, fp16 where supported) against floors measured in that precision
    (tests/test_conformance.py runs them on every target)."""
    pytest.importorskip(target.split(":")[0])
    from hal.testing.conformance import FAIL, PASS, run_conformance

    report = run_conformance(target, include=r"^precision/(bf16|fp16)_")
    assert report.passed and not [r for r in report.rows if r.status == FAIL], report.table()
    assert any(r.name == "precision/bf16_forward" and r.status == PASS for r in report.rows)
