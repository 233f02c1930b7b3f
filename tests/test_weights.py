"""Weights: seeded init, checks, safetensors files (atomic, corrupt files), and
torch state_dict import (a torchvision-layout ResNet loads without renaming)."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hal
from hal.errors import WeightsError
from hal.spec import SpecBuilder
from hal.weights import check_weights, from_state_dict, init_weights, load_weights, save_weights

ROOT = Path(__file__).resolve().parents[1]


def _spec(extra_bn: bool = False, dtype: str = "float32"):
    b = SpecBuilder("w")
    x = b.input((3, 8, 8), dtype=dtype)
    x = b.conv(x, 16, 3, padding=1, name="c1")
    if extra_bn:
        x = b.batch_norm(x, name="bn_new")
    x = b.relu(b.batch_norm(x, name="bn1"))
    x = b.conv(x, 8, 3, stride=2, name="c2")
    return b.build(b.dense(b.global_avg_pool(x), 5, name="fc"))


# ---------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------


class TestInit:
    def test_deterministic_per_seed(self):
        spec = _spec()
        a, b = init_weights(spec, 3), init_weights(spec, 3)
        assert list(a) == list(b) == list(spec.param_shapes())
        for k in a:
            assert a[k].dtype == np.float32 and a[k].shape == spec.param_shapes()[k]
            assert np.array_equal(a[k], b[k])

    def test_differs_across_seeds(self):
        spec = _spec()
        a, b = init_weights(spec, 0), init_weights(spec, 1)
        for k in ("c1.weight", "c2.weight", "fc.weight", "fc.bias"):
            assert not np.array_equal(a[k], b[k]), k
        # different tensors of one seed are not copies of one stream
        assert not np.allclose(a["c1.weight"].ravel()[:100], a["c2.weight"].ravel()[:100])

    def test_stable_per_name_when_a_node_is_added(self):
        a, b = init_weights(_spec(), 7), init_weights(_spec(extra_bn=True), 7)
        assert set(b) - set(a) == {f"bn_new.{p}" for p in ("weight", "bias", "running_mean", "running_var")}
        for k in a:
            assert np.array_equal(a[k], b[k]), k

    def test_float64_spec_gets_float64_weights(self):
        w = init_weights(_spec(dtype="float64"))
        assert all(v.dtype == np.float64 for v in w.values())

    def test_constant_parts(self):
        w = init_weights(_spec())
        assert np.all(w["bn1.weight"] == 1) and np.all(w["bn1.bias"] == 0)
        assert np.all(w["bn1.running_mean"] == 0) and np.all(w["bn1.running_var"] == 1)
        assert np.all(w["c1.bias"] == 0)

    def test_he_fan_out_std_on_a_big_conv(self):
        b = SpecBuilder("big")
        x = b.input((64, 8, 8))
        spec = b.build(b.conv(x, 256, 3, bias=False, name="c"))
        w = init_weights(spec, 11)["c.weight"].astype(np.float64).ravel()
        n = w.size  # 147456
        # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / (out * kh * kw))
        std = math.sqrt(2.0 / (256 * 3 * 3))
        try:
            import torch

            fan = torch.nn.init._calculate_correct_fan(torch.empty(256, 64, 3, 3), "fan_out")
            assert std == pytest.approx(torch.nn.init.calculate_gain("relu") / math.sqrt(fan))
        except ImportError:
            pass
        # sample std has relative standard error 1/sqrt(2n) ~ 0.0018: 5 sigma
        assert abs(w.std() / std - 1) < 5 / math.sqrt(2 * n)
        assert abs(w.mean()) < 5 * std / math.sqrt(n)
        # normal, not uniform: excess kurtosis 0 (uniform: -1.2), standard error sqrt(24/n)
        kurt = np.mean((w - w.mean()) ** 4) / w.var() ** 2 - 3
        assert abs(kurt) < 5 * math.sqrt(24 / n)

    def test_dense_is_torch_linear_default(self):
        b = SpecBuilder("d")
        spec = b.build(b.dense(b.input((400,)), 300, name="fc"))
        w = init_weights(spec, 2)
        bound = 1 / math.sqrt(400)
        for k in ("fc.weight", "fc.bias"):
            a = w[k].astype(np.float64)
            assert np.abs(a).max() <= bound
        a = w["fc.weight"].astype(np.float64).ravel()
        # U(-b, b): variance b^2/3
        assert a.var() == pytest.approx(bound**2 / 3, rel=0.02)
        assert np.abs(a).max() > 0.99 * bound


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------


class TestFiles:
    @pytest.mark.parametrize("dtype", ["float32", "float64"])
    def test_round_trip_bit_exact(self, tmp_path, make_weights, dtype):
        spec = _spec(dtype=dtype)
        w = make_weights(spec, 3, np.dtype(dtype))
        path = save_weights(tmp_path / "sub" / "w.safetensors", spec, w)
        assert path.is_file()
        spec2, w2 = load_weights(path)
        assert spec2 == spec and spec2.hash == spec.hash
        assert set(w2) == set(w)
        for k in w:
            assert w2[k].dtype == w[k].dtype and np.array_equal(w2[k], w[k]), k
        spec3, _ = load_weights(str(path), spec)  # the same spec given: accepted
        assert spec3 == spec

    def test_round_trip_torch_tensors(self, tmp_path, make_weights):
        torch = pytest.importorskip("torch")
        spec = _spec()
        w = make_weights(spec, 1, np.float32)
        path = save_weights(tmp_path / "w.safetensors", spec, {k: torch.from_numpy(v) for k, v in w.items()})
        _, w2 = load_weights(path)
        assert all(np.array_equal(w2[k], w[k]) for k in w)

    @pytest.mark.parametrize("fail", ["replace", "fsync"])
    def test_atomic_write_keeps_old_file(self, tmp_path, monkeypatch, make_weights, fail):
        spec = _spec()
        path = tmp_path / "w.safetensors"
        save_weights(path, spec, make_weights(spec, 0, np.float32))
        old = path.read_bytes()

        def boom(*args, **kwargs):
            raise OSError("disk on fire")

        monkeypatch.setattr(os, fail, boom)
        with pytest.raises(WeightsError, match=f"cannot write weights to '{path}': disk on fire"):
            save_weights(path, spec, make_weights(spec, 1, np.float32))
        monkeypatch.undo()
        assert path.read_bytes() == old
        assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no temp files left
        _, w = load_weights(path)
        assert np.array_equal(w["c1.weight"], make_weights(spec, 0, np.float32)["c1.weight"])

    def test_atomic_write_interrupted_write(self, tmp_path, monkeypatch, make_weights):
        """A failure in the middle of writing the bytes (e.g. ENOSPC, Ctrl-C) leaves the old file."""
        import hal.weights as hw

        spec = _spec()
        path = tmp_path / "w.safetensors"
        save_weights(path, spec, make_weights(spec, 0, np.float32))
        old = path.read_bytes()
        real_fdopen = os.fdopen

        class Torn:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                raise KeyboardInterrupt

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(hw.os, "fdopen", lambda fd, mode: Torn(real_fdopen(fd, mode)))
        with pytest.raises(KeyboardInterrupt):
            save_weights(path, spec, make_weights(spec, 1, np.float32))
        monkeypatch.undo()
        assert path.read_bytes() == old
        assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]

    def test_invalid_weights_never_touch_the_file(self, tmp_path, make_weights):
        spec = _spec()
        path = tmp_path / "w.safetensors"
        save_weights(path, spec, make_weights(spec, 0, np.float32))
        old = path.read_bytes()
        bad = make_weights(spec, 0, np.float32)
        del bad["fc.bias"]
        with pytest.raises(WeightsError, match="fc.bias"):
            save_weights(path, spec, bad)
        assert path.read_bytes() == old

    def _good_file(self, tmp_path, make_weights):
        spec = _spec()
        return spec, save_weights(tmp_path / "good.safetensors", spec, make_weights(spec, 0, np.float32))

    @pytest.mark.parametrize(
        "corrupt",
        [
            lambda b: b[: len(b) // 2],
            lambda b: b[:-1],
            lambda b: b[:7],
            lambda b: b"",
            lambda b: np.random.default_rng(0).bytes(len(b)),
            lambda b: (10**9).to_bytes(8, "little") + b[8:],
            lambda b: b[:8] + b"\x00" * (len(b) - 8),
        ],
        ids=["half", "minus-1", "7-bytes", "empty", "random", "huge-header", "zeroed-header"],
    )
    def test_corrupt_file_raises_weights_error_with_path(self, tmp_path, make_weights, corrupt):
        _, good = self._good_file(tmp_path, make_weights)
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(corrupt(good.read_bytes()))
        with pytest.raises(WeightsError) as ei:
            load_weights(bad)
        assert str(bad) in str(ei.value)

    def test_safetensors_without_hal_metadata(self, tmp_path, make_weights):
        from safetensors.numpy import save_file

        spec = _spec()
        path = tmp_path / "plain.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in make_weights(spec, 0, np.float32).items()}, str(path))
        with pytest.raises(WeightsError, match="hal metadata") as ei:
            load_weights(path)
        assert str(path) in str(ei.value)

    def test_invalid_embedded_spec(self, tmp_path, make_weights):
        from safetensors.numpy import save_file

        spec = _spec()
        path = tmp_path / "badspec.safetensors"
        arrays = {k: np.ascontiguousarray(v) for k, v in make_weights(spec, 0, np.float32).items()}
        bad = '{"schema_version": 1, "nodes": ['
        save_file(arrays, str(path), metadata={"format": "hal-weights/1", "spec": bad, "spec_hash": spec.hash})
        with pytest.raises(WeightsError) as ei:
            load_weights(path)
        assert str(path) in str(ei.value)

    def test_arrays_not_matching_embedded_spec(self, tmp_path, make_weights):
        from safetensors.numpy import save_file

        spec = _spec()
        path = tmp_path / "mismatch.safetensors"
        arrays = {k: np.ascontiguousarray(v) for k, v in make_weights(spec, 0, np.float32).items()}
        arrays["fc.weight"] = np.zeros((5, 9), np.float32)
        save_file(arrays, str(path), metadata={"format": "hal-weights/1", "spec": spec.to_json(), "spec_hash": spec.hash})
        with pytest.raises(WeightsError, match="fc.weight") as ei:
            load_weights(path)
        assert str(path) in str(ei.value)

    def test_wrong_spec_hash(self, tmp_path, make_weights):
        _, good = self._good_file(tmp_path, make_weights)
        other = _spec(extra_bn=True)
        with pytest.raises(WeightsError) as ei:
            load_weights(good, other)
        assert str(good) in str(ei.value)
        assert other.hash[:12] in str(ei.value)

    def test_missing_file(self, tmp_path):
        with pytest.raises(WeightsError, match="does not exist") as ei:
            load_weights(tmp_path / "nope.safetensors")
        assert "nope.safetensors" in str(ei.value)


# ---------------------------------------------------------------------------
# check_weights
# ---------------------------------------------------------------------------


class TestCheck:
    def test_accepts_and_converts(self, make_weights):
        spec = _spec()
        w = make_weights(spec)
        out = check_weights(spec, {k: v.tolist() for k, v in w.items()})
        assert all(isinstance(v, np.ndarray) and np.array_equal(v, w[k]) for k, v in out.items())

    def test_missing_key(self, make_weights):
        spec = _spec()
        w = make_weights(spec)
        del w["c2.bias"]
        with pytest.raises(WeightsError, match="missing 'c2.bias'"):
            check_weights(spec, w)

    def test_unexpected_key(self, make_weights):
        spec = _spec()
        w = make_weights(spec)
        w["c3.weight"] = np.zeros(3)
        with pytest.raises(WeightsError, match="unexpected 'c3.weight'"):
            check_weights(spec, w)

    def test_many_missing_are_summarised(self):
        with pytest.raises(WeightsError, match="more"):
            check_weights(_spec(), {})

    def test_misshaped_key(self, make_weights):
        spec = _spec()
        w = make_weights(spec)
        w["c1.weight"] = w["c1.weight"].transpose(1, 0, 2, 3)
        with pytest.raises(WeightsError, match=r"'c1.weight' has shape \(3, 16, 3, 3\).*\(16, 3, 3, 3\)"):
            check_weights(spec, w)

    @pytest.mark.parametrize("bad", [np.zeros((5,), np.int64), np.zeros((5,), bool), np.zeros((5,), np.complex64),
                                     np.array(["a"] * 5)])
    def test_non_float_key(self, make_weights, bad):
        spec = _spec()
        w = make_weights(spec)
        w["fc.bias"] = bad
        with pytest.raises(WeightsError, match="'fc.bias'"):
            check_weights(spec, w)

    @pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
    def test_non_finite_key(self, make_weights, value):
        spec = _spec()
        w = make_weights(spec)
        w["bn1.running_var"] = w["bn1.running_var"].copy()
        w["bn1.running_var"][3] = value
        with pytest.raises(WeightsError, match="'bn1.running_var' holds non-finite"):
            check_weights(spec, w)

    def test_not_a_mapping(self, make_weights):
        with pytest.raises(WeightsError, match="mapping"):
            check_weights(_spec(), list(make_weights(_spec()).values()))

    def test_non_string_key(self, make_weights):
        spec = _spec()
        w = make_weights(spec)
        w[0] = np.zeros(3)
        with pytest.raises(WeightsError, match="unexpected"):
            check_weights(spec, w)

    def test_where_is_in_the_message(self, make_weights):
        spec = _spec()
        w = make_weights(spec)
        del w["fc.weight"]
        with pytest.raises(WeightsError, match="^my checkpoint"):
            check_weights(spec, w, where="my checkpoint")


# ---------------------------------------------------------------------------
# torch state_dicts
# ---------------------------------------------------------------------------


def _torchvision_resnet18(num_classes: int):
    """torchvision's resnet18 layout, written by hand (no torchvision here)."""
    import torch.nn.functional as F
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or cin != planes:
                self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return F.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for i, planes in enumerate((64, 128, 256, 512)):
                stride = 1 if i == 0 else 2
                setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, planes, stride), BasicBlock(planes, planes, 1)))
                cin = planes
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.avgpool(x).flatten(1))

    return ResNet18()


def _randomise_bn(module, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return module


class TestStateDict:
    def test_drops_num_batches_tracked_and_accepts_tensors(self):
        torch = pytest.importorskip("torch")
        spec = _spec()
        sd = {k: torch.from_numpy(v) for k, v in init_weights(spec).items()}
        sd["bn1.num_batches_tracked"] = torch.tensor(3)
        sd["c1.weight"] = torch.nn.Parameter(sd["c1.weight"])  # requires grad: still fine
        w = from_state_dict(spec, sd)
        assert set(w) == set(spec.param_shapes())
        assert all(isinstance(v, np.ndarray) for v in w.values())
        assert np.array_equal(w["c1.weight"], init_weights(spec)["c1.weight"])

    def test_from_state_dict_errors_are_weights_errors(self):
        torch = pytest.importorskip("torch")
        spec = _spec()
        sd = {k: torch.from_numpy(v) for k, v in init_weights(spec).items()}
        sd["fc.weight"] = torch.zeros(5, 9)
        with pytest.raises(WeightsError, match="state_dict: 'fc.weight'"):
            from_state_dict(spec, sd)

    def test_torchvision_layout_resnet18_loads_without_renaming(self):
        torch = pytest.importorskip("torch")
        from hal.models import get

        torch.manual_seed(0)
        native = _randomise_bn(_torchvision_resnet18(10), 1).eval()
        spec = get("resnet18", num_classes=10, input_size=32)
        w = from_state_dict(spec, native.state_dict())
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
        # float64 on both sides: the numpy reference against torch's own layers
        with torch.no_grad():
            want64 = native.double()(torch.from_numpy(x)).numpy()
        got64 = hal.compile(spec, "numpy", w, hal.TrainConfig(precision="fp64")).predict(x)
        np.testing.assert_allclose(got64, want64, rtol=1e-10, atol=1e-10 * np.abs(want64).max())
        # the torch backend in float32 against the same module in float32
        with torch.no_grad():
            want32 = native.float()(torch.from_numpy(x.astype(np.float32))).numpy()
        got32 = hal.compile(spec, "torch:cpu", w).predict(x.astype(np.float32))
        assert np.abs(got32 - want32).max() <= 1e-4 * np.abs(want32).max()

    @pytest.mark.skipif(not (ROOT / "bench" / "native" / "torch.py").is_file(), reason="bench/native/torch.py not present")
    def test_native_torch_resnet50_loads_without_renaming(self):
        torch = pytest.importorskip("torch")
        from hal.models import get

        mod_spec = importlib.util.spec_from_file_location("native_torch", ROOT / "bench" / "native" / "torch.py")
        native_torch = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(native_torch)
        torch.manual_seed(0)
        native = _randomise_bn(native_torch.ResNet(50, 10), 2).double().eval()
        spec = get("resnet50", num_classes=10, input_size=32)
        w = from_state_dict(spec, native.state_dict())
        x = np.random.default_rng(1).standard_normal((2, 3, 32, 32))
        with torch.no_grad():
            want = native(torch.from_numpy(x)).numpy()
        exe = hal.compile(spec, "torch:cpu", w, hal.TrainConfig(precision="fp64"))
        np.testing.assert_allclose(exe.predict(x), want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


# ---------------------------------------------------------------------------
# integrity: checksum, spec_hash, the previous format
# ---------------------------------------------------------------------------


def _tiny():
    b = SpecBuilder("tiny")
    return b.build(b.dense(b.input((3,)), 2, name="fc"))


class TestIntegrity:
    def test_every_single_bit_flip_is_refused(self, tmp_path):
        """Each byte of a whole file (header length, JSON header, metadata, tensor data)
        with one bit flipped (a different bit per byte; all 8 bits of the data bytes)."""
        spec = _tiny()
        good = save_weights(tmp_path / "w.safetensors", spec, init_weights(spec, 1)).read_bytes()
        header_end = 8 + int.from_bytes(good[:8], "little")
        flips = [(i, i % 8) for i in range(header_end)] + [(i, b) for i in range(header_end, len(good)) for b in range(8)]
        bad = tmp_path / "bad.safetensors"
        for i, bit in flips:
            data = bytearray(good)
            data[i] ^= 1 << bit
            bad.write_bytes(bytes(data))
            with pytest.raises(WeightsError) as ei:
                load_weights(bad)
            assert str(bad) in str(ei.value), (i, bit)

    def test_tensor_change_is_a_checksum_mismatch(self, tmp_path):
        spec = _tiny()
        path = save_weights(tmp_path / "w.safetensors", spec, init_weights(spec, 1))
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01  # lowest mantissa bit of the last weight: a plausible float, only the checksum sees it
        path.write_bytes(bytes(data))
        with pytest.raises(WeightsError, match="checksum mismatch"):
            load_weights(path)

    def _write(self, path, arrays, **meta):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata=meta)
        return path

    def test_spec_hash_is_compared_with_the_embedded_spec(self, tmp_path):
        spec, other = _tiny(), _spec()
        path = self._write(tmp_path / "w.safetensors", init_weights(spec),
                           format="hal-weights/1", spec=spec.to_json(), spec_hash=other.hash)
        with pytest.raises(WeightsError, match="does not match its stored spec_hash"):
            load_weights(path)

    def test_previous_format_loads_without_checksum(self, tmp_path):
        """hal-weights/1 files (spec and spec_hash, no checksum) still load; re-saving adds the checksum."""
        spec = _tiny()
        w = init_weights(spec, 4)
        path = self._write(tmp_path / "old.safetensors", w,
                           format="hal-weights/1", spec=spec.to_json(), spec_hash=spec.hash)
        spec2, w2 = load_weights(path, spec)
        assert spec2 == spec and all(np.array_equal(w2[k], w[k]) for k in w)
        save_weights(path, spec2, w2)
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            assert f.metadata()["format"] == "hal-weights/2" and f.metadata()["checksum"].startswith("sha256:")

    def test_current_format_requires_the_checksum(self, tmp_path):
        spec = _tiny()
        path = self._write(tmp_path / "w.safetensors", init_weights(spec),
                           format="hal-weights/2", spec=spec.to_json(), spec_hash=spec.hash)
        with pytest.raises(WeightsError, match=r"lacks \['checksum'\]"):
            load_weights(path)

    def test_unknown_format(self, tmp_path):
        spec = _tiny()
        path = self._write(tmp_path / "w.safetensors", init_weights(spec),
                           format="hal-weights/9", spec=spec.to_json(), spec_hash=spec.hash)
        with pytest.raises(WeightsError, match="format 'hal-weights/9'"):
            load_weights(path)

    def test_big_endian_arrays_save_their_values(self, tmp_path):
        spec = _tiny()
        w = {k: v.astype(">f8") for k, v in init_weights(spec, 2).items()}
        _, w2 = load_weights(save_weights(tmp_path / "w.safetensors", spec, w))
        assert all(np.array_equal(w2[k], w[k]) for k in w)

    @pytest.mark.parametrize("path", [None, 3, ["w"]])
    def test_bad_path_types(self, path):
        spec = _tiny()
        for call in (lambda: save_weights(path, spec, init_weights(spec)), lambda: load_weights(path)):
            with pytest.raises(WeightsError, match="str or os.PathLike"):
                call()

    def test_unwritable_target_is_a_weights_error(self, tmp_path):
        spec = _tiny()
        (tmp_path / "file").write_text("x")
        with pytest.raises(WeightsError, match="cannot write weights to"):
            save_weights(tmp_path / "file" / "w.safetensors", spec, init_weights(spec))
        with pytest.raises(WeightsError, match="is not a file"):
            load_weights(tmp_path)


# ---------------------------------------------------------------------------
# temporaries left by killed writers
# ---------------------------------------------------------------------------

_WRITER = """
import os, signal, sys, time
import numpy as np
import hal.weights as hw
from hal.spec import SpecBuilder
b = SpecBuilder("tiny")
spec = b.build(b.dense(b.input((3,)), 2, name="fc"))
mode = sys.argv[2]
def stop(fd):
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # killed after writing, before the rename
    print("writing", flush=True)
    time.sleep(60)  # a live writer, mid-save
os.fsync = stop
hw.save_weights(sys.argv[1], spec, hw.init_weights(spec))
"""


def _temps(folder, name="w.safetensors"):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


class TestStaleTemporaries:
    def _writer(self, path, mode):
        import subprocess
        import sys

        return subprocess.Popen([sys.executable, "-c", _WRITER, str(path), mode], stdout=subprocess.PIPE, text=True)

    def test_killed_writers_temporary_is_removed_live_writers_kept(self, tmp_path):
        spec = _tiny()
        path = tmp_path / "w.safetensors"
        dead = self._writer(path, "die")
        assert dead.wait(60) == -9
        left = _temps(tmp_path)
        assert len(left) == 1 and (tmp_path / left[0]).stat().st_size > 0  # what a killed save leaves
        live = self._writer(path, "live")
        try:
            assert live.stdout.readline() == "writing\n"
            live_temp = set(_temps(tmp_path)) - set(left)
            assert len(live_temp) == 1 and str(live.pid) in next(iter(live_temp))
            other = tmp_path / ".other.safetensors.1-x.abc.tmp"  # another target's temporary
            other.write_bytes(b"x")
            save_weights(path, spec, init_weights(spec))
            assert _temps(tmp_path) == sorted(live_temp)  # the dead writer's file is gone, the live one stays
            assert other.exists()
        finally:
            live.kill()
            live.wait()
        save_weights(path, spec, init_weights(spec))
        assert _temps(tmp_path) == []
        load_weights(path, spec)


# ---------------------------------------------------------------------------
# bf16/fp16 state_dicts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_torch_state_dict_loads(dtype):
    """``model.to(torch.bfloat16).state_dict()``: values are kept exactly (bf16 and fp16 fit in float32)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(getattr(torch, dtype))
    b = SpecBuilder("t")
    spec = b.build(b.batch_norm(b.conv(b.input((3, 6, 6)), 4, 3, name="0"), name="1"))
    sd = model.state_dict()
    w = from_state_dict(spec, sd)
    for k, v in w.items():
        assert v.dtype == (np.float32 if dtype == "bfloat16" else np.float16), k
        assert torch.equal(torch.from_numpy(v.astype(np.float32)), sd[k].float()), k


# ---------------------------------------------------------------------------
# residual BatchNorms; big graphs
# ---------------------------------------------------------------------------


def _residual_norms_by_ancestor_sets(spec):
    """The definition, written the obvious (quadratic) way: of each Add's BatchNorm
    inputs, the one with most ancestors, the first on a tie."""
    ancestors = {}
    for n in spec.nodes:
        ancestors[n.name] = set().union(*([ancestors[i] | {i} for i in n.inputs] or [set()]))
    return {
        max(norms, key=lambda i: len(ancestors[i]))
        for n in spec.nodes if n.op.kind == "Add"
        for norms in [[i for i in n.inputs if spec.node(i).op.kind == "BatchNorm"]] if norms
    }


@pytest.mark.parametrize("name,kwargs", [("resnet18", {}), ("resnet50", {}), ("resnet50", {"variant": "v1"}),
                                         ("resnet101", {}), ("small_cnn", {})])
def test_residual_norms_match_the_definition_on_the_zoo(name, kwargs):
    from hal.models import get
    from hal.weights import _residual_norms

    spec = get(name, input_size=32, **kwargs)
    want = _residual_norms_by_ancestor_sets(spec)
    assert _residual_norms(spec) == want
    if name.startswith("resnet"):  # the last BatchNorm of every block, never a downsample's
        assert want == {n.name for n in spec.nodes if n.op.kind == "BatchNorm" and n.name.endswith(("bn2", "bn3"))
                        and spec.consumers()[n.name][0].endswith(".add")}


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_residual_norms_match_the_definition_on_random_dags(data):
    """Random DAGs of BatchNorm, Activation and Add (2-4 inputs, repeats allowed) on one shape."""
    from hal.weights import _residual_norms

    b = SpecBuilder("dag")
    names = [b.input((2,))]
    for _ in range(data.draw(st.integers(1, 30))):
        kind = data.draw(st.sampled_from(["bn", "bn", "act", "add"]))
        pick = st.sampled_from(names)
        if kind == "add":
            names.append(b.add(*data.draw(st.lists(pick, min_size=2, max_size=4))))
        else:
            x = data.draw(pick)
            names.append(b.batch_norm(x) if kind == "bn" else b.relu(x))
    read = {i for n in b._nodes for i in n.inputs}
    sinks = [n for n in names if n not in read]
    spec = b.build(b.add(*sinks) if len(sinks) > 1 else sinks[0])
    assert _residual_norms(spec) == _residual_norms_by_ancestor_sets(spec)


def test_a_30000_node_chain_is_linear_everywhere(tmp_path):
    """Build, validate, hash, init, save and load (which parses the spec's JSON and
    compares hashes) of a Conv/Activation chain of 30,000 nodes. A pass with per-node ancestor sets (the old init) holds ~4.5e8 set
    entries here (tens of GB); node lookup by scanning does ~9e8 comparisons."""
    from hal.weights import _residual_norms

    b = SpecBuilder("chain")
    x = b.input((2, 1))
    for i in range(15_000):
        x = b.relu(b.conv(x, 2, 1, name=f"c{i}"), name=f"r{i}")
    spec = b.build()
    assert len(spec.nodes) == 30_001
    w = init_weights(spec)
    assert len(w) == 30_000 and _residual_norms(spec) == set()
    spec2, w2 = load_weights(save_weights(tmp_path / "chain.safetensors", spec, w), spec)
    assert spec2 == spec and np.array_equal(w2["c14999.weight"], w["c14999.weight"])


class TestInitArguments:
    @pytest.mark.parametrize("kwargs,match", [({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": "0"}, "seed"),
                                              ({"residual_gamma": float("nan")}, "residual_gamma"),
                                              ({"residual_gamma": "0"}, "residual_gamma")])
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(WeightsError, match=match):
            init_weights(_spec(), **kwargs)

    @pytest.mark.parametrize("call", [init_weights, lambda s: check_weights(s, {}), lambda s: from_state_dict(s, {})])
    def test_not_a_spec(self, call):
        with pytest.raises(hal.SpecError, match="expected a hal.ModelSpec"):
            call({"nodes": []})

    def test_weights_beyond_memory_are_refused_before_allocating(self):
        b = SpecBuilder("big")
        spec = b.build(b.dense(b.input((10**6,)), 10**6, name="fc"))  # 10**12 parameters: 4 TB
        with pytest.raises(WeightsError, match=r"need 3,725\.3 GiB"):
            init_weights(spec)


def test_new_ops_start_from_their_declared_init():
    """PReLU at torch's 0.25, layer scale at ConvNeXt's 1e-6, norm affine at 1/0, not zeros."""
    b = SpecBuilder("inits")
    x = b.input((4, 5, 5))
    x = b.prelu(x, 4, name="act")
    x = b.group_norm(x, 2, name="gn")
    x = b.layer_norm(x, name="ln")
    spec = b.build(b.scale(x, 1e-6, name="ls"))
    w = hal.init_weights(spec)
    assert np.all(w["act.weight"] == np.float32(0.25))
    assert np.all(w["gn.weight"] == 1) and np.all(w["gn.bias"] == 0) and np.all(w["ln.weight"] == 1)
    assert np.all(w["ls.layer_scale"] == np.float32(1e-6))
