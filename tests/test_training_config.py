"""Training config: validation and LR schedules against torch.optim.lr_scheduler."""

from __future__ import annotations

import math
import warnings

import pytest

from hal.errors import ConfigError
from hal.training import SGD, Adam, AdamW, Constant, Cosine, StepDecay, TrainConfig


@pytest.mark.parametrize(
    "make",
    [
        lambda: SGD(lr=-0.1),
        lambda: SGD(lr=float("nan")),
        lambda: SGD(lr="0.1"),
        lambda: SGD(lr=None),
        lambda: SGD(momentum=-0.9),
        lambda: SGD(weight_decay=-1e-4),
        lambda: SGD(nesterov=True),
        lambda: SGD(nesterov=True, momentum=0.0),
        lambda: Adam(lr=-1e-3),
        lambda: Adam(eps=-1e-8),
        lambda: Adam(betas=(0.9,)),
        lambda: Adam(betas=(1.0, 0.999)),
        lambda: Adam(betas=(0.9, -0.1)),
        lambda: AdamW(weight_decay=-0.01),
        lambda: StepDecay(0),
        lambda: StepDecay(-3),
        lambda: Cosine(total_steps=0),
        lambda: Cosine(total_steps=10, warmup_steps=10),
        lambda: Cosine(total_steps=10, warmup_steps=-1),
        lambda: TrainConfig(loss="hinge"),
        lambda: TrainConfig(loss=None),
        lambda: TrainConfig(precision="fp8"),
        lambda: TrainConfig(grad_accum=0),
        lambda: TrainConfig(grad_accum=-2),
        lambda: TrainConfig(grad_accum=2.0),
        lambda: TrainConfig(grad_accum="2"),
        lambda: TrainConfig(optimizer="sgd"),
        lambda: TrainConfig(optimizer=None),
    ],
)
def test_invalid_values_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: SGD(lr=float("inf")),
        lambda: Adam(betas="ab"),
        lambda: Adam(betas=None),
        lambda: Adam(betas=(0.9, "0.999")),
        lambda: StepDecay("3"),
        lambda: StepDecay(2.5),
        lambda: StepDecay(None),
        lambda: Cosine("10"),
        lambda: Cosine(10, warmup_steps=None),
        lambda: TrainConfig(schedule=None),
        lambda: TrainConfig(schedule="cosine"),
        lambda: TrainConfig(schedule=Cosine),  # the class, not an instance
    ],
    ids=["lr-inf", "betas-str", "betas-none", "beta-str", "step-str", "step-float", "step-none",
         "total-str", "warmup-none", "schedule-none", "schedule-str", "schedule-class"],
)
def test_wrong_types_raise_config_error(make):
    """Wrong types must be ConfigError at construction, not a TypeError there or an
    AttributeError at the first training step."""
    try:
        make()
    except ConfigError:
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{type(exc).__name__} instead of ConfigError: {exc}")
    pytest.fail("accepted")


def test_valid_configs():
    cfg = TrainConfig(loss="mse", optimizer=AdamW(lr=1e-3), schedule=Cosine(100, 10), grad_accum=4, precision="bf16")
    assert cfg.grad_accum == 4 and cfg.optimizer.weight_decay == 1e-2
    assert TrainConfig().optimizer == SGD() and isinstance(TrainConfig().schedule, Constant)
    SGD(lr=0.0, momentum=0.9, nesterov=True)
    Adam(betas=(0.0, 0.0), eps=0.0)


def test_constant_schedule():
    cfg = TrainConfig(optimizer=SGD(lr=0.3))
    assert [cfg.lr(t) for t in range(5)] == [0.3] * 5


def _torch_lrs(torch, scheduler_factory, base_lr: float, steps: int) -> list[float]:
    """LR used by optimizer step t = 0..steps-1, with scheduler.step() after each optimizer step."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = scheduler_factory(opt)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


@pytest.mark.parametrize("step_size,gamma", [(1, 0.5), (3, 0.1), (7, 0.9)])
def test_step_decay_matches_torch_step_lr(step_size, gamma):
    torch = pytest.importorskip("torch")
    cfg = TrainConfig(optimizer=SGD(lr=0.2), schedule=StepDecay(step_size, gamma))
    want = _torch_lrs(torch, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size, gamma), 0.2, 25)
    assert [cfg.lr(t) for t in range(25)] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("total,min_factor", [(10, 0.0), (37, 0.05)])
def test_cosine_without_warmup_matches_cosine_annealing(total, min_factor):
    torch = pytest.importorskip("torch")
    base = 0.4
    cfg = TrainConfig(optimizer=SGD(lr=base), schedule=Cosine(total, min_factor=min_factor))
    want = _torch_lrs(
        torch, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=base * min_factor), base, total + 1
    )
    assert [cfg.lr(t) for t in range(total + 1)] == pytest.approx(want, rel=1e-9, abs=1e-12)
    # hal stays at the floor after total_steps (torch's CosineAnnealingLR would climb again)
    assert cfg.lr(total + 5) == pytest.approx(base * min_factor, abs=1e-15)


def _hand_cosine(t, total, warm, start, floor):
    if t < warm:
        return start + (1 - start) * t / warm
    t = min(t, total)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))


@pytest.mark.parametrize("total,warm,start,floor", [(20, 5, 0.0, 0.0), (50, 1, 0.1, 0.01), (12, 11, 0.5, 0.2)])
def test_cosine_with_warmup_hand_formula(total, warm, start, floor):
    s = Cosine(total, warm, start, floor)
    for t in range(total + 10):
        assert s.factor(t) == pytest.approx(_hand_cosine(t, total, warm, start, floor), rel=1e-12, abs=1e-15)
    assert s.factor(0) == pytest.approx(start)
    assert s.factor(warm) == pytest.approx(1.0)  # the peak sits right after the warm-up
    assert s.factor(total) == pytest.approx(floor)


@pytest.mark.parametrize("total,warm,start,floor", [(20, 5, 0.1, 0.0), (30, 3, 0.25, 0.1)])
def test_cosine_with_warmup_matches_torch_linear_then_cosine(total, warm, start, floor):
    torch = pytest.importorskip("torch")
    base = 0.1
    sched = torch.optim.lr_scheduler

    def factory(o):
        return sched.SequentialLR(
            o,
            [sched.LinearLR(o, start_factor=start, end_factor=1.0, total_iters=warm),
             sched.CosineAnnealingLR(o, T_max=total - warm, eta_min=base * floor)],
            milestones=[warm],
        )

    want = _torch_lrs(torch, factory, base, total + 1)
    cfg = TrainConfig(optimizer=SGD(lr=base), schedule=Cosine(total, warm, start, floor))
    assert [cfg.lr(t) for t in range(total + 1)] == pytest.approx(want, rel=1e-9, abs=1e-12)
    # and LambdaLR driven by the hand formula
    want2 = _torch_lrs(
        torch, lambda o: sched.LambdaLR(o, lambda t: _hand_cosine(t, total, warm, start, floor)), base, total + 5
    )
    assert [cfg.lr(t) for t in range(total + 5)] == pytest.approx(want2, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("schedule", [Constant(), StepDecay(2, 0.5), Cosine(10, 2)])
@pytest.mark.parametrize("step", [-1, 1.0, "3", None, True, [1]])
def test_schedule_steps_must_be_ints(schedule, step):
    with pytest.raises(ConfigError, match="step must be an int >= 0"):
        schedule.factor(step)
    with pytest.raises(ConfigError, match="step must be an int >= 0"):
        TrainConfig(schedule=schedule).lr(step)


def test_step_decay_overflow_is_a_config_error():
    with pytest.raises(ConfigError, match="overflows at step"):
        StepDecay(1, gamma=10.0).factor(10**6)


@pytest.mark.parametrize("field,value", [("loss", ["mse"]), ("precision", {"fp32"}), ("loss", None)])
def test_config_strings_must_be_strings(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("value", [1, "yes", None])
def test_sgd_nesterov_must_be_a_bool(value):
    with pytest.raises(ConfigError, match="nesterov must be a bool"):
        SGD(momentum=0.9, nesterov=value)
