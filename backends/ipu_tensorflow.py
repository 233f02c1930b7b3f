"""Graphcore IPU TensorFlow: ``tensorflow:ipu[:N]``, hal's IPU plan -> IPU TensorFlow's Keras API.

Reached only through :class:`hal.backends.tensorflow.TensorFlowBackend` (target
``tensorflow:ipu[:N]``, a plan passed as ``hal.compile(spec, "tensorflow:ipu",
plan=plan)``). It reuses that module's Keras model, layers and ``torch.optim``
update, and adds what only the IPU needs: the SDK import, the plan's translation
(:class:`IPUExecutable`), a Keras optimizer running the canonical update inside
``fit`` and the per-step losses read back from Keras callbacks.

Graphcore's TensorFlow (``tensorflow.python.ipu``) ships with the Poplar SDK and
is not on PyPI; importing this module imports no TensorFlow.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from hal import spec as S
from hal.backend import Executable, Target, Weights
from hal.backends.tensorflow import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    MIXED_POLICY,
    KerasGraph,
    TensorFlowExecutable,
    _keras,
    _loss,
    _raw,
    _tf,
    build_keras_model,
    slot_names,
    torch_update,
)
from hal.errors import BackendUnavailable, ConfigError, HalError, InputError, UnsupportedError
from hal.lowering import IPU_PRECISIONS, IPU_STATIC_LOSS_SCALE, MASTER_DTYPE
from hal.training import SGD, AdamW, Constant, Cosine, StepDecay, TrainConfig

if TYPE_CHECKING:
    from hal.ipu import Plan

PRECISIONS = ("fp32", *IPU_PRECISIONS)  # Graphcore's "<compute>.<master weights>" precisions: tensorflow:ipu's only
# "16.32" keeps fp32 master weights under Keras's mixed_float16 policy, as Graphcore's TF2 ResNet50 does
# (graphcore/examples vision/cnns/tensorflow2/precision.py: "16.16" is the float16 policy, "16.32" mixed_float16).
_MIXED = {"16.32": MIXED_POLICY["fp16"]}

IPU_REASON = (
    "IPU TensorFlow ships with Graphcore's Poplar SDK (it is not on PyPI): install the SDK's "
    "TensorFlow 2 wheel and enable the SDK (source enable.sh); set TF_POPLAR_FLAGS=--use_ipu_model "
    "to run on the IPU Model simulator without hardware"
)


def importable() -> bool:
    """Is Graphcore's ``tensorflow.python.ipu`` here? Checked on disk, without importing TensorFlow."""
    if "tensorflow.python.ipu" in sys.modules:
        return True
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "python" / "ipu" / "__init__.py").is_file() for p in spec.submodule_search_locations)


def _ipu() -> Any:
    """``tensorflow.python.ipu`` (Graphcore's SDK), or a hal error saying how to get it."""
    if not importable():
        raise BackendUnavailable(f"tensorflow:ipu is not available: {IPU_REASON}")
    _tf()
    try:
        from tensorflow.python import ipu  # Graphcore's docs: import it directly, not via tf.*
    except Exception as exc:
        raise BackendUnavailable(
            f"tensorflow:ipu: importing tensorflow.python.ipu failed: {exc!r}. {IPU_REASON}"
        ) from exc
    return ipu


# ---------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def default_plan(spec: S.ModelSpec, config: TrainConfig, num_ipus: int | None) -> "Plan":
    """hal's IPU plan for ``tensorflow:ipu[:N]`` without one: an N-stage pipeline
    (default 1), one replica, balanced by :func:`hal.ipu.plan` under IPU
    TensorFlow's rules; other layouts (replicas, device iterations, schedule,
    recomputation) come as ``hal.compile(..., plan=)``."""
    from hal import ipu as planner

    try:
        return planner.plan(spec, ipus=num_ipus or 1, grad_accum=config.grad_accum, optimizer=config.optimizer,
                            precision=config.precision, framework="tensorflow")
    except HalError as exc:
        raise ConfigError(f"tensorflow:ipu:{num_ipus or 1}: {exc}") from None


def check_plan(plan: "Plan", config: TrainConfig) -> None:
    """The plan (made for this spec: :func:`hal.compile` checked) must be one IPU
    TensorFlow accepts and agree with the training config.

    The pipeline's iteration count is checked with :func:`hal.ipu.check_pipeline`
    (the compiler's rule per schedule, e.g. Grouped: a multiple of, and at least,
    2 x stages in training), here rather than at the SDK's first ``fit``.
    """
    from hal import ipu as planner

    if config.precision != plan.precision:
        raise ConfigError(f"the IPU plan is for precision {plan.precision!r}, the training config says "
                          f"{config.precision!r}: make them equal")
    if plan.framework != "tensorflow":
        raise ConfigError(f"the IPU plan was checked against {plan.framework}'s rules; tensorflow:ipu needs one made "
                          "with framework='tensorflow' (hal plan ... --framework tensorflow)")
    if plan.recompute_checkpoints:
        raise UnsupportedError("tensorflow:ipu has no recomputation checkpoints yet (the plan names "
                               f"{len(plan.recompute_checkpoints)}); plan without them")
    if plan.training and plan.batch.grad_accum != config.grad_accum:
        raise ConfigError(f"the IPU plan accumulates {plan.batch.grad_accum} micro-batches, the training config "
                          f"says grad_accum={config.grad_accum}: make them equal")
    if plan.training and plan.state_tensors != planner.optimizer_state_tensors(config.optimizer):
        raise ConfigError(f"the IPU plan was made for {plan.optimizer}, the training config uses {config.optimizer!r}")
    if len(plan.stages) > 1:
        iterations = plan.batch.grad_accum if plan.training else plan.batch.device_iterations
        planner.check_pipeline("tensorflow", plan.schedule, len(plan.stages), iterations, training=plan.training,
                               device_mapping=plan.device_mapping)


def _check_optimizer_state(config: TrainConfig) -> None:
    """Optimizer state is kept in the master weights' dtype (Keras slots take their
    variable's dtype, as in Graphcore's TF2 optimizers): fp16 in "16.16". Adam's
    ``eps`` must then be an fp16 number, or an update whose second moment
    underflowed (``(1 - beta2) g^2`` below fp16's 6e-8) divides by zero."""
    o = config.optimizer
    if config.precision == "16.16" and not isinstance(o, SGD) and np.float16(o.eps) == 0:
        raise UnsupportedError(
            f"tensorflow:ipu: precision '16.16' keeps {type(o).__name__}'s state in fp16, where eps={o.eps:g} "
            "rounds to 0 (fp16's smallest number is 6e-8), so an update whose second moment underflows divides by "
            "zero: use precision '16.32' (fp32 master weights and optimizer state), an eps >= 6e-8, or SGD")


def _stage_assignment(model: Any, graph: KerasGraph, stage_of: Mapping[str, int], stages: int) -> list[Any]:
    """Set ``pipeline_stage`` on each of ``model.get_pipeline_stage_assignment()``
    (one per layer invocation, input layers excluded, in post order): a node's
    layer goes to the node's stage; the boundary transposes go to the first and
    last stages."""
    by_layer = {id(layer): stage_of[name] for name, layer in graph.layers.items()}
    assignments = model.get_pipeline_stage_assignment()
    for a in assignments:
        name = a.layer.name
        if id(a.layer) in by_layer:
            a.pipeline_stage = by_layer[id(a.layer)]
        elif name.startswith(CHANNELS_LAST):
            a.pipeline_stage = 0
        elif name.startswith(CHANNELS_FIRST):
            a.pipeline_stage = stages - 1
        else:
            raise UnsupportedError(f"tensorflow:ipu: layer {name!r} of the Keras model belongs to no node of the spec")
    return assignments


_KERAS_OPT: list[type] = []


def _optimizer_v2(keras: Any) -> type | None:
    """Keras 2's ``OptimizerV2`` (``_create_slots``/``_resource_apply_dense``), the
    optimizer Graphcore's TF 2.6 Keras wraps for gradient accumulation and
    pipelining: ``keras.optimizers.Optimizer`` there, ``keras.optimizers.legacy.Optimizer``
    in ``tf_keras`` >= 2.11 (whose ``Optimizer`` is the newer one); None under Keras 3."""
    legacy = getattr(getattr(keras.optimizers, "legacy", None), "Optimizer", None)
    for cls in (keras.optimizers.Optimizer, legacy):
        if isinstance(cls, type) and hasattr(cls, "_create_slots"):
            return cls
    return None


def _keras_torch_optimizer() -> type:
    """A Keras optimizer running :func:`torch_update`, for ``model.fit`` on the IPU.

    IPU TensorFlow's ``fit`` wraps ``model.optimizer`` (gradient accumulation,
    replication) and calls its ``apply_gradients``, so the canonical update must
    live in a Keras optimizer: Keras 2's ``OptimizerV2`` hooks (``_create_slots``,
    ``_resource_apply_dense``; Graphcore's port) and Keras 3's (``build``,
    ``update_step``) both call the same :func:`torch_update`; ``minimize`` is not
    overridden (Graphcore's Keras rejects optimizers that override it). The
    learning rate is a ``LearningRateSchedule`` of the optimizer step, the torch
    scalars are computed in the graph from it. ``grad_scale`` turns the
    cross-replica *sum* of gradients that IPU TensorFlow performs into hal's mean
    and undoes the static loss scale.

    ``stats`` pairs BatchNorm running-statistic variables (pipelined models, see
    :func:`_running_statistics`) with their decay per update: their "gradient" is the mean
    batch statistic of the update's micro-batches, applied as ``r = d r + (1 - d) s``.
    """
    if _KERAS_OPT:
        return _KERAS_OPT[0]
    tf, keras = _tf(), _keras()
    v2 = _optimizer_v2(keras)

    class Schedule(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, config: TrainConfig) -> None:
            self.config = config

        def __call__(self, step: Any) -> Any:
            return _lr_graph(self.config, tf.cast(step, tf.float32))

        def get_config(self) -> dict[str, Any]:
            return {"config": repr(self.config)}

    class TorchOptimizer(v2 or keras.optimizers.Optimizer):  # type: ignore[misc]
        def __init__(self, config: TrainConfig, grad_scale: float = 1.0, loss_scale: float = 1.0,
                     stats: Sequence[tuple[Any, float]] = (), name: str = "hal_torch_optimizer") -> None:
            if v2 is None:
                super().__init__(learning_rate=Schedule(config), name=name)
            else:
                super().__init__(name=name)
                self._set_hyper("learning_rate", Schedule(config))
            self.hal_config, self.slot_names = config, slot_names(config)
            self.grad_scale, self.loss_scale = grad_scale, loss_scale
            self.stats = {id(_raw(v)): d for v, d in stats}

        def _scalars(self, lr: Any, dtype: Any) -> dict[str, Any]:
            """:func:`hal.lowering.step_scalars` in the graph, from the optimizer step."""
            o = self.hal_config.optimizer
            lr = tf.cast(lr, dtype)
            if isinstance(o, SGD):
                return {"lr": lr}
            t = tf.cast(self.iterations + 1, dtype)
            b1, b2 = tf.constant(o.betas[0], dtype), tf.constant(o.betas[1], dtype)
            out = {"lr": lr, "step_size": lr / (1.0 - tf.pow(b1, t)), "bc2_sqrt": tf.sqrt(1.0 - tf.pow(b2, t))}
            if isinstance(o, AdamW):
                out["decay"] = 1.0 - lr * o.weight_decay
            return out

        def _update(self, grad: Any, var: Any, slots: Mapping[str, Any], lr: Any) -> list[Any]:
            decay = self.stats.get(id(_raw(var)))
            if decay is not None:  # a running statistic: its "gradient" is the batch statistic
                s = grad * tf.constant(self.grad_scale, grad.dtype) if self.grad_scale != 1.0 else grad
                d = tf.constant(decay, var.dtype)
                return [var.assign(d * tf.convert_to_tensor(var) + (1.0 - d) * s)]
            scale = self.grad_scale / self.loss_scale
            g = grad * tf.constant(scale, grad.dtype) if scale != 1.0 else grad
            return torch_update(self.hal_config.optimizer, var, g, slots, self._scalars(lr, grad.dtype))

        # Keras 3
        def build(self, var_list: list[Any]) -> None:
            if getattr(self, "built", False):
                return
            super().build(var_list)
            self.hal_slots = [
                {} if id(_raw(v)) in self.stats else
                {s: self.add_variable_from_reference(v, name=s) for s in self.slot_names} for v in var_list
            ]

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            self._update(gradient, variable, self.hal_slots[self._get_variable_index(variable)], learning_rate)

        # Keras 2 (OptimizerV2: Graphcore's TensorFlow 2.6, tf_keras's legacy optimizers)
        def _create_slots(self, var_list: list[Any]) -> None:
            for v in var_list:
                if id(_raw(v)) not in self.stats:
                    for s in self.slot_names:
                        self.add_slot(v, s)

        def _resource_apply_dense(self, grad: Any, var: Any, apply_state: Any = None) -> Any:
            slots = {} if id(_raw(var)) in self.stats else {s: self.get_slot(var, s) for s in self.slot_names}
            return tf.group(*self._update(grad, var, slots, self._decayed_lr(var.dtype.base_dtype)))

        def _resource_apply_sparse(self, grad: Any, var: Any, indices: Any, apply_state: Any = None) -> Any:
            raise UnsupportedError("hal's optimizers have no sparse update")

        def get_config(self) -> dict[str, Any]:
            return {"name": self.name, "hal_config": repr(self.hal_config), "grad_scale": self.grad_scale,
                    "loss_scale": self.loss_scale}

    _KERAS_OPT.append(TorchOptimizer)
    return TorchOptimizer


def _lr_graph(config: TrainConfig, step: Any) -> Any:
    """``config.lr(step)`` as TensorFlow ops (float32), for schedules evaluated on the device."""
    tf = _tf()
    lr, sched = config.optimizer.lr, config.schedule
    if isinstance(sched, Constant):
        return tf.constant(lr, tf.float32) + 0.0 * step
    if isinstance(sched, StepDecay):
        return lr * tf.pow(tf.constant(sched.gamma, tf.float32), tf.floor(step / sched.step_size))
    if isinstance(sched, Cosine):
        warm = sched.warmup_start + (1.0 - sched.warmup_start) * step / max(sched.warmup_steps, 1)
        span = float(sched.total_steps - sched.warmup_steps)
        t = tf.minimum(step - sched.warmup_steps, span)
        cos = sched.min_factor + (1.0 - sched.min_factor) * 0.5 * (1.0 + tf.cos(math.pi * t / span))
        return lr * tf.where(step < sched.warmup_steps, warm, cos)
    raise UnsupportedError(f"tensorflow:ipu has no device-side form of schedule {sched!r}")


class IPUExecutable(TensorFlowExecutable):
    """A spec compiled for Graphcore IPUs through IPU TensorFlow's Keras API.

    hal's plan (:mod:`hal.ipu`: pipeline stages, G, device iterations D, replicas
    R) maps to the SDK as follows (Graphcore, *Targeting the IPU from TensorFlow 2*,
    https://docs.graphcore.ai/projects/tensorflow-user-guide/en/latest/ : "Keras
    with IPUs" keras/keras.html, "Keras Python API" keras/api.html, "Targeting the
    Poplar XLA device" device_selection.html; the IPU Keras sources,
    github.com/graphcore/keras ``keras/ipu/extensions/functional_extensions.py``):

    ==========================  ==================================================
    hal                         IPU TensorFlow
    ==========================  ==================================================
    N IPUs                      ``cfg = ipu.config.IPUConfig()``;
                                ``cfg.auto_select_ipus = N``;
                                ``cfg.configure_ipu_system()``. N = R x S rounded
                                up to a power of two per replica (IPU Keras
                                replicates ``num_ipus // 2**ceil(log2(S))`` times)
    placement                   model built, compiled and run inside
                                ``ipu.ipu_strategy.IPUStrategy().scope()``
    stage of each node          ``model.get_pipeline_stage_assignment()``, set
                                ``assignment.pipeline_stage`` per layer call,
                                ``model.set_pipeline_stage_assignment(...)``
    G, S > 1                    ``model.set_pipelining_options(
                                gradient_accumulation_steps_per_replica=G,
                                gradient_accumulation_reduction_method="mean")``
    G > 1, one stage            ``model.set_gradient_accumulation_options(...)``,
                                same keywords
    D optimizer steps per call  ``model.compile(..., steps_per_execution=D x G)``:
                                an IPU Keras "step" is one micro-batch per
                                replica, the weights update every G steps
    micro-batch, static shapes  ``tf.data`` batches of ``micro`` with
                                ``drop_remainder=True``; data in hal's
                                ``[D, G, R, micro]`` host layout
    loss per step               ``model.set_asynchronous_callbacks(True)`` and a
                                callback reading each step's running-mean loss
    R > 1 metrics               ``model.set_replication_options(
                                replicated_metric_reduction_method="MEAN")``
                                (SDK >= 3.1; earlier SDKs have no such option
                                and report the last replica's value, as NONE
                                does: hal refuses R > 1 there)
    ==========================  ==================================================

    ``fit`` applies ``model.optimizer`` (a Keras optimizer running the canonical
    torch update, :func:`_keras_torch_optimizer`) after IPU TensorFlow's own
    gradient accumulation and cross-replica *sum* (``IPUStrategy`` reports one
    replica in sync and reduces with ``cross_replica_sum``: graphcore/tensorflow
    ``tensorflow/python/ipu/ipu_strategy.py``), which the optimizer divides by R. ``predict(x)`` is ``model.predict``
    (pipelined where the plan is); ``predict(x, training=True)`` and
    ``loss_and_grads`` run hal's traced bodies through ``strategy.run`` on a
    ``tf.function`` (not pipelined: IPU Keras ignores stage assignments outside
    ``fit``/``evaluate``/``predict``). The IPU computes in float32 (no float64).

    Precisions (Graphcore's "<compute>.<master weights>", graphcore/examples
    ``vision/cnns/tensorflow2/precision.py``): "16.16" builds the model in fp16
    (Keras's ``float16``: weights, BatchNorm, optimizer state and updates in fp16);
    "16.32" under ``mixed_float16``: fp32 master weights and optimizer state, fp16
    convolutions, dense layers and activations, BatchNorm in fp32 (hal.lowering's
    rules). Optimizer state takes the weights' dtype, as Keras slots do in
    Graphcore's TF2 optimizers; gradients reach the optimizer in that dtype too. Both
    scale the loss by :data:`hal.lowering.IPU_STATIC_LOSS_SCALE` (static; unscaled in the optimizer, as
    Graphcore's ``loss_scale_optimizer.py``), compute the loss in fp32, and turn on
    stochastic rounding; partial sums are fp16 only with ``plan.half_partials``.
    Against an fp32 run: the forward and gradients carry fp16 rounding (unit
    roundoff 2^-11, :data:`hal.parity.UNIT_ROUNDOFF`); in "16.16" an update smaller
    than half an fp16 ulp of its weight (2^-11 relative) is lost with
    round-to-nearest, and kept only in expectation with the IPU's stochastic
    rounding; "16.32" keeps it in the fp32 master weight.

    Non-finite steps (``config.check_finite``): ``fit`` runs many steps in one
    execution and commits BatchNorm statistics in the forward, so the check is
    made on the host: after each ``run_steps`` call the variables (model and
    optimizer) are copied to the host and checked with the losses; if anything is
    not finite, the copy from before the call is restored and the steps are
    replayed one by one up to the first bad one. This costs one device-to-host
    copy of the variables per call.
    """

    def __init__(self, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig,
                 plan: "Plan | None") -> None:
        ipu = _ipu()
        index = device.partition(":")[2]
        num_ipus = int(index) if index else None
        if config.precision not in PRECISIONS:
            raise UnsupportedError(f"tensorflow:ipu computes in {' or '.join(PRECISIONS)}, not {config.precision!r}")
        plan = plan if plan is not None else default_plan(spec, config, num_ipus)
        check_plan(plan, config)
        self.plan = plan
        self.stages = len(plan.stages)
        self.replicas = plan.batch.replicas
        self.iterations = plan.batch.device_iterations
        per_replica = _pow2(plan.ipus_per_replica)
        self.num_ipus = num_ipus or per_replica * self.replicas
        if self.num_ipus != per_replica * self.replicas:
            raise ConfigError(
                f"tensorflow:ipu:{self.num_ipus}: the plan needs {plan.ipus_per_replica} IPU(s) x {self.replicas} "
                f"replica(s) = {per_replica * self.replicas} IPUs (IPU Keras gives each replica a power of two of IPUs)"
            )
        Executable.__init__(self, spec, Target("tensorflow", f"ipu:{self.num_ipus}"), config)
        self.device, self.tf_device = "ipu", "/device:IPU:0"
        _check_optimizer_state(config)
        self.dtype = MASTER_DTYPE[config.precision]  # variables, hence optimizer state (Keras slots)
        self.np_dtype = np.dtype(self.dtype)
        self._scale = IPU_STATIC_LOSS_SCALE if config.precision in IPU_PRECISIONS else 1.0
        self.loss_scale_vars = None  # tensorflow.py's dynamic (fp16) loss scaling: none here, the scale is static

        _configure_ipu_system(ipu, plan, self.num_ipus)
        self.strategy = ipu.ipu_strategy.IPUStrategy()
        g = config.grad_accum
        with self.strategy.scope():
            self.graph = build_keras_model(spec, self.dtype, mixed=_MIXED.get(config.precision),
                                           statistics_as_gradients=self.stages > 1)
            model = self.graph.model
            missing = [m for m in ("get_pipeline_stage_assignment", "set_pipelining_options",
                                   "set_gradient_accumulation_options") if not hasattr(model, m)]
            if missing:
                raise BackendUnavailable(f"tensorflow:ipu: this Keras model has no IPU extensions ({missing}): "
                                         f"{IPU_REASON}")
            if self.replicas > 1 and not hasattr(model, "set_replication_options"):
                raise UnsupportedError(
                    f"tensorflow:ipu: {self.replicas} replicas need IPU Keras's set_replication_options (Poplar SDK "
                    ">= 3.1): earlier SDKs return the last replica's loss, hal's training loss is the mean over "
                    "replicas")
            self.batch_norms = [layer for layer in self.graph.layers.values() if isinstance(layer.op, S.BatchNorm)]
            stats: list[tuple[Any, float]] = []
            if self.stages > 1:
                stats = _running_statistics(self.batch_norms, g)
                stage_of = {n: s.index for s in plan.stages for n in s.nodes}
                model.set_pipeline_stage_assignment(_stage_assignment(model, self.graph, stage_of, self.stages))
                model.set_pipelining_options(gradient_accumulation_steps_per_replica=g,
                                             gradient_accumulation_reduction_method="mean",
                                             **_pipeline_options(ipu, plan))
            else:
                self.graph.mode.sink = _assign_stats  # fit() trains; traced forward-only bodies switch it off
                if g > 1:
                    model.set_gradient_accumulation_options(gradient_accumulation_steps_per_replica=g,
                                                            gradient_accumulation_reduction_method="mean")
            if self.replicas > 1:
                model.set_replication_options(replicated_metric_reduction_method="MEAN")
            model.set_asynchronous_callbacks(True)
            self.train_names = spec.trainable()
            self.train_vars = [self.graph.variables[k][0] for k in self.train_names]
            self.per_sample_loss = _loss(config)
            self._spe = 0
            self._optimizer = _keras_torch_optimizer()(
                config, grad_scale=1.0 / self.replicas, loss_scale=self._scale, stats=stats)
            self._compile_keras(g * self.iterations)
        self._fns: dict[str, Any] = {}
        self._state: list[tuple[Any, np.ndarray]] | None = None  # variables after the last run_steps call
        self._load_weights(weights)

    @property
    def loss_scale(self) -> float | None:
        """The static loss scale of "16.16"/"16.32" (:data:`hal.lowering.IPU_STATIC_LOSS_SCALE`); otherwise ``None``."""
        return self._scale if self._scale != 1.0 else None

    def _compile_keras(self, steps_per_execution: int) -> None:
        """``model.compile`` for ``steps_per_execution``; one optimizer for the
        executable's life, so its state survives a recompile. The loss is
        multiplied by the static loss scale (16-bit precisions)."""
        if steps_per_execution == self._spe:
            return
        tf, loss, scale = _tf(), self.per_sample_loss, self._scale
        labels = self.config.loss == "cross_entropy"

        def scaled(y: Any, p: Any) -> Any:
            p = tf.cast(p, tf.float32)  # the loss in fp32 (hal.lowering's precision rules)
            y = tf.reshape(y, tf.shape(p)[:1]) if labels else y  # Keras 2's fit hands class labels as (n, 1)
            return loss(y, p) * scale if scale != 1.0 else loss(y, p)

        self.graph.model.compile(optimizer=self._optimizer, loss=scaled, steps_per_execution=steps_per_execution)
        self._spe = steps_per_execution

    def _placement(self) -> Any:
        return self.strategy.scope()

    def _call(self, name: str, python_fn: Callable[..., Any], mode: str, *args: Any) -> Any:
        tf = _tf()
        if name not in self._fns:
            self._fns[name] = tf.function(python_fn, jit_compile=True)  # Graphcore: tf.function + strategy.run
        with self.strategy.scope():
            return self.strategy.run(self._fns[name], args=args)

    def _dataset(self, *arrays: np.ndarray, micro: int) -> Any:
        tf = _tf()
        data = tf.data.Dataset.from_tensor_slices(arrays if len(arrays) > 1 else arrays[0])
        return data.batch(micro, drop_remainder=True)  # static shapes for the IPU

    # -- the hooks: fit / predict, the pipelined, steps_per_execution paths -----------

    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        if training:
            return super()._predict(x, training)
        x = self._x(x)
        per_call = self.replicas * self._spe
        micro = -(-len(x) // per_call)
        pad = micro * per_call - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        with self.strategy.scope():
            out = self.graph.model.predict(self._dataset(x, micro=micro), steps=self._spe, verbose=0)
        return np.asarray(out, self.np_dtype)[: len(x) - pad]  # "16.32": fp16 activations, fp32 results

    _train_step = Executable._train_step  # one step is run_steps on a stack of one: fit, not the CPU step

    def _run_steps(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, int]:
        n, g, r = xs.shape[1], self.config.grad_accum, self.replicas
        if n % (g * r):
            raise InputError(f"{self.target}: batch {n} is not divisible by grad_accum x replicas = {g} x {r}")
        self._check_batch_statistics(n // (g * r))  # each replica's micro-batch
        if not self.config.check_finite:
            return self._fit(xs, ys), len(xs)
        before = self._state if self._state is not None else self._read_state()
        losses = self._fit(xs, ys)
        after = self._read_state()
        if not _finite(losses, after):  # replay one step at a time from before the call, up to the first bad one
            self._write_state(before)
            self.step -= len(xs)
            losses = np.full(len(xs), np.nan)
            for i in range(len(xs)):
                losses[i:i + 1] = self._fit(xs[i:i + 1], ys[i:i + 1])
                after = self._read_state()
                if not _finite(losses[i:i + 1], after):
                    self._write_state(before)
                    self.step -= 1
                    self._state = before
                    return losses, i
                before = after
        self._state = after
        return losses, len(xs)

    def _fit(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """``model.fit`` over the stacked batches; the loss per optimizer step."""
        steps, n = xs.shape[0], xs.shape[1]
        g = self.config.grad_accum
        micro = n // (g * self.replicas)
        self._compile_keras(g * math.gcd(steps, self.iterations))
        keras = _keras()
        seen: list[tuple[int, float]] = []

        class Losses(keras.callbacks.Callback):  # per step (asynchronous callbacks) or per execution
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                seen.append((int(batch), float((logs or {}).get("loss", float("nan")))))

        flat_x, flat_y = self._x(xs).reshape(-1, *xs.shape[2:]), self._y(ys).reshape(-1, *ys.shape[2:])
        data = self._dataset(flat_x, flat_y, micro=micro)
        with self.strategy.scope():
            self.graph.model.optimizer.iterations.assign(self.step)
            self.graph.model.fit(data, epochs=1, steps_per_epoch=steps * g, callbacks=[Losses()], shuffle=False,
                                 verbose=0)
        self.step += steps
        return _step_losses(seen, steps, g) / self._scale

    def _variables(self) -> list[Any]:
        opt = self._optimizer.variables
        return [_raw(v) for v in (*self.graph.model.variables, *(opt() if callable(opt) else opt))]

    def _read_state(self) -> list[tuple[Any, np.ndarray]]:
        return [(v, v.numpy()) for v in self._variables()]

    def _write_state(self, state: list[tuple[Any, np.ndarray]]) -> None:
        """Restore ``state``; variables made after it (optimizer slots built by ``fit``) go back to zero."""
        saved = {id(v): a for v, a in state}
        with self.strategy.scope():
            for v in self._variables():
                v.assign(saved[id(v)] if id(v) in saved else np.zeros(v.shape, v.dtype.as_numpy_dtype))

    def _load_weights(self, weights: Weights) -> None:
        super()._load_weights(weights)
        self._state = None


def _finite(losses: np.ndarray, state: list[tuple[Any, np.ndarray]]) -> bool:
    return bool(np.isfinite(losses).all()) and all(np.isfinite(a).all() for _, a in state)


def _configure_ipu_system(ipu: Any, plan: "Plan", num_ipus: int) -> None:
    """``IPUConfig`` from the plan, then ``configure_ipu_system()``:

    * ``allow_recompute = plan.recompute``, set both ways: IPU TensorFlow recomputes
      pipeline stages only when it is on (``pipelining_ops.pipeline``'s docstring);
    * the plan's available-memory proportion as the ``availableMemoryProportion``
      Poplar option of convolutions and matmuls, as Graphcore's TF2 ResNet50 does
      (graphcore/examples ``vision/cnns/tensorflow2/ipu_config.py``); per stage when
      the IPUs differ (:func:`_pipeline_options`);
    * "16.16"/"16.32": ``partialsType`` ``half`` if ``plan.half_partials`` else
      ``float`` (Poplar's default, set explicitly) for convolutions and matmuls, and
      stochastic rounding on (``floating_point_behaviour.esr``: a
      ``StochasticRoundingBehaviour`` from SDK 2.5, a bool before).
    """
    cfg = ipu.config.IPUConfig()
    cfg.auto_select_ipus = num_ipus
    cfg.allow_recompute = bool(plan.recompute)
    amp = set(plan.available_memory_proportion)
    for options in (cfg.convolutions.poplar_options, cfg.matmuls.poplar_options):
        if len(amp) == 1:
            options["availableMemoryProportion"] = str(next(iter(amp)))
        if plan.precision in IPU_PRECISIONS:
            options["partialsType"] = "half" if plan.half_partials else "float"
    if plan.precision in IPU_PRECISIONS:
        behaviour = getattr(ipu.config, "StochasticRoundingBehaviour", None)
        cfg.floating_point_behaviour.esr = behaviour.ON if behaviour is not None else True
    cfg.configure_ipu_system()


def _pipeline_options(ipu: Any, plan: "Plan") -> dict[str, Any]:
    """``set_pipelining_options`` keywords from the plan: schedule, stage-to-IPU
    mapping, recomputation mode (only where ``allow_recompute`` is on: it is
    ignored otherwise) and per-stage memory proportions when the IPUs differ."""
    ops = ipu.ops.pipelining_ops
    out: dict[str, Any] = {"pipeline_schedule": ops.PipelineSchedule[plan.schedule.capitalize()],
                           "device_mapping": list(plan.device_mapping)}
    if plan.recompute:
        out["recomputation_mode"] = ops.RecomputationMode.Auto
    if len(set(plan.available_memory_proportion)) > 1:
        stage_options = []
        for stage in plan.stages:
            amp = {"availableMemoryProportion": str(plan.available_memory_proportion[stage.ipu])}
            stage_options.append(ops.PipelineStageOptions(convolution_options=amp, matmul_options=amp))
        out["forward_propagation_stages_poplar_options"] = stage_options
        out["backward_propagation_stages_poplar_options"] = stage_options
    return out


def _assign_stats(layer: Any, mean: Any, unbiased: Any) -> None:
    """BatchNorm statistics inside a single-stage ``fit``: assigned as the forward runs."""
    new_mean, new_var = layer.updated(mean, unbiased, (layer.running_mean, layer.running_var))
    layer.running_mean.assign(new_mean)
    layer.running_var.assign(new_var)


def _running_statistics(batch_norms: list[Any], grad_accum: int) -> list[tuple[Any, float]]:
    """BatchNorm running statistics of a pipelined model, each with its decay per weight update.

    A pipeline stage cannot update state per micro-batch: IPU Keras warns that
    ``BatchNormalization`` moving statistics "are not properly updated when
    training" pipelined models, and its test calls the result undefined
    (graphcore/keras ``keras/ipu/extensions/extensions_base.py``,
    ``keras/ipu/pipeline_test.py`` ``testKerasBatchNormalizationLayerWarns``).
    Graphcore's TF2 ResNet50 instead hands each micro-batch's statistics to
    *trainable* moving-statistic variables as gradients, which the pipeline
    accumulates like any gradient and the optimizer applies once per weight update
    (graphcore/examples ``vision/cnns/tensorflow2/normalization/batch_norm.py``).
    hal does the same: the model is built with ``statistics_as_gradients``
    (:func:`hal.backends.tensorflow.build_keras_model`), the gradient of
    ``running_mean``/``running_var`` is the micro-batch mean and unbiased variance,
    and :func:`_keras_torch_optimizer` applies ``r = d r + (1 - d) s``, ``s`` the
    mean over the update's G micro-batches (and R replicas), ``d = (1 - m)^G``
    (``m``: the op's momentum), with no weight decay and no optimizer state.

    Against hal's canonical BatchNorm (:mod:`hal.training`: one update
    ``r = (1 - m) r + m s_i`` per micro-batch ``i``, replica 0's statistics): at
    G = 1 on one replica it is the same update. At G > 1 the old statistic keeps
    the same weight ``(1 - m)^G``, but the G statistics share ``1 - d`` equally
    where the canonical rule weights micro-batch ``i`` by ``m (1 - m)^(G-1-i)``:
    equal when the micro-batch statistics are, otherwise off by at most
    ``(1 - d) max |s_i - s_j|``. With R > 1 replicas every replica's statistics
    count, not replica 0's only. (Graphcore's ResNet50 applies ``d = 1 - m`` per
    weight update, i.e. its momentum counts weight updates, not micro-batches.)
    """
    stats: list[tuple[Any, float]] = []
    for layer in batch_norms:
        decay = (1.0 - layer.op.momentum) ** grad_accum
        stats += [(layer.running_mean, decay), (layer.running_var, decay)]
    return stats


def _step_losses(seen: list[tuple[int, float]], steps: int, g: int) -> np.ndarray:
    """Per optimizer step losses from Keras's running-mean ``loss`` logged after
    micro-batch steps ``batch`` (0-based): running sums differenced give each
    logged span's mean; a span covering several optimizer steps gives each of
    them the span's mean."""
    per_micro = np.full(steps * g, np.nan)
    last_b, last_sum = -1, 0.0
    for b, mean in seen:
        total = (b + 1) * mean
        per_micro[last_b + 1: b + 1] = (total - last_sum) / (b - last_b)
        last_b, last_sum = b, total
    return per_micro.reshape(steps, g).mean(axis=1)
