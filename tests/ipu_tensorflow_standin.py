"""A STRICT STAND-IN of Graphcore's IPU TensorFlow 2 SDK, for the ``tensorflow:ipu`` tests.

It is not Graphcore's code and shares none of it; it models the documented
surface and the behaviours hal depends on, each checked against Graphcore's
public sources (github.com/graphcore/tensorflow, branches ``r2.6/sdk-release-*``;
github.com/graphcore/keras, same branches):

* ``tensorflow.python.ipu`` (installed as ``sys.modules["tensorflow.python.ipu"]``):
  ``config.IPUConfig`` with typed, nested attributes (setting an unknown one or a
  value of the wrong type raises, as ``config.py``'s ``_ConfigBase`` does):
  ``allow_recompute``, ``floating_point_behaviour.esr`` (a
  ``StochasticRoundingBehaviour`` from SDK 2.5, a bool before),
  ``convolutions.poplar_options``/``matmuls.poplar_options``, ...;
  ``ipu_strategy.IPUStrategy``; ``gradient_accumulation.GradientAccumulationReductionMethod``
  (SUM, MEAN, RUNNING_MEAN); ``ops.pipelining_ops.PipelineSchedule`` and
  ``RecomputationMode`` (``pipeline()`` raises ``TypeError`` for anything else).
* The IPU Keras extension methods, patched onto ``keras.Model`` the way IPU Keras
  injects them into models made in an ``IPUStrategy`` scope, with their documented
  keywords only; ``set_replication_options`` exists from SDK 3.1 and takes a
  ``ReplicatedMetricReductionMethod`` (NONE, LIST, SUM, MEAN; NONE returns the
  LAST replica's value: keras ``ipu/extensions/extensions_base.py``).
* The compiler's pipeline-iteration check (``driver/visitors/pipeline_visitor.cc``,
  ``VerifyPipelineArgumentsFixed``): the iterations of a pipeline (the gradient
  accumulation count in ``fit``; ``steps_per_execution`` in ``predict``) must be
  a multiple of, and at least, the *overlap length*: the number of schedule
  offsets (``pipeline_visitor_utils.h`` ``ScheduleOffsets``) of the stage-to-IPU
  mapping (forward stages, then the backward stages in reverse, when training):
  Grouped ``AllUnion`` (every stage: 2K training, K inference), Interleaved
  ``CircularUnion`` (non-overlapping rotations), Sequential ``NoUnion`` (1).
  IPU Keras also requires ``steps_per_execution`` to be divisible by the
  accumulation count (``_verify_and_get_gradient_accumulation_steps_per_replica``).
  Computed here independently of hal's planner.
* BatchNorm moving statistics updated inside a pipelined ``fit`` are undefined on
  the real SDK (keras ``pipeline_test.py`` ``testKerasBatchNormalizationLayerWarns``:
  "the moving statistics need to be updated per-batch, but the pipeline only
  allows updates after it flushes, so the behaviour is undefined"); the stand-in
  makes it an error: a pipelined ``fit`` that writes a non-trainable model
  variable (``assign``/``assign_add``/``assign_sub``, Keras 3's and Keras 2's
  BatchNormalization paths included) raises.

``compile``/``fit``/``predict`` stay real Keras (3, or 2 from ``tf_keras`` with
``TF_USE_LEGACY_KERAS=1``) on the CPU: pipelining, gradient accumulation and
replication inside ``fit`` are the SDK's and are checked as configuration only.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.machinery
import sys
import types
from typing import Any, Callable

import tensorflow as tf

SDK = (3, 4)  # the default SDK the stand-in models


class Record:
    """What the stand-in saw, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.configured: dict[str, Any] | None = None  # the IPUConfig at configure_ipu_system, flattened
        self.in_scope = 0
        self.sdk = SDK

    def add(self, name: str, **kwargs: Any) -> None:
        self.calls.append((name, kwargs))

    def named(self, name: str) -> list[dict]:
        return [k for n, k in self.calls if n == name]


class GradientAccumulationReductionMethod(enum.Enum):
    SUM = 0
    MEAN = 1
    RUNNING_MEAN = 2

    @classmethod
    def parse(cls, value: Any) -> "GradientAccumulationReductionMethod":
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise ValueError(f"Cannot parse {value} as one of GradientAccumulationReductionMethod")


class ReplicatedMetricReductionMethod(enum.Enum):
    NONE = 1  # the last replica's value
    LIST = 2
    SUM = 3
    MEAN = 4

    @classmethod
    def parse(cls, value: Any) -> "ReplicatedMetricReductionMethod":
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise ValueError(f"Cannot parse {value} as a ReplicatedMetricReductionMethod. "
                         f"Valid values are: {', '.join(cls.__members__)}.")


class PipelineSchedule(enum.IntEnum):
    Grouped = 0
    Interleaved = 1
    Sequential = 2


class RecomputationMode(enum.Enum):
    Auto = 0
    RecomputeThenBackpropagate = 1
    RecomputeAndBackpropagateInterleaved = 2


class PipelineStageOptions:
    def __init__(self, convolution_options: dict | None = None, matmul_options: dict | None = None) -> None:
        for options in (convolution_options, matmul_options):
            if options is not None and not isinstance(options, dict):
                raise TypeError("PipelineStageOptions options must be dictionaries.")
        self.convolution_options, self.matmul_options = convolution_options or {}, matmul_options or {}


class StochasticRoundingBehaviour(enum.Enum):
    OFF = 0
    ON = 1
    REPLICA_IDENTICAL_ONLY = 2

    @staticmethod
    def from_bool(value: bool) -> "StochasticRoundingBehaviour":
        return StochasticRoundingBehaviour.ON if value else StochasticRoundingBehaviour.OFF


PIPELINE_KWARGS = {  # documented keywords of ipu.pipelining_ops.pipeline that set_pipelining_options forwards
    "pipeline_schedule", "recomputation_mode", "forward_propagation_stages_poplar_options",
    "backward_propagation_stages_poplar_options", "weight_update_poplar_options", "offload_weight_update_variables",
    "replicated_optimizer_state_sharding", "offload_activations", "offload_gradient_accumulation_buffers",
    "replicated_weight_sharding", "offload_weights", "name",
}
GA_OPTIMIZER_KWARGS = {"offload_weight_update_variables", "replicated_optimizer_state_sharding", "dtype", "name"}


# ---------------------------------------------------------------------------
# the compiler's pipeline check, from pipeline_visitor.cc / pipeline_visitor_utils.h
# ---------------------------------------------------------------------------


def _circular_union(mapping: list[int]) -> list[int]:
    """Rotations of ``mapping`` that overlap neither the input nor each other (CircularUnion)."""
    n, found = len(mapping), [0]
    for i in range(1, n):
        if all(all(mapping[(k + i) % n] != mapping[(k + j) % n] for k in range(n)) for j in found):
            found.append(i)
    return found


def overlap_length(schedule: PipelineSchedule, device_mapping: list[int], training: bool) -> int:
    """``ScheduleOffsets(stage_ipu_mapping).size()``; training maps forward stages then backward ones reversed."""
    mapping = list(device_mapping) + (list(reversed(device_mapping)) if training else [])
    if schedule == PipelineSchedule.Grouped:
        return len(mapping)
    if schedule == PipelineSchedule.Interleaved:
        return len(_circular_union(mapping))
    return 1


def verify_pipeline_iterations(iterations: int, schedule: PipelineSchedule, device_mapping: list[int],
                               training: bool) -> None:
    """``VerifyPipelineArgumentsFixed``: a multiple of the overlap length, and at least it."""
    overlap = overlap_length(schedule, device_mapping, training)
    context = ("This number might be called `gradient_accumulation_count`, "
               "`gradient_accumulation_steps_per_replica` or `steps_per_execution` depending on the API used.")
    if iterations % overlap:
        raise tf.errors.FailedPreconditionError(
            None, None, f"The number of iterations of the pipeline must be a multiple of {overlap}, "
                        f"but it is {iterations}. {context}")
    if iterations < overlap:
        raise tf.errors.FailedPreconditionError(
            None, None, f"The number of iterations of the pipeline must be at least {overlap}, "
                        f"but it is {iterations}. {context}")


# ---------------------------------------------------------------------------
# tensorflow.python.ipu
# ---------------------------------------------------------------------------


class _Category:
    """A typed, closed group of IPUConfig attributes (the real ``_ConfigBase``)."""

    def __init__(self, path: str, **defaults: Any) -> None:
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_values", dict(defaults))

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name not in values:
            raise AttributeError(f"{self._path} has no attribute {name!r}")
        return values[name]

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._values or isinstance(self._values[name], _Category):
            raise AttributeError(f"{self._path} has no settable attribute {name!r}")
        default = self._values[name]
        kind = (int, list, tuple) if name in ("auto_select_ipus", "select_ipus") else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, kind):
            raise TypeError(f"Incorrect type for {self._path}.{name}: {value!r}")
        self._values[name] = value

    def flat(self, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self._values.items():
            if isinstance(v, _Category):
                out.update(v.flat(f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = dict(v) if isinstance(v, dict) else v
        return out


def make_standin(record: Record, sdk: tuple[int, int] = SDK) -> types.ModuleType:
    """``tensorflow.python.ipu`` of SDK ``sdk``, recording into ``record``."""
    ipu = types.ModuleType("tensorflow.python.ipu")
    ipu.__spec__ = importlib.machinery.ModuleSpec("tensorflow.python.ipu", loader=None)
    esr_default: Any = StochasticRoundingBehaviour.OFF if sdk >= (2, 5) else False

    class IPUConfig(_Category):
        def __init__(self) -> None:
            super().__init__(
                "IPUConfig", allow_recompute=False, auto_select_ipus=[], select_ipus=[],
                compilation_poplar_options={},
                floating_point_behaviour=_Category("floating_point_behaviour", inv=False, div0=False, oflo=False,
                                                   esr=esr_default, nanoo=False, set_all=False),
                convolutions=_Category("convolutions", poplar_options={}),
                matmuls=_Category("matmuls", poplar_options={}),
                norms=_Category("norms", use_stable_statistics=False),
                io_tiles=_Category("io_tiles", num_io_tiles=0, place_ops_on_io_tiles=False,
                                   available_memory_proportion=0.9),
            )

        def configure_ipu_system(self, device: str = "cpu") -> None:
            if not self.auto_select_ipus and not self.select_ipus:
                raise ValueError("no IPUs selected: set auto_select_ipus or select_ipus")
            record.configured = self.flat()
            record.add("configure_ipu_system", auto_select_ipus=self.auto_select_ipus)

    class IPUStrategyV1:
        def __init__(self, ipu_device: str = "/device:IPU:0", cpu_device: str = "/device:CPU:0",
                     enable_dataset_iterators: bool = True, enable_keras_extensions: bool = True) -> None:
            if record.configured is None:
                raise RuntimeError("the IPU system is not configured: call IPUConfig.configure_ipu_system() first")
            record.add("IPUStrategy", ipu_device=ipu_device)

        @contextlib.contextmanager
        def scope(self):  # type: ignore[no-untyped-def]
            record.in_scope += 1
            try:
                yield self
            finally:
                record.in_scope -= 1

        def run(self, fn: Any, args: tuple = (), kwargs: dict | None = None, options: Any = None) -> Any:
            if not isinstance(fn, tf.types.experimental.GenericFunction):
                raise ValueError("IPUStrategyV1.run(fn, ...) does not support eager execution: make fn a tf.function")
            record.add("run", fn=getattr(fn, "__name__", "?"))
            return fn(*args, **(kwargs or {}))

    config = types.SimpleNamespace(IPUConfig=IPUConfig)
    if sdk >= (2, 5):
        config.StochasticRoundingBehaviour = StochasticRoundingBehaviour
    ipu.config = config
    ipu.ipu_strategy = types.SimpleNamespace(IPUStrategy=IPUStrategyV1, IPUStrategyV1=IPUStrategyV1)
    ipu.gradient_accumulation = types.SimpleNamespace(
        GradientAccumulationReductionMethod=GradientAccumulationReductionMethod)
    ipu.ops = types.SimpleNamespace(pipelining_ops=types.SimpleNamespace(
        PipelineSchedule=PipelineSchedule, RecomputationMode=RecomputationMode,
        PipelineStageOptions=PipelineStageOptions))
    ipu.pipelining_ops = ipu.ops.pipelining_ops
    return ipu


# ---------------------------------------------------------------------------
# the IPU Keras extensions
# ---------------------------------------------------------------------------


class FunctionalLayerPipelineStageAssignment:
    def __init__(self, layer: Any, node_index: int, pipeline_stage: int | None = None) -> None:
        self._layer, self._node_index, self.pipeline_stage = layer, node_index, pipeline_stage

    layer = property(lambda self: self._layer)
    node_index = property(lambda self: self._node_index)


def _is_input(layer: Any) -> bool:
    return type(layer).__name__ == "InputLayer"


def _calls(model: Any) -> list[Any]:
    """Layer calls of a functional model in execution order, inputs excluded (Keras 3 or 2)."""
    layers = model.operations if hasattr(model, "operations") else model.layers
    return [layer for layer in layers if not _is_input(layer)]


def _parents(layer: Any) -> list[Any]:
    node = layer._inbound_nodes[0]
    inbound = node.inbound_layers if hasattr(node, "inbound_layers") else [p.operation for p in node.parent_nodes]
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]  # Keras 2 / Keras 3


def _pipelined(model: Any) -> bool:
    return bool(getattr(model, "_standin_pipeline", None))


def make_extensions(record: Record, sdk: tuple[int, int] = SDK) -> dict[str, Callable[..., Any]]:
    """The documented extension methods of a Functional model (plus fit/predict/compile
    wrappers doing the SDK's checks), recording into ``record``."""

    def in_scope(name: str) -> None:
        if not record.in_scope:
            raise RuntimeError(f"{name}: IPU Keras extensions exist only for models made in an IPUStrategy scope")

    def get_pipeline_stage_assignment(self: Any) -> list[FunctionalLayerPipelineStageAssignment]:
        in_scope("get_pipeline_stage_assignment")
        return [FunctionalLayerPipelineStageAssignment(layer, 0) for layer in _calls(self)]

    def set_pipeline_stage_assignment(self: Any, pipeline_stage_assignment: Any) -> None:
        in_scope("set_pipeline_stage_assignment")
        if not isinstance(pipeline_stage_assignment, list):
            raise ValueError("`pipeline_stage_assignment` needs to be a list")
        layers = _calls(self)
        if len(pipeline_stage_assignment) != len(layers):
            raise ValueError("the size of the assignment does not match the number of layer invocations")
        stage: dict[int, int] = {}
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
            for src in _parents(layer):
                if not _is_input(src) and stage[id(src)] > stage[id(layer)]:
                    raise ValueError(f"Layer {layer.name} in pipeline stage {stage[id(layer)]} reads a later stage")
        self._standin_stages = {layer.name: stage[id(layer)] for layer in layers}
        record.add("set_pipeline_stage_assignment", stages=self._standin_stages)

    def set_pipelining_options(self: Any, gradient_accumulation_steps_per_replica: Any = None,
                               device_mapping: Any = None, accumulate_outfeed: Any = None,
                               gradient_accumulation_reduction_method: Any = "sum", **pipelining_kwargs: Any) -> None:
        in_scope("set_pipelining_options")
        unknown = set(pipelining_kwargs) - PIPELINE_KWARGS
        if unknown:
            raise TypeError(f"pipeline() got unexpected keyword arguments {sorted(unknown)}")
        stages = getattr(self, "_standin_stages", None)
        if not stages:
            raise ValueError("set_pipelining_options on a model without a pipeline stage assignment")
        schedule = pipelining_kwargs.get("pipeline_schedule", PipelineSchedule.Grouped)
        if not isinstance(schedule, PipelineSchedule):
            raise TypeError("The given pipeline_schedule is not a member of the PipelineSchedule enumeration.")
        if not isinstance(pipelining_kwargs.get("recomputation_mode", RecomputationMode.Auto), RecomputationMode):
            raise TypeError("The given recomputation_mode is not a member of the RecomputationMode enumeration.")
        k = len(set(stages.values()))
        mapping = list(range(k)) if device_mapping is None else list(device_mapping)
        if len(mapping) != k:
            raise ValueError(f"Each stage must be mapped to an IPU: {len(mapping)} mappings != {k} stages")
        if schedule == PipelineSchedule.Interleaved and len(set(mapping)) != len(mapping):
            raise NotImplementedError("The pipelining schedule 'Interleaved' does not currently support multiple "
                                      "pipeline stages on the same device for training graphs.")
        for key in ("forward_propagation_stages_poplar_options", "backward_propagation_stages_poplar_options"):
            if key in pipelining_kwargs and len(pipelining_kwargs[key]) != k:
                raise ValueError(f"{key} must have one PipelineStageOptions per computational stage ({k})")
        g = _positive(gradient_accumulation_steps_per_replica)
        self._standin_pipeline = {"G": g, "schedule": schedule, "device_mapping": mapping}
        record.add("set_pipelining_options", gradient_accumulation_steps_per_replica=g,
                   device_mapping=device_mapping, accumulate_outfeed=accumulate_outfeed,
                   reduction=GradientAccumulationReductionMethod.parse(gradient_accumulation_reduction_method),
                   **pipelining_kwargs)

    def set_gradient_accumulation_options(self: Any, gradient_accumulation_steps_per_replica: Any = None,
                                          gradient_accumulation_reduction_method: Any = "sum",
                                          use_v2_gradient_accumulation_optimizer: bool = False,
                                          **gradient_accumulation_optimizer_kwargs: Any) -> None:
        in_scope("set_gradient_accumulation_options")
        unknown = set(gradient_accumulation_optimizer_kwargs) - GA_OPTIMIZER_KWARGS
        if unknown:
            raise TypeError(f"GradientAccumulationOptimizerV2 got unexpected keyword arguments {sorted(unknown)}")
        g = _positive(gradient_accumulation_steps_per_replica)
        self._standin_accumulation = g
        record.add("set_gradient_accumulation_options", gradient_accumulation_steps_per_replica=g,
                   reduction=GradientAccumulationReductionMethod.parse(gradient_accumulation_reduction_method))

    def set_asynchronous_callbacks(self: Any, asynchronous: bool = False) -> None:
        in_scope("set_asynchronous_callbacks")
        record.add("set_asynchronous_callbacks", asynchronous=asynchronous)

    def set_replication_options(self: Any, replicated_metric_reduction_method: Any = "NONE") -> None:
        in_scope("set_replication_options")
        record.add("set_replication_options",
                   replicated_metric_reduction_method=ReplicatedMetricReductionMethod.parse(
                       replicated_metric_reduction_method))

    def reset_pipeline_stage_assignment(self: Any) -> None:
        self._standin_stages, self._standin_pipeline = {}, None

    def print_pipeline_stage_assignment_summary(self: Any, line_length: Any = None, print_fn: Any = None) -> None:
        (print_fn or print)(str(getattr(self, "_standin_stages", {})))

    methods: list[Callable[..., Any]] = [
        get_pipeline_stage_assignment, set_pipeline_stage_assignment, set_pipelining_options,
        set_gradient_accumulation_options, set_asynchronous_callbacks, reset_pipeline_stage_assignment,
        print_pipeline_stage_assignment_summary]
    if sdk >= (3, 1):
        methods.append(set_replication_options)
    return {f.__name__: f for f in methods}


def _positive(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"Expected `gradient_accumulation_steps_per_replica` to be a positive integer, got {v}")
    return v


def _raw(v: Any) -> Any:
    return v if isinstance(v, tf.Variable) else v.value


_WRITES = ("assign", "assign_add", "assign_sub")


@contextlib.contextmanager
def _no_forward_state(model: Any):  # type: ignore[no-untyped-def]
    """Inside a pipelined ``fit``: writing a non-trainable model variable is an error.

    Every variable class in the MRO that defines a write method gets the trap: TF's
    ``ResourceVariable`` has its own ``assign`` (a dispatch wrapper), so patching
    ``BaseResourceVariable`` alone misses Keras 3's writes (``KerasVariable.assign``
    -> ``ResourceVariable.assign``) and Keras 2's (``assign_sub`` in
    ``BatchNormalization``'s moving averages)."""
    frozen = {id(_raw(v)): v.name for v in model.non_trainable_variables}
    classes = {c for v in model.non_trainable_variables for c in type(_raw(v)).__mro__}
    saved = [(c, name, c.__dict__[name]) for c in classes for name in _WRITES if name in c.__dict__]

    def trap(original: Callable[..., Any]) -> Callable[..., Any]:
        def write(self: Any, *args: Any, **kwargs: Any) -> Any:
            if id(self) in frozen:
                raise RuntimeError(
                    f"stand-in: {frozen[id(self)]!r} is assigned inside a pipeline stage; the SDK's pipeline only "
                    "updates state after it flushes, so such updates are undefined (graphcore/keras "
                    "ipu/pipeline_test.py testKerasBatchNormalizationLayerWarns)")
            return original(self, *args, **kwargs)

        return write

    for c, name, original in saved:
        setattr(c, name, trap(original))
    try:
        yield
    finally:
        for c, name, original in saved:
            setattr(c, name, original)


def install(sdk: tuple[int, int] = SDK) -> tuple[Record, Callable[[], None]]:
    """Install the stand-in of SDK ``sdk``; returns its Record and the function undoing it."""
    record = Record()
    record.sdk = sdk
    model_cls = tf.keras.Model
    saved = {name: model_cls.__dict__.get(name) for name in (
        "compile", "fit", "predict", *make_extensions(record, (9, 9)))}
    previous = sys.modules.get("tensorflow.python.ipu")
    sys.modules["tensorflow.python.ipu"] = make_standin(record, sdk)
    real_compile, real_fit, real_predict = model_cls.compile, model_cls.fit, model_cls.predict

    def compile(self: Any, *args: Any, **kwargs: Any) -> Any:  # the real Keras compile, recorded
        self._standin_spe = kwargs.get("steps_per_execution", 1)
        record.add("compile", steps_per_execution=kwargs.get("steps_per_execution"))
        return real_compile(self, *args, **kwargs)

    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        pipe = getattr(self, "_standin_pipeline", None)
        g = pipe["G"] if pipe else getattr(self, "_standin_accumulation", 1)
        if self._standin_spe % g:
            raise RuntimeError(f"steps_per_execution ({self._standin_spe}) is not divisible by "
                               f"gradient_accumulation_steps_per_replica ({g})")
        if not pipe:
            return real_fit(self, *args, **kwargs)
        verify_pipeline_iterations(g, pipe["schedule"], pipe["device_mapping"], training=True)
        with _no_forward_state(self):
            return real_fit(self, *args, **kwargs)

    def predict(self: Any, *args: Any, **kwargs: Any) -> Any:
        pipe = getattr(self, "_standin_pipeline", None)
        if pipe:
            verify_pipeline_iterations(self._standin_spe, pipe["schedule"], pipe["device_mapping"], training=False)
        return real_predict(self, *args, **kwargs)

    patches = {"compile": compile, "fit": fit, "predict": predict, **make_extensions(record, sdk)}
    for name, fn in patches.items():
        setattr(model_cls, name, fn)

    def undo() -> None:
        for name, fn in saved.items():
            if fn is None:
                if name in model_cls.__dict__:
                    delattr(model_cls, name)
            else:
                setattr(model_cls, name, fn)
        if previous is None:
            sys.modules.pop("tensorflow.python.ipu", None)
        else:
            sys.modules["tensorflow.python.ipu"] = previous

    return record, undo
