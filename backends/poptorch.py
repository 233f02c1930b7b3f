"""PopTorch backend: ``poptorch:ipu`` (IPU hardware) and ``poptorch:ipu-model`` (the IPU Model simulator).

The model is the torch backend's :func:`~hal.backends.torch.build_module` graph
(submodules at the canonical node names), wrapped so that ``forward(x, y)``
returns ``(logits, loss)``: ``poptorch.trainingModel`` needs the loss inside
``forward``. An IPU plan (:func:`hal.ipu.plan`) becomes PopTorch's real API:

================================  ==============================================================
plan / config                     PopTorch
================================  ==============================================================
device iterations D               ``Options().deviceIterations(D)``
replicas R                        ``Options().replicationFactor(R)``
gradient accumulation G           ``Options().Training.gradientAccumulation(G)``, mean reduction
pipeline stage s starts at node   ``poptorch.BeginBlock(module.get_submodule(node), f"stage{s}", s)``
                                  and ``PipelinedExecution(AutoStage.SameAsIpu)``
recomputation (S > 1)             ``_Popart.set("autoRecomputation", 3)`` (Pipeline) when the plan
                                  asks, ``0`` (None) when it does not: PopTorch turns Pipeline on
                                  by itself for any pipeline over more than one IPU
recomputation checkpoints         ``poptorch.recomputationCheckpoint`` on each named node's output;
                                  on one IPU also ``explicitRecomputation`` and
                                  ``autoRecomputation`` 4 (RecomputeAll), as Graphcore's ResNet50
available-memory proportion p_i   ``Options().setAvailableMemoryProportion({"IPU<i>": p_i})``,
                                  every IPU of a replica
16.16                             ``model.half()``, stochastic rounding when training on
                                  hardware, ``loss_scaling=128``
half partials (plan)              ``Precision.setPartialsType(torch.half)``, else ``torch.float``
SGD / Adam / AdamW                ``poptorch.optim.SGD/Adam/AdamW``, fp32 accumulators and state
outputs                           ``Options().outputMode(OutputMode.All)`` (``anchorMode`` before SDK 2.4)
ipu-model                         ``Options().useIpuModel(True)``
compile cache                     ``Options().enableExecutableCaching(cache_dir)`` (option ``cache_dir``)
weights() / load_weights()        ``copyWeightsToHost()`` / ``copyWeightsToDevice()``
non-finite step not applied       restore from host copies: weights (``copyWeightsToDevice``) and
                                  optimizer state (``optimizer.load_state_dict``)
================================  ==============================================================

Plans arrive only through ``hal.compile(spec, "poptorch:ipu-model", plan=plan)``.

A host batch is laid out as ``poptorch.DataLoader`` combines it: ``micro x D x R x G``
consecutive samples, read by PopART as ``[D, G, R, micro]``, so with R = 1 a step's G
micro-batches are the consecutive slices hal's gradient accumulation uses.

Semantics that differ from ``torch:cpu`` and why:

- precisions are ``fp32`` and ``16.16`` (see "Precision" below); ``fp16`` and ``16.32``
  (fp16 compute on fp32 master weights) are refused: PopTorch keeps no fp32 master copy
  of a halved model, and Graphcore's PyTorch examples run 16.32 only as an fp32 model fed
  fp16 inputs, with those tests disabled;
- with R > 1 replicas each keeps its own BatchNorm running statistics; the values
  copied back are those PopTorch returns (replica 0's);
- the learning rate is a host value sent with ``setOptimizer`` between calls, so a
  per-step schedule needs ``device_iterations=1``;
- with D > 1 one host call is D optimizer steps: ``train_step`` needs D = 1, use
  ``run_steps`` with a multiple of D steps.

``loss_and_grads`` runs a second training model, on a copy of the module whose
BatchNorm layers do not update their statistics, with ``poptorch.optim.SGD(lr=0)``,
anchors every parameter's ``Gradient___<name>`` tensor (``Options().anchorTensor``
with ``OutputMode.All``: one value per micro-batch, ``D x G x R`` per call, PopART
glossary "Anchor tensor") and averages them. PopTorch has no backward-only call;
lr = 0, passed explicitly so that it stays a variable and is not folded away,
leaves the weights as they were.

Non-finite steps (``config.check_finite``): the IPU applies the update inside the
call, so hal checks afterwards and undoes a bad call from host copies. Before each
training call it reads the optimizer state (``optimizer.state_dict()``, which
PopTorch fills from the IPU: ``ipu_state``); after it, it copies the weights to the
host (``copyWeightsToHost``, weights and BatchNorm buffers) and checks the returned
losses and those weights: a non-finite gradient makes the weights it updates
non-finite, under SGD as under Adam. A bad call is undone with
``copyWeightsToDevice`` of the weights from before it and
``optimizer.load_state_dict`` of the state read before it (PopTorch writes it to
the IPU before the next run). The executor is compiled before the first call so
that there is a state to read. Cost per host call: one device-to-host copy of the
weights and one of the optimizer state (none for plain SGD, the momentum for SGD
with momentum, two moments for Adam), plus a host scan: amortise it with
``device_iterations`` or turn the check off (``check_finite=False``). The D
optimizer steps of one host call (``device_iterations``) stand or fall together.

Precision. ``16.16`` is Graphcore's ResNet50 precision (graphcore/examples
``vision/cnns/pytorch/train/configs.yml``: ``precision: "16.16"``, ``half_partial: true``,
``loss_scaling: 128``, stochastic rounding): weights, activations and gradients in fp16
with no fp32 master copy, optimizer state and accumulators in fp32 (``accum_type``), the
loss computed in fp32 and scaled by a static 128 (a power of two, so scaling and
unscaling are exact; it lifts gradients 7 binades away from fp16's subnormal range below
6.1e-5, and leaves a factor 512 below fp16's largest value 65504 for a gradient of 1).
``loss_and_grads`` divides PopART's anchored gradients, which are those of the scaled loss
(PopART ``transforms/autodiff/gradgrowerloss.cpp`` seeds the backward with the scale), by it.
What parity can expect against fp32: each fp16 rounding costs up to u = 2^-11 = 4.9e-4
relative, so predictions and gradients differ from float64 by some u: measured on the
stand-in (torch fp16 on the CPU, which accumulates in fp32 like fp32 partials) on
``small_cnn``, a batch of 8: forward 7.3e-4, gradients 6.4e-3 (max error over max value,
all tensors together), where fp32 gives ~1e-7. Half partials add a rounding per partial
sum of K products (error growth up to K u, typically sqrt(K) u): a derived bound, not
measured here; only an IPU can measure it. Training in 16.16 rounds every weight update to
fp16 (stochastic rounding on hardware keeps it unbiased), so trajectories drift from fp32
by more than one step's error: compare 16.16 runs by loss curves, not weights.

SDK versions. ``poptorch.__version__`` ("3.3.0+<build>-<snapshot>"; PopTorch is versioned
with its Poplar SDK) decides what hal may use, from graphcore/poptorch at each SDK tag:

- ``SGD(nesterov=True)`` raises ``ValueError("Nesterov momentum is currently not supported.")``
  when the optimizer is first read (``python/_optimizer_attributes.py``) before SDK 3.0:
  hal refuses such a config at compile time;
- the IPU's optimizer state (momentum, Adam moments and step) reaches the host only from
  SDK 2.4 (``poptorch_core.readOptimizerState``/``writeOptimizerState``, the ``ipu_state``
  of ``optimizer.state_dict()``); from 2.4 ``detachFromDevice`` reads it back and
  ``attachToDevice`` writes it, so hal's executor swaps keep it. Before 2.4 re-attaching
  reloads every PopART variable from its initial host copy (PopART ``Devicex::
  loadEngineAndConnectStreams``; ``weightsToHost`` does not update that copy), so an
  optimizer with state would restart from zero: hal refuses ``check_finite`` with such an
  optimizer (it could not undo the state of a non-finite step) and raises rather than
  swap executors once the training executor holds state (``predict`` and
  ``loss_and_grads`` after training need SDK 2.4, or an optimizer without state);
- ``outputMode``/``OutputMode`` from SDK 2.4, ``anchorMode``/``AnchorMode`` before.

Every PopTorch release pins one torch (1.13 for SDK 3.1/3.2, 2.0.1 for 3.3/3.4), so which
of these applies is in practice decided by the torch hal is installed with.

poptorch and torch are imported lazily: importing this module needs neither.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from hal import ipu as ipu_plan
from hal import spec as S
from hal.backend import Availability, Backend, Capabilities, Executable, Option, Target, Weights, package_availability
from hal.errors import ConfigError, InputError, UnsupportedError
from hal.lowering import IPU_PRECISIONS, IPU_STATIC_LOSS_SCALE, MASTER_DTYPE
from hal.training import SGD, AdamW, Constant, TrainConfig

if TYPE_CHECKING:
    import torch

SDK_HINT = "it ships with Graphcore's Poplar SDK; install its wheel"
PRECISIONS = ("fp32", "16.16")
# popart::RecomputationType (willow/include/popart/sessionoptions.hpp): None, Standard, NormOnly, Pipeline, RecomputeAll
RECOMPUTE_NONE, RECOMPUTE_PIPELINE, RECOMPUTE_ALL = 0, 3, 4
NESTEROV_SINCE = (3, 0)
OPTIMIZER_STATE_SINCE = (2, 4)
OUTPUT_MODE_SINCE = (2, 4)
PREFIX = "graph."  # parameter names inside the loss wrapper: PREFIX + canonical name


def _poptorch() -> Any:
    import poptorch

    return poptorch


def sdk_version(poptorch: Any) -> tuple[int, int]:
    """(major, minor) of PopTorch's SDK from ``poptorch.__version__`` ("3.3.0+1234-abcdef")."""
    version = getattr(poptorch, "__version__", "")
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None:
        raise UnsupportedError(f"poptorch: cannot read the SDK version from poptorch.__version__ = {version!r}")
    return int(match[1]), int(match[2])


def _has_state(config: TrainConfig) -> bool:
    """Whether the optimizer keeps state across steps (momentum, Adam moments)."""
    o = config.optimizer
    return not isinstance(o, SGD) or o.momentum > 0


def check_sdk(config: TrainConfig, sdk: tuple[int, int]) -> None:
    """Refuse what PopTorch ``sdk`` cannot do as hal means it (see the module docstring)."""
    version = ".".join(map(str, sdk))
    if isinstance(config.optimizer, SGD) and config.optimizer.nesterov and sdk < NESTEROV_SINCE:
        raise UnsupportedError(
            f"poptorch: SDK {version} has no Nesterov momentum (poptorch.optim.SGD accepts nesterov=True from "
            "SDK 3.0): use SDK >= 3.0 or SGD(nesterov=False)"
        )
    if config.check_finite and _has_state(config) and sdk < OPTIMIZER_STATE_SINCE:
        raise UnsupportedError(
            f"poptorch: SDK {version} cannot read the optimizer state back from the IPU (readOptimizerState "
            "arrived in SDK 2.4), so check_finite could not undo a non-finite step's momentum or moments: "
            "use SDK >= 2.4, check_finite=False, or SGD without momentum"
        )


# ---------------------------------------------------------------------------
# translation of a plan into PopTorch calls
# ---------------------------------------------------------------------------


def make_options(
    plan: ipu_plan.Plan, device: str, training: bool, cache_dir: str, device_iterations: int | None = None,
    grad_accum: int | None = None, anchors: Mapping[str, str] | None = None,
) -> Any:
    """``poptorch.Options`` for ``plan`` on ``device`` (``ipu`` or ``ipu-model``), caching
    compiled executables in ``cache_dir``.

    ``device_iterations`` / ``grad_accum`` override the plan's (gradient and
    inference models); ``anchors`` maps short names to PopART tensor names.
    """
    import torch

    poptorch = _poptorch()
    b = plan.batch
    stages = plan.ipus_per_replica
    opts = poptorch.Options()
    opts.deviceIterations(device_iterations or b.device_iterations)
    opts.replicationFactor(b.replicas)
    if training:
        opts.Training.gradientAccumulation(grad_accum or b.grad_accum)
        opts.Training.accumulationAndReplicationReductionType(poptorch.ReductionType.Mean)
        _set_recomputation(opts, plan)
    opts.setAvailableMemoryProportion({f"IPU{i}": p for i, p in enumerate(plan.available_memory_proportion)})
    opts.Precision.setPartialsType(torch.half if plan.half_partials else torch.float)
    if plan.precision in IPU_PRECISIONS and training and device == "ipu":
        opts.Precision.enableStochasticRounding(True)
    if stages > 1:
        opts.setExecutionStrategy(poptorch.PipelinedExecution(poptorch.AutoStage.SameAsIpu))
    total = stages * b.replicas
    if total & (total - 1):
        opts.autoRoundNumIPUs(True)
    if sdk_version(poptorch) >= OUTPUT_MODE_SINCE:
        every = poptorch.OutputMode.All
        opts.outputMode(every)
    else:
        every = poptorch.AnchorMode.All
        opts.anchorMode(every)
    opts.useIpuModel(device == "ipu-model")
    opts.enableExecutableCaching(cache_dir)
    for short, long in (anchors or {}).items():
        opts.anchorTensor(short, long, every)  # the mode is the third argument in every SDK
    return opts


def _set_recomputation(opts: Any, plan: ipu_plan.Plan) -> None:
    """Recomputation set explicitly both ways: PopTorch itself sets Pipeline recomputation
    for every pipeline over more than one IPU unless the option was set
    (``popart_compiler/source/Compiler.cpp``, ``Compiler::initSession``, SDK 1.4 to 3.4)."""
    if plan.ipus_per_replica > 1:
        opts._Popart.set("autoRecomputation", RECOMPUTE_PIPELINE if plan.recompute else RECOMPUTE_NONE)
    elif plan.recompute_checkpoints:
        # graphcore/examples vision/cnns/pytorch/utils/ipu_settings.py, recompute_mode "manual"
        opts._Popart.set("explicitRecomputation", True)
        opts._Popart.set("autoRecomputation", RECOMPUTE_ALL)


def place_stages(graph: "torch.nn.Module", plan: ipu_plan.Plan) -> None:
    """``BeginBlock`` at the first node of every stage: stage s runs on IPU s; a
    ``recomputationCheckpoint`` on the output of every checkpoint node of the plan."""
    poptorch = _poptorch()
    for name in plan.recompute_checkpoints:
        graph.get_submodule(name).register_forward_hook(lambda module, args, out: poptorch.recomputationCheckpoint(out))
    if plan.ipus_per_replica == 1:
        return
    entry = graph.spec.input.name  # type: ignore[union-attr]
    for stage in plan.stages:
        first = next(n for n in stage.nodes if n != entry)
        poptorch.BeginBlock(graph.get_submodule(first), user_id=f"stage{stage.index}", ipu_id=stage.index)


def make_optimizer(params: Any, config: TrainConfig, lr: float) -> Any:
    """The ``poptorch.optim`` optimizer with ``torch.optim`` semantics for a hal config.

    SGD uses the separate-accumulator variant, "mathematically identical to PyTorch";
    Adam keeps coupled L2 weight decay, AdamW the decoupled one with bias correction;
    accumulators and optimizer state are fp32 in every precision; 16.16 and 16.32 scale
    the loss by :data:`hal.lowering.IPU_STATIC_LOSS_SCALE`.
    """
    import torch

    poptorch = _poptorch()
    o = config.optimizer
    scaling = loss_scaling(config.precision)
    fp32 = torch.float32
    if isinstance(o, SGD):
        return poptorch.optim.SGD(
            params, lr=lr, momentum=o.momentum, dampening=0.0, weight_decay=o.weight_decay, nesterov=o.nesterov,
            loss_scaling=scaling, use_combined_accum=False, accum_type=fp32, velocity_accum_type=fp32,
        )
    moments = {"accum_type": fp32, "first_order_momentum_accum_type": fp32, "second_order_momentum_accum_type": fp32}
    common = {"lr": lr, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay, "amsgrad": False,
              "loss_scaling": scaling, **moments}
    if isinstance(o, AdamW):
        return poptorch.optim.AdamW(params, bias_correction=True, **common)
    return poptorch.optim.Adam(params, **common)


def loss_scaling(precision: str) -> float:
    """The static loss scale of ``precision``: :data:`hal.lowering.IPU_STATIC_LOSS_SCALE` in 16.16 and 16.32, else 1."""
    return IPU_STATIC_LOSS_SCALE if precision in IPU_PRECISIONS else 1.0


def _with_loss(graph: "torch.nn.Module", loss: str) -> "torch.nn.Module":
    """``forward(x, y) -> (logits, loss)`` around ``graph``, the loss in fp32 by one of the
    ``torch.nn`` loss modules PopTorch supports (mean reduction, as hal's losses)."""
    from torch import nn

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.graph = graph
            self.criterion = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()

        def forward(self, x: "torch.Tensor", y: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
            out = self.graph(x)
            return out, self.criterion(out.float(), y)

    return WithLoss()


# ---------------------------------------------------------------------------
# the executable
# ---------------------------------------------------------------------------


class _Shadow:
    """An executor on a private copy of the module (``graph`` is the copy's TorchGraph),
    refreshed from the host weights before it runs."""

    def __init__(self, graph: Any, executor: Any, anchors: tuple[str, ...] = (), version: int = -1) -> None:
        self.graph, self.executor, self.anchors = graph, executor, anchors
        self.version = version  # the host weight version it holds


class PopTorchExecutable(Executable):
    """A spec compiled for PopTorch; executors are compiled lazily, one per call shape."""

    def __init__(self, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, cache_dir: str,
                 plan: ipu_plan.Plan | None = None) -> None:
        import torch

        super().__init__(spec, Target("poptorch", device), config)
        self.sdk = sdk_version(_poptorch())
        check_sdk(config, self.sdk)
        if plan is not None:
            _check_plan(plan, config)
        self.device = device
        self.cache_dir = cache_dir
        self.plan = plan
        self.dtype = getattr(torch, MASTER_DTYPE[config.precision])
        self.graph = self._new_graph(weights)
        self.model = _with_loss(self.graph, config.loss)
        self.lr = config.lr(0)
        self.optimizer = make_optimizer(self.model.parameters(), config, self.lr)
        self._train: Any = None  # the training PoplarExecutor
        self._shadows: dict[tuple[Any, ...], _Shadow] = {}
        self._active: Any = None  # the executor holding the device
        self._version = 0  # bumped whenever the weights change (a training call, load_weights)
        self._host_stale = False  # the training executor holds newer weights than the host
        self._device_stale = False  # the host holds newer weights than the training executor

    def _new_graph(self, weights: Weights) -> Any:
        """A TorchGraph holding ``weights``, in the compute precision, with the plan's stages."""
        from hal.backends.torch import build_module

        graph = build_module(self.spec, weights, "float32").to(self.dtype)  # fp16 after loading: rounded once
        if self.plan is not None:
            place_stages(graph, self.plan)
        return graph

    # -- plan and batches -----------------------------------------------------------

    def _training_plan(self, n: int) -> ipu_plan.Plan:
        """The plan; without one, a 1-IPU plan sized by the first batch (micro = n / G)."""
        if self.plan is None:
            g = self.config.grad_accum
            self.plan = ipu_plan.plan(self.spec, ipus=1, micro_batch=n // g, grad_accum=g,
                                      precision=self.config.precision, optimizer=self.config.optimizer, devices=[])
        if not self.plan.training:
            raise UnsupportedError(f"{self.target}: this executable was planned for inference only")
        want = self.plan.batch.samples_per_update
        if n != want:
            b = self.plan.batch
            raise InputError(
                f"{self.target}: a step takes micro x G x R = {b.micro_batch} x {b.grad_accum} x {b.replicas} "
                f"= {want} samples, got {n}"
            )
        return self.plan

    def _x(self, x: np.ndarray) -> "torch.Tensor":
        import torch

        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.dtype)

    def _y(self, y: np.ndarray) -> "torch.Tensor":
        import torch

        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64 if self.config.loss == "cross_entropy"
                                                    else np.float32))

    # -- executors ----------------------------------------------------------------------

    def _activate(self, executor: Any) -> None:
        """Give ``executor`` the device: detach the previous holder (the training
        executor's weights copied back first) and re-attach a compiled executor."""
        if self._active is executor:
            return
        if self._active is not None and self._active.isAttachedToDevice():
            if self._active is self._train:
                self._check_can_detach_training()
                self._sync_host()
            self._active.detachFromDevice()
        if executor.isCompiled() and not executor.isAttachedToDevice():
            executor.attachToDevice()
            if executor is self._train:
                self._device_stale = True
            else:
                self._shadow_of(executor).version = -1
        self._active = executor

    def _check_can_detach_training(self) -> None:
        """Before SDK 2.4 detaching and re-attaching the training executor restarts its
        optimizer state from zero (see the module docstring): refuse rather than do it."""
        if self.sdk < OPTIMIZER_STATE_SINCE and _has_state(self.config):
            raise UnsupportedError(
                f"{self.target}: SDK {'.'.join(map(str, self.sdk))} cannot carry the optimizer state of "
                f"{self.config.optimizer!r} across executors (readOptimizerState arrived in SDK 2.4): predict and "
                "loss_and_grads after training would reset it on the IPU. Use SDK >= 2.4, SGD without momentum, "
                "or a second executable (load_weights of this one's weights) for evaluation"
            )

    def _shadow_of(self, executor: Any) -> _Shadow:
        return next(s for s in self._shadows.values() if s.executor is executor)

    def _sync_host(self) -> None:
        if self._host_stale:
            self._train.copyWeightsToHost()
            self._host_stale = False

    def _training_executor(self, plan: ipu_plan.Plan) -> Any:
        if self._train is None:
            poptorch = _poptorch()
            self.model.train()
            options = make_options(plan, self.device, True, self.cache_dir)
            self._train = poptorch.trainingModel(self.model, options=options, optimizer=self.optimizer)
        self._activate(self._train)
        if self._device_stale and self._train.isCompiled():
            self._train.copyWeightsToDevice()
        self._device_stale = False
        return self._train

    def _shadow(self, key: tuple[Any, ...], build: Callable[[], _Shadow]) -> _Shadow:
        """A cached shadow executor holding the current host weights."""
        import torch

        if key not in self._shadows:
            self._shadows[key] = build()
        shadow = self._shadows[key]
        self._activate(shadow.executor)
        if shadow.version != self._version:
            target = shadow.graph.state_dict()
            with torch.no_grad():
                for name, value in self.graph.state_dict().items():
                    target[name].copy_(value)
            if shadow.executor.isCompiled():
                shadow.executor.copyWeightsToDevice()
            shadow.version = self._version
        return shadow

    def _stages(self) -> int:
        return self.plan.ipus_per_replica if self.plan is not None else 1

    # -- the surface ----------------------------------------------------------------------

    def _predict(self, x: np.ndarray, training: bool) -> np.ndarray:
        n, stages = len(x), self._stages()
        if training:  # batch statistics over the whole batch: one micro-batch of n, fed `stages` times
            shadow = self._shadow(("predict-train", n), lambda: self._build_predict(n, stages, True))
            out = shadow.executor(self._x(np.concatenate([x] * stages)))
            return _numpy(out)[:n]
        b = self.plan.batch if self.plan is not None else None
        micro = b.micro_batch if b is not None else n
        iterations = max(b.device_iterations if b is not None else 1, stages)
        replicas = b.replicas if b is not None else 1
        host = micro * iterations * replicas
        shadow = self._shadow(("predict", host), lambda: self._build_predict(micro, iterations, False, replicas))
        outs = []
        for start in range(0, n, host):
            chunk = x[start:start + host]
            pad = host - len(chunk)
            if pad:  # inference BatchNorm uses running statistics: padding changes no other row
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            outs.append(_numpy(shadow.executor(self._x(chunk)))[: host - pad])
        return np.concatenate(outs)

    def _build_predict(self, micro: int, iterations: int, training: bool, replicas: int = 1) -> _Shadow:
        poptorch = _poptorch()
        graph = self._new_graph(self.weights())
        graph.set_update_stats(False)
        graph.train(training)
        base = self.plan or ipu_plan.plan(self.spec, micro_batch=micro, precision=self.config.precision,
                                          training=False, devices=[])
        inference = dataclasses.replace(base, batch=ipu_plan.Batch(micro, iterations, replicas, 1, False))
        executor = poptorch.inferenceModel(graph, options=make_options(inference, self.device, False, self.cache_dir))
        return _Shadow(graph, executor, version=self._version)

    def _loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, Weights]:
        plan = self._training_plan(len(x))
        shadow = self._shadow(("grads",), lambda: self._build_grads(plan))
        _, loss = shadow.executor(self._x(x), self._y(y))
        scale = loss_scaling(self.config.precision)  # PopART anchors the gradients of the scaled loss
        grads = {}
        for short, name in zip(shadow.anchors, self.spec.trainable()):
            g = _numpy(shadow.executor.getAnchoredTensor(short)).astype(np.float32) / np.float32(scale)
            grads[name] = g.reshape(-1, *self.graph.get_parameter(name).shape).mean(axis=0)
        return float(np.mean(_numpy(loss))), grads

    def _build_grads(self, plan: ipu_plan.Plan) -> _Shadow:
        poptorch = _poptorch()
        module = _with_loss(self._new_graph(self.weights()), self.config.loss)
        module.graph.set_update_stats(False)
        module.train()
        anchors = {f"grad{i}": f"Gradient___{PREFIX}{name}" for i, name in enumerate(self.spec.trainable())}
        opts = make_options(plan, self.device, True, self.cache_dir, device_iterations=1, anchors=anchors)
        sgd = poptorch.optim.SGD(module.parameters(), lr=0.0, momentum=0.0, weight_decay=0.0,
                                 loss_scaling=loss_scaling(self.config.precision))
        executor = poptorch.trainingModel(module, options=opts, optimizer=sgd)
        return _Shadow(module.graph, executor, tuple(anchors), version=self._version)

    def _set_lr(self) -> None:
        lr = self.config.lr(self.step)
        if lr != self.lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._train.setOptimizer(self.optimizer)
            self.lr = lr

    def _run(self, plan: ipu_plan.Plan, x: np.ndarray, y: np.ndarray, steps: int) -> tuple[np.ndarray, bool]:
        """``steps`` optimizer steps in one host call: each step's mean loss, and whether
        the call was applied (with ``check_finite``, a non-finite call is undone)."""
        executor = self._training_executor(plan)
        self._set_lr()
        xt, yt = self._x(x), self._y(y)
        check = self.config.check_finite
        if check:
            if not executor.isCompiled():
                executor.compile(xt, yt)  # so that the optimizer has an IPU state to read
            before = self._host_state()
        _, loss = executor(xt, yt)
        self._host_stale = True
        losses = _numpy(loss).astype(np.float64).reshape(steps, -1).mean(axis=1)
        if check:
            self._sync_host()
            weights = self.graph.state_dict().values()
            if not (np.isfinite(losses).all() and all(bool(v.isfinite().all()) for v in weights)):
                self._restore(before)
                return losses, False
        self._version += 1
        self.step += steps
        return losses, True

    def _host_state(self) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
        """Host copies of the weights and of the optimizer state (read from the IPU)."""
        self._sync_host()
        return {k: v.clone() for k, v in self.graph.state_dict().items()}, self.optimizer.state_dict()

    def _restore(self, state: tuple[dict[str, "torch.Tensor"], dict[str, Any]]) -> None:
        """Put a :meth:`_host_state` back on the host and the IPU. The weights go first:
        ``copyWeightsToDevice`` reads the optimizer state back, which must not
        overwrite the one loaded after it (written to the IPU before the next run)."""
        import torch

        weights, optimizer = state
        with torch.no_grad():
            for k, v in self.graph.state_dict().items():
                v.copy_(weights[k])
        self._host_stale = False
        self._train.copyWeightsToDevice()
        self.optimizer.load_state_dict(optimizer)

    def _train_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
        plan = self._training_plan(len(x))
        if plan.batch.device_iterations != 1:
            raise UnsupportedError(
                f"{self.target}: the plan runs {plan.batch.device_iterations} steps per host call "
                "(device_iterations): use run_steps with a multiple of that many steps"
            )
        losses, applied = self._run(plan, x, y, 1)
        return float(losses[0]), applied

    def _run_steps(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, int]:
        plan = self._training_plan(xs.shape[1])
        d = plan.batch.device_iterations
        if len(xs) % d:
            raise InputError(f"{self.target}: run_steps takes a multiple of device_iterations={d} steps, got {len(xs)}")
        out = np.full(len(xs), np.nan)
        for i in range(0, len(xs), d):
            x, y = np.concatenate(list(xs[i:i + d])), np.concatenate(list(ys[i:i + d]))
            out[i:i + d], applied = self._run(plan, x, y, d)
            if not applied:
                return out, i
        return out, len(xs)

    def weights(self) -> Weights:
        if self._train is not None and self._train.isCompiled():
            self._sync_host()
        return {k: v.detach().float().numpy().copy() for k, v in self.graph.state_dict().items()}

    def _load_weights(self, weights: Weights) -> None:
        import torch

        new = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in weights.items()}  # convert all first
        with torch.no_grad():
            for k, v in self.graph.state_dict().items():
                v.copy_(new[k])
        self._host_stale = False
        self._device_stale = True
        self._version += 1

    def close(self) -> None:
        """Release the IPUs: copy the trained weights back, then destroy every executor."""
        if self._train is not None and self._train.isCompiled():
            self._sync_host()
        for ex in [self._train, *(s.executor for s in self._shadows.values())]:
            if ex is not None:
                ex.destroy()
        self._train, self._shadows, self._active = None, {}, None


def _numpy(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def sdk_gap(op: S.Op, shape: S.Shape) -> str | None:
    """Why PopTorch's SDK cannot run ``op`` on a per-sample input ``shape`` as hal lowers it, else None.

    From PopTorch's supported-ops guide and its aten handlers
    (``poptorch/source/popart_canonicalization``): no ``adaptive_max_pool``, adaptive
    average pooling only where each size divides (it becomes a plain average pool), no
    ``reflection_pad3d``, linear upsampling only as bilinear by one integer factor, no
    dilated transposed convolution."""
    if isinstance(op, S.AdaptiveMaxPool):
        return "PopTorch has no adaptive max pooling"
    if isinstance(op, S.AdaptiveAvgPool) and any(n % o for n, o in zip(shape[1:], op.output_size)):
        return (f"PopTorch's adaptive average pooling needs each input size {shape[1:]} to be a multiple of "
                f"the output size {op.output_size}")
    if isinstance(op, S.Pad) and op.mode == "reflect" and len(op.padding) == 3:
        return "PopTorch has no 3-d reflection padding (ReflectionPad1d and 2d only)"
    if isinstance(op, S.ConvTranspose) and any(d != 1 for d in op.dilation):
        return f"PopTorch's transposed convolutions take no dilation, got {op.dilation}"
    if isinstance(op, S.Upsample) and op.mode == "linear":
        factor = op.size[0] // shape[1]
        if len(op.size) != 2 or any(o != factor * n for n, o in zip(shape[1:], op.size)):
            return (f"PopTorch interpolates linearly only in 2-d, by one integer factor in both dims "
                    f"(UpsampleBilinear2d), not {shape[1:]} -> {op.size}")
    return None


def _check_plan(plan: ipu_plan.Plan, config: TrainConfig) -> None:
    """What PopTorch needs of a plan and a config together (hal.compile checked the spec)."""
    if plan.framework != "poptorch":
        raise ConfigError(f"the plan follows {plan.framework}'s pipeline rules, not PopTorch's: plan with "
                          "framework='poptorch'")
    if plan.schedule != "interleaved" or plan.device_mapping != tuple(range(len(plan.stages))):
        raise UnsupportedError(
            f"poptorch: hal runs PipelinedExecution with stage s on IPU s; the plan has schedule "
            f"{plan.schedule!r} and device mapping {plan.device_mapping}: plan with the defaults"
        )
    if plan.precision != config.precision:
        raise ConfigError(f"the plan is {plan.precision} but the training config says {config.precision}")
    if not plan.training:
        return
    if plan.batch.grad_accum != config.grad_accum:
        raise ConfigError(
            f"the plan accumulates {plan.batch.grad_accum} micro-batches but the training config says "
            f"grad_accum={config.grad_accum}: make them equal"
        )
    if plan.state_tensors != ipu_plan.optimizer_state_tensors(config.optimizer):
        raise ConfigError(f"the plan was made for {plan.optimizer}, the training config uses {config.optimizer!r}")
    if plan.batch.device_iterations > 1 and not isinstance(config.schedule, Constant):
        raise ConfigError(
            "a learning-rate schedule changes the rate every step, but PopTorch sets it between host calls: "
            f"plan device_iterations=1 (got {plan.batch.device_iterations}) or use a Constant schedule"
        )


class PopTorchBackend(Backend):
    """Graphcore PopTorch: IPU hardware or the IPU Model simulator."""

    name = "poptorch"
    description = "Graphcore PopTorch (IPU, IPU Model)"

    @classmethod
    def availability(cls) -> Availability:
        return package_availability("poptorch", "poptorch", SDK_HINT)

    @classmethod
    def devices(cls) -> list[str]:
        return (["ipu"] if _poptorch().ipuHardwareIsAvailable() else []) + ["ipu-model"]

    @classmethod
    def capabilities(cls) -> Capabilities:
        # replicas only through a plan (replicationFactor, inside the IPU graph; hal.compile gives the config the
        # plan's count): no data_parallel, which would mean running a DataParallel config without one
        return Capabilities(precisions=PRECISIONS, training=True, pipelining=True, replication=True)

    @classmethod
    def unsupported(cls, spec: S.ModelSpec, config: TrainConfig | None = None) -> dict[str, str]:
        out = super().unsupported(spec, config)
        if config is not None and config.precision in ("fp16", "16.32"):
            out["config"] = (
                f"poptorch runs no {config.precision} (fp16 compute on fp32 master weights"
                + (", dynamic loss scaling" if config.precision == "fp16" else "")
                + "): PopTorch has no fp32 master copy of a halved model, and Graphcore's PyTorch examples "
                "run 16.32 only as an fp32 model fed fp16 inputs, with its tests disabled "
                "(vision/cnns/pytorch/tests/test_train.py); use precision '16.16' (fp16 weights, static loss "
                "scaling) or 'fp32'"
            )
        for node in spec.nodes[1:]:
            gap = sdk_gap(node.op, spec.in_shapes(node)[0])
            if gap:
                out[node.name] = gap
        return out

    @classmethod
    def options(cls) -> dict[str, Option]:
        return {"cache_dir": Option(str(Path.home() / ".cache" / "hal" / "poptorch"),
                                    "folder of PopTorch's compiled-executable cache")}

    @classmethod
    def compile(
        cls, spec: S.ModelSpec, weights: Weights, device: str, config: TrainConfig, options: Mapping[str, Any],
        plan: ipu_plan.Plan | None,
    ) -> Executable:
        return PopTorchExecutable(spec, weights, device, config, options["cache_dir"], plan)
