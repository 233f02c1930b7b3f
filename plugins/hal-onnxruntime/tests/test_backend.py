"""What the conformance suite does not cover: target names, provider start-up, options,
the training-form rewrite's guard, and a whole model against the float64 reference."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest

import hal
from hal.cli import main
from hal.errors import BackendUnavailable, ConfigError, UnsupportedError
from hal.models.small_cnn import small_cnn
from hal.onnx import MIN_OPSET, to_onnx
from hal.parity import run_parity
from hal.spec import SpecBuilder
from hal_onnxruntime import OnnxRuntimeBackend, device_name, training_form


@pytest.mark.parametrize("provider,device", [
    ("CPUExecutionProvider", "cpu"), ("CUDAExecutionProvider", "cuda"), ("TensorrtExecutionProvider", "tensorrt"),
    ("ROCMExecutionProvider", "rocm"), ("OpenVINOExecutionProvider", "openvino"), ("DmlExecutionProvider", "dml"),
    ("CoreMLExecutionProvider", "coreml"), ("QNNExecutionProvider", "qnn"),
])
def test_device_names_are_the_provider_names_lowercased(provider: str, device: str) -> None:
    assert device_name(provider) == device


def test_targets_are_the_reported_providers_cpu_first_without_azure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reported = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: reported)
    assert OnnxRuntimeBackend.devices() == ["cpu", "tensorrt", "cuda"]
    assert main(["info", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["backend"] == "onnxruntime")
    assert row["devices"] == ["onnxruntime:cpu", "onnxruntime:tensorrt", "onnxruntime:cuda"]


def _mlp() -> hal.ModelSpec:
    b = SpecBuilder("mlp")
    return b.build(b.dense(b.relu(b.dense(b.input((6,)), 5)), 3))


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_provider_that_cannot_start_is_an_error_not_a_silent_cpu_run(monkeypatch: pytest.MonkeyPatch) -> None:
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this runtime has CUDA: nothing to fail")
    reported = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: reported)
    with pytest.raises(BackendUnavailable, match="could not start CUDAExecutionProvider"):
        hal.compile(_mlp(), "onnxruntime:cuda")


def test_options_reach_the_session() -> None:
    exe = hal.compile(_mlp(), "onnxruntime:cpu", options={"intra_op_num_threads": 1, "graph_optimization": "disable"})
    so = exe.session.get_session_options()
    assert so.intra_op_num_threads == 1
    assert so.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    with pytest.raises(ConfigError, match="intra_op_num_threads' must be >= 0"):
        hal.compile(_mlp(), "onnxruntime:cpu", options={"intra_op_num_threads": -1})


def test_a_float64_spec_is_declared_unsupported() -> None:
    b = SpecBuilder("mlp64")
    spec = b.build(b.dense(b.input((6,), dtype="float64"), 3))
    with pytest.raises(UnsupportedError, match="computes in float32.*float64"):
        hal.compile(spec, "onnxruntime:cpu")


@pytest.mark.parametrize("opset", [MIN_OPSET, 18])  # ReduceMean takes axes as an attribute, then as an input
@pytest.mark.parametrize("shape", [(5,), (3, 4, 5)])
def test_training_mode_batchnorm_uses_batch_statistics_at_each_opset(opset: int, shape: tuple[int, ...]) -> None:
    b = SpecBuilder("bn")
    spec = b.build(b.batch_norm(b.input(shape), eps=1e-3, name="bn"))
    means = [n for n in training_form(to_onnx(spec, opset=opset), spec).graph.node if n.op_type == "ReduceMean"]
    assert [len(n.input) for n in means] == [1 + (opset >= 18)] * 2
    exe = hal.compile(spec, "onnxruntime:cpu", options={"opset": opset})
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, *shape)).astype(np.float32)
    w = exe.weights()
    axes = (0, *range(2, x.ndim))
    c = (1, -1) + (1,) * (x.ndim - 2)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(axes).reshape(c)) / np.sqrt(x64.var(axes).reshape(c) + 1e-3)
    want = want * w["bn.weight"].reshape(c) + w["bn.bias"].reshape(c)
    np.testing.assert_allclose(exe.predict(x, training=True), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(exe.predict(x), want, atol=1e-2)  # inference uses the running statistics


def test_training_mode_dropout_inside_the_graph_drops() -> None:
    """onnxruntime's optimizer removes a Dropout between two nodes, even in training mode."""
    b = SpecBuilder("drop")
    spec = b.build(b.relu(b.dropout(b.relu(b.input((3, 4, 5))), 0.5)))
    exe = hal.compile(spec, "onnxruntime:cpu")
    out = exe.predict(np.ones((4, 3, 4, 5), np.float32), training=True)
    assert set(np.unique(out)) == {0.0, 2.0} and abs((out == 0).mean() - 0.5) < 0.2  # 240 values
    assert np.array_equal(exe.predict(np.ones((4, 3, 4, 5), np.float32)), np.ones((4, 3, 4, 5), np.float32))


def test_the_training_form_refuses_a_graph_without_hal_node_names() -> None:
    b = SpecBuilder("bn")
    spec = b.build(b.relu(b.batch_norm(b.input((3, 4)), name="bn")))
    model = to_onnx(spec)
    next(n for n in model.graph.node if n.name == "bn").name = "fused"
    with pytest.raises(UnsupportedError, match=r"no node \['bn'\]"):
        training_form(model, spec)


def test_small_cnn_matches_the_float64_reference_in_both_forwards() -> None:
    """Every op wired together (residual Add, Concat, same padding, BatchNorm in training mode)."""
    report = run_parity(small_cnn(), ["onnxruntime:cpu"], checks=("forward", "forward_train"), isolate=False)
    assert [(r.check, r.passed) for r in report.results] == [("forward", True), ("forward_train", True)]
    assert all(0 < r.max_rel <= r.tol for r in report.results)
