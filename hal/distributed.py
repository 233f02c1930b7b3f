"""Data-parallel training with one process per replica: the launcher and the caller's proxy.

An engine that runs each replica in its own process (torch's
``DistributedDataParallel``) builds its data-parallel executable with
:func:`launch`. The executable the caller holds is a :class:`DataParallelExecutable`,
a proxy: it starts this host's ``replicas`` processes, hands replica ``r`` rows
``[r*b, (r+1)*b)`` of each host batch (``b = batch / replicas``, the rule in
:mod:`hal.training`) and returns replica 0's results (losses are reduced over
all replicas by the engine, so every replica holds the same ones). The engine
does the collectives; nothing here reduces a tensor.

Replicas are :mod:`hal.worker` processes (:func:`hal.worker.spawn`: spawned, not
forked, the parent's ``sys.path``, Python's faulthandler on), and their failures
read the same way:

* a replica that dies (signal, out-of-memory kill, ``os._exit``) or raises ends
  the call within seconds with a :class:`~hal.errors.WorkerError` naming the
  replica, its process and the cause (a replica's own hal error is raised as
  itself); the other replicas, which may be blocked in a collective, are killed
  at once, and the proxy is closed (later calls raise :class:`WorkerError`);
* :meth:`DataParallelExecutable.close` (also on garbage collection and at
  interpreter exit) ends the replicas; a replica also exits when its parent
  dies, since the parent holds the only write end of its lifeline pipe.

Local runs pick a free loopback port for the engine's rendezvous
(:func:`free_port`). Multi-host runs use ``DataParallel.coordinator`` (host 0's
address and a port open between the hosts) and the same program on every host
with its own ``host_rank``; :func:`host_commands` writes those command lines.
"""

from __future__ import annotations

import os
import pickle
import shlex
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import IO, Any, Callable, NoReturn, Sequence

import numpy as np

from hal.backend import Executable, Target, Weights
from hal.errors import ConfigError, WorkerError
from hal.spec import ModelSpec
from hal.training import TrainConfig
from hal.worker import ErrorPayload, become_worker, death_error, error_from_payload, error_payload, exit_worker, \
    portable_registry, spawn

Factory = Callable[..., Executable]
_DEATH_WAIT_S = 2.0  # how long a failure waits for a replica's death to show, to name the replica that died


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS's pick), for a local rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def host_commands(argv: Sequence[str], hosts: int, coordinator: str) -> list[str]:
    """The shell command to run on each of ``hosts`` hosts for the command ``argv`` (a ``hal`` command line
    with ``--hosts``): the same line with ``--host-rank i --coordinator ADDRESS:PORT`` for host ``i``."""
    base, skip = [], False
    for a in argv:  # drop any rank or coordinator already given
        if skip:
            skip = False
        elif a in ("--host-rank", "--coordinator"):
            skip = True
        elif not a.startswith(("--host-rank=", "--coordinator=")):
            base.append(a)
    return [shlex.join([*base, "--host-rank", str(i), "--coordinator", coordinator]) for i in range(hosts)]


@dataclass
class _Replica:
    rank: int  # global replica index
    proc: subprocess.Popen
    requests: Connection
    results: Connection
    lifeline: int  # write end of the pipe whose closing tells the replica to exit
    stderr: IO[bytes]


class ReplicaGroup:
    """This host's replica processes, each serving one executable built by ``factory``.

    ``factory(rank=, local_rank=, world=, coordinator=(address, port), **kwargs)`` runs in
    each new process and must be a module-level function (it is pickled by name)."""

    def __init__(self, factory: Factory, kwargs: dict[str, Any], config: TrainConfig, label: str) -> None:
        dp = config.data_parallel
        self.label = label
        self.world = dp.world
        coordinator = dp.coordinator_address() if dp.coordinator else ("127.0.0.1", free_port())
        self._replicas: list[_Replica] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_all, self._replicas)
        env: dict[str, str] = {}
        if "OMP_NUM_THREADS" not in os.environ:  # the replicas share this host's cores
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // dp.replicas))
        registry = portable_registry()
        try:
            for local in range(dp.replicas):
                rank = dp.host_rank * dp.replicas + local
                request = pickle.dumps((registry, factory, dict(
                    kwargs, rank=rank, local_rank=local, world=dp.world, coordinator=coordinator)))
                self._replicas.append(self._start(rank, env))
                self._replicas[-1].requests.send_bytes(request)
            self._collect(range(dp.replicas))  # every replica built and joined the process group
        except BaseException:
            self.close()
            raise

    def _start(self, rank: int, env: dict[str, str]) -> _Replica:
        req_r, req_w, res_r, res_w, life_r, life_w = *os.pipe(), *os.pipe(), *os.pipe()  # requests, results, lifeline
        err = tempfile.TemporaryFile(prefix=f"hal-replica{rank}-", suffix=".stderr")
        try:
            proc = spawn(f"from hal.distributed import _serve_replica; _serve_replica({req_r}, {res_w}, {life_r})",
                         (req_r, res_w, life_r), err, f"{self.label}: could not start replica {rank}", env)
        except WorkerError:
            for fd in (req_w, res_r, life_w):
                os.close(fd)
            err.close()
            raise
        return _Replica(rank, proc, Connection(req_w, readable=False), Connection(res_r, writable=False), life_w, err)

    @property
    def pids(self) -> list[int]:
        """Process ids of this host's replicas, local replica 0 first."""
        return [r.proc.pid for r in self._replicas]

    def call(self, method: str, args: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``method(*args[i])`` on local replica ``i`` for each ``args[i]`` given (a prefix of the
        replicas); returns their results. Any failure closes the group and raises."""
        if self._closed:
            raise WorkerError(f"{self.label}: the replica processes were shut down (after an error, or close())")
        for rep, a in zip(self._replicas, args):
            try:
                rep.requests.send((method, a))
            except (BrokenPipeError, OSError):  # it died since the last call: _collect says how
                break
        return self._collect(range(len(args)))

    def _collect(self, local: Sequence[int]) -> list[Any]:
        """The answers of ``local`` replicas, watching every replica for death meanwhile."""
        pending = {self._replicas[i].results: i for i in local}
        answers: dict[int, Any] = {}
        watched = [r.results for r in self._replicas]
        while pending:
            for conn in wait(watched):
                i = next(k for k, r in enumerate(self._replicas) if r.results is conn)
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):  # the process is gone
                    self._fail(i, None)
                if kind == "error" or conn not in pending:
                    self._fail(i, payload if kind == "error" else None)
                answers[pending.pop(conn)] = payload
        return [answers[i] for i in local]

    def _fail(self, local: int, error: ErrorPayload | None) -> NoReturn:
        """Stop every replica and raise: the replica that died (preferred: a peer's error is often
        only the engine noticing the death) or else the error a replica sent."""
        deadline = time.monotonic() + _DEATH_WAIT_S
        dead = None
        while dead is None and time.monotonic() < deadline:  # a replica that sent its error exits with status 0
            dead = next((r for r in self._replicas if r.proc.poll() not in (None, 0)), None)
            if dead is None:
                time.sleep(0.02)
        rep = dead or self._replicas[local]
        if error is None:
            try:
                rep.proc.wait(_DEATH_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        rep.stderr.seek(0)
        stderr = rep.stderr.read().decode(errors="replace")
        self.close(kill=True)
        if dead is not None or error is None:
            raise death_error(f"{self.label}: replica {rep.rank} of {self.world} (process {rep.proc.pid})",
                              rep.proc.returncode, stderr,
                              f"; the run is stopped and this host's {len(self._replicas)} replica processes ended")
        raise error_from_payload(error, f"{self.label}: replica {rep.rank} of {self.world} failed", WorkerError)

    def close(self, kill: bool = False) -> None:
        """End the replicas: close their pipes, wait a moment for them to exit, then kill them
        (at once with ``kill``). Idempotent."""
        self._closed = True
        if kill:
            for r in self._replicas:
                if r.proc.poll() is None:
                    r.proc.kill()
        self._finalizer()


def _stop_all(replicas: list[_Replica]) -> None:
    """Close every pipe (a replica then exits by itself), reap, kill the stragglers."""
    for r in replicas:
        for closing in (r.requests.close, r.results.close, lambda: os.close(r.lifeline)):
            try:
                closing()
            except OSError:
                pass
    deadline = time.monotonic() + 5.0
    for r in replicas:
        try:
            r.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
        r.stderr.close()


class DataParallelExecutable(Executable):
    """The caller's handle on a data-parallel run whose replicas are processes (module docstring)."""

    def __init__(self, spec: ModelSpec, target: Target, config: TrainConfig, group: ReplicaGroup) -> None:
        super().__init__(spec, target, config)
        self.group = group

    @property
    def replica_pids(self) -> list[int]:
        """Process ids of this host's replicas."""
        return self.group.pids

    def close(self) -> None:
        """End the replica processes; the executable cannot be used afterwards."""
        self.group.close()

    def _shards(self, *arrays: np.ndarray, axis: int = 0) -> list[tuple[np.ndarray, ...]]:
        n = self.config.data_parallel.replicas
        return list(zip(*(np.split(a, n, axis=axis) for a in arrays)))

    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        return self.group.call("_predict", [(x, training)])[0]

    def _loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        return self.group.call("_loss_and_grads", self._shards(x, y))[0]

    def _run_steps(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, int]:
        losses, applied, self.step = self.group.call("_run_steps_and_count", self._shards(xs, ys, axis=1))[0]
        return losses, applied

    def weights(self) -> Weights:
        return self.group.call("weights", [()])[0]

    def _load_weights(self, weights: Weights) -> None:
        self.group.call("_load_weights", [(weights,)] * self.config.data_parallel.replicas)


def launch(factory: Factory, spec: ModelSpec, target: Target, config: TrainConfig, **kwargs: Any) -> DataParallelExecutable:
    """Start this host's replicas of a data-parallel ``config`` (each builds ``factory(spec=spec,
    config=config, **kwargs, rank=..., ...)``) and return the proxy."""
    dp = config.data_parallel
    if not dp.enabled:
        raise ConfigError(f"{target}: launch is for data-parallel configs, got {dp}")
    group = ReplicaGroup(factory, dict(kwargs, spec=spec, config=config), config,
                         f"{target} x{dp.replicas}" + (f" on host {dp.host_rank} of {dp.hosts}" if dp.hosts > 1 else ""))
    return DataParallelExecutable(spec, target, config, group)


# -- the replica process ------------------------------------------------------------


def _serve_replica(req_fd: int, res_fd: int, life_fd: int) -> None:
    """A replica's entry point: build the executable, then answer ``(method, args)`` requests until the
    request pipe closes; exit at once if the lifeline closes (the parent is gone)."""
    requests, send = Connection(req_fd, writable=False), Connection(res_fd, readable=False)
    registered, factory, kwargs = pickle.loads(requests.recv_bytes())
    become_worker(Connection(life_fd, writable=False), registered)
    try:
        exe = factory(**kwargs)
        send.send(("ok", None))
        while True:
            try:
                method, args = requests.recv()
            except EOFError:
                break
            if method == "_run_steps_and_count":
                losses, applied = exe._run_steps(*args)
                send.send(("ok", (np.asarray(losses, np.float64), int(applied), exe.step)))
            else:
                send.send(("ok", getattr(exe, method)(*args)))
    except Exception as exc:
        send.send(("error", error_payload(exc)))
    exit_worker()  # no framework teardown: it can hang on a process group whose peers are gone
