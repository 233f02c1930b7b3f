"""Backend discovery through the ``hal.backends`` entry-point group, and ``compile``.

Loading an entry point imports only the backend module, never its framework.
"""

from __future__ import annotations

import importlib.metadata
from typing import Mapping

import numpy as np

from hal.backend import Backend, Executable, Target
from hal.errors import BackendUnavailable, HalError, TargetError, UnsupportedError
from hal.spec import ModelSpec
from hal.training import TrainConfig
from hal.weights import check_weights, init_weights

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


def resolve(target: str | Target) -> tuple[type[Backend], Target]:
    """The backend class and the normalised target (device filled in); raises if unusable here."""
    t = Target.parse(target)
    cls = get_backend(t.backend)
    a = cls.availability()
    if not a.available:
        raise BackendUnavailable(f"target {str(t)!r} is not available: {a.reason}")
    return cls, Target(t.backend, cls.resolve_device(t.device))


def compile(
    spec: ModelSpec,
    target: str | Target = "numpy",
    weights: Mapping[str, np.ndarray] | None = None,
    config: TrainConfig | None = None,
    seed: int = 0,
) -> Executable:
    """Compile ``spec`` for ``target`` with canonical ``weights`` (default: ``init_weights(spec, seed)``)."""
    if not isinstance(spec, ModelSpec):
        raise HalError(f"compile expects a hal ModelSpec, got {type(spec).__name__}")
    cls, t = resolve(target)
    config = config or TrainConfig()
    bad = cls.unsupported(spec, config)
    if bad:
        listed = "; ".join(f"{k}: {v}" for k, v in bad.items())
        raise UnsupportedError(f"{t} cannot run spec {spec.name!r}: {listed}")
    w = check_weights(spec, weights) if weights is not None else init_weights(spec, seed)
    return cls.compile(spec, w, t.device, config)
