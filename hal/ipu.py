"""The IPU planner: batch arithmetic, pipeline stages, per-IPU memory, pipeline
efficiency and roofline bounds, for a :class:`~hal.spec.ModelSpec`, without the SDK.

Everything here is plain Python over ``spec.info()``; nothing runs on an IPU.
The rules, and where they come from:

**Batch arithmetic** (PopTorch user guide, "Efficient data batching" and
"Pipelined execution"; PopART glossary, "Input data shape"). A replica runs one
*micro-batch* at a time. Training: the host hands over ``micro x D x R x G``
samples per call (D device iterations, R replicas, G gradient-accumulation
steps), arranged ``[D, G, R, micro]``; each of the D weight updates averages
``G x R`` micro-batch gradients. Inference: ``micro x D x R``.

**Pipelining constraints** (PopTorch user guide, "Pipelined execution", and the
check in poptorch's ``popart_compiler/source/Compiler.cpp``). Training on S IPUs
gives ``2S - 1`` pipeline stages (S forward stages, S - 1 backward ones; the last
forward stage is fused with the first backward one), and PopTorch rejects
``gradientAccumulation < 2S - 1``. Inference needs ``deviceIterations >= S``.

**Stage boundaries** are cuts of the topological order where exactly one tensor
crosses: a cut after node ``i`` is valid iff node ``i``'s output is the only
output of nodes ``<= i`` read by nodes ``> i``. In a ResNet that is a block
output, never the inside of a residual block (the skip tensor would cross too).
Stages are balanced on training FLOPs, taken as 3x forward (forward, plus the
input- and weight-gradient passes of about one forward each), by an exact
min-max dynamic program over the candidate cuts, subject to every stage fitting
its IPU. If no split fits, the split that minimises the worst memory overflow is
reported instead, so "does not fit" comes with the smallest achievable excess.

**Memory per IPU** (bytes; ``w`` = 4 for fp32, 2 for fp16, ``P`` parameters and
``B`` buffers of the stage's nodes, ``n`` optimizer state tensors per parameter):

- weights: ``(P + B) w``. fp16 follows PopTorch's ``model.half()``: weights,
  BatchNorm statistics and activations in fp16, no fp32 master copy (PopTorch
  user guide, "16-bit float support", option 1);
- gradients: ``P w`` for the gradient itself, plus ``4 P`` for the fp32
  accumulator when ``G > 1`` (``accum_type`` defaults to ``torch.float32``);
- optimizer state: ``4 n P``; ``n`` = 0 for SGD without momentum, 1 with
  momentum (velocity), 2 for Adam/AdamW (first and second moments), all fp32
  (poptorch.optim's ``*_accum_type`` defaults);
- activations: the tensors a backward pass reads (*saved* set: the inputs of
  Conv, Dense, BatchNorm, MaxPool, leaky_relu/gelu/silu; the outputs of
  relu/sigmoid/tanh and Dropout (mask); the logits for the loss; as PyTorch
  autograd saves them), per sample, times the micro-batch, times the number
  of micro-batches in flight. PopART's pipeline (``willow/src/transforms/
  pipeline.cpp``) stashes activations for ``2 * (IPUs to end) + 1`` micro-batches
  and restores them in place, except on the last IPU, which runs forward and
  backward back to back: stage ``s`` of ``S`` (0-based) holds ``2(S - s) - 1``
  copies, the last stage 1. With recomputation (``autoRecomputation`` =
  ``RecomputationType::Pipeline``) only the stage *input* is stashed,
  ``2(S - s) - 1`` times, plus one micro-batch's saved set while it is
  recomputed; the last stage is unchanged. Inference holds the peak of the tensors
  live at once during one micro-batch's forward;
- headroom: a fraction (default 25 %) of the IPU's memory is reserved for code,
  exchange buffers and temporaries (convolution partials, activation gradients
  in flight) which depend on Poplar's compilation. It is a planning assumption,
  not a measured figure: check a real profile with PopVision.

**Pipeline efficiency**: with G micro-batches per weight update and S stages,
fill and drain leave ``S - 1`` stage-slots idle per IPU for every G useful ones,
so efficiency = ``G / (G + S - 1)`` (GPipe's bubble; it also holds for PopART's
interleaved schedule once its forward-only ramp-up and backward-only ramp-down
cycles are weighted by their cost, 1/3 and 2/3 of a full cycle).

**Roofline**: a lower bound of the time of one weight update (inference: one
host batch) on one chip, ``max(FLOPs / peak, bytes / memory bandwidth)``, with
bytes = weights read by every micro-batch's forward and backward, the update's
weight, gradient and state traffic, and activations written and read twice
(values and gradients); plus, for the planned IPU pipeline,
``(G + S - 1) x`` the slowest stage's cycle (compute and IPU-Link exchange).
"""

from __future__ import annotations

import functools
import json
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from hal.errors import ConfigError
from hal.hardware import Device, all_devices, get_ipu
from hal.table import render
from hal.spec import DTYPE_BYTES, ModelSpec
from hal.training import SGD, Adam, AdamW, Optimizer

PRECISIONS = {"fp32": 4, "fp16": 2}
DEFAULT_HEADROOM = 0.25
TRAIN_FLOPS_FACTOR = 3
MIB = 2**20  # reports use MiB: Graphcore's "900 MB" IPU is 900 MiB

_SAVES_INPUT = {"Conv", "Dense", "BatchNorm", "MaxPool"}
_ACT_SAVES_INPUT = {"leaky_relu", "gelu", "silu"}  # relu, sigmoid, tanh backward read their output


# ---------------------------------------------------------------------------
# small pure functions
# ---------------------------------------------------------------------------


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def optimizer_state_tensors(optimizer: Optimizer) -> int:
    """fp32 state tensors per parameter: SGD 0 (1 with momentum), Adam/AdamW 2."""
    if isinstance(optimizer, Adam):  # AdamW is an Adam
        return 2
    if isinstance(optimizer, SGD):
        return 1 if optimizer.momentum > 0 else 0
    raise ConfigError(f"optimizer must be hal.training.SGD, Adam or AdamW, got {optimizer!r}")


def pipeline_efficiency(stages: int, grad_accum: int) -> float:
    """Fraction of pipeline time spent on useful work: ``G / (G + S - 1)``."""
    s, g = _positive_int(stages, "stages"), _positive_int(grad_accum, "grad_accum")
    return g / (g + s - 1)


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


def poptorch_min_grad_accum(stages: int) -> int:
    """PopTorch's lower bound on gradient accumulation when training an S-IPU pipeline: 2S - 1."""
    s = _positive_int(stages, "stages")
    return 2 * s - 1 if s > 1 else 1


def stash_copies(stage: int, stages: int) -> int:
    """Micro-batches of activations held by 0-based ``stage`` of a training pipeline: 2(S - s) - 1."""
    if not 0 <= stage < stages:
        raise ConfigError(f"stage must be in [0, {stages}), got {stage}")
    return 2 * (stages - stage) - 1


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
    training: bool = True, stages: int = 1,
) -> Batch:
    """Check the batch settings against PopTorch's rules and return the :class:`Batch`."""
    m = _positive_int(micro_batch, "micro_batch")
    d = _positive_int(device_iterations, "device_iterations")
    r = _positive_int(replicas, "replicas")
    g = _positive_int(grad_accum, "grad_accum")
    s = _positive_int(stages, "stages (IPUs per replica)")
    if training and s > 1 and g < 2 * s - 1:
        raise ConfigError(
            f"training a {s}-IPU pipeline needs grad_accum >= 2 x {s} - 1 = {2 * s - 1}, got {g}: PopTorch "
            f"runs {2 * s - 1} pipeline stages ({s} forward, {s - 1} backward) and requires "
            "Training.gradientAccumulation >= the number of pipeline stages"
        )
    if not training and g != 1:
        raise ConfigError(f"inference has no gradient accumulation (PopTorch requires 1), got grad_accum={g}")
    if not training and s > 1 and d < s:
        raise ConfigError(
            f"pipelined inference on {s} IPUs needs device_iterations >= {s} (PopTorch's rule), got {d}"
        )
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
        self.spec, self.info, self.w = spec, info, PRECISIONS[precision]
        item = DTYPE_BYTES[spec.dtype]
        index = {r.name: i for i, r in enumerate(info)}
        self.last = _last_use(spec)
        self.numel = [r.activation_bytes // item for r in info]
        n = len(info)
        self_saved, cons_saved = [False] * n, [False] * n
        for i, (r, node) in enumerate(zip(info, spec.nodes)):
            if r.kind in _SAVES_INPUT or (r.kind == "Activation" and node.op.fn in _ACT_SAVES_INPUT):  # type: ignore[attr-defined]
                for k in r.inputs:
                    cons_saved[index[k]] = True
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

    def memory(self, lo: int, hi: int, stage: int, stages: int, micro: int, grad_accum: int,
               states: int, training: bool, recompute: bool) -> StageMemory:
        p, b = self.params(lo, hi)
        weights = (p + b) * self.w
        if not training:
            return StageMemory(weights, 0, 0, self.peak_live_numel(lo, hi) * micro * self.w)
        gradients = p * self.w + (4 * p if grad_accum > 1 else 0)
        optimizer = 4 * states * p
        saved = self.saved_numel(lo, hi) * micro * self.w
        if recompute and stage < stages - 1:
            acts = stash_copies(stage, stages) * self.input_numel(lo) * micro * self.w + saved
        else:
            acts = stash_copies(stage, stages) * saved
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
    """One pipeline stage: its nodes (topological order) on IPU ``index``."""

    index: int
    nodes: tuple[str, ...]
    flops: int  # per micro-batch: 3 x forward in training, forward in inference
    share: float
    memory: StageMemory
    usable_bytes: int
    boundary_bytes: int  # the tensor this stage sends to the next, per micro-batch

    @property
    def first(self) -> str:
        return self.nodes[0]

    @property
    def last(self) -> str:
        return self.nodes[-1]

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_bytes

    @property
    def over_by(self) -> int:
        return max(0, self.memory.total - self.usable_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.index, "ipu": self.index, "first": self.first, "last": self.last,
            "num_nodes": len(self.nodes), "nodes": list(self.nodes), "flops_per_micro_batch": self.flops,
            "flop_share": self.share, "memory_bytes": self.memory.to_dict(), "usable_bytes": self.usable_bytes,
            "fits": self.fits, "over_by_bytes": self.over_by, "boundary_bytes": self.boundary_bytes,
        }


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
class Plan:
    """A checked IPU configuration for one spec; ``fits`` says whether every stage fits."""

    model: str
    spec_hash: str
    ipu: Device
    ipus_per_replica: int
    batch: Batch
    precision: str
    optimizer: str
    state_tensors: int
    recompute: bool
    headroom: float
    stages: tuple[Stage, ...]
    efficiency: float
    grad_accum_for_90: int
    roofline: tuple[Roofline, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def training(self) -> bool:
        return self.batch.training

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def boundaries(self) -> tuple[str, ...]:
        """The first node of every stage after the first: where ``BeginBlock`` goes."""
        return tuple(s.first for s in self.stages[1:])

    @property
    def usable_bytes(self) -> int:
        return self.stages[0].usable_bytes

    def stage_of(self, node: str) -> int:
        for s in self.stages:
            if node in s.nodes:
                return s.index
        raise ConfigError(f"node {node!r} is in no stage of the plan for {self.model!r}")

    def verdict(self) -> str:
        if self.fits:
            worst = max(self.stages, key=lambda s: s.memory.total)
            return (
                f"FITS: every IPU is within its usable {self.usable_bytes / MIB:,.0f} MiB "
                f"(largest: stage {worst.index}, {worst.memory.total / MIB:,.1f} MiB)."
            )
        bad = "; ".join(
            f"stage {s.index} ({s.first} .. {s.last}) needs {s.memory.total / MIB:,.1f} MiB, "
            f"{s.over_by / MIB:,.1f} MiB over"
            for s in self.stages if not s.fits
        )
        return f"DOES NOT FIT in {self.usable_bytes / MIB:,.0f} MiB usable per IPU: {bad}."

    def balance(self) -> tuple[float, float]:
        """(largest / smallest stage FLOPs, largest deviation from the mean stage as a fraction)."""
        flops = [s.flops for s in self.stages]
        mean = sum(flops) / len(flops)
        ratio = max(flops) / min(flops) if min(flops) else float("inf")
        return ratio, max(abs(f - mean) for f in flops) / mean if mean else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "spec_hash": self.spec_hash, "ipu": self.ipu.to_dict(),
            "ipus_per_replica": self.ipus_per_replica, "batch": self.batch.to_dict(), "precision": self.precision,
            "optimizer": self.optimizer, "optimizer_state_tensors": self.state_tensors,
            "recompute": self.recompute, "headroom": self.headroom, "fits": self.fits,
            "boundaries": list(self.boundaries), "stages": [s.to_dict() for s in self.stages],
            "pipeline_efficiency": self.efficiency, "grad_accum_for_90_percent": self.grad_accum_for_90,
            "roofline": [r.to_dict() for r in self.roofline], "notes": list(self.notes), "verdict": self.verdict(),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A plain-text report: configuration, stages, efficiency, roofline, verdict."""
        b, mode = self.batch, "training" if self.training else "inference"
        lines = [
            f"IPU plan: {self.model} on {self.ipus_per_replica} x {self.ipu.name} per replica, "
            f"{b.replicas} replica(s), {mode}, {self.precision}, {self.optimizer}"
            + (", pipeline recomputation" if self.recompute else ""),
            *_wrap(b.explain()),
            f"  IPU memory {self.ipu.memory_bytes / MIB:,.0f} MiB, {self.headroom:.0%} kept for code and exchange "
            f"-> {self.usable_bytes / MIB:,.0f} MiB usable per IPU.",
            "",
        ]
        head = ["stage", "nodes first .. last (count)", "GFLOP", "share", "weights", "grads", "optim",
                "activ.", "total MiB", "fits?"]
        rows = []
        for s in self.stages:
            m = s.memory
            rows.append([
                str(s.index), f"{s.first} .. {s.last} ({len(s.nodes)})", f"{s.flops / 1e9:,.2f}",
                f"{s.share:.1%}", f"{m.weights / MIB:,.1f}", f"{m.gradients / MIB:,.1f}",
                f"{m.optimizer / MIB:,.1f}", f"{m.activations / MIB:,.1f}", f"{m.total / MIB:,.1f}",
                "yes" if s.fits else f"NO, +{s.over_by / MIB:,.1f}",
            ])
        lines += render(head, rows, align="llrrrrrrrl").splitlines()
        what = "training (3 x forward)" if self.training else "forward"
        lines.append(f"  GFLOP: {what} per micro-batch of {b.micro_batch}; memory columns in MiB.")
        ratio, dev = self.balance()
        lines.append(f"  Balance: largest/smallest stage {ratio:.2f}, every stage within {dev:.1%} of the mean.")
        if self.training:
            g, s = b.grad_accum, len(self.stages)
            lines.append(
                f"  Pipeline efficiency G/(G+S-1) = {g}/({g}+{s}-1) = {self.efficiency:.1%}; "
                f"G >= {self.grad_accum_for_90} reaches 90%."
            )
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
        lines += [f"  note: {n}" for n in self.notes]
        lines += [""] + textwrap.wrap(self.verdict(), 100, subsequent_indent="  ")
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.4f}"


def _wrap(text: str, width: int = 100) -> list[str]:
    return textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="  ")


def _roofline(model: _Model, dev: Device, precision: str, batch: Batch, states: int) -> Roofline:
    info, w = model.info, model.w
    params = sum(r.params + r.buffers for r in info)
    acts = sum(model.numel) * w
    fwd = sum(r.flops for r in info)
    if batch.training:
        samples = batch.samples_per_update
        micro_batches = batch.grad_accum * batch.replicas
        flops = TRAIN_FLOPS_FACTOR * fwd * samples
        update = (2 + 1 + 2 * states) * 4 * params  # weights r/w, gradient r, state r/w
        nbytes = 2 * params * w * micro_batches + update + 4 * acts * samples
    else:
        samples = batch.host_batch
        flops = fwd * samples
        nbytes = params * w * batch.device_iterations * batch.replicas + 2 * acts * samples
    peak = dev.peak(precision)
    t_compute, t_memory = flops / peak, nbytes / dev.memory_bandwidth
    return Roofline(dev.key, dev.name, precision, peak, dev.memory_bandwidth, flops, nbytes,
                    max(t_compute, t_memory), "compute" if t_compute >= t_memory else "memory", samples)


def _pipeline_roofline(plan_stages: Sequence[Stage], dev: Device, precision: str, batch: Batch,
                       model: _Model, states: int) -> Roofline:
    """The planned IPU configuration: (G + S - 1) cycles of the slowest stage (inference: D + S - 1)."""
    peak, s = dev.peak(precision), len(plan_stages)
    link = dev.link_bandwidth or float("inf")
    cycle = 0.0
    for st in plan_stages:
        weights_traffic = st.memory.weights * (2 if batch.training else 1)
        compute = max(st.flops / peak, weights_traffic / dev.memory_bandwidth)
        exchange = (2 if batch.training else 1) * st.boundary_bytes / link if st.index < s - 1 else 0.0
        cycle = max(cycle, compute + exchange)
    n = batch.grad_accum if batch.training else batch.device_iterations
    seconds = (n + s - 1) * cycle
    samples = batch.samples_per_update if batch.training else batch.host_batch
    one = _roofline(model, dev, precision, batch, states)
    name = f"planned: {s} x {dev.key} pipeline x {batch.replicas} replica(s)"
    return Roofline(dev.key, name, precision, peak * s * batch.replicas, dev.memory_bandwidth * s * batch.replicas,
                    one.flops, one.bytes, seconds, "pipeline", samples)


def plan(
    spec: ModelSpec,
    ipu: str = "bow",
    ipus: int = 1,
    micro_batch: int = 1,
    replicas: int = 1,
    grad_accum: int | None = None,
    device_iterations: int | None = None,
    precision: str = "fp32",
    optimizer: Optimizer | None = None,
    recompute: bool = False,
    training: bool = True,
    headroom: float = DEFAULT_HEADROOM,
    efficiency: float | None = None,
    devices: Sequence[Device] | None = None,
) -> Plan:
    """Plan ``spec`` on ``ipus`` IPUs per replica of type ``ipu`` (``gc2``, ``gc200``, ``bow``).

    ``grad_accum=None`` picks the smallest value PopTorch accepts (``2S - 1`` for an
    S-IPU training pipeline, else 1), or, with ``efficiency``, the smallest accepted
    value reaching that pipeline efficiency. ``device_iterations=None`` is 1, or S for
    pipelined inference (PopTorch's minimum). ``devices`` are the roofline's
    comparison chips (default: the whole catalog and this CPU).
    """
    if not isinstance(spec, ModelSpec):
        raise ConfigError(f"plan expects a hal ModelSpec, got {type(spec).__name__}")
    dev = get_ipu(ipu)
    s = _positive_int(ipus, "ipus (IPUs per replica)")
    if precision not in PRECISIONS:
        raise ConfigError(f"IPU precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if not isinstance(headroom, (int, float)) or not 0.0 <= headroom < 1.0:
        raise ConfigError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
    optimizer = optimizer if optimizer is not None else SGD()
    states = optimizer_state_tensors(optimizer) if training else 0
    if efficiency is not None:
        if grad_accum is not None or not training:
            raise ConfigError("efficiency picks grad_accum for training: give either grad_accum or efficiency")
        grad_accum = max(poptorch_min_grad_accum(s), min_grad_accum_for(s, efficiency))
    elif grad_accum is None:
        grad_accum = poptorch_min_grad_accum(s) if training else 1
    if device_iterations is None:
        device_iterations = s if not training else 1
    batch = batch_arithmetic(micro_batch, device_iterations, replicas, grad_accum, training, s)

    model = _Model(spec, precision)
    cuts = cut_points(spec)
    if s - 1 > len(cuts):
        raise ConfigError(
            f"{spec.name!r} has only {len(cuts) + 1} possible pipeline stages (cuts where one tensor crosses), "
            f"{s} IPUs requested"
        )
    # blocks between consecutive candidate cuts; block b spans nodes [edges[b], edges[b+1])
    edges = [0] + [c + 1 for c in cuts] + [len(spec.nodes)]
    usable = int(dev.memory_bytes * (1.0 - headroom))
    factor = TRAIN_FLOPS_FACTOR if training else 1

    @functools.lru_cache(maxsize=None)
    def mem(stage: int, b0: int, b1: int) -> StageMemory:
        return model.memory(edges[b0], edges[b1], stage, s, batch.micro_batch, batch.grad_accum, states,
                            training, recompute)

    def flop_cost(stage: int, b0: int, b1: int) -> float:
        if mem(stage, b0, b1).total > usable:
            return float("inf")
        return float(model.flops(edges[b0], edges[b1]))

    def overflow_cost(stage: int, b0: int, b1: int) -> float:
        return mem(stage, b0, b1).total / usable

    starts = partition(len(edges) - 1, s, flop_cost) or partition(len(edges) - 1, s, overflow_cost)
    bounds = [*starts, len(edges) - 1]  # type: ignore[misc]  # overflow_cost is finite: a split always exists
    total = factor * model.flops(0, len(spec.nodes)) * batch.micro_batch
    stages = []
    for k in range(s):
        lo, hi = edges[bounds[k]], edges[bounds[k + 1]]
        flops = factor * model.flops(lo, hi) * batch.micro_batch
        stages.append(Stage(
            index=k,
            nodes=tuple(n.name for n in spec.nodes[lo:hi]),
            flops=flops,
            share=flops / total if total else 0.0,
            memory=mem(k, bounds[k], bounds[k + 1]),
            usable_bytes=usable,
            boundary_bytes=model.numel[hi - 1] * batch.micro_batch * model.w if k < s - 1 else 0,
        ))

    notes = []
    total_ipus = s * batch.replicas
    if total_ipus & (total_ipus - 1):
        notes.append(f"{total_ipus} IPUs is not a power of two: PopTorch rounds up with autoRoundNumIPUs(True)")
    if recompute and s == 1 and training:
        notes.append("recomputation here is pipeline recomputation: it has no effect on a single stage")
    if training and s > 1 and batch.grad_accum == poptorch_min_grad_accum(s):
        notes.append(f"grad_accum {batch.grad_accum} is PopTorch's minimum (2S - 1) for a {s}-IPU pipeline")
    dev_list = list(devices) if devices is not None else all_devices()
    roof = [_pipeline_roofline(stages, dev, precision, batch, model, states)]
    roof += [_roofline(model, d, precision, batch, states) for d in dev_list]
    return Plan(
        model=spec.name,
        spec_hash=spec.hash,
        ipu=dev,
        ipus_per_replica=s,
        batch=batch,
        precision=precision,
        optimizer=_optimizer_name(optimizer) if training else "none (inference)",
        state_tensors=states,
        recompute=recompute,
        headroom=float(headroom),
        stages=tuple(stages),
        efficiency=pipeline_efficiency(s, batch.grad_accum) if training else 1.0,
        grad_accum_for_90=max(poptorch_min_grad_accum(s), min_grad_accum_for(s, 0.9)),
        roofline=tuple(roof),
        notes=tuple(notes),
    )


def _optimizer_name(o: Optimizer) -> str:
    if isinstance(o, SGD):
        return f"SGD(momentum={o.momentum:g})" if o.momentum else "SGD"
    return "AdamW" if isinstance(o, AdamW) else "Adam"
