"""Contract tests of ``tensorflow:ipu`` (the IPU translation in hal.backends.ipu_tensorflow,
reached only as ``hal.compile(spec, "tensorflow:ipu[:N]", ..., plan=plan)``).

Without Graphcore's SDK these run against a STRICT STAND-IN of the documented IPU
TensorFlow 2 surface, defined in this file: it is not Graphcore's code and shares
none of it. It follows *Targeting the IPU from TensorFlow 2* (SDK 3.x: "Keras with
IPUs", "Keras Python API", "Targeting the Poplar XLA device") and the signatures in
github.com/graphcore/keras ``keras/ipu/extensions/functional_extensions.py``:

* ``tensorflow.python.ipu`` (injected as ``sys.modules["tensorflow.python.ipu"]``)
  with ``config.IPUConfig`` (setting an unknown attribute raises, as the real
  ``_ConfigBase`` does; ``configure_ipu_system()``), ``ipu_strategy.IPUStrategy``
  (``scope()``, ``run(fn, args=(), kwargs=None, options=None)``, which rejects an
  eager Python function as the SDK does; creating one before the IPU system is
  configured raises), ``gradient_accumulation.GradientAccumulationReductionMethod``
  and ``ops.pipelining_ops.PipelineSchedule``;
* the IPU Keras extension methods of a ``Functional`` model, patched onto
  ``keras.Model`` the way IPU Keras injects them into models made in an
  ``IPUStrategy`` scope: ``get_pipeline_stage_assignment`` (one
  ``FunctionalLayerPipelineStageAssignment`` per layer call, input layers
  excluded, in execution order), ``set_pipeline_stage_assignment`` (validated like
  the SDK: a stage for every call, stages 0..S-1 without gaps, no layer reading a
  later stage), ``set_pipelining_options``, ``set_gradient_accumulation_options``,
  ``set_asynchronous_callbacks``, ``set_replication_options``, with their
  documented keywords only (any other keyword raises ``TypeError``); they must be
  called inside the strategy scope.

``compile``/``fit``/``predict`` stay real Keras 3 on the CPU, so the fit path
(hal's Keras optimizer with torch semantics, BatchNorm updates inside ``fit``, the
per-step loss read back through callbacks) is compared with ``torch:cpu`` for a
single-stage, G=1 plan. Pipelining, gradient accumulation and replication inside
``fit`` are the SDK's and are checked as configuration only.

When Graphcore's TensorFlow is importable, the stand-in tests are skipped and the
smoke test at the end runs on the IPU Model (``TF_POPLAR_FLAGS=--use_ipu_model``).
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import replace
import importlib.machinery
import inspect
import os
import sys
import types

import numpy as np
import pytest

import hal
from hal import ConfigError, InputError, TargetError, TrainConfig, ipu as planner, models
from hal.backends import ipu_tensorflow as IT, tensorflow as T
from hal.errors import NonFiniteError, UnsupportedError
from hal.parity import normalised_error, tensors_error, tolerance
from hal.training import SGD, AdamW, Cosine

if not T.TensorFlowBackend.availability().available:
    pytest.skip("TensorFlow is not installed: pip install 'hal-cnn[tensorflow]'", allow_module_level=True)
tf = T._tf()  # as hal imports it: after Triton (see T._load_triton_first), so torch can run here too

REAL_IPU = IT.importable() and "tensorflow.python.ipu" not in sys.modules
standin_only = pytest.mark.skipif(
    REAL_IPU, reason="Graphcore's TensorFlow is installed: the IPU Model smoke test runs instead"
)


# ---------------------------------------------------------------------------
# the stand-in
# ---------------------------------------------------------------------------


class Record:
    """What the stand-in saw, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.configured: int | list[int] | None = None
        self.in_scope = 0

    def add(self, name: str, **kwargs) -> None:
        self.calls.append((name, kwargs))

    def named(self, name: str) -> list[dict]:
        return [k for n, k in self.calls if n == name]


class GradientAccumulationReductionMethod(enum.Enum):
    SUM = 0
    MEAN = 1
    RUNNING_MEAN = 2

    @classmethod
    def parse(cls, value):
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise ValueError(f"Cannot parse {value} as one of GradientAccumulationReductionMethod")


class PipelineSchedule(enum.Enum):
    Grouped = 0
    Interleaved = 1
    Sequential = 2


PIPELINE_KWARGS = {  # documented keywords of ipu.pipelining_ops.pipeline that set_pipelining_options forwards
    "pipeline_schedule", "recomputation_mode", "forward_propagation_stages_poplar_options",
    "backward_propagation_stages_poplar_options", "weight_update_poplar_options", "offload_weight_update_variables",
    "replicated_optimizer_state_sharding", "offload_activations", "offload_gradient_accumulation_buffers",
    "replicated_weight_sharding", "offload_weights", "name",
}
GA_OPTIMIZER_KWARGS = {"offload_weight_update_variables", "replicated_optimizer_state_sharding", "dtype", "name"}


def make_standin(record: Record) -> types.ModuleType:
    ipu = types.ModuleType("tensorflow.python.ipu")
    ipu.__spec__ = importlib.machinery.ModuleSpec("tensorflow.python.ipu", loader=None)

    class IPUConfig:
        _ATTRS = {"auto_select_ipus", "select_ipus", "allow_recompute", "selection_order", "device_connection",
                  "ipu_model", "optimizations", "floating_point_behaviour", "convolutions", "matmuls", "norms",
                  "pooling", "experimental", "io_tiles", "compilation_poplar_options", "scheduling"}

        def __init__(self) -> None:
            object.__setattr__(self, "_values", {"auto_select_ipus": []})

        def __setattr__(self, name, value):
            if name not in self._ATTRS:
                raise AttributeError(f"'IPUConfig' has no attribute {name!r}")
            if name == "auto_select_ipus" and not (
                (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
                or (isinstance(value, (list, tuple)) and all(isinstance(v, int) and v >= 1 for v in value))
            ):
                raise TypeError(f"auto_select_ipus takes an int or a list of ints >= 1, got {value!r}")
            self._values[name] = value

        def __getattr__(self, name):
            if name.startswith("_") or name not in self._ATTRS:
                raise AttributeError(name)
            return self._values.get(name)

        def configure_ipu_system(self, device="cpu"):
            if not self._values["auto_select_ipus"]:
                raise ValueError("no IPUs selected: set auto_select_ipus or select_ipus")
            record.configured = self._values["auto_select_ipus"]
            record.add("configure_ipu_system", auto_select_ipus=record.configured)

    class IPUStrategyV1:
        def __init__(self, ipu_device="/device:IPU:0", cpu_device="/device:CPU:0", enable_dataset_iterators=True,
                     enable_keras_extensions=True):
            if record.configured is None:
                raise RuntimeError("the IPU system is not configured: call IPUConfig.configure_ipu_system() first")
            record.add("IPUStrategy", ipu_device=ipu_device)

        @contextlib.contextmanager
        def scope(self):
            record.in_scope += 1
            try:
                yield self
            finally:
                record.in_scope -= 1

        def run(self, fn, args=(), kwargs=None, options=None):
            if not isinstance(fn, tf.types.experimental.GenericFunction):
                raise ValueError("IPUStrategyV1.run(fn, ...) does not support eager execution: make fn a tf.function")
            record.add("run", fn=getattr(fn, "__name__", "?"))
            return fn(*args, **(kwargs or {}))

    ipu.config = types.SimpleNamespace(IPUConfig=IPUConfig)
    ipu.ipu_strategy = types.SimpleNamespace(IPUStrategy=IPUStrategyV1, IPUStrategyV1=IPUStrategyV1)
    ipu.gradient_accumulation = types.SimpleNamespace(
        GradientAccumulationReductionMethod=GradientAccumulationReductionMethod)
    ipu.ops = types.SimpleNamespace(pipelining_ops=types.SimpleNamespace(PipelineSchedule=PipelineSchedule))
    return ipu


class FunctionalLayerPipelineStageAssignment:
    def __init__(self, layer, node_index, pipeline_stage=None):
        self._layer, self._node_index, self.pipeline_stage = layer, node_index, pipeline_stage

    layer = property(lambda self: self._layer)
    node_index = property(lambda self: self._node_index)


def _calls(model):
    """Layer calls of a Keras 3 functional model in execution order, inputs excluded."""
    return [op for op in model.operations if type(op).__name__ != "InputLayer"]


def make_extensions(record: Record) -> dict:
    """The documented FunctionalExtension methods, recording into ``record``."""

    def in_scope(name):
        if not record.in_scope:
            raise RuntimeError(f"{name}: IPU Keras extensions exist only for models made in an IPUStrategy scope")

    def get_pipeline_stage_assignment(self):
        in_scope("get_pipeline_stage_assignment")
        return [FunctionalLayerPipelineStageAssignment(layer, 0) for layer in _calls(self)]

    def set_pipeline_stage_assignment(self, pipeline_stage_assignment):
        in_scope("set_pipeline_stage_assignment")
        if not isinstance(pipeline_stage_assignment, list):
            raise ValueError("`pipeline_stage_assignment` needs to be a list")
        layers = _calls(self)
        if len(pipeline_stage_assignment) != len(layers):
            raise ValueError("the size of the assignment does not match the number of layer invocations")
        stage = {}
        for a in pipeline_stage_assignment:
            if not isinstance(a, FunctionalLayerPipelineStageAssignment):
                raise ValueError("all elements must be FunctionalLayerPipelineStageAssignment")
            if a.pipeline_stage is None:
                raise ValueError(f"Layer {a.layer.name} has not been assigned a pipeline stage.")
            if id(a.layer) in stage:
                raise ValueError(f"Duplicate assignment for layer {a.layer.name}")
            stage[id(a.layer)] = a.pipeline_stage
        found = sorted(set(stage.values()))
        if found != list(range(len(found))):
            raise ValueError(f"Pipeline stages must be 0..S-1 without gaps, found {found}")
        for layer in layers:
            for parent in layer._inbound_nodes[0].parent_nodes:
                src = parent.operation
                if type(src).__name__ != "InputLayer" and stage[id(src)] > stage[id(layer)]:
                    raise ValueError(f"Layer {layer.name} in pipeline stage {stage[id(layer)]} reads a later stage")
        self._standin_stages = {layer.name: stage[id(layer)] for layer in layers}
        record.add("set_pipeline_stage_assignment", stages=self._standin_stages)

    def set_pipelining_options(self, gradient_accumulation_steps_per_replica=None, device_mapping=None,
                               accumulate_outfeed=None, gradient_accumulation_reduction_method="sum",
                               **pipelining_kwargs):
        in_scope("set_pipelining_options")
        unknown = set(pipelining_kwargs) - PIPELINE_KWARGS
        if unknown:
            raise TypeError(f"pipeline() got unexpected keyword arguments {sorted(unknown)}")
        if not getattr(self, "_standin_stages", None):
            raise ValueError("set_pipelining_options on a model without a pipeline stage assignment")
        record.add("set_pipelining_options",
                   gradient_accumulation_steps_per_replica=_positive(gradient_accumulation_steps_per_replica),
                   device_mapping=device_mapping, accumulate_outfeed=accumulate_outfeed,
                   reduction=GradientAccumulationReductionMethod.parse(gradient_accumulation_reduction_method),
                   **pipelining_kwargs)

    def set_gradient_accumulation_options(self, gradient_accumulation_steps_per_replica=None,
                                          gradient_accumulation_reduction_method="sum",
                                          use_v2_gradient_accumulation_optimizer=False,
                                          **gradient_accumulation_optimizer_kwargs):
        in_scope("set_gradient_accumulation_options")
        unknown = set(gradient_accumulation_optimizer_kwargs) - GA_OPTIMIZER_KWARGS
        if unknown:
            raise TypeError(f"GradientAccumulationOptimizerV2 got unexpected keyword arguments {sorted(unknown)}")
        record.add("set_gradient_accumulation_options",
                   gradient_accumulation_steps_per_replica=_positive(gradient_accumulation_steps_per_replica),
                   reduction=GradientAccumulationReductionMethod.parse(gradient_accumulation_reduction_method))

    def set_asynchronous_callbacks(self, asynchronous=False):
        in_scope("set_asynchronous_callbacks")
        record.add("set_asynchronous_callbacks", asynchronous=asynchronous)

    def set_replication_options(self, replicated_metric_reduction_method="NONE"):
        in_scope("set_replication_options")
        if str(replicated_metric_reduction_method).upper() not in ("NONE", "SUM", "MEAN", "MIN", "MAX"):
            raise ValueError(f"Cannot parse {replicated_metric_reduction_method} as a ReplicatedMetricReductionMethod")
        record.add("set_replication_options", replicated_metric_reduction_method=replicated_metric_reduction_method)

    def reset_pipeline_stage_assignment(self):
        self._standin_stages = {}

    def print_pipeline_stage_assignment_summary(self, line_length=None, print_fn=None):
        (print_fn or print)(str(getattr(self, "_standin_stages", {})))

    return {f.__name__: f for f in (
        get_pipeline_stage_assignment, set_pipeline_stage_assignment, set_pipelining_options,
        set_gradient_accumulation_options, set_asynchronous_callbacks, set_replication_options,
        reset_pipeline_stage_assignment, print_pipeline_stage_assignment_summary)}


def _positive(v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"Expected `gradient_accumulation_steps_per_replica` to be a positive integer, got {v}")
    return v


@pytest.fixture
def sdk(monkeypatch):
    """The stand-in installed; yields its Record."""
    if REAL_IPU:
        pytest.skip("Graphcore's TensorFlow is installed: the IPU Model smoke test runs instead")
    record = Record()
    monkeypatch.setitem(sys.modules, "tensorflow.python.ipu", make_standin(record))
    compile_calls = []
    real_compile = tf.keras.Model.compile

    def compile(self, *args, **kwargs):  # the real Keras compile, recorded
        compile_calls.append(kwargs)
        record.add("compile", steps_per_execution=kwargs.get("steps_per_execution"))
        return real_compile(self, *args, **kwargs)

    monkeypatch.setattr(tf.keras.Model, "compile", compile)
    for name, fn in make_extensions(record).items():
        monkeypatch.setattr(tf.keras.Model, name, fn, raising=False)
    yield record


def _data(spec, n, seed=0):
    r = np.random.default_rng(seed)
    return r.standard_normal((n, *spec.input_shape)).astype(np.float32), r.integers(0, spec.output_shape[0], n)


# ---------------------------------------------------------------------------
# the stand-in itself
# ---------------------------------------------------------------------------


@standin_only
def test_stand_in_is_strict(sdk):
    ipu = sys.modules["tensorflow.python.ipu"]
    cfg = ipu.config.IPUConfig()
    with pytest.raises(AttributeError):
        cfg.num_ipus = 2  # not a documented IPUConfig attribute
    with pytest.raises(AttributeError):
        ipu.ipu_compiler  # noqa: B018 - not part of the stand-in surface
    with pytest.raises(RuntimeError):
        ipu.ipu_strategy.IPUStrategy()  # not configured yet
    cfg.auto_select_ipus = 1
    cfg.configure_ipu_system()
    strategy = ipu.ipu_strategy.IPUStrategy()
    with pytest.raises(ValueError, match="eager"):
        strategy.run(lambda: 1)
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    with pytest.raises(RuntimeError, match="scope"):
        model.set_asynchronous_callbacks(True)
    with strategy.scope():
        with pytest.raises(TypeError):
            model.set_gradient_accumulation_options(gradient_accumulation_steps=2)
        with pytest.raises(TypeError):
            model.set_gradient_accumulation_options(gradient_accumulation_steps_per_replica=2, num_mini_batches=2)
        with pytest.raises(ValueError):
            model.set_gradient_accumulation_options(gradient_accumulation_steps_per_replica=2,
                                                    gradient_accumulation_reduction_method="avg")


# ---------------------------------------------------------------------------
# the translation
# ---------------------------------------------------------------------------


@standin_only
def test_single_ipu_with_gradient_accumulation(sdk):
    spec = models.get("small_cnn")
    exe = hal.compile(spec, "tensorflow:ipu", hal.init_weights(spec), TrainConfig(grad_accum=2))
    assert str(exe.target) == "tensorflow:ipu:1"
    order = [n for n, _ in sdk.calls]
    assert order.index("configure_ipu_system") < order.index("IPUStrategy")
    assert sdk.named("configure_ipu_system") == [{"auto_select_ipus": 1}]
    assert sdk.named("set_pipeline_stage_assignment") == [] and sdk.named("set_pipelining_options") == []
    (ga,) = sdk.named("set_gradient_accumulation_options")
    assert ga == {"gradient_accumulation_steps_per_replica": 2, "reduction": GradientAccumulationReductionMethod.MEAN}
    assert sdk.named("set_asynchronous_callbacks") == [{"asynchronous": True}]
    assert sdk.named("compile")[-1] == {"steps_per_execution": 2}  # one weight update (G steps) per execution
    assert sdk.named("set_replication_options") == []  # one replica


@standin_only
def test_pipeline_stages_from_the_plan(sdk):
    spec = models.get("resnet18", num_classes=10, input_size=32)
    plan = planner.plan(spec, ipus=2, grad_accum=4, device_iterations=2, micro_batch=2, optimizer=SGD(momentum=0.9))
    config = TrainConfig(optimizer=SGD(lr=0.1, momentum=0.9), grad_accum=4)
    exe = hal.compile(spec, "tensorflow:ipu", config=config, plan=plan)
    assert str(exe.target) == "tensorflow:ipu:2"
    assert sdk.named("configure_ipu_system") == [{"auto_select_ipus": 2}]
    (assigned,) = sdk.named("set_pipeline_stage_assignment")
    stages = assigned["stages"]
    for s in plan.stages:  # every node's layer sits in its planned stage
        for node in s.nodes[1:] if s.index == 0 else s.nodes:
            assert stages[node] == s.index, node
    assert stages[T.CHANNELS_LAST] == 0
    assert set(stages.values()) == {0, 1}
    (po,) = sdk.named("set_pipelining_options")
    assert po["gradient_accumulation_steps_per_replica"] == 4
    assert po["reduction"] == GradientAccumulationReductionMethod.MEAN
    assert sdk.named("set_gradient_accumulation_options") == []
    assert sdk.named("compile")[-1] == {"steps_per_execution": 4 * 2}  # D weight updates of G micro-batches


@standin_only
def test_replicas_and_ipu_counts(sdk):
    spec = models.get("resnet18", num_classes=10, input_size=32)
    plan = planner.plan(spec, ipus=3, replicas=2, grad_accum=6, micro_batch=2, optimizer=SGD())
    exe = hal.compile(spec, "tensorflow:ipu", plan=plan)  # the config defaults to the plan's G and precision
    assert exe.config.grad_accum == 6
    # IPU Keras gives each replica a power of two of IPUs: 3 stages -> 4 IPUs, x 2 replicas
    assert sdk.named("configure_ipu_system")[-1] == {"auto_select_ipus": 8}
    assert str(exe.target) == "tensorflow:ipu:8"
    assert sdk.named("set_replication_options") == [{"replicated_metric_reduction_method": "MEAN"}]
    assert exe.graph.model.optimizer.grad_scale == 0.5  # IPU TF sums gradients over replicas; hal means them
    with pytest.raises(ConfigError, match="power of two"):
        hal.compile(spec, "tensorflow:ipu:6", config=TrainConfig(grad_accum=6), plan=plan)
    with pytest.raises(ConfigError, match="grad_accum"):
        hal.compile(spec, "tensorflow:ipu", config=TrainConfig(grad_accum=2), plan=plan)
    with pytest.raises(ConfigError, match="optimizer|SGD"):
        hal.compile(spec, "tensorflow:ipu", config=TrainConfig(grad_accum=6, optimizer=AdamW()), plan=plan)
    with pytest.raises(TargetError, match="IPU target"):
        hal.compile(spec, "tensorflow:cpu", plan=plan)
    with pytest.raises(ConfigError, match="another spec"):
        hal.compile(models.get("small_cnn"), "tensorflow:ipu", plan=plan)
    with pytest.raises(TargetError):
        hal.compile(spec, "tensorflow:ipu:x", hal.init_weights(spec))
    assert not [n for n in dir(T.TensorFlowBackend) if "plan" in n or "ipu" in n.lower()]  # one path: compile(plan=)


@standin_only
def test_ipu_refuses_float64(sdk):
    spec = models.get("small_cnn")
    with pytest.raises(UnsupportedError, match="fp32"):
        hal.compile(spec, "tensorflow:ipu", hal.init_weights(spec), TrainConfig(precision="fp64"))


# ---------------------------------------------------------------------------
# running it (stand-in: real Keras on the CPU)
# ---------------------------------------------------------------------------


@standin_only
@pytest.mark.parametrize("config", [
    TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    TrainConfig(optimizer=AdamW(lr=1e-2, weight_decay=0.05), schedule=Cosine(4, 1, 0.1)),
], ids=["sgd-momentum", "adamw-cosine"])
def test_fit_path_trains_like_torch(sdk, config):
    """One stage, G=1: ``fit`` with hal's Keras optimizer (torch semantics, schedule
    in the graph), BatchNorm statistics updated inside fit, per-step losses read
    back from the callbacks. Compared with float64 torch under hal.parity's
    trajectory rule: within FACTOR x the error of a plain float32 torch run."""
    pytest.importorskip("torch")
    spec = models.get("small_cnn")
    w = hal.init_weights(spec, 5)
    x, y = _data(spec, 8, seed=3)
    exe = hal.compile(spec, "tensorflow:ipu", w, config)
    losses = [exe.train_step(x, y)] + list(exe.run_steps(np.stack([x] * 3), np.stack([y] * 3)))
    assert exe.step == 4
    runs = {}
    for precision in ("fp64", "fp32"):
        ref = hal.compile(spec, "torch:cpu", w, replace(config, precision=precision))
        runs[precision] = (ref.run_steps(np.stack([x] * 4), np.stack([y] * 4)), ref.weights())

    def error(run):
        l_err = normalised_error(run[0], runs["fp64"][0])[1]
        trainable = set(spec.trainable())
        w_err = max(tensors_error({k: run[1][k] for k in ks}, {k: runs["fp64"][1][k] for k in ks})[1]
                    for ks in (trainable, set(runs["fp64"][1]) - trainable))
        return max(l_err, w_err)

    floor = error(runs["fp32"])
    assert error((np.array(losses), exe.weights())) <= tolerance(floor), f"floor {floor:.1e}"


@standin_only
def test_predict_and_gradients_through_strategy_run(sdk):
    spec = models.get("small_cnn")
    w = hal.init_weights(spec, 6)
    x, y = _data(spec, 6, seed=4)
    exe = hal.compile(spec, "tensorflow:ipu", w, TrainConfig(grad_accum=2))
    cpu = hal.compile(spec, "tensorflow:cpu", w, TrainConfig(grad_accum=2))
    np.testing.assert_allclose(exe.predict(x), cpu.predict(x), rtol=1e-5, atol=1e-6)  # model.predict, padded batches
    np.testing.assert_allclose(exe.predict(x[:5]), cpu.predict(x[:5]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exe.predict(x, training=True), cpu.predict(x, training=True), rtol=1e-5, atol=1e-6)
    assert sdk.named("run"), "training-mode forward goes through strategy.run"
    loss, grads = exe.loss_and_grads(x, y)
    loss0, grads0 = cpu.loss_and_grads(x, y)
    assert loss == pytest.approx(loss0, rel=1e-5)
    for k in grads0:
        np.testing.assert_allclose(grads[k], grads0[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="grad_accum"):
        exe.train_step(x[:5], y[:5])


@standin_only
def test_non_finite_step_is_not_applied(sdk):
    """A NaN in the 2nd of 3 batches, then in a single one: NonFiniteError naming the step; the variables
    (weights, BatchNorm buffers, momentum) are those of an executable that only
    saw the first batch."""
    spec = models.get("small_cnn")
    w = hal.init_weights(spec, 8)
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9))
    (x1, y1), (x2, y2) = _data(spec, 8, seed=6), _data(spec, 8, seed=7)
    bad = x2.copy()
    bad[0, 0, 3, 3] = np.nan
    exe = hal.compile(spec, "tensorflow:ipu", w, config)
    with pytest.raises(NonFiniteError, match=r"training step 1 \(batch 1 of this run_steps call\)") as info:
        exe.run_steps(np.stack([x1, bad, x2]), np.stack([y1, y2, y2]))
    assert info.value.step == 1 == exe.step
    for _ in range(2):  # a bad first batch, twice: the second restores what the first left
        with pytest.raises(NonFiniteError, match="training step 1 "):
            exe.train_step(bad, y2)
    ref = hal.compile(spec, "tensorflow:ipu", w, config)
    ref.train_step(x1, y1)
    for k, v in ref.weights().items():
        np.testing.assert_array_equal(exe.weights()[k], v, err_msg=k)
    assert exe.train_step(x2, y2) == ref.train_step(x2, y2)  # momentum buffers agree too
    for k, v in ref.weights().items():
        np.testing.assert_array_equal(exe.weights()[k], v, err_msg=k)


def _new_ops_spec():
    """One of each op kind added for modern CNNs, in a small classifier."""
    from hal.spec import SpecBuilder

    b = SpecBuilder("new_ops")
    x = b.group_norm(b.prelu(b.conv(b.input((4, 6, 6)), 8, 3, padding=1), 8), 2)
    x = b.channel_shuffle(x, 2)
    a, c = b.channel_slice(x, 0, 4), b.channel_slice(x, 4, 8)
    c = b.conv(b.pad(c, 1, "replicate"), 4, 3)
    gate = b.activation(b.adaptive_avg_pool(c, 1), "hardsigmoid")
    x = b.conv_transpose(b.scale(b.mul(a, gate)), 4, 2, stride=2)  # 12 x 12
    x = b.stochastic_depth(b.layer_norm(b.upsample(x, scale=0.75, mode="bilinear")), 0.0)  # 9 x 9
    x = b.max_pool(b.activation(b.adaptive_max_pool(x, 4), "hardswish"), 3, 2, ceil_mode=True)  # 2 x 2
    x = b.instance_norm(b.pad(x, 1, "reflect"), affine=True)
    return b.build(b.dense(b.flatten(x), 3))


@standin_only
def test_new_ops_through_the_ipu_path(sdk):
    """Every op added for modern CNNs runs on the IPU path as it does on the CPU:
    forward against float64 numpy, weights in canonical layouts, gradients and a
    ``fit`` step against float64 torch (hal.parity's float32 floors), and a
    two-stage pipeline places each op's layer in its planned stage."""
    pytest.importorskip("torch")
    from hal.backends.numpy import NumpyExecutable
    from hal.parity import grads_error, trajectory_error
    from tests.conftest import random_weights

    spec = _new_ops_spec()
    assert {n.op.kind for n in spec.nodes} >= {
        "GroupNorm", "PReLU", "ChannelShuffle", "ChannelSlice", "Pad", "AdaptiveAvgPool", "Mul", "Scale",
        "ConvTranspose", "Upsample", "LayerNorm", "StochasticDepth", "AdaptiveMaxPool", "MaxPool", "InstanceNorm"}
    w = random_weights(spec, 9, np.float32)
    x, y = _data(spec, 4, seed=9)
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9))
    exe = hal.compile(spec, "tensorflow:ipu", w, config)
    for k, v in exe.weights().items():
        np.testing.assert_array_equal(v, w[k], err_msg=k)

    ref = NumpyExecutable(spec, w, TrainConfig(precision="fp64")).predict(x)
    floor = normalised_error(NumpyExecutable(spec, w, TrainConfig(precision="fp32")).predict(x), ref)[1]
    assert normalised_error(exe.predict(x), ref)[1] <= tolerance(floor)

    torch = {p: hal.compile(spec, "torch:cpu", w, replace(config, precision=p)) for p in ("fp64", "fp32")}
    grads = {p: dict(zip(("loss", "grads"), t.loss_and_grads(x, y))) for p, t in torch.items()}
    floor = grads_error(grads["fp32"]["loss"], grads["fp32"]["grads"], grads["fp64"])[1]
    assert grads_error(*exe.loss_and_grads(x, y), grads["fp64"])[1] <= tolerance(floor)

    steps = {p: {"losses": np.array([t.train_step(x, y)]), "weights": t.weights()} for p, t in torch.items()}
    floor = trajectory_error(steps["fp32"]["losses"], steps["fp32"]["weights"], steps["fp64"], spec)[1]
    losses = np.array([exe.train_step(x, y)])
    assert trajectory_error(losses, exe.weights(), steps["fp64"], spec)[1] <= tolerance(floor)

    plan = planner.plan(spec, ipus=2, grad_accum=4, micro_batch=1, optimizer=config.optimizer)
    hal.compile(spec, "tensorflow:ipu", w, replace(config, grad_accum=4), plan=plan)
    stages = sdk.named("set_pipeline_stage_assignment")[-1]["stages"]
    for s in plan.stages:
        for node in s.nodes[1:] if s.index == 0 else s.nodes:
            assert stages[node] == s.index, node


def test_step_losses_from_running_means():
    """Keras logs the running mean of the loss; per-step losses come from differences."""
    micro = np.array([1.0, 3.0, 2.0, 6.0, 5.0, 7.0])
    running = np.cumsum(micro) / np.arange(1, 7)
    every_step = [(b, running[b]) for b in range(6)]
    np.testing.assert_allclose(IT._step_losses(every_step, 3, 2), [2.0, 4.0, 6.0])
    per_execution = [(3, running[3]), (5, running[5])]  # callbacks once per execution of 2 updates
    np.testing.assert_allclose(IT._step_losses(per_execution, 3, 2), [3.0, 3.0, 6.0])


def test_without_the_sdk_it_says_why(monkeypatch):
    if REAL_IPU:
        pytest.skip("Graphcore's TensorFlow is installed")
    monkeypatch.delitem(sys.modules, "tensorflow.python.ipu", raising=False)
    assert not IT.importable()
    assert "ipu" not in T.TensorFlowBackend.devices()
    spec = models.get("small_cnn")
    with pytest.raises(TargetError, match="IPU TensorFlow ships with Graphcore's Poplar SDK"):
        hal.compile(spec, "tensorflow:ipu:2", hal.init_weights(spec))


def test_documented_signatures_match_the_stand_in():
    """The stand-in's extension methods take exactly the keywords the SDK 3.x docs list."""
    ext = make_extensions(Record())
    params = lambda f: [p for p in inspect.signature(f).parameters if p != "self"]  # noqa: E731
    assert params(ext["set_pipelining_options"]) == [
        "gradient_accumulation_steps_per_replica", "device_mapping", "accumulate_outfeed",
        "gradient_accumulation_reduction_method", "pipelining_kwargs"]
    assert params(ext["set_gradient_accumulation_options"]) == [
        "gradient_accumulation_steps_per_replica", "gradient_accumulation_reduction_method",
        "use_v2_gradient_accumulation_optimizer", "gradient_accumulation_optimizer_kwargs"]


# ---------------------------------------------------------------------------
# the real thing, when the SDK is here
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_IPU, reason="Graphcore's TensorFlow (Poplar SDK) is not installed: "
                                         "the IPU Model smoke test needs it")
def test_smoke_on_the_ipu_model(monkeypatch):
    monkeypatch.setenv("TF_POPLAR_FLAGS", (os.environ.get("TF_POPLAR_FLAGS", "") + " --use_ipu_model").strip())
    spec = models.get("small_cnn")
    w = hal.init_weights(spec, 7)
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9), grad_accum=2)
    x, y = _data(spec, 8, seed=5)
    exe = hal.compile(spec, "tensorflow:ipu", w, config)
    cpu = hal.compile(spec, "tensorflow:cpu", w, config)
    np.testing.assert_allclose(exe.predict(x), cpu.predict(x), rtol=1e-3, atol=1e-3)
    assert exe.train_step(x, y) == pytest.approx(cpu.train_step(x, y), rel=1e-3)
    for k, v in cpu.weights().items():
        np.testing.assert_allclose(exe.weights()[k], v, rtol=1e-3, atol=1e-3)
