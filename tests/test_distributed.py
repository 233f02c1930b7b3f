"""Data-parallel training (hal.training.DataParallel, hal.distributed) on torch:cpu with gloo processes.

The truths: one device with batch B and grad_accum R (float64 autodiff) for R replicas; BatchNorm running
statistics recomputed independently under replica 0's rule; one device with grad_accum 1 for synchronised
BatchNorm; for crashes, the processes themselves (signals, /proc)."""

from __future__ import annotations

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
from hal.distributed import free_port, host_commands
from hal.errors import ConfigError, InputError, UnsupportedError, WorkerError
from hal.models.small_cnn import small_cnn
from hal.parity import _dp_expected, make_batch, run_dp_parity, tensors_error, tolerance
from hal.training import SGD, AdamW, DataParallel, TrainConfig

pytest.importorskip("torch")

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


def test_batch_must_divide_replicas_times_grad_accum() -> None:
    with hal.compile(SPEC, "torch:cpu", config=TrainConfig(grad_accum=2, data_parallel=DP2)) as exe:
        x, y = make_batch(SPEC, 6, "cross_entropy")
        with pytest.raises(InputError, match="batch 6 is not divisible by replicas 2 \\* grad_accum 2"):
            exe.train_step(x, y)
        x, y = make_batch(SPEC, 8, "cross_entropy")
        assert np.isfinite(exe.train_step(x, y)) and exe.step == 1  # the group survives a refused batch
        pids = exe.replica_pids
    assert _gone(pids)


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


def test_killed_replica_in_process_raises_and_closes() -> None:
    exe = hal.compile(SPEC, "torch:cpu", config=TrainConfig(data_parallel=DP2))
    x, y = make_batch(SPEC, 8, "cross_entropy")
    pids = exe.replica_pids
    threading.Timer(0.5, os.kill, (pids[0], signal.SIGKILL)).start()
    with pytest.raises(WorkerError, match="replica 0 of 2 .* died \\(killed by SIGKILL"):
        exe.run_steps(np.stack([x] * 10_000), np.stack([y] * 10_000))
    assert _gone(pids)
    with pytest.raises(WorkerError, match="shut down"):
        exe.weights()


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
