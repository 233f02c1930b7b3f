"""The conductivity CNN and its trainer (``hal train conductivity``), in miniature: 12x12 grids, 48 samples."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import hal
from hal.errors import ConfigError, SpecError, TargetError, UnsupportedError
from hal.models import ZOO, conductivity_cnn, get
from hal.models.conductivity import ConductivityDataset, build_dataset, train_conductivity
from hal.models.conductivity.train import TRANSFORMS, TargetScaler, add_train_parser
from hal.spec import Conv, Dense, GlobalAvgPool, MaxPool

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ConductivityDataset:
    return build_dataset(48, 12, 2, seed=3, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def _cli(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hal")
    add_train_parser(ap.add_subparsers(dest="command", required=True))
    return ap.parse_args(["train", "conductivity", *argv])


@pytest.mark.parametrize("dims, size", [(2, 64), (3, 32), (2, (16, 24))])
def test_spec_shapes(dims, size):
    spec = conductivity_cnn(dims=dims, size=size, width=4)
    extents = (size,) * dims if isinstance(size, int) else size
    assert spec.input_shape == (1, *extents) and spec.output_shape == (1,)
    convs = [n for n in spec.nodes if isinstance(n.op, Conv)]
    assert len(convs) == 8 and all(len(n.op.kernel) == dims for n in convs)
    assert [spec.shape(n.name)[0] for n in convs[::2]] == [4, 8, 16, 32]
    assert spec.shape("stage3.relu2")[1:] == tuple(n // 8 for n in extents)
    assert sum(isinstance(n.op, MaxPool) for n in spec.nodes) == 3
    assert any(isinstance(n.op, GlobalAvgPool) for n in spec.nodes)
    assert [spec.shape(n.name) for n in spec.nodes if isinstance(n.op, Dense)] == [(64,), (1,)]


def test_zoo_exports():
    assert ZOO["conductivity_cnn"] is conductivity_cnn is hal.models.conductivity.conductivity_cnn
    assert get("conductivity_cnn", dims=3, size=16).input_shape == (1, 16, 16, 16)
    assert get("conductivity_cnn", input_size=32, num_classes=2).output_shape == (2,)  # the zoo's common keywords


@pytest.mark.parametrize("kwargs", [
    dict(dims=4), dict(dims=True), dict(size=4), dict(size=(64, 64), dims=3), dict(size=None), dict(size=True),
    dict(width=0), dict(stages=0), dict(convs=1.5), dict(num_classes=0),
])
def test_spec_rejects_bad_arguments(kwargs):
    with pytest.raises(SpecError, match="conductivity_cnn"):
        conductivity_cnn(**kwargs)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_target_transform_round_trip(transform):
    y = np.array([0.0, 0.01, 0.2, 0.6])
    scaler = TargetScaler.fit(transform, y)
    t = scaler.encode(y)
    assert t.shape == (4, 1) and t.dtype == np.float32
    assert abs(float(t.mean())) < 1e-6 and abs(float(t.std()) - 1) < 1e-5
    np.testing.assert_allclose(scaler.decode(t), y, atol=1e-6)
    assert scaler.decode(np.array([[-1e3]]))[0] == 0.0  # never a negative conductivity


def test_loss_falls_and_runs_are_reproducible(tiny):
    spec = conductivity_cnn(2, 12, width=4, stages=2)
    kwargs = dict(spec=spec, epochs=10, batch=8, lr=1e-2, seed=1)
    a = train_conductivity(tiny, "torch:cpu", **kwargs)
    assert np.mean(a.train_loss[-2:]) < 0.5 * a.train_loss[0]
    assert a.val_loss[-1] < a.val_loss[0]
    assert a.y_pred.shape == a.y_true.shape == (len(tiny.splits["test"]),) and np.all(a.y_pred >= 0)
    assert np.isfinite([a.r2, a.mae, a.samples_per_s]).all()
    for steps_per_call in (1, 3):  # train_step per step; run_steps over 3 + 1 steps: the same trajectory
        b = train_conductivity(tiny, "torch:cpu", steps_per_call=steps_per_call, **kwargs)
        np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs"), (dict(batch=64), "larger than the training split"),
    (dict(lr=-1.0), "lr"), (dict(transform="exp"), "transform"), (dict(steps_per_call=-1), "steps_per_call"),
])
def test_train_rejects_bad_arguments(tiny, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        train_conductivity(tiny, "torch:cpu", **kwargs)


def test_train_command_writes_weights_plots_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    args = _cli("--target", "torch:cpu", "--samples", "48", "--size", "12", "--epochs", "2", "--batch", "8",
                "--width", "4", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--json")
    assert args.fn(args) == 0
    report = json.loads(capsys.readouterr().out)
    (row,) = report["results"]
    assert row["target"] == "torch:cpu" and len(row["val_loss"]) == 2 and not report["failed"]
    assert report["dataset"]["splits"] == {"train": 38, "val": 5, "test": 5}
    spec, weights = hal.load_weights(out / "conductivity2d-torch-cpu.safetensors")
    assert spec == conductivity_cnn(2, 12, width=4)
    hal.compile(spec, "torch:cpu", weights=weights).predict(np.zeros((1, 1, 12, 12), np.float32))
    for png in ("conductivity2d-parity.png", "conductivity2d-loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "conductivity2d.json").read_text())["results"][0]["r2"] == row["r2"]
    assert "| torch:cpu |" in (out / "conductivity2d.md").read_text()


@pytest.mark.parametrize("argv, error", [
    (("--target", "numpy"), UnsupportedError), (("--target", "torch:tpu"), TargetError),
    (("--compare", " , "), ConfigError), (("--threads", "-1"), ConfigError),
])
def test_train_command_rejects_bad_targets_before_building_data(tmp_path, argv, error):
    args = _cli(*argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path))
    with pytest.raises(error):
        args.fn(args)
    assert not (tmp_path / "cache").exists()
