"""The conformance suite on every in-tree backend, and proof that it catches wrong backends."""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import pytest

import hal.testing.conformance as conformance
from hal.backend import Capabilities
from hal.backends.numpy import NumpyBackend
from hal.backends.torch import TorchBackend
from hal.errors import ConfigError
from hal.registry import backend_names, get_backend, register_backend
from hal.spec import OPS
from hal.testing.conformance import FAIL, PASS, SKIP, UNSUPPORTED, check_case, conformance_cases, run_conformance
from hal.training import Adam

TARGETS = ("numpy", "torch:cpu", "jax:cpu", "tensorflow:cpu")
PLUGINS = {"onnxruntime:cpu": "plugins/hal-onnxruntime"}  # out-of-tree backends, installed by `make test`


def _cases() -> list[Any]:
    out, installed = [], backend_names()
    for target in (*TARGETS, *PLUGINS):
        if target.partition(":")[0] not in installed:
            reason = f"plug-in {target} is not installed: pip install {PLUGINS[target]}"
            out.append(pytest.param(target, None, id=target, marks=pytest.mark.skip(reason=reason)))
            continue
        a = get_backend(target.partition(":")[0]).availability()
        marks = () if a.available else pytest.mark.skip(reason=f"{target} is not available: {a.reason}")
        out += [pytest.param(target, case, id=f"{target}-{case}", marks=marks) for case in conformance_cases(target)]
    return out


@pytest.mark.parametrize("target,case", _cases())
def test_conformance(target: str, case: conformance.Case) -> None:
    check_case(target, case)


# -- the suite itself -----------------------------------------------------------------


def test_include_and_exclude_select_by_regex() -> None:
    names = [c.name for c in conformance_cases("numpy", include=["^op/conv", "^train/adam"], exclude="3d|_wd")]
    assert "op/conv2d_stride2_asym_pad" in names and "train/adamw" in names
    assert all(n.startswith(("op/conv", "train/adam")) and "3d" not in n and "_wd" not in n for n in names)
    with pytest.raises(ConfigError, match="regular expression"):
        conformance_cases("numpy", include="op/(")


def test_every_case_that_uses_a_convolution_says_so_in_its_name() -> None:
    """What lets a wrong convolution fail only cases named after it (see test_a_wrong_conv_fails_...)."""
    cases = conformance_cases("numpy")
    assert len({c.name for c in cases}) == len(cases)
    for c in cases:
        assert ("Conv" in c.ops) == ("conv" in c.name), c.name


class _NumpyWithoutMaxPool(NumpyBackend):
    name = "numpy_without_maxpool"

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(ops=frozenset(OPS) - {"MaxPool"}, precisions=("fp32",), training=False)


def test_declared_limits_are_unsupported_rows_and_an_inference_only_backend_passes() -> None:
    register_backend(_NumpyWithoutMaxPool.name, _NumpyWithoutMaxPool)
    name = _NumpyWithoutMaxPool.name
    report = run_conformance(name, include=["^op/(maxpool|relu$)", "^train/sgd$", "precision/fp64"])
    status = {r.name: (r.status, r.note) for r in report.rows}
    assert status["op/relu"][0] == PASS
    assert status["op/maxpool2d_asym_pad"] == (UNSUPPORTED, f"{name} declares no MaxPool op")
    assert status["train/sgd"] == (UNSUPPORTED, f"{name} is inference-only (capabilities().training is False)")
    assert status["precision/fp64_forward"][0] == UNSUPPORTED and "fp64" in status["precision/fp64_forward"][1]
    assert report.passed and report.counts()[PASS] == 1
    d = json.loads(json.dumps(report.to_dict()))
    assert d["passed"] is True and len(d["rows"]) == len(report.rows) == sum(d["counts"].values())
    assert report.table().splitlines()[0].startswith(f"conformance of {name}:cpu: 1 PASS")


def test_without_the_autodiff_reference_gradient_cases_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    monkeypatch.setattr(conformance, "REFERENCE_AUTODIFF", "no_such_backend:cpu")
    report = run_conformance("torch:cpu", include="^(loss|train/sgd$)")
    assert [r.status for r in report.rows] == [SKIP] * 3
    assert all("no float64 autodiff reference" in r.note for r in report.rows)


# -- wrong backends fail, with the case named ----------------------------------------


class _ConvOff(TorchBackend):
    """torch whose convolutions are off by a relative 1e-4."""

    name = "torch_conv_off"

    @classmethod
    def compile(cls, spec, weights, device, config, options: Mapping[str, Any], plan):  # type: ignore[override]
        exe = super().compile(spec, weights, device, config, options, plan)
        for node in spec.nodes:
            if node.op.kind == "Conv":
                exe.module.get_submodule(node.name).register_forward_hook(lambda mod, args, out: out * (1 + 1e-4))
        return exe


class _AdamDecoupled(TorchBackend):
    """torch whose Adam applies weight decay the AdamW way (decoupled)."""

    name = "torch_adam_decoupled"

    @classmethod
    def compile(cls, spec, weights, device, config, options: Mapping[str, Any], plan):  # type: ignore[override]
        import torch

        exe = super().compile(spec, weights, device, config, options, plan)
        o = config.optimizer
        if type(o) is Adam:
            exe.optimizer = torch.optim.AdamW(exe.params.values(), lr=o.lr, betas=o.betas, eps=o.eps,
                                              weight_decay=o.weight_decay)
        return exe


def test_a_wrong_conv_fails_exactly_the_conv_cases() -> None:
    pytest.importorskip("torch")
    register_backend(_ConvOff.name, _ConvOff)
    report = run_conformance(_ConvOff.name, exclude="^import/")
    failed = {r.name: r for r in report.rows if r.status == FAIL}
    conv_cases = {c.name for c in conformance_cases(_ConvOff.name) if "Conv" in c.ops}
    assert set(failed) == conv_cases
    assert {n.partition("/")[0] for n in failed} == {"op", "grad"}
    for name, row in failed.items():
        assert "conv" in name and row.error > row.tolerance
        assert name.startswith("grad/") or row.note.startswith("Conv(")  # the op and its attributes


def test_adam_with_decoupled_weight_decay_fails_the_adam_weight_decay_case() -> None:
    pytest.importorskip("torch")
    register_backend(_AdamDecoupled.name, _AdamDecoupled)
    report = run_conformance(_AdamDecoupled.name, include="^train/")
    assert [r.name for r in report.rows if r.status != PASS] == ["train/adam_wd"]
    row = report.rows[[r.name for r in report.rows].index("train/adam_wd")]
    assert row.status == FAIL and row.error > 10 * row.tolerance
