"""The parity harness, the bench harness and the CLI, end to end on small models.

The parity harness must be able to fail: a plug-in backend that is wrong by a
little (a 1e-4 relative error, far above the float32 floor) is caught.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

import hal
from hal.backend import Option
from hal.backends.numpy import NumpyBackend
from hal.backends.torch import TorchBackend, TorchExecutable
from hal.bench import check_writable, run_bench
from hal.cli import main
from hal.errors import ConfigError
from hal.models import get
from hal.parity import PARITY_RESIDUAL_GAMMA, make_batch, normalised_error, run_parity, tensors_error, tolerance

needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the autodiff reference needs torch")


class _Skewed(TorchExecutable):
    """torch, but every output off by a relative 1e-4: a subtly broken backend."""

    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        return super()._predict(x, training) * (1 + 1e-4)


class SkewedBackend(TorchBackend):
    name = "skewed"

    @classmethod
    def compile(cls, spec, weights, device, config, options, plan):  # type: ignore[override]
        return _Skewed(spec, weights, device, config, options)


class NumpyTwin(NumpyBackend):
    """The numpy backend under another name, so that it runs like any plug-in (in a worker)."""

    name = "numpy_twin"


class AbortingBackend(NumpyBackend):
    """A plug-in whose compile kills its process, as a crashing native library would."""

    name = "aborting"

    @classmethod
    def compile(cls, *args):  # type: ignore[override]
        os.abort()


class RaisingBackend(NumpyBackend):
    """A plug-in whose compile raises a plain Python error."""

    name = "raising"

    @classmethod
    def compile(cls, *args):  # type: ignore[override]
        raise RuntimeError("driver exploded")


class OptionedBackend(NumpyBackend):
    """The numpy backend with an option (that changes nothing), to sweep."""

    name = "optioned"

    @classmethod
    def options(cls) -> dict[str, Option]:
        return {"mode": Option("a", "a test option", ("a", "b"))}


for _cls in (SkewedBackend, NumpyTwin, AbortingBackend, RaisingBackend, OptionedBackend):
    hal.register_backend(_cls.name, _cls)


@needs_torch
def test_parity_passes_for_torch_on_every_check_each_in_its_own_worker():
    report = run_parity(get("small_cnn"), ["numpy", "torch:cpu"], batch=4)
    assert report.passed
    checks = {(r.target, r.check): r for r in report.results}
    for check in ("forward", "forward_train", "grads", "trajectory"):
        r = checks[("torch:cpu", check)]
        assert r.passed is True and r.max_rel is not None and r.max_rel <= r.tol
    # the floor is measured, and at least the float32 unit roundoff
    assert report.floor["forward"] >= 2.0**-24


@needs_torch
def test_parity_catches_a_subtly_wrong_backend():
    report = run_parity(get("small_cnn"), ["skewed:cpu"], batch=4, checks=("forward",), isolate=False)
    (r,) = report.results
    assert r.passed is False and r.max_rel == pytest.approx(1e-4, rel=0.05)
    assert not report.passed


def test_normalised_errors_are_exact_on_hand_cases():
    ref = np.array([1.0, -4.0, 2.0])
    assert normalised_error(ref + np.array([0.0, 0.0, 0.5]), ref) == (0.5, 0.125)
    assert normalised_error(np.array([np.nan, 0, 0]), ref)[1] == float("inf")
    # normwise over tensors: a zero-exact tensor's noise is measured against the whole set
    e_abs, e_rel, worst = tensors_error({"a": np.array([2.0]), "b": np.array([1e-9])}, {"a": np.array([2.0]), "b": np.array([0.0])})
    assert (e_abs, worst) == (1e-9, "b") and e_rel == pytest.approx(5e-10)
    assert tolerance(1e-6, "fp32") == pytest.approx(16e-6)
    assert tolerance(1e-6, "bf16") == pytest.approx(16e-6 * 2.0**16)


def test_a_crashing_or_raising_plugin_is_a_fail_row_and_the_next_target_still_runs():
    report = run_parity(get("small_cnn"), ["aborting:cpu", "raising:cpu", "numpy_twin:cpu"], checks=("forward",))
    rows = {r.target: r for r in report.results}
    assert rows["aborting:cpu"].passed is False
    assert rows["aborting:cpu"].note.startswith("aborting:cpu: the worker process died (killed by SIGABRT)")
    assert "in compile" in rows["aborting:cpu"].note  # faulthandler's innermost frame
    assert (rows["raising:cpu"].passed, rows["raising:cpu"].note) == (False, "raising:cpu: RuntimeError: driver exploded")
    # the twin is the numpy backend at float32 (the default config): its error is that of numpy fp32 vs fp64
    spec, weights = get("small_cnn"), hal.init_weights(get("small_cnn"), 0, PARITY_RESIDUAL_GAMMA)
    x, _ = make_batch(spec, 4, "cross_entropy", 0)
    f32, f64 = (hal.compile(spec, "numpy", weights, hal.TrainConfig(precision=p)).predict(x) for p in ("fp32", "fp64"))
    assert rows["numpy_twin:cpu"].passed is True
    assert rows["numpy_twin:cpu"].max_rel == normalised_error(f32, f64)[1] > 0
    assert not report.passed


def test_a_raising_plugin_is_a_fail_row_in_process_too():
    report = run_parity(get("small_cnn"), ["raising:cpu"], checks=("forward", "forward_train"), isolate=False)
    assert [(r.check, r.passed, r.note) for r in report.results] == [
        ("forward", False, "raising:cpu: RuntimeError: driver exploded"),
        ("forward_train", False, "raising:cpu: RuntimeError: driver exploded"),
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be an int >= 1 for the trajectory check, got 0"),
        ({"targets": []}, "no targets given: a run that checks nothing cannot pass"),
        ({"targets": "numpy"}, "targets must be a list of strings, got 'numpy'"),
        ({"checks": ()}, "no checks given"),
        ({"checks": ["forwards"]}, "unknown checks ['forwards']"),
        ({"batch": 1}, "batch must be an int >= 2"),
        ({"batch": "4"}, "batch must be an int >= 2"),
        ({"config": {"lr": 1}}, "config must be a hal.TrainConfig, got dict"),
        ({"spec": "small_cnn"}, "spec must be a hal ModelSpec, got str"),
    ],
)
def test_parity_argument_errors_are_config_errors(kwargs, message):
    args = {"spec": get("small_cnn"), "targets": ["numpy"], **kwargs}
    with pytest.raises(ConfigError) as info:
        run_parity(**args)
    assert message in str(info.value)


def test_parity_steps_zero_is_fine_without_a_trajectory():
    report = run_parity(get("small_cnn"), ["numpy"], checks=("forward",), steps=0)
    assert report.passed and [r.check for r in report.results] == ["forward"]


def test_bench_times_hal_and_writes_json_markdown_png(tmp_path):
    report = run_bench(get("small_cnn"), ["numpy", "torch:cpu"], batch=4, repeats=2, warmup=1, isolate=False)
    rows = {(r.target, r.mode): r for r in report.rows}
    for mode in ("inference", "training"):
        m = rows[("torch:cpu", mode)].hal
        assert m is not None and len(m.times_s) == len(m.cpu_times_s) == 2 and m.samples_per_s > 0
        assert m.first_call_s > 0 and m.first_call_cpu_s > 0
    assert rows[("torch:cpu", "inference")].hal.latency_b1_ms > 0
    assert rows[("torch:cpu", "inference")].hal.peak_mem_mb is None  # not in a fresh process: not measured
    assert rows[("numpy:cpu", "training")].hal is None and "does not train" in rows[("numpy:cpu", "training")].note
    assert rows[("torch:cpu", "inference")].native is not None and rows[("torch:cpu", "training")].ratio > 0
    assert "no native baseline" in rows[("numpy:cpu", "inference")].note  # numpy has no native twin
    paths = report.write(tmp_path)
    assert {p.suffix for p in paths} == {".json", ".md", ".png"}
    data = json.loads(paths[0].read_text())
    assert data["env"]["torch"] and data["env"]["cores"] >= 1 and data["rows"][0]["hal"]["samples_per_s"] > 0
    assert data["env"]["torch_threads"] >= 1 and "load_avg_start" in data["env"] and "load_avg_end" in data["env"]


@needs_torch
def test_bench_ratio_against_the_packaged_native_resnet_in_a_worker():
    """Also the first call's peak memory of each, each first in a fresh process: hal's ResNet-18 and torchvision's
    take about the same (measured one after the other in one process, the second took 0.4x the first's)."""
    report = run_bench(get("resnet18", input_size=32), ["torch:cpu"], batch=2, repeats=1, warmup=0, modes=("inference",))
    (row,) = report.rows
    assert row.native is not None and row.ratio == pytest.approx(row.native.median_s / row.hal.median_s)
    assert row.cpu_ratio == pytest.approx(row.native.cpu_times_s[0] / row.hal.cpu_times_s[0])
    if Path("/proc/self/clear_refs").exists():
        assert 0.7 < row.native.peak_mem_mb / row.hal.peak_mem_mb < 1.4, (row.hal.peak_mem_mb, row.native.peak_mem_mb)


def test_bench_crash_is_a_row_and_options_sweep_one_row_per_combination():
    report = run_bench(get("small_cnn"), ["aborting:cpu", "optioned:cpu", "numpy_twin:cpu"], batch=2, repeats=1,
                       warmup=0, modes=("inference",), options={"mode": ["a", "b"]})
    rows = [(r.label, r.options, r.hal is not None) for r in report.rows]
    assert rows == [("aborting:cpu", {}, False), ("optioned:cpu mode=a", {"mode": "a"}, True),
                    ("optioned:cpu mode=b", {"mode": "b"}, True), ("numpy_twin:cpu", {}, True)]
    assert "killed by SIGABRT" in report.rows[0].note
    with pytest.raises(ConfigError, match="no target takes option xla"):
        run_bench(get("small_cnn"), ["optioned:cpu"], options={"xla": [True]})
    with pytest.raises(ConfigError, match="option 'mode' must be one of"):
        run_bench(get("small_cnn"), ["optioned:cpu"], options={"mode": ["c"]})


needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")


@needs_torch
@pytest.mark.parametrize(
    "model, size",
    [
        ("small_cnn", 16),  # even and odd sides: TF "same" pads the stride-2 conv differently
        ("small_cnn", 18),
        ("resnet18", 32),
        pytest.param("mobilenet_v2", (33, 40), marks=needs_torchvision),  # torchvision's own models
        pytest.param("efficientnet_b0", (33, 40), marks=needs_torchvision),
    ],
)
def test_native_torch_baseline_computes_hals_function(model, size):
    """hal's weights load into the native twin under its own names, and its float32
    channels_last forward is hal's float64 reference to float32 accuracy (BatchNorm
    statistics randomised, so the eval-mode normalisation counts)."""
    import torch as th

    from hal.bench import load_native

    spec = get(model, num_classes=10, input_size=size)
    rng = np.random.default_rng(4)
    weights = hal.init_weights(spec, 3)
    for k, v in weights.items():
        if k.endswith("running_mean"):
            weights[k] = rng.normal(0.0, 0.2, v.shape).astype(v.dtype)
        elif k.endswith("running_var"):
            weights[k] = rng.uniform(0.5, 1.5, v.shape).astype(v.dtype)
    native, note = load_native("torch", spec, "cpu")
    assert native is not None, note
    missing, unexpected = native.model.load_state_dict({k: th.from_numpy(v) for k, v in weights.items()}, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)  # hal's names are torch's
    x, _ = make_batch(spec, 2, "cross_entropy", 1)
    ref = hal.compile(spec, "numpy", weights, hal.TrainConfig(precision="fp64")).predict(x)
    assert normalised_error(native.predict(x), ref)[1] < 1e-5


@needs_torch
def test_native_notes_say_why_there_is_no_baseline(monkeypatch):
    import sys

    from hal.bench import load_native

    half = get("mobilenet_v2", input_size=32, width_mult=0.5)  # a zoo name, not torchvision's architecture
    if importlib.util.find_spec("torchvision") is not None:
        native, note = load_native("torch", half, "cpu")
        assert native is None and "3504872 trainable parameters, this mobilenet_v2 1968680" in note
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if torchvision were not installed
    native, note = load_native("torch", get("mobilenet_v2", input_size=32), "cpu")
    assert native is None and "torchvision cannot be imported" in note
    native, note = load_native("torch", get("resnet18", input_size=32), "cpu")  # hand-written: no torchvision needed
    assert native is not None and "hand-written" in note
    if importlib.util.find_spec("flax") is not None:
        native, note = load_native("jax", get("efficientnet_b0", input_size=32), "cpu")
        assert native is None and "JAX and Flax ship no model zoo" in note


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow")
@pytest.mark.parametrize("model, keras_name", [("mobilenet_v2", "MobileNetV2"), ("efficientnet_b0", "EfficientNetB0")])
def test_native_keras_application_builds_and_runs_on_the_spec_input(model, keras_name):
    """keras.applications' model takes the spec's channels-first batch and has its
    trainable parameter count (else load_native refuses it); EfficientNet's input
    normalisation is gone."""
    from hal.backends import tensorflow as T
    from hal.bench import load_native

    T._tf()  # as hal imports TensorFlow (after Triton), so torch still runs in this process
    from tensorflow import keras

    spec = get(model, num_classes=10, input_size=(33, 40))
    native, note = load_native("tensorflow", spec, "cpu")
    assert native is not None and f"keras.applications.{keras_name}" in note
    x, _ = make_batch(spec, 2, "cross_entropy", 1)
    out = native.predict(x)  # (its train step, XLA-compiled, costs 10 s: left to the bench)
    assert out.shape == (2, 10) and np.isfinite(out).all()
    body = native.model.layers[-1]
    assert not [l for l in body.layers if isinstance(l, (keras.layers.Rescaling, keras.layers.Normalization))]


def test_check_writable_refuses_a_folder_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "out")
    assert check_writable(tmp_path / "new" / "out").is_dir()


def test_cli_info_json(capsys):
    assert main(["info", "--json"]) == 0
    rows = {r["backend"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["numpy"]["available"] and "numpy:cpu" in rows["numpy"]["devices"]


def test_cli_parity_json_and_exit_codes(capsys):
    assert main(["parity", "small_cnn", "--targets", "numpy,torch:cpu", "--checks", "forward", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and {r["target"] for r in out["results"]} == {"numpy", "torch:cpu"}
    # a user mistake: exit 2 with a message naming what is available
    assert main(["parity", "small_cnn", "--targets", "nosuch:cpu", "--checks", "forward"]) == 1
    assert "unknown backend 'nosuch'" in capsys.readouterr().out
    assert main(["parity", "no_such_model"]) == 2
    assert "the zoo has" in capsys.readouterr().err


def test_cli_compare_prints_one_table(capsys):
    code = main(["compare", "small_cnn", "--targets", "numpy,torch:cpu", "--batch", "4", "--repeats", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "torch:cpu" in out and "PASS" in out and "infer samples/s" in out
