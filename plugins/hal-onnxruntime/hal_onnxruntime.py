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
``predict(training=True)`` is the training-mode forward (batch statistics in
BatchNorm, dropout active), which an ONNX inference graph does not express; it
is refused with :class:`~hal.errors.UnsupportedError` for specs with a BatchNorm
or a Dropout of rate > 0. For every other spec the two forwards are the same
function by definition, so the inference session answers both. Precision is
fp32: the exported graph computes in float32.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from hal.backend import Availability, Backend, Capabilities, Executable, Option, Target, Weights
from hal.errors import BackendUnavailable, ConfigError, UnsupportedError
from hal.spec import BatchNorm, Dropout, ModelSpec
from hal.training import TrainConfig

if TYPE_CHECKING:
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
    """Nodes whose training-mode forward differs from inference: BatchNorm, Dropout of rate > 0."""
    return [n.name for n in spec.nodes if isinstance(n.op, BatchNorm) or (isinstance(n.op, Dropout) and n.op.rate > 0)]


class OnnxRuntimeExecutable(Executable):
    """The spec as an ONNX model in an ``InferenceSession``; holds the canonical
    float32 weights the session was built from."""

    def __init__(
        self, spec: ModelSpec, weights: Weights, target: Target, config: TrainConfig, options: Mapping[str, Any]
    ) -> None:
        super().__init__(spec, target, config)
        self.provider = _providers()[target.device]
        self.options = dict(options)
        self._training_differs = training_differs(spec)
        self._load_weights(weights)

    def _build_session(self, weights: Weights) -> "onnxruntime.InferenceSession":
        import onnxruntime

        from hal.onnx import to_onnx

        model = to_onnx(self.spec, weights)
        so = onnxruntime.SessionOptions()
        so.intra_op_num_threads = self.options["intra_op_num_threads"]
        so.graph_optimization_level = getattr(
            onnxruntime.GraphOptimizationLevel, GRAPH_OPTIMIZATION[self.options["graph_optimization"]]
        )
        session = onnxruntime.InferenceSession(model.SerializeToString(), so, providers=[self.provider])
        if self.provider not in session.get_providers():
            raise BackendUnavailable(
                f"{self.target}: onnxruntime could not start {self.provider} here (the session got "
                f"{session.get_providers()}); check the provider's libraries and drivers"
            )
        return session

    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        if training and self._training_differs:
            raise UnsupportedError(
                f"{self.target}: no training-mode forward for {', '.join(self._training_differs)}: an ONNX inference "
                "graph has BatchNorm with running statistics and dropout off; use predict(training=False)"
            )
        feed = {self.session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
        return self.session.run(None, feed)[0]

    def weights(self) -> Weights:
        return {k: v.copy() for k, v in self._weights.items()}

    def _load_weights(self, weights: Weights) -> None:
        w = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
        session = self._build_session(w)  # built before anything is replaced
        self._weights, self.session = w, session


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime, one target per execution provider; inference only, fp32."""

    name = "onnxruntime"
    description = "ONNX Runtime (out-of-tree plug-in): the spec exported to ONNX, inference only, fp32"

    @classmethod
    def availability(cls) -> Availability:
        for module in ("onnxruntime", "onnx"):
            if importlib.util.find_spec(module) is None:
                return Availability(False, None, f"{module} is not installed: pip install {module}")
        for dist in ("onnxruntime", "onnxruntime-gpu"):  # the runtime ships under either name
            try:
                return Availability(True, importlib.metadata.version(dist))
            except importlib.metadata.PackageNotFoundError:
                continue
        return Availability(True, None)

    @classmethod
    def devices(cls) -> list[str]:
        return list(_providers())

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(precisions=("fp32",), training=False)

    @classmethod
    def options(cls) -> dict[str, Option]:
        return {
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
