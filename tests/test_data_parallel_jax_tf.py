"""Data-parallel training on jax:cpu and tensorflow:cpu (hal.training.DataParallel).

Each check runs in a fresh worker process (hal.worker.run_isolated): the number of
CPU devices (JAX's ``jax_num_cpu_devices``, TensorFlow's logical devices) must be
set before the framework initialises, which ``hal.compile`` of a data-parallel
config does when it is the process's first use of the framework.

The truths, in float64 (semantic differences are >> EXACT, rounding << it):
- 2 replicas, host batch B, grad_accum 1 == one device, batch B, grad_accum 2
  (losses, gradients and parameters over 5 SGD(momentum) and 5 AdamW steps);
- running statistics follow replica 0's micro-batches only: at every step they equal
  those of a one-device, grad_accum-1 step on micro-batch 0 alone with lr 0 from that
  step's weights, chained (and are far from the two-micro-batch ones, so the check bites);
- synchronised BatchNorm == one device, batch B, grad_accum 1 (every weight and buffer).
"""

from __future__ import annotations

import numpy as np
import pytest

import hal
from hal.errors import HalError, NonFiniteError, TargetError, UnsupportedError
from hal.parity import tensors_error
from hal.registry import get_backend
from hal.training import SGD, AdamW, DataParallel, TrainConfig
from hal.worker import run_isolated

EXACT = 1e-9
STEPS, BATCH = 5, 8
OPTIMIZERS = (SGD(lr=0.1, momentum=0.9), AdamW(lr=0.01, weight_decay=0.1))
FRAMEWORKS = ("jax", "tensorflow")


def available(backend: str) -> bool:
    return get_backend(backend).availability().available


def tiny_bn() -> hal.ModelSpec:
    b = hal.SpecBuilder("tiny_bn")
    x = b.input((3, 8, 8))
    x = b.relu(b.batch_norm(b.conv(x, 4, 3, padding="same", bias=False, name="c1"), name="bn1", momentum=0.2))
    x = b.relu(b.batch_norm(b.conv(x, 6, 3, stride=2, padding="same", bias=False, name="c2"), name="bn2"))
    return b.build(b.dense(b.global_avg_pool(x), 5, name="fc"))


def batches(spec: hal.ModelSpec, steps: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((steps, BATCH, *spec.input_shape))
    return xs, rng.integers(0, spec.output_shape[0], (steps, BATCH))


def _equivalence(target: str, optimizer: SGD | AdamW, statistics: bool) -> dict[str, float]:
    """2 replicas vs one device with grad_accum 2; with ``statistics`` also the gradients and the
    replica-0 running statistics (they do not depend on the optimizer)."""
    spec = tiny_bn()
    w = hal.init_weights(spec, 0)
    xs, ys = batches(spec, STEPS)
    dp = hal.compile(spec, target, w, TrainConfig(optimizer=optimizer, precision="fp64",
                                                  data_parallel=DataParallel(replicas=2)))
    one = hal.compile(spec, target, w, TrainConfig(optimizer=optimizer, precision="fp64", grad_accum=2))
    out, params = {}, spec.trainable()
    if statistics:
        out["grads"] = tensors_error(dp.loss_and_grads(xs[0], ys[0])[1], one.loss_and_grads(xs[0], ys[0])[1])[1]
        probe = hal.compile(spec, target, w, TrainConfig(optimizer=SGD(lr=0.0), precision="fp64"))
        buffers = [k for k in w if k not in set(params)]
        expected = {k: w[k] for k in buffers}  # replica 0's running statistics, chained
        one_losses = []
        for x, y in zip(xs, ys):
            probe.load_weights({**one.weights(), **expected})  # this step's weights, replica 0's statistics so far
            probe.train_step(x[:BATCH // 2], y[:BATCH // 2])  # micro-batch 0 alone, lr 0: only the statistics move
            expected = {k: probe.weights()[k] for k in buffers}
            one_losses.append(one.train_step(x, y))
    else:
        one_losses = one.run_steps(xs, ys)
    dp_losses = dp.run_steps(xs, ys)
    got, ref = dp.weights(), one.weights()
    out["losses"] = float(np.max(np.abs(dp_losses - one_losses)) / np.max(np.abs(one_losses)))
    out["params"] = tensors_error({k: got[k] for k in params}, {k: ref[k] for k in params})[1]
    if statistics:
        out["stats_replica0"] = tensors_error({k: got[k] for k in buffers}, expected)[1]
        out["stats_vs_both_micro_batches"] = tensors_error({k: got[k] for k in buffers},
                                                           {k: ref[k] for k in buffers})[1]
    return out


def _sync(target: str) -> dict[str, float]:
    """2 replicas with synchronised BatchNorm vs one device, grad_accum 1."""
    spec = tiny_bn()
    w = hal.init_weights(spec, 0)
    xs, ys = batches(spec, STEPS, seed=2)
    opt = SGD(lr=0.1, momentum=0.9)
    dp = hal.compile(spec, target, w, TrainConfig(optimizer=opt, precision="fp64",
                                                  data_parallel=DataParallel(replicas=2, sync_batchnorm=True)))
    one = hal.compile(spec, target, w, TrainConfig(optimizer=opt, precision="fp64"))
    dp_losses, one_losses = dp.run_steps(xs, ys), one.run_steps(xs, ys)
    return {"losses": float(np.max(np.abs(dp_losses - one_losses)) / np.max(np.abs(one_losses))),
            "weights": tensors_error(dp.weights(), one.weights())[1]}


def _non_finite(target: str) -> dict[str, float]:
    """A non-finite value in replica 1's rows only: the step is skipped on every replica."""
    spec = tiny_bn()
    w = hal.init_weights(spec, 0)
    xs, ys = batches(spec, 1)
    xs[0, -1, 0, 0, 0] = np.nan
    dp = hal.compile(spec, target, w, TrainConfig(optimizer=OPTIMIZERS[0], precision="fp64",
                                                  data_parallel=DataParallel(replicas=2)))
    try:
        dp.train_step(xs[0], ys[0])
    except NonFiniteError as exc:
        return {"step": exc.step, "changed": tensors_error(dp.weights(), w)[0]}
    return {"step": -1.0, "changed": tensors_error(dp.weights(), w)[0]}


def _checks(target: str) -> dict[str, dict[str, float]]:
    """(worker) Every check of one target in one process (the framework starts once)."""
    out = {type(o).__name__: _equivalence(target, o, statistics=o is OPTIMIZERS[0]) for o in OPTIMIZERS}
    out["sync"] = _sync(target)
    out["non_finite"] = _non_finite(target)
    return out


@pytest.fixture(scope="module", params=FRAMEWORKS)
def errors(request: pytest.FixtureRequest) -> dict[str, dict[str, float]]:
    if not available(request.param):
        pytest.skip(f"{request.param} is not installed")
    return run_isolated(_checks, f"{request.param}:cpu", label=request.param)


@pytest.mark.parametrize("optimizer", [type(o).__name__ for o in OPTIMIZERS])
def test_two_replicas_equal_one_device_with_grad_accum_two(errors: dict, optimizer: str) -> None:
    err = errors[optimizer]
    assert err["losses"] < EXACT and err["params"] < EXACT and err.get("grads", 0.0) < EXACT, err


def test_running_statistics_are_replica_0s(errors: dict) -> None:
    err = errors[type(OPTIMIZERS[0]).__name__]
    assert err["stats_replica0"] < EXACT, err
    assert err["stats_vs_both_micro_batches"] > 1e-3, err  # the rule is visible: the check can fail


def test_sync_batchnorm_equals_one_device(errors: dict) -> None:
    assert errors["sync"]["losses"] < EXACT and errors["sync"]["weights"] < EXACT, errors["sync"]


def test_a_non_finite_step_is_skipped_on_every_replica(errors: dict) -> None:
    assert errors["non_finite"] == {"step": 0, "changed": 0.0}


def _started_too_early() -> dict[str, str]:
    """(worker) Both frameworks start with one CPU device, then a data-parallel compile."""
    import jax

    from hal.backends.tensorflow import _tf

    jax.devices()
    _tf().config.list_logical_devices()  # starts TensorFlow's runtime
    spec, out = tiny_bn(), {}
    for config in (TrainConfig(data_parallel=DataParallel(replicas=2)),
                   TrainConfig(grad_accum=2, data_parallel=DataParallel(replicas=2, sync_batchnorm=True))):
        for target in ("jax:cpu", "tensorflow:cpu"):
            try:
                hal.compile(spec, target, config=config)
            except (TargetError, UnsupportedError) as exc:
                out[f"{target} sync={config.data_parallel.sync_batchnorm}"] = f"{type(exc).__name__}: {exc}"
    return out


def test_too_few_devices_and_unsupported_configs_are_refused_with_the_fix() -> None:
    if not (available("jax") and available("tensorflow")):
        pytest.skip("needs jax and tensorflow")
    out = run_isolated(_started_too_early)
    assert len(out) == 4, out  # jax has sync BatchNorm with grad_accum 2, but not the devices either
    assert "TargetError" in out["jax:cpu sync=False"] and "--xla_force_host_platform_device_count=2" in out[
        "jax:cpu sync=False"]
    assert "TargetError" in out["tensorflow:cpu sync=False"] and "TensorFlow has 1" in out["tensorflow:cpu sync=False"]
    assert "UnsupportedError" in out["tensorflow:cpu sync=True"] and "grad_accum 2" in out["tensorflow:cpu sync=True"]


def _host(target: str, rank: int, coordinator: str, replicas: int, tf_ports: tuple[int, ...] = ()) -> tuple:
    """(worker) Host ``rank`` of 2 on loopback: its half of each global batch, 3 steps (TF_CONFIG for TensorFlow)."""
    if tf_ports:
        import json
        import os

        os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in tf_ports]},
                                              "task": {"type": "worker", "index": rank}})
    spec = tiny_bn()
    xs, ys = batches(spec, 3)
    dp = DataParallel(replicas=replicas, hosts=2, host_rank=rank, coordinator=coordinator)
    exe = hal.compile(spec, target, hal.init_weights(spec, 0),
                      TrainConfig(optimizer=OPTIMIZERS[0], precision="fp64", data_parallel=dp))
    rows = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    return exe.run_steps(xs[:, rows], ys[:, rows]), exe.weights()


def _one_device(target: str, grad_accum: int) -> tuple:
    spec = tiny_bn()
    xs, ys = batches(spec, 3)
    exe = hal.compile(spec, target, hal.init_weights(spec, 0),
                      TrainConfig(optimizer=OPTIMIZERS[0], precision="fp64", grad_accum=grad_accum))
    return exe.run_steps(xs, ys), exe.weights()


@pytest.mark.slow
@pytest.mark.parametrize("framework, replicas", [("jax", 2), ("tensorflow", 1)])  # TF: one CPU per worker
def test_two_hosts_on_loopback_equal_one_device(framework: str, replicas: int) -> None:
    """Two processes as two hosts (jax.distributed; MultiWorkerMirroredStrategy with TF_CONFIG) each get their
    half of every batch: both end where one device with grad_accum 2 * replicas does."""
    import threading

    from hal.distributed import free_port

    if not available(framework):
        pytest.skip(f"{framework} is not installed")
    ports = (free_port(), free_port())
    target, results, errors = f"{framework}:cpu", {}, []

    def run(rank: int) -> None:
        try:
            results[rank] = run_isolated(_host, target, rank, f"127.0.0.1:{ports[0]}", replicas,
                                         ports if framework == "tensorflow" else (), label=f"host {rank}")
        except HalError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ref_losses, ref = run_isolated(_one_device, target, 2 * replicas)
    params = tiny_bn().trainable()
    for losses, weights in results.values():
        assert np.max(np.abs(losses - ref_losses)) < EXACT
        assert tensors_error({k: weights[k] for k in params}, {k: ref[k] for k in params})[1] < EXACT
