"""hal.to_onnx and hal.from_onnx against independent truths: onnxruntime running the exported
graph against the float64 numpy reference, the round trip bit for bit, torchvision's own
outputs for a ResNet exported by ``torch.onnx.export``.

Tolerances are hal.parity's: ``tolerance(floor)`` with the floor measured as float32 numpy
against float64 numpy on the same spec, weights and batch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import random_weights  # noqa: E402

import hal  # noqa: E402
from hal.backends.numpy import NumpyExecutable  # noqa: E402
from hal.errors import ConfigError, UnsupportedError  # noqa: E402
from hal.models import ZOO, get  # noqa: E402
from hal.onnx import _PROTOBUF_LIMIT, DEFAULT_OPSET, GELU_OPSET, MIN_OPSET, MISH_OPSET, from_onnx, to_onnx  # noqa: E402
from hal.parity import make_batch, normalised_error, tolerance  # noqa: E402
from hal.spec import Activation, MaxPool, SpecBuilder  # noqa: E402
from hal.testing import assert_weights_equal  # noqa: E402
from hal.testing.conformance import conformance_cases  # noqa: E402
from hal.training import TrainConfig  # noqa: E402
from hal.weights import init_weights  # noqa: E402

OP_CASES = {c.name: c.spec for c in conformance_cases("numpy", include="^op/")}
ZOO_SMALL = {"input_size": 32, "num_classes": 10}  # zoo models at a small size
ZOO_SMALLER = {"unet3d": {"input_size": 16, "features": 8}}  # 3-d: 32**3 voxels take seconds in float64
FAST_PARAMS = 12e6  # zoo models larger than this at 32x32 and 10 classes run with -m slow


def reference(spec, w, x, precision):
    return NumpyExecutable(spec, w, TrainConfig(precision=precision)).predict(x)


def run_onnx(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def assert_matches_reference(spec, w, x, actual):
    """Normalised max error against float64 numpy within the float32 parity tolerance."""
    ref = reference(spec, w, x, "fp64")
    floor = normalised_error(reference(spec, w, x, "fp32"), ref)[1]
    err = normalised_error(actual, ref)[1]
    assert err <= tolerance(floor), f"error {err:.2e} > tolerance {tolerance(floor):.2e} (floor {floor:.1e})"
    return err


def batch(spec, n=2):
    """Standard-normal inputs; below the zero padding when the spec max-pools, so that a
    padding that wins (0 instead of -inf) shows."""
    x = make_batch(spec, n, "mse")[0]
    return x - np.float32(3) if any(isinstance(node.op, MaxPool) for node in spec.nodes) else x


def _opsets(spec):
    """Every op at the default opset; activations also at the opsets that change their form."""
    fns = {n.op.fn for n in spec.nodes if isinstance(n.op, Activation)}
    extra = [MISH_OPSET] * ("mish" in fns) + [GELU_OPSET] * ("gelu" in fns)
    return [DEFAULT_OPSET, *extra]


OP_RUNS = [(name, opset) for name, spec in OP_CASES.items() for opset in _opsets(spec)]


@pytest.mark.parametrize("name, opset", OP_RUNS, ids=[f"{n}-opset{o}" for n, o in OP_RUNS])
def test_every_op_case_runs_in_onnxruntime_like_the_reference(name, opset):
    spec = OP_CASES[name]
    w = random_weights(spec, dtype=np.float32)
    x = batch(spec)
    assert_matches_reference(spec, w, x, run_onnx(to_onnx(spec, w, opset=opset), x))


@pytest.mark.parametrize("name", OP_CASES)
def test_every_op_case_round_trips_bit_for_bit(name):
    spec = OP_CASES[name]
    w = random_weights(spec, dtype=np.float32)
    back, w2 = from_onnx(to_onnx(spec, w).SerializeToString())
    assert back.hash == spec.hash
    assert_weights_equal(w2, w)


def _zoo(name):
    return get(name, **(ZOO_SMALL | ZOO_SMALLER.get(name, {})))


def _zoo_params():
    out = []
    for name in ZOO:
        slow = _zoo(name).num_params > FAST_PARAMS
        out.append(pytest.param(name, marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("name", _zoo_params())
def test_zoo_model_exports_runs_and_round_trips(name, tmp_path):
    spec = _zoo(name)
    w = init_weights(spec, seed=3, residual_gamma=0.2)
    path = tmp_path / f"{name}.onnx"
    if sum(a.nbytes for a in w.values()) >= _PROTOBUF_LIMIT:  # regnet_y_128gf: refused up front, nothing written
        with pytest.raises(hal.UnsupportedError, match="under 2 GiB"):
            to_onnx(spec, w, path)
        assert not path.exists()
        return
    model = to_onnx(spec, w, path, dynamic_batch=True)  # checker full_check runs inside
    loaded = onnx.load(str(path))
    meta = {p.key: p.value for p in loaded.metadata_props}
    assert hal.ModelSpec.from_json(meta["hal.spec"]).hash == meta["hal.spec_hash"] == spec.hash
    assert loaded.opset_import[0].version == DEFAULT_OPSET
    assert [d.dim_param for d in loaded.graph.input[0].type.tensor_type.shape.dim[:1]] == ["batch"]
    x = batch(spec, 3)
    assert_matches_reference(spec, w, x, run_onnx(model, x))
    back, w2 = from_onnx(path)
    assert back.hash == spec.hash
    assert_weights_equal(w2, w)


@pytest.mark.slow
def test_resnet50_at_224_runs_in_onnxruntime_like_the_reference():
    spec = get("resnet50")
    w = init_weights(spec, seed=0, residual_gamma=0.2)
    x = batch(spec)
    assert_matches_reference(spec, w, x, run_onnx(to_onnx(spec, w, dynamic_batch=False, batch=2), x))


def test_names_static_batch_and_metadata_follow_the_spec():
    spec = get("resnet18", input_size=32, num_classes=10)
    model = to_onnx(spec, dynamic_batch=False, batch=4)
    names = {n.name for n in model.graph.node}
    assert {"conv1", "bn1", "layer1.0.conv1", "layer4.1.add", "avgpool", "fc"} <= names
    assert {"conv1.weight", "bn1.running_var", "fc.bias"} <= {t.name for t in model.graph.initializer}
    assert model.graph.input[0].name == "input" and model.graph.output[0].name == "fc"
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 32, 32]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [4, 10]
    assert model.producer_name == "hal"
    bn = next(n for n in model.graph.node if n.name == "bn1")
    assert bn.op_type == "BatchNormalization" and len(bn.output) == 1  # inference form


def test_default_weights_are_the_seeded_init():
    spec = get("small_cnn")
    assert_weights_equal(from_onnx(to_onnx(spec, seed=5))[1], init_weights(spec, seed=5))


def test_bad_arguments_are_hal_errors(tmp_path):
    spec = get("small_cnn")
    with pytest.raises(ConfigError, match=f"opset must be an int from {MIN_OPSET}"):
        to_onnx(spec, opset=MIN_OPSET - 1)
    with pytest.raises(hal.WeightsError, match="missing"):
        to_onnx(spec, {})
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot write the ONNX model"):
        to_onnx(spec, path=tmp_path / "file" / "m.onnx")
    with pytest.raises(ConfigError, match="not an ONNX model|cannot read"):
        from_onnx(b"not a model")
    b = SpecBuilder("huge")
    huge = b.build(b.dense(b.input((2**15,)), 2**14))  # 2 GiB of float32 weights
    with pytest.raises(UnsupportedError, match="2.0 GiB; an ONNX file holds under 2 GiB"):
        to_onnx(huge, {})  # refused before the weights are looked at


def test_an_edited_graph_is_rebuilt_not_trusted_to_its_metadata():
    b = SpecBuilder("edited")
    x = b.input((3, 6, 6))
    spec = b.build(b.activation(b.conv(x, 4, 3, name="conv"), "tanh", name="act"))
    model = to_onnx(spec, random_weights(spec, dtype=np.float32))
    next(n for n in model.graph.node if n.name == "act").op_type = "Sigmoid"
    with pytest.warns(UserWarning, match="does not describe its graph"):
        back, _ = from_onnx(model)
    assert back.node("act").op == Activation("sigmoid")


# ---------------------------------------------------------------------------
# graphs written by torch.onnx.export
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_resnet18():
    """torchvision's resnet18 (random weights, BatchNorm statistics and affine away from 0 and 1),
    an input, and its float64 output."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        ref = model.double()(x.double()).numpy()
    return model.float(), x, ref


def _export(torch, model, x, **kw):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, input_names=["input"], **kw)
    return onnx.load_from_string(f.getvalue())


# the exporters' own forms: BatchNorm kept (names and values as in the state_dict) or folded into Conv
TORCH_EXPORTS = {
    "torchscript": dict(dynamo=False, do_constant_folding=False, dynamic_axes={"input": {0: "batch"}}),
    "dynamo": dict(dynamo=True, optimize=False),
    "torchscript_folded": dict(dynamo=False),
    "dynamo_folded": dict(dynamo=True),
}


@pytest.mark.parametrize("exporter", [pytest.param(k, marks=[pytest.mark.slow] if k == "dynamo_folded" else [])
                                      for k in TORCH_EXPORTS])
def test_torchvision_resnet18_from_torch_onnx_export_matches_torchvision(torchvision_resnet18, exporter):
    torch = pytest.importorskip("torch")
    model, x, ref = torchvision_resnet18
    spec, w = from_onnx(_export(torch, model, x, **TORCH_EXPORTS[exporter]))
    x64 = x.numpy().astype(np.float64)
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    err = normalised_error(reference(spec, w64, x64, "fp64"), ref)[1]
    if exporter.endswith("_folded"):  # the exporter folded BatchNorm into the float32 conv weights
        floor = normalised_error(reference(spec, w, x.numpy(), "fp32"), ref)[1]
        assert err <= tolerance(floor)
        return
    assert err < 1e-10, err
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert_weights_equal(w, state)  # every weight under torchvision's name, bit for bit
    assert {"conv1", "bn1", "maxpool", "layer1.0.conv1", "layer1.0.bn2", "layer4.1.add", "fc"} <= {
        n.name for n in spec.nodes}


def test_imported_torchvision_resnet18_on_torch_cpu_within_float32_tolerance(torchvision_resnet18):
    torch = pytest.importorskip("torch")
    model, x, ref = torchvision_resnet18
    spec, w = from_onnx(_export(torch, model, x, **TORCH_EXPORTS["torchscript"]))
    y = hal.compile(spec, "torch:cpu", w).predict(x.numpy())
    floor = normalised_error(reference(spec, w, x.numpy(), "fp32"), ref)[1]
    assert normalised_error(y, ref)[1] <= tolerance(floor)


def test_torch_activation_formulas_import_as_hal_activations():
    """torch writes gelu before opset 20 as erf/tanh formulas and silu as x * sigmoid(x)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Mish(),
                          nn.Hardswish(), nn.ELU(0.7), nn.LeakyReLU(0.2), nn.ReLU6()).eval()
    x = torch.randn(2, 3, 8, 8)
    spec, w = from_onnx(_export(torch, model, x, dynamo=False, opset_version=17))
    acts = [(n.op.fn, n.op.approximate, n.op.alpha) for n in spec.nodes if isinstance(n.op, Activation)]
    assert acts == [("gelu", "none", 0.01), ("gelu", "tanh", 0.01), ("silu", "none", 0.01), ("mish", "none", 0.01),
                    ("hardswish", "none", 0.01), ("elu", "none", 0.7), ("leaky_relu", "none", 0.2),
                    ("relu6", "none", 0.01)]
    with torch.no_grad():
        ref = model.double()(x.double()).numpy()
    x64 = x.numpy().astype(np.float64)
    assert normalised_error(reference(spec, {k: v.astype(np.float64) for k, v in w.items()}, x64, "fp64"),
                            ref)[1] < 1e-10


def test_unsupported_nodes_are_listed_all_at_once():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.rnn = nn.LSTM(4, 5, batch_first=True)

        def forward(self, x):
            y = nn.functional.interpolate(self.conv(x), scale_factor=2.0, mode="bicubic")
            y = self.rnn(y.flatten(2).transpose(1, 2))[0]
            return torch.softmax(y.flatten(1), dim=1)

    model = _export(torch, Net().eval(), torch.randn(1, 3, 8, 8), dynamo=False, opset_version=17)
    with pytest.raises(UnsupportedError) as info:
        from_onnx(model)
    message = str(info.value)
    assert "Resize: mode 'cubic'" in message  # what hal's Upsample has no meaning for, said
    for op in ("Resize", "LSTM", "Softmax"):
        names = [n.name for n in model.graph.node if n.op_type == op]
        assert names and all(f"{name!r} ({op}" in message for name in names), (op, message)
    assert "'/conv/Conv'" not in message  # the supported node is not listed


def _randomise_norms(torch, model):
    """BatchNorm statistics and norm affines away from 0 and 1 (an import that drops one shows)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
    return model.eval()


def _upsampling():
    """A module with nn.Upsample in each mode torch exports to Resize, ConvTranspose2d and GroupNorm."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Upsampling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gn = nn.GroupNorm(2, 8)
            self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
            self.nearest = nn.Upsample(scale_factor=2, mode="nearest")
            self.bilinear = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.corners = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

        def forward(self, x):
            y = self.up(self.gn(self.conv(x)))
            return torch.cat([self.nearest(y), self.bilinear(y), self.corners(y)], 1)

    return Upsampling()


def _torchvision(name):
    return lambda: pytest.importorskip("torchvision").models.get_model(name, num_classes=10)


# model, input size, the hal ops the import must contain (the modules' count where it is structural)
TORCH_MODELS = {
    "upsampling": (_upsampling, 6, {"GroupNorm": 1, "ConvTranspose": 1, "Upsample": 3}),
    "shufflenet_v2_x1_0": (_torchvision("shufflenet_v2_x1_0"), 64, {"ChannelShuffle": 16, "ChannelSlice": 26}),
    "convnext_tiny": (_torchvision("convnext_tiny"), 32, {"LayerNorm": 23, "Scale": 18}),
    "mobilenet_v3_small": (_torchvision("mobilenet_v3_small"), 64, {"AdaptiveAvgPool": 9}),
}


@pytest.mark.parametrize("exporter", [pytest.param(k, marks=[pytest.mark.slow] if k == "dynamo" else [])
                                      for k in TORCH_EXPORTS])
@pytest.mark.parametrize("name", list(TORCH_MODELS))
def test_torch_exported_models_import_and_match_torch(name, exporter):
    """from_onnx of torch.onnx.export's graph computes in hal's float64 what the torch module computes
    in float64: to rounding when the exporter kept the weights as they are, within the float32
    tolerance of the weights when it folded BatchNorm into float32 conv weights (its default)."""
    torch = pytest.importorskip("torch")
    make, size, kinds = TORCH_MODELS[name]
    torch.manual_seed(0)
    model = _randomise_norms(torch, make())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.double()(x.double()).numpy()
    spec, w = from_onnx(_export(torch, model.float(), x, **TORCH_EXPORTS[exporter]))
    counts = {k: sum(n.op.kind == k for n in spec.nodes) for k in kinds}
    assert counts == kinds
    err = normalised_error(reference(spec, {k: v.astype(np.float64) for k, v in w.items()},
                                     x.numpy().astype(np.float64), "fp64"), ref)[1]
    if not exporter.endswith("_folded"):
        assert err < 1e-10, err
        return
    floor = normalised_error(reference(spec, w, x.numpy(), "fp32"), ref)[1]
    assert err <= tolerance(floor), (err, floor)


def test_imported_upsample_and_group_norm_keep_torch_settings():
    torch = pytest.importorskip("torch")
    model = _randomise_norms(torch, _upsampling())
    spec, w = from_onnx(_export(torch, model, torch.randn(1, 3, 5, 5), **TORCH_EXPORTS["torchscript"]))
    ups = [(n.op.mode, n.op.align_corners, n.op.scale, n.op.size) for n in spec.nodes if n.op.kind == "Upsample"]
    assert ups == [("nearest", False, (2.0, 2.0), (20, 20)), ("linear", False, (2.0, 2.0), (20, 20)),
                   ("linear", True, (2.0, 2.0), (20, 20))]
    (ct,) = [n for n in spec.nodes if n.op.kind == "ConvTranspose"]
    assert (ct.op.stride, ct.op.padding, ct.op.output_padding, ct.op.groups) == ((2, 2), ((1, 1), (1, 1)), (1, 1), 2)
    (gn,) = [n for n in spec.nodes if n.op.kind == "GroupNorm"]
    assert gn.op.groups == 2 and gn.op.affine
    np.testing.assert_array_equal(w[f"{gn.name}.weight"], model.gn.weight.detach().numpy())
    np.testing.assert_array_equal(w[f"{gn.name}.bias"], model.gn.bias.detach().numpy())
