"""The IPU planner: batch arithmetic, each SDK's pipeline rules, pipeline stages,
per-IPU memory, pipeline efficiency, roofline bounds and an expected throughput,
for a :class:`~hal.spec.ModelSpec`, without the SDK.

Everything here is plain Python over ``spec.info()``; nothing runs on an IPU. The
ground truth it is checked against is Graphcore's published ResNet50 training
configurations (``graphcore/examples``: ``vision/cnns/pytorch/train/configs.yml``
and ``vision/cnns/tensorflow2/configs.yml``, SDK 3.4): every one of them must fit.

**Batch arithmetic** (PopTorch user guide, "Efficient data batching"). A replica runs
one *micro-batch* at a time. Training: the host hands over ``micro x D x R x G``
samples per call (D device iterations, R replicas, G gradient-accumulation steps),
arranged ``[D, G, R, micro]``; each of the D weight updates averages ``G x R``
micro-batch gradients. Inference: ``micro x D x R``.

**Pipeline rules** (:func:`pipeline_rule`), per framework and schedule; the count is
G in training, the iterations per run in inference:

- IPU TensorFlow (``graphcore/tensorflow``, ``compiler/plugin/poplar/driver/visitors/
  pipeline_visitor.cc`` ``VerifyPipelineArgumentsFixed``): the count must be a multiple
  of, and at least, the schedule's *overlap length*, the number of offsets returned by
  ``ScheduleOffsets`` (``pipeline_visitor_utils.h``) for the stage-to-IPU mapping of
  every forward stage followed by every backward stage in reverse
  (``GetPipelineStageDeviceMapping``). Grouped (the SDK default): ``AllUnion``, every
  slot, so 2S in training and S in inference. Interleaved: ``CircularUnion``, the
  rotations that never put two slots on one IPU, S for S stages on S IPUs; in training
  it refuses two stages on one IPU (``pipelining_ops.py``). Sequential: ``NoUnion``, 1.
  (Grouped with I/O tiles uses ``GroupedOverlapPipelineVisitor``: >= overlap + 2 and no
  multiple; hal never configures I/O tiles.)
- PopTorch (``graphcore/poptorch``, ``popart_compiler/source/Compiler.cpp`` and
  ``CompilerImpl::numPipelineStages``): ``PipelinedExecution`` has F = IPU switches + 1
  forward stages and ``2F - 1`` pipeline stages in training (the last IPU's backward is
  fused with its forward); ``gradientAccumulation >= 2F - 1`` in training and
  ``deviceIterations >= F`` in inference, with no multiple. hal calls it the
  ``interleaved`` schedule (PopART's pipeline runs forward and backward interleaved);
  ``sequential`` is ``ShardedExecution`` (no overlap, any count); PopTorch has no
  grouped schedule.

**Stage boundaries** are cuts of the topological order where exactly one tensor
crosses: a cut after node ``i`` is valid iff node ``i``'s output is the only output of
nodes ``<= i`` read by nodes ``> i`` (a ResNet block output, never inside a residual
block). hal's own split balances stages on training FLOPs (3x forward) by an exact
min-max dynamic program over the cuts, each stage fitting its IPU; with several
stages per IPU under the sequential schedule (Graphcore's MLPerf TensorFlow configs
put 4 or 7 stages on one IPU as recomputation checkpoints) it minimises the largest
activation set instead. A user split (``split=``) is evaluated as given, beside it.

**Memory per IPU** (bytes; precisions below; ``P`` parameters, ``B`` buffers):
weights ``(P + B) x weight bytes``; gradients ``P x activation bytes`` plus the
accumulator ``P x state bytes`` when ``G > 1``; optimizer state ``n x P x state bytes``
(``n`` = 0 SGD, 1 SGD with momentum, 2 Adam/AdamW); activations: the tensors a backward
reads (*saved* set: inputs of Conv, Dense, BatchNorm, MaxPool, leaky_relu/gelu/silu;
outputs of relu/sigmoid/tanh and Dropout; the logits) per sample x micro-batch x
micro-batches in flight. In flight per stage ``s`` of ``S``: interleaved (PopART's
pipeline, ``willow/src/transforms/pipeline.cpp``) ``2(S - s) - 1``; grouped one more,
``2(S - s)`` (a stage's forward and backward are ``2(S - s) - 1`` time-steps apart and
every slot runs every step); sequential 1. Pipeline recomputation stashes only each
stage's input that many times plus one saved set being recomputed (not on the last
stage); with several stages on one IPU in the sequential schedule, the IPU holds
every stage input once plus the largest stage's saved set. Recomputation checkpoints
(``recompute_checkpoints``, single stage: PopTorch ``RecomputationType.RecomputeAll``
with ``recomputationCheckpoint``, as Graphcore's ``recompute_mode: manual``) keep the
checkpointed tensors plus the largest saved set of the segments between checkpoints.

**Usable memory** replaces a fixed headroom with Poplar's *available memory
proportion* (AMP): convolutions and matmuls plan their temporary memory within
``AMP x`` the IPU's memory (PopLibs option ``availableMemoryProportion``, default
0.6; Graphcore's ResNet50 configs use 0.15-0.2). On top, ``headroom`` (default 15 %)
is kept for code, exchange buffers and other temporaries, which depend on Poplar's
compilation: a planning assumption, bounded by the published configs (the tightest,
the single-IPU PyTorch one, fits up to a headroom of about 20 %), not a measured
figure; check a real profile with PopVision. Usable = ``memory x (1 - AMP -
headroom)``. Without an AMP, hal picks per IPU the largest proportion <= 0.6 that
leaves the persistent memory room, never below 0.1.

**Precisions**: Graphcore's "<compute>.<master>" strings: weights in hal.lowering's
``MASTER_DTYPE`` (fp16 for "16.16", fp32 for "16.32"), activations and gradients in
``COMPUTE_DTYPE``; partial sums in fp32 unless the plan has ``half_partials``
(Graphcore's ``half_partial``, a separate flag in its ResNet50 configs); optimizer
state and accumulators in the weights' dtype for "16.16"/"16.32" (Graphcore's TF2
``float16`` policy and PopTorch's combined accumulator keep them in fp16), fp32 otherwise. "fp16" is
PopTorch's ``model.half()``: fp16 weights with fp32 accumulators and state
(``poptorch.optim`` ``accum_type`` defaults).

**Pipeline efficiency**: ``G / (G + S - 1)`` (GPipe's bubble) for overlapping
schedules; 1 for sequential, which never overlaps. Without ``grad_accum`` hal picks
the smallest accepted G reaching 97 % (Graphcore's pipelined configs use 128-256).

**Roofline**: a lower bound of one weight update (inference: one host batch) on one
chip, ``max(FLOPs / peak, bytes / memory bandwidth)``; plus, for the plan,
``(G + S - 1) x`` the slowest IPU's cycle (its stages' compute and IPU-Link exchange),
or ``G x`` the sum of the stages for sequential. **Expected throughput**
(:func:`expected_throughput`) scales that bound by an efficiency calibrated on
Graphcore's published ResNet50 throughput: an estimate, labelled so everywhere.
"""

from __future__ import annotations

import functools
import json
import math
import textwrap
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

from hal.errors import ConfigError
from hal.hardware import Device, MiB, all_devices, get_ipu
from hal.lowering import COMPUTE_DTYPE, MASTER_DTYPE
from hal.spec import DTYPE_BYTES, ModelSpec
from hal.table import render
from hal.training import SGD, Adam, AdamW, Optimizer

FRAMEWORKS = ("poptorch", "tensorflow")
SCHEDULES = ("grouped", "interleaved", "sequential")
DEFAULT_SCHEDULE = {"poptorch": "interleaved", "tensorflow": "grouped"}
DEFAULT_HEADROOM = 0.15
POPLAR_DEFAULT_AMP = 0.6  # PopLibs' default availableMemoryProportion
MIN_AMP = 0.1  # hal never picks less (Graphcore's ResNet50 configs go down to 0.135)
DEFAULT_EFFICIENCY = 0.97
TRAIN_FLOPS_FACTOR = 3

_SAVES_INPUT = {"Conv", "Dense", "BatchNorm", "MaxPool"}
_ACT_SAVES_INPUT = {"leaky_relu", "gelu", "silu"}  # relu, sigmoid, tanh backward read their output


# ---------------------------------------------------------------------------
# precisions
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionBytes:
    """Bytes per weight, activation (and gradient), partial sum and optimizer state element."""

    weights: int
    activations: int
    partials: int
    state: int

    @property
    def peak_key(self) -> str:
        """The device peak that applies (``Device.peak_flops`` key): fp16 arithmetic or fp32."""
        return "fp16" if self.activations == 2 else "fp32"


def _precision_bytes(precision: str) -> PrecisionBytes:
    if precision == "fp32":
        return PrecisionBytes(4, 4, 4, 4)
    if precision == "fp16":  # PopTorch model.half(); poptorch.optim keeps accumulators and state in fp32
        return PrecisionBytes(2, 2, 2, 4)
    weights = DTYPE_BYTES[MASTER_DTYPE[precision]]
    return PrecisionBytes(weights, DTYPE_BYTES[COMPUTE_DTYPE[precision]], 4, weights)


PRECISIONS: dict[str, PrecisionBytes] = {p: _precision_bytes(p) for p in ("fp32", "fp16", "16.16", "16.32")}


# ---------------------------------------------------------------------------
# each SDK's pipeline rules
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineRule:
    """The pipeline iteration counts one SDK accepts: ``n >= minimum`` and ``n % multiple == 0``.

    The count is gradient accumulation in training and the iterations per run in
    inference (PopTorch ``deviceIterations``, IPU TensorFlow ``steps_per_execution``).
    """

    framework: str
    schedule: str
    stages: int
    training: bool
    minimum: int
    multiple: int
    reason: str

    @property
    def count_name(self) -> str:
        if self.framework == "poptorch":
            return "gradientAccumulation" if self.training else "deviceIterations"
        return "gradient_accumulation_steps_per_replica" if self.training else "steps_per_execution"

    def accepts(self, count: int) -> bool:
        return count >= self.minimum and count % self.multiple == 0

    def smallest(self, at_least: int = 1) -> int:
        """The smallest accepted count ``>= at_least``."""
        n = max(at_least, self.minimum)
        return -(-n // self.multiple) * self.multiple

    def violation(self, count: int) -> str | None:
        """Why ``count`` is refused, with the nearest accepted values; ``None`` if it is accepted."""
        if self.accepts(count):
            return None
        what = "grad_accum" if self.training else "device_iterations"
        need = f"a multiple of {self.multiple} and >= {self.minimum}" if self.multiple > 1 else f">= {self.minimum}"
        lower = (count // self.multiple) * self.multiple
        near = sorted({v for v in (lower, self.smallest(count)) if self.accepts(v)})
        return (
            f"{what}={count} is refused by {self.framework} with the {self.schedule} schedule on {self.stages} "
            f"stages ({'training' if self.training else 'inference'}): {self.count_name} must be {need}. "
            f"{self.reason} Nearest accepted: {' or '.join(map(str, near))}."
        )

    def to_dict(self) -> dict[str, Any]:
        return {"framework": self.framework, "schedule": self.schedule, "stages": self.stages,
                "training": self.training, "minimum": self.minimum, "multiple": self.multiple,
                "count": self.count_name, "reason": self.reason}


def _circular_union(slots: Sequence[int]) -> list[int]:
    """Rotations of ``slots`` that put no two equal IPUs at one position against every accepted one
    (IPU TensorFlow's ``CircularUnion``)."""
    accepted = [0]
    n = len(slots)
    for i in range(1, n):
        if all(all(slots[(p + i) % n] != slots[(p + k) % n] for p in range(n)) for k in accepted):
            accepted.append(i)
    return accepted


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


def _mapping(stages: int, device_mapping: Sequence[int] | None) -> tuple[int, ...]:
    if device_mapping is None:
        return tuple(range(stages))
    mapping = tuple(device_mapping)
    if len(mapping) != stages or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in mapping):
        raise ConfigError(f"device_mapping must give the IPU (an int >= 0) of each of the {stages} stages, "
                          f"got {list(mapping)}")
    if sorted(set(mapping)) != list(range(len(set(mapping)))):
        raise ConfigError(f"device_mapping must use IPUs 0..N-1 without gaps, got {list(mapping)}")
    return mapping


def pipeline_rule(framework: str, schedule: str, stages: int, training: bool = True,
                  device_mapping: Sequence[int] | None = None) -> PipelineRule:
    """The pipeline iteration counts ``framework`` accepts for ``stages`` computational stages with
    ``schedule`` (see the module docstring for the sources); raises if the SDK refuses the layout."""
    _check_choice(framework, FRAMEWORKS, "framework")
    _check_choice(schedule, SCHEDULES, "schedule")
    s = _positive_int(stages, "stages")
    mapping = _mapping(s, device_mapping)

    def rule(minimum: int, multiple: int, reason: str) -> PipelineRule:
        return PipelineRule(framework, schedule, s, training, minimum, multiple, reason)

    if s == 1:
        return rule(1, 1, "One stage is not pipelined.")
    if framework == "poptorch":
        if schedule == "grouped":
            raise ConfigError("PopTorch has no grouped pipeline schedule: use schedule 'interleaved' "
                              "(PipelinedExecution) or 'sequential' (ShardedExecution), or framework 'tensorflow'")
        if schedule == "sequential":
            return rule(1, 1, "ShardedExecution runs one stage at a time.")
        forward = 1 + sum(a != b for a, b in zip(mapping, mapping[1:]))
        if training:
            return rule(2 * forward - 1, 1, f"PopTorch runs {forward} forward and {forward - 1} backward pipeline "
                        "stages (the last IPU's backward is fused with its forward) and needs at least one "
                        "micro-batch per stage (popart_compiler Compiler.cpp).")
        return rule(forward, 1, f"PopTorch needs deviceIterations >= its {forward} pipeline stages.")
    slots = list(mapping) + list(reversed(mapping)) if training else list(mapping)
    if schedule == "sequential":
        return rule(1, 1, "The sequential schedule never overlaps micro-batches (NoUnion).")
    if schedule == "interleaved":
        if training and len(set(mapping)) != len(mapping):
            raise ConfigError("IPU TensorFlow's interleaved schedule does not support several pipeline stages on "
                              f"one IPU in training (pipelining_ops.py), device_mapping {list(mapping)}: use "
                              "'grouped' or 'sequential'")
        overlap = len(_circular_union(slots))
        return rule(overlap, overlap, f"Its overlap length is {overlap} (CircularUnion of the stage-to-IPU "
                    "mapping); the compiler needs whole ramp-up/ramp-down rounds (pipeline_visitor.cc).")
    overlap = len(slots)
    return rule(overlap, overlap, f"Grouped runs all {overlap} {'forward and backward ' if training else ''}"
                "stage slots every step, so its overlap length is "
                f"{'2S' if training else 'S'} = {overlap} (pipeline_visitor.cc VerifyPipelineArgumentsFixed).")


def check_pipeline(framework: str, schedule: str, stages: int, grad_accum: int, training: bool = True,
                   device_mapping: Sequence[int] | None = None) -> PipelineRule:
    """Raise :class:`~hal.errors.ConfigError` explaining why the SDK would refuse ``grad_accum``
    (inference: the iterations per run); return the rule otherwise."""
    rule = pipeline_rule(framework, schedule, stages, training, device_mapping)
    problem = rule.violation(_positive_int(grad_accum, "grad_accum" if training else "device_iterations"))
    if problem:
        raise ConfigError(problem)
    return rule


# ---------------------------------------------------------------------------
# small pure functions
# ---------------------------------------------------------------------------


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def optimizer_state_tensors(optimizer: Optimizer) -> int:
    """State tensors per parameter: SGD 0 (1 with momentum), Adam/AdamW 2."""
    if isinstance(optimizer, Adam):  # AdamW is an Adam
        return 2
    if isinstance(optimizer, SGD):
        return 1 if optimizer.momentum > 0 else 0
    raise ConfigError(f"optimizer must be hal.training.SGD, Adam or AdamW, got {optimizer!r}")


def pipeline_efficiency(stages: int, grad_accum: int, schedule: str = "interleaved") -> float:
    """Fraction of pipeline time spent on useful work: ``G / (G + S - 1)``; 1 for sequential."""
    s, g = _positive_int(stages, "stages"), _positive_int(grad_accum, "grad_accum")
    return 1.0 if _check_choice(schedule, SCHEDULES, "schedule") == "sequential" else g / (g + s - 1)


def min_grad_accum_for(stages: int, efficiency: float) -> int:
    """The smallest G with ``G / (G + S - 1) >= efficiency``."""
    s = _positive_int(stages, "stages")
    if not 0.0 < efficiency <= 1.0:
        raise ConfigError(f"efficiency must be in (0, 1], got {efficiency!r}")
    if s == 1:
        return 1
    if efficiency >= 1.0:
        raise ConfigError(f"a {s}-stage pipeline never reaches efficiency 1.0 (it has a fill/drain bubble)")
    g = max(1, math.ceil(efficiency * (s - 1) / (1.0 - efficiency) - 1e-9))
    while pipeline_efficiency(s, g) < efficiency:  # guard against rounding
        g += 1
    return g


def stash_copies(stage: int, stages: int, schedule: str = "interleaved") -> int:
    """Micro-batches of activations 0-based ``stage`` holds in a training pipeline: interleaved
    ``2(S - s) - 1``, grouped ``2(S - s)`` (1 with one stage), sequential 1."""
    if not 0 <= stage < stages:
        raise ConfigError(f"stage must be in [0, {stages}), got {stage}")
    if _check_choice(schedule, SCHEDULES, "schedule") == "sequential" or stages == 1:
        return 1
    return 2 * (stages - stage) - (0 if schedule == "grouped" else 1)


# ---------------------------------------------------------------------------
# batch arithmetic
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """How samples flow: micro-batch, device iterations D, replicas R, accumulation G."""

    micro_batch: int
    device_iterations: int
    replicas: int
    grad_accum: int
    training: bool

    @property
    def host_batch(self) -> int:
        """Samples the host hands over per call (what ``poptorch.DataLoader`` combines)."""
        g = self.grad_accum if self.training else 1
        return self.micro_batch * self.device_iterations * self.replicas * g

    @property
    def samples_per_update(self) -> int:
        """Samples averaged into one weight update (training), ``micro x G x R``."""
        return self.micro_batch * self.grad_accum * self.replicas

    def explain(self) -> str:
        m, d, r, g = self.micro_batch, self.device_iterations, self.replicas, self.grad_accum
        if not self.training:
            return (
                f"Each of the {r} replica(s) runs micro-batches of {m} samples; one host call runs "
                f"{d} device iteration(s), so the host batch is micro x device iterations x replicas = "
                f"{m} x {d} x {r} = {self.host_batch} samples."
            )
        return (
            f"Each of the {r} replica(s) runs micro-batches of {m} samples and accumulates the gradients of "
            f"{g} of them, so every weight update averages {m} x {g} x {r} = {self.samples_per_update} samples; "
            f"one host call runs {d} update(s), so the host batch is micro x device iterations x replicas x "
            f"grad accum = {m} x {d} x {r} x {g} = {self.host_batch} samples, laid out [D, G, R, micro]. "
            f"BatchNorm statistics are per micro-batch of {m}."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch, "device_iterations": self.device_iterations,
            "replicas": self.replicas, "grad_accum": self.grad_accum, "training": self.training,
            "host_batch": self.host_batch, "samples_per_update": self.samples_per_update if self.training else None,
            "explanation": self.explain(),
        }


def batch_arithmetic(
    micro_batch: int, device_iterations: int = 1, replicas: int = 1, grad_accum: int = 1,
    training: bool = True, stages: int = 1, framework: str = "poptorch", schedule: str | None = None,
    device_mapping: Sequence[int] | None = None,
) -> Batch:
    """Check the batch settings against ``framework``'s rules (:func:`check_pipeline`) and
    return the :class:`Batch`; ``schedule=None`` is the framework's default."""
    m = _positive_int(micro_batch, "micro_batch")
    d = _positive_int(device_iterations, "device_iterations")
    r = _positive_int(replicas, "replicas")
    g = _positive_int(grad_accum, "grad_accum")
    s = _positive_int(stages, "stages")
    if not training and g != 1:
        raise ConfigError(f"inference has no gradient accumulation (both SDKs require 1), got grad_accum={g}")
    schedule = schedule or DEFAULT_SCHEDULE[_check_choice(framework, FRAMEWORKS, "framework")]
    check_pipeline(framework, schedule, s, g if training else d, training, device_mapping)
    return Batch(m, d, r, g, training)


# ---------------------------------------------------------------------------
# graph cuts
# ---------------------------------------------------------------------------


def _last_use(spec: ModelSpec) -> list[int]:
    """For each node (topological index), the index of its last consumer (itself if none)."""
    index = {n.name: i for i, n in enumerate(spec.nodes)}
    last = list(range(len(spec.nodes)))
    for i, n in enumerate(spec.nodes):
        for k in n.inputs:
            last[index[k]] = max(last[index[k]], i)
    return last


def crossing(spec: ModelSpec, i: int) -> list[str]:
    """Names of the node outputs that cross a cut after topological index ``i``."""
    last = _last_use(spec)
    return [spec.nodes[j].name for j in range(i + 1) if last[j] > i]


def cut_points(spec: ModelSpec) -> list[int]:
    """Indices ``i`` (>= 1, < last) after which exactly one tensor, node i's output, crosses."""
    last = _last_use(spec)
    out, reach = [], last[0]
    for i in range(1, len(spec.nodes) - 1):
        if reach <= i and last[i] > i:
            out.append(i)
        reach = max(reach, last[i])
    return out


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StageMemory:
    """Bytes one IPU needs for its stage."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total}



class _Model:
    """Per-node numbers of a spec and the memory of any stage ``[lo, hi)`` between cuts.

    Sums over a stage are prefix-sum differences. The saved set of a stage is
    exact for single-tensor cuts: a tensor produced inside the stage and read
    only inside it is saved iff itself or any consumer saves it; the stage's
    output (read by the next stage) iff it saves itself (relu, the logits);
    the stage's input (produced by the previous stage) iff a consumer saves it.
    """

    def __init__(self, spec: ModelSpec, precision: str) -> None:
        info = spec.info()
        self.spec, self.info, self.bytes = spec, info, PRECISIONS[precision]
        item = DTYPE_BYTES[spec.dtype]
        index = {r.name: i for i, r in enumerate(info)}
        self.last = _last_use(spec)
        self.numel = [r.activation_bytes // item for r in info]
        n = len(info)
        self_saved, cons_saved = [False] * n, [False] * n
        self.inputs = [[index[k] for k in r.inputs] for r in info]
        self.saves_input = [r.kind in _SAVES_INPUT or (r.kind == "Activation" and node.op.fn in _ACT_SAVES_INPUT)  # type: ignore[attr-defined]
                            for r, node in zip(info, spec.nodes)]
        for i, r in enumerate(info):
            if self.saves_input[i]:
                for k in self.inputs[i]:
                    cons_saved[k] = True
            elif r.kind in ("Activation", "Dropout"):
                self_saved[i] = True
        self_saved[index[spec.output]] = True  # the loss reads the logits
        self.self_saved, self.cons_saved = self_saved, cons_saved
        self._flops = _prefix(r.flops for r in info)
        self._params = _prefix(r.params for r in info)
        self._buffers = _prefix(r.buffers for r in info)
        live, total = [], 0
        died: list[list[int]] = [[] for _ in range(n)]
        for t, last in enumerate(self.last):
            died[last].append(t)
        for i in range(n):  # elements alive right after node i runs, before its dead inputs are freed
            total += self.numel[i]
            live.append(total)
            total -= sum(self.numel[t] for t in died[i])
        self._live = live
        self._saved = _prefix(m if (a or b) else 0 for m, a, b in zip(self.numel, self_saved, cons_saved))

    def flops(self, lo: int, hi: int) -> int:
        return self._flops[hi] - self._flops[lo]

    def params(self, lo: int, hi: int) -> tuple[int, int]:
        return self._params[hi] - self._params[lo], self._buffers[hi] - self._buffers[lo]

    def saved_numel(self, lo: int, hi: int) -> int:
        """Elements per sample the backward of nodes ``[lo, hi)`` reads (see the class docstring)."""
        inside = self._saved[hi - 1] - self._saved[lo]
        out = self.numel[hi - 1] if self.self_saved[hi - 1] else 0
        inp = self.numel[lo - 1] if lo > 0 and self.cons_saved[lo - 1] else 0
        return inside + out + inp

    def input_numel(self, lo: int) -> int:
        return self.numel[0] if lo == 0 else self.numel[lo - 1]

    def peak_live_numel(self, lo: int, hi: int) -> int:
        """Largest sum of tensors alive at once during the forward of nodes ``[lo, hi)``.

        With a single tensor entering the stage, the tensors alive after node ``i``
        are the same as in a forward of the whole graph, so this is a range maximum.
        """
        return max(self._live[max(lo, 1):hi])


    def segment_saved_numel(self, lo: int, hi: int, kept: frozenset[int]) -> int:
        """Elements per sample the backward of nodes ``[lo, hi)`` reads, for any range (not only
        between cuts), leaving out the ``kept`` (checkpointed) tensors."""
        saved = {i for i in range(lo, hi) if self.self_saved[i]}
        for i in range(lo, hi):
            if self.saves_input[i]:
                saved.update(self.inputs[i])
        return sum(self.numel[t] for t in saved - kept)

    def checkpointed_numel(self, checkpoints: Sequence[int]) -> int:
        """Elements per sample held with recomputation checkpoints after the nodes ``checkpoints``
        on one stage: the checkpointed outputs plus the largest segment's saved set."""
        kept = frozenset(checkpoints)
        edges = [0, *sorted(c + 1 for c in kept), len(self.numel)]
        largest = max(self.segment_saved_numel(a, b, kept) for a, b in zip(edges, edges[1:]) if b > a)
        return sum(self.numel[c] for c in kept) + largest

    def memory(self, lo: int, hi: int, micro: int, grad_accum: int, states: int, training: bool,
               copies: int, recompute: bool, checkpoints: Sequence[int] = ()) -> StageMemory:
        """Memory of the stage ``[lo, hi)`` holding ``copies`` micro-batches in flight; ``recompute``
        stashes only its input, ``checkpoints`` (node indices) keep only their outputs."""
        b = self.bytes
        p, buf = self.params(lo, hi)
        weights = (p + buf) * b.weights
        a = micro * b.activations
        if not training:
            return StageMemory(weights, 0, 0, self.peak_live_numel(lo, hi) * a)
        gradients = p * b.activations + (p * b.state if grad_accum > 1 else 0)
        optimizer = states * p * b.state
        if checkpoints:
            acts = self.checkpointed_numel(checkpoints) * a
        elif recompute:
            acts = (copies * self.input_numel(lo) + self.saved_numel(lo, hi)) * a
        else:
            acts = copies * self.saved_numel(lo, hi) * a
        return StageMemory(weights, gradients, optimizer, acts)


def _prefix(values: Iterable[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


# ---------------------------------------------------------------------------
# optimal contiguous partition
# ---------------------------------------------------------------------------


def partition(
    n_blocks: int, stages: int, cost: Callable[[int, int, int], float],
) -> list[int] | None:
    """Split blocks ``0..n_blocks-1`` into ``stages`` contiguous non-empty groups
    minimising the largest ``cost(stage, first_block, end_block)``; ``inf`` marks an
    infeasible group. Returns the start block of each group, or ``None`` if no
    split is feasible. Exact (dynamic programming over ``stages x n_blocks^2``).
    """
    if not 1 <= stages <= n_blocks:
        raise ConfigError(f"cannot split {n_blocks} blocks into {stages} non-empty stages")
    inf = float("inf")
    # best[s][k]: (max cost, sum of squares) of the best split of blocks [0, k) into s+1 groups
    best = [[(inf, inf)] * (n_blocks + 1) for _ in range(stages)]
    back = [[-1] * (n_blocks + 1) for _ in range(stages)]
    for k in range(1, n_blocks - stages + 2):
        c = cost(0, 0, k)
        best[0][k] = (c, c * c)
    for s in range(1, stages):
        for k in range(s + 1, n_blocks - (stages - s) + 2):
            for j in range(s, k):
                prev = best[s - 1][j]
                if prev[0] == inf:
                    continue
                c = cost(s, j, k)
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[s][k]:
                    best[s][k], back[s][k] = cand, j
    if best[stages - 1][n_blocks][0] == inf:
        return None
    starts, k = [], n_blocks
    for s in range(stages - 1, 0, -1):
        k = back[s][k]
        starts.append(k)
    return [0] + starts[::-1]


# ---------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its nodes (topological order) on IPU ``ipu``."""

    index: int
    ipu: int
    nodes: tuple[str, ...]
    flops: int  # per micro-batch: 3 x forward in training, forward in inference
    share: float
    memory: StageMemory
    boundary_bytes: int  # the tensor this stage sends to the next, per micro-batch

    @property
    def first(self) -> str:
        return self.nodes[0]

    @property
    def last(self) -> str:
        return self.nodes[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.index, "ipu": self.ipu, "first": self.first, "last": self.last,
            "num_nodes": len(self.nodes), "nodes": list(self.nodes), "flops_per_micro_batch": self.flops,
            "flop_share": self.share, "memory_bytes": self.memory.to_dict(), "boundary_bytes": self.boundary_bytes,
        }


@dataclass(frozen=True)
class IpuMemory:
    """What one IPU of a replica holds, and whether it fits beside its convolution temporaries."""

    ipu: int
    stages: tuple[int, ...]
    memory: StageMemory
    available_memory_proportion: float
    usable_bytes: int

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_bytes

    @property
    def over_by(self) -> int:
        return max(0, self.memory.total - self.usable_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"ipu": self.ipu, "stages": list(self.stages), "memory_bytes": self.memory.to_dict(),
                "available_memory_proportion": self.available_memory_proportion,
                "usable_bytes": self.usable_bytes, "fits": self.fits, "over_by_bytes": self.over_by}


@dataclass(frozen=True)
class Roofline:
    """Lower bound of one weight update (inference: one host batch) on one configuration."""

    device: str
    name: str
    precision: str
    peak_flops: float
    memory_bandwidth: float
    flops: float
    bytes: float
    seconds: float
    bound: str
    samples: int

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "name": self.name, "precision": self.precision, "peak_flops": self.peak_flops,
            "memory_bandwidth": self.memory_bandwidth, "flops": self.flops, "bytes": self.bytes,
            "seconds": self.seconds, "bound": self.bound, "samples": self.samples,
            "samples_per_second": self.samples_per_second,
        }


@dataclass(frozen=True)
class Estimate:
    """Expected throughput: a roofline bound times an efficiency calibrated on published figures.

    An estimate, never a measurement (``kind`` says so in every dict and JSON).
    """

    samples_per_second: float
    bound_samples_per_second: float
    efficiency: float
    basis: str
    calibration: str
    kind: str = "estimate"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "samples_per_second": self.samples_per_second,
                "bound_samples_per_second": self.bound_samples_per_second, "efficiency": self.efficiency,
                "basis": self.basis, "calibration": self.calibration}


@dataclass(frozen=True)
class Plan:
    """A checked IPU configuration for one spec; ``fits`` says whether every IPU fits."""

    model: str
    spec_hash: str
    ipu: Device
    framework: str
    schedule: str
    device_mapping: tuple[int, ...]
    batch: Batch
    precision: str
    optimizer: str
    state_tensors: int
    recompute: bool
    recompute_checkpoints: tuple[str, ...]
    available_memory_proportion: tuple[float, ...]
    headroom: float
    stages: tuple[Stage, ...]
    ipu_memory: tuple[IpuMemory, ...]
    efficiency: float
    grad_accum_for_90: int
    roofline: tuple[Roofline, ...]
    split_by: str  # "hal" (balanced by the planner) or "user" (split= as given)
    half_partials: bool = False  # convolution/matmul partial sums in fp16 (Graphcore's half_partial)
    expected: Estimate | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def training(self) -> bool:
        return self.batch.training

    @property
    def ipus_per_replica(self) -> int:
        return len(self.ipu_memory)

    @property
    def bytes(self) -> PrecisionBytes:
        """Bytes per weight, activation, partial and optimizer state element of the plan's precision."""
        return replace(PRECISIONS[self.precision], partials=2) if self.half_partials else PRECISIONS[self.precision]

    @property
    def pipeline_rule(self) -> PipelineRule:
        return pipeline_rule(self.framework, self.schedule, len(self.stages), self.training, self.device_mapping)

    @property
    def fits(self) -> bool:
        return all(m.fits for m in self.ipu_memory)

    @property
    def boundaries(self) -> tuple[str, ...]:
        """The first node of every stage after the first: where ``BeginBlock`` goes."""
        return tuple(s.first for s in self.stages[1:])

    @property
    def cuts(self) -> tuple[str, ...]:
        """The last node of every stage but the last: the ``split=`` that reproduces this plan."""
        return tuple(s.last for s in self.stages[:-1])

    @property
    def usable_bytes(self) -> int:
        """The smallest usable memory of the replica's IPUs."""
        return min(m.usable_bytes for m in self.ipu_memory)

    def stage_of(self, node: str) -> int:
        for s in self.stages:
            if node in s.nodes:
                return s.index
        raise ConfigError(f"node {node!r} is in no stage of the plan for {self.model!r}")

    def verdict(self) -> str:
        if self.fits:
            worst = max(self.ipu_memory, key=lambda m: m.memory.total / m.usable_bytes)
            return (
                f"FITS: every IPU is within its usable memory (tightest: IPU {worst.ipu}, "
                f"{worst.memory.total / MiB:,.1f} of {worst.usable_bytes / MiB:,.0f} MiB)."
            )
        bad = "; ".join(
            f"IPU {m.ipu} (stages {', '.join(map(str, m.stages))}) needs {m.memory.total / MiB:,.1f} MiB of "
            f"{m.usable_bytes / MiB:,.0f} usable, {m.over_by / MiB:,.1f} MiB over"
            for m in self.ipu_memory if not m.fits
        )
        return f"DOES NOT FIT: {bad}."

    def balance(self) -> tuple[float, float]:
        """(largest / smallest stage FLOPs, largest deviation from the mean stage as a fraction)."""
        flops = [s.flops for s in self.stages]
        mean = sum(flops) / len(flops)
        ratio = max(flops) / min(flops) if min(flops) else float("inf")
        return ratio, max(abs(f - mean) for f in flops) / mean if mean else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "spec_hash": self.spec_hash, "ipu": self.ipu.to_dict(),
            "framework": self.framework, "schedule": self.schedule, "device_mapping": list(self.device_mapping),
            "ipus_per_replica": self.ipus_per_replica, "batch": self.batch.to_dict(), "precision": self.precision,
            "half_partials": self.half_partials,
            "bytes": {"weights": self.bytes.weights, "activations": self.bytes.activations,
                      "partials": self.bytes.partials, "optimizer_state": self.bytes.state},
            "optimizer": self.optimizer, "optimizer_state_tensors": self.state_tensors,
            "recompute": self.recompute, "recompute_checkpoints": list(self.recompute_checkpoints),
            "available_memory_proportion": list(self.available_memory_proportion), "headroom": self.headroom,
            "pipeline_rule": self.pipeline_rule.to_dict(), "split_by": self.split_by, "fits": self.fits,
            "boundaries": list(self.boundaries), "cuts": list(self.cuts),
            "stages": [s.to_dict() for s in self.stages], "ipu_memory": [m.to_dict() for m in self.ipu_memory],
            "pipeline_efficiency": self.efficiency, "grad_accum_for_90_percent": self.grad_accum_for_90,
            "roofline": [r.to_dict() for r in self.roofline],
            "expected_throughput": self.expected.to_dict() if self.expected else None,
            "notes": list(self.notes), "verdict": self.verdict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A plain-text report: configuration, stages, IPUs, efficiency, roofline, estimate, verdict."""
        b, mode = self.batch, "training" if self.training else "inference"
        extras = [self.framework, f"{self.schedule} schedule" if len(self.stages) > 1 else "",
                  "half partials" if self.half_partials else "",
                  "pipeline recomputation" if self.recompute else "",
                  f"{len(self.recompute_checkpoints)} recomputation checkpoints" if self.recompute_checkpoints else "",
                  f"{self.split_by}'s split" if len(self.stages) > 1 else ""]
        lines = [
            f"IPU plan: {self.model} on {self.ipus_per_replica} x {self.ipu.name} per replica, {b.replicas} "
            f"replica(s), {mode}, {self.precision}, {self.optimizer}, " + ", ".join(e for e in extras if e),
            *_wrap(b.explain()),
            f"  IPU memory {self.ipu.memory_bytes / MiB:,.0f} MiB; usable = memory x (1 - available memory "
            f"proportion - {self.headroom:.0%} for code and exchange).",
            "",
        ]
        head = ["stage", "ipu", "nodes first .. last (count)", "GFLOP", "share", "weights", "grads", "optim",
                "activ.", "MiB"]
        rows = []
        for s in self.stages:
            m = s.memory
            rows.append([
                str(s.index), str(s.ipu), f"{s.first} .. {s.last} ({len(s.nodes)})", f"{s.flops / 1e9:,.2f}",
                f"{s.share:.1%}", f"{m.weights / MiB:,.1f}", f"{m.gradients / MiB:,.1f}",
                f"{m.optimizer / MiB:,.1f}", f"{m.activations / MiB:,.1f}", f"{m.total / MiB:,.1f}",
            ])
        lines += render(head, rows, align="rrlrrrrrrr").splitlines()
        lines += [""] + render(
            ["ipu", "stages", "needs MiB", "AMP", "usable MiB", "fits?"],
            [[str(m.ipu), ",".join(map(str, m.stages)), f"{m.memory.total / MiB:,.1f}",
              f"{m.available_memory_proportion:.2f}", f"{m.usable_bytes / MiB:,.0f}",
              "yes" if m.fits else f"NO, +{m.over_by / MiB:,.1f}"] for m in self.ipu_memory],
            align="rlrrrl").splitlines()
        what = "training (3 x forward)" if self.training else "forward"
        lines.append(f"  GFLOP: {what} per micro-batch of {b.micro_batch}; the IPU's activations hold "
                     "what its schedule keeps in flight.")
        ratio, dev = self.balance()
        lines.append(f"  Balance: largest/smallest stage {ratio:.2f}, every stage within {dev:.1%} of the mean.")
        rule = self.pipeline_rule
        if self.training and len(self.stages) > 1:
            g, s = b.grad_accum, len(self.stages)
            formula = ("sequential: no overlap, no bubble" if self.schedule == "sequential"
                       else f"G/(G+S-1) = {g}/({g}+{s}-1)")
            lines.append(f"  Pipeline efficiency {formula} = {self.efficiency:.1%}; G >= {self.grad_accum_for_90} "
                         f"reaches 90%. {self.framework} accepts G {_accepted(rule)}.")
        samples = b.samples_per_update if self.training else b.host_batch
        lines += ["", f"Roofline lower bound per {'weight update' if self.training else 'host batch'} "
                      f"({samples} samples, {self.precision}):"]
        lines += render(
            ["configuration", "TFLOP/s", "GB/s", "ms", "bound", "samples/s"],
            [[r.name, f"{r.peak_flops / 1e12:,.2f}", f"{r.memory_bandwidth / 1e9:,.0f}", _ms(r.seconds),
              r.bound, f"{r.samples_per_second:,.0f}"] for r in self.roofline],
            align="lrrrlr",
        ).splitlines()
        lines.append("  (lower bounds: no host I/O, synchronisation or kernel inefficiency)")
        if self.expected:
            e = self.expected
            lines += [f"Expected throughput (ESTIMATE): {e.samples_per_second:,.0f} samples/s = "
                      f"{e.efficiency:.1%} of the planned bound {e.bound_samples_per_second:,.0f}.",
                      *_wrap(f"basis: {e.basis}. Calibration: {e.calibration}.")]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [""] + textwrap.wrap(self.verdict(), 100, subsequent_indent="  ")
        return "\n".join(lines)


def _accepted(rule: PipelineRule) -> str:
    return (f"multiple of {rule.multiple} and >= {rule.minimum}" if rule.multiple > 1
            else f">= {rule.minimum}")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.4f}"


def _wrap(text: str, width: int = 100) -> list[str]:
    return textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="  ")


def _roofline(model: _Model, dev: Device, precision: str, batch: Batch, states: int) -> Roofline:
    info, pb = model.info, PRECISIONS[precision]
    params = sum(r.params + r.buffers for r in info)
    acts = sum(model.numel) * pb.activations
    fwd = sum(r.flops for r in info)
    if batch.training:
        samples = batch.samples_per_update
        micro_batches = batch.grad_accum * batch.replicas
        flops = TRAIN_FLOPS_FACTOR * fwd * samples
        update = (2 * pb.weights + pb.state * (1 + 2 * states)) * params  # weights r/w, gradient r, state r/w
        nbytes = 2 * params * pb.weights * micro_batches + update + 4 * acts * samples
    else:
        samples = batch.host_batch
        flops = fwd * samples
        nbytes = params * pb.weights * batch.device_iterations * batch.replicas + 2 * acts * samples
    peak = dev.peak(pb.peak_key)
    t_compute, t_memory = flops / peak, nbytes / dev.memory_bandwidth
    return Roofline(dev.key, dev.name, precision, peak, dev.memory_bandwidth, flops, nbytes,
                    max(t_compute, t_memory), "compute" if t_compute >= t_memory else "memory", samples)


def _pipeline_roofline(stages: Sequence[Stage], dev: Device, precision: str, batch: Batch, schedule: str,
                       model: _Model, states: int) -> Roofline:
    """The planned configuration: ``(G + S - 1)`` cycles of the slowest IPU (its stages' compute and
    exchange), or ``G x`` every stage in turn for the sequential schedule (inference: D for G)."""
    peak, s = dev.peak(PRECISIONS[precision].peak_key), len(stages)
    link = dev.link_bandwidth or float("inf")
    per_ipu: dict[int, float] = {}
    for st in stages:
        weights_traffic = st.memory.weights * (2 if batch.training else 1)
        moves = st.index < s - 1 and stages[st.index + 1].ipu != st.ipu
        exchange = (2 if batch.training else 1) * st.boundary_bytes / link if moves else 0.0
        per_ipu[st.ipu] = per_ipu.get(st.ipu, 0.0) + max(st.flops / peak, weights_traffic / dev.memory_bandwidth)
        per_ipu[st.ipu] += exchange
    n = batch.grad_accum if batch.training else batch.device_iterations
    seconds = n * sum(per_ipu.values()) if schedule == "sequential" else (n + s - 1) * max(per_ipu.values())
    samples = batch.samples_per_update if batch.training else batch.host_batch
    one = _roofline(model, dev, precision, batch, states)
    ipus = len(per_ipu)
    name = f"planned: {ipus} x {dev.key}" + (f", {s} stages" if s > 1 else "") + f" x {batch.replicas} replica(s)"
    return Roofline(dev.key, name, precision, peak * ipus * batch.replicas,
                    dev.memory_bandwidth * ipus * batch.replicas, one.flops, one.bytes, seconds, "pipeline", samples)


# ---------------------------------------------------------------------------
# expected throughput, calibrated on Graphcore's published ResNet50 training figures
# ---------------------------------------------------------------------------

# Graphcore's MLPerf ResNet50 configuration, vision/cnns/tensorflow2/configs.yml
# `resnet50_mlperf_pod16_bs20` (graphcore/examples, SDK 3.4): micro-batch 20, 16 replicas,
# global batch 1920 (G = 6), 16.16, seven stages all on IPU 0 as recomputation points
# (Sequential schedule, recomputation), available memory proportion 15 %. Hal names of
# its splits conv2_block1_out .. conv4_block4_out (Keras names: the block's relu output).
MLPERF_POD16 = dict(
    micro_batch=20, replicas=16, grad_accum=6, precision="16.16", optimizer=SGD(momentum=0.9),
    framework="tensorflow", schedule="sequential", recompute=True, available_memory_proportion=0.15,
    split=("layer1.0.relu3", "layer1.2.relu3", "layer2.0.relu3", "layer2.2.relu3", "layer3.0.relu3",
           "layer3.3.relu3"),
    device_mapping=(0, 0, 0, 0, 0, 0, 0),
)


@dataclass(frozen=True)
class Published:
    """A published ResNet50 training throughput of the configuration ``MLPERF_POD16`` on ``ipu``."""

    ipu: str
    samples_per_second: float
    source: str


CALIBRATION = (
    Published("gc200", 30_000.0,
              "Graphcore, 'Accelerating ResNet-50 Training on the IPU for MLPerf' (blog, 17 Jan 2022): "
              "'30k images per second throughput' on an IPU-POD16 (16 Mk2 GC200, MLPerf v1.1, batch 1920)"),
    Published("bow", 42_029.0,
              "Graphcore performance results (graphcore.ai/performance-results, Bow Pod16, ResNet-50 v1.5, "
              "TensorFlow1, ImageNet2012, batch 1,920, 16.16): 42,029 images/s"),
)


@functools.lru_cache(maxsize=None)
def _calibration() -> dict[str, tuple[float, str]]:
    """Per IPU type: published throughput / hal's planned bound of the same configuration."""
    from hal import models

    spec = models.get("resnet50")
    out = {}
    for pub in CALIBRATION:
        bound = _plan(spec, ipu=pub.ipu, devices=[], **MLPERF_POD16).roofline[0].samples_per_second  # type: ignore[arg-type]
        out[pub.ipu] = (pub.samples_per_second / bound,
                        f"{pub.source}, against hal's bound of {bound:,.0f} samples/s for that configuration")
    return out


def expected_throughput(plan: Plan) -> Estimate:
    """The plan's expected samples/s: its planned roofline bound times the efficiency Graphcore's
    published ResNet50 throughput reaches against hal's bound on the same IPU type (GC2, which
    has no published ResNet50 training figure, takes the mean of Mk2's and Bow's). An estimate:
    other models, batch sizes and SDKs reach other fractions of their bound."""
    table = _calibration()
    bound = plan.roofline[0].samples_per_second
    if plan.ipu.key in table:
        efficiency, calibration = table[plan.ipu.key]
    else:
        efficiency = sum(e for e, _ in table.values()) / len(table)
        calibration = ("no published figure for this IPU: the mean efficiency of "
                       + " and ".join(f"{k} ({e:.1%})" for k, (e, _) in table.items()))
    return Estimate(bound * efficiency, bound, efficiency,
                    f"hal's planned roofline bound x {efficiency:.1%}, the efficiency of Graphcore's published "
                    "ResNet50 MLPerf configuration on this IPU type", calibration)


# ---------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------


def _node_indices(spec: ModelSpec, names: Sequence[str | int], what: str, allowed: Sequence[int] | None) -> list[int]:
    index = {n.name: i for i, n in enumerate(spec.nodes)}
    out = []
    for item in names:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ConfigError(f"{what} takes node names or topological indices, got {item!r}")
        i = index.get(item) if isinstance(item, str) else item
        if i is None or not 0 <= i < len(spec.nodes):
            raise ConfigError(f"{what}: {spec.name!r} has no node {item!r}")
        if allowed is not None and i not in allowed:
            near = sorted(allowed, key=lambda c: abs(c - i))[:2]
            raise ConfigError(
                f"{what}: a stage cannot end at {spec.nodes[i].name!r} ({', '.join(crossing(spec, i))} would "
                f"cross); the nearest cuts where one tensor crosses are "
                f"{', '.join(spec.nodes[c].name for c in sorted(near))}")
        out.append(i)
    if allowed is None:  # a set of nodes (checkpoints): any order
        return sorted(set(out))
    if out != sorted(set(out)):
        raise ConfigError(f"{what} must be in topological order without repeats, got {list(names)}")
    return out


def _amp(value: float | Sequence[float] | None, ipus: int, headroom: float) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (value,) * ipus if isinstance(value, (int, float)) else tuple(value)
    if len(values) == 1:
        values *= ipus
    if len(values) != ipus or not all(isinstance(v, (int, float)) and 0.0 < v <= 1.0 for v in values):
        raise ConfigError(f"available_memory_proportion must be one fraction in (0, 1] or one per IPU ({ipus}), "
                          f"got {value!r}")
    if max(values) + headroom >= 1.0:
        raise ConfigError(f"available_memory_proportion {max(values)} + headroom {headroom} leave no memory")
    return tuple(float(v) for v in values)


def plan(spec: ModelSpec, ipu: str = "bow", ipus: int | None = None, micro_batch: int = 1, replicas: int = 1,
         grad_accum: int | None = None, device_iterations: int | None = None, precision: str = "fp32",
         optimizer: Optimizer | None = None, recompute: bool = False, training: bool = True,
         headroom: float = DEFAULT_HEADROOM, efficiency: float | None = None,
         devices: Sequence[Device] | None = None, *, framework: str = "poptorch", schedule: str | None = None,
         split: Sequence[str | int] | None = None, device_mapping: Sequence[int] | None = None,
         available_memory_proportion: float | Sequence[float] | None = None,
         recompute_checkpoints: Sequence[str | int] = (), half_partials: bool = False) -> Plan:
    """Plan ``spec`` on IPUs of type ``ipu`` (``gc2``, ``gc200``, ``bow``) for ``framework``.

    Stages: ``split`` (node names or indices after which a stage ends; hal's balanced split
    if ``None``) on ``device_mapping`` (the IPU of each stage; one IPU each by default);
    ``ipus`` is their number of IPUs (default: one stage per IPU, 1 IPU). ``schedule``
    defaults to the framework's (:data:`DEFAULT_SCHEDULE`). ``grad_accum=None`` picks the
    smallest count the framework accepts (:func:`pipeline_rule`) reaching ``efficiency``
    (default 97 %; 1 for one stage); ``device_iterations=None`` is 1 (training) or the
    smallest accepted (inference). ``available_memory_proportion`` is one fraction or one
    per IPU (``None``: hal picks per IPU, see the module docstring). ``recompute`` is
    pipeline recomputation; ``recompute_checkpoints`` (one stage) are nodes whose outputs
    are kept while the rest is recomputed. ``half_partials`` accumulates convolution and
    matmul partial sums in fp16 (fp32 otherwise, Poplar's default; reported, not in the memory model: Poplar
    plans partials within the available memory proportion). ``devices`` are the roofline's comparison chips
    (default: the whole catalog and this CPU). The result carries :func:`expected_throughput`.
    """
    if not isinstance(half_partials, bool):
        raise ConfigError(f"half_partials must be a bool, got {half_partials!r}")
    p = _plan(spec, ipu, ipus, micro_batch, replicas, grad_accum, device_iterations, precision, optimizer,
              recompute, training, headroom, efficiency, devices, framework, schedule, split, device_mapping,
              available_memory_proportion, recompute_checkpoints)
    p = replace(p, half_partials=half_partials)
    return replace(p, expected=expected_throughput(p)) if p.training else p


def _plan(spec: ModelSpec, ipu: str = "bow", ipus: int | None = None, micro_batch: int = 1, replicas: int = 1,
          grad_accum: int | None = None, device_iterations: int | None = None, precision: str = "fp32",
          optimizer: Optimizer | None = None, recompute: bool = False, training: bool = True,
          headroom: float = DEFAULT_HEADROOM, efficiency: float | None = None,
          devices: Sequence[Device] | None = None, framework: str = "poptorch", schedule: str | None = None,
          split: Sequence[str | int] | None = None, device_mapping: Sequence[int] | None = None,
          available_memory_proportion: float | Sequence[float] | None = None,
          recompute_checkpoints: Sequence[str | int] = ()) -> Plan:
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"plan expects a hal ModelSpec, got {type(spec).__name__}")
    dev = get_ipu(ipu)
    if precision not in PRECISIONS:
        raise ConfigError(f"IPU precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if not isinstance(headroom, (int, float)) or not 0.0 <= headroom < 1.0:
        raise ConfigError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
    schedule = schedule or DEFAULT_SCHEDULE[_check_choice(framework, FRAMEWORKS, "framework")]
    optimizer = optimizer if optimizer is not None else SGD()
    states = optimizer_state_tensors(optimizer) if training else 0

    cuts = cut_points(spec)
    user_cuts = _node_indices(spec, split, "split", cuts) if split is not None else None
    if user_cuts is not None:
        n_stages = len(user_cuts) + 1
    elif device_mapping is not None:
        n_stages = len(device_mapping)
    else:
        n_stages = _positive_int(ipus, "ipus (IPUs per replica)") if ipus is not None else 1
    if device_mapping is None and ipus is not None and n_stages != ipus:
        raise ConfigError(f"split gives {n_stages} stages but ipus={ipus}: give device_mapping to put several "
                          "stages on one IPU")
    mapping = _mapping(n_stages, device_mapping)
    n_ipus = len(set(mapping))
    if ipus is not None and ipus != n_ipus:
        raise ConfigError(f"device_mapping {list(mapping)} uses {n_ipus} IPUs, ipus={ipus}")
    if n_stages - 1 > len(cuts):
        raise ConfigError(
            f"{spec.name!r} has only {len(cuts) + 1} possible pipeline stages (cuts where one tensor crosses), "
            f"{n_stages} requested"
        )
    checkpoints = _node_indices(spec, recompute_checkpoints, "recompute_checkpoints", None)
    if checkpoints and (n_stages > 1 or not training):
        raise ConfigError("recompute_checkpoints are modelled for single-stage training plans; a pipeline uses "
                          "recompute=True (each stage's input is its checkpoint)")

    rule = pipeline_rule(framework, schedule, n_stages, training, mapping)
    target = min_grad_accum_for(n_stages, efficiency if efficiency is not None else DEFAULT_EFFICIENCY)
    if efficiency is not None and (grad_accum is not None or not training):
        raise ConfigError("efficiency picks grad_accum for training: give either grad_accum or efficiency")
    if grad_accum is None:
        grad_accum = (1 if n_stages == 1 or schedule == "sequential" else rule.smallest(target)) if training else 1
    if device_iterations is None:
        device_iterations = 1 if training else rule.smallest()
    batch = batch_arithmetic(micro_batch, device_iterations, replicas, grad_accum, training, n_stages, framework,
                             schedule, mapping)
    amps = _amp(available_memory_proportion, n_ipus, float(headroom))

    model = _Model(spec, precision)
    edges = [0] + [c + 1 for c in cuts] + [len(spec.nodes)]  # block b spans nodes [edges[b], edges[b+1])
    memory_bytes = dev.memory_bytes

    def usable(amp: float) -> int:
        return int(memory_bytes * (1.0 - amp - headroom))

    shared = n_ipus < n_stages
    pooled = shared and schedule == "sequential" and recompute and training

    def stage_memory(k: int, lo: int, hi: int) -> StageMemory:
        copies = stash_copies(k, n_stages, schedule)
        rec = recompute and k < n_stages - 1
        return model.memory(lo, hi, batch.micro_batch, batch.grad_accum, states, training, copies, rec,
                            checkpoints)

    @functools.lru_cache(maxsize=None)
    def mem(k: int, b0: int, b1: int) -> StageMemory:
        return stage_memory(k, edges[b0], edges[b1])

    floor = usable(MIN_AMP) if amps is None else None

    def fits_alone(k: int, b0: int, b1: int) -> bool:
        return mem(k, b0, b1).total <= (floor if amps is None else usable(amps[mapping[k]]))

    def flop_cost(k: int, b0: int, b1: int) -> float:
        return float(model.flops(edges[b0], edges[b1])) if fits_alone(k, b0, b1) else float("inf")

    def memory_cost(k: int, b0: int, b1: int) -> float:
        return float(model.saved_numel(edges[b0], edges[b1]))

    def overflow_cost(k: int, b0: int, b1: int) -> float:
        return mem(k, b0, b1).total / (floor if amps is None else usable(amps[mapping[k]]))

    if user_cuts is not None:
        bounds = [0, *[c + 1 for c in user_cuts], len(spec.nodes)]
    else:
        n_blocks = len(edges) - 1
        starts = (partition(n_blocks, n_stages, memory_cost) if shared
                  else partition(n_blocks, n_stages, flop_cost) or partition(n_blocks, n_stages, overflow_cost))
        bounds = [edges[b] for b in [*starts, n_blocks]]  # type: ignore[misc]  # a split always exists here
    factor = TRAIN_FLOPS_FACTOR if training else 1
    total = factor * model.flops(0, len(spec.nodes)) * batch.micro_batch
    stages = []
    for k in range(n_stages):
        lo, hi = bounds[k], bounds[k + 1]
        flops = factor * model.flops(lo, hi) * batch.micro_batch
        stages.append(Stage(
            index=k, ipu=mapping[k], nodes=tuple(n.name for n in spec.nodes[lo:hi]), flops=flops,
            share=flops / total if total else 0.0, memory=stage_memory(k, lo, hi),
            boundary_bytes=model.numel[hi - 1] * batch.micro_batch * model.bytes.activations
            if k < n_stages - 1 else 0,
        ))

    ipu_memory = []
    for i in range(n_ipus):
        own = [s for s in stages if s.ipu == i]
        acts = sum(s.memory.activations for s in own)
        if pooled:  # one stage at a time: every stage input stashed once, one saved set recomputed
            a = batch.micro_batch * model.bytes.activations
            spans = [(bounds[s.index], bounds[s.index + 1]) for s in own]
            acts = a * (sum(model.input_numel(lo) for lo, _ in spans) + max(model.saved_numel(lo, hi)
                                                                             for lo, hi in spans))
        need = StageMemory(sum(s.memory.weights for s in own), sum(s.memory.gradients for s in own),
                           sum(s.memory.optimizer for s in own), acts)
        if amps is None:
            room = math.floor((1.0 - headroom - need.total / memory_bytes) * 100) / 100
            amp = max(MIN_AMP, min(POPLAR_DEFAULT_AMP, room))
        else:
            amp = amps[i]
        ipu_memory.append(IpuMemory(i, tuple(s.index for s in own), need, amp, usable(amp)))

    notes = []
    total_ipus = n_ipus * batch.replicas
    if total_ipus & (total_ipus - 1):
        notes.append(f"{total_ipus} IPUs is not a power of two: PopTorch rounds up with autoRoundNumIPUs(True)")
    if recompute and n_stages == 1 and training:
        notes.append("recompute is pipeline recomputation: no effect on one stage (use recompute_checkpoints)")
    if amps is None:
        notes.append("available memory proportion picked by hal (the most that fits, <= Poplar's 0.6)")
    dev_list = list(devices) if devices is not None else all_devices()
    roof = [_pipeline_roofline(stages, dev, precision, batch, schedule, model, states)]
    roof += [_roofline(model, d, precision, batch, states) for d in dev_list]
    return Plan(
        model=spec.name, spec_hash=spec.hash, ipu=dev, framework=framework, schedule=schedule,
        device_mapping=mapping, batch=batch, precision=precision,
        optimizer=_optimizer_name(optimizer) if training else "none (inference)", state_tensors=states,
        recompute=bool(recompute), recompute_checkpoints=tuple(spec.nodes[i].name for i in checkpoints),
        available_memory_proportion=tuple(m.available_memory_proportion for m in ipu_memory),
        headroom=float(headroom), stages=tuple(stages), ipu_memory=tuple(ipu_memory),
        efficiency=pipeline_efficiency(n_stages, batch.grad_accum, schedule) if training else 1.0,
        grad_accum_for_90=rule.smallest(min_grad_accum_for(n_stages, 0.9)), roofline=tuple(roof),
        split_by="user" if user_cuts is not None else "hal", notes=tuple(notes),
    )


def _optimizer_name(o: Optimizer) -> str:
    if isinstance(o, SGD):
        return f"SGD(momentum={o.momentum:g})" if o.momentum else "SGD"
    return "AdamW" if isinstance(o, AdamW) else "Adam"
