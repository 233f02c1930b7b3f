"""The conductivity CNN and its trainer (``hal train conductivity``), in miniature: 12x12 grids, 48 samples."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

import hal
from hal import registry
from hal.backends.torch import TorchBackend
from hal.cli import TRANSFORMS as CLI_TRANSFORMS, main
from hal.errors import ConfigError, SpecError
from hal.models import ZOO, conductivity_cnn, get
from hal.models.conductivity import ConductivityDataset, build_dataset, train_conductivity
from hal.models.conductivity import train
from hal.models.conductivity.train import TRANSFORMS, TargetScaler
from hal.spec import Conv, Dense, GlobalAvgPool, MaxPool

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ConductivityDataset:
    return build_dataset(48, 12, 2, seed=3, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def _train(tmp_path, *argv: str) -> int:
    """``hal train conductivity`` on a 48-sample 12x12 dataset cached under ``tmp_path``."""
    return main(["train", "conductivity", "--samples", "48", "--size", "12", "--epochs", "2", "--batch", "8",
                 "--width", "4", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), *argv])


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
    assert _train(tmp_path, "--target", "torch:cpu", "--out", str(out), "--json") == 0
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


@pytest.fixture
def fake_training(monkeypatch) -> dict[str, np.ndarray]:
    """Training replaced by a stand-in that returns known weights at once; returns those weights."""
    trained: dict[str, np.ndarray] = {}

    def train_conductivity(data, target, *, spec, **_):
        test = data.y[data.splits["test"]]
        trained.update(hal.init_weights(spec, seed=7))
        return train.TrainResult(target=target, train_loss=[1.0, 0.5], val_loss=[1.0, 0.6], y_true=test, y_pred=test,
                                 r2=1.0, mae=0.0, train_seconds=1.0, first_epoch_seconds=0.5, samples_per_s=10.0,
                                 weights=trained)

    monkeypatch.setattr(train, "train_conductivity", train_conductivity)
    return trained


def _without(monkeypatch, package: str) -> None:
    """Make ``package`` look not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))


def test_train_command_keeps_the_weights_when_the_output_folder_fails(tmp_path, monkeypatch, capsys, fake_training):
    out = tmp_path / "out"

    def full_disk(path, spec, weights):  # the disk under --out fills up while training
        raise OSError(28, "No space left on device")

    real_save = train.save_weights
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the fallback folder goes
    monkeypatch.setattr(train, "save_weights", lambda p, *a: (full_disk if out in p.parents else real_save)(p, *a))
    assert _train(tmp_path, "--target", "torch:cpu", "--out", str(out), "--json") == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "No space left on device" in report["output_error"]
    assert captured.err.endswith(f"hal: warning: {report['output_error']}\n")
    (saved,) = [f for f in map(Path, report["files"]) if f.suffix == ".safetensors"]
    assert out not in saved.parents and saved.name == "conductivity2d-torch-cpu.safetensors"
    spec, weights = hal.load_weights(saved)
    assert spec == conductivity_cnn(2, 12, width=4) and weights.keys() == fake_training.keys()
    assert all(np.array_equal(weights[k], fake_training[k]) for k in fake_training)
    assert (saved.parent / "conductivity2d.json").is_file()


def test_train_command_without_matplotlib_writes_everything_but_the_plots(tmp_path, monkeypatch, capsys, fake_training):
    _without(monkeypatch, "matplotlib")
    assert _train(tmp_path, "--target", "torch:cpu", "--out", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "plots not drawn: matplotlib is not installed (pip install 'hal-cnn[plot]')" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "conductivity2d-torch-cpu.safetensors", "conductivity2d.json", "conductivity2d.md"]


def test_train_command_without_scipy_says_what_to_install(tmp_path, monkeypatch, capsys):
    _without(monkeypatch, "scipy")
    assert _train(tmp_path, "--target", "torch:cpu") == 2
    assert capsys.readouterr().err == (
        "hal: error: the conductivity dataset's solver needs scipy: pip install 'hal-cnn[science]'\n")
    assert not list(tmp_path.glob("cache/*"))


class Crashing(TorchBackend):
    """torch, except that compiling kills the process: a framework that segfaults."""

    name = "crashing"

    @classmethod
    def compile(cls, *args, **kwargs):  # type: ignore[override]
        os.abort()


def test_compare_trains_each_target_in_its_own_process_and_survives_a_crash(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registry, "_registered", dict(registry._registered))
    hal.register_backend("crashing", Crashing)  # reaches the worker processes (hal.worker)
    out = tmp_path / "out"
    assert _train(tmp_path, "--compare", "crashing:cpu,torch:cpu", "--out", str(out), "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert list(report["failed"]) == ["crashing:cpu"] and "SIGABRT" in report["failed"]["crashing:cpu"]
    assert [r["target"] for r in report["results"]] == ["torch:cpu"]
    spec, _ = hal.load_weights(out / "conductivity2d-torch-cpu.safetensors")
    assert spec == conductivity_cnn(2, 12, width=4)
    assert "| crashing:cpu | failed |" in (out / "conductivity2d.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (("--target", "numpy"), "target 'numpy' does not train"),
    (("--target", "torch:tpu"), "torch has no device 'tpu'"),
    (("--compare", " , "), "argument --compare: an empty entry"),
    (("--compare", "torch:cpu,torch"), "targets 'torch:cpu' and 'torch' are the same target, 'torch:cpu'"),
    (("--threads", "-1"), "argument --threads: expected an integer >= 0, got '-1'"),
    (("--lr", "nan"), "argument --lr: expected a finite number > 0"),
    (("--transform", "exp"), "argument --transform: invalid choice"),
    (("--size", "4"), "conductivity_cnn: size must be"),
    (("--size", "100000"), "GiB for the dataset alone"),
    (("--out", "FILE/results"), "--out: cannot write results under 'FILE/results': 'FILE' is a file"),
    (("--cache-dir", "FILE"), "--cache-dir: cannot write results under 'FILE': 'FILE' is a file"),
])
def test_train_command_rejects_bad_arguments_before_building_data(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a file, not a folder")
    assert _train(tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hal: error: ") and message in err and err.count("\n") == 1
    assert not list(tmp_path.glob("cache/*"))  # no dataset was built


def test_cli_transforms_are_the_trainers():
    assert CLI_TRANSFORMS == TRANSFORMS
