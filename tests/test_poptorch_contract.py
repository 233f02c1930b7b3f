"""Contract tests of the PopTorch backend (hal.backends.poptorch).

Without Graphcore's SDK these run against a STRICT STAND-IN of the documented
poptorch surface (PopTorch user guide and API reference, SDK 3.x), defined in
this file and injected as ``sys.modules["poptorch"]``. It is not poptorch and
shares none of its code. Only documented names and keywords exist: any other
attribute or keyword raises, as does breaking a documented rule (training a
pipeline with gradientAccumulation below its 2S - 1 stages, gradient accumulation
on an inference model, pipelined inference with fewer device iterations than
stages, a batch not divisible by D x R x G, a module given two BeginBlocks, a
model wrapped twice by trainingModel, an unknown anchored tensor). Optimizer state
behaves as PopTorch's: ``optimizer.state_dict()`` holds the IPU state (``ipu_state``)
once the executor is compiled (None before), and ``load_state_dict`` of such a dict
writes it, with the host weights, to the IPU before the next run (a dict whose
``ipu_state`` is None writes nothing). It is stricter
than poptorch where that tests hal more: the "device" holds its own copy of the
weights, which reach the host only through copyWeightsToHost (no implicit sync),
and only one executor may hold the device at a time (hal must detach/attach).
It runs the wrapped torch module on the CPU, so losses, gradients and weights are
compared with torch:cpu. It models one replica.

It models what the real SDK does by itself, and per version (graphcore/poptorch at the
SDK tags; ``make_standin(version)``): Pipeline recomputation for any pipeline over more
than one IPU unless autoRecomputation was set (Compiler::initSession); per-IPU available
memory proportions keyed by BeginBlock's ipu_id, 0.6 where unset; gradient anchors of the
scaled loss (PopART gradgrowerloss.cpp); SGD(nesterov=True) raising before SDK 3.0;
before SDK 2.4 AnchorMode/anchorMode instead of OutputMode/outputMode, no ``ipu_state``
in optimizer.state_dict(), and a re-attached training executor whose optimizer state
restarts from zero.

When the real poptorch is importable, the stand-in tests are skipped and the
smoke test at the end runs on the IPU Model (POPTORCH_IPU_MODEL=1) instead.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hal  # noqa: E402
from conftest import failing_on_call  # noqa: E402  (tests/ is on sys.path)
from hal import ConfigError, InputError, SpecBuilder, TargetError, TrainConfig, UnsupportedError, ipu, models  # noqa: E402
from hal.training import SGD, Adam, AdamW, StepDecay  # noqa: E402

REAL_POPTORCH = importlib.util.find_spec("poptorch") is not None


# ---------------------------------------------------------------------------
# the stand-in
# ---------------------------------------------------------------------------


def _positive(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def make_standin(version: str = "3.3.0") -> types.ModuleType:
    """A fresh stand-in ``poptorch`` module of SDK ``version`` (see the module docstring)."""
    pt = types.ModuleType("poptorch")
    pt.__spec__ = importlib.machinery.ModuleSpec("poptorch", loader=None)
    pt.__version__ = f"{version}+standin-0000000"
    sdk = tuple(int(v) for v in version.split(".")[:2])
    state = {"ipu": 0, "holder": None, "wrapped": set(), "log": []}

    class OutputMode(enum.IntEnum):
        Final = 0
        EveryN = 1
        All = 2
        Sum = 3
        Default = 4

    class ReductionType(enum.IntEnum):
        Sum = 0
        Mean = 1
        NoReduction = 2

    class AutoStage(enum.IntEnum):
        SameAsIpu = 0
        AutoIncrement = 1

    class _TrainingOptions:
        __slots__ = ("gradient_accumulation", "reduction")

        def __init__(self):
            self.gradient_accumulation, self.reduction = 1, ReductionType.Mean

        def gradientAccumulation(self, gradient_accumulation):
            self.gradient_accumulation = _positive(gradient_accumulation, "gradient_accumulation")
            return self

        def accumulationAndReplicationReductionType(self, reduction_type):
            if not isinstance(reduction_type, ReductionType) or reduction_type == ReductionType.NoReduction:
                raise ValueError("must be set to poptorch.ReductionType.Mean or poptorch.ReductionType.Sum")
            self.reduction = reduction_type
            return self

    class _PrecisionOptions:
        __slots__ = ("partials", "stochastic_rounding")

        def __init__(self):
            self.partials, self.stochastic_rounding = torch.float, False

        def setPartialsType(self, dtype):
            if dtype not in (torch.float, torch.half):
                raise ValueError("parameter to setPartialsType should be either torch.float or torch.half")
            self.partials = dtype
            return self

        def enableStochasticRounding(self, enabled):
            self.stochastic_rounding = bool(enabled)
            return self

    class _PopartOptions:
        __slots__ = ("options",)
        # PopART SessionOptions hal uses (popart_compiler/source/SessionOptions.cpp): the value's type
        KNOWN = {"autoRecomputation": int, "explicitRecomputation": bool}

        def __init__(self):
            self.options = {}

        def set(self, key, value):
            if key not in self.KNOWN:
                raise KeyError(f"stand-in: {key!r} is not a PopART option hal is expected to set")
            if type(value) is not self.KNOWN[key]:
                raise TypeError(f"{key} takes a {self.KNOWN[key].__name__}, got {value!r}")
            if key == "autoRecomputation" and not 0 <= value <= 4:  # popart::RecomputationType None..RecomputeAll
                raise ValueError(f"autoRecomputation: no RecomputationType {value}")
            self.options[key] = value
            return self

    class PipelinedExecution:
        __slots__ = ("auto_stage",)

        def __init__(self, *args):
            if len(args) > 1 or (args and not isinstance(args[0], AutoStage)):
                raise NotImplementedError("stand-in: only PipelinedExecution() or PipelinedExecution(AutoStage.X)")
            self.auto_stage = args[0] if args else AutoStage.SameAsIpu

    class Options:
        __slots__ = ("Training", "Precision", "_Popart", "device_iterations", "replication_factor", "strategy",
                     "auto_round_num_ipus", "output_mode", "use_model", "cache_path", "anchored_tensors",
                     "available_memory_proportion")

        def __init__(self):
            self.Training, self.Precision, self._Popart = _TrainingOptions(), _PrecisionOptions(), _PopartOptions()
            self.device_iterations, self.replication_factor, self.strategy = 1, 1, PipelinedExecution()
            self.auto_round_num_ipus, self.output_mode, self.use_model = False, OutputMode.Default, False
            self.cache_path, self.anchored_tensors, self.available_memory_proportion = None, {}, {}

        def setAvailableMemoryProportion(self, available_memory_proportion):
            for key, mem in available_memory_proportion.items():  # keyed by BeginBlock's ipu_id, as PopTorch's
                assert key.startswith("IPU"), f"Invalid key: {key}"
                if not 0.0 < mem <= 1.0:
                    raise ValueError(f"stand-in: available memory proportion {mem} is not in (0, 1]")
                self.available_memory_proportion[int(key[3:])] = mem
            return self

        def deviceIterations(self, device_iterations):
            self.device_iterations = _positive(device_iterations, "device_iterations")
            return self

        def replicationFactor(self, replication_factor):
            self.replication_factor = _positive(replication_factor, "replication_factor")
            return self

        def setExecutionStrategy(self, strategy):
            assert isinstance(strategy, PipelinedExecution)
            self.strategy = strategy
            return self

        def autoRoundNumIPUs(self, auto_round_num_ipus=True):
            self.auto_round_num_ipus = bool(auto_round_num_ipus)
            return self

        def outputMode(self, output_mode, output_return_period=None):
            assert isinstance(output_mode, OutputMode)
            self.output_mode = output_mode
            return self

        anchorMode = outputMode  # the name before SDK 2.4 (only one of the two exists, see below)

        def useIpuModel(self, use_model):
            self.use_model = bool(use_model)
            return self

        def enableExecutableCaching(self, path):
            self.cache_path = path
            return self

        def anchorTensor(self, short_name, long_name, output_mode=None, output_return_period=1):
            self.anchored_tensors[short_name] = (long_name, output_mode)

    class _BlockHook:
        def __init__(self, user_id, ipu_id):
            self.user_id, self.ipu_id = user_id, ipu_id

        def __call__(self, module, inputs):
            state["ipu"] = self.ipu_id

    def BeginBlock(layer_to_call, user_id=None, ipu_id=None):
        if not isinstance(layer_to_call, torch.nn.Module):
            raise TypeError("module is not an instance of torch.nn.Module or function.")
        if ipu_id is None:
            raise NotImplementedError("stand-in: BeginBlock needs an explicit ipu_id")
        if any(isinstance(h, _BlockHook) for h in layer_to_call._forward_pre_hooks.values()):
            raise RuntimeError("module has already been assigned to a block.")
        layer_to_call.register_forward_pre_hook(_BlockHook(user_id, ipu_id))
        return layer_to_call

    def _record(name, placement):
        def hook(module, inputs):
            placement[name] = state["ipu"]
        return hook

    class PoplarExecutor:
        def __init__(self, model, options, training, optimizer=None):
            self._user_model, self._options, self._training = model, options or Options(), training
            self._optimizer, self._device, self._device_opt = optimizer, None, None
            self._attached, self._anchors, self.placement, self.calls = False, {}, {}, 0
            self.recomputation, self.memory_proportion = None, None  # what the compiled graph got

        # -- compile and run --
        def _compile(self):
            o = self._options
            if not o.use_model:
                raise RuntimeError("no IPU hardware here: use Options().useIpuModel(True) or POPTORCH_IPU_MODEL=1")
            if o.replication_factor != 1:
                raise NotImplementedError("stand-in: one replica only")
            if not self._training and o.Training.gradient_accumulation != 1:
                raise RuntimeError("gradientAccumulation must be 1 for an inferenceModel")
            ipus = {h.ipu_id for m in self._user_model.modules() for h in m._forward_pre_hooks.values()
                    if isinstance(h, _BlockHook)}
            stages = max(ipus) + 1 if ipus else 1
            if self._training and stages > 1 and o.Training.gradient_accumulation < 2 * stages - 1:
                raise RuntimeError(
                    f"poptorch.Options().Training.gradientAccumulation must be greater than or equal to the number "
                    f"of pipeline stages ({2 * stages - 1}) when using poptorch.PipelinedExecution"
                )
            if not self._training and o.device_iterations < stages:
                raise RuntimeError("poptorch.Options().deviceIterations must be >= the number of pipeline stages")
            # Compiler::initSession: Pipeline recomputation unless the user set autoRecomputation
            self.recomputation = o._Popart.options.get("autoRecomputation", 3 if stages > 1 else 0)
            # an IPU missing from setAvailableMemoryProportion keeps Poplar's default
            self.memory_proportion = {i: o.available_memory_proportion.get(i, 0.6) for i in range(stages)}
            total = stages * o.replication_factor
            if total & (total - 1) and not o.auto_round_num_ipus:
                raise RuntimeError(f"{total} IPUs is not a power of two: use autoRoundNumIPUs(True)")
            self._device = copy.deepcopy(self._user_model)
            names = dict(self._device.named_parameters())
            for short, (long, _) in o.anchored_tensors.items():
                if not long.startswith("Gradient___") or long[len("Gradient___"):] not in names:
                    raise RuntimeError(f"No tensor with name {long} found")
            for name, m in self._device.named_modules():
                if name and not list(m.children()):
                    m.register_forward_pre_hook(_record(name, self.placement))
            if self._training:
                opt = self._optimizer
                self._device_opt = type(opt)(self._device.parameters(), **opt.kwargs)
                self.setOptimizer(opt)
            self._take_device()

        def _reset_optimizer_state(self):
            """Before SDK 2.4 a re-attached engine reloads every PopART variable from its initial
            host copy: the optimizer state restarts from zero."""
            self._device_opt.state.clear()

        def _read_optimizer_state(self):
            return copy.deepcopy(torch.optim.Optimizer.state_dict(self._device_opt)["state"])

        def _write_optimizer_state_if_needed(self):
            """PopTorch's writeOptimizerState: the loaded state and the host weights go to the IPU."""
            if sdk < (2, 4):
                return
            pending, self._optimizer._pending = self._optimizer._pending, None
            if pending is None or pending["ipu_state"] is None:
                return
            state["log"].append(("writeOptimizerState", self))
            groups = torch.optim.Optimizer.state_dict(self._device_opt)["param_groups"]
            torch.optim.Optimizer.load_state_dict(
                self._device_opt, {"state": copy.deepcopy(pending["ipu_state"]), "param_groups": groups})
            self.copyWeightsToDevice()

        def _take_device(self):
            if state["holder"] is not None and state["holder"] is not self:
                raise RuntimeError("stand-in: the IPUs are held by another executor: detachFromDevice() it first")
            state["holder"], self._attached = self, True

        def compile(self, *args):
            if self._device is None:
                self._compile()

        def __call__(self, *args):
            if self._device is None:
                self._compile()
            if not self._attached:
                raise RuntimeError("the executor is not attached to a device")
            if self._training:
                self._write_optimizer_state_if_needed()
            o = self._options
            g = o.Training.gradient_accumulation if self._training else 1
            factor = o.device_iterations * o.replication_factor * g
            n = args[0].shape[0]
            if n % factor:
                raise AssertionError(f"Invalid batch dimension: {n} must be a multiple of {factor}")
            micro = n // factor
            chunks = [[a[i * micro:(i + 1) * micro] for a in args] for i in range(n // micro)]
            self.calls += 1
            self._device.train(self._user_model.training)
            outs = self._run_training(chunks, g) if self._training else [self._forward(c) for c in chunks]
            mode = o.output_mode if o.output_mode != OutputMode.Default else (
                OutputMode.Final if self._training else OutputMode.All)
            if mode == OutputMode.Final:
                return outs[-1]
            assert mode == OutputMode.All, "stand-in: OutputMode.All or Final"
            first = outs[0]
            if isinstance(first, tuple):
                return tuple(torch.stack([o[k] for o in outs]) if o0.dim() == 0 else torch.cat([o[k] for o in outs])
                             for k, o0 in enumerate(first))
            return torch.cat(outs)

        def _forward(self, chunk):
            state["ipu"] = 0
            with torch.no_grad():
                return self._device(*chunk)

        def _run_training(self, chunks, g):
            outs, per_micro = [], {k: [] for k in self._options.anchored_tensors}
            params = dict(self._device.named_parameters())
            scale = getattr(self._device_opt, "loss_scaling", 1.0)
            for d in range(0, len(chunks), g):
                grads = {k: torch.zeros_like(p) for k, p in params.items()}
                for chunk in chunks[d:d + g]:
                    state["ipu"] = 0
                    out = self._device(*chunk)
                    loss = out[-1] if isinstance(out, tuple) else out
                    self._device.zero_grad(set_to_none=True)
                    (loss * scale).backward()
                    for k, p in params.items():
                        grads[k] += p.grad / scale
                    for short, (long, _) in self._options.anchored_tensors.items():  # of the scaled loss,
                        per_micro[short].append(params[long[len("Gradient___"):]].grad.detach().clone())  # as PopART
                    outs.append(tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach())
                mean = self._options.Training.reduction == ReductionType.Mean
                for k, p in params.items():
                    p.grad = grads[k] / g if mean else grads[k]
                self._device_opt.step()
            self._anchors = {k: torch.stack(v) for k, v in per_micro.items()}
            return outs

        # -- the documented methods --
        def _need_compiled(self):
            if self._device is None:
                raise RuntimeError("Model has not been compiled or has been destroyed.")

        def copyWeightsToHost(self):
            self._need_compiled()
            state["log"].append(("copyWeightsToHost", self))
            with torch.no_grad():
                for k, v in self._device.state_dict().items():
                    self._user_model.state_dict()[k].copy_(v)

        def copyWeightsToDevice(self):
            self._need_compiled()
            state["log"].append(("copyWeightsToDevice", self))
            with torch.no_grad():
                for k, v in self._user_model.state_dict().items():
                    self._device.state_dict()[k].copy_(v)

        def setOptimizer(self, optimizer):
            if sdk < (3, 0) and any(g.get("nesterov") for g in optimizer.param_groups):
                raise ValueError("Nesterov momentum is currently not supported.")  # _optimizer_attributes.py
            self._optimizer = optimizer
            if self._device_opt is not None:
                for mine, theirs in zip(self._device_opt.param_groups, optimizer.param_groups):
                    mine.update({k: v for k, v in theirs.items() if k != "params"})
            state["log"].append(("setOptimizer", optimizer.param_groups[0]["lr"]))

        def getAnchoredTensor(self, short_name):
            assert short_name in self._anchors, "No tensor with name " + short_name + " found."
            return self._anchors[short_name]

        def isCompiled(self):
            return self._device is not None

        def isAttachedToDevice(self):
            return self._device is not None and self._attached

        def detachFromDevice(self):
            self._need_compiled()
            if not self._attached:
                raise RuntimeError("Device is not attached")
            self._attached, state["holder"] = False, None

        def attachToDevice(self):
            self._need_compiled()
            if self._attached:
                raise RuntimeError("Device is already attached")
            self._take_device()
            self.copyWeightsToDevice()  # poptorch uploads the host weights on attach
            if self._training and sdk < (2, 4):
                self._reset_optimizer_state()

        def destroy(self):
            if state["holder"] is self:
                state["holder"] = None
            state["wrapped"].discard(id(self._user_model))
            self._device, self._attached = None, False

    def trainingModel(model, options=None, optimizer=None):
        if id(model) in state["wrapped"]:
            raise RuntimeError("Model has already been wrapped in 'poptorch.trainingModel'. Call model.destroy() "
                               "on the model to unwrap before wrapping again.")
        state["wrapped"].add(id(model))
        executor = PoplarExecutor(model, options, True, optimizer or optim.SGD(model.parameters(), lr=0.01))
        executor._optimizer._executor = executor
        return executor

    def inferenceModel(model, options=None):
        return PoplarExecutor(model, options, False)

    def ipuHardwareIsAvailable(num_ipus=1):
        return False

    optim = types.ModuleType("poptorch.optim")

    def _given(local):
        return {k: v for k, v in local.items() if k not in ("self", "params") and not k.startswith("_") and v is not None}

    class _HostState:
        """Before SDK 2.4: torch's own state_dict, which never sees the IPU's state."""

        _executor = None

    class _IpuState:
        """poptorch.optim.Optimizer's state handling, SDK 2.4 on (see the module docstring)."""

        _executor, _pending = None, None

        def state_dict(self):
            ex = self._executor
            ipu = ex._read_optimizer_state() if ex is not None and ex.isCompiled() else None
            return {"ipu_state": ipu, "ipu_param": {}, **torch.optim.Optimizer.state_dict(self)}

        def load_state_dict(self, state):
            if not ("ipu_state" in state and "ipu_param" in state):
                raise RuntimeError("Only IPU optimizer states can be loaded onto the IPU.")
            torch.optim.Optimizer.load_state_dict(self, {k: state[k] for k in ("state", "param_groups")})
            self._pending = state

    _State = _IpuState if sdk >= (2, 4) else _HostState

    class SGD(_State, torch.optim.SGD):
        def __init__(self, params, lr, momentum=None, dampening=None, weight_decay=None, nesterov=None,
                     maximize=None, foreach=None, differentiable=None, loss_scaling=None, velocity_scaling=None,
                     use_combined_accum=None, accum_type=None, velocity_accum_type=None, max_grad_norm=None):
            self.kwargs = _given(locals())
            if use_combined_accum:
                raise NotImplementedError("stand-in: the combined-accumulator SGD variant")
            for t in (accum_type, velocity_accum_type):
                assert t in (None, torch.float16, torch.float32), "Accumulation types must be float32 or float16"
            super().__init__(params, lr=lr, momentum=momentum or 0.0, dampening=dampening or 0.0,
                             weight_decay=weight_decay or 0.0, nesterov=bool(nesterov))
            self.loss_scaling = loss_scaling or 1.0

    class Adam(_State, torch.optim.Adam):
        def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, amsgrad=None, foreach=None,
                     maximize=None, capturable=None, differentiable=None, fused=None, loss_scaling=None,
                     accum_type=None, first_order_momentum_accum_type=None, second_order_momentum_accum_type=None,
                     max_grad_norm=None):
            self.kwargs = _given(locals())
            if amsgrad:
                raise ValueError("amsgrad: Not supported (must be False)")
            super().__init__(params, lr=1e-3 if lr is None else lr, betas=betas or (0.9, 0.999),
                             eps=1e-8 if eps is None else eps, weight_decay=weight_decay or 0.0)
            self.loss_scaling = loss_scaling or 1.0

    class AdamW(_State, torch.optim.AdamW):
        def __init__(self, params, lr=None, betas=None, eps=None, weight_decay=None, amsgrad=None, maximize=None,
                     foreach=None, capturable=None, differentiable=None, fused=None, loss_scaling=None,
                     bias_correction=None, accum_type=None, first_order_momentum_accum_type=None,
                     second_order_momentum_accum_type=None, max_grad_norm=None):
            self.kwargs = _given(locals())
            if amsgrad or bias_correction is False:
                raise NotImplementedError("stand-in: amsgrad and AdamW without bias correction")
            super().__init__(params, lr=1e-3 if lr is None else lr, betas=betas or (0.9, 0.999),
                             eps=1e-8 if eps is None else eps, weight_decay=1e-2 if weight_decay is None else weight_decay)
            self.loss_scaling = loss_scaling or 1.0

    def recomputationCheckpoint(*tensors):
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise ValueError("All inputs must be tensors")
        state["log"].append(("recomputationCheckpoint", tuple(t.shape for t in tensors)))
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    optim.SGD, optim.Adam, optim.AdamW = SGD, Adam, AdamW
    modes = {"OutputMode": OutputMode} if sdk >= (2, 4) else {"AnchorMode": OutputMode}
    delattr(Options, "anchorMode" if sdk >= (2, 4) else "outputMode")  # renamed in SDK 2.4
    for name, value in dict(
        **modes, ReductionType=ReductionType, AutoStage=AutoStage, Options=Options,
        PipelinedExecution=PipelinedExecution, BeginBlock=BeginBlock, PoplarExecutor=PoplarExecutor,
        trainingModel=trainingModel, inferenceModel=inferenceModel, ipuHardwareIsAvailable=ipuHardwareIsAvailable,
        recomputationCheckpoint=recomputationCheckpoint, optim=optim, _state=state,
    ).items():
        setattr(pt, name, value)
    return pt


@pytest.fixture
def standin_sdk(monkeypatch):
    """Installs a stand-in of a given SDK version as ``poptorch``; returns it."""
    if REAL_POPTORCH:
        pytest.skip("the real poptorch is importable, so the stand-in is not installed over it: "
                    "test_smoke_on_the_ipu_model runs the real SDK instead")

    def install(version):
        pt = make_standin(version)
        monkeypatch.setitem(sys.modules, "poptorch", pt)
        monkeypatch.setitem(sys.modules, "poptorch.optim", pt.optim)
        return pt

    return install


@pytest.fixture
def poptorch(standin_sdk):
    return standin_sdk("3.3.0")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _data(spec, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.output_shape[0], n)
    return x, y


def _pair(spec, config, plan=None):
    """(poptorch:ipu-model executable, torch:cpu executable) from the same weights."""
    w = hal.init_weights(spec, seed=1)
    pop = hal.compile(spec, "poptorch:ipu-model", w, config, plan=plan)
    return pop, hal.compile(spec, "torch:cpu", w, config)


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# without the SDK
# ---------------------------------------------------------------------------


@pytest.mark.skipif(REAL_POPTORCH, reason="poptorch is installed here")
def test_unavailable_without_the_sdk_and_says_why():
    a = hal.get_backend("poptorch").availability()
    assert not a.available
    assert a.reason == "poptorch is not installed: it ships with Graphcore's Poplar SDK; install its wheel"
    with pytest.raises(hal.BackendUnavailable, match="Poplar SDK"):
        hal.compile(models.get("small_cnn"), "poptorch:ipu-model")


def test_importing_the_backend_imports_neither_torch_nor_poptorch():
    code = "import sys, hal.backends.poptorch; print('torch' in sys.modules, 'poptorch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---------------------------------------------------------------------------
# the translation of a plan
# ---------------------------------------------------------------------------


def test_stand_in_is_strict(poptorch):
    with pytest.raises(AttributeError):
        poptorch.Options().anchorMode  # noqa: B018  (renamed outputMode in SDK 2.4; the stand-in is 3.x)
    with pytest.raises(AttributeError):
        poptorch.Options().gradientAccumulation(4)  # it lives under Options().Training
    with pytest.raises(TypeError):
        poptorch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentun=0.9)
    with pytest.raises(KeyError):
        poptorch.Options()._Popart.set("enableFancyThing", True)


def test_options_from_a_pipelined_plan(poptorch):
    from hal.backends.poptorch import make_options

    plan = ipu.plan(models.get("resnet50"), ipus=4, micro_batch=16, replicas=2, device_iterations=3,
                    grad_accum=8, recompute=True, devices=[])
    o = make_options(plan, "ipu-model", training=True, cache_dir="/tmp/hal-poptorch-cache")
    assert (o.device_iterations, o.replication_factor, o.Training.gradient_accumulation) == (3, 2, 8)
    assert o.Training.reduction == poptorch.ReductionType.Mean
    assert o._Popart.options == {"autoRecomputation": 3}  # RecomputationType::Pipeline
    assert o.Precision.partials == torch.float and not o.Precision.stochastic_rounding
    assert o.available_memory_proportion == dict(enumerate(plan.available_memory_proportion))  # every IPU
    assert o.strategy.auto_stage == poptorch.AutoStage.SameAsIpu
    assert o.output_mode == poptorch.OutputMode.All and o.use_model and not o.auto_round_num_ipus
    assert o.cache_path == "/tmp/hal-poptorch-cache"
    off = make_options(dataclasses.replace(plan, recompute=False), "ipu-model", training=True, cache_dir="c")
    assert off._Popart.options == {"autoRecomputation": 0}  # RecomputationType::None, not PopTorch's default
    inference = make_options(plan, "ipu-model", training=False, cache_dir="/tmp/hal-poptorch-cache")
    assert inference.Training.gradient_accumulation == 1 and inference._Popart.options == {}
    three = ipu.plan(models.get("small_cnn"), ipus=3, micro_batch=2, devices=[])
    assert make_options(three, "ipu-model", training=True, cache_dir="c").auto_round_num_ipus  # 3 IPUs -> rounded to 4


@pytest.mark.parametrize("half_partials", [False, True])
def test_options_of_graphcores_precision(poptorch, half_partials):
    from hal.backends.poptorch import make_options

    plan = ipu.plan(models.get("small_cnn"), micro_batch=2, precision="16.16", half_partials=half_partials,
                    devices=[])
    model = make_options(plan, "ipu-model", training=True, cache_dir="c")
    assert model.Precision.partials == (torch.half if half_partials else torch.float)
    assert not model.Precision.stochastic_rounding
    hw = make_options(plan, "ipu", training=True, cache_dir="c")
    assert hw.Precision.stochastic_rounding and not hw.use_model  # on hardware, when training
    assert not make_options(plan, "ipu", training=False, cache_dir="c").Precision.stochastic_rounding


def _mini_resnet():
    """Four residual blocks (two with a downsampling shortcut), small enough for the CPU."""
    b = SpecBuilder("mini_resnet")
    x = b.relu(b.batch_norm(b.conv(b.input((3, 16, 16)), 8, 3, padding=1, bias=False, name="conv1"), name="bn1"))
    for i, (width, stride) in enumerate([(8, 1), (16, 2), (16, 1), (32, 2)]):
        p = f"block{i}"
        y = b.relu(b.batch_norm(b.conv(x, width, 3, stride, 1, bias=False, name=f"{p}.conv1"), name=f"{p}.bn1"))
        y = b.batch_norm(b.conv(y, width, 3, padding=1, bias=False, name=f"{p}.conv2"), name=f"{p}.bn2")
        if stride != 1 or b.shape(x)[0] != width:
            x = b.batch_norm(b.conv(x, width, 1, stride, bias=False, name=f"{p}.down"), name=f"{p}.down_bn")
        x = b.relu(b.add(y, x, name=f"{p}.add"), name=f"{p}.out")
    return b.build(b.dense(b.global_avg_pool(x, name="pool"), 10, name="fc"))


def test_begin_blocks_at_the_planned_boundaries(poptorch):
    spec = _mini_resnet()
    plan = ipu.plan(spec, ipus=4, micro_batch=2, devices=[])
    for prev, s in zip(plan.stages, plan.stages[1:]):  # one tensor enters a stage: no skip spans a boundary
        entering = {k for n in s.nodes for k in spec.node(n).inputs if k not in s.nodes}
        assert entering == {prev.last}
    pop, _ = _pair(spec, TrainConfig(grad_accum=plan.batch.grad_accum), plan)
    blocks = {name: (h.user_id, h.ipu_id) for name, m in pop.graph.named_modules()
              for h in m._forward_pre_hooks.values() if type(h).__name__ == "_BlockHook"}
    assert blocks == {s.first: (f"stage{s.index}", s.index) for s in plan.stages[1:]} | {
        plan.stages[0].nodes[1]: ("stage0", 0)}
    x, y = _data(spec, plan.batch.samples_per_update)
    pop.train_step(x, y)
    placement = pop._train.placement
    for node in spec.nodes[1:]:
        assert placement[f"graph.{node.name}"] == plan.stage_of(node.name), node.name


def test_pipeline_rules_are_the_sdks(poptorch):
    spec = models.get("small_cnn")
    plan = ipu.plan(spec, ipus=2, micro_batch=2, grad_accum=3, devices=[])
    pop, _ = _pair(spec, TrainConfig(grad_accum=3), plan)
    assert pop._stages() == 2
    from hal.backends.poptorch import make_options

    too_few = make_options(plan, "ipu-model", training=True, cache_dir="c", grad_accum=2)
    with pytest.raises(RuntimeError, match=r"greater than or equal to the number of pipeline stages \(3\)"):
        poptorch.trainingModel(copy.deepcopy(pop.model), options=too_few)(*[torch.zeros(4, 3, 16, 16),
                                                                            torch.zeros(4, dtype=torch.long)])


def test_optimizers_keep_torch_semantics(poptorch):
    from hal.backends.poptorch import make_optimizer

    p = [torch.zeros(2, requires_grad=True)]
    sgd = make_optimizer(p, TrainConfig(optimizer=SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)), 0.1)
    assert sgd.kwargs == {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-4, "nesterov": True,
                          "loss_scaling": 1.0, "use_combined_accum": False, "accum_type": torch.float32,
                          "velocity_accum_type": torch.float32}
    adam = make_optimizer(p, TrainConfig(optimizer=Adam(lr=1e-3, weight_decay=1e-4), precision="16.16"), 1e-3)
    assert type(adam).__name__ == "Adam" and adam.kwargs["loss_scaling"] == 128.0
    assert adam.kwargs["amsgrad"] is False and adam.kwargs["first_order_momentum_accum_type"] == torch.float32
    adamw = make_optimizer(p, TrainConfig(optimizer=AdamW(lr=1e-3, weight_decay=0.05)), 1e-3)
    assert type(adamw).__name__ == "AdamW" and adamw.kwargs["bias_correction"] is True
    assert adamw.kwargs["weight_decay"] == 0.05


def test_targets_and_plan_checks(poptorch):
    spec = models.get("small_cnn")
    backend = hal.get_backend("poptorch")
    assert backend.devices() == ["ipu-model"]
    with pytest.raises(TargetError, match="no device 'ipu'"):
        hal.compile(spec, "poptorch:ipu")
    with pytest.raises(UnsupportedError, match="bf16"):
        hal.compile(spec, "poptorch:ipu-model", config=TrainConfig(precision="bf16"))
    for precision in ("fp16", "16.32"):
        with pytest.raises(UnsupportedError, match=f"poptorch runs no {precision} .* use precision '16.16'"):
            hal.compile(spec, "poptorch:ipu-model", config=TrainConfig(precision=precision))
    plan = ipu.plan(spec, ipus=2, micro_batch=2, device_iterations=2, grad_accum=3, devices=[])
    assert not hasattr(backend, "compile_plan")  # plans go through hal.compile only

    def compile_plan(spec, config=None):
        return hal.compile(spec, "poptorch:ipu-model", config=config, plan=plan)

    with pytest.raises(ConfigError, match="grad_accum=1"):
        compile_plan(spec, TrainConfig())
    with pytest.raises(ConfigError, match="fp32 but the training config says 16.16"):
        compile_plan(spec, TrainConfig(grad_accum=3, precision="16.16"))
    with pytest.raises(ConfigError, match="another spec"):
        compile_plan(models.get("small_cnn", num_classes=5))
    with pytest.raises(ConfigError, match="device_iterations=1"):
        compile_plan(spec, TrainConfig(grad_accum=3, schedule=StepDecay(2)))
    with pytest.raises(ConfigError, match="Adam"):
        compile_plan(spec, TrainConfig(grad_accum=3, optimizer=Adam()))
    exe = compile_plan(spec)  # config from the plan: its precision and gradient accumulation
    assert (exe.config.precision, exe.config.grad_accum) == ("fp32", 3) and exe.plan is plan


# ---------------------------------------------------------------------------
# what the real SDKs do by themselves, and per version
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("recompute", [False, True])
def test_pipeline_recomputation_is_what_the_plan_says(poptorch, recompute):
    """PopTorch turns Pipeline recomputation on for any pipeline over > 1 IPU unless told
    otherwise (Compiler::initSession): a plan without it must compile without it."""
    spec = models.get("small_cnn")
    plan = ipu.plan(spec, ipus=2, micro_batch=2, recompute=recompute, devices=[])
    pop = hal.compile(spec, "poptorch:ipu-model", config=TrainConfig(grad_accum=plan.batch.grad_accum), plan=plan)
    pop.train_step(*_data(spec, plan.batch.samples_per_update))
    assert pop._train.recomputation == (3 if recompute else 0)  # popart::RecomputationType Pipeline / None


def test_available_memory_proportion_reaches_every_ipu(poptorch):
    spec = models.get("small_cnn")
    plan = ipu.plan(spec, ipus=2, micro_batch=2, grad_accum=3, available_memory_proportion=(0.1, 0.2), devices=[])
    pop = hal.compile(spec, "poptorch:ipu-model", config=TrainConfig(grad_accum=3), plan=plan)
    x, y = _data(spec, plan.batch.samples_per_update)
    pop.train_step(x, y)
    assert pop._train.memory_proportion == {0: 0.1, 1: 0.2}  # keyed by BeginBlock's ipu_id
    pop.predict(x)
    assert all(s.executor.memory_proportion == {0: 0.1, 1: 0.2} for s in pop._shadows.values())


def test_recomputation_checkpoints_on_one_ipu(poptorch):
    """As Graphcore's single-IPU ResNet50 (utils/ipu_settings.py, recompute_mode "manual"):
    explicit recomputation of everything but the checkpointed outputs."""
    spec = models.get("small_cnn")
    plan = ipu.plan(spec, micro_batch=2, grad_accum=2, recompute_checkpoints=("activation_4", "activation_8"),
                    devices=[])
    pop, ref = _pair(spec, TrainConfig(grad_accum=2), plan)
    x, y = _data(spec, 4)
    assert pop.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=1e-5)  # an identity on the values
    assert pop._train._options._Popart.options == {"explicitRecomputation": True, "autoRecomputation": 4}
    marked = [e[1] for e in poptorch._state["log"] if e[0] == "recomputationCheckpoint"]
    assert marked == [((2, 8, 16, 16),), ((2, 8, 8, 8),)] * 2  # both outputs, in each of the 2 micro-batches


def test_sdk_version_is_read_from_poptorch(standin_sdk):
    from hal.backends.poptorch import sdk_version

    assert sdk_version(standin_sdk("3.3.0")) == (3, 3)
    assert sdk_version(types.SimpleNamespace(__version__="2.4.0+86217-5d3f7c14a4")) == (2, 4)
    with pytest.raises(UnsupportedError, match="cannot read the SDK version"):
        sdk_version(types.SimpleNamespace(__version__="@VERSION@-@SNAPSHOT@"))


def test_nesterov_needs_sdk_3(standin_sdk):
    spec = models.get("small_cnn")
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9, nesterov=True), grad_accum=2)
    standin_sdk("2.6.0")
    with pytest.raises(UnsupportedError, match=r"SDK 2\.6 has no Nesterov momentum .* SDK >= 3\.0"):
        hal.compile(spec, "poptorch:ipu-model", config=config)
    standin_sdk("3.0.0")
    pop, ref = _pair(spec, config)
    x, y = _data(spec, 8)
    for _ in range(2):
        assert pop.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=1e-5)


@pytest.mark.parametrize("version", ["2.3.0", "2.4.0", "3.3.0"])
def test_optimizer_state_survives_an_executor_swap_or_is_refused(standin_sdk, version):
    """From SDK 2.4 PopTorch reads the optimizer state back on detach and writes it on
    attach; before, a re-attached executor restarts it from zero: hal refuses to swap."""
    standin_sdk(version)
    spec = models.get("small_cnn")
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9), grad_accum=2, check_finite=False)
    pop, ref = _pair(spec, config)
    x, y = _data(spec, 8)
    pop.train_step(x, y), ref.train_step(x, y)
    if version < "2.4":
        with pytest.raises(UnsupportedError, match=r"SDK 2\.3 cannot carry the optimizer state .* SDK >= 2\.4"):
            pop.predict(x)
        with pytest.raises(UnsupportedError, match="check_finite could not undo"):
            hal.compile(spec, "poptorch:ipu-model", config=dataclasses.replace(config, check_finite=True))
        return
    pop.predict(x)
    assert pop.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=1e-5)  # the momentum survived


def test_an_optimizer_without_state_swaps_on_any_sdk(standin_sdk):
    standin_sdk("2.3.0")
    spec = models.get("small_cnn")
    pop, ref = _pair(spec, TrainConfig(optimizer=SGD(lr=0.05), grad_accum=2))
    x, y = _data(spec, 8)
    for _ in range(2):
        assert pop.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=1e-5)
        _close(pop.predict(x), ref.predict(x), atol=1e-5)
    assert "AnchorMode" in dir(sys.modules["poptorch"]) and pop._train._options.output_mode.name == "All"


# ---------------------------------------------------------------------------
# numbers, against torch:cpu
# ---------------------------------------------------------------------------


def test_predict_train_and_copy_back_match_torch(poptorch):
    spec = models.get("small_cnn")
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9, weight_decay=1e-3), grad_accum=2)
    pop, ref = _pair(spec, config)
    x, y = _data(spec, 8)
    _close(pop.predict(x), ref.predict(x), atol=1e-5)
    _close(pop.predict(x, training=True), ref.predict(x, training=True), atol=1e-5)
    for step in range(3):
        xs, ys = _data(spec, 8, seed=step)
        assert pop.train_step(xs, ys) == pytest.approx(ref.train_step(xs, ys), rel=1e-5)
    for k, v in ref.weights().items():  # weights (and BatchNorm statistics) copied back from the "device"
        _close(pop.weights()[k], v, atol=1e-5)
    assert ("copyWeightsToHost", pop._train) in poptorch._state["log"]
    _close(pop.predict(x), ref.predict(x), atol=1e-4)  # the inference executor gets the trained weights
    loss, grads = pop.loss_and_grads(x, y)
    ref_loss, ref_grads = ref.loss_and_grads(x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        _close(grads[k], ref_grads[k], atol=1e-5)
    before = pop.weights()
    pop.loss_and_grads(x, y)  # no update: lr 0 on a copy whose BatchNorm statistics stay put
    for k, v in before.items():
        np.testing.assert_array_equal(pop.weights()[k], v)
    assert pop.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=1e-5)  # training resumes on device


def _modern_ops_spec():
    """A small net of the ops modern CNNs add, each in a form PopTorch runs."""
    b = SpecBuilder("modern_ops")
    x = b.conv(b.input((3, 9, 9)), 8, 3, padding=1)
    x = b.activation(b.group_norm(x, 4, name="gn"), "hardswish")
    x = b.conv(b.pad(x, 1, "reflect"), 8, 3, groups=8)  # depthwise
    x = b.activation(b.prelu(b.layer_norm(x, name="ln"), 8, name="prelu"), "mish")
    gate = b.activation(b.conv(b.adaptive_avg_pool(x, 1), 8, 1), "hardsigmoid")
    x = b.add(x, b.scale(b.mul(x, gate), init=0.5, name="ls"))
    x = b.activation(b.instance_norm(x, affine=True), "relu6")
    x = b.elu(b.max_pool(x, 2, 2, ceil_mode=True))  # 9 -> 5: the last window is ceil_mode's
    x = b.stochastic_depth(b.conv_transpose(x, 8, 3, 2, ((1, 2), (2, 1)), 1, groups=2), 0.0)  # 5 -> 9
    x = b.softplus(b.avg_pool(x, 2, 2, ceil_mode=True, count_include_pad=False), beta=2.0)  # 9 -> 5
    x = b.upsample(b.upsample(x, scale=2, mode="bilinear", align_corners=True), (7, 7))  # 5 -> 10 -> 7
    x = b.concat(b.channel_slice(x, 0, 4), b.channel_shuffle(b.channel_slice(x, 4, 8), 2))
    return b.build(b.dense(b.flatten(b.adaptive_avg_pool(b.pad(x, ((0, 1), (1, 0)), "replicate"), 4)), 10))


def test_modern_ops_match_torch(poptorch):
    spec = _modern_ops_spec()
    pop, ref = _pair(spec, TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9)))
    x, y = _data(spec, 4)
    _close(pop.predict(x), ref.predict(x), atol=1e-5)
    loss, grads = pop.loss_and_grads(x, y)
    ref_loss, ref_grads = ref.loss_and_grads(x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() >= {"gn.weight", "ln.bias", "prelu.weight", "ls.layer_scale"}
    for k in grads:
        _close(grads[k], ref_grads[k], atol=1e-5)
    assert pop.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=1e-5)
    for k, v in ref.weights().items():
        _close(pop.weights()[k], v, atol=1e-5)


@pytest.mark.parametrize("shape, build, reason", [
    ((2, 4, 6), lambda b, x: b.adaptive_max_pool(x, 2), "no adaptive max pooling"),
    ((2, 4, 6), lambda b, x: b.adaptive_avg_pool(x, (3, 2)),
     r"input size \(4, 6\) to be a multiple of the output size \(3, 2\)"),
    ((2, 3, 4, 5), lambda b, x: b.pad(x, ((1, 1), (0, 1), (1, 0)), "reflect"), "no 3-d reflection padding"),
    ((2, 4, 6), lambda b, x: b.upsample(x, scale=1.5, mode="bilinear"), r"\(4, 6\) -> \(6, 9\)"),
    ((2, 4, 6), lambda b, x: b.upsample(x, (8, 18), mode="bilinear"), r"\(4, 6\) -> \(8, 18\)"),
    ((2, 3, 4, 5), lambda b, x: b.upsample(x, scale=2, mode="trilinear"), "only in 2-d"),
    ((2, 4, 6), lambda b, x: b.conv_transpose(x, 2, 3, 2, dilation=(1, 2)), r"no dilation, got \(1, 2\)"),
])
def test_ops_the_sdk_lacks_are_declared_unsupported(poptorch, shape, build, reason):
    """What PopTorch runs of these (2-d reflection, divisible adaptive average, bilinear by an integer
    factor) test_modern_ops_match_torch runs."""
    b = SpecBuilder("gap")
    spec = b.build(build(b, b.conv(b.input(shape), 2, 1)))
    with pytest.raises(UnsupportedError, match=f"spec 'gap': {spec.output}: .*{reason}"):
        hal.compile(spec, "poptorch:ipu-model")


def test_load_weights_reaches_every_executor(poptorch):
    spec = models.get("small_cnn")
    pop, ref = _pair(spec, TrainConfig())
    x, y = _data(spec, 4)
    pop.predict(x)
    pop.train_step(x, y)
    new = hal.init_weights(spec, seed=9)
    pop.load_weights(new)
    ref.load_weights(new)
    _close(pop.predict(x), ref.predict(x), atol=1e-5)
    assert pop.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=1e-5)
    for k, v in ref.weights().items():
        _close(pop.weights()[k], v, atol=1e-5)


# eps 1e-3: a conv bias feeding a BatchNorm has a zero gradient up to float32 noise, which
# Adam's default eps would blow up to +-lr steps and make the comparison a coin toss
@pytest.mark.parametrize("optimizer", [Adam(lr=1e-2, eps=1e-3, weight_decay=1e-3),
                                       AdamW(lr=1e-2, eps=1e-3, weight_decay=0.1)])
def test_adam_family_and_schedule_match_torch(poptorch, optimizer):
    spec = models.get("small_cnn")
    config = TrainConfig(optimizer=optimizer, schedule=StepDecay(step_size=1, gamma=0.5))
    pop, ref = _pair(spec, config)
    for step in range(3):
        x, y = _data(spec, 4, seed=step)
        assert pop.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=1e-5)
    assert [e[1] for e in poptorch._state["log"] if e[0] == "setOptimizer"][-2:] == [0.005, 0.0025]
    for k, v in ref.weights().items():
        _close(pop.weights()[k], v, atol=1e-5)


def test_pipelined_run_steps_with_device_iterations(poptorch):
    spec = models.get("small_cnn")
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9), grad_accum=3)
    plan = ipu.plan(spec, ipus=2, micro_batch=4, device_iterations=2, grad_accum=3, optimizer=config.optimizer,
                    devices=[])
    pop, ref = _pair(spec, config, plan)
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((4, 12, *spec.input_shape)).astype(np.float32)
    ys = rng.integers(0, 10, (4, 12))
    _close(pop.run_steps(xs, ys), ref.run_steps(xs, ys), rtol=1e-5)
    assert pop._train.calls == 2  # 4 steps = 2 host calls of D = 2
    for k, v in ref.weights().items():
        _close(pop.weights()[k], v, atol=1e-5)
    with pytest.raises(UnsupportedError, match="use run_steps"):
        pop.train_step(xs[0], ys[0])
    with pytest.raises(InputError, match="multiple of device_iterations=2"):
        pop.run_steps(xs[:3], ys[:3])
    with pytest.raises(InputError, match="4 x 3 x 1 = 12 samples, got 6"):
        pop.loss_and_grads(xs[0][:6], ys[0][:6])
    _close(pop.predict(xs[0][:5]), ref.predict(xs[0][:5]), atol=1e-4)  # padded to the 8-sample host batch


def test_mse_loss_matches_torch(poptorch):
    spec = models.get("small_cnn")
    pop, ref = _pair(spec, TrainConfig(loss="mse", grad_accum=2))
    x, _ = _data(spec, 4)
    y = np.random.default_rng(5).standard_normal((4, 10)).astype(np.float32)
    assert pop.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=1e-5)
    assert type(pop.model.criterion).__name__ == "MSELoss"


def _cpu_half_convolution_missing() -> str | None:
    """Why this torch cannot run a float16 convolution on the CPU (the stand-in runs PopTorch's fp16 graph
    there), or None. Probed, not looked up by version: torch 2.0.1 raises "slow_conv2d_cpu" not implemented
    for 'Half'."""
    try:
        torch.nn.functional.conv2d(torch.zeros(1, 1, 2, 2, dtype=torch.half), torch.zeros(1, 1, 1, 1, dtype=torch.half))
    except RuntimeError as exc:
        return f"torch {torch.__version__} has no float16 convolution on the CPU ({exc})"
    return None


def test_graphcores_16_16_against_float64(poptorch):
    """fp16 weights, the loss scaled by 128 and unscaled (gradients and the update), against
    float64 torch within fp16's tolerance (hal.parity's, from the float32 floor)."""
    from hal.parity import normalised_error, tolerance

    missing = _cpu_half_convolution_missing()
    if missing:  # an IPU computes fp16 itself; the stand-in can only run the fp16 graph where torch's CPU can
        pytest.skip(f"the stand-in runs the 16.16 graph on the CPU, but {missing}")
    spec = models.get("small_cnn")
    w = hal.init_weights(spec, seed=1)
    config = TrainConfig(optimizer=SGD(lr=0.05), grad_accum=2, precision="16.16")
    plan = ipu.plan(spec, micro_batch=4, grad_accum=2, precision="16.16", devices=[])
    pop = hal.compile(spec, "poptorch:ipu-model", w, config, plan=plan)
    assert next(pop.graph.parameters()).dtype == torch.half and pop.optimizer.loss_scaling == 128.0
    f64 = hal.compile(spec, "torch:cpu", w, TrainConfig(optimizer=SGD(lr=0.05), grad_accum=2, precision="fp64"))
    f32 = hal.compile(spec, "torch:cpu", w, TrainConfig(optimizer=SGD(lr=0.05), grad_accum=2))
    x, y = _data(spec, 8)

    def within(got, f32_value, f64_value):
        floor = normalised_error(f32_value, f64_value)[1]
        assert normalised_error(got, f64_value)[1] <= tolerance(floor, "fp16")

    within(pop.predict(x), f32.predict(x), f64.predict(x))
    loss, grads = pop.loss_and_grads(x, y)
    loss32, grads32 = f32.loss_and_grads(x, y)
    loss64, grads64 = f64.loss_and_grads(x, y)
    within(np.array([loss]), np.array([loss32]), np.array([loss64]))
    for k in grads64:
        within(grads[k], grads32[k], grads64[k])
    pop.train_step(x, y), f32.train_step(x, y), f64.train_step(x, y)
    for k, v in f64.weights().items():
        within(pop.weights()[k], f32.weights()[k], v)
    got = pop.weights()
    assert all(v.dtype == np.float32 and np.array_equal(v, v.astype(np.float16)) for v in got.values())


def test_cache_dir_is_an_option(poptorch):
    spec = models.get("small_cnn")
    x, y = _data(spec, 4)
    default = hal.compile(spec, "poptorch:ipu-model")
    default.train_step(x, y)
    assert default._train._options.cache_path == os.path.expanduser("~/.cache/hal/poptorch")
    default.close()
    pop = hal.compile(spec, "poptorch:ipu-model", options={"cache_dir": "/tmp/hal-cache"})
    pop.train_step(x, y)
    pop.predict(x)
    assert {ex._options.cache_path for ex in [pop._train, *(s.executor for s in pop._shadows.values())]} == {
        "/tmp/hal-cache"}
    with pytest.raises(ConfigError, match="no option cache; its options: cache_dir"):
        hal.compile(spec, "poptorch:ipu-model", options={"cache": "/tmp"})


def _assert_weights_equal(got, want):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("first", [False, True], ids=["after-a-step", "first-call"])
def test_nan_train_step_is_undone_with_the_optimizer_state(poptorch, first):
    """Momentum on the "IPU" is restored too: the next step equals one of an executable that
    never saw the bad batch (a first bad call needs the executor compiled before it runs)."""
    spec = models.get("small_cnn")
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9), grad_accum=2)
    w = hal.init_weights(spec, seed=1)
    (x0, y0), (x1, y1), (x2, y2) = (_data(spec, 4, seed=s) for s in range(3))
    x1[1, 2, 5, 5] = np.nan
    pop = hal.compile(spec, "poptorch:ipu-model", w, config)
    if not first:
        pop.train_step(x0, y0)
    with pytest.raises(hal.NonFiniteError, match=f"training step {1 - first} was not applied") as info:
        pop.train_step(x1, y1)
    assert info.value.step == pop.step == 1 - first
    assert ("writeOptimizerState", pop._train) not in poptorch._state["log"]  # written before the next run
    after_bad = pop.weights()
    loss = pop.train_step(x2, y2)
    assert ("writeOptimizerState", pop._train) in poptorch._state["log"]
    final = pop.weights()
    pop.close()  # one executor holds the (stand-in) IPUs at a time

    clean = hal.compile(spec, "poptorch:ipu-model", w, config)
    if not first:
        clean.train_step(x0, y0)
    _assert_weights_equal(after_bad, clean.weights())
    assert loss == clean.train_step(x2, y2)
    _assert_weights_equal(final, clean.weights())


def test_run_steps_undoes_the_host_call_holding_a_bad_step(poptorch):
    """With device_iterations D = 2 the two steps of a host call stand or fall together."""
    spec = models.get("small_cnn")
    config = TrainConfig(optimizer=Adam(lr=1e-2), grad_accum=3)
    plan = ipu.plan(spec, ipus=1, micro_batch=2, device_iterations=2, grad_accum=3, optimizer=config.optimizer,
                    devices=[])
    w = hal.init_weights(spec, seed=1)
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((6, 6, *spec.input_shape)).astype(np.float32)
    ys = rng.integers(0, 10, (6, 6))
    xs[3, 0, 0, 0, 0] = np.inf
    good = rng.standard_normal((2, 6, *spec.input_shape)).astype(np.float32)
    pop = hal.compile(spec, "poptorch:ipu-model", w, config, plan=plan)
    with pytest.raises(hal.NonFiniteError, match=r"training step 2 \(batch 2 of this run_steps call\)"):
        pop.run_steps(xs, ys)
    assert pop.step == 2 and pop._train.calls == 2  # the third call, with batches 4 and 5, never ran
    after_bad = pop.weights()
    losses = pop.run_steps(good, ys[:2])
    final = pop.weights()
    pop.close()

    clean = hal.compile(spec, "poptorch:ipu-model", w, config, plan=plan)
    clean.run_steps(xs[:2], ys[:2])
    _assert_weights_equal(after_bad, clean.weights())
    np.testing.assert_array_equal(losses, clean.run_steps(good, ys[:2]))
    _assert_weights_equal(final, clean.weights())


def test_check_finite_off_applies_a_nan_step(poptorch):
    spec = models.get("small_cnn")
    pop = hal.compile(spec, "poptorch:ipu-model", config=TrainConfig(check_finite=False))
    x, y = _data(spec, 4)
    x[0, 0, 0, 0] = np.nan
    assert np.isnan(pop.train_step(x, y)) and pop.step == 1
    assert np.isnan(pop.weights()["fc2.weight"]).all()
    assert not pop._train.calls or all(e[0] != "writeOptimizerState" for e in poptorch._state["log"])


def test_load_weights_is_all_or_nothing(poptorch):
    spec = models.get("small_cnn")
    pop = hal.compile(spec, "poptorch:ipu-model")
    x, y = _data(spec, 4)
    pop.train_step(x, y)
    before = pop.weights()
    with failing_on_call(torch, "from_numpy") as calls, pytest.raises(RuntimeError, match="conversion failed"):
        pop.load_weights(hal.init_weights(spec, seed=5))
    assert len(calls) == 3
    _assert_weights_equal(pop.weights(), before)


def test_close_releases_the_device(poptorch):
    spec = models.get("small_cnn")
    pop, _ = _pair(spec, TrainConfig())
    x, y = _data(spec, 4)
    pop.train_step(x, y)
    pop.predict(x)
    pop.close()
    assert poptorch._state["holder"] is None and not poptorch._state["wrapped"]


# ---------------------------------------------------------------------------
# the real thing, when the SDK is here
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_POPTORCH, reason="poptorch is not installed: the IPU Model smoke test needs the Poplar SDK")
def test_smoke_on_the_ipu_model(monkeypatch):
    monkeypatch.setenv("POPTORCH_IPU_MODEL", "1")
    spec = models.get("small_cnn")
    config = TrainConfig(optimizer=SGD(lr=0.05, momentum=0.9), grad_accum=2)
    pop, ref = _pair(spec, config)
    x, y = _data(spec, 8)
    _close(pop.predict(x), ref.predict(x), rtol=1e-3, atol=1e-3)
    assert pop.train_step(x, y) == pytest.approx(ref.train_step(x, y), rel=1e-3)
    for k, v in ref.weights().items():
        _close(pop.weights()[k], v, rtol=1e-3, atol=1e-3)
    pop.close()
