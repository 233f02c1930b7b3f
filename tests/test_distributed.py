"""Data-parallel training (hal.training.DataParallel, hal.distributed) on torch:cpu with gloo processes.

The truths: one device with batch B and grad_accum R (float64 autodiff) for R replicas; BatchNorm running
statistics recomputed independently under replica 0's rule; one device with grad_accum 1 for synchronised
BatchNorm; for crashes, the processes themselves (signals, /proc)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import hal
from hal import ipu
from hal.backend import Target
from hal.distributed import free_port, host_commands, launch
from hal.errors import ConfigError, InputError, UnsupportedError, WorkerError
from hal.models.small_cnn import small_cnn
from hal.parity import _dp_expected, make_batch, run_dp_parity, tensors_error, tolerance
from hal.training import SGD, AdamW, DataParallel, TrainConfig

# find_spec, not importorskip: replicas import this module for _refusing_replica, and need no torch for it
pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")

SPEC = small_cnn(input_size=8)
DP2 = DataParallel(replicas=2)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids: list[int], within_s: float = 15.0) -> bool:
    deadline = time.monotonic() + within_s
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(map(_alive, pids))


def test_dp_parity_sgd_adamw_and_sync_batchnorm() -> None:
    """2 replicas == one device with grad_accum 2 (5 SGD-momentum and 5 AdamW steps, replica-0 BatchNorm
    statistics); synchronised BatchNorm == one device with grad_accum 1."""
    report = run_dp_parity(SPEC, ["torch:cpu"], replicas=2, batch=8, steps=5, isolate=False)
    rows = {r.check: r for r in report.results}
    assert set(rows) == {"replicas/SGD", "replicas/AdamW", "replicas_sync/SGD", "replicas_sync/AdamW"}
    for r in rows.values():
        assert r.passed, (r.check, r.max_rel, r.tol, r.note)


def test_replica0_rule_is_not_the_single_device_statistics() -> None:
    """The running-statistics comparison can fail: replica 0's statistics differ from the single-device
    run's (which also saw micro-batch 1) by far more than the tolerance the parity rows use."""
    xs, ys = map(np.stack, zip(*(make_batch(SPEC, 8, "cross_entropy", i) for i in range(5))))
    w = hal.init_weights(SPEC, 0)
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9), data_parallel=DP2)
    rule = _dp_expected(SPEC, w, config, xs, ys, "fp64")["weights"]
    single = _dp_expected(SPEC, w, TrainConfig(optimizer=config.optimizer, data_parallel=DataParallel(
        2, sync_batchnorm=True), grad_accum=2), xs, ys, "fp64")["weights"]  # one device, grad_accum 2, all stats
    stats = [k for k in w if "running" in k]
    assert tensors_error({k: rule[k] for k in stats}, {k: single[k] for k in stats})[1] > 1000 * tolerance(1e-7)


def test_backend_without_data_parallelism_refuses() -> None:
    with pytest.raises(UnsupportedError, match="numpy:cpu does not do data-parallel training"):
        hal.compile(SPEC, "numpy", config=TrainConfig(data_parallel=DP2))


@pytest.mark.parametrize("bad, match", [
    (dict(replicas=0), "replicas must be an int >= 1"),
    (dict(hosts=2), "need coordinator='address:port'"),
    (dict(hosts=2, coordinator="10.0.0.1"), "coordinator must be 'address:port'"),
    (dict(hosts=2, host_rank=2, coordinator="10.0.0.1:29500"), "host_rank must be an int in \\[0, hosts=2\\)"),
])
def test_data_parallel_config_checks(bad: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DataParallel(**bad)


def test_host_commands() -> None:
    argv = ["hal", "train", "conductivity", "--hosts", "2", "--coordinator", "old:1"]
    assert host_commands(argv, 2, "10.0.0.1:29500") == [
        "hal train conductivity --hosts 2 --host-rank 0 --coordinator 10.0.0.1:29500",
        "hal train conductivity --hosts 2 --host-rank 1 --coordinator 10.0.0.1:29500",
    ]


_KILLABLE = textwrap.dedent("""
    import sys, numpy as np, hal
    from hal.models.small_cnn import small_cnn
    from hal.parity import make_batch
    from hal.training import DataParallel, TrainConfig
    spec = small_cnn(input_size=8)
    exe = hal.compile(spec, "torch:cpu", config=TrainConfig(data_parallel=DataParallel(replicas=2)))
    print(*exe.replica_pids, flush=True)
    x, y = make_batch(spec, 8, "cross_entropy")
    while True:
        exe.run_steps(np.stack([x] * 20), np.stack([y] * 20))
""")


def _start_run() -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2, proc.stderr.read()
    time.sleep(0.5)  # training now
    return proc, pids


@pytest.mark.slow  # a fresh interpreter and its replicas per run
def test_killed_replica_ends_the_run_with_its_cause_and_no_process_left() -> None:
    proc, pids = _start_run()
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)  # a hang (a replica waiting on its dead peer) fails here
    assert proc.returncode != 0
    assert "WorkerError" in err and f"replica 1 of 2 (process {pids[1]}) died (killed by SIGKILL" in err, err
    assert _gone(pids)


@pytest.mark.slow  # a fresh interpreter and its replicas per run
def test_killed_caller_takes_its_replicas_along() -> None:
    proc, pids = _start_run()
    proc.kill()
    proc.communicate()
    assert _gone(pids)


def test_one_replica_group_refuses_trains_and_dies_cleanly() -> None:
    """One launch, in order: a batch that does not divide is refused in the caller and the group survives it;
    a step trains; a replica killed mid-call ends the call within seconds naming it, no replica is left, and
    the proxy is closed."""
    exe = hal.compile(SPEC, "torch:cpu", config=TrainConfig(grad_accum=2, data_parallel=DP2))
    pids = exe.replica_pids
    x, y = make_batch(SPEC, 6, "cross_entropy")
    with pytest.raises(InputError, match="batch 6 is not divisible by replicas 2 \\* grad_accum 2"):
        exe.train_step(x, y)
    x, y = make_batch(SPEC, 8, "cross_entropy")
    assert np.isfinite(exe.train_step(x, y)) and exe.step == 1
    threading.Timer(0.5, os.kill, (pids[0], signal.SIGKILL)).start()
    with pytest.raises(WorkerError, match="replica 0 of 2 .* died \\(killed by SIGKILL"):
        exe.run_steps(np.stack([x] * 10_000), np.stack([y] * 10_000))
    assert _gone(pids)
    with pytest.raises(WorkerError, match="shut down"):
        exe.weights()


def test_training_mode_predict_with_synchronised_batchnorm_is_the_single_device_forward() -> None:
    """predict runs on replica 0 alone: with synchronised BatchNorm its training-mode forward must not wait for an
    all-reduce the other replicas never join (it hung), and equals one device's on the whole batch."""
    x, y = make_batch(SPEC, 8, "cross_entropy")
    one = hal.compile(SPEC, "torch:cpu").predict(x, training=True)
    with hal.compile(SPEC, "torch:cpu", config=TrainConfig(data_parallel=DataParallel(2, sync_batchnorm=True))) as exe:
        out: list[np.ndarray] = []
        call = threading.Thread(target=lambda: out.append(exe.predict(x, training=True)), daemon=True)
        call.start()
        call.join(60)
        assert out, "predict(training=True) did not return within 60 s"
    assert tensors_error({"y": out[0]}, {"y": one})[1] < 1e-6


def _refusing_replica(rank: int, **_: object) -> None:
    """A replica factory that fails as a backend would, with a hal error."""
    raise ConfigError(f"replica {rank} refuses")


def test_a_replicas_own_error_is_raised_as_itself() -> None:
    """A replica that raises and then exits normally is not reported as a dead process: its error wins."""
    with pytest.raises(ConfigError, match="^replica [01] refuses$") as info:
        launch(_refusing_replica, SPEC, Target("torch", "cpu"), TrainConfig(data_parallel=DP2))
    assert "raise ConfigError" in info.value.worker_traceback


class _Replicating(hal.Backend):
    """PopTorch's capabilities (replication inside the IPU graph, through a plan only); compile hands back the
    config hal.compile settled on, so that no SDK is needed."""

    name = "replicating"

    @classmethod
    def availability(cls) -> hal.Availability:
        return hal.Availability(True)

    @classmethod
    def devices(cls) -> list[str]:
        return ["ipu-model"]

    @classmethod
    def capabilities(cls) -> hal.Capabilities:
        return hal.Capabilities(precisions=("fp32",), pipelining=True, replication=True)

    @classmethod
    def compile(cls, spec, weights, device, config, options, plan):  # type: ignore[no-untyped-def]
        return config


def test_an_ipu_plan_replicates_inside_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a plan the config takes the plan's replicas (a default config, or none); a config with other
    replicas, several hosts or synchronised BatchNorm is refused; without a plan, a backend that replicates
    only through one refuses a data-parallel config, saying how to plan it."""
    from hal.registry import _registered

    monkeypatch.setitem(_registered, _Replicating.name, _Replicating)
    plan = ipu.plan(SPEC, ipus=1, micro_batch=2, replicas=2, grad_accum=2, devices=[])
    target = "replicating:ipu-model"
    assert hal.compile(SPEC, target, plan=plan).data_parallel == DP2
    config = hal.compile(SPEC, target, config=TrainConfig(grad_accum=2), plan=plan)
    assert config.data_parallel == DP2 and config.grad_accum == 2
    assert hal.compile(SPEC, target, config=TrainConfig(data_parallel=DP2), plan=plan).data_parallel == DP2
    with pytest.raises(ConfigError, match="the plan runs 2 replica\\(s\\) but .*DataParallel\\(replicas=4\\)"):
        hal.compile(SPEC, target, config=TrainConfig(data_parallel=DataParallel(replicas=4)), plan=plan)
    with pytest.raises(UnsupportedError, match="hosts=2: .*PopRun"):
        hal.compile(SPEC, target, config=TrainConfig(data_parallel=DataParallel(2, 2, coordinator="h:1")), plan=plan)
    with pytest.raises(UnsupportedError, match="per replica"):
        hal.compile(SPEC, target, config=TrainConfig(data_parallel=DataParallel(2, sync_batchnorm=True)), plan=plan)
    with pytest.raises(UnsupportedError, match="replicates inside the IPU graph.*plan=hal.ipu.plan\\(spec, replicas=2"):
        hal.compile(SPEC, target, config=TrainConfig(data_parallel=DP2))


_HOST = textwrap.dedent("""
    import sys, numpy as np, hal
    from hal.models.small_cnn import small_cnn
    from hal.parity import make_batch
    from hal.training import AdamW, DataParallel, TrainConfig
    rank, coordinator, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    spec = small_cnn(input_size=8)
    dp = DataParallel(replicas=1, hosts=2, host_rank=rank, coordinator=coordinator)
    with hal.compile(spec, "torch:cpu", config=TrainConfig(optimizer=AdamW(lr=0.01), data_parallel=dp)) as exe:
        xs, ys = map(np.stack, zip(*(make_batch(spec, 8, "cross_entropy", i) for i in range(5))))
        losses = exe.run_steps(xs[:, 4 * rank:4 * rank + 4], ys[:, 4 * rank:4 * rank + 4])  # this host's slice
        np.savez(out, losses=losses, **exe.weights())
""")


@pytest.mark.slow  # a fresh interpreter and its replicas per run
def test_two_hosts_on_loopback(tmp_path) -> None:
    """hosts=2, replicas=1: two programs, each with its host rank and its slice of the global batch, give the
    losses and weights of one device with the global batch and grad_accum 2."""
    coordinator = f"127.0.0.1:{free_port()}"
    hosts = [subprocess.Popen([sys.executable, "-c", _HOST, str(i), coordinator, str(tmp_path / f"h{i}.npz")],
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for h in hosts:
        _, err = h.communicate(timeout=120)
        assert h.returncode == 0, err
    got = [dict(np.load(tmp_path / f"h{i}.npz")) for i in range(2)]
    xs, ys = map(np.stack, zip(*(make_batch(SPEC, 8, "cross_entropy", i) for i in range(5))))
    one = hal.compile(SPEC, "torch:cpu", hal.init_weights(SPEC, 0), TrainConfig(optimizer=AdamW(lr=0.01),
                                                                                 grad_accum=2))
    losses = one.run_steps(xs, ys)
    params = {k: v for k, v in one.weights().items() if "running" not in k}
    for g in got:
        np.testing.assert_allclose(g["losses"], losses, rtol=1e-5)
        assert tensors_error({k: g[k] for k in params}, params)[1] < 1e-3  # AdamW's parity tolerance: ~8e-3
    for k in got[0]:
        np.testing.assert_array_equal(got[0][k], got[1][k])  # both hosts hold the same weights and statistics
