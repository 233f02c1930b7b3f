"""ONNX Runtime as a hal backend: an out-of-tree, inference-only plug-in.

Installed as its own distribution (``pip install plugins/hal-onnxruntime``), it
registers the backend ``onnxruntime`` in the ``hal.backends`` entry-point group.
``compile`` exports the spec with :func:`hal.onnx.to_onnx` in memory (inference
form: BatchNorm with running statistics) and runs it in an
``onnxruntime.InferenceSession``.

Targets are ``onnxruntime:<device>``, one per execution provider the installed
runtime reports, named by the provider's name without ``ExecutionProvider``,
lowercased: ``CPUExecutionProvider`` -> ``cpu``, ``CUDAExecutionProvider`` ->
``cuda``, ``TensorrtExecutionProvider`` -> ``tensorrt``, ``ROCMExecutionProvider``
-> ``rocm``, ``OpenVINOExecutionProvider`` -> ``openvino``, ``DmlExecutionProvider``
-> ``dml``, ``CoreMLExecutionProvider`` -> ``coreml``, ``QNNExecutionProvider`` ->
``qnn``. ``AzureExecutionProvider`` is not a target: it calls remote endpoints and
would run a hal graph on the CPU provider under another name. Nodes a provider
cannot run fall back to the CPU provider (ONNX Runtime's rule); a provider that
cannot start at all (missing CUDA libraries, say) is an error, never a silent
CPU run.

Inference-only: ``capabilities().training`` is False and there are no gradients.
``predict(training=True)``, the training-mode forward hal defines (BatchNorm
normalising with the batch's mean and biased variance, dropout active, no state
updated), runs a second session built on first use: the exported graph with each
BatchNormalization written out in standard ONNX ops over batch statistics, each
Dropout of rate > 0 given ``training_mode`` and each StochasticDepth of rate > 0
drawing its mask (RandomUniformLike). A spec with none of them has one
forward, and the inference session answers both modes. Precision is fp32: the
exported graph computes in float32, and specs of another dtype are declared
unsupported.

Options: ``opset`` (of the exported graph), ``intra_op_num_threads`` and
``graph_optimization`` (the session's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from hal.backend import Availability, Backend, Capabilities, Executable, Option, Target, Weights, package_availability
from hal.errors import BackendUnavailable, ConfigError, UnsupportedError
from hal.spec import BatchNorm, Dropout, ModelSpec, StochasticDepth
from hal.training import TrainConfig

if TYPE_CHECKING:
    import onnx
    import onnxruntime

SUFFIX = "ExecutionProvider"
NOT_DEVICES = frozenset({"AzureExecutionProvider"})  # remote endpoints, no device of its own
GRAPH_OPTIMIZATION = {  # option value -> onnxruntime.GraphOptimizationLevel member
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disable": "ORT_DISABLE_ALL",
}


def device_name(provider: str) -> str:
    """The target device for an execution provider: ``CUDAExecutionProvider`` -> ``cuda``."""
    return provider.removesuffix(SUFFIX).lower()


def _providers() -> dict[str, str]:
    """Device name -> execution provider, for the providers this runtime reports, CPU first."""
    import onnxruntime

    found = [p for p in onnxruntime.get_available_providers() if p not in NOT_DEVICES]
    found.sort(key=lambda p: p != f"CPU{SUFFIX}")
    return {device_name(p): p for p in found}


def training_differs(spec: ModelSpec) -> list[str]:
    """Nodes whose training-mode forward differs from inference: BatchNorm, Dropout and
    StochasticDepth of rate > 0."""
    return [n.name for n in spec.nodes if isinstance(n.op, BatchNorm) or (isinstance(n.op, Dropout) and n.op.rate > 0)
            or (isinstance(n.op, StochasticDepth) and n.op.p > 0)]


def training_form(model: "onnx.ModelProto", spec: ModelSpec) -> "onnx.ModelProto":
    """A copy of ``model`` (``hal.onnx.to_onnx(spec, ...)``, whose node names are
    hal's) computing the training-mode forward: every BatchNorm over the batch's
    mean and biased variance, every Dropout and StochasticDepth of rate > 0 active."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    todo, nodes, unused = set(training_differs(spec)), [], set()
    for node in graph.node:
        op = spec.node(node.name).op if node.name in todo else None
        if isinstance(op, BatchNorm):
            nodes += _batch_statistics_norm(graph, node, op.eps, len(spec.shape(node.name)) + 1, opset)
            unused.update(node.input[3:])  # the running statistics
        elif isinstance(op, Dropout):
            nodes.append(_active_dropout(graph, node))
        elif isinstance(op, StochasticDepth):
            nodes += _active_stochastic_depth(graph, node, op, len(spec.shape(node.name)) + 1, opset)
        else:
            nodes.append(node)
        todo.discard(node.name)
    if todo:  # fused or renamed by the exporter: refuse rather than run the inference form
        raise UnsupportedError(f"the exported graph has no node {sorted(todo)}: no training-mode forward")
    del graph.node[:]
    graph.node.extend(nodes)
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name in unused]):
        del graph.initializer[i]
    return out


def _batch_statistics_norm(
    graph: "onnx.GraphProto", node: "onnx.NodeProto", eps: float, rank: int, opset: int
) -> list["onnx.NodeProto"]:
    """``BatchNormalization`` as ``(x - mean) / sqrt(var + eps) * gamma + beta`` with the
    mean and biased variance of ``x`` over every axis but the channels."""
    from onnx import helper, numpy_helper

    x, gamma, beta = node.input[:3]

    def v(value: str) -> str:
        return f"{node.name}/train/{value}"

    axes = [0, *range(2, rank)]
    graph.initializer.extend([
        numpy_helper.from_array(np.array([1, -1] + [1] * (rank - 2), np.int64), v("shape")),
        numpy_helper.from_array(np.array(eps, np.float32), v("eps")),
    ])
    if opset >= 18:  # ReduceMean's axes became an input in opset 18
        graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), v("axes")))

    def op(kind: str, inputs: list[str], output: str, **attrs: Any) -> "onnx.NodeProto":
        return helper.make_node(kind, inputs, [output], output, **attrs)

    def mean(inp: str, output: str) -> "onnx.NodeProto":
        if opset >= 18:
            return op("ReduceMean", [inp, v("axes")], output, keepdims=1)
        return op("ReduceMean", [inp], output, axes=axes, keepdims=1)

    return [
        mean(x, v("mean")),
        op("Sub", [x, v("mean")], v("centred")),
        op("Mul", [v("centred"), v("centred")], v("square")),
        mean(v("square"), v("var")),
        op("Add", [v("var"), v("eps")], v("var_eps")),
        op("Sqrt", [v("var_eps")], v("std")),
        op("Div", [v("centred"), v("std")], v("normed")),
        op("Reshape", [gamma, v("shape")], v("gamma")),
        op("Reshape", [beta, v("shape")], v("beta")),
        op("Mul", [v("normed"), v("gamma")], v("scaled")),
        helper.make_node("Add", [v("scaled"), v("beta")], [node.output[0]], node.name),
    ]


def _active_dropout(graph: "onnx.GraphProto", node: "onnx.NodeProto") -> "onnx.NodeProto":
    """The exported ``Dropout(x, ratio)`` with ``training_mode`` on: zero with probability
    ``ratio``, scale the rest by ``1 / (1 - ratio)``."""
    from onnx import helper, numpy_helper

    mode = f"{node.name}/train/training_mode"
    graph.initializer.append(numpy_helper.from_array(np.array(True), mode))
    return helper.make_node("Dropout", [*node.input[:2], mode], [node.output[0]], node.name)


def _active_stochastic_depth(
    graph: "onnx.GraphProto", node: "onnx.NodeProto", op: StochasticDepth, rank: int, opset: int
) -> list["onnx.NodeProto"]:
    """torchvision's ``stochastic_depth`` in training: one Bernoulli(1 - p) draw per sample
    ("row") or per batch ("batch"), kept values scaled by ``1 / (1 - p)`` (all zeros at p = 1)."""
    from onnx import TensorProto, helper, numpy_helper

    def v(value: str) -> str:
        return f"{node.name}/train/{value}"

    x = node.input[0]
    axes = list(range(1, rank)) if op.mode == "row" else list(range(rank))
    keep = 1.0 - op.p
    graph.initializer.append(numpy_helper.from_array(np.array(op.p, np.float32), v("p")))
    graph.initializer.append(numpy_helper.from_array(np.array(1.0 / keep if keep else 0.0, np.float32), v("scale")))
    if opset >= 18:  # ReduceMean's axes became an input in opset 18
        graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), v("axes")))
        shape = helper.make_node("ReduceMean", [x, v("axes")], [v("one_per_draw")], keepdims=1)
    else:
        shape = helper.make_node("ReduceMean", [x], [v("one_per_draw")], axes=axes, keepdims=1)
    return [
        shape,
        helper.make_node("RandomUniformLike", [v("one_per_draw")], [v("uniform")], dtype=TensorProto.FLOAT),
        helper.make_node("GreaterOrEqual", [v("uniform"), v("p")], [v("kept")]),
        helper.make_node("Cast", [v("kept")], [v("mask")], to=TensorProto.FLOAT),
        helper.make_node("Mul", [v("mask"), v("scale")], [v("factor")]),
        helper.make_node("Mul", [x, v("factor")], [node.output[0]], node.name),
    ]


class OnnxRuntimeExecutable(Executable):
    """The spec as an ONNX model in an ``InferenceSession`` (``session``); holds the
    canonical float32 weights the session was built from."""

    def __init__(
        self, spec: ModelSpec, weights: Weights, target: Target, config: TrainConfig, options: Mapping[str, Any]
    ) -> None:
        super().__init__(spec, target, config)
        self.provider = _providers()[target.device]
        self.options = dict(options)
        self._training_differs = bool(training_differs(spec))
        self._load_weights(weights)

    def _build_session(self, weights: Weights, training: bool = False) -> "onnxruntime.InferenceSession":
        import onnxruntime

        from hal.onnx import to_onnx

        model = to_onnx(self.spec, weights, opset=self.options["opset"])
        if training:
            model = training_form(model, self.spec)
        so = onnxruntime.SessionOptions()
        so.intra_op_num_threads = self.options["intra_op_num_threads"]
        so.graph_optimization_level = getattr(
            onnxruntime.GraphOptimizationLevel, GRAPH_OPTIMIZATION[self.options["graph_optimization"]]
        )
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), so, providers=[self.provider],
            # onnxruntime removes every Dropout whose mask is unused, training_mode or not
            disabled_optimizers=["EliminateDropout"] if training else None,
        )
        if self.provider not in session.get_providers():
            raise BackendUnavailable(
                f"{self.target}: onnxruntime could not start {self.provider} here (the session got "
                f"{session.get_providers()}); check the provider's libraries and drivers"
            )
        return session

    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        session = self.session
        if training and self._training_differs:
            if self._training_session is None:  # built on first use: most executables never need it
                self._training_session = self._build_session(self._weights, training=True)
            session = self._training_session
        return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def weights(self) -> Weights:
        return {k: v.copy() for k, v in self._weights.items()}

    def _load_weights(self, weights: Weights) -> None:
        w = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
        session = self._build_session(w)  # built before anything is replaced
        self._weights, self.session = w, session
        self._training_session: "onnxruntime.InferenceSession | None" = None


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime, one target per execution provider; inference only, fp32."""

    name = "onnxruntime"
    description = "ONNX Runtime (out-of-tree plug-in): the spec exported to ONNX, inference only, fp32"

    @classmethod
    def availability(cls) -> Availability:
        exporter = package_availability("onnx", "onnx", "pip install onnx")
        if not exporter.available:
            return exporter
        runtime = package_availability("onnxruntime", "onnxruntime", "pip install onnxruntime (or onnxruntime-gpu)")
        if runtime.available and runtime.version is None:  # the GPU build's distribution name
            return package_availability("onnxruntime", "onnxruntime-gpu", "")
        return runtime

    @classmethod
    def devices(cls) -> list[str]:
        return list(_providers())

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(precisions=("fp32",), training=False)

    @classmethod
    def unsupported(cls, spec: ModelSpec, config: TrainConfig | None = None) -> dict[str, str]:
        out = super().unsupported(spec, config)
        if spec.dtype != "float32":
            out[spec.input.name] = f"{cls.name} computes in float32 (fp32); the spec's input dtype is {spec.dtype}"
        return out

    @classmethod
    def options(cls) -> dict[str, Option]:
        from hal.onnx import DEFAULT_OPSET  # hal.onnx imports onnx only when it exports

        return {
            "opset": Option(DEFAULT_OPSET, "ONNX opset of the exported graph (hal.onnx.MIN_OPSET to the newest)"),
            "intra_op_num_threads": Option(0, "threads of one operator; 0 lets onnxruntime choose (physical cores)"),
            "graph_optimization": Option(
                "all", "onnxruntime graph optimization level (fusions, constant folding)",
                tuple(GRAPH_OPTIMIZATION),
            ),
        }

    @classmethod
    def compile(
        cls, spec: ModelSpec, weights: Weights, device: str, config: TrainConfig, options: Mapping[str, Any],
        plan: Any,
    ) -> Executable:
        if options["intra_op_num_threads"] < 0:
            raise ConfigError(
                f"{cls.name} option 'intra_op_num_threads' must be >= 0 (0: onnxruntime's choice), "
                f"got {options['intra_op_num_threads']}"
            )
        return OnnxRuntimeExecutable(spec, weights, Target(cls.name, device), config, options)
