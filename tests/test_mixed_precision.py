"""Mixed precision (bf16, fp16): hal.lowering's canonical rules, the measured floors, loss scaling, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from hal.errors import UnsupportedError
from hal.lowering import LOSS_SCALE, next_loss_scale, round_to
from hal.models.small_cnn import small_cnn
from hal.parity import make_batch, mixed_forward
from hal.registry import compile
from hal.spec import SpecBuilder
from hal.training import SGD, TrainConfig
from hal.weights import init_weights


def test_round_to_bfloat16_is_ml_dtypes_rounding() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(50_000) * 1e3, rng.standard_normal(50_000) * 1e-30,
                        [np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38]]).astype(np.float32)
    np.testing.assert_array_equal(round_to(x, "bfloat16"), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(round_to(x, "float16"), x.astype(np.float16).astype(np.float32))


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


def test_torch_cpu_fp16_skips_an_overflowing_step_and_halves_the_scale() -> None:
    """Targets of 1e4 under MSE: the loss (~1e8) is finite in fp32, its gradient times 2**16 overflows fp16. The
    step is skipped (weights as before, no NonFiniteError), the scale halves; the next clean step applies."""
    pytest.importorskip("torch")
    spec = small_cnn(input_size=8)
    w = init_weights(spec, 0)
    x, _ = make_batch(spec, 4, "mse")
    exe = compile(spec, "torch:cpu", w, TrainConfig(loss="mse", optimizer=SGD(lr=1e-3), precision="fp16"))
    before = exe.weights()
    loss = exe.train_step(x, np.full((4, 10), 1e4, np.float32))
    assert np.isfinite(loss)
    assert exe.scaler.get_scale() == LOSS_SCALE.init * LOSS_SCALE.backoff
    after = exe.weights()
    trainable = set(spec.trainable())
    assert all(np.array_equal(before[k], after[k]) for k in trainable)
    exe.train_step(x, np.zeros((4, 10), np.float32))
    assert any(not np.array_equal(after[k], v) for k, v in exe.weights().items() if k in trainable)


@pytest.mark.parametrize("target", ["jax:cpu", "tensorflow:cpu"])
def test_fp16_without_loss_scaling_is_refused_with_the_reason(target: str) -> None:
    pytest.importorskip(target.split(":")[0])
    spec = small_cnn(input_size=8)
    with pytest.raises(UnsupportedError, match="loss scaling"):
        compile(spec, target, init_weights(spec, 0), TrainConfig(precision="fp16"))


@pytest.mark.parametrize("target", [
    "torch:cpu", pytest.param("tensorflow:cpu", marks=pytest.mark.slow), pytest.param("jax:cpu", marks=pytest.mark.slow),
])
def test_mixed_precision_conformance(target: str) -> None:
    """The precision/ cases (bf16 everywhere, fp16 where supported) against floors measured in that precision."""
    pytest.importorskip(target.split(":")[0])
    from hal.testing.conformance import FAIL, PASS, run_conformance

    report = run_conformance(target, include=r"^precision/(bf16|fp16)_")
    assert report.passed and not [r for r in report.rows if r.status == FAIL], report.table()
    assert any(r.name == "precision/bf16_forward" and r.status == PASS for r in report.rows)
