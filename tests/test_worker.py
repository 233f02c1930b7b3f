"""hal.worker: a function in a fresh process; its errors and its death come back as hal errors."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import hal
from hal.backends.numpy import NumpyBackend
from hal.errors import ConfigError, HalError, NonFiniteError, WorkerError
from hal.worker import run_inline, run_isolated


def scaled(x: np.ndarray, factor: float) -> tuple[np.ndarray, int]:
    return x * factor, os.getpid()


def raise_nonfinite() -> None:
    raise NonFiniteError("step 3: the loss is nan; the step was not applied", step=3)


def raise_runtime() -> None:
    raise RuntimeError("boom")


def die(how: str) -> None:
    if how == "abort":
        os.abort()  # ABORT_LINE
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


ABORT_LINE = next(i for i, line in enumerate(open(__file__), 1) if line.strip() == "os.abort()  # ABORT_LINE")


def backend_class_name(name: str) -> str:
    from hal.registry import get_backend

    return get_backend(name).__qualname__


def talk_then_hang(progress) -> None:  # type: ignore[no-untyped-def]
    progress(str(os.getpid()))
    time.sleep(120)


class HandRegistered(NumpyBackend):
    name = "hand_registered"


def test_result_comes_back_from_another_process():
    x = np.arange(4.0)
    y, pid = run_isolated(scaled, x, factor=2.0)
    np.testing.assert_array_equal(y, [0.0, 2.0, 4.0, 6.0])
    assert pid != os.getpid()


def test_a_hal_error_comes_back_as_itself_with_its_attributes_and_the_worker_traceback():
    with pytest.raises(NonFiniteError) as info:
        run_isolated(raise_nonfinite, label="torch:cpu")
    assert str(info.value) == "step 3: the loss is nan; the step was not applied" and info.value.step == 3
    assert "raise_nonfinite" in info.value.worker_traceback


@pytest.mark.parametrize("run", [run_isolated, run_inline])
def test_any_other_exception_becomes_a_hal_error_naming_its_type(run):
    with pytest.raises(HalError) as info:
        run(raise_runtime, label="plug:cpu")
    assert type(info.value) is HalError and str(info.value) == "plug:cpu: RuntimeError: boom"
    assert "raise_runtime" in info.value.worker_traceback


@pytest.mark.parametrize(
    "how, reason",
    [("abort", "killed by SIGABRT"), ("sigkill", "killed by SIGKILL, e.g. by the out-of-memory killer"),
     ("exit", "exit status 3")],
)
def test_a_dead_worker_is_a_worker_error_naming_the_signal_and_the_target(how, reason):
    with pytest.raises(WorkerError) as info:
        run_isolated(die, how, label="crashy:cpu")
    assert str(info.value).startswith(f"crashy:cpu: the worker process died ({reason})")
    if how == "abort":  # faulthandler's report names the crash and its frame; the whole stderr tail is kept
        assert str(info.value).endswith(f"Fatal Python error: Aborted, in File \"{__file__}\", line {ABORT_LINE} in die")
        assert "Current thread" in info.value.worker_stderr


def test_hand_registered_backends_exist_in_the_worker():
    hal.register_backend("hand_registered", HandRegistered)
    assert run_isolated(backend_class_name, "hand_registered") == "HandRegistered"


def test_progress_is_relayed_and_an_interrupted_parent_leaves_no_worker():
    pids: list[int] = []

    def progress(message: str) -> None:
        pids.append(int(message))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_isolated(talk_then_hang, progress=progress)
    (pid,) = pids
    assert pid != os.getpid()
    with pytest.raises(ProcessLookupError):  # terminated and reaped, not orphaned
        os.kill(pid, 0)


def test_a_function_that_cannot_reach_a_worker_is_a_worker_error():
    with pytest.raises(WorkerError, match="could not start a worker process"):
        run_isolated(lambda: 1, label="x")


def test_inline_keeps_hal_errors_as_they_are():
    def bad() -> None:
        raise ConfigError("steps must be >= 1")

    with pytest.raises(ConfigError, match="^steps must be >= 1$"):
        run_inline(bad, label="numpy")
