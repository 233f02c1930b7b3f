"""The model zoo: ResNet variants, input sizes, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hal.errors import SpecError
from hal.models import (ZOO, convnext, densenet, efficientnet, get, mobilenet_v2, mobilenet_v3, regnet, resnet,
                        shufflenet_v2, small_cnn, squeezenet, vgg)
from hal.spec import Conv


def _halvings(n: int, times: int = 5) -> int:
    """conv1 (k7 s2 p3), maxpool (k3 s2 p1) and three stride-2 stages each map n -> ceil(n / 2)."""
    for _ in range(times):
        n = math.ceil(n / 2)
    return n


def test_v1_and_v1_5_differ_only_in_where_the_stride_sits():
    a, b = resnet(50, input_size=64, variant="v1"), resnet(50, input_size=64, variant="v1.5")
    assert [n.name for n in a.nodes] == [n.name for n in b.nodes]
    assert a.num_params == b.num_params and a.output_shape == b.output_shape
    moved = {f"layer{s}.0.{c}" for s in (2, 3, 4) for c in ("conv1", "conv2")}
    for na, nb in zip(a.nodes, b.nodes):
        if na.name in moved:
            assert isinstance(na.op, Conv)
            assert na.op != nb.op
            # only the stride differs
            assert {**na.op.attrs(), "stride": None} == {**nb.op.attrs(), "stride": None}
            if na.name.endswith("conv1"):
                assert (na.op.kernel, na.op.stride, nb.op.stride) == ((1, 1), (2, 2), (1, 1))
            else:
                assert (na.op.kernel, na.op.stride, nb.op.stride) == ((3, 3), (1, 1), (2, 2))
        else:
            assert na.op == nb.op and na.inputs == nb.inputs, na.name
    # shapes differ exactly at the nodes between the two stride positions
    differ = {n.name for n in a.nodes if a.shape(n.name) != b.shape(n.name)}
    assert differ == {f"layer{s}.0.{x}" for s in (2, 3, 4) for x in ("conv1", "bn1", "relu1")}
    for s, hw in ((2, 8), (3, 4), (4, 2)):
        assert a.shape(f"layer{s}.0.conv1")[1:] == (hw, hw)  # v1: already strided
        assert b.shape(f"layer{s}.0.conv1")[1:] == (2 * hw, 2 * hw)  # v1.5: not yet
    # v1 does a quarter of the 3x3 FLOPs in those blocks and fewer 1x1 ones: cheaper
    assert a.flops < b.flops


def test_basic_block_resnets_have_no_variant_difference():
    assert resnet(18, input_size=64, variant="v1").to_dict()["nodes"] == resnet(18, input_size=64).to_dict()["nodes"]


@pytest.mark.parametrize("size", [64, 97, (64, 80), (33, 200), 1])
@pytest.mark.parametrize("depth", [18, 50])
def test_any_input_size_builds(depth, size):
    spec = resnet(depth, num_classes=7, input_size=size)
    h, w = (size, size) if isinstance(size, int) else size
    final = spec.shape("layer4.1.relu2" if depth == 18 else "layer4.2.relu3")
    assert final == (512 if depth == 18 else 2048, _halvings(h), _halvings(w))
    assert spec.output_shape == (7,)
    assert spec.input_shape == (3, h, w)


def test_input_size_matches_torch_shapes():
    """Every ResNet node shape equals what torch's own layers produce (non-square, odd size)."""
    torch = pytest.importorskip("torch")
    from hal.backends.torch import build_module
    from hal.weights import init_weights

    spec = resnet(18, num_classes=4, input_size=(45, 70))
    module = build_module(spec, init_weights(spec)).eval()
    got = {}
    for n in spec.nodes[1:]:
        module.node_module(n.name).register_forward_hook(
            lambda m, i, o, name=n.name: got.__setitem__(name, tuple(o.shape[1:])))
    with torch.no_grad():
        module(torch.zeros(1, *spec.input_shape))
    assert got == {n.name: spec.shape(n.name) for n in spec.nodes[1:]}


@pytest.mark.parametrize("size", [0, -3, (0, 64), (64, 0)])
def test_too_small_or_empty_input_raises(size):
    with pytest.raises(SpecError) as ei:
        resnet(18, input_size=size)
    assert ei.value.node == "input"


def test_small_cnn_too_small_input_names_the_node():
    with pytest.raises(SpecError) as ei:
        small_cnn(input_size=1)
    assert ei.value.node == "pool1"
    assert small_cnn(input_size=2).output_shape == (10,)


def test_in_channels_and_classes():
    spec = resnet(18, num_classes=3, input_size=32, in_channels=1)
    assert spec.input_shape == (1, 32, 32) and spec.output_shape == (3,)
    assert spec.param_shapes()["conv1.weight"] == (64, 1, 7, 7)
    assert spec.param_shapes()["fc.weight"] == (3, 512)


def test_torchvision_names():
    names = set(resnet(50).param_shapes())
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
              "layer4.2.conv3.weight", "layer4.2.bn3.weight", "fc.weight", "fc.bias"):
        assert k in names
    assert "layer1.1.downsample.0.weight" not in names
    assert not any(k.startswith("conv1.bias") for k in names)


@pytest.mark.parametrize("kwargs", [dict(depth=20), dict(depth=50, variant="v2"), dict(depth=50, variant=None)])
def test_bad_resnet_arguments(kwargs):
    with pytest.raises(SpecError):
        resnet(**kwargs)


def test_zoo_unknown_name_lists_names():
    with pytest.raises(SpecError) as ei:
        get("resnet51")
    for name in ("resnet18", "resnet50", "small_cnn"):
        assert name in str(ei.value)


def test_zoo_bad_arguments():
    with pytest.raises(SpecError, match="resnet50"):
        get("resnet50", colour="blue")


def test_zoo_builds_everything():
    for name in ZOO:
        spec = get(name, num_classes=5, input_size=32)
        dense = name.startswith("unet")  # one output per pixel (voxel)
        assert spec.output_shape == ((5, *spec.input_shape[1:]) if dense else (5,)), name


def test_small_cnn_uses_every_first_wave_op():
    kinds = {n.op.kind for n in small_cnn(dropout=0.2).nodes}
    # the spec's first op table but GlobalAvgPool; the ops added since are exercised by the zoo (below)
    assert kinds == {"Input", "Conv", "BatchNorm", "Activation", "MaxPool", "AvgPool", "Add", "Concat", "Flatten",
                     "Dense", "Dropout"}
    acts = {n.op.fn for n in small_cnn().nodes if n.op.kind == "Activation"}
    assert acts == {"relu", "leaky_relu", "silu", "gelu", "tanh", "sigmoid"}
    pads = [n.op.padding for n in small_cnn().nodes if n.op.kind in ("Conv", "MaxPool", "AvgPool")]
    assert any(a != b for p in pads for a, b in p)  # an asymmetric SAME padding is exercised


def test_the_zoo_exercises_the_ops_its_architectures_have():
    from hal.spec import OPS

    used = {n.op.kind for name in ZOO for n in get(name, num_classes=5, input_size=32).nodes}
    # no torchvision classifier of the zoo, nor the U-Net, has these (the conformance suite covers them)
    assert set(OPS) - used == {"AdaptiveMaxPool", "GroupNorm", "InstanceNorm", "PReLU", "Pad", "Upsample"}


@pytest.mark.parametrize("name", [None, 3, ["resnet18"], {"a": 1}])
def test_get_unknown_name_types(name):
    with pytest.raises(SpecError, match="unknown model"):
        get(name)


@pytest.mark.parametrize("kwargs", [{"input_size": "x"}, {"input_size": (32, 32, 3)}, {"input_size": True},
                                    {"depth": [50]}, {"depth": "50"}, {"variant": ["v1"]}, {"num_classes": "10"},
                                    {"bogus": 1}])
def test_resnet_bad_arguments(kwargs):
    with pytest.raises(SpecError):
        get("resnet18", **{k: v for k, v in kwargs.items() if k != "depth"}) if "depth" not in kwargs else resnet(**kwargs)


def test_resnet_accepts_numpy_ints_and_a_pair():
    import numpy as np

    assert resnet(np.int64(18), input_size=(np.int64(32), 48)).input_shape == (3, 32, 48)


@pytest.mark.parametrize("dropout", ["0.5", None, [0.1], True])
def test_small_cnn_bad_dropout(dropout):
    with pytest.raises(SpecError, match="dropout"):
        small_cnn(dropout=dropout)


def _torch_unet(nd: int, in_channels: int, classes: int, features: int, depth: int):
    """An independent torch U-Net, written from the architecture, with hal's module names."""
    torch = pytest.importorskip("torch")
    nn, F = torch.nn, torch.nn.functional
    conv, norm, up = {2: (nn.Conv2d, nn.BatchNorm2d, nn.ConvTranspose2d),
                      3: (nn.Conv3d, nn.BatchNorm3d, nn.ConvTranspose3d)}[nd]
    pool = F.max_pool2d if nd == 2 else F.max_pool3d

    def double(cin: int, c: int) -> dict:
        return {"conv1": conv(cin, c, 3, padding=1, bias=False), "bn1": norm(c),
                "conv2": conv(c, c, 3, padding=1, bias=False), "bn2": norm(c)}

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = [in_channels] + [features * 2**i for i in range(depth + 1)]
            for i in range(depth):
                self.add_module(f"down{i}", nn.ModuleDict(double(widths[i], widths[i + 1])))
                self.add_module(f"up{i}", nn.ModuleDict(
                    {"upconv": up(widths[i + 2], widths[i + 1], 2, stride=2), **double(widths[i + 2], widths[i + 1])}))
            self.bottom = nn.ModuleDict(double(widths[depth], widths[depth + 1]))
            self.head = conv(features, classes, 1)

        def forward(self, x):
            def block(m, x):
                return F.relu(m["bn2"](m["conv2"](F.relu(m["bn1"](m["conv1"](x))))))

            skips = []
            for i in range(depth):
                skips.append(block(getattr(self, f"down{i}"), x))
                x = pool(skips[-1], 2)
            x = block(self.bottom, x)
            for i in reversed(range(depth)):
                m = getattr(self, f"up{i}")
                x = block(m, torch.cat([skips[i], m["upconv"](x)], 1))
            return self.head(x)

    torch.manual_seed(0)
    model = UNet().double()
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith(("running_var", "bn1.weight", "bn2.weight")):
                t.uniform_(0.5, 1.5)
            elif key.endswith(("running_mean", "bias")):
                t.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("nd, size", [(2, (8, 12)), (3, (4, 8, 4))])
def test_unet_matches_an_independent_torch_unet(nd, size):
    """Transposed convs, skip concatenation and the head against torch's own layers in float64."""
    import hal
    from hal.parity import normalised_error
    from hal.weights import from_state_dict

    torch = pytest.importorskip("torch")
    model = _torch_unet(nd, 2, 3, features=4, depth=2)
    name = "unet" if nd == 2 else "unet3d"
    spec = get(name, num_classes=3, input_size=size, in_channels=2, features=4, depth=2)
    assert spec.output_shape == (3, *size)
    x = np.random.default_rng(0).standard_normal((2, 2, *size))
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    weights = from_state_dict(spec, model.state_dict())
    got = hal.compile(spec, "numpy", weights, hal.TrainConfig(precision="fp64")).predict(x)
    assert normalised_error(got, want)[1] < 1e-12


@pytest.mark.parametrize("kwargs", [dict(input_size=(12, 16)), dict(input_size=(16, 16, 16)), dict(ndim=1),
                                    dict(depth=0), dict(features=2.5), dict(input_size=True)])
def test_unet_bad_arguments(kwargs):
    with pytest.raises(SpecError, match="unet"):
        get("unet", **kwargs)


@pytest.mark.parametrize("build, kwargs, words", [
    (vgg, dict(depth=12), "vgg depth"), (vgg, dict(batch_norm="yes"), "vgg batch_norm"),
    (densenet, dict(depth=100), "densenet depth"), (squeezenet, dict(version="1_2"), "squeezenet version"),
    (mobilenet_v2, dict(width_mult=0), "mobilenet_v2 width_mult"), (mobilenet_v3, dict(arch="medium"), "mobilenet_v3"),
    (regnet, dict(name="regnet_z_1gf"), "regnet name"), (efficientnet, dict(variant="b8"), "efficientnet variant"),
    (shufflenet_v2, dict(width="x3_0"), "shufflenet_v2 width"), (convnext, dict(size="huge"), "convnext size"),
    (resnet, dict(depth=18, groups=32), "basic blocks"), (resnet, dict(width_per_group=0), "width_per_group"),
    (efficientnet, dict(input_size="x"), "efficientnet_b0 input_size"), (vgg, dict(input_size=16), "features.43"),
])
def test_zoo_bad_arguments_name_the_model(build, kwargs, words):
    with pytest.raises(SpecError) as ei:
        build(**kwargs)
    assert words in f"{ei.value} {ei.value.node}"


def test_resnext_and_wide_resnet_widen_only_the_bottleneck():
    base, rx, wide = resnet(50), get("resnext50_32x4d"), get("wide_resnet50_2")
    assert (rx.name, wide.name) == ("resnext50_32x4d", "wide_resnet50_2")
    for spec, groups in ((rx, 32), (wide, 1)):
        conv2 = spec.node("layer1.0.conv2").op
        assert (conv2.out_channels, conv2.groups) == (128, groups)  # twice resnet50's 64 channels
        assert spec.shape("layer4.2.conv3") == base.shape("layer4.2.conv3")  # block outputs unchanged
