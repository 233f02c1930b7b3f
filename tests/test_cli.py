"""The ``hal`` command line: what it imports, how it fails, and the commands that need no framework.

Every wrong use must be one ``hal: error: ...`` line on stderr and exit status 2, before any
work starts (the commands print progress lines on stderr once they start, so one line of
stderr means nothing ran).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from hal import registry
from hal.backend import Option
from hal.backends.numpy import NumpyBackend
from hal.cli import _value, main

MODULES_NOT_LOADED = ("hal.models.conductivity", "scipy", "torch", "jax", "tensorflow", "matplotlib")


@pytest.mark.parametrize("first", ["", "import hal.ipu; ", "import hal.models.conductivity.train; "])
def test_import_loads_no_workload_no_framework_and_no_cycle(first):
    code = (f"{first}import hal.cli, sys; loaded = {MODULES_NOT_LOADED!r}; "
            "print([m for m in loaded if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    expected = ["hal.models.conductivity"] if "conductivity" in first else []
    assert json.loads(out.replace("'", '"')) == expected


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A working folder holding a plain file, a corrupt spec, a non-UTF-8 spec and a valid spec."""
    from hal.models import get

    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "corrupt.json").write_text("{not json")
    (tmp_path / "latin1.json").write_bytes(b"\xff\xfe{}")
    (tmp_path / "small.json").write_text(get("small_cnn").to_json())
    return tmp_path


MISUSES = [
    # parity
    (["parity", "small_cnn", "--replicas", "2", "--precision", "bf16"], "does not take --precision"),
    (["parity", "small_cnn", "--targets", ","], "argument --targets: an empty entry in ','"),
    (["parity", "small_cnn", "--targets", "numpy,"], "an empty entry in 'numpy,'"),
    (["parity", "small_cnn", "--targets", "numpy,numpy"], "numpy given twice"),
    (["parity", "small_cnn", "--targets", ":cpu"], "target ':cpu' has no backend name"),
    (["parity", "small_cnn", "--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["parity", "small_cnn", "--steps", "-2"], "argument --steps: expected an integer >= 1, got '-2'"),
    (["parity", "small_cnn", "--batch", "0"], "argument --batch: expected an integer >= 1"),
    (["parity", "small_cnn", "--batch", "1", "--targets", "numpy"], "batch must be an int >= 2"),
    (["parity", "small_cnn", "--batch", "four"], "argument --batch: expected an integer >= 1, got 'four'"),
    (["parity", "small_cnn", "--checks", "forward,nope"], "argument --checks: unknown 'nope'; choose from forward,"),
    (["parity", "small_cnn", "--checks", "forward,"], "argument --checks: an empty entry"),
    (["parity", "small_cnn", "--seed", "-1"], "argument --seed: expected an integer >= 0"),
    (["parity", "small_cnn", "--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["parity", "small_cnn", "--lr", "-0.001"], "argument --lr: expected a finite number > 0"),
    (["parity", "small_cnn", "--grad-accum", "0"], "argument --grad-accum: expected an integer >= 1"),
    (["parity", "small_cnn", "--grad-accum", "3", "--targets", "numpy"], "not divisible by grad_accum 3"),
    (["parity", "small_cnn", "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["parity", "small_cnn", "--input-size", "0"], "argument --input-size: expected an integer >= 1"),
    (["parity", "small_cnn", "--num-classes", "0"], "argument --num-classes: expected an integer >= 1"),
    (["parity", "no_such_model"], "unknown model 'no_such_model'; the zoo has"),
    (["parity", "missing.json"], "cannot read the spec file 'missing.json'"),
    (["parity", "corrupt.json"], "spec JSON does not parse"),
    (["parity", "latin1.json"], "cannot read the spec file 'latin1.json'"),
    (["parity", "small.json", "--input-size", "32"], "--input-size and --num-classes apply to zoo models"),
    (["parity", "small_cnn", "--weights", "FILE", "--targets", "numpy"], "not a readable safetensors file"),
    (["parity", "small_cnn", "--weights", "missing.safetensors"], "does not exist"),
    (["parity"], "the following arguments are required: model"),
    # bench and compare
    (["bench", "small_cnn", "--targets", ","], "argument --targets: an empty entry"),
    (["bench", "small_cnn", "--repeats", "0"], "argument --repeats: expected an integer >= 1"),
    (["bench", "small_cnn", "--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
    (["bench", "small_cnn", "--modes", "inference,inference"], "inference given twice"),
    (["bench", "small_cnn", "--modes", "training,fast"], "argument --modes: unknown 'fast'; choose from inference"),
    (["bench", "small_cnn", "--out", "FILE/results"], "--out: cannot write results under 'FILE/results': 'FILE' is a file, not a folder"),
    (["bench", "small_cnn", "--options", "xla"], "argument --options: expected name=value[,value...], got 'xla'"),
    (["bench", "small_cnn", "--options", "xla="], "argument --options: expected name=value"),
    (["bench", "small_cnn", "--options", "xla=true", "--options", "xla=false"], "--options: xla given twice"),
    (["bench", "small_cnn", "--targets", "numpy", "--options", "no_such_option=1", "--out", ""], "no_such_option"),
    (["compare", "small_cnn", "--targets", ","], "argument --targets: an empty entry"),
    (["compare", "small_cnn", "--parity-batch", "1"], "argument --parity-batch: expected an integer >= 2"),
    (["compare", "small_cnn", "--repeats", "0"], "argument --repeats: expected an integer >= 1"),
    # conformance
    (["conformance"], "the following arguments are required: target"),
    (["conformance", ":cpu"], "target ':cpu' has no backend name"),
    (["conformance", "numpy", "--include", "conv("], "argument --include: 'conv(' is not a regular expression"),
    (["conformance", "numpy", "--exclude", "*"], "argument --exclude: '*' is not a regular expression"),
    # plan
    (["plan", "small_cnn", "--ipus", "0"], "argument --ipus: expected an integer >= 1"),
    (["plan", "small_cnn", "--micro-batch", "-1"], "argument --micro-batch: expected an integer >= 1"),
    (["plan", "small_cnn", "--ipu", "tpu"], "unknown device 'tpu'"),
    (["plan", "small_cnn", "--headroom", "nan"], "headroom must be a fraction in [0, 1)"),
    (["plan", "small_cnn", "--efficiency", "0"], "efficiency must be in (0, 1]"),
    (["plan", "small_cnn", "--precision", "bf16"], "argument --precision: invalid choice: 'bf16'"),
    (["plan", "corrupt.json"], "spec JSON does not parse"),
    (["plan", "nonet"], "unknown model 'nonet'"),
    # train (the trainer's own tests check the rest)
    (["train"], "the following arguments are required: workload"),
    (["train", "weather"], "argument workload: invalid choice: 'weather'"),
    (["train", "conductivity", "--target", "torch:cpu", "--compare", "jax:cpu"], "not allowed with argument"),
    (["train", "conductivity", "--epochs", "0"], "argument --epochs: expected an integer >= 1"),
    (["train", "conductivity", "--dims", "4"], "argument --dims: invalid choice: 4"),
    (["train", "conductivity", "--out", "FILE"], "--out: cannot write results under 'FILE': 'FILE' is a file"),
    # the command itself
    ([], "the following arguments are required: command"),
    (["bogus"], "argument command: invalid choice: 'bogus'"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, message", MISUSES, ids=[" ".join(a) or "(none)" for a, _ in MISUSES])
def test_misuse_is_one_error_line_and_exit_2(files, capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("hal: error: ") and err.count("\n") == 1, err
    assert message in err


def test_parity_on_the_reference_passes(capsys):
    assert main(["parity", "small_cnn", "--targets", "numpy", "--checks", "forward", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and [(r["target"], r["check"]) for r in report["results"]] == [("numpy", "forward")]


@pytest.mark.parametrize("text, value", [
    ("true", True), ("False", False), ("none", None), ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 1e-3),
    ("highest", "highest"), ("/tmp/cache", "/tmp/cache"),
])
def test_option_values_are_typed(text, value):
    assert _value(text) == value and type(_value(text)) is type(value)


def test_bench_sweeps_options(monkeypatch, capsys):
    import hal.bench

    seen: dict[str, Any] = {}

    def run_bench(spec, targets, **kwargs):
        seen.update(kwargs, targets=targets)
        return hal.bench.BenchReport(spec.name, kwargs["batch"], kwargs["repeats"], kwargs["warmup"], {})

    monkeypatch.setattr(hal.bench, "run_bench", run_bench)
    argv = ["bench", "small_cnn", "--targets", "tensorflow:cpu", "--out", "", "--options", "xla=true,false,none",
            "--options", "threads=1,2"]
    assert main(argv) == 0
    assert seen["targets"] == ["tensorflow:cpu"]
    assert seen["options"] == {"xla": [True, False, None], "threads": [1, 2]}


# ---------------------------------------------------------------------------
# hal conformance, against a stand-in for hal.testing.conformance
# ---------------------------------------------------------------------------


@dataclass
class _Report:
    passed: bool
    rows: list[dict[str, str]] = field(default_factory=list)

    def table(self) -> str:
        return "\n".join(f"{r['case']}: {r['status']}" for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rows": self.rows}


@pytest.fixture
def conformance(monkeypatch):
    """Replace hal.testing.conformance with a module whose run_conformance records its call."""
    calls: list[dict[str, Any]] = []
    outcome: dict[str, bool] = {"passed": True}

    def run_conformance(target, include=None, exclude=None, progress=None, options=None):
        calls.append({"target": target, "include": include, "exclude": exclude, "options": options})
        if include is not None and not re.search(include, "conv2d"):
            return _Report(True)  # every case left out
        progress("conv2d")
        status = "pass" if outcome["passed"] else "FAIL (conv off by 1e-4)"
        return _Report(outcome["passed"], [{"case": "conv2d", "status": status}])

    module = types.ModuleType("hal.testing.conformance")
    module.run_conformance = run_conformance  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hal.testing.conformance", module)
    return calls, outcome


def test_conformance_prints_the_table_and_exits_0_when_it_passes(conformance, capsys):
    calls, _ = conformance
    assert main(["conformance", "torch:cpu", "--include", "conv", "--exclude", "3d$"]) == 0
    assert calls == [{"target": "torch:cpu", "include": "conv", "exclude": "3d$", "options": {}}]
    out, err = capsys.readouterr()
    assert out == "conv2d: pass\n" and "conv2d" in err  # progress on stderr


def test_conformance_passes_backend_options(conformance):
    calls, _ = conformance
    assert main(["conformance", "torch:cpu", "--include", "conv", "--option", "compile=inductor"]) == 0
    assert calls[0]["options"] == {"compile": "inductor"}


def test_conformance_exits_1_when_a_case_fails_and_prints_json(conformance, capsys):
    calls, outcome = conformance
    outcome["passed"] = False
    assert main(["conformance", "numpy", "--json"]) == 1
    assert calls == [{"target": "numpy", "include": None, "exclude": None, "options": {}}]
    out, err = capsys.readouterr()
    assert json.loads(out) == {"passed": False, "rows": [{"case": "conv2d", "status": "FAIL (conv off by 1e-4)"}]}
    assert err == ""  # --json: no progress


def test_conformance_that_checks_nothing_is_a_usage_error(conformance, capsys):
    assert main(["conformance", "numpy", "--include", "^pool"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "hal: error: no conformance case is left by --include '^pool': nothing was checked\n"


def test_out_of_memory_is_one_error_line(monkeypatch, capsys):
    import hal.ipu

    def plan(*args, **kwargs):
        raise MemoryError("Unable to allocate 186. GiB for an array")

    monkeypatch.setattr(hal.ipu, "plan", plan)
    assert main(["plan", "small_cnn"]) == 2
    assert capsys.readouterr().err == "hal: error: out of memory: Unable to allocate 186. GiB for an array\n"


class _Knobbed(NumpyBackend):
    name = "knobbed"

    @classmethod
    def options(cls) -> dict[str, Option]:
        return {"knob": Option(0.5, "how far to turn it"), "mode": Option("a", "which way", ("a", "b"))}


def test_info_lists_backend_options(monkeypatch, capsys):
    monkeypatch.setattr(registry, "_registered", {"knobbed": _Knobbed})
    monkeypatch.setattr(registry, "_entry_points", dict)
    assert main(["info", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["backend"] == "knobbed" and row["options"] == {
        "knob": {"default": 0.5, "choices": None, "doc": "how far to turn it"},
        "mode": {"default": "a", "choices": ["a", "b"], "doc": "which way"}}
    assert main(["info"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "option knobbed knob=float (default 0.5): how far to turn it", "option knobbed mode=a|b (default a): which way"]


EXPORT_MISUSES = [
    (["export", "small_cnn"], "the following arguments are required: -o/--output"),
    (["export", "small_cnn", "-o", "FILE/m.onnx"], "-o/--output: cannot write results under 'FILE': 'FILE' is a file"),
    (["export", "small_cnn", "-o", "."], "-o/--output: '.' is a folder"),
    (["export", "small_cnn", "-o", "m.onnx", "--opset", "16"], "argument --opset: expected an integer >= 17"),
    (["export", "small_cnn", "-o", "m.onnx", "--opset", "999"], "opset must be an int from 17 to"),
    (["export", "small_cnn", "-o", "m.onnx", "--dynamic-batch", "--batch", "2"], "not allowed with argument"),
    (["export", "small_cnn", "-o", "m.onnx", "--weights", "FILE"], "'FILE' is not a readable safetensors file"),
    (["export", "nonet", "-o", "m.onnx"], "unknown model 'nonet'"),
]


@pytest.mark.parametrize("argv, message", EXPORT_MISUSES, ids=[" ".join(a) for a, _ in EXPORT_MISUSES])
def test_export_misuse_is_one_error_line_and_exit_2(files, capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("hal: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (files / "m.onnx").exists()


def test_export_writes_a_model_that_reads_back_to_the_spec_and_weights(tmp_path, capsys):
    pytest.importorskip("onnx")
    from hal.models import get
    from hal.onnx import from_onnx
    from hal.testing import assert_weights_equal
    from hal.weights import init_weights, save_weights

    spec = get("small_cnn", input_size=16)
    w = {k: v + 1 for k, v in init_weights(spec, seed=4).items()}
    save_weights(tmp_path / "w.safetensors", spec, w)
    out = tmp_path / "sub" / "m.onnx"
    argv = ["export", "small_cnn", "--input-size", "16", "-o", str(out), "--weights", str(tmp_path / "w.safetensors"),
            "--opset", "18", "--batch", "3"]
    assert main(argv) == 0
    assert f"wrote {out} (small_cnn, opset 18, batch 3" in capsys.readouterr().out
    back, w2 = from_onnx(out)
    assert back.hash == spec.hash
    assert_weights_equal(w2, w)
    assert main(["export", "small_cnn", "--input-size", "16", "-o", str(out), "--dynamic-batch"]) == 0
    assert_weights_equal(from_onnx(out)[1], init_weights(spec))  # the seeded init when no --weights


def test_a_hal_weights_file_is_a_model(tmp_path, capsys):
    """What `hal import` writes (spec and weights in one file) works wherever MODEL does, with its own weights."""
    import numpy as np

    import hal
    from hal.cli import _model
    from hal.models import get

    spec = get("small_cnn")
    w = hal.init_weights(spec, seed=7)
    path = tmp_path / "imported.safetensors"
    hal.save_weights(path, spec, w)
    args = types.SimpleNamespace(model=str(path), input_size=None, num_classes=None, weights=None)
    got_spec, got_w = _model(args)
    assert got_spec.hash == spec.hash and all(np.array_equal(got_w[k], w[k]) for k in w)
    assert main(["parity", str(path), "--targets", "numpy", "--checks", "forward"]) == 0
    assert main(["plan", str(path), "--ipus", "1"]) == 0  # small_cnn fits one IPU
    capsys.readouterr()
    assert main(["parity", str(path), "--targets", "numpy", "--input-size", "32"]) == 2
    assert "apply to zoo models" in capsys.readouterr().err
