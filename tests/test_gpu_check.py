"""bench/gpu_check.py, the one-command GPU check, on a CPU: its arguments, its plan (checked
against hal's own CLI parser), the runner's budget and stop rules, and the summary writer on the
outputs of a real run of the script on this CPU (tests/data/gpu_check/cpu_run: resnet18 at 32x32,
batch 2 in bf16 and fp32, and bf16 with the torch backend's compile=inductor, conformance on numpy and
torch:cpu, written by ``bench/gpu_check.sh --results ...``) and on
bench JSON made by hal.bench's own report classes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hal.backend import Option
from hal.bench import BenchReport, BenchRow, Measurement
from hal.cli import parser as hal_parser
from hal.testing.conformance import FAIL

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "tests" / "data" / "gpu_check" / "cpu_run"


def _load_driver():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


gc = _load_driver()


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    """A writable copy of the recorded CPU run."""
    shutil.copytree(RECORDED, tmp_path / "run")
    return tmp_path / "run"


def _hal_args(step) -> object:
    """The step's hal command parsed by hal's own CLI parser."""
    argv = step.argv[step.argv.index("hal.cli") + 1:]
    return hal_parser().parse_args(argv)


# ---------------------------------------------------------------------------
# arguments and plan
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tf", [False, True])
def test_default_plan_is_the_issue_s_check(monkeypatch: pytest.MonkeyPatch, tf: bool) -> None:
    monkeypatch.setattr(gc, "tensorflow_installed", lambda: tf)
    steps = gc.plan(gc.parser().parse_args([]))
    conf = [s for s in steps if s.kind == "conformance"]
    assert [s.target for s in conf] == ["torch:cuda:0", "jax:gpu:0"] + (["tensorflow:gpu:0"] if tf else [])
    assert [s.required for s in conf] == [True, True] + ([False] if tf else [])
    for s in conf:
        a = _hal_args(s)
        assert (a.command, a.target, a.json) == ("conformance", s.target, True)
    bench = [s for s in steps if s.kind == "bench" and not s.options]
    assert [s.precision for s in bench] == ["bf16", "fp16", "fp32"] and all(s.required for s in bench)
    for s in bench:
        a = _hal_args(s)
        assert (a.command, a.model, a.batch, a.precision, a.targets) == ("bench", "resnet50", 256, s.precision,
                                                                        ["torch:cuda:0"])
        assert a.modes == ["inference", "training"] and a.json and a.out == "" and not a.no_native
    assert steps[0].kind == "probe" and steps[1:1 + len(conf) + len(bench)] == conf + bench
    assert all(not s.required and s.options for s in steps[1 + len(conf) + len(bench):])  # compile options, if any


def test_compile_option_is_timed_only_where_the_torch_backend_declares_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from hal.backends.torch import TorchBackend

    args = gc.parser().parse_args(["--compile-precisions", "bf16,fp16"])
    monkeypatch.setattr(gc, "tensorflow_installed", lambda: False)
    declared = {"fast": Option(True, "channels_last")}
    monkeypatch.setattr(TorchBackend, "options", classmethod(lambda cls: declared))
    assert not [s for s in gc.plan(args) if s.options]

    declared["compile"] = Option(False, "torch.compile")
    extra = [s for s in gc.plan(args) if s.options]
    assert [(s.precision, s.options, s.required) for s in extra] == [("bf16", {"compile": True}, False),
                                                                      ("fp16", {"compile": True}, False)]
    a = _hal_args(extra[0])
    assert a.options == [("compile", [True])] and a.modes == ["training"] and a.precision == "bf16"

    declared["compile"] = Option("none", "mode", choices=("none", "inductor", "max-autotune", "reduce-overhead"))
    assert gc.compile_options(declared) == [("compile", v) for v in ("inductor", "max-autotune", "reduce-overhead")]
    extra = [s for s in gc.plan(args) if s.options]  # the autotuning mode, the longest to compile, last
    assert [s.options["compile"] for s in extra] == ["inductor"] * 2 + ["reduce-overhead"] * 2 + ["max-autotune"] * 2
    assert _hal_args(extra[-1]).options == [("compile", ["max-autotune"])]
    declared["compile"] = Option("inductor", "a mode name: the values cannot be known")
    assert gc.compile_options(declared) == []


@pytest.mark.parametrize("argv, message", [
    (["--precisions", "fp8"], "unknown precision fp8"),
    (["--budget", "0"], "expected a float > 0"),
    (["--batch", "-1"], "expected a int > 0"),
    (["--bench-targets", "torch:cuda:0,,jax:gpu:0"], "distinct comma-separated"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_wrong_use_exits_2_saying_what_was_expected(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert gc.main(argv) == 2
    assert message in capsys.readouterr().err


def test_dry_run_through_the_shell_script_prints_the_commands_and_writes_nothing(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--results", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    assert "hal.cli conformance torch:cuda:0 --json" in out.stdout
    assert "hal.cli conformance jax:gpu:0 --json" in out.stdout
    for p, options in (("bf16", ""), ("fp16", ""), ("fp32", " --options tf32=true,false")):
        assert (f"hal.cli bench resnet50 --precision {p} --modes inference,training{options} --targets torch:cuda:0 "
                "--batch 256") in out.stdout
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _run(steps, tmp_path: Path, seconds: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc, "SUMMARY_RESERVE_S", 0.0)
    monkeypatch.setattr(gc, "CONFORMANCE_MIN_S", 0.5)
    gc.run_steps(steps, tmp_path, time.monotonic() + seconds, lambda _m: None, lambda: None)


def test_runner_records_status_output_and_the_reason_of_a_failure(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    steps = [
        gc.Step("conformance a", "conformance", _py("print('{\"passed\": true}')"), "a.json", 1.0),
        gc.Step("conformance b", "conformance", _py("import sys; print('{}'); sys.exit(1)"), "b.json", 1.0),
        gc.Step("conformance c", "conformance",
                _py("import sys; sys.stderr.write('hal: error: no device cuda:0\\n'); sys.exit(2)"), "c.json", 1.0),
    ]
    _run(steps, tmp_path, 60, monkeypatch)
    assert [(s.status, s.rc) for s in steps] == [(gc.OK, 0), (gc.FAILED, 1), (gc.ERROR, 2)]
    assert json.loads((tmp_path / "a.json").read_text()) == {"passed": True}
    assert steps[2].note == "hal: error: no device cuda:0"
    assert not (tmp_path / "c.json").exists()  # it printed nothing


def test_runner_stops_a_step_when_the_budget_runs_out_and_skips_what_cannot_fit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "child.pid"
    # a command whose own child would outlive it if only the command were stopped
    sleeper = _py(f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
                  f"time.sleep(60)']); open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    steps = [gc.Step("conformance slow", "conformance", sleeper, "slow.json", 0.5),
             gc.Step("bench big", "bench", _py("pass"), "big.json", 1000.0)]
    _run(steps, tmp_path, 1003.0, monkeypatch)  # conformance gets 3 s: the bench keeps its 1000 s estimate
    assert steps[0].status == gc.TIMEOUT and "budget ran out" in steps[0].note
    assert steps[1].status == gc.SKIPPED and "it needs about 1000 s" in steps[1].note
    child = int(marker.read_text())
    with pytest.raises(ProcessLookupError):  # the whole process group was stopped
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)


def test_a_run_writes_the_summary_mirrors_it_and_clears_the_previous_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    conf = json.loads((RECORDED / "conformance-torch-cpu.json").read_text())

    def fake_plan(args, python=sys.executable):
        return [gc.Step("conformance torch:cpu", "conformance", _py(f"print({json.dumps(json.dumps(conf))})"),
                        "conformance-torch-cpu.json", 1.0, target="torch:cpu")]

    monkeypatch.setattr(gc, "plan", fake_plan)
    results, mirror = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    (results / "steps.json").write_text(json.dumps({"config": {}, "steps": [{"output": "bench-old.json"}]}))
    (results / "bench-old.json").write_text("{}")
    (results / "notes.txt").write_text("not the script's")
    assert gc.main(["--results", str(results), "--mirror", str(mirror)]) == 0
    assert "GPU CHECK PASSED" in capsys.readouterr().out
    assert not (results / "bench-old.json").exists() and (results / "notes.txt").exists()
    for d in (results, mirror):
        s = json.loads((d / "summary.json").read_text())
        assert s["conformance"][0]["status"] == "passed" and (d / "summary.md").is_file()
    # the benchmarks were not planned: the performance targets are not measured, not failed
    assert s["targets"]["amp_training"]["met"] is None and s["targets"]["hal_vs_native"]["met"] is None


# ---------------------------------------------------------------------------
# the summary writer
# ---------------------------------------------------------------------------


def test_summary_of_a_recorded_cpu_run_reports_the_bench_figures(recorded: Path) -> None:
    s = gc.write_summary(recorded)
    assert s["verdict"] == {"passed": True, "reasons": []}
    got = {(r["precision"], json.dumps(r["options"]), r["mode"]): r for r in s["bench"]}
    outputs = {"bf16": "bench-bf16.json", "fp32": "bench-fp32.json", "bf16 compile": "bench-bf16-compile-inductor.json"}
    assert len(got) == 5  # inference and training per precision; the compile option's training
    for name, output in outputs.items():
        raw = json.loads((recorded / output).read_text())
        for row in raw["rows"]:
            hal, native = (statistics.median(row[k]["times_s"]) for k in ("hal", "native"))
            r = got[(name[:4], json.dumps(row["options"]), row["mode"])]
            assert r["hal_samples_per_s"] == pytest.approx(raw["batch"] / hal)
            assert r["native_samples_per_s"] == pytest.approx(raw["batch"] / native)
            assert r["ratio"] == pytest.approx(native / hal)
    conf = {c["target"]: c for c in s["conformance"]}
    raw = json.loads((recorded / "conformance-torch-cpu.json").read_text())
    assert conf["torch:cpu"]["status"] == "passed" and conf["torch:cpu"]["counts"] == raw["counts"]
    assert conf["tensorflow:gpu:0"]["status"] == "skipped"  # optional, and TensorFlow has no GPU here
    assert "no device 'gpu:0'" in conf["tensorflow:gpu:0"]["reason"]
    assert s["targets"]["amp_training"]["met"] is None  # resnet18: the target is ResNet50's
    assert s["energy"]["measured"] is False and s["energy"]["notes"]  # n/a, with the reason
    md = (recorded / "summary.md").read_text()
    assert "**Verdict: passed**" in md and "the target is for resnet50" in md
    # torch's default, as the probe read it
    assert "cuDNN convolutions TF32 on (torch.backends.cudnn.allow_tf32=True)" in md


def test_a_parity_failure_fails_the_check_and_names_the_case(recorded: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert gc.main(["--summarize", str(recorded)]) == 0
    path = recorded / "conformance-torch-cpu.json"
    report = json.loads(path.read_text())
    row = next(r for r in report["rows"] if r["status"] == "PASS" and r["tolerance"])
    row.update(status=FAIL, error=10 * row["tolerance"])
    report["passed"], report["counts"]["PASS"], report["counts"][FAIL] = False, report["counts"]["PASS"] - 1, 1
    path.write_text(json.dumps(report))
    capsys.readouterr()
    assert gc.main(["--summarize", str(recorded)]) == 1
    out = capsys.readouterr().out
    assert "GPU CHECK FAILED" in out and f"parity: torch:cpu: 1 case(s) failed: {row['name']}" in out
    assert f"torch:cpu {row['name']}: error" in (recorded / "summary.md").read_text()


@pytest.mark.parametrize("status, rc, note, expected", [
    (gc.ERROR, 2, "hal: error: torch has no device 'cuda:0' here; devices: ['cpu']", "no device 'cuda:0'"),
    (gc.TIMEOUT, None, "stopped after 250 s: the budget ran out", "budget ran out"),
    (gc.SKIPPED, None, "budget: 10 s left for it, it needs about 60 s", "skipped (budget"),
])
def test_a_required_conformance_target_that_did_not_finish_fails_the_check(
        recorded: Path, status: str, rc: int | None, note: str, expected: str) -> None:
    record = json.loads((recorded / "steps.json").read_text())
    step = next(s for s in record["steps"] if s["target"] == "torch:cpu")
    step.update(status=status, rc=rc, note=note)
    (recorded / "steps.json").write_text(json.dumps(record))
    (recorded / step["output"]).unlink()
    s = gc.summarize(recorded)
    assert not s["verdict"]["passed"]
    assert [r for r in s["verdict"]["reasons"] if r.startswith("parity: torch:cpu:") and expected in r]


def _measurement(impl: str, seconds: float, batch: int = 256, joules: float | None = None) -> Measurement:
    return Measurement(impl, 10.0, [seconds] * 3, batch, joules=[] if joules is None else [joules] * 3,
                       energy_note="NVML total energy counter of GPU 0 (stand-in), whole board")


def _bench_json(rows: list[BenchRow]) -> str:
    return json.dumps(BenchReport("resnet50", 256, 3, 1, {"machine": "test"}, rows).to_dict())


def test_targets_from_bench_reports_made_by_hal_bench(tmp_path: Path) -> None:
    """AMP: the best bf16/fp16 training row, compiled ones included (256 / 0.050 s = 5,120 img/s >= 3,700);
    hal/native: the lowest ratio of the rows without options (fp16 inference, 0.019 / 0.020 = 0.95 < 1.0),
    not the compiled inference row's 0.02 / 0.1 = 0.2."""
    reports = {
        "bf16": [BenchRow("torch:cuda:0", "training", _measurement("hal", 0.064, joules=256 * 0.5),
                          _measurement("native", 0.070, joules=256 * 0.6)),
                 BenchRow("torch:cuda:0", "inference", _measurement("hal", 0.020), _measurement("native", 0.021))],
        "fp16": [BenchRow("torch:cuda:0", "training", _measurement("hal", 0.080), _measurement("native", 0.080)),
                 BenchRow("torch:cuda:0", "inference", _measurement("hal", 0.020), _measurement("native", 0.019))],
        "bf16-compile": [
            BenchRow("torch:cuda:0", "training", _measurement("hal", 0.050), _measurement("native", 0.070),
                     options={"compile": True}),
            BenchRow("torch:cuda:0", "inference", _measurement("hal", 0.1), _measurement("native", 0.02),
                     options={"compile": True})],
    }
    steps = []
    for name, rows in reports.items():
        (tmp_path / f"bench-{name}.json").write_text(_bench_json(rows))
        steps.append(gc.Step(f"bench {name}", "bench", ["hal"], f"bench-{name}.json", 1.0, precision=name[:4],
                             required=name != "bf16-compile", status=gc.OK, rc=0))
    gc.write_record(tmp_path, steps, {"model": "resnet50", "batch": 256})
    s = gc.summarize(tmp_path)
    amp, ratio = s["targets"]["amp_training"], s["targets"]["hal_vs_native"]
    assert amp["met"] is True and amp["best"]["hal_samples_per_s"] == pytest.approx(256 / 0.050)
    assert amp["best"]["options"] == {"compile": True} and amp["best"]["precision"] == "bf16"
    assert ratio["met"] is False and ratio["rows"] == 4
    assert ratio["lowest"]["ratio"] == pytest.approx(0.95) and ratio["lowest"]["precision"] == "fp16"
    bf16_train = next(r for r in s["bench"]
                      if r["precision"] == "bf16" and r["mode"] == "training" and not r["options"])
    assert bf16_train["hal_joules_per_sample"] == pytest.approx(0.5)
    assert bf16_train["native_joules_per_sample"] == pytest.approx(0.6)
    assert s["energy"]["measured"] is True and s["verdict"]["passed"]
    md = gc.markdown(s)
    assert "**met** (best: 5120 img/s, bf16 torch:cuda:0 compile=True)" in md
    assert "**not met** (lowest: 0.95x, fp16 torch:cuda:0 inference, of 4 rows)" in md


def test_a_bench_row_without_hal_figures_fails_the_check(tmp_path: Path) -> None:
    rows = [BenchRow("torch:cuda:0", "training", note="WorkerError: CUDA out of memory"),
            BenchRow("torch:cuda:0", "inference", _measurement("hal", 0.02), _measurement("native", 0.02))]
    (tmp_path / "bench-fp32.json").write_text(_bench_json(rows))
    steps = [gc.Step("bench fp32", "bench", ["hal"], "bench-fp32.json", 1.0, precision="fp32", status=gc.FAILED, rc=1),
             gc.Step("bench fp16", "bench", ["hal"], "bench-fp16.json", 1.0, precision="fp16", status=gc.SKIPPED,
                     note="budget: 5 s left for it, it needs about 60 s"),
             # an extra (a compile option) that the budget stopped: noted in its step, not a failure
             gc.Step("bench bf16 compile=true", "bench", ["hal"], "bench-c.json", 1.0, precision="bf16",
                     required=False, status=gc.TIMEOUT, note="stopped after 100 s: the budget ran out")]
    gc.write_record(tmp_path, steps, {"model": "resnet50", "batch": 256})
    s = gc.summarize(tmp_path)
    assert s["verdict"]["reasons"] == ["bench fp32: torch:cuda:0 training: WorkerError: CUDA out of memory",
                                       "bench fp16: skipped: budget: 5 s left for it, it needs about 60 s"]


def test_staged_hal_imports_from_this_checkout_with_its_entry_points(tmp_path: Path) -> None:
    """The set-up's fallback where pip cannot install hal: the staged folder on PYTHONPATH gives the
    package layout of pyproject.toml (hal.backends is backends/, hal.native is bench/native/) and the
    backends' entry points."""
    site = tmp_path / "site"
    assert gc.main(["--stage", str(site)]) == 0
    code = ("import json, hal.backends.torch, hal.native, hal.testing\n"
            "from importlib.metadata import entry_points\n"
            "ep = next(e for e in entry_points(group='hal.backends') if e.name == 'torch')\n"
            "print(json.dumps([hal.backends.torch.__file__, hal.native.__file__, str(ep.dist._path), ep.value]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    backend, native, dist, value = json.loads(out.stdout)
    assert Path(backend).parent == site / "hal" / "backends"  # the staged copy, not the installed one
    assert Path(backend).resolve() == ROOT / "backends" / "torch.py"
    assert Path(native).resolve() == ROOT / "bench" / "native" / "__init__.py"
    assert Path(dist).parent == site and value == "hal.backends.torch:TorchBackend"
