"""Registry: entry points, lazy framework imports, target errors, plug-in backends."""

from __future__ import annotations

import subprocess
import sys
from typing import Mapping

import numpy as np
import pytest

import hal
import hal.registry as registry
from hal.backend import Availability, Backend, Capabilities, Executable, Target
from hal.errors import BackendUnavailable, HalError, TargetError, UnsupportedError
from hal.spec import SpecBuilder
from hal.training import TrainConfig


def _spec():
    b = SpecBuilder("r")
    x = b.input((2, 4, 4))
    return b.build(b.dense(b.flatten(b.relu(x)), 3, name="fc"))


class ToyExecutable(Executable):
    """Doubles the reference output: easy to tell apart from the numpy backend."""

    def __init__(self, spec, weights, target, config):
        super().__init__(spec, target, config)
        self._w = dict(weights)

    def _predict(self, x, training):
        from hal.backends.numpy import NumpyExecutable

        return 2 * NumpyExecutable(self.spec, self._w, self.config).predict(x, training)

    def weights(self):
        return {k: v.copy() for k, v in self._w.items()}

    def _load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self._w = dict(weights)


class ToyBackend(Backend):
    name = "toy"
    compiled: list = []

    @classmethod
    def availability(cls):
        return Availability(True, "0.0.1")

    @classmethod
    def devices(cls):
        return ["chip:0", "chip:1"]

    @classmethod
    def capabilities(cls):
        return Capabilities(ops=frozenset({"Input", "Activation", "Flatten", "Dense"}), training=False)

    @classmethod
    def compile(cls, spec, weights, device, config, options, plan):
        cls.compiled.append(device)
        return ToyExecutable(spec, weights, Target("toy", device), config)


class GoneBackend(ToyBackend):
    name = "gone"

    @classmethod
    def availability(cls):
        return Availability(False, None, "gonelib is not installed: pip install gonelib")


@pytest.fixture
def light_registry(monkeypatch):
    """Only the numpy and torch entry points (plus one broken plug-in): describing
    every target imports each framework to count its devices (TensorFlow: seconds)."""
    import importlib.metadata as md

    real = registry._entry_points()
    keep = {k: v for k, v in real.items() if k in ("numpy", "torch")}
    keep["broken"] = md.EntryPoint("broken", "hal.backends.does_not_exist:Nothing", registry.GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: dict(keep))
    monkeypatch.setattr(registry, "_loaded", {k: v for k, v in registry._loaded.items() if k in keep})


@pytest.fixture
def toy(monkeypatch, light_registry):
    """Register the toy and the unavailable backend for one test only."""
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    hal.register_backend("toy", ToyBackend)
    hal.register_backend("gone", GoneBackend)
    ToyBackend.compiled = []
    return ToyBackend


def test_in_tree_backends_are_listed():
    names = hal.backend_names()
    assert {"numpy", "torch"} <= set(names)
    assert names == sorted(names)


def test_listing_backends_imports_no_framework():
    code = (
        "import sys, hal, hal.models; hal.backend_names(); hal.get_backend('numpy'); "
        "hal.get_backend('torch'); hal.models.get('resnet18'); "
        "bad = [m for m in ('torch', 'jax', 'tensorflow', 'poptorch', 'flax') if m in sys.modules]; "
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_numpy_target_runs_without_importing_torch():
    code = (
        "import sys, numpy as np, hal; from hal.models import get; "
        "spec = get('small_cnn'); y = hal.compile(spec, 'numpy').predict(np.zeros((2, *spec.input_shape), np.float32)); "
        "assert y.shape == (2, 10); assert 'torch' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_target_parse():
    assert Target.parse("torch:cuda:0") == Target("torch", "cuda:0")
    assert Target.parse(" numpy ") == Target("numpy", "")
    assert str(Target.parse("torch:cpu")) == "torch:cpu"
    for bad in ("", "   ", ":cpu", None, 3):
        with pytest.raises(TargetError):
            Target.parse(bad)  # type: ignore[arg-type]


def test_unknown_target_lists_available_targets(light_registry):
    with pytest.raises(TargetError) as ei:
        hal.compile(_spec(), "tpu-magic:0")
    msg = str(ei.value)
    assert "tpu-magic" in msg and "numpy:cpu" in msg
    if registry.get_backend("torch").availability().available:
        assert "torch:cpu" in msg
    assert "broken" in msg and "failed to load" in msg  # a broken plug-in is reported, not raised


def test_broken_plugin_raises_target_error(light_registry):
    with pytest.raises(TargetError, match="failed to load"):
        hal.compile(_spec(), "broken")


def test_unknown_device_lists_devices():
    with pytest.raises(TargetError) as ei:
        hal.compile(_spec(), "numpy:gpu")
    assert "gpu" in str(ei.value) and "['cpu']" in str(ei.value)


def test_unknown_device_of_torch_lists_devices():
    pytest.importorskip("torch")
    with pytest.raises(TargetError) as ei:
        hal.compile(_spec(), "torch:tpu")
    assert "'cpu'" in str(ei.value)


def test_default_device_and_aliases():
    assert hal.compile(_spec(), "numpy").target == Target("numpy", "cpu")
    assert registry.resolve("numpy:cpu")[1] == Target("numpy", "cpu")


def test_plugin_backend_is_listed_and_used(toy):
    spec = _spec()
    assert "toy" in hal.backend_names()
    assert "toy:chip:0" in hal.available_targets() and "toy:chip:1" in hal.available_targets()
    exe = hal.compile(spec, "toy:chip:1", seed=3)
    assert isinstance(exe, ToyExecutable) and toy.compiled == ["chip:1"]
    x = np.random.default_rng(0).standard_normal((2, 2, 4, 4)).astype(np.float32)
    ref = hal.compile(spec, "numpy", seed=3).predict(x)
    np.testing.assert_array_equal(exe.predict(x), 2 * ref)
    # the device defaults to the backend's first, and "chip" means "chip:0"
    assert hal.compile(spec, "toy").target.device == "chip:0"
    assert hal.compile(spec, "toy:chip").target.device == "chip:0"
    with pytest.raises(TargetError, match="chip:0"):
        hal.compile(spec, "toy:chip:7")
    # a toy that does not train says so with a hal error
    with pytest.raises(UnsupportedError):
        exe.train_step(x, np.array([0, 1]))


def test_plugin_unsupported_ops_are_named(toy):
    b = SpecBuilder("needs_conv")
    x = b.input((2, 4, 4))
    spec = b.build(b.conv(x, 2, 3, name="my_conv"))
    with pytest.raises(UnsupportedError, match="my_conv"):
        hal.compile(spec, "toy")
    with pytest.raises(UnsupportedError, match="precision"):
        hal.compile(_spec(), "toy", config=TrainConfig(precision="bf16"))


def test_unavailable_backend_raises_with_reason(toy):
    with pytest.raises(BackendUnavailable, match="pip install gonelib"):
        hal.compile(_spec(), "gone")
    assert not any(t.startswith("gone") for t in hal.available_targets())
    assert "gonelib is not installed" in registry.describe_targets()


def test_register_backend_rejects_non_backends():
    with pytest.raises(TypeError):
        hal.register_backend("bad", object)  # type: ignore[arg-type]


def test_compile_rejects_non_spec():
    with pytest.raises(HalError):
        hal.compile("resnet50", "numpy")  # type: ignore[arg-type]


def test_compile_checks_weights():
    spec = _spec()
    with pytest.raises(hal.WeightsError, match="fc.bias"):
        hal.compile(spec, "numpy", {"fc.weight": np.zeros((3, 32))})
