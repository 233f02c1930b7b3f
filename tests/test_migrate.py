"""hal migrate: the effort counter against hand-counted sources, the report's labelling (every
figure measured or estimate; no measured figure for a target that is not here), its files, and
the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from hal.cli import main
from hal.ipu import pipeline_efficiency
from hal.migrate import Settings, code_effort, run_migrate
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
                      Settings(batch=2, repeats=1, warmup=0, micro_batch=2))
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
    assert {"report.json", "report.md", "report.html", "ipu_grad_accum.png", "ipu_generations.png"} <= names
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
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["compare", "small_cnn", "--report", str(blocker / "x")]) == 2
    assert "is a file" in capsys.readouterr().err
