"""Backend discovery through the ``hal.backends`` entry-point group, and ``compile``.

Loading an entry point imports only the backend module, never its framework.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from hal.backend import Backend, Executable, Target
from hal.errors import BackendUnavailable, ConfigError, HalError, TargetError, UnsupportedError
from hal.spec import ModelSpec
from hal.training import DataParallel, TrainConfig
from hal.weights import check_weights, init_weights

if TYPE_CHECKING:
    from hal.ipu import Plan

GROUP = "hal.backends"
_registered: dict[str, type[Backend]] = {}
_loaded: dict[str, type[Backend]] = {}


def register_backend(name: str, cls: type[Backend]) -> None:
    """Register a backend class by hand (tests, notebooks); entry points are the normal way."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{cls!r} is not a hal.backend.Backend subclass")
    _registered[name] = cls


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def backend_names() -> list[str]:
    """Every registered backend name, available or not; imports nothing."""
    return sorted(set(_entry_points()) | set(_registered))


def get_backend(name: str) -> type[Backend]:
    """The backend class for ``name``; raises :class:`TargetError` for an unknown name."""
    if name in _registered:
        return _registered[name]
    if name not in _loaded:
        eps = _entry_points()
        if name not in eps:
            raise TargetError(f"unknown backend {name!r}. {describe_targets()}")
        try:
            cls = eps[name].load()
        except Exception as exc:  # a broken plug-in must not take hal down with a bare traceback
            raise TargetError(f"backend {name!r} ({eps[name].value}) failed to load: {exc!r}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise TargetError(f"entry point {name!r} -> {eps[name].value} is not a hal Backend subclass")
        _loaded[name] = cls
    return _loaded[name]


def available_targets() -> list[str]:
    """``backend:device`` for every device of every available backend."""
    out = []
    for name in backend_names():
        try:
            cls = get_backend(name)
        except TargetError:
            continue
        if cls.availability().available:
            out.extend(f"{name}:{d}" for d in cls.devices())
    return out


def describe_targets() -> str:
    """One sentence listing available targets and why the others are not."""
    avail, why = [], []
    for name in backend_names():
        try:
            cls = get_backend(name)
        except TargetError as exc:
            why.append(f"{name}: {exc}")
            continue
        a = cls.availability()
        if a.available:
            avail.extend(f"{name}:{d}" for d in cls.devices())
        else:
            why.append(f"{name}: {a.reason}")
    text = f"Available targets: {', '.join(avail) or 'none'}."
    if why:
        text += " Unavailable: " + "; ".join(why) + "."
    return text


def resolve(target: str | Target, data_parallel: DataParallel | None = None) -> tuple[type[Backend], Target]:
    """The backend class and the normalised target (device filled in); raises if unusable here. With
    ``data_parallel``, the backend prepares it first (:meth:`Backend.prepare_data_parallel`)."""
    t = Target.parse(target)
    cls = get_backend(t.backend)
    a = cls.availability()
    if not a.available:
        raise BackendUnavailable(f"target {str(t)!r} is not available: {a.reason}")
    if data_parallel is not None and data_parallel.enabled:
        cls.prepare_data_parallel(data_parallel)
    return cls, Target(t.backend, cls.resolve_device(t.device))


def compile(
    spec: ModelSpec,
    target: str | Target = "numpy",
    weights: Mapping[str, np.ndarray] | None = None,
    config: TrainConfig | None = None,
    seed: int = 0,
    *,
    options: Mapping[str, Any] | None = None,
    plan: "Plan | None" = None,
) -> Executable:
    """Compile ``spec`` for ``target``: the one place where everything is checked.

    ``weights`` default to ``init_weights(spec, seed)``; ``config`` to
    ``TrainConfig()`` (with a ``plan``: its precision, gradient accumulation and
    replicas). ``options`` are the backend's own (``Backend.options()``: name,
    default, meaning); ``plan`` is a :class:`hal.ipu.Plan` for a pipelining backend.
    """
    from hal.ipu import Plan

    if not isinstance(spec, ModelSpec):
        raise HalError(f"compile expects a hal ModelSpec, got {type(spec).__name__}")
    if config is not None and not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a hal.TrainConfig, got {type(config).__name__}")
    cls, t = resolve(target, config.data_parallel if config is not None else None)
    if plan is not None:
        if not isinstance(plan, Plan):
            raise ConfigError(f"plan must be a hal.ipu.Plan (from hal.ipu.plan), got {type(plan).__name__}")
        if not cls.capabilities().pipelining:
            raise UnsupportedError(f"{t} does not take an IPU plan: it does no pipelining or replication")
        if plan.spec_hash != spec.hash:
            raise ConfigError(f"the plan was made for model {plan.model!r} with another spec than {spec.name!r}")
    if config is None:
        config = TrainConfig(precision=plan.precision, grad_accum=plan.batch.grad_accum) if plan else TrainConfig()
    if plan is not None:
        config = _plan_replicas(t, config, plan)
    _check_data_parallel(cls, t, config, plan is not None)
    bad = cls.unsupported(spec, config)
    if bad:
        listed = "; ".join(f"{k}: {v}" for k, v in bad.items())
        raise UnsupportedError(f"{t} cannot run spec {spec.name!r}: {listed}")
    opts = check_options(cls, options)
    w = check_weights(spec, weights) if weights is not None else init_weights(spec, seed)
    return cls.compile(spec, w, t.device, config, opts, plan)


def _plan_replicas(target: Target, config: TrainConfig, plan: "Plan") -> TrainConfig:
    """``config`` with the data parallelism an IPU plan runs: ``plan.batch.replicas`` replicas, which the IPU
    replicates inside its graph (PopTorch ``replicationFactor``, IPU TensorFlow's IPUConfig), on this host.

    A config with one replica (the default) takes the plan's; one with several must have the plan's count.
    The rules of :mod:`hal.training` then hold for the host batch (divisible by replicas x grad_accum,
    BatchNorm over each replica's micro-batch)."""
    dp, replicas = config.data_parallel, plan.batch.replicas
    if dp.hosts > 1:
        raise UnsupportedError(
            f"{target}: hal runs an IPU plan on one host (replicas={replicas} on its IPUs), got hosts={dp.hosts}: "
            "multi-host IPU runs go through Graphcore's PopRun, which hal does not launch"
        )
    if dp.sync_batchnorm:
        raise UnsupportedError(f"{target}: hal's IPU backends keep BatchNorm statistics per replica: use "
                               "DataParallel(sync_batchnorm=False) with an IPU plan")
    if dp.enabled and dp.replicas != replicas:
        raise ConfigError(
            f"{target}: the plan runs {replicas} replica(s) but the training config says "
            f"DataParallel(replicas={dp.replicas}): make them equal (or leave the config's data_parallel at its "
            "default: the plan's replicas are taken)"
        )
    return replace(config, data_parallel=DataParallel(replicas))


def _check_data_parallel(cls: type[Backend], target: Target, config: TrainConfig, planned: bool) -> None:
    """Refuse a data-parallel config the backend cannot run. With an IPU plan (``planned``) the IPU
    replicates inside its graph, which ``hal.compile`` already required of the backend."""
    dp, caps = config.data_parallel, cls.capabilities()
    if dp.enabled and not planned and caps.replication and not caps.data_parallel:
        raise UnsupportedError(
            f"{target} replicates inside the IPU graph, as an IPU plan says: pass "
            f"plan=hal.ipu.plan(spec, replicas={dp.replicas}, ...) to hal.compile"
        )
    if dp.enabled and not planned and not caps.data_parallel:
        raise UnsupportedError(
            f"{target} does not do data-parallel training (replicas={dp.replicas}, hosts={dp.hosts}): "
            "use a backend whose capabilities().data_parallel is set (torch, jax, tensorflow), or one replica"
        )
    if dp.enabled and dp.sync_batchnorm and not caps.sync_batchnorm:
        raise UnsupportedError(f"{target} has no synchronised BatchNorm: use DataParallel(sync_batchnorm=False)")


def options_per_backend(who: str, backends: Sequence[type[Backend]], names: Sequence[str]) -> dict[str, list[str]]:
    """Per backend name, which of the option ``names`` it declares (for a run over several targets, each taking
    the options its backend declares); a ConfigError naming ``who`` for a name no backend declares."""
    declared = {k for cls in backends for k in cls.options()}
    unknown = sorted(str(k) for k in names if k not in declared)
    if unknown:
        known = "; ".join(f"{cls.name}: {', '.join(cls.options()) or 'none'}" for cls in backends)
        raise ConfigError(f"{who}: no target takes option {', '.join(unknown)}; options per backend: {known}")
    return {cls.name: [k for k in names if k in cls.options()] for cls in backends}


def check_options(cls: type[Backend], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` checked against ``cls.options()``, with every default filled in."""
    declared = cls.options()
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"options must be a mapping name -> value, got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in declared)
    if unknown:
        known = ", ".join(f"{k} (default {o.default!r}: {o.doc})" for k, o in declared.items()) or "none"
        raise ConfigError(f"{cls.name} has no option {', '.join(unknown)}; its options: {known}")
    return {k: o.check(cls.name, k, options[k]) if k in options else o.default for k, o in declared.items()}
