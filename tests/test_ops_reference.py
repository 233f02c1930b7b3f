"""The float64 numpy reference of the issue-10 ops against PyTorch in float64
(``torch.nn.functional``, ``torch.nn`` and ``torchvision.ops`` definitions), on many
shapes and attributes including the edge cases where frameworks differ."""

from __future__ import annotations

import numpy as np
import pytest

import hal
from hal.spec import SpecBuilder
from hal.training import TrainConfig

torch = pytest.importorskip("torch")
F = torch.nn.functional

FP64 = TrainConfig(precision="fp64")


def T(a: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def close(got: np.ndarray, want: "torch.Tensor") -> None:
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    assert got.dtype == np.float64 and got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * max(1.0, float(np.abs(want).max(initial=0.0))))


def run(shape, add, batch=3, seed=0, scale=1.0, weights=None):
    """``(out, x, w)``: the spec ``input -> add(builder, x)`` on numpy in float64, random
    weights (``weights`` overrides some) and a normal batch times ``scale``."""
    b = SpecBuilder("op")
    spec = b.build(add(b, b.input(shape, dtype="float64")))
    r = np.random.default_rng(seed)
    w = {k: r.uniform(0.5, 1.5, s) for k, s in spec.param_shapes().items()}
    w.update(weights or {})
    x = r.standard_normal((batch, *shape)) * scale
    return hal.compile(spec, "numpy", w, FP64).predict(x), x, w


def weight(w, suffix):
    (k,) = [k for k in w if k.endswith(suffix)]
    return T(w[k])


# ---------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------

ACTIVATIONS = [  # fn, builder keywords, torch
    ("relu6", {}, F.relu6),
    ("hardsigmoid", {}, F.hardsigmoid),
    ("hardswish", {}, F.hardswish),
    ("elu", {"alpha": 1.0}, lambda t: F.elu(t)),
    ("elu", {"alpha": 0.3}, lambda t: F.elu(t, alpha=0.3)),
    ("mish", {}, F.mish),
    ("silu", {}, F.silu),
    ("gelu", {}, F.gelu),
    ("gelu", {"approximate": "tanh"}, lambda t: F.gelu(t, approximate="tanh")),
]


@pytest.mark.parametrize("fn,kw,ref", ACTIVATIONS, ids=lambda v: str(v) if isinstance(v, (str, dict)) else "")
@pytest.mark.parametrize("shape", [(7,), (3, 8), (2, 5, 6), (2, 3, 4, 3)])
def test_activation(fn, kw, ref, shape):
    got, x, _ = run(shape, lambda b, x: b.activation(x, fn, **kw), scale=5.0)  # past -3, 3 and 6
    close(got, ref(T(x)))


@pytest.mark.parametrize("beta,threshold", [(1.0, 20.0), (2.0, 1.0), (0.5, 3.0), (3.0, 0.0)])
def test_softplus_beta_and_threshold(beta, threshold):
    got, x, _ = run((4, 9), lambda b, x: b.softplus(x, beta, threshold), scale=30.0)
    close(got, F.softplus(T(x), beta=beta, threshold=threshold))


def test_activations_do_not_overflow_far_out():
    x = np.array([[-800.0, -40.0, 0.0, 40.0, 800.0]])
    for fn, ref in (("mish", F.mish), ("softplus", F.softplus), ("elu", F.elu)):
        b = SpecBuilder("far")
        spec = b.build(b.activation(b.input((5,), dtype="float64"), fn, alpha=1.0))
        with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is right
            got = hal.compile(spec, "numpy", {}, FP64).predict(x)
        close(got, ref(T(x)))


@pytest.mark.parametrize("shape,num", [((5,), 1), ((5,), 5), ((3, 7), 3), ((4, 3, 5), 1), ((4, 3, 5), 4),
                                       ((2, 3, 2, 3), 2)])
def test_prelu(shape, num):
    got, x, w = run(shape, lambda b, x: b.prelu(x, num), scale=2.0)
    close(got, F.prelu(T(x), weight(w, ".weight")))


# ---------------------------------------------------------------------------
# broadcasting Add and Mul, layer scale
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pools", [
    [(4, 5)],  # SE: (3, 1, 1) with (3, 4, 5)
    [(4, 1), (1, 5)],  # (3, 1, 5) with (3, 4, 1): the output is larger than either input
    [(1, 1), (4, 5), (1, 5)],
])
@pytest.mark.parametrize("kind", ["add", "mul"])
def test_broadcasting_add_and_mul(pools, kind):
    def build(b, x):
        ins = [b.avg_pool(x, k) if k != (1, 1) else x for k in pools]
        return getattr(b, kind)(*ins, b.activation(x, "tanh")) if len(ins) == 1 else getattr(b, kind)(*ins)

    got, x, _ = run((3, 4, 5), build)
    t = T(x)
    terms = [F.avg_pool2d(t, k) if k != (1, 1) else t for k in pools] + ([torch.tanh(t)] if len(pools) == 1 else [])
    want = terms[0]
    for term in terms[1:]:
        want = want + term if kind == "add" else want * term
    close(got, want)


@pytest.mark.parametrize("shape", [(6,), (3, 7), (4, 3, 5), (2, 3, 2, 3)])
def test_layer_scale_is_torchvisions(shape):
    got, x, w = run(shape, lambda b, x: b.scale(x))
    layer_scale = weight(w, ".layer_scale")
    assert layer_scale.shape == (shape[0], *[1] * (len(shape) - 1))  # CNBlock: (dim, 1, 1)
    close(got, layer_scale * T(x))  # CNBlock.forward: self.layer_scale * self.block(input)


# ---------------------------------------------------------------------------
# LayerNorm (channels-first), GroupNorm, InstanceNorm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6,), (3, 7), (4, 3, 5), (2, 3, 2, 3)])
@pytest.mark.parametrize("eps,affine", [(1e-5, True), (1e-6, True), (1e-3, False)])
def test_layer_norm_is_convnexts_channels_first_form(shape, eps, affine):
    got, x, w = run(shape, lambda b, x: b.layer_norm(x, eps, affine), scale=3.0)
    last = T(np.moveaxis(x, 1, -1))  # torchvision LayerNorm2d: permute to channels-last, nn.LayerNorm(C), back
    args = (weight(w, ".weight"), weight(w, ".bias")) if affine else (None, None)
    close(got, torch.movedim(F.layer_norm(last, (shape[0],), *args, eps=eps), -1, 1))


@pytest.mark.parametrize("shape,groups", [((6,), 3), ((4, 7), 2), ((6, 3, 5), 3), ((6, 3, 5), 6), ((6, 3, 5), 1),
                                          ((4, 2, 3, 2), 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm(shape, groups, affine):
    got, x, w = run(shape, lambda b, x: b.group_norm(x, groups, eps=1e-4, affine=affine), scale=3.0)
    args = (weight(w, ".weight"), weight(w, ".bias")) if affine else (None, None)
    close(got, F.group_norm(T(x), groups, *args, eps=1e-4))


@pytest.mark.parametrize("shape", [(3, 7), (4, 3, 5), (2, 3, 2, 3), (3, 1, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm(shape, affine):
    got, x, w = run(shape, lambda b, x: b.instance_norm(x, eps=1e-3, affine=affine), scale=3.0)
    args = dict(weight=weight(w, ".weight"), bias=weight(w, ".bias")) if affine else {}
    close(got, F.instance_norm(T(x), eps=1e-3, **args))


def test_norms_are_the_same_in_training_mode():
    for add in (lambda b, x: b.layer_norm(x), lambda b, x: b.group_norm(x, 2), lambda b, x: b.instance_norm(x)):
        b = SpecBuilder("t")
        spec = b.build(add(b, b.input((4, 3, 5), dtype="float64")))
        exe = hal.compile(spec, "numpy", hal.init_weights(spec), FP64)
        x = np.random.default_rng(1).standard_normal((2, 4, 3, 5))
        np.testing.assert_array_equal(exe.predict(x, training=True), exe.predict(x))


# ---------------------------------------------------------------------------
# ceil_mode pooling, adaptive pooling, standalone padding
# ---------------------------------------------------------------------------

POOLS = {1: (F.max_pool1d, F.avg_pool1d), 2: (F.max_pool2d, F.avg_pool2d), 3: (F.max_pool3d, F.avg_pool3d)}
CEIL = [  # shape, kernel, stride, symmetric padding
    ((2, 6, 7), 3, 2, 0),
    ((2, 5, 6), 3, 2, 1),  # the last ceil window would start in the right padding: torch drops it
    ((2, 7, 7), 2, 2, 1),
    ((2, 8, 8), 3, 3, 1),
    ((2, 5, 9), (3, 2), (2, 3), (1, 1)),
    ((3, 10), 4, 3, 2),
    ((3, 11), 3, 4, 1),
    ((2, 5, 4, 6), 2, 2, 1),
    ((2, 3, 3), 3, 2, 1),
]


@pytest.mark.parametrize("shape,k,s,p", CEIL)
@pytest.mark.parametrize("kind", ["max", "avg_incl", "avg_excl"])
@pytest.mark.parametrize("ceil_mode", [True, False])
def test_pooling_ceil_mode(shape, k, s, p, kind, ceil_mode):
    nd = len(shape) - 1
    if kind == "max":
        got, x, _ = run(shape, lambda b, x: b.max_pool(x, k, s, p, ceil_mode=ceil_mode))
        close(got, POOLS[nd][0](T(x), k, s, p, ceil_mode=ceil_mode))
    else:
        incl = kind == "avg_incl"
        got, x, _ = run(shape, lambda b, x: b.avg_pool(x, k, s, p, count_include_pad=incl, ceil_mode=ceil_mode))
        close(got, POOLS[nd][1](T(x), k, s, p, ceil_mode=ceil_mode, count_include_pad=incl))


@pytest.mark.parametrize("shape,out", [
    ((3, 10), 4), ((3, 7), 7), ((3, 5), 8), ((3, 6, 7), 1), ((3, 5, 7), (3, 2)), ((2, 3, 2), (4, 5)),
    ((2, 13, 11), (5, 3)), ((2, 4, 5, 3), (2, 3, 1)), ((2, 5, 5, 5), (3, 4, 2)),
])
def test_adaptive_pooling(shape, out):
    nd = len(shape) - 1
    got, x, _ = run(shape, lambda b, x: b.adaptive_avg_pool(x, out))
    close(got, getattr(F, f"adaptive_avg_pool{nd}d")(T(x), out))
    got, x, _ = run(shape, lambda b, x: b.adaptive_max_pool(x, out))
    close(got, getattr(F, f"adaptive_max_pool{nd}d")(T(x), out))


def _flat(padding):
    return [v for pair in reversed(padding) for v in pair]


@pytest.mark.parametrize("shape,padding", [
    ((2, 6), ((5, 0),)), ((2, 6), ((2, 3),)), ((2, 4, 5), ((3, 1), (4, 2))), ((2, 4, 5), ((0, 0), (1, 4))),
    ((2, 3, 4, 3), ((2, 1), (0, 3), (1, 2))), ((2, 2, 2, 2), ((1, 1), (1, 1), (1, 1))),
])
@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_pad(shape, padding, mode):
    got, x, _ = run(shape, lambda b, x: b.pad(x, padding, mode))
    close(got, F.pad(T(x), _flat(padding), mode=mode))
    if mode == "constant":
        got, x, _ = run(shape, lambda b, x: b.pad(x, padding, value=-2.5))
        close(got, F.pad(T(x), _flat(padding), value=-2.5))


# ---------------------------------------------------------------------------
# channel shuffle and slices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,groups", [((6, 3, 4), 2), ((6, 2, 3), 3), ((6, 5), 6), ((8, 3), 1), ((4, 2, 2, 3), 2)])
def test_channel_shuffle_is_torchs(shape, groups):
    got, x, _ = run(shape, lambda b, x: b.channel_shuffle(x, groups))
    close(got, torch.nn.ChannelShuffle(groups)(T(x)))
    # torchvision.models.shufflenetv2.channel_shuffle writes it as view, transpose, view
    n, c = x.shape[:2]
    close(got, T(x).view(n, groups, c // groups, *shape[1:]).transpose(1, 2).reshape(x.shape))


def test_channel_slices_are_chunk():
    got, x, _ = run((6, 3, 4), lambda b, x: b.concat(b.channel_slice(x, 3, 6), b.channel_slice(x, 0, 3)))
    x1, x2 = T(x).chunk(2, dim=1)
    close(got, torch.cat((x2, x1), dim=1))


# ---------------------------------------------------------------------------
# upsampling
# ---------------------------------------------------------------------------

UPSAMPLES = [  # shape, size, scale
    ((2, 5), None, 2.0), ((2, 5), None, 3.0), ((2, 5), None, 1.5), ((2, 7), None, 0.5), ((2, 5), None, 1.1),
    ((2, 5), 8, None), ((2, 6), 3, None), ((2, 1), 4, None), ((2, 4), 1, None),
    ((2, 5, 3), None, 1.5), ((2, 3, 4), None, (2.0, 3.0)), ((2, 5, 7), (8, 3), None), ((2, 4, 5), None, (1.5, 2.5)),
    ((2, 3, 4, 5), None, 1.5), ((2, 3, 2, 3), (5, 4, 7), None), ((2, 2, 3, 2), None, (2.0, 1.5, 3.0)),
]
_TORCH_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


@pytest.mark.parametrize("shape,size,scale", UPSAMPLES, ids=str)
@pytest.mark.parametrize("mode,align_corners", [("nearest", None), ("linear", False), ("linear", True)])
def test_upsample(shape, size, scale, mode, align_corners):
    nd = len(shape) - 1
    torch_mode = _TORCH_LINEAR[nd] if mode == "linear" else mode
    got, x, _ = run(shape, lambda b, x: b.upsample(x, size, scale, torch_mode, align_corners))
    close(got, F.interpolate(T(x), size=size, scale_factor=scale, mode=torch_mode, align_corners=align_corners))


def test_upsample_scale_and_size_map_coordinates_differently():
    """scale 1.5 on 5 gives 7 outputs; torch maps them by 1/1.5, not by 5/7: the spec keeps the scale."""
    by_scale, x, _ = run((2, 5), lambda b, x: b.upsample(x, scale=1.5, mode="linear"))
    by_size, _, _ = run((2, 5), lambda b, x: b.upsample(x, size=7, mode="linear"))
    close(by_size, F.interpolate(T(x), size=7, mode="linear"))
    assert np.abs(by_scale - by_size).max() > 1e-3


@pytest.mark.parametrize("scale", [(1.1, 2.0), (1.1, 1.1), 1.2])
def test_upsample_linear_copies_a_dim_that_keeps_its_size(scale):
    """torch: scale 1.1 on 5 keeps 5 and that dim is copied in linear modes (not in nearest)."""
    got, x, _ = run((2, 5, 4), lambda b, x: b.upsample(x, scale=scale, mode="bilinear"))
    close(got, F.interpolate(T(x), scale_factor=scale, mode="bilinear"))
    if scale == (1.1, 1.1):
        close(got, T(x))


# ---------------------------------------------------------------------------
# transposed convolution
# ---------------------------------------------------------------------------

TRANSPOSED = [  # shape, out, kernel, stride, padding (torch's int), output_padding, groups, dilation, bias
    ((3, 5), 4, 3, 2, 1, 1, 1, 1, True),
    ((4, 6), 6, 4, 3, 0, 2, 2, 1, False),
    ((4, 5), 4, 3, 1, 2, 0, 4, 2, True),  # depthwise, dilated, padding beyond the kernel's reach
    ((2, 4), 3, 2, 1, 0, 0, 1, 3, True),
    ((3, 4, 5), 4, 3, 2, 1, 1, 1, 1, True),  # U-Net's upsampling: 2x with output_padding
    ((3, 4, 5), 2, 2, 2, 0, 0, 1, 1, True),
    ((4, 3, 4), 6, (3, 2), (2, 3), (1, 0), (1, 2), 2, (1, 2), True),
    ((4, 3, 3), 4, 3, 1, 1, 0, 2, 2, False),
    ((6, 2, 3), 3, 3, 3, 2, 1, 3, 1, True),  # output_padding < stride, padding 2
    ((2, 2, 3, 2), 4, 3, 2, 1, 1, 1, 1, True),
    ((4, 2, 2, 3), 2, (2, 3, 2), (1, 2, 2), (0, 1, 1), (0, 1, 0), 2, (2, 1, 1), True),
]


@pytest.mark.parametrize("shape,out,k,s,p,q,g,d,bias", TRANSPOSED, ids=str)
def test_conv_transpose_is_torchs(shape, out, k, s, p, q, g, d, bias):
    got, x, w = run(shape, lambda b, x: b.conv_transpose(x, out, k, s, p, q, g, d, bias))
    nd = len(shape) - 1
    want = getattr(F, f"conv_transpose{nd}d")(T(x), weight(w, ".weight"), weight(w, ".bias") if bias else None,
                                              s, p, q, g, d)
    close(got, want)


@pytest.mark.parametrize("padding", [((2, 0), (0, 1)), ((0, 3), (1, 1)), ((1, 2), (2, 0))])
def test_conv_transpose_asymmetric_padding_crops_the_full_output(padding):
    from hal.lowering import torch_conv_transpose

    got, x, w = run((3, 4, 5), lambda b, x: b.conv_transpose(x, 2, 3, 2, padding, 1))
    full = F.conv_transpose2d(T(x), weight(w, ".weight"), weight(w, ".bias"), 2, 0, 1)
    (a0, b0), (a1, b1) = padding
    close(got, full[:, :, a0 : full.shape[2] - b0, a1 : full.shape[3] - b1])
    # the helper's torch arguments: pad min(before, after), then crop the rest
    b = SpecBuilder("t")
    op = b.build(b.conv_transpose(b.input((3, 4, 5)), 2, 3, 2, padding, 1)).nodes[-1].op
    pad, crop = torch_conv_transpose(op)
    y = F.conv_transpose2d(T(x), weight(w, ".weight"), weight(w, ".bias"), 2, pad, 1)
    close(got, y[:, :, crop[0][0] : y.shape[2] - crop[0][1], crop[1][0] : y.shape[3] - crop[1][1]])


@pytest.mark.parametrize("shape,out,k,s,p,q,g,d,bias", TRANSPOSED[:8], ids=str)
def test_conv_transpose_padding_is_a_convolution_of_the_dilated_input(shape, out, k, s, p, q, g, d, bias):
    """hal.lowering.conv_transpose_padding: lax's form (lhs dilation, flipped, swapped kernel)."""
    from hal.lowering import conv_transpose_padding

    b = SpecBuilder("t")
    spec = b.build(b.conv_transpose(b.input(shape, dtype="float64"), out, k, s, p, q, g, d, bias))
    op = spec.nodes[-1].op
    got, x, w = run(shape, lambda b, x: b.conv_transpose(x, out, k, s, p, q, g, d, bias))
    nd, cin = len(shape) - 1, shape[0]
    xd = np.zeros((x.shape[0], cin, *[(m - 1) * st + 1 for m, st in zip(shape[1:], op.stride)]))
    xd[(slice(None), slice(None), *(slice(None, None, st) for st in op.stride))] = x
    pads = conv_transpose_padding(op)
    xd = T(xd)
    for i, (a, bb) in enumerate(pads):  # negative pads crop
        xd = torch.narrow(F.pad(xd.movedim(2 + i, -1), (max(a, 0), max(bb, 0))), -1, max(-a, 0),
                          xd.shape[2 + i] + max(a, 0) + max(bb, 0) - max(-a, 0) - max(-bb, 0)).movedim(-1, 2 + i)
    wt = weight(w, ".weight")  # (in, out/g, *k) -> (out, in/g, *k), flipped
    wt = wt.reshape(g, cin // g, out // g, *op.kernel).transpose(1, 2).reshape(out, cin // g, *op.kernel)
    wt = torch.flip(wt, dims=tuple(range(2, 2 + nd)))
    conv = getattr(F, f"conv{nd}d")(xd, wt, weight(w, ".bias") if bias else None, 1, 0, op.dilation, g)
    close(got, conv)


def test_dense_over_channels_is_linear_on_the_channels_last_view():
    """ConvNeXt's pointwise nn.Linear: (N, C, H, W) -> permute -> linear -> permute back."""
    import torch

    b = SpecBuilder("pw")
    spec = b.build(b.dense(b.input((3, 4, 5)), 6, name="fc"))
    assert spec.output_shape == (6, 4, 5)
    w = hal.init_weights(spec, 1)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    got = hal.compile(spec, "numpy", w, TrainConfig(precision="fp64")).predict(x)
    lin = torch.nn.functional.linear(torch.from_numpy(x).permute(0, 2, 3, 1), torch.from_numpy(w["fc.weight"].astype(np.float64)),
                                     torch.from_numpy(w["fc.bias"].astype(np.float64)))
    np.testing.assert_allclose(got, lin.permute(0, 3, 1, 2).numpy(), rtol=1e-12, atol=1e-12)
