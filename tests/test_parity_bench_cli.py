"""The parity harness, the bench harness and the CLI, end to end on small models.

The parity harness must be able to fail: a plug-in backend that is wrong by a
little (a 1e-4 relative error, far above the float32 floor) is caught.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import hal
from hal.backends.torch import TorchBackend, TorchExecutable
from hal.cli import main
from hal.models import get
from hal.parity import normalised_error, run_parity, tensors_error, tolerance

torch = pytest.importorskip("torch", reason="the parity references for gradients need torch")


class _Skewed(TorchExecutable):
    """torch, but every output off by a relative 1e-4: a subtly broken backend."""

    def predict(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        return super().predict(x, training) * (1 + 1e-4)


class SkewedBackend(TorchBackend):
    name = "skewed"

    @classmethod
    def compile(cls, spec, weights, device, config):  # type: ignore[override]
        return _Skewed(spec, weights, device, config)


def test_parity_passes_for_torch_on_every_check():
    report = run_parity(get("small_cnn"), ["numpy", "torch:cpu"], batch=4)
    assert report.passed
    checks = {(r.target, r.check): r for r in report.results}
    for check in ("forward", "forward_train", "grads", "trajectory"):
        r = checks[("torch:cpu", check)]
        assert r.passed is True and r.max_rel is not None and r.max_rel <= r.tol
    # the floor is measured, and at least the float32 unit roundoff
    assert report.floor["forward"] >= 2.0**-24


def test_parity_catches_a_subtly_wrong_backend():
    hal.register_backend("skewed", SkewedBackend)
    report = run_parity(get("small_cnn"), ["skewed:cpu"], batch=4, checks=("forward",))
    (r,) = report.results
    assert r.passed is False and r.max_rel == pytest.approx(1e-4, rel=0.05)
    assert not report.passed


def test_normalised_errors_are_exact_on_hand_cases():
    ref = np.array([1.0, -4.0, 2.0])
    assert normalised_error(ref + np.array([0.0, 0.0, 0.5]), ref) == (0.5, 0.125)
    assert normalised_error(np.array([np.nan, 0, 0]), ref)[1] == float("inf")
    # normwise over tensors: a zero-exact tensor's noise is measured against the whole set
    e_abs, e_rel, worst = tensors_error({"a": np.array([2.0]), "b": np.array([1e-9])}, {"a": np.array([2.0]), "b": np.array([0.0])})
    assert (e_abs, worst) == (1e-9, "b") and e_rel == pytest.approx(5e-10)
    assert tolerance(1e-6, "fp32") == pytest.approx(16e-6)
    assert tolerance(1e-6, "bf16") == pytest.approx(16e-6 * 2.0**16)


def test_bench_times_hal_and_writes_json_markdown_png(tmp_path):
    from hal.bench import run_bench

    report = run_bench(get("small_cnn"), ["torch:cpu", "numpy"], batch=4, repeats=2, warmup=1)
    rows = {(r.target, r.mode): r for r in report.rows}
    for mode in ("inference", "training"):
        m = rows[("torch:cpu", mode)].hal
        assert m is not None and len(m.times_s) == 2 and m.samples_per_s > 0 and m.first_call_s > 0
    assert rows[("torch:cpu", "inference")].hal.latency_b1_ms > 0
    assert rows[("numpy:cpu", "training")].hal is None and "does not train" in rows[("numpy:cpu", "training")].note
    assert "no native baseline" in rows[("torch:cpu", "inference")].note  # small_cnn has no native twin
    paths = report.write(tmp_path)
    assert {p.suffix for p in paths} == {".json", ".md", ".png"}
    data = json.loads(paths[0].read_text())
    assert data["env"]["torch"] and data["env"]["cores"] >= 1 and data["rows"][0]["hal"]["samples_per_s"] > 0


def test_bench_ratio_against_native_resnet(tmp_path):
    from hal.bench import run_bench

    report = run_bench(get("resnet18", input_size=32), ["torch:cpu"], batch=2, repeats=1, warmup=0, modes=("inference",))
    (row,) = report.rows
    assert row.native is not None and row.ratio == pytest.approx(row.native.median_s / row.hal.median_s)


def test_cli_info_json(capsys):
    assert main(["info", "--json"]) == 0
    rows = {r["backend"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["numpy"]["available"] and "numpy:cpu" in rows["numpy"]["devices"]


def test_cli_parity_json_and_exit_codes(capsys):
    assert main(["parity", "small_cnn", "--targets", "numpy,torch:cpu", "--checks", "forward", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and {r["target"] for r in out["results"]} == {"numpy", "torch:cpu"}
    # a user mistake: exit 2 with a message naming what is available
    assert main(["parity", "small_cnn", "--targets", "nosuch:cpu", "--checks", "forward"]) == 1
    assert "unknown backend 'nosuch'" in capsys.readouterr().out
    assert main(["parity", "no_such_model"]) == 2
    assert "the zoo has" in capsys.readouterr().err


def test_cli_compare_prints_one_table(capsys):
    code = main(["compare", "small_cnn", "--targets", "numpy,torch:cpu", "--batch", "4", "--repeats", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "torch:cpu" in out and "PASS" in out and "infer samples/s" in out
