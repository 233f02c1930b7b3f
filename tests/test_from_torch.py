"""``hal.from_torch``: torchvision's models and hand-written modules imported through
torch.fx; the numpy float64 forward of the imported spec against the module's own
float64 eval output, and the errors for what hal cannot map."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import hal
from hal.cli import main
from hal.training import TrainConfig
from hal.weights import load_weights

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
nn, F = torch.nn, torch.nn.functional

FP64 = TrainConfig(precision="fp64")


def randomised(module: "nn.Module", seed: int = 0) -> "nn.Module":
    """``module`` in float64 eval mode with BatchNorm statistics and affine parameters
    moved away from 0/1 (so a swapped or dropped one shows)."""
    g = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g, dtype=torch.float64) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=torch.float64) - 0.5)
            for name, p in m.named_parameters(recurse=False):
                if name == "layer_scale":  # ConvNeXt's 1e-6 would hide its branch
                    p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5)
    return module


def check_forward(module: "nn.Module", shape: tuple[int, ...], batch: int = 2) -> hal.ModelSpec:
    """Import ``module`` and assert the numpy float64 forward equals torch's to 1e-12 relative."""
    spec, weights = hal.from_torch(module, shape)
    assert spec.dtype == "float64" and all(w.dtype == np.float64 for w in weights.values())
    state = module.state_dict()
    for k, w in weights.items():  # the module's own parameters under their own names
        np.testing.assert_array_equal(w, state[k].numpy())
    x = np.random.default_rng(1).standard_normal((batch, *shape))
    got = hal.compile(spec, "numpy", weights, FP64).predict(x)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    return spec


TORCHVISION = [  # (model, input size)
    ("resnet18", 32), ("resnext50_32x4d", 32), ("vgg11_bn", 32), ("mobilenet_v2", 32), ("densenet121", 32),
    ("squeezenet1_1", 48), ("shufflenet_v2_x1_0", 32), ("mobilenet_v3_small", 32), ("efficientnet_b0", 32),
    ("regnet_y_400mf", 32), ("convnext_tiny", 32),
]


@pytest.mark.parametrize("model,size", TORCHVISION)
def test_torchvision_model_imports_with_its_own_names_and_outputs(model, size):
    torch.manual_seed(0)
    module = randomised(getattr(torchvision.models, model)(num_classes=10))
    spec = check_forward(module, (3, size, size))
    params = {k for k in module.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(spec.param_shapes()) == params  # every parameter and statistic, nothing else


class TimeMix(nn.Module):
    """A Linear over the width axis (not the channels): hal has no op for it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.mix = nn.Linear(8, 8)

    def forward(self, x):
        return self.mix(self.conv(x))


def test_a_linear_over_a_spatial_axis_is_named():
    with pytest.raises(hal.UnsupportedError, match=r"1 call hal cannot map:\n  mix \(torch\.nn\.modules\.linear"
                       r"\.Linear\) at .*test_from_torch\.py:\d+ in forward: a Linear over the last axis"):
        hal.from_torch(TimeMix(), (3, 8, 8))


class Small(nn.Module):
    """The issue's hand-written example: F.relu, torch.cat, x * s, x.flatten(1), x + y."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        s = torch.sigmoid(self.side(x))
        z = torch.cat([y * s, y + s], 1)
        return self.fc(F.avg_pool2d(z, 2).flatten(1))


def test_hand_written_functional_module_is_exact():
    spec = check_forward(randomised(Small()), (3, 8, 8), batch=3)
    kinds = [n.op.kind for n in spec.nodes]
    assert kinds == ["Input", "Conv", "Activation", "Conv", "Activation", "Mul", "Add", "Concat", "AvgPool",
                     "Flatten", "Dense"]
    assert {"conv", "side", "fc"} <= {n.name for n in spec.nodes}


class LayerScaled(nn.Module):
    """ConvNeXt's pattern: LayerNorm on the channels-last tensor, scaled by a learned parameter."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.layer_scale = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return x + self.layer_scale * self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Patterns(nn.Module):
    """Squeeze-and-excitation, a channel shuffle written out, a chunk, a layer-scaled permuted
    LayerNorm, F.pad, ceil_mode pooling, F.interpolate, a transposed convolution, a mean."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1, bias=False)
        self.gate = nn.Conv2d(16, 16, 1)
        self.block = LayerScaled(16)
        self.up = nn.ConvTranspose2d(16, 4, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        y = y * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(y, 1))) + y
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        first, second = y.chunk(2, dim=1)
        y = self.block(torch.cat((second, F.hardswish(first)), 1))
        y = F.max_pool2d(F.pad(y, [1, 0, 0, 1], mode="reflect"), 2, ceil_mode=True)
        y = self.up(F.interpolate(y, scale_factor=0.5, mode="bilinear", align_corners=False))
        return self.head(F.dropout(y.mean([2, 3], keepdim=True).flatten(1), 0.0))


def test_functional_patterns_are_exact():
    spec = check_forward(randomised(Patterns()), (3, 8, 8), batch=3)
    kinds = {n.op.kind for n in spec.nodes}
    assert {"ChannelShuffle", "ChannelSlice", "Scale", "LayerNorm", "Pad", "Upsample", "ConvTranspose",
            "AdaptiveAvgPool", "MaxPool", "Mul"} <= kinds
    assert "Dropout" not in kinds  # p = 0: folded
    assert spec.node("block").op.kind == "Scale" and spec.node("block.norm").op.kind == "LayerNorm"


class TwoUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.rnn = nn.LSTM(4, 4, batch_first=True)

    def forward(self, x):
        y = torch.cumsum(self.conv(x), dim=2)
        out, _ = self.rnn(y.transpose(1, 2))
        return out


def test_every_unsupported_call_is_named_with_its_source_line():
    with pytest.raises(hal.UnsupportedError) as info:
        hal.from_torch(TwoUnsupported(), (4, 16))
    msg = str(info.value)
    start = inspect.getsourcelines(TwoUnsupported.forward)[1]
    cumsum_line, rnn_line = start + 1, start + 2
    assert "2 calls hal cannot map" in msg
    assert f"torch.cumsum at {__file__}:{cumsum_line} in forward: hal has no op" in msg
    assert f"rnn (torch.nn.modules.rnn.LSTM) at {__file__}:{rnn_line} in forward: hal has no op" in msg


def test_bad_arguments_are_hal_errors():
    with pytest.raises(hal.InputError, match="torch.nn.Module"):
        hal.from_torch(object(), (3, 8, 8))
    with pytest.raises(hal.InputError, match="input_shape"):
        hal.from_torch(Small(), (3, 0, 8))
    with pytest.raises(hal.InputError, match="fails on an input of shape"):
        hal.from_torch(Small(), (5, 8, 8))


def tiny(width: int = 4) -> "nn.Module":
    """A factory for ``hal import``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, 2))


def test_hal_import_writes_a_weights_file_with_the_spec(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert main(["import", f"{__name__}:tiny", "-o", str(out), "--input-shape", "3,9,9",
                 "--kwargs", '{"width": 6}']) == 0
    spec, weights = load_weights(out)
    assert spec.input_shape == (3, 9, 9) and spec.output_shape == (2,)
    state = tiny(6).state_dict()
    assert set(weights) == {k for k in state if not k.endswith("num_batches_tracked")}
    for k, w in weights.items():
        np.testing.assert_array_equal(w, state[k].numpy())
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["nocolon"], "package.module:factory"),
    (["no_such_module_xyz:f"], "cannot import"),
    ([f"{__name__}:missing"], "has no attribute"),
    ([f"{__name__}:tiny", "--kwargs", "[1]"], "JSON object"),
    ([f"{__name__}:tiny", "--kwargs", '{"depth": 1}'], "calling"),
    ([f"{__name__}:tiny", "--input-shape", "3,x"], "C,H,W"),
    ([f"{__name__}:FP64"], "not callable"),
    (["builtins:dict"], "not an nn.Module"),
])
def test_hal_import_misuse_is_one_line_and_status_2(tmp_path, capsys, argv, msg):
    assert main(["import", *argv, "-o", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hal: error: ") and err.count("\n") == 1 and msg in err
    assert not (tmp_path / "m.safetensors").exists()


def test_an_in_place_call_whose_input_is_read_later_is_refused():
    """Eager PyTorch reads the mutated value; a traced graph would silently read the old one."""
    class Aliasing(nn.Module):
        def forward(self, x):
            y = F.relu(x, inplace=True)
            return x + y  # eagerly: relu(x) + relu(x)

    class Fine(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(x + x)  # the in-place input is read by nothing else

    with pytest.raises(hal.UnsupportedError, match="in place"):
        hal.from_torch(Aliasing(), (3, 4, 4))
    spec, _ = hal.from_torch(Fine(), (3, 4, 4))
    assert [n.op.kind for n in spec.nodes] == ["Input", "Add", "Activation"]
