"""``hal migrate``: one report on moving a model from one stack to another.

The report answers what the GPU-to-IPU study behind hal asked, for any model and
targets: can the destination run it (**coverage**), what a user has to change and
how much framework code that is (**what changes**, **effort**), whether the
numbers still agree (**numerics**), how fast each stack is (**performance**) and
at what energy cost (**energy**). It reuses :func:`hal.parity.run_parity`,
:func:`hal.bench.run_bench` (each target in its own worker process) and
:func:`hal.ipu.plan`, and writes ``report.md``, ``report.json``, PNG plots and a
self-contained ``report.html`` (plots embedded).

Every figure in ``report.json`` is ``{"value", "unit", "kind", "source"}`` with
``kind`` ``"measured"`` (timed, counted or read from a counter here) or
``"estimate"`` (planner roofline bound, calibrated estimate, rated power x time).
``per_target`` holds what depends on the machine: a target that is not available
here has no measured figure there, only estimates. ``effort`` (code counted from
source files) is the same on any machine.

Effort is counted, not asserted (:func:`code_effort`): the non-blank code lines
and the distinct framework APIs (dotted names rooted at a framework import, e.g.
``torch.nn.Conv2d``) of the native baseline a user of that stack writes for this
model (``hal.native``, bench/native/: only the functions that run when it is built,
predicts and trains one step, found by :func:`trace_reached`, with their classes and
the imports and constants they name), of the SDK calls hal makes for an IPU target
(its backend module), and of the hal code that replaces them.

Performance: inference is timed (or estimated) at each of ``Settings.batches`` and
reported at the best one beside the latency at batch 1, the study's trade-off. IPU
inference estimates are the planner's roofline upper bound: hal calibrates training
only (:data:`NO_INFERENCE_CALIBRATION`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np

from hal import migrate_report
from hal.backend import Target
from hal.bench import NO_BASELINE
from hal.errors import ConfigError, HalError
from hal.spec import ModelSpec

MEASURED, ESTIMATE = "measured", "estimate"
IPU_GENERATIONS = ("gc2", "gc200", "bow")
DEFAULT_GPU = "a100-80gb"

# What differs numerically, per kind of device, and where it comes from.
KNOWN_DIFFERENCES: dict[str, tuple[str, ...]] = {
    "cpu": (
        "blocked, Winograd and oneDNN/XLA:CPU convolutions reorder float32 sums: rounding differences within "
        "the parity tolerance (hal.parity)",
    ),
    "gpu": (
        "TF32 on NVIDIA GPUs (Ampere and newer): PyTorch runs cuDNN convolutions in TF32 by default "
        "(torch.backends.cudnn.allow_tf32 = True), TensorFlow enables TF32 for convolutions and matmuls "
        "(tf.config.experimental.enable_tensor_float_32_execution), JAX's default matmul precision is not full "
        "float32 on GPUs: a 10-bit mantissa in the products, ~1e-3 relative error; hal's jax backend sets "
        "matmul_precision='highest' for parity",
        "non-deterministic cuDNN algorithms and atomics reorder sums from run to run",
    ),
    "ipu": (
        "fp16 partials: IPU convolutions and matmuls accumulate in fp16 when partials are half "
        "(PopTorch Precision.setPartialsType(torch.half), IPU TensorFlow partialsType), ~1e-3 relative error",
        "stochastic rounding of fp16 weight updates on IPU hardware (PopTorch enableStochasticRounding, "
        "IPU TensorFlow floating_point_behaviour.esr): results differ from run to run",
        "BatchNorm statistics per micro-batch, not per host batch: with a micro-batch smaller than the GPU's "
        "batch, or gradient accumulation, training-mode normalisation uses fewer samples",
        "16.16: fp16 weights without an fp32 master copy (PopTorch model.half()); static loss scaling",
    ),
}
# what a Graphcore precision ("<compute>.<master weights>") changes against fp32
IPU_PRECISION_CHANGES = {
    "16.16": "fp16 activations, gradients and weights (no fp32 master copy), static loss scaling, stochastic "
             "rounding (Graphcore's ResNet50 setting); partials fp32 unless the plan has half partials",
    "16.32": "fp16 activations and gradients on fp32 master weights, static loss scaling; partials fp32 unless "
             "the plan has half partials",
    "fp16": "fp16 weights and activations (PopTorch model.half()), loss scaling",
}

# What a user of each stack writes around the model, beyond the model itself.
STACK_CHANGES: dict[str, tuple[str, ...]] = {
    "torch": ("an nn.Module, an eval loop under torch.inference_mode() and a training loop with "
              "optimizer.zero_grad / loss.backward / optimizer.step",),
    "jax": ("a Flax module with explicit state: parameters and BatchNorm statistics are pytrees passed in "
            "and out (mutable=['batch_stats']), an Optax optimizer and a jax.jit-compiled step",
            "NHWC layout inside Flax; Flax BatchNorm momentum is 1 - PyTorch's (0.9 vs 0.1)",),
    "tensorflow": ("a Keras model (NHWC), model.compile / fit or a tf.function step; Keras BatchNorm defaults "
                   "differ from PyTorch's (epsilon 1e-3 vs 1e-5, momentum 0.99 vs 0.1)",),
    "onnxruntime": ("an exported ONNX graph and an InferenceSession: inference only",),
}
IPU_CHANGES: dict[str, tuple[str, ...]] = {
    "poptorch": (
        "the loss moves inside forward: poptorch.trainingModel runs model(x, y) and returns (output, loss)",
        "static shapes: every host batch has the same size, poptorch.DataLoader drops the last partial batch",
        "options (poptorch.Options): deviceIterations, replicationFactor, Training.gradientAccumulation",
    ),
    "tensorflow": (
        "an IPUConfig configured and applied, the model built under IPUStrategy().scope()",
        "static shapes: the tf.data pipeline batches with drop_remainder=True",
        "Keras pipelining: set_pipeline_stage_assignment and set_pipelining_options"
        "(gradient_accumulation_steps_per_replica=...), steps_per_execution for device iterations",
    ),
}
# SDK code hal writes for an IPU target: the backend module and the names bound to the SDK there.
IPU_SDK_CODE: dict[str, tuple[str, dict[str, str]]] = {
    "poptorch": ("hal.backends.poptorch", {"poptorch": "poptorch"}),
    "tensorflow": ("hal.backends.ipu_tensorflow", {"ipu": "tensorflow.python.ipu"}),
}
# Why an IPU inference figure is a bound: hal.ipu.expected_throughput calibrates training plans only.
NO_INFERENCE_CALIBRATION = (
    "no calibrated estimate: hal calibrates IPU training on Graphcore's published ResNet50 figures "
    "(hal.ipu.CALIBRATION) and carries no published IPU inference figure to calibrate against")
FRAMEWORK_MODULES = ("torch", "torchvision", "jax", "flax", "optax", "tensorflow", "keras", "poptorch", "onnxruntime")


def figure(value: float | None, unit: str, kind: str, source: str) -> dict[str, Any]:
    """One labelled figure of the report (``kind``: ``measured`` or ``estimate``)."""
    if kind not in (MEASURED, ESTIMATE):
        raise ValueError(f"a figure is measured or estimate, not {kind!r}")
    return {"value": value, "unit": unit, "kind": kind, "source": source}


# ---------------------------------------------------------------------------
# effort: framework code, counted
# ---------------------------------------------------------------------------


def code_effort(source: str, aliases: Mapping[str, str] | None = None,
                reached: Collection[int] | None = None) -> dict[str, Any]:
    """Non-blank code lines (docstrings and comments excluded) and the distinct framework
    APIs of Python ``source``: the longest dotted names rooted at a name bound to a
    framework module (``import torch.nn as nn``; ``from torch import nn``) or at one of
    ``aliases`` (name -> module, for modules bound at run time).

    With ``reached`` (the first lines of the functions that ran, :func:`trace_reached`),
    only the code for that run is counted (:func:`_reached_parts`); else the whole module."""
    tree = ast.parse(source)
    bound = dict(aliases or {})
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FRAMEWORK_MODULES:
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FRAMEWORK_MODULES:
            for a in node.names:
                bound[a.asname or a.name] = f"{node.module}.{a.name}"
    nodes, kept = (_reached_parts(tree, reached) if reached is not None
                   else ([tree], set(range(1, len(source.splitlines()) + 1))))
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    apis = set()
    for node in (n for part in nodes for n in ast.walk(part)):
        if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in inner:
            parts = []
            while isinstance(node, ast.Attribute):
                parts.append(node.attr)
                node = node.value
            if isinstance(node, ast.Name) and node.id in bound and not isinstance(node.ctx, ast.Store):
                apis.add(".".join([bound[node.id], *reversed(parts)]))
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = [i for i, text in enumerate(source.splitlines(), 1)
             if i in kept and text.strip() and not text.strip().startswith("#") and i not in docstrings]
    return {"lines": len(lines), "apis": sorted(apis)}


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)
_BINDINGS = (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign)


def _first_line(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int:
    """A definition's first line, as its code object's ``co_firstlineno`` (the first decorator's)."""
    return min([d.lineno for d in node.decorator_list] + [node.lineno])


def _span(node: ast.AST) -> set[int]:
    return set(range(_first_line(node) if isinstance(node, (*_DEFS, ast.ClassDef)) else node.lineno,
                     node.end_lineno + 1))


def _reached_parts(tree: ast.Module, reached: Collection[int]) -> tuple[list[ast.AST], set[int]]:
    """The parts of a module one run needs, as ``(nodes, their lines)``: the top-level functions
    and methods whose first line is in ``reached`` (nested functions count with the function
    that defines them), the header and non-function statements of the classes of those methods,
    and the module-level imports and assignments that these parts name, transitively."""
    nodes: list[ast.AST] = []
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, _DEFS) and _first_line(node) in reached:
            nodes.append(node)
            lines |= _span(node)
        elif isinstance(node, ast.ClassDef):
            methods = [n for n in node.body if isinstance(n, _DEFS) and _first_line(n) in reached]
            if methods:
                body = [n for n in node.body if not isinstance(n, _DEFS)]
                nodes += [*node.decorator_list, *node.bases, *node.keywords, *body, *methods]
                lines |= set(range(_first_line(node), node.body[0].lineno))  # decorators and the class line
                lines |= set().union(*map(_span, body + methods))
    bindings = [n for n in tree.body if isinstance(n, _BINDINGS)]
    while True:
        used = {n.id for part in nodes for n in ast.walk(part) if isinstance(n, ast.Name)}
        new = [b for b in bindings if b not in nodes and _bound_names(b) & used]
        if not new:
            return nodes, lines
        nodes += new
        lines |= set().union(*map(_span, new))


def _bound_names(node: ast.AST) -> set[str]:
    """The names a module-level import or assignment binds."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {a.asname or a.name.split(".")[0] for a in node.names}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def trace_reached(path: str | os.PathLike, run: Callable[[], Any]) -> set[int]:
    """The first lines of the functions defined in file ``path`` whose code runs during ``run()``
    (Python's trace hook on function calls, this thread only)."""
    path = os.fspath(path)
    first: set[int] = set()

    def on_call(frame: Any, event: str, arg: Any) -> None:
        if frame.f_code.co_filename == path:
            first.add(frame.f_code.co_firstlineno)

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        run()
    finally:
        sys.settrace(previous)
    return first


def _module_source(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin).read_text(encoding="utf-8") if spec and spec.origin else None


def _native_run(framework: str, spec: ModelSpec) -> tuple[str, list[int]]:
    """Run in a worker (it imports the framework): the bench note of ``spec``'s native baseline
    on ``framework`` and the first lines of the functions of its module that run to build it,
    predict a batch and take one training step (none without a baseline)."""
    from hal.bench import load_native
    from hal.native import MODULES
    from hal.parity import make_batch

    box: dict[str, str] = {}

    def build_and_run() -> None:
        native, box["note"] = load_native(framework, spec, "cpu")
        if native is not None:
            x, y = make_batch(spec, 2, "cross_entropy", seed=0)
            native.predict(x)
            native.train_step(x, y)

    reached = trace_reached(importlib.import_module(MODULES[framework]).__file__, build_and_run)
    return box["note"], [] if box["note"].startswith(NO_BASELINE) else sorted(reached)


def _native_baseline(framework: str, spec: ModelSpec) -> tuple[str, list[int]]:
    """:func:`_native_run` in a worker process; a failure is the note (no baseline)."""
    from hal.worker import run_isolated

    try:
        return run_isolated(_native_run, framework, spec, label=f"native {framework} baseline")
    except HalError as exc:
        return f"{NO_BASELINE}: {exc}", []


def hal_snippet(model: str, target: str, training: bool = True) -> str:
    """The hal code that replaces a stack's native code for ``model`` on ``target``."""
    lines = ["import hal", "from hal.models import get", "", f"spec = get({model!r})",
             f"exe = hal.compile(spec, {target!r}, config=hal.TrainConfig(optimizer=hal.SGD(lr=0.01, momentum=0.9)))"]
    lines += ["loss = exe.train_step(x, y)"] if training else []
    lines += ["logits = exe.predict(x)"]
    return "\n".join(lines) + "\n"


def effort(spec: ModelSpec, target: Target, kind: str) -> dict[str, Any]:
    """The code a user writes for ``spec`` on ``target``: natively, and with hal (counted)."""
    from hal.native import MODULES

    out: dict[str, Any] = {}
    framework = "torch" if target.backend == "poptorch" else target.backend
    module = MODULES.get(framework)
    note, reached = (_native_baseline(framework, spec) if module
                     else (f"no native module for {framework} in hal.native", []))
    source = _module_source(module) if reached else None
    if source is not None:
        counted = code_effort(source, reached=reached)
        where = f"the code of {module} that builds, runs and trains {spec.name}"
        out["native"] = {
            "what": f"{where} (bench/native/: the functions reached from its build, their classes, the imports "
                    f"and constants they use), {note}",
            "lines": figure(counted["lines"], "lines", MEASURED, f"counted in {where}"),
            "framework_apis": figure(len(counted["apis"]), "APIs", MEASURED, f"distinct framework APIs in {where}"),
            "apis": counted["apis"],
        }
    else:
        out["native"] = {"what": note}
    if kind == "ipu" and target.backend in IPU_SDK_CODE:
        backend_module, aliases = IPU_SDK_CODE[target.backend]
        counted = code_effort(_module_source(backend_module) or "", aliases)
        sdk = [a for a in counted["apis"] if a.split(".")[0] in ("poptorch", "tensorflow")]
        out["ipu_sdk"] = {
            "what": f"the IPU SDK calls hal makes for you ({backend_module}), added to the native code",
            "framework_apis": figure(len(sdk), "APIs", MEASURED, f"distinct SDK APIs called in {backend_module}"),
            "apis": sdk,
        }
    snippet = hal_snippet(spec.name, str(target))
    counted = code_effort(snippet)
    out["hal"] = {"what": "the hal code for the same model and target", "code": snippet,
                  "lines": figure(counted["lines"], "lines", MEASURED, "counted in the snippet"),
                  "framework_apis": figure(len(counted["apis"]), "APIs", MEASURED, "framework APIs in the snippet")}
    return out


# ---------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------


def device_kind(target: Target) -> str:
    """``ipu``, ``gpu`` or ``cpu`` for a target."""
    if target.backend == "poptorch" or target.device.startswith("ipu"):
        return "ipu"
    return "gpu" if target.device.split(":")[0] in ("cuda", "gpu") else "cpu"


def _resolve(target: str) -> str:
    """The target with its device resolved (run in a worker: it may load the framework)."""
    from hal.registry import resolve

    return str(resolve(target)[1])


def availability(target: str) -> tuple[str | None, str]:
    """``(resolved target, "")`` if ``target`` runs here, else ``(None, why not)``."""
    from hal.parity import available_backend
    from hal.worker import run_isolated

    try:
        available_backend(target)
        return run_isolated(_resolve, target, label=target), ""
    except HalError as exc:
        return None, str(exc)


def _capabilities(target: Target) -> dict[str, Any]:
    from hal.registry import get_backend

    try:
        caps = get_backend(target.backend).capabilities()
    except HalError as exc:
        return {"error": str(exc)}
    return {"training": caps.training, "precisions": list(caps.precisions), "pipelining": caps.pipelining,
            "replication": caps.replication}


def coverage(spec: ModelSpec, target: Target) -> dict[str, Any]:
    """Nodes the target's backend cannot run (with reasons) and its capabilities."""
    from hal.registry import get_backend

    try:
        unsupported = get_backend(target.backend).unsupported(spec)
    except HalError as exc:
        unsupported = {"backend": str(exc)}
    out = {"unsupported": unsupported, "capabilities": _capabilities(target)}
    if device_kind(target) == "ipu":
        out["batchnorm"] = "statistics per micro-batch (replicas keep their own running statistics)"
    return out


# ---------------------------------------------------------------------------
# settings and the report
# ---------------------------------------------------------------------------


@dataclass
class Settings:
    """What the report measures and plans; defaults sized for a 2-core CPU. ``batch``: the
    training batch; ``batches``: the inference batches timed (or estimated), the best one (highest
    samples/s) set beside the latency at batch 1; ``micro_batch``: the IPU training plan's."""

    batch: int = 8
    batches: tuple[int, ...] = (1, 4, 16)
    repeats: int = 3
    warmup: int = 1
    parity_batch: int = 2
    ipu: str = "bow"
    micro_batch: int = 4
    ipu_precision: str = "16.16"
    gpu: str = DEFAULT_GPU
    watts: dict[str, float] = field(default_factory=dict)
    modes: tuple[str, ...] = ("inference", "training")


@dataclass
class MigrationReport:
    """The report's data (``data``: what ``report.json`` holds) and its writers."""

    data: dict[str, Any]
    plots: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the terminal."""
        d = self.data
        out = [f"hal migrate {d['model']}: {' -> '.join(d['targets'])}"]
        for name, t in d["per_target"].items():
            perf = t["performance"].get("inference", {})
            sps, lat = perf.get("samples_per_s"), perf.get("latency_b1_ms")
            energy = t["energy"].get("inference", {}).get("joules_per_sample")
            bits = [f"{name}: {'available' if t['available'] else 'not here'}",
                    f"unsupported nodes {len(t['coverage']['unsupported'])}"]
            if sps and sps["value"] is not None:
                bits.append(f"inference {sps['value']:,.1f} samples/s at batch {perf['batch']} ({_label(sps)})")
            if lat and lat["value"] is not None:
                bits.append(f"batch-1 latency {lat['value']:.3g} ms ({_label(lat)})")
            if energy and energy["value"] is not None:
                bits.append(f"{energy['value']:.3g} J/sample ({energy['kind']})")
            out.append("  " + ", ".join(bits))
        pair = d["numerics"].get("pair")
        if pair:
            out.append(f"  parity {pair['targets'][0]} vs {pair['targets'][1]}: forward max rel err "
                       f"{pair['forward']['value']:.1e} (tolerance {pair['tolerance']:.1e}) "
                       f"{'PASS' if pair['passed'] else 'FAIL'}")
        return "\n".join(out)

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """``report.json``, ``report.md``, ``report.html`` and the plots under ``out_dir``."""
        from hal.bench import check_writable
        from hal.weights import atomic_write

        out = check_writable(out_dir)
        self.plots = migrate_report.plots(self.data, out)
        self.data["plots"] = {k: p.name for k, p in self.plots.items()}
        blocks = migrate_report.blocks(self.data)
        paths = [out / "report.json", out / "report.md", out / "report.html"]
        atomic_write(paths[0], json.dumps(self.data, indent=2, default=_json_default).encode())
        atomic_write(paths[1], migrate_report.markdown(blocks, {p.name for p in self.plots.values()}).encode())
        atomic_write(paths[2], migrate_report.html_page(blocks, out, f"hal migrate {self.data['model']}").encode())
        return paths + list(self.plots.values())


def _label(fig: dict[str, Any]) -> str:
    """A figure's kind, and that it is a bound when it is one."""
    return f"{fig['kind']}, {fig['source'].split(' (')[0]}" if "bound" in fig["source"] else fig["kind"]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def run_migrate(
    spec: ModelSpec,
    targets: Sequence[str],
    settings: Settings | None = None,
    weights: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
) -> MigrationReport:
    """The migration report of ``spec`` across ``targets`` (the first is the source, the
    second the destination; ``hal compare --report`` passes every available target).

    Targets available here are measured (parity against the float64 reference and
    against each other, bench in worker processes, energy where a counter can be read);
    the others get the planner's estimates. A target that fails is reported, not raised.
    """
    from hal.parity import check_common, check_int, check_names

    check_common("migrate", spec, None)
    targets = check_names("migrate", "targets", targets)
    if len(set(targets)) != len(targets):
        raise ConfigError(f"migrate: a target is given twice in {targets}")
    settings = settings or Settings()
    check_int("migrate", "batch", settings.batch, 1)
    if isinstance(settings.batches, str) or not isinstance(settings.batches, Sequence) or not settings.batches:
        raise ConfigError(f"migrate: batches must be a non-empty list of batch sizes, got {settings.batches!r}")
    for b in settings.batches:
        check_int("migrate", "batches", b, 1)
    if len(set(settings.batches)) != len(settings.batches):
        raise ConfigError(f"migrate: a batch size is given twice in batches {list(settings.batches)}")
    say = progress or (lambda _msg: None)
    parsed = [Target.parse(t) for t in targets]
    data: dict[str, Any] = {
        "model": spec.name, "spec_hash": spec.hash, "input_shape": list(spec.input_shape),
        "num_params": spec.num_params, "targets": [str(t) for t in parsed],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "settings": _settings_dict(settings), "per_target": {},
        "effort": {},  # about code, not machines: counted for every target
    }
    here: list[str] = []  # the available targets, devices resolved (``numpy`` -> ``numpy:cpu``)
    for i, t in enumerate(parsed):
        say(f"{t}: availability")
        resolved, reason = availability(str(t))
        if resolved is not None:
            t = parsed[i] = Target.parse(resolved)
            here.append(resolved)
        kind = device_kind(t)
        data["per_target"][str(t)] = {
            "available": resolved is not None, "resolved": resolved, "reason": reason, "device_kind": kind,
            "coverage": coverage(spec, t), "changes": changes(spec, t, kind, settings), "performance": {},
            "energy": {},
        }
        data["effort"][str(t)] = effort(spec, t, kind)
    data["targets"] = [str(t) for t in parsed]
    data["numerics"] = numerics(spec, here, settings, weights, say)
    data["numerics"]["known_differences"] = {
        k: list(KNOWN_DIFFERENCES[k]) for k in dict.fromkeys(t["device_kind"] for t in data["per_target"].values())}
    measured = measure(spec, here, settings, say)
    data["env"] = measured.pop("env", {})
    for name, t in data["per_target"].items():
        if name in here:
            t["performance"], t["energy"] = measured.get(name, ({}, {}))
        else:
            say(f"{name}: planner estimates")
            t["performance"], t["energy"], plan_dict = estimate_target(spec, Target.parse(name), t["device_kind"],
                                                                       settings)
            if plan_dict is not None:
                t["plan"] = plan_dict
    if any(t["device_kind"] == "ipu" for t in data["per_target"].values()):
        say("IPU sweeps: gradient accumulation, pipeline stages, generations")
        data["ipu_sweeps"] = ipu_sweeps(spec, settings, _ipu_framework(parsed))
    return MigrationReport(data)


def _settings_dict(s: Settings) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.__dict__.items()}


def _ipu_framework(targets: Sequence[Target]) -> str:
    ipu = [t.backend for t in targets if device_kind(t) == "ipu"]
    return "tensorflow" if ipu and ipu[0] == "tensorflow" else "poptorch"


def changes(spec: ModelSpec, target: Target, kind: str, settings: Settings) -> list[str]:
    """What a user of ``target`` writes or changes, concretely, for this model."""
    framework = "torch" if target.backend == "poptorch" else target.backend
    out = list(STACK_CHANGES.get(framework, (f"{framework}: see its backend module",)))
    if kind == "gpu":
        out.append("the model and every batch moved to the GPU; mixed precision needs torch.autocast and a "
                   "GradScaler (PyTorch), a mixed_float16 policy and LossScaleOptimizer (Keras)")
    if kind != "ipu":
        return out
    out += IPU_CHANGES["poptorch" if target.backend == "poptorch" else "tensorflow"]
    try:
        p = _ipu_plan(spec, settings, settings.ipu, training=True, framework=_ipu_framework([target]))
    except HalError as exc:
        return out + [f"no IPU plan: {exc}"]
    b = p.batch
    out.append(f"batch arithmetic: {b.explain()}")
    out.append(f"precision {p.precision}: " + (IPU_PRECISION_CHANGES.get(p.precision, "fp32 throughout")))
    if p.ipus_per_replica > 1:
        where = ", ".join(p.boundaries)
        out.append(f"pipeline split over {p.ipus_per_replica} IPUs: stages begin at {where} "
                   f"(poptorch.BeginBlock / Keras pipeline stage assignment); gradient accumulation "
                   f"{b.grad_accum} >= the pipeline's minimum, efficiency {p.efficiency:.0%}")
    else:
        out.append("the model fits one IPU: no pipeline split")
    return out


def _ipu_plan(spec: ModelSpec, settings: Settings, ipu: str, training: bool, framework: str = "poptorch",
              ipus: int | None = None, micro_batch: int | None = None, **kw: Any) -> Any:
    """The smallest IPU plan that fits (1, 2, 4, 8 IPUs per replica), or the given ``ipus``."""
    from hal.hardware import get_device
    from hal.ipu import plan

    base = dict(ipu=ipu, micro_batch=micro_batch or settings.micro_batch, precision=settings.ipu_precision,
                training=training, devices=[get_device(settings.gpu)], framework=framework, **kw)
    if ipus is not None:
        return plan(spec, ipus=ipus, **base)
    last = None
    for n in (1, 2, 4, 8):
        try:
            last = plan(spec, ipus=n, **base)
        except ConfigError:  # fewer possible stages than IPUs
            break
        if last.fits:
            return last
    if last is None:
        raise ConfigError(f"no IPU plan for {spec.name!r} on {ipu}")
    return last


def _expected(p: Any) -> tuple[float | None, str]:
    """The planner's calibrated expected throughput of a plan (training plans have one)."""
    est = p.expected
    if est is None:
        return None, NO_INFERENCE_CALIBRATION
    return float(est.samples_per_second), f"calibrated estimate: {est.basis}; {est.calibration}"


# ---------------------------------------------------------------------------
# numerics, measurements, estimates
# ---------------------------------------------------------------------------


def _forward(spec: ModelSpec, target: str, weights: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Inference forward of ``x`` on ``target`` (run in a worker)."""
    from hal.registry import compile

    return compile(spec, target, dict(weights)).predict(x)


def numerics(spec: ModelSpec, targets: Sequence[str], settings: Settings,
             weights: Mapping[str, np.ndarray] | None, say: Callable[[str], None]) -> dict[str, Any]:
    """Each available target against the float64 reference (forward, training-mode forward,
    gradients) and, with two or more, the first two against each other (forward)."""
    from hal.parity import PARITY_RESIDUAL_GAMMA, make_batch, normalised_error, run_parity, tolerance
    from hal.weights import init_weights
    from hal.worker import run_isolated

    if not targets:
        return {"per_target": {}, "pair": None, "note": "no target runs here: nothing measured"}
    w = dict(weights) if weights is not None else init_weights(spec, 0, PARITY_RESIDUAL_GAMMA)
    report = run_parity(spec, list(targets), batch=settings.parity_batch,
                        checks=("forward", "forward_train", "grads"), weights=w, progress=say)
    per: dict[str, dict[str, Any]] = {}
    for r in report.results:
        ref = "float64 autodiff (torch:cpu)" if r.check == "grads" else "the float64 numpy reference"
        per.setdefault(r.target, {})[r.check] = {
            "error": None if r.max_rel is None else figure(r.max_rel, "normalised max error", MEASURED, f"vs {ref}"),
            "tolerance": r.tol, "status": r.status, "note": r.note}
    out: dict[str, Any] = {"per_target": per, "floor": report.floor, "batch": settings.parity_batch, "pair": None}
    if len(targets) >= 2 and "forward" in report.floor:
        a, b = targets[:2]
        say(f"parity {a} vs {b}: forward")
        x, _ = make_batch(spec, settings.parity_batch, "cross_entropy", seed=0)
        try:
            ya, yb = (run_isolated(_forward, spec, t, w, x, label=t) for t in (a, b))
        except HalError as exc:
            out["pair"] = {"targets": [a, b], "error": str(exc)}
            return out
        err = normalised_error(ya, yb)[1]
        tol = 2 * tolerance(report.floor["forward"])  # each within its tolerance of the reference
        out["pair"] = {"targets": [a, b], "passed": err <= tol, "tolerance": tol,
                       "forward": figure(err, "normalised max error", MEASURED, f"{a} vs {b}, same weights and batch")}
    return out


def measure(spec: ModelSpec, targets: Sequence[str], settings: Settings,
            say: Callable[[str], None]) -> dict[str, Any]:
    """Per available target, ``(performance, energy)`` measured with :func:`hal.bench.run_bench`:
    training at ``settings.batch``; inference at each of ``settings.batches``, the best batch
    (highest samples/s) giving the target's inference figures and the latency at batch 1 beside
    them. Energy is estimated from rated power where no counter can be read. ``"env"``: the
    bench's environment, with the load average before the first run and after the last."""
    from hal.bench import run_bench

    if not targets:
        return {}
    runs = ([("inference", b) for b in settings.batches] if "inference" in settings.modes else []) + (
        [("training", settings.batch)] if "training" in settings.modes else [])
    rows: dict[str, dict[str, list[tuple[Any, dict[str, Any]]]]] = {}
    env: dict[str, Any] = {}
    for mode, batch in runs:
        say(f"bench: {mode}, batch {batch}")
        report = run_bench(spec, list(targets), batch=batch, repeats=settings.repeats, warmup=settings.warmup,
                           modes=(mode,), native=False, progress=say)
        env = {**report.env, "load_avg_start": env.get("load_avg_start", report.env.get("load_avg_start"))}
        for row in report.rows:
            rows.setdefault(row.target, {}).setdefault(mode, []).append((row, report.env))
    out: dict[str, Any] = {"env": env}
    for target, by_mode in rows.items():
        perf, energy = out[target] = ({}, {})
        for mode, runs_of_mode in by_mode.items():
            measured = [_measured(row, settings, row_env) for row, row_env in runs_of_mode]
            ok = [m for m in measured if "error" not in m[0]]
            if not ok:
                perf[mode] = {"error": "; ".join(p["error"] for p, _ in measured)}
                continue
            perf[mode], energy[mode] = max(ok, key=lambda m: m[0]["samples_per_s"]["value"])
            if mode == "inference":
                perf[mode]["sweep"] = [{"batch": b, "error": p["error"]} if "error" in p
                                       else {"batch": b, "samples_per_s": p["samples_per_s"]}
                                       for b, (p, _) in zip(settings.batches, measured)]
                latency = next(row.hal.latency_b1_ms for row, _ in runs_of_mode if row.hal)  # timed in every run
                if latency is not None:
                    perf[mode]["latency_b1_ms"] = figure(latency, "ms", MEASURED, "hal.bench, batch 1, median")
    return out


def _measured(row: Any, settings: Settings, env: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One bench row as ``(performance, energy)`` figures (``{"error": ...}`` where it failed)."""
    from hal.energy import board_power, cpu_power, estimate

    m = row.hal
    if m is None:
        return {"error": row.note}, {}
    src = f"hal.bench, batch {m.batch}, median of {settings.repeats}"
    perf = {"batch": m.batch, "samples_per_s": figure(m.samples_per_s, "samples/s", MEASURED, src),
            "first_call_s": figure(m.first_call_s, "s", MEASURED, "compile and first call")}
    if m.joules_per_sample is not None:
        jps, kind, source = m.joules_per_sample, MEASURED, m.energy_note
    else:
        try:
            watts, why = (board_power(settings.gpu, settings.watts) if device_kind(Target.parse(row.target)) == "gpu"
                          else cpu_power(env["machine"]))
        except HalError as exc:
            return perf, {"error": f"{m.energy_note}; no estimate: {exc}"}
        e = estimate(watts, m.median_s, m.batch, why)
        jps, kind, source = e.joules_per_sample, ESTIMATE, f"{e.source}; not measured: {m.energy_note}"
    return perf, {"joules_per_sample": figure(jps, "J/sample", kind, source),
                  "samples_per_joule": figure(1 / jps if jps else None, "samples/J", kind, source)}


@dataclass(frozen=True)
class _Point:
    """One estimated configuration: its batch (the micro-batch on IPUs), expected samples/s and
    why, its roofline bound, the chips it uses and whether it fits their memory."""

    batch: int
    samples_per_s: float
    basis: str
    bound: float
    bound_name: str
    chips: int
    fits: bool = True


def _rank(p: _Point) -> tuple[float, int]:
    """Highest samples/s first; on a tie the smaller batch (the same throughput, lower latency)."""
    return p.samples_per_s, -p.batch


def _ipu_point(p: Any) -> _Point:
    """An IPU plan as a point: the calibrated estimate where the planner has one (training),
    else the roofline bound, labelled an upper bound."""
    sps, basis = _expected(p)
    bound = p.roofline[0].samples_per_second
    if sps is None:
        sps, basis = bound, f"roofline upper bound ({p.roofline[0].name}): {basis}"
    return _Point(p.batch.micro_batch, sps, basis, bound, p.roofline[0].name,
                  p.ipus_per_replica * p.batch.replicas, p.fits)


def estimate_target(spec: ModelSpec, target: Target, kind: str,
                    settings: Settings) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Performance and energy estimates of a target that is not available here, and its IPU
    plan: training at the report's batch (the micro-batch on IPUs), inference at each of
    ``settings.batches`` (best: the highest estimate that fits, the smaller batch on a tie),
    latency at batch 1."""
    from hal.energy import board_power
    from hal.hardware import get_device

    batches = {"training": (settings.micro_batch if kind == "ipu" else settings.batch,),
               "inference": settings.batches}
    points: dict[str, list[_Point]] = {}
    plan_dict = None
    if kind == "ipu":
        framework = _ipu_framework([target])
        try:
            plans = {mode: [_ipu_plan(spec, settings, settings.ipu, mode == "training", framework, micro_batch=b)
                            for b in batches[mode]] for mode in settings.modes}
            one = _ipu_plan(spec, settings, settings.ipu, False, framework, micro_batch=1)
        except HalError as exc:
            return {"error": str(exc)}, {"error": str(exc)}, None
        plan_dict = (plans.get("training") or plans[settings.modes[0]])[0].to_dict()
        points = {mode: [_ipu_point(p) for p in ps] for mode, ps in plans.items()}
        device_key, latency = settings.ipu, one.roofline[0].seconds * 1e3
        where = f"{one.ipus_per_replica} x {get_device(settings.ipu).name}"
    else:
        dev = get_device(settings.gpu) if kind == "gpu" else get_device("cpu")
        for mode in settings.modes:
            for b in batches[mode]:
                r = _device_roofline(spec, dev, mode == "training", b)
                name = f"{dev.name}, batch {b}, fp32 peak"
                points.setdefault(mode, []).append(
                    _Point(b, r.samples_per_second, f"roofline upper bound ({name}): no calibrated estimate for "
                           "this device", r.samples_per_second, name, 1))
        device_key, latency = dev.key, _device_roofline(spec, dev, False, 1).seconds * 1e3
        where = dev.name
    perf: dict[str, Any] = {}
    energy: dict[str, Any] = {}
    for mode, pts in points.items():
        best = max((p for p in pts if p.fits), default=None, key=_rank) or max(pts, key=_rank)
        perf[mode] = {"batch": best.batch, "fits": best.fits,
                      "samples_per_s": figure(best.samples_per_s, "samples/s", ESTIMATE, best.basis),
                      "roofline_bound": figure(best.bound, "samples/s", ESTIMATE, best.bound_name)}
        if mode == "inference":
            perf[mode]["sweep"] = [{"batch": p.batch, "fits": p.fits,
                                    "samples_per_s": figure(p.samples_per_s, "samples/s", ESTIMATE, p.basis)}
                                   for p in pts]
            perf[mode]["latency_b1_ms"] = figure(latency, "ms", ESTIMATE, f"roofline lower bound of one sample on "
                                                                          f"{where}")
        try:
            watts, why = board_power(device_key, settings.watts)
        except HalError as exc:
            energy[mode] = {"error": f"not measured (not available here); no estimate: {exc}"}
            continue
        watts *= best.chips
        jps = watts / best.samples_per_s
        source = (f"estimate: {watts:.0f} W ({best.chips} chip(s), {why}) / estimated samples/s at batch "
                  f"{best.batch}; not available here")
        energy[mode] = {"joules_per_sample": figure(jps, "J/sample", ESTIMATE, source),
                        "samples_per_joule": figure(1 / jps, "samples/J", ESTIMATE, source)}
    return perf, energy, plan_dict


def _device_roofline(spec: ModelSpec, device: Any, training: bool, batch: int) -> Any:
    """The planner's single-chip roofline bound of ``batch`` samples on a catalog ``device``, fp32."""
    from hal.ipu import plan

    return plan(spec, ipus=1, micro_batch=batch, precision="fp32", training=training, devices=[device]).roofline[1]


def ipu_sweeps(spec: ModelSpec, settings: Settings, framework: str) -> dict[str, Any]:
    """Estimated training throughput on ``settings.ipu`` against gradient accumulation (per
    number of pipeline stages: the bubble), against pipeline stages at G ~ 16, and of the
    plan across IPU generations (GC2, Mk2 GC200, Bow)."""
    from hal.ipu import DEFAULT_SCHEDULE, pipeline_rule

    base = _ipu_plan(spec, settings, settings.ipu, True, framework)
    stages = base.ipus_per_replica

    def point(p: Any) -> dict[str, Any]:
        sps, basis = _expected(p)
        bound = p.roofline[0].samples_per_second
        return {"ipu": p.ipu.key, "stages": p.ipus_per_replica, "grad_accum": p.batch.grad_accum, "fits": p.fits,
                "efficiency": p.efficiency,
                "samples_per_s": figure(sps if sps is not None else bound, "samples/s", ESTIMATE,
                                        basis if sps is not None else "roofline upper bound"),
                "roofline_bound": figure(bound, "samples/s", ESTIMATE, p.roofline[0].name)}

    def accepted(s: int, at_least: int) -> int:
        """The smallest gradient accumulation >= ``at_least`` the framework accepts for ``s`` stages."""
        return pipeline_rule(framework, DEFAULT_SCHEDULE[framework], s, training=True).smallest(at_least=at_least)

    grad_accum, by_stages = [], []
    for s in (1, 2, 4, 8):
        try:
            by_stages.append(point(_ipu_plan(spec, settings, settings.ipu, True, framework, ipus=s,
                                             grad_accum=accepted(s, 16))))
        except ConfigError:  # the model has fewer possible stages
            break
        if s in (1, 2, 4, stages):
            grad_accum += [point(_ipu_plan(spec, settings, settings.ipu, True, framework, ipus=s, grad_accum=g))
                           for g in sorted({accepted(s, g) for g in (1, 4, 8, 16, 32, 64)})]
    g = base.batch.grad_accum
    generations = [point(_ipu_plan(spec, settings, gen, True, framework, ipus=stages, grad_accum=g))
                   for gen in IPU_GENERATIONS]
    return {"framework": framework, "base": {"ipu": settings.ipu, "stages": stages, "grad_accum": g,
                                             "micro_batch": settings.micro_batch, "precision": settings.ipu_precision},
            "grad_accum": grad_accum, "stages": by_stages, "generations": generations}

