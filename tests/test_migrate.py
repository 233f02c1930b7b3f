"""hal migrate: the effort counter against hand-counted sources (whole modules, and only the code one
model's build reaches), the report's labelling (every figure measured or estimate; no measured figure
for a target that is not here), the inference batch sweep against the planner, its files, and the
command line."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from hal.cli import main
from hal.errors import ConfigError
from hal.ipu import pipeline_efficiency, plan
from hal.migrate import Settings, _module_source, code_effort, run_migrate, trace_reached
from hal.models import get

SOURCE = '''"""A module docstring."""
import torch
from torch import nn
import torch.nn.functional as F


# a comment
class Net(nn.Module):
    """A class docstring
    over two lines."""

    def forward(self, x):
        return F.relu(torch.flatten(x, 1)) + self.scale


def step(model, x):
    poptorch.BeginBlock(model, "s1", 1)
    return model(x)
'''


def test_code_effort_counts_code_lines_and_framework_apis() -> None:
    # by hand: 3 imports, class, def forward, return, def step, BeginBlock, return = 9 lines
    counted = code_effort(SOURCE)
    assert counted == {"lines": 9, "apis": ["torch.flatten", "torch.nn.Module", "torch.nn.functional.relu"]}
    with_alias = code_effort(SOURCE, {"poptorch": "poptorch"})  # a module bound at run time
    assert with_alias["apis"] == ["poptorch.BeginBlock", *counted["apis"]]
    assert code_effort("import numpy as np\nx = np.zeros(3)\n") == {"lines": 2, "apis": []}


TWO_MODELS = '''"""Two models behind one build."""
from __future__ import annotations

import torch
from torch import nn

WIDTH = 4
DEPTH = 2  # model b's


class A(nn.Module):
    """Model a."""
    scale = 2

    def __init__(self):
        super().__init__()

    def forward(self, x):
        return torch.relu(x) * WIDTH

    def unused(self):
        return torch.tanh(x)


class B(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x) * DEPTH


def helper(x):
    return x


def build(name):
    if name == "a":
        return A()
    return B()
'''


def test_code_effort_counts_only_the_code_one_model_reaches(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "two_models.py"
    path.write_text(TWO_MODELS)
    spec = importlib.util.spec_from_file_location("two_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reached = trace_reached(path, lambda: module.build("a")(torch.ones(2)))
    # by hand: import torch, from torch import nn, WIDTH = 4, class A, scale = 2, __init__ (2), forward (2),
    # build (4) = 13 lines; not __future__ (unused), DEPTH, A.unused, B, helper
    assert code_effort(TWO_MODELS, reached=reached) == {"lines": 13, "apis": ["torch.nn.Module", "torch.relu"]}
    assert code_effort(TWO_MODELS)["lines"] == 22  # the whole module, by hand


def figures(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every figure (a dict with value, unit and kind) in a report.json tree, with its path."""
    if isinstance(node, dict):
        if {"value", "unit", "kind"} <= set(node):
            yield path, node
        for k, v in node.items():
            yield from figures(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from figures(v, f"{path}/{i}")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, list[Path]]:
    out = tmp_path_factory.mktemp("migrate")
    rep = run_migrate(get("small_cnn"), ["numpy", "poptorch:ipu"],
                      Settings(batch=2, batches=(1, 2), repeats=1, warmup=0, micro_batch=2))
    written = rep.write(out)
    return json.loads((out / "report.json").read_text()), out, written


def test_every_figure_is_labelled_and_nothing_is_measured_for_a_target_not_here(report: Any) -> None:
    data, _, _ = report
    found = list(figures(data))
    assert found and all(f["kind"] in ("measured", "estimate") for _, f in found)
    assert data["per_target"]["numpy:cpu"]["available"] and not data["per_target"]["poptorch:ipu"]["available"]
    ipu = list(figures(data["per_target"]["poptorch:ipu"]))
    assert ipu and all(f["kind"] == "estimate" for _, f in ipu), [p for p, f in ipu if f["kind"] != "estimate"]
    for path, f in figures(data.get("ipu_sweeps")):
        assert f["kind"] == "estimate", path
    here = data["per_target"]["numpy:cpu"]["performance"]["inference"]
    assert here["samples_per_s"]["kind"] == "measured" and here["samples_per_s"]["value"] > 0
    assert data["numerics"]["per_target"]["numpy:cpu"]["forward"]["status"] == "PASS"


def test_inference_is_reported_at_the_best_batch_beside_batch_1_latency(report: Any) -> None:
    data, _, _ = report
    here = data["per_target"]["numpy:cpu"]["performance"]["inference"]
    sweep = {s["batch"]: s["samples_per_s"] for s in here["sweep"]}
    assert set(sweep) == {1, 2} and all(f["kind"] == "measured" for f in sweep.values())
    assert here["samples_per_s"] == max(sweep.values(), key=lambda f: f["value"]) == sweep[here["batch"]]
    assert here["latency_b1_ms"]["kind"] == "measured"
    ipu = data["per_target"]["poptorch:ipu"]["performance"]["inference"]
    spec = get("small_cnn")
    for s in ipu["sweep"]:  # no inference calibration: the planner's bound for that micro-batch, said to be one
        bound = plan(spec, ipu="bow", ipus=1, micro_batch=s["batch"], precision="16.16", training=False)
        assert s["samples_per_s"]["value"] == pytest.approx(bound.roofline[0].samples_per_second)
        assert "upper bound" in s["samples_per_s"]["source"]
    # weights stay in the IPU's SRAM: the bound per sample is the same at every micro-batch, and a tie goes
    # to the smaller batch (the same throughput at a lower latency)
    assert ipu["sweep"][0]["samples_per_s"]["value"] == pytest.approx(ipu["sweep"][1]["samples_per_s"]["value"])
    assert ipu["batch"] == 1
    one = plan(spec, ipu="bow", ipus=1, micro_batch=1, precision="16.16", training=False)
    assert ipu["latency_b1_ms"]["value"] == pytest.approx(one.roofline[0].seconds * 1e3)


def test_effort_counts_the_native_code_of_this_model_only(report: Any) -> None:
    data, _, _ = report
    native = data["effort"]["poptorch:ipu"]["native"]  # hal.native.torch, built for small_cnn
    whole = code_effort(_module_source("hal.native.torch"))
    assert native["lines"]["value"] < whole["lines"]
    assert "torch.nn.functional.silu" in native["apis"]  # small_cnn's
    assert "torch.nn.functional.adaptive_avg_pool2d" not in native["apis"]  # the hand-written ResNet's
    assert "torch.nn.functional.adaptive_avg_pool2d" in whole["apis"]


def test_ipu_sweeps_follow_the_pipeline_rule(report: Any) -> None:
    data, _, _ = report
    sweeps = data["ipu_sweeps"]
    assert {p["ipu"] for p in sweeps["generations"]} == {"gc2", "gc200", "bow"}
    for p in sweeps["stages"] + sweeps["grad_accum"]:
        assert p["efficiency"] == pytest.approx(pipeline_efficiency(p["stages"], p["grad_accum"]))
        if p["stages"] > 1:  # PopTorch's PipelinedExecution: G >= 2S - 1
            assert p["grad_accum"] >= 2 * p["stages"] - 1
    gens = {p["ipu"]: p["roofline_bound"]["value"] for p in sweeps["generations"]}
    assert gens["gc2"] < gens["gc200"] < gens["bow"]  # same plan, faster chips (catalog peaks)


def test_report_files(report: Any) -> None:
    data, out, written = report
    names = {p.name for p in written}
    assert {"report.json", "report.md", "report.html", "latency_vs_throughput.png", "ipu_grad_accum.png",
            "ipu_generations.png"} <= names
    md = (out / "report.md").read_text()
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / link).is_file(), link
    page = (out / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained
    assert "poptorch.BeginBlock" in json.dumps(data["effort"]["poptorch:ipu"])


def test_cli_refuses_wrong_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "small_cnn", "--from", "torch:cpu", "--to", "torch:cpu", "--out", str(tmp_path)]) == 2
    assert "same target" in capsys.readouterr().err
    assert main(["migrate", "small_cnn", "--from", "numpy", "--to", "poptorch:ipu", "--watts", "bow"]) == 2
    assert "expected device=watts" in capsys.readouterr().err
    assert main(["migrate", "small_cnn", "--from", "numpy", "--to", "poptorch:ipu", "--batches", "1,4,1"]) == 2
    assert "distinct batch sizes" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="batches"):
        run_migrate(get("small_cnn"), ["numpy", "poptorch:ipu"], Settings(batches=(0, 4)))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["compare", "small_cnn", "--report", str(blocker / "x")]) == 2
    assert "is a file" in capsys.readouterr().err
