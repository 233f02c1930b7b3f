"""Contract tests of ``tensorflow:ipu`` (the IPU translation in hal.backends.ipu_tensorflow,
reached only as ``hal.compile(spec, "tensorflow:ipu[:N]", ..., plan=plan)``).

Without Graphcore's SDK these run against the STRICT STAND-IN of the IPU TensorFlow 2
SDK in ``tests/ipu_tensorflow_standin.py`` (what it models, and from which Graphcore
source, is in its docstring). ``compile``/``fit``/``predict`` stay real Keras on the
CPU, so the fit path (hal's Keras optimizer with torch semantics, BatchNorm updates,
the per-step loss read back through callbacks) is compared with ``torch:cpu``;
pipelining, gradient accumulation and replication inside ``fit`` are the SDK's and
are checked as configuration, plus the compiler's pipeline-iteration rule, which the
stand-in enforces independently of hal's planner. Keras 2 (Graphcore's SDK is
TensorFlow 2.6 with Keras 2) runs through ``tf_keras`` in a subprocess.

When Graphcore's TensorFlow is importable, the stand-in tests are skipped and the
smoke test at the end runs on the IPU Model (``TF_POPLAR_FLAGS=--use_ipu_model``).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest

import hal
from hal import ConfigError, InputError, TargetError, TrainConfig, ipu as planner, models
from hal.lowering import IPU_STATIC_LOSS_SCALE
from hal.backends import ipu_tensorflow as IT, tensorflow as T
from hal.errors import NonFiniteError, UnsupportedError
from hal.parity import normalised_error, tensors_error, tolerance
from hal.training import SGD, AdamW, Cosine

if not T.TensorFlowBackend.availability().available:
    pytest.skip("TensorFlow is not installed: pip install 'hal-cnn[tensorflow]'", allow_module_level=True)
tf = T._tf()  # as hal imports it: after Triton (see T._load_triton_first), so torch can run here too

from tests import ipu_tensorflow_standin as SI  # noqa: E402 - after TensorFlow is imported the hal way

REAL_IPU = IT.importable() and "tensorflow.python.ipu" not in sys.modules
standin_only = pytest.mark.skipif(
    REAL_IPU, reason="Graphcore's TensorFlow is installed: the IPU Model smoke test runs instead"
)


@pytest.fixture(params=[SI.SDK], ids=lambda v: "sdk%d.%d" % v)
def sdk(request):
    """The stand-in installed (SDK 3.4 unless parametrised indirectly); yields its Record."""
    if REAL_IPU:
        pytest.skip("Graphcore's TensorFlow is installed: the IPU Model smoke test runs instead")
    record, undo = SI.install(request.param)
    try:
        yield record
    finally:
        undo()


def _tf_plan(spec, **kwargs):
    return planner.plan(spec, framework="tensorflow", **kwargs)


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


def _pipelined_keras_model(strategy, stages):
    """A tiny functional model with one Dense layer per pipeline stage, assigned in order."""
    inp = tf.keras.Input((4,))
    x = inp
    for _ in range(stages):
        x = tf.keras.layers.Dense(4)(x)
    model = tf.keras.Model(inp, x)
    with strategy.scope():
        assignment = model.get_pipeline_stage_assignment()
        for i, a in enumerate(assignment):
            a.pipeline_stage = i
        model.set_pipeline_stage_assignment(assignment)
    return model


@standin_only
def test_stand_in_enforces_the_compilers_pipeline_rule(sdk):
    """pipeline_visitor.cc: iterations a multiple of, and at least, the overlap length
    (Grouped: 2S training, S inference; Interleaved: the CircularUnion; Sequential: 1).
    hal's old defaults (S=4, G=2S-1=7, PopTorch's rule) fail; computed here without hal's planner."""
    ipu = sys.modules["tensorflow.python.ipu"]
    cfg = ipu.config.IPUConfig()
    cfg.auto_select_ipus = 4
    cfg.configure_ipu_system()
    strategy = ipu.ipu_strategy.IPUStrategy()
    schedule = ipu.ops.pipelining_ops.PipelineSchedule
    model = _pipelined_keras_model(strategy, 4)
    x, y = np.zeros((16, 4), np.float32), np.zeros((16, 4), np.float32)
    with strategy.scope():
        model.set_pipelining_options(gradient_accumulation_steps_per_replica=7)
        model.compile(optimizer="sgd", loss="mse", steps_per_execution=7)
        with pytest.raises(tf.errors.FailedPreconditionError, match="must be a multiple of 8, but it is 7"):
            model.fit(x[:7], y[:7], batch_size=1, epochs=1, verbose=0)
        with pytest.raises(TypeError):
            model.set_pipelining_options(gradient_accumulation_steps_per_replica=8, pipeline_schedule="Grouped")
    assert SI.overlap_length(schedule.Grouped, [0, 1, 2, 3], training=True) == 8
    assert SI.overlap_length(schedule.Grouped, [0, 1, 2, 3], training=False) == 4
    assert SI.overlap_length(schedule.Interleaved, [0, 1, 2, 3], training=True) == 4
    assert SI.overlap_length(schedule.Sequential, [0, 1, 2, 3], training=True) == 1
    # pipeline_visitor_utils.h's own CircularUnion example: [0, 1, 2, 0, 0, 2, 1, 0] -> rotations [0, 2]
    assert SI._circular_union([0, 1, 2, 0, 0, 2, 1, 0]) == [0, 2]
    with pytest.raises(tf.errors.FailedPreconditionError, match="at least 8"):
        SI.verify_pipeline_iterations(0, schedule.Grouped, [0, 1, 2, 3], training=True)


@standin_only
def test_hal_refuses_plans_the_sdk_would_reject(sdk):
    """A plan checked against PopTorch's rules, or violating IPU TensorFlow's, is refused
    with the rule's explanation before anything reaches the SDK."""
    spec = models.get("resnet18", num_classes=10, input_size=32)
    config = TrainConfig(grad_accum=7)
    poptorch_plan = planner.plan(spec, ipus=4, grad_accum=7, micro_batch=2)  # PopTorch accepts 2S - 1 = 7
    with pytest.raises(ConfigError, match="framework='tensorflow'"):
        hal.compile(spec, "tensorflow:ipu", config=config, plan=poptorch_plan)
    plan = replace(_tf_plan(spec, ipus=4, grad_accum=7, micro_batch=2, schedule="sequential"), schedule="grouped")
    with pytest.raises(ConfigError, match="multiple of 8 and >= 8.*Nearest accepted: 8"):
        hal.compile(spec, "tensorflow:ipu", config=config, plan=plan)
    assert sdk.named("configure_ipu_system") == []
    with pytest.raises(ConfigError, match="multiple of 8"):  # hal's own default plan for 4 IPUs and G=7
        hal.compile(spec, "tensorflow:ipu:4", hal.init_weights(spec), config)
    exe = hal.compile(spec, "tensorflow:ipu", config=config, plan=replace(plan, schedule="sequential"))
    (po,) = sdk.named("set_pipelining_options")
    assert po["pipeline_schedule"] == SI.PipelineSchedule.Sequential and po["device_mapping"] == [0, 1, 2, 3]
    assert exe.num_ipus == 4


@standin_only
@pytest.mark.parametrize("recompute", [True, False])
def test_pipeline_recomputation_needs_allow_recompute(sdk, recompute):
    """IPU TensorFlow recomputes pipeline stages only with IPUConfig.allow_recompute
    (pipelining_ops.pipeline's docstring); hal sets it both ways, and the mode with it."""
    spec = models.get("resnet18", num_classes=10, input_size=32)
    plan = _tf_plan(spec, ipus=2, grad_accum=4, micro_batch=2, recompute=recompute)
    hal.compile(spec, "tensorflow:ipu", config=TrainConfig(grad_accum=4), plan=plan)
    assert sdk.configured["allow_recompute"] is recompute
    (po,) = sdk.named("set_pipelining_options")
    assert po.get("recomputation_mode") == (SI.RecomputationMode.Auto if recompute else None)


@standin_only
@pytest.mark.parametrize("sdk", [(3, 4), (2, 4)], indirect=True, ids=["sdk3.4", "sdk2.4"])
@pytest.mark.parametrize("precision,half_partials,partials,master", [
    ("16.16", True, "half", "float16"), ("16.32", False, "float", "float32"), ("fp32", False, None, "float32")])
def test_precisions_and_memory_proportion_in_the_ipu_config(sdk, precision, half_partials, partials, master):
    """Graphcore's TF2 ResNet50 (vision/cnns/tensorflow2/ipu_config.py, precision.py):
    partialsType (the plan's half_partials) and availableMemoryProportion as convolution
    and matmul Poplar options, stochastic rounding (esr: StochasticRoundingBehaviour from
    SDK 2.5, a bool before); "<compute>.<master>": 16.16 fp16 weights, 16.32 fp32 master
    weights under mixed_float16 (fp16 convolutions, fp32 BatchNorm)."""
    spec = models.get("small_cnn")
    plan = _tf_plan(spec, precision=precision, available_memory_proportion=0.15, half_partials=half_partials)
    exe = hal.compile(spec, "tensorflow:ipu", hal.init_weights(spec), TrainConfig(precision=precision), plan=plan)
    cfg = sdk.configured
    for key in ("convolutions.poplar_options", "matmuls.poplar_options"):
        assert cfg[key].get("partialsType") == partials
        assert cfg[key]["availableMemoryProportion"] == "0.15"
    on = SI.StochasticRoundingBehaviour.ON if sdk.sdk >= (2, 5) else True
    off = SI.StochasticRoundingBehaviour.OFF if sdk.sdk >= (2, 5) else False
    assert cfg["floating_point_behaviour.esr"] == (on if partials else off)
    assert exe.dtype == master
    assert {v.dtype.name for v, _, _ in exe.graph.variables.values()} == {master}
    conv = exe.graph.layers["conv1"]
    assert conv.compute_dtype == ("float16" if partials else "float32")
    assert exe.graph.layers["bn1"].compute_dtype == master
    assert exe.graph.model.optimizer.loss_scale == (IPU_STATIC_LOSS_SCALE if partials else 1.0)
    with pytest.raises(TargetError, match="tensorflow:ipu only"):
        hal.compile(spec, "tensorflow:cpu", hal.init_weights(spec), TrainConfig(precision="16.16"))


@standin_only
@pytest.mark.parametrize("sdk", [(3, 0)], indirect=True, ids=["sdk3.0"])
def test_replicas_need_replication_options(sdk):
    """IPU Keras returns the LAST replica's metrics unless set_replication_options (SDK >= 3.1)
    asks for the MEAN hal's loss is; before it hal refuses replicas."""
    spec = models.get("resnet18", num_classes=10, input_size=32)
    plan = _tf_plan(spec, ipus=2, replicas=2, grad_accum=4, micro_batch=2)
    with pytest.raises(UnsupportedError, match="last replica"):
        hal.compile(spec, "tensorflow:ipu", config=TrainConfig(grad_accum=4), plan=plan)
    assert set(SI.ReplicatedMetricReductionMethod.__members__) == {"NONE", "LIST", "SUM", "MEAN"}
    with pytest.raises(ValueError):
        SI.ReplicatedMetricReductionMethod.parse("MIN")


@standin_only
def test_data_parallel_without_a_plan_is_refused(sdk):
    """tensorflow:ipu replicates inside the IPU graph (the plan's replicas); a DataParallel config alone would
    silently run one replica."""
    spec = models.get("small_cnn")
    with pytest.raises(UnsupportedError, match="replicates through an IPU plan"):
        hal.compile(spec, "tensorflow:ipu", config=TrainConfig(data_parallel=hal.DataParallel(replicas=2)))


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
    assert ga == {"gradient_accumulation_steps_per_replica": 2, "reduction": SI.GradientAccumulationReductionMethod.MEAN}
    assert sdk.named("set_asynchronous_callbacks") == [{"asynchronous": True}]
    assert sdk.named("compile")[-1] == {"steps_per_execution": 2}  # one weight update (G steps) per execution
    assert sdk.named("set_replication_options") == []  # one replica


@standin_only
def test_pipeline_stages_from_the_plan(sdk):
    spec = models.get("resnet18", num_classes=10, input_size=32)
    plan = _tf_plan(spec, ipus=2, grad_accum=4, device_iterations=2, micro_batch=2, optimizer=SGD(momentum=0.9))
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
    assert po["reduction"] == SI.GradientAccumulationReductionMethod.MEAN
    assert sdk.named("set_gradient_accumulation_options") == []
    assert sdk.named("compile")[-1] == {"steps_per_execution": 4 * 2}  # D weight updates of G micro-batches


@standin_only
def test_replicas_and_ipu_counts(sdk):
    spec = models.get("resnet18", num_classes=10, input_size=32)
    plan = _tf_plan(spec, ipus=3, replicas=2, grad_accum=6, micro_batch=2, optimizer=SGD())
    exe = hal.compile(spec, "tensorflow:ipu", plan=plan)  # the config defaults to the plan's G and precision
    assert exe.config.grad_accum == 6
    # IPU Keras gives each replica a power of two of IPUs: 3 stages -> 4 IPUs, x 2 replicas
    assert sdk.named("configure_ipu_system")[-1] == {"auto_select_ipus": 8}
    assert str(exe.target) == "tensorflow:ipu:8"
    assert sdk.named("set_replication_options") == [
        {"replicated_metric_reduction_method": SI.ReplicatedMetricReductionMethod.MEAN}]
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
def test_weight_updates_below_half_an_fp16_ulp(sdk):
    """16.16 keeps weights and optimizer state in fp16: an update smaller than half an
    fp16 ulp of its weight rounds away (round-to-nearest here; the IPU's stochastic
    rounding keeps it in expectation). 16.32 keeps fp32 master weights and state: the
    update is the fp32 run's, up to fp16 rounding of the gradient (unit roundoff 2^-11)."""
    spec = models.get("small_cnn")
    w = hal.init_weights(spec, 11)
    x, y = _data(spec, 8, seed=11)
    lr = 5e-4  # lr |g| below 2^-14 here, far above fp32's rounding of the weights
    runs = {}
    for precision in ("fp32", "16.16", "16.32"):
        exe = hal.compile(spec, "tensorflow:ipu", w, TrainConfig(optimizer=SGD(lr=lr, momentum=0.9),
                                                                 precision=precision))
        exe.train_step(x, y)
        slots = {v.dtype.name for v in exe._variables() if "momentum" in v.name}
        assert slots == {exe.dtype}, (precision, slots)
        runs[precision] = exe.weights()
    kernels = [k for k in spec.trainable() if k.endswith("weight") and np.ndim(w[k]) > 1]
    delta32 = {k: runs["fp32"][k] - w[k] for k in kernels}
    big = {k: np.abs(w[k]) >= 0.25 for k in kernels}  # half an fp16 ulp there: 2^-13 = 1.2e-4 > 2 lr |g|
    assert max(np.abs(delta32[k]).max() for k in kernels) < 2.0**-14
    assert sum(int(b.sum()) for b in big.values()) > 100
    for k in kernels:
        np.testing.assert_array_equal(runs["16.16"][k][big[k]], w[k].astype(np.float16)[big[k]], err_msg=k)
        moved = runs["16.32"][k] - w[k]
        assert runs["16.32"][k].dtype == np.float32
        bound = 0.05 * np.abs(delta32[k]).max() + 2 * np.spacing(np.abs(w[k]))  # fp16 gradients; fp32 rounding
        assert (np.abs(moved - delta32[k]) <= bound).all(), k
    assert sum(int((runs["16.32"][k] != w[k])[big[k]].sum()) for k in kernels) > 100


@standin_only
def test_adam_eps_below_fp16_in_16_16_is_refused(sdk):
    spec = models.get("small_cnn")
    with pytest.raises(UnsupportedError, match="eps=1e-08 rounds to 0.*'16.32'"):
        hal.compile(spec, "tensorflow:ipu", hal.init_weights(spec), TrainConfig(optimizer=AdamW(), precision="16.16"))
    hal.compile(spec, "tensorflow:ipu", hal.init_weights(spec), TrainConfig(optimizer=AdamW(), precision="16.32"))


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

    plan = _tf_plan(spec, ipus=2, grad_accum=4, micro_batch=1, optimizer=config.optimizer)
    hal.compile(spec, "tensorflow:ipu", w, replace(config, grad_accum=4), plan=plan)
    stages = sdk.named("set_pipeline_stage_assignment")[-1]["stages"]
    for s in plan.stages:
        for node in s.nodes[1:] if s.index == 0 else s.nodes:
            assert stages[node] == s.index, node


@standin_only
def test_pipelined_batchnorm_statistics_through_gradients(sdk):
    """A pipelined model (Sequential schedule, G = 1: the compiler accepts any count)
    trains like float64 torch, running statistics included: they reach the optimizer
    as gradients (no weight decay, no momentum on them), never assigned in a stage's
    forward (the stand-in refuses that, as the SDK leaves it undefined), and stay out
    of the trainable parameters."""
    pytest.importorskip("torch")
    spec = models.get("small_cnn")
    w = hal.init_weights(spec, 5)
    x, y = _data(spec, 8, seed=3)
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9, weight_decay=1e-2))
    plan = _tf_plan(spec, ipus=2, grad_accum=1, micro_batch=8, schedule="sequential", optimizer=config.optimizer)
    exe = hal.compile(spec, "tensorflow:ipu", w, config, plan=plan)
    assert sdk.named("set_pipelining_options")[0]["pipeline_schedule"] == SI.PipelineSchedule.Sequential
    losses = exe.run_steps(np.stack([x] * 3), np.stack([y] * 3))
    runs = {p: hal.compile(spec, "torch:cpu", w, replace(config, precision=p)) for p in ("fp64", "fp32")}
    ref = {p: (t.run_steps(np.stack([x] * 3), np.stack([y] * 3)), t.weights()) for p, t in runs.items()}
    stats = [k for k in ref["fp64"][1] if k.endswith(("running_mean", "running_var"))]
    assert stats
    floor = max(normalised_error(ref["fp32"][0], ref["fp64"][0])[1],
                tensors_error({k: ref["fp32"][1][k] for k in stats}, {k: ref["fp64"][1][k] for k in stats})[1])
    got = max(normalised_error(losses, ref["fp64"][0])[1],
              tensors_error({k: exe.weights()[k] for k in stats}, {k: ref["fp64"][1][k] for k in stats})[1])
    assert got <= tolerance(floor), f"floor {floor:.1e}"
    assert not [k for k in exe.train_names if k.endswith(("running_mean", "running_var"))]


@standin_only
def test_stand_in_refuses_state_updates_inside_a_pipeline(sdk):
    """Keras's own BatchNormalization assigns its moving statistics in the forward:
    undefined in a pipeline (graphcore/keras pipeline_test.py), an error in the stand-in.
    (Keras 2's path, ``assign_sub``, is checked in the tf_keras subprocess test.)"""
    with pytest.raises(RuntimeError, match="inside a pipeline stage"):
        fit_keras_batchnorm_in_a_pipeline()


def fit_keras_batchnorm_in_a_pipeline():
    """``fit`` a two-stage pipeline whose first stage is Keras's BatchNormalization (stand-in installed)."""
    ipu = sys.modules["tensorflow.python.ipu"]
    cfg = ipu.config.IPUConfig()
    cfg.auto_select_ipus = 2
    cfg.configure_ipu_system()
    strategy = ipu.ipu_strategy.IPUStrategy()
    inp = tf.keras.Input((4,))
    model = tf.keras.Model(inp, tf.keras.layers.Dense(1)(tf.keras.layers.BatchNormalization()(inp)))
    with strategy.scope():
        assignment = model.get_pipeline_stage_assignment()
        for i, a in enumerate(assignment):
            a.pipeline_stage = i
        model.set_pipeline_stage_assignment(assignment)
        model.set_pipelining_options(gradient_accumulation_steps_per_replica=1,
                                     pipeline_schedule=ipu.ops.pipelining_ops.PipelineSchedule.Sequential)
        model.compile(optimizer="sgd", loss="mse", steps_per_execution=1)
        model.fit(np.ones((4, 4), np.float32), np.ones((4, 1), np.float32), batch_size=2, verbose=0)


def test_running_statistic_update_of_a_pipelined_step():
    """The optimizer's update of a running statistic: r = d r + (1 - d) s, d = (1 - m)^G,
    against the closed form (and, for equal statistics, G canonical updates)."""
    m, g, r0, s = 0.1, 4, 2.0, 0.5
    var = tf.Variable([r0])
    opt = IT._keras_torch_optimizer()(TrainConfig(), stats=[(var, (1 - m) ** g)])
    opt.apply_gradients([(tf.constant([s]), var)])
    canonical = r0
    for _ in range(g):
        canonical = (1 - m) * canonical + m * s
    assert var.numpy()[0] == pytest.approx(canonical, rel=1e-6)


_KERAS2_SCRIPT = """
import sys, numpy as np
import hal
from hal import TrainConfig, models, ipu as planner
from hal.backends import tensorflow as T, ipu_tensorflow as IT
from hal.training import SGD
tf = T._tf()
from tests import ipu_tensorflow_standin as SI
assert not tf.keras.__name__.startswith("keras."), tf.keras.__name__  # Keras 2 (tf_keras)
record, undo = SI.install()
spec = models.get("small_cnn")
w = hal.init_weights(spec, 5)
r = np.random.default_rng(3)
x, y = r.standard_normal((8, *spec.input_shape)).astype(np.float32), r.integers(0, 10, 8)
config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9))
ipu = hal.compile(spec, "tensorflow:ipu", w, config)
assert isinstance(ipu.graph.model.optimizer, IT._optimizer_v2(tf.keras)), type(ipu.graph.model.optimizer).__mro__
plan = planner.plan(spec, ipus=2, grad_accum=1, micro_batch=8, schedule="sequential", framework="tensorflow",
                    optimizer=config.optimizer)
piped = hal.compile(spec, "tensorflow:ipu", w, config, plan=plan)
cpu = hal.compile(spec, "tensorflow:cpu", w, config)
out = {}
for name, exe in (("ipu", ipu), ("pipelined", piped), ("cpu", cpu)):
    losses = exe.run_steps(np.stack([x] * 2), np.stack([y] * 2))
    out[name] = (losses, exe.weights())
for name in ("ipu", "pipelined"):
    np.testing.assert_allclose(out[name][0], out["cpu"][0], rtol=1e-5)
    for k, v in out["cpu"][1].items():
        np.testing.assert_allclose(out[name][1][k], v, rtol=1e-4, atol=1e-6, err_msg=name + " " + k)
undo()
from tests.test_ipu_tensorflow_contract import fit_keras_batchnorm_in_a_pipeline
record, undo = SI.install()
try:
    fit_keras_batchnorm_in_a_pipeline()
    raise AssertionError("the stand-in let Keras 2's BatchNormalization update its statistics in a pipeline")
except RuntimeError as exc:
    assert "inside a pipeline stage" in str(exc), exc
print("KERAS2 OK", tf.keras.__name__)
"""


@standin_only
@pytest.mark.skipif(importlib.util.find_spec("tf_keras") is None, reason="tf_keras (Keras 2) is not installed")
def test_keras2_paths_run_with_tf_keras():
    """Graphcore's SDK is TensorFlow 2.6 with Keras 2: hal's Keras 2 paths (OptimizerV2
    hooks, Keras 2 variables and weight lists) run under tf_keras (TF_USE_LEGACY_KERAS=1,
    a fresh process) through the stand-in, single stage and pipelined, and train exactly
    as tensorflow:cpu does there (BatchNorm statistics included); the stand-in refuses
    Keras 2's own BatchNormalization updating its statistics in a pipeline."""
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_KERAS2_SCRIPT)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "KERAS2 OK tf_keras" in done.stdout, done.stderr[-3000:]


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
    ext = SI.make_extensions(SI.Record())
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
