"""ModelSpec: validation, shape inference (against torch), same padding (against
JAX and torch), FLOPs/params (against hand counts and published numbers), JSON
round trip and hash."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hal.errors import SpecError
from hal.spec import (
    Activation,
    Add,
    AvgPool,
    BatchNorm,
    ChannelShuffle,
    ChannelSlice,
    Concat,
    Conv,
    ConvTranspose,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    GroupNorm,
    Init,
    Input,
    InstanceNorm,
    LayerNorm,
    MaxPool,
    ModelSpec,
    Mul,
    Node,
    AdaptiveAvgPool,
    AdaptiveMaxPool,
    Pad,
    PReLU,
    Scale,
    SpecBuilder,
    StochasticDepth,
    Upsample,
    pool_out,
    same_padding,
)

P0 = ((0, 0), (0, 0))
P1 = ((1, 1), (1, 1))


def conv2d(out, k=3, s=1, p=P1, d=1, groups=1, bias=True):
    return Conv(out, (k, k), (s, s), p, (d, d), groups, bias)


def inp(shape=(3, 8, 8), name="input", dtype="float32"):
    return Node(name, Input(tuple(shape), dtype))


def raises_at(nodes, node, output="", match=None):
    """ModelSpec(nodes) raises SpecError naming ``node``."""
    with pytest.raises(SpecError) as ei:
        ModelSpec("bad", tuple(nodes), output)
    assert ei.value.node == node, str(ei.value)
    if node is not None:
        assert repr(node) in str(ei.value)
    if match:
        assert match in str(ei.value), str(ei.value)
    return ei.value


# ---------------------------------------------------------------------------
# validation: every malformed graph raises SpecError naming the node
# ---------------------------------------------------------------------------


class TestValidation:
    def test_unknown_input_name(self):
        raises_at([inp(), Node("r", Activation("relu"), ("nope",))], "r", match="nope")

    def test_cycle(self):
        nodes = [
            inp(),
            Node("a", Add(), ("input", "b")),
            Node("b", Activation("relu"), ("a",)),
            Node("out", Activation("tanh"), ("b",)),
        ]
        with pytest.raises(SpecError) as ei:
            ModelSpec("bad", tuple(nodes))
        assert ei.value.node in ("a", "b") and "cycle" in str(ei.value)

    def test_self_loop(self):
        raises_at([inp(), Node("a", Activation("relu"), ("a",))], "a", match="cycle")

    def test_add_shape_mismatch(self):
        nodes = [inp(), Node("c", conv2d(3, s=2), ("input",)), Node("add", Add(), ("input", "c"))]
        raises_at(nodes, "add", match="equal across inputs or 1")

    def test_add_rank_mismatch(self):
        nodes = [inp(), Node("g", GlobalAvgPool(), ("input",)), Node("add", Add(), ("input", "g"))]
        raises_at(nodes, "add")

    def test_concat_spatial_mismatch(self):
        nodes = [inp(), Node("c", conv2d(3, s=2), ("input",)), Node("cat", Concat(), ("input", "c"))]
        raises_at(nodes, "cat")

    def test_concat_rank_mismatch(self):
        nodes = [inp(), Node("g", GlobalAvgPool(), ("input",)), Node("cat", Concat(), ("input", "g"))]
        raises_at(nodes, "cat")

    def test_concat_of_different_channel_counts_is_fine(self):
        nodes = [inp(), Node("c", conv2d(5), ("input",)), Node("cat", Concat(), ("input", "c"))]
        assert ModelSpec("ok", tuple(nodes)).output_shape == (8, 8, 8)

    @pytest.mark.parametrize("cin,out,groups", [(3, 4, 2), (4, 6, 4), (4, 4, 3)])
    def test_conv_groups_not_dividing(self, cin, out, groups):
        raises_at([inp((cin, 8, 8)), Node("c", conv2d(out, groups=groups), ("input",))], "c", match="groups")

    @pytest.mark.parametrize(
        "op",
        [
            conv2d(0),
            conv2d(-2),
            Conv(4, (0, 3), (1, 1), P1, (1, 1)),
            Conv(4, (3, 3), (0, 1), P1, (1, 1)),
            Conv(4, (3, 3), (1, -1), P1, (1, 1)),
            Conv(4, (3, 3), (1, 1), P1, (1, 0)),
            conv2d(4, groups=0),
            conv2d(4, groups=-1),
            MaxPool((0, 2), (1, 1), P0),
            AvgPool((2, 2), (0, 2), P0),
        ],
        ids=lambda op: repr(op)[:60],
    )
    def test_zero_or_negative_sizes(self, op):
        raises_at([inp(), Node("x", op, ("input",))], "x")

    @pytest.mark.parametrize("shape", [(0, 8, 8), (3, 0, 8), (3, 8, -1), ()])
    def test_input_zero_negative_or_empty(self, shape):
        raises_at([inp(shape), Node("r", Activation("relu"), ("input",))], "input")

    def test_dense_zero_out(self):
        raises_at([inp((5,)), Node("d", Dense(0), ("input",))], "d")

    @pytest.mark.parametrize("padding", [((-1, 0), (0, 0)), ((0, 0), (0, -2))])
    def test_negative_padding(self, padding):
        raises_at([inp(), Node("c", conv2d(4, p=padding), ("input",))], "c", match="non-negative")
        raises_at([inp(), Node("m", MaxPool((3, 3), (1, 1), padding), ("input",))], "m")

    def test_output_too_small(self):
        raises_at([inp((3, 3, 3)), Node("c", conv2d(4, k=5, p=P0), ("input",))], "c", match="smaller than the window")
        # dilation makes the window larger than the padded input
        raises_at([inp((3, 5, 5)), Node("c", conv2d(4, k=3, p=P0, d=3), ("input",))], "c")
        raises_at([inp((3, 1, 1)), Node("m", MaxPool((2, 2), (2, 2), P0), ("input",))], "m")

    def test_duplicate_names(self):
        nodes = [inp(), Node("a", Activation("relu"), ("input",)), Node("a", Activation("tanh"), ("input",))]
        raises_at(nodes, "a", match="duplicate")

    def test_dead_node(self):
        nodes = [
            inp(),
            Node("dead", Activation("relu"), ("input",)),
            Node("out", Activation("tanh"), ("input",)),
        ]
        raises_at(nodes, "dead", output="out", match="not used")

    @pytest.mark.parametrize("padding", [((2, 0), (0, 0)), ((0, 0), (0, 2)), ((3, 3), (3, 3))])
    def test_pool_padding_not_smaller_than_kernel(self, padding):
        for cls in (MaxPool, AvgPool):
            raises_at([inp(), Node("p", cls((2, 2), (1, 1), padding), ("input",))], "p", match="smaller than the kernel")

    def test_pool_padding_just_below_kernel_is_fine(self):
        spec = ModelSpec("ok", (inp(), Node("p", MaxPool((2, 2), (1, 1), ((1, 1), (0, 1))), ("input",))))
        assert spec.output_shape == (3, 9, 8)

    def test_zero_input_nodes(self):
        with pytest.raises(SpecError, match="exactly one Input"):
            ModelSpec("bad", (Node("a", Activation("relu"), ()),))

    def test_two_input_nodes(self):
        nodes = [inp(), inp(name="input2"), Node("add", Add(), ("input", "input2"))]
        with pytest.raises(SpecError, match="exactly one Input"):
            ModelSpec("bad", tuple(nodes))

    def test_no_nodes(self):
        with pytest.raises(SpecError):
            ModelSpec("bad", ())

    @pytest.mark.parametrize("op", [Activation("swish"), Activation("gelu", approximate="fast"), Activation("RELU")])
    def test_bad_activation(self, op):
        raises_at([inp(), Node("act", op, ("input",))], "act")

    def test_dense_on_spatial_input_is_pointwise_over_channels(self):
        spec = ModelSpec("pw", (inp(), Node("d", Dense(10), ("input",))), "d")
        assert spec.output_shape == (10, 8, 8)
        assert spec.param_shapes() == {"d.weight": (10, 3), "d.bias": (10,)}
        assert Dense(10).flops([(3, 8, 8)], (10, 8, 8)) == 64 * (2 * 3 * 10 + 10)

    def test_global_avg_pool_on_flat_input(self):
        raises_at([inp((5,)), Node("g", GlobalAvgPool(), ("input",))], "g")

    def test_conv_rank_mismatch(self):
        raises_at([inp((3, 8)), Node("c", conv2d(4), ("input",))], "c")
        raises_at([inp(), Node("c", Conv(4, (3, 3), (1,), P1, (1, 1)), ("input",))], "c")

    def test_arity(self):
        raises_at([inp(), Node("add", Add(), ("input",))], "add")
        raises_at([inp(), Node("r", Activation("relu"), ("input", "input"))], "r")
        with pytest.raises(SpecError):
            ModelSpec("bad", (inp(), Node("i2", Input((3, 8, 8)), ("input",))))

    @pytest.mark.parametrize("op", [BatchNorm(eps=0.0), BatchNorm(eps=-1.0), BatchNorm(momentum=1.5), Dropout(1.0), Dropout(-0.1)])
    def test_bad_float_attributes(self, op):
        raises_at([inp(), Node("x", op, ("input",))], "x")

    def test_bad_dtype(self):
        raises_at([inp(dtype="int32"), Node("r", Activation("relu"), ("input",))], "input")

    @pytest.mark.parametrize("name", ["", "a b", "a/b", "ü"])
    def test_bad_node_names(self, name):
        with pytest.raises(SpecError):
            ModelSpec("bad", (inp(), Node(name, Activation("relu"), ("input",))))

    def test_output_not_a_node(self):
        with pytest.raises(SpecError, match="nope"):
            ModelSpec("bad", (inp(), Node("r", Activation("relu"), ("input",))), "nope")

    def test_not_a_node_or_op(self):
        with pytest.raises(SpecError):
            ModelSpec("bad", (inp(), "relu"))  # type: ignore[arg-type]
        with pytest.raises(SpecError):
            ModelSpec("bad", (inp(), Node("r", "relu", ("input",))))  # type: ignore[arg-type]

    # Attribute *types*: a spec is plain numbers; strings, floats and None where
    # ints are expected must be rejected as SpecError, never accepted or crash.

    @pytest.mark.parametrize(
        "op",
        [
            conv2d(4.0),
            Conv(4, (3.0, 3), (1, 1), P1, (1, 1)),
            Conv(4, (3, 3), (2.5, 1), P1, (1, 1)),
            Conv(4, (3, 3), (1, 1), ((1.0, 1), (1, 1)), (1, 1)),
            Conv(4, (3, 3), (1, 1), P1, (1, 2.0)),
            conv2d(4, groups=1.0),
            MaxPool((2.0, 2), (2, 2), P0),
            AvgPool((2, 2), (1.5, 2), P0),
        ],
        ids=["conv-out", "conv-kernel", "conv-stride", "conv-pad-before", "conv-dilation", "conv-groups",
             "maxpool-kernel", "avgpool-stride"],
    )
    def test_float_where_int_expected(self, op):
        raises_at([inp(), Node("x", op, ("input",))], "x")

    def test_float_input_shape_and_dense_size(self):
        raises_at([inp((3.0, 8, 8)), Node("r", Activation("relu"), ("input",))], "input")
        raises_at([inp((5,)), Node("d", Dense(4.0), ("input",))], "d")

    @pytest.mark.parametrize(
        "op",
        [
            conv2d("4"),
            conv2d(None),
            Conv(4, None, (1, 1), P1, (1, 1)),
            Conv(4, (3, 3), "1", P1, (1, 1)),
            Conv(4, (3, 3), (1, 1), None, (1, 1)),
            Conv(4, (3, 3), (1, 1), (("1", 1), (1, 1)), (1, 1)),
            Conv(4, (3, 3), (1, 1), P1, None),
            conv2d(4, groups="1"),
            MaxPool(None, (2, 2), P0),
            BatchNorm(eps="1e-5"),
            BatchNorm(momentum=None),
            Dropout(None),
            Activation(None),
        ],
        ids=["conv-out-str", "conv-out-none", "conv-kernel-none", "conv-stride-str", "conv-padding-none",
             "conv-pad-str", "conv-dilation-none", "conv-groups-str", "pool-kernel-none", "bn-eps-str",
             "bn-momentum-none", "dropout-none", "activation-none"],
    )
    def test_strings_and_none_where_numbers_expected(self, op):
        raises_at([inp(), Node("x", op, ("input",))], "x")

    def test_input_shape_none(self):
        with pytest.raises(SpecError):
            ModelSpec("bad", (Node("input", Input(None)), Node("r", Activation("relu"), ("input",))))  # type: ignore[arg-type]

    def test_node_inputs_none(self):
        """Node.inputs=None must be a SpecError naming the node (today: TypeError)."""
        raises_at([inp(), Node("r", Activation("relu"), None)], "r")  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        "op",
        [Activation("leaky_relu", alpha="0.1"), Activation("leaky_relu", alpha=None), conv2d(4, bias="no"),
         AvgPool((2, 2), (2, 2), P0, count_include_pad=None), Dense(3, bias=1.5)],
        ids=["alpha-str", "alpha-none", "conv-bias-str", "count_include_pad-none", "dense-bias-float"],
    )
    def test_non_number_float_and_bool_attributes(self, op):
        shape = (5,) if isinstance(op, Dense) else (3, 8, 8)
        raises_at([inp(shape), Node("x", op, ("input",))], "x")


class TestBuilder:
    def test_builder_errors_name_the_node(self):
        b = SpecBuilder("t")
        x = b.input((3, 8, 8))
        with pytest.raises(SpecError) as ei:
            b.conv(x, 4, (3, 3, 3), name="c3")
        assert ei.value.node == "c3"
        with pytest.raises(SpecError) as ei:
            b.conv(x, 4, 3, padding="full", name="cp")
        assert ei.value.node == "cp"
        with pytest.raises(SpecError) as ei:
            b.conv(x, 4, 3, padding=((1, 1),), name="cq")
        assert ei.value.node == "cq"
        with pytest.raises(SpecError) as ei:
            b.relu("nope", name="r")
        assert ei.value.node == "r"
        with pytest.raises(SpecError) as ei:
            b.conv("nope", 4, 3, name="cn")
        assert ei.value.node == "cn"
        with pytest.raises(SpecError) as ei:
            b.relu(x, name=x)
        assert "duplicate" in str(ei.value)

    def test_builder_padding_forms(self):
        b = SpecBuilder("t")
        x = b.input((3, 7, 9))
        c1 = b.conv(x, 4, 3, padding=1, name="c1")
        c2 = b.conv(x, 4, 3, padding=(1, 0), name="c2")
        c3 = b.conv(x, 4, 3, padding=((0, 2), (1, 0)), name="c3")
        c4 = b.conv(x, 4, 3, stride=2, padding="same", name="c4")
        c5 = b.conv(x, 4, 3, padding="valid", name="c5")
        ops = {n.name: n.op for n in b._nodes}
        assert ops[c1].padding == ((1, 1), (1, 1))
        assert ops[c2].padding == ((1, 1), (0, 0))
        assert ops[c3].padding == ((0, 2), (1, 0))
        assert ops[c4].padding == (same_padding(7, 3, 2), same_padding(9, 3, 2))
        assert ops[c5].padding == P0
        assert b.shape(c4) == (4, 4, 5)  # ceil(7/2), ceil(9/2)
        assert b.shape(c3) == (4, 7, 8)

    def test_pool_stride_defaults_to_kernel(self):
        b = SpecBuilder("t")
        x = b.input((3, 8, 9))
        assert b.shape(b.max_pool(x, 2)) == (3, 4, 4)
        assert b.shape(b.avg_pool(x, (2, 3))) == (3, 4, 3)

    def test_numpy_integers_are_accepted_and_normalised(self):
        """Sizes often come from numpy (np.int64); the spec must hold plain ints so that
        it serialises and hashes (today: TypeError from _tuple, and from to_json/hash)."""
        i = np.int64
        b = SpecBuilder("t")
        x = b.input(np.array([3, 8, 8]))
        y = b.conv(x, i(8), i(3), stride=i(1), padding=i(1), name="c")
        spec = b.build(b.dense(b.flatten(b.max_pool(y, i(2), name="mp"), name="f"), i(4), name="fc"))
        b = SpecBuilder("t")
        x = b.input((3, 8, 8))
        y = b.conv(x, 8, 3, stride=1, padding=1, name="c")
        plain = b.build(b.dense(b.flatten(b.max_pool(y, 2, name="mp"), name="f"), 4, name="fc"))
        assert spec.to_json() == plain.to_json() and spec.hash == plain.hash
        assert all(type(d) is int for n in spec.nodes for d in spec.shape(n.name))

    @pytest.mark.parametrize(
        "add",
        [
            lambda b, x: b.conv(x, 8, 3.0),
            lambda b, x: b.conv(x, 8.0, 3),
            lambda b, x: b.conv(x, 8, 3, stride=1.5),
            lambda b, x: b.conv(x, 8, 3, padding=1.0),
            lambda b, x: b.max_pool(x, 2.0),
            lambda b, x: b.avg_pool(x, 2, stride="2"),
            lambda b, x: b.conv(x, 8, None),
            lambda b, x: b.dense(b.flatten(x), 2.5),
        ],
        ids=["kernel-float", "out-float", "stride-float", "padding-float", "pool-kernel-float", "pool-stride-str",
             "kernel-none", "dense-float"],
    )
    def test_builder_wrong_types_are_spec_errors(self, add):
        b = SpecBuilder("t")
        x = b.input((3, 8, 8))
        try:
            add(b, x)
        except SpecError:
            return
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{type(exc).__name__} instead of SpecError: {exc}")
        pytest.fail("accepted")

    def test_builder_and_direct_construction_agree(self):
        b = SpecBuilder("t")
        x = b.input((3, 8, 8))
        y = b.conv(x, 4, 3, padding=1, name="c")
        spec = b.build(b.relu(y, name="r"))
        direct = ModelSpec("t", (inp(), Node("c", conv2d(4), ("input",)), Node("r", Activation("relu"), ("c",))))
        assert spec == direct and spec.hash == direct.hash


# ---------------------------------------------------------------------------
# same padding: TF/JAX SAME and torch padding="same"
# ---------------------------------------------------------------------------


def _same_formula(n, k, s, d):
    """TensorFlow's documented SAME rule, written out independently."""
    eff = (k - 1) * d + 1
    out = (n + s - 1) // s
    total = max(0, (out - 1) * s + eff - n)
    return total // 2, total - total // 2


def test_same_padding_hand_cases():
    assert same_padding(5, 3) == (1, 1)
    assert same_padding(5, 2) == (0, 1)  # odd pixel after, as in TF
    assert same_padding(224, 7, 2) == (2, 3)
    assert same_padding(224, 1, 2) == (0, 0)
    assert same_padding(5, 3, 1, 2) == (2, 2)
    assert same_padding(4, 4, 4) == (0, 0)
    assert same_padding(1, 5, 3) == (2, 2)
    for n in range(1, 20):
        for k in range(1, 8):
            for s in range(1, 5):
                for d in range(1, 4):
                    assert same_padding(n, k, s, d) == _same_formula(n, k, s, d)


def test_same_padding_matches_jax():
    lax = pytest.importorskip("jax.lax")
    for n in range(1, 18):
        for k in range(1, 7):
            for s in range(1, 4):
                for d in range(1, 3):
                    eff = (k - 1) * d + 1  # padtype_to_pads takes the dilated window
                    (want,) = lax.padtype_to_pads((n,), (eff,), (s,), "SAME")
                    assert same_padding(n, k, s, d) == tuple(want), (n, k, s, d)


def test_same_padding_matches_torch_same_for_stride_1():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    import warnings

    g = torch.Generator().manual_seed(0)
    for (h, w) in [(7, 8), (9, 5)]:
        for kh, kw in [(1, 2), (2, 4), (3, 3), (4, 5), (6, 1)]:
            for dh, dw in [(1, 1), (2, 1), (1, 3)]:
                x = torch.randn(1, 2, h, w, generator=g, dtype=torch.float64)
                wt = torch.randn(3, 2, kh, kw, generator=g, dtype=torch.float64)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    want = F.conv2d(x, wt, padding="same", dilation=(dh, dw))
                ph, pw = same_padding(h, kh, 1, dh), same_padding(w, kw, 1, dw)
                got = F.conv2d(F.pad(x, (*pw, *ph)), wt, dilation=(dh, dw))
                assert got.shape == want.shape == (1, 3, h, w)
                assert torch.equal(got, want), ((kh, kw), (dh, dw))


# ---------------------------------------------------------------------------
# parameters and FLOPs
# ---------------------------------------------------------------------------


class TestCounts:
    def test_conv_flops_and_params(self):
        b = SpecBuilder("t")
        x = b.input((3, 16, 16))
        c = b.conv(x, 8, 3, padding="same", name="c")
        spec = b.build(c)
        row = {r.name: r for r in spec.info()}["c"]
        # 8*16*16 outputs, each 3*3*3 multiply-adds, plus one bias add
        assert row.flops == 2 * (8 * 16 * 16) * (3 * 3 * 3) + 8 * 16 * 16 == 112640
        assert row.params == 8 * 3 * 3 * 3 + 8
        assert row.activation_bytes == 8 * 16 * 16 * 4
        assert row.shape == (8, 16, 16)

    def test_grouped_strided_conv_flops(self):
        b = SpecBuilder("t")
        x = b.input((4, 5, 5), dtype="float64")
        c = b.conv(x, 8, 3, groups=2, bias=False, name="c")
        spec = b.build(c)
        (row,) = [r for r in spec.info() if r.name == "c"]
        assert row.shape == (8, 3, 3)
        assert row.flops == 2 * 72 * (2 * 9) == 2592
        assert row.params == 8 * 2 * 3 * 3 == 144
        assert row.activation_bytes == 72 * 8
        assert spec.param_shapes() == {"c.weight": (8, 2, 3, 3)}

    def test_dense_flops_and_params(self):
        b = SpecBuilder("t")
        x = b.input((100,))
        spec = b.build(b.dense(x, 10, name="d"))
        assert spec.flops == 2 * 100 * 10 + 10 == 2010
        assert spec.num_params == 100 * 10 + 10
        b = SpecBuilder("t")
        spec = b.build(b.dense(b.input((100,)), 10, bias=False, name="d"))
        assert spec.flops == 2000 and spec.num_params == 1000

    def test_batchnorm_params_and_buffers(self):
        b = SpecBuilder("t")
        spec = b.build(b.batch_norm(b.input((6, 4, 4)), name="bn"))
        assert spec.param_shapes() == {
            "bn.weight": (6,), "bn.bias": (6,), "bn.running_mean": (6,), "bn.running_var": (6,),
        }
        assert spec.trainable() == ["bn.weight", "bn.bias"]
        (row,) = [r for r in spec.info() if r.name == "bn"]
        assert (row.params, row.buffers) == (12, 12)

    def test_resnet_param_counts_match_torchvision(self):
        from hal.models import get

        assert get("resnet50").num_params == 25_557_032
        assert get("resnet18").num_params == 11_689_512
        assert get("resnet34").num_params == 21_797_672
        assert get("resnet101").num_params == 44_549_160

    def test_resnet50_flops(self):
        from hal.models import get

        spec = get("resnet50")
        # torchvision publishes 4.09 GMACs (conv + fc) at 224x224
        macs = sum(r.flops for r in spec.info() if r.kind in ("Conv", "Dense")) / 2
        assert macs == pytest.approx(4.09e9, rel=0.005)
        assert spec.flops == pytest.approx(8.2e9, rel=0.01)
        assert spec.output_shape == (1000,)
        r18 = get("resnet18")
        assert sum(r.flops for r in r18.info() if r.kind in ("Conv", "Dense")) / 2 == pytest.approx(1.81e9, rel=0.005)


# ---------------------------------------------------------------------------
# JSON and hash
# ---------------------------------------------------------------------------


def _every_op_spec() -> list[Node]:
    return [
        inp((4, 9, 9)),
        Node("conv", Conv(8, (3, 3), (1, 1), P1, (1, 1), groups=2, bias=True), ("input",)),
        Node("bn", BatchNorm(1e-5, 0.1), ("conv",)),
        Node("act", Activation("leaky_relu", 0.1), ("bn",)),
        Node("mp", MaxPool((2, 2), (2, 2), ((0, 1), (0, 1))), ("act",)),
        Node("ap", AvgPool((3, 3), (1, 1), P1, count_include_pad=False), ("mp",)),
        Node("add", Add(), ("mp", "ap")),
        Node("side", Activation("relu"), ("mp",)),  # a branch parallel to ap/add
        Node("cat", Concat(), ("add", "side")),
        Node("gap", GlobalAvgPool(), ("cat",)),
        Node("drop", Dropout(0.5), ("gap",)),
        Node("fc", Dense(10), ("drop",)),
        Node("flat", Flatten(), ("fc",)),
    ]


# one valid change of each attribute (and of names / wiring)
_VARIANTS = [
    ("input", dict(op=Input((6, 9, 9)))),
    ("input", dict(op=Input((4, 9, 9), "float64"))),
    ("conv", dict(op=Conv(10, (3, 3), (1, 1), P1, (1, 1), 2, True))),
    ("conv", dict(op=Conv(8, (3, 1), (1, 1), P1, (1, 1), 2, True))),
    ("conv", dict(op=Conv(8, (3, 3), (2, 1), P1, (1, 1), 2, True))),
    ("conv", dict(op=Conv(8, (3, 3), (1, 1), ((1, 0), (1, 1)), (1, 1), 2, True))),
    ("conv", dict(op=Conv(8, (3, 3), (1, 1), P1, (2, 1), 2, True))),
    ("conv", dict(op=Conv(8, (3, 3), (1, 1), P1, (1, 1), 4, True))),
    ("conv", dict(op=Conv(8, (3, 3), (1, 1), P1, (1, 1), 2, False))),
    ("bn", dict(op=BatchNorm(1e-3, 0.1))),
    ("bn", dict(op=BatchNorm(1e-5, 0.2))),
    ("act", dict(op=Activation("relu", 0.1))),
    ("act", dict(op=Activation("leaky_relu", 0.2))),
    ("act", dict(op=Activation("leaky_relu", 0.1, "tanh"))),
    ("mp", dict(op=MaxPool((3, 3), (2, 2), ((0, 1), (0, 1))))),
    ("mp", dict(op=MaxPool((2, 2), (1, 1), ((0, 1), (0, 1))))),
    ("mp", dict(op=MaxPool((2, 2), (2, 2), ((1, 0), (0, 1))))),
    ("ap", dict(op=AvgPool((3, 3), (1, 1), P1, count_include_pad=True))),
    ("ap", dict(op=AvgPool((1, 1), (1, 1), P0, count_include_pad=False))),
    ("cat", dict(inputs=("side", "add"))),
    ("side", dict(op=Activation("sigmoid"))),
    ("drop", dict(op=Dropout(0.3))),
    ("fc", dict(op=Dense(12))),
    ("fc", dict(op=Dense(10, bias=False))),
    ("flat", dict(name="flat2")),
]


class TestSerialisation:
    def test_json_round_trip_every_op(self):
        spec = ModelSpec("every_op", tuple(_every_op_spec()))
        for text in (spec.to_json(), spec.to_json(indent=2)):
            back = ModelSpec.from_json(text)
            assert back == spec and back.hash == spec.hash
            assert back.to_json() == spec.to_json()
        assert ModelSpec.from_dict(json.loads(spec.to_json())) == spec
        assert ModelSpec.from_json(spec.to_json().encode()) == spec

    def test_json_round_trip_zoo(self):
        from hal.models import get

        for spec in (get("small_cnn"), get("resnet18", input_size=64, num_classes=7), get("resnet50", variant="v1")):
            back = ModelSpec.from_json(spec.to_json())
            assert back == spec and back.hash == spec.hash
            assert [back.shape(n.name) for n in back.nodes] == [spec.shape(n.name) for n in spec.nodes]

    def test_hash_changes_with_every_attribute(self):
        base_nodes = _every_op_spec()
        base = ModelSpec("every_op", tuple(base_nodes))
        seen = {base.hash}
        for name, change in _VARIANTS:
            nodes = [dataclasses.replace(n, **change) if n.name == name else n for n in base_nodes]
            spec = ModelSpec("every_op", tuple(nodes))
            assert spec != base, (name, change)
            assert spec.hash not in seen, (name, change)
            seen.add(spec.hash)
            assert ModelSpec.from_json(spec.to_json()).hash == spec.hash
        assert ModelSpec("other_name", tuple(base_nodes)).hash not in seen
        # a different output is a different model
        nodes = base_nodes[:-1]
        assert ModelSpec("every_op", tuple(nodes)).hash not in seen

    def test_hash_is_independent_of_node_listing_order(self):
        """Nodes may be given in any order; the same graph must be the same spec
        (equal, same JSON, same hash). Fails today: the stored order is a DFS
        that follows the listing order, so two branches listed in the other
        order give another JSON and hash."""
        nodes = _every_op_spec()
        base = ModelSpec("every_op", tuple(nodes), "flat")
        r = random.Random(0)
        side_first = [nodes[0]] + [n for n in nodes if n.name == "side"] + [n for n in nodes[1:] if n.name != "side"]
        orders = [side_first, nodes[::-1]]
        for _ in range(10):
            orders.append(nodes[:])
            r.shuffle(orders[-1])
        for order in orders:
            spec = ModelSpec("every_op", tuple(order), "flat")
            assert spec.hash == base.hash
            assert spec == base

    def test_hash_order_independence_two_branches(self):
        i = inp()
        a = Node("a", Activation("relu"), ("input",))
        b = Node("b", Activation("tanh"), ("input",))
        add = Node("add", Add(), ("a", "b"))
        s1 = ModelSpec("t", (i, a, b, add))
        s2 = ModelSpec("t", (i, b, a, add), "add")
        assert s1.hash == s2.hash

    def test_hash_stable_across_processes(self):
        spec_hash = ModelSpec("every_op", tuple(_every_op_spec())).hash
        code = (
            "import sys; sys.path.insert(0, %r); from tests.test_spec import _every_op_spec; "
            "from hal.spec import ModelSpec; print(ModelSpec('every_op', tuple(_every_op_spec())).hash)"
        ) % os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for seed in ("12345",):  # this process runs with another (random) hash seed
            env = {**os.environ, "PYTHONHASHSEED": seed}
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            assert out.stdout.strip() == spec_hash

    def _base(self):
        return json.loads(ModelSpec("every_op", tuple(_every_op_spec())).to_json())

    def test_from_json_bad_schema_version(self):
        for v in (2, 0, None, "1"):
            d = self._base()
            d["schema_version"] = v
            with pytest.raises(SpecError, match="schema_version"):
                ModelSpec.from_dict(d)
        d = self._base()
        del d["schema_version"]
        with pytest.raises(SpecError, match="schema_version"):
            ModelSpec.from_dict(d)

    def test_from_json_unknown_op(self):
        d = self._base()
        d["nodes"][3]["op"] = "Swish"
        with pytest.raises(SpecError, match="Swish") as ei:
            ModelSpec.from_dict(d)
        assert ei.value.node == "act"

    def test_from_json_unknown_attrs(self):
        d = self._base()
        d["nodes"][1]["attrs"]["padding_mode"] = "reflect"
        with pytest.raises(SpecError, match="padding_mode") as ei:
            ModelSpec.from_dict(d)
        assert ei.value.node == "conv"

    def test_from_json_missing_required_attr(self):
        d = self._base()
        del d["nodes"][1]["attrs"]["kernel"]
        with pytest.raises(SpecError) as ei:
            ModelSpec.from_dict(d)
        assert ei.value.node == "conv"

    @pytest.mark.parametrize("text", ["", "{", "not json", "[1, 2", '{"schema_version": 1,}'])
    def test_from_json_bad_json(self, text):
        with pytest.raises(SpecError):
            ModelSpec.from_json(text)

    @pytest.mark.parametrize("data", [[], "spec", 3, None])
    def test_from_dict_not_an_object(self, data):
        with pytest.raises(SpecError):
            ModelSpec.from_dict(data)  # type: ignore[arg-type]

    def test_from_json_node_without_name(self):
        d = self._base()
        del d["nodes"][2]["name"]
        with pytest.raises(SpecError, match=r"nodes\[2\]"):
            ModelSpec.from_dict(d)

    def test_from_json_bad_attribute_value(self):
        d = self._base()
        d["nodes"][1]["attrs"]["stride"] = "wide"
        with pytest.raises(SpecError):
            ModelSpec.from_dict(d)

    @pytest.mark.parametrize(
        "mutate",
        [
            lambda d: d.__setitem__("nodes", 5),
            lambda d: d["nodes"][1].__setitem__("inputs", None),
            lambda d: d["nodes"][1].__setitem__("inputs", 7),
            lambda d: d["nodes"][1].__setitem__("attrs", None),
            lambda d: d["nodes"][1].__setitem__("attrs", ["out_channels"]),
            lambda d: d["nodes"][1].__setitem__("inputs", [["input"]]),
        ],
        ids=["nodes-int", "inputs-null", "inputs-int", "attrs-null", "attrs-list", "inputs-nested-list"],
    )
    def test_from_json_malformed_structure_is_spec_error(self, mutate):
        """Every malformed document is a SpecError, never a TypeError/AttributeError."""
        d = self._base()
        mutate(d)
        with pytest.raises(SpecError):
            ModelSpec.from_dict(d)

    def test_from_json_invalid_utf8_bytes(self):
        with pytest.raises(SpecError):
            ModelSpec.from_json(b'{"name": "\xff\xfe"}')


# ---------------------------------------------------------------------------
# property-based: random valid specs infer torch's shapes; mutants raise SpecError
# ---------------------------------------------------------------------------

ACTS = [("relu", "none"), ("leaky_relu", "none"), ("sigmoid", "none"), ("tanh", "none"),
        ("gelu", "none"), ("gelu", "tanh"), ("silu", "none")]


def _window(n, k, s, d, pb, pa):
    return (n + pb + pa - (d * (k - 1) + 1)) // s + 1


@st.composite
def valid_graphs(draw, max_layers: int = 7):
    """A random valid DAG: (nodes in creation order, expected per-node shapes).

    Each new node reads the latest node (so every node feeds the output), Add and
    Concat also read an earlier node (skip connections). Expected shapes are
    computed here with the textbook formulas, independently of hal.
    """
    nd = draw(st.integers(1, 3))
    c = draw(st.integers(1, 6))
    hi = {1: 14, 2: 9, 3: 5}[nd]
    spatial = tuple(draw(st.integers(1, hi)) for _ in range(nd))
    nodes = [Node("input", Input((c, *spatial)))]
    shapes = {"input": (c, *spatial)}
    cur = "input"
    count = 0

    def new(op, inputs, shape):
        nonlocal cur, count
        name = f"n{count}"
        count += 1
        nodes.append(Node(name, op, tuple(inputs)))
        shapes[name] = shape
        cur = name
        return name

    for _ in range(draw(st.integers(1, max_layers))):
        shape = shapes[cur]
        flat = len(shape) == 1
        kinds = ["bn", "act", "add", "concat", "dropout", "dense"] if flat else [
            "conv", "conv", "maxpool", "avgpool", "bn", "act", "add", "concat", "gap", "flatten"]
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            cin, sp = shape[0], shape[1:]
            groups = draw(st.sampled_from([g for g in range(1, cin + 1) if cin % g == 0]))
            out = groups * draw(st.integers(1, 3))
            ks, ss, ds, ps = [], [], [], []
            for n in sp:
                k, s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
                pb, pa = draw(st.integers(0, 2)), draw(st.integers(0, 2))
                if n + pb + pa < d * (k - 1) + 1:
                    k, d = 1, 1
                ks.append(k), ss.append(s), ds.append(d), ps.append((pb, pa))
            op = Conv(out, tuple(ks), tuple(ss), tuple(ps), tuple(ds), groups, draw(st.booleans()))
            new(op, [cur], (out, *(_window(n, k, s, d, *p) for n, k, s, d, p in zip(sp, ks, ss, ds, ps))))
        elif kind in ("maxpool", "avgpool"):
            sp = shape[1:]
            ks, ss, ps = [], [], []
            for n in sp:
                k, s = draw(st.integers(1, 3)), draw(st.integers(1, 3))
                pb, pa = draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
                if n + pb + pa < k:
                    k, pb, pa = min(k, n), 0, 0
                ks.append(k), ss.append(s), ps.append((pb, pa))
            if kind == "maxpool":
                op = MaxPool(tuple(ks), tuple(ss), tuple(ps))
            else:
                op = AvgPool(tuple(ks), tuple(ss), tuple(ps), draw(st.booleans()))
            new(op, [cur], (shape[0], *(_window(n, k, s, 1, *p) for n, k, s, p in zip(sp, ks, ss, ps))))
        elif kind == "bn":
            new(BatchNorm(draw(st.sampled_from([1e-5, 1e-3])), draw(st.sampled_from([0.1, 0.01]))), [cur], shape)
        elif kind == "act":
            fn, approx = draw(st.sampled_from(ACTS))
            new(Activation(fn, 0.2, approx), [cur], shape)
        elif kind == "dropout":
            new(Dropout(0.25), [cur], shape)
        elif kind == "add":
            partners = [n for n in shapes if n != cur and shapes[n] == shape]
            how = draw(st.sampled_from(["skip", "branches", "self"]))
            if how == "skip" and partners:
                inputs = [cur, *draw(st.lists(st.sampled_from(partners), min_size=1, max_size=2))]
            elif how == "branches":  # two parallel branches off the same node
                base = cur
                h1 = new(Activation("tanh"), [base], shape)
                h2 = new(BatchNorm(), [base], shape)
                inputs = [h2, h1] if draw(st.booleans()) else [h1, h2]
            else:
                inputs = [cur, cur]  # x + x is a valid residual add too
            new(Add(), inputs, shape)
        elif kind == "concat":
            partners = [n for n in shapes if n != cur and shapes[n][1:] == shape[1:] and len(shapes[n]) == len(shape)]
            how = draw(st.sampled_from(["skip", "branches", "self"]))
            if how == "skip" and partners:
                inputs = [cur, draw(st.sampled_from(partners))]
            elif how == "branches" and len(shape) > 1:
                base = cur
                h1 = new(Activation("silu"), [base], shape)
                k = draw(st.integers(1, 4))
                h2 = new(Conv(k, (1,) * (len(shape) - 1), (1,) * (len(shape) - 1), ((0, 0),) * (len(shape) - 1),
                              (1,) * (len(shape) - 1)), [base], (k, *shape[1:]))
                inputs = [h2, h1]
            else:
                inputs = [cur, cur]
            new(Concat(), inputs, (sum(shapes[i][0] for i in inputs), *shape[1:]))
        elif kind == "gap":
            new(GlobalAvgPool(), [cur], (shape[0],))
        elif kind == "flatten":
            new(Flatten(), [cur], (int(np.prod(shape)),))
        elif kind == "dense":
            out = draw(st.integers(1, 7))
            new(Dense(out, draw(st.booleans())), [cur], (out,))
    if draw(st.booleans()):  # a classifier head
        if len(shapes[cur]) > 1:
            if draw(st.booleans()):
                new(GlobalAvgPool(), [cur], (shapes[cur][0],))
            else:
                new(Flatten(), [cur], (int(np.prod(shapes[cur])),))
        new(Dense(3), [cur], (3,))
    return nodes, shapes


def _torch_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Per-node output shapes of the torch backend's module on a zero batch."""
    import torch

    from hal.backends.torch import build_module
    from hal.weights import init_weights

    module = build_module(spec, init_weights(spec)).eval()
    got = {spec.input.name: tuple(spec.input_shape)}
    hooks = [
        module.node_module(n.name).register_forward_hook(
            lambda m, i, o, name=n.name: got.__setitem__(name, tuple(o.shape[1:]))
        )
        for n in spec.nodes[1:]
    ]
    with torch.no_grad():
        module(torch.zeros((2, *spec.input_shape)))
    for h in hooks:
        h.remove()
    return got


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_graphs())
def test_random_valid_specs_infer_torch_shapes(graph):
    pytest.importorskip("torch")
    nodes, expected = graph
    spec = ModelSpec("rand", tuple(nodes))
    for n in nodes:
        assert spec.shape(n.name) == expected[n.name], n
    torch_shapes = _torch_shapes(spec)
    for n in nodes:
        assert torch_shapes[n.name] == spec.shape(n.name), n
    back = ModelSpec.from_json(spec.to_json())
    assert back == spec and back.hash == spec.hash


@settings(max_examples=40, deadline=None)
@given(valid_graphs(), st.randoms(use_true_random=False))
def test_random_valid_specs_same_spec_in_any_listing_order(graph, r):
    nodes, _ = graph
    spec = ModelSpec("rand", tuple(nodes))
    shuffled = nodes[:]
    r.shuffle(shuffled)
    again = ModelSpec("rand", tuple(shuffled), spec.output)
    assert again == spec and again.hash == spec.hash


# ---- mutants --------------------------------------------------------------

_INT_TUPLE_ATTRS = {Conv: ("kernel", "stride", "dilation"), MaxPool: ("kernel", "stride"), AvgPool: ("kernel", "stride")}
_INT_ATTRS = {Conv: ("out_channels", "groups"), Dense: ("out_features",)}


def _replace_node(nodes, i, **changes):
    out = list(nodes)
    out[i] = dataclasses.replace(out[i], **changes)
    return out


@st.composite
def structural_mutants(draw):
    """(nodes, output, node the error must name or None) for a definitely-invalid graph."""
    nodes, shapes = draw(valid_graphs())
    output = nodes[-1].name
    inner = list(range(1, len(nodes)))
    kinds = ["unknown_input", "self_cycle", "long_cycle", "duplicate", "dead", "two_inputs", "no_input",
             "dense_no_outputs", "bad_activation", "zero_input_dim", "arity"]
    convs = [i for i in inner if isinstance(nodes[i].op, Conv)]
    pools = [i for i in inner if isinstance(nodes[i].op, (MaxPool, AvgPool))]
    sized = [i for i in inner if isinstance(nodes[i].op, (Conv, Dense, MaxPool, AvgPool))]
    if convs:
        kinds += ["groups", "negative_padding"]
    if pools:
        kinds += ["pool_padding", "negative_padding"]
    if sized:
        kinds += ["zero_size"]
    kind = draw(st.sampled_from(kinds))
    if kind == "unknown_input":
        i = draw(st.sampled_from(inner))
        return _replace_node(nodes, i, inputs=("missing_node", *nodes[i].inputs[1:])), output, nodes[i].name
    if kind == "self_cycle":
        i = draw(st.sampled_from(inner))
        return _replace_node(nodes, i, inputs=(nodes[i].name, *nodes[i].inputs[1:])), output, nodes[i].name
    if kind == "long_cycle":
        if len(nodes) == 2:
            return _replace_node(nodes, 1, inputs=(nodes[1].name,)), output, nodes[1].name
        return _replace_node(nodes, 1, inputs=(output, *nodes[1].inputs[1:])), output, None
    if kind == "duplicate":
        i = draw(st.sampled_from(inner))
        j = draw(st.sampled_from([k for k in range(len(nodes)) if k != i]))
        return _replace_node(nodes, i, name=nodes[j].name), output, None
    if kind == "dead":
        src = draw(st.sampled_from([n.name for n in nodes]))
        return nodes + [Node("dead_end", Activation("relu"), (src,))], output, "dead_end"
    if kind == "two_inputs":
        return [*nodes, Node("input2", nodes[0].op)], output, None
    if kind == "no_input":
        return _replace_node(nodes, 0, op=Activation("relu")), output, None
    if kind == "dense_no_outputs":
        return _replace_node(nodes, 1, op=Dense(0)), output, nodes[1].name
    if kind == "bad_activation":
        i = draw(st.sampled_from(inner))
        fn = draw(st.sampled_from(["swish", "ReLU", "", "softmax"]))
        return _replace_node(nodes, i, op=Activation(fn)), output, nodes[i].name
    if kind == "zero_input_dim":
        shape = list(nodes[0].op.shape)
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from([0, -1, -7]))
        return _replace_node(nodes, 0, op=Input(tuple(shape))), output, "input"
    if kind == "arity":
        i = draw(st.sampled_from(inner))
        if isinstance(nodes[i].op, (Add, Concat)):
            dropped = set(nodes[i].inputs[1:]) - {nodes[i].inputs[0]}
            orphaned = any(d != output and all(d not in n.inputs for j, n in enumerate(nodes) if j != i)
                           for d in dropped)  # then a dead node is a second error, which may be named first
            return _replace_node(nodes, i, inputs=nodes[i].inputs[:1]), output, None if orphaned else nodes[i].name
        return _replace_node(nodes, i, inputs=nodes[i].inputs * 2), output, nodes[i].name
    if kind == "groups":
        i = draw(st.sampled_from(convs))
        cin = shapes[nodes[i].inputs[0]][0]
        op = nodes[i].op
        return _replace_node(nodes, i, op=dataclasses.replace(op, groups=cin + 1, out_channels=cin + 1)), output, nodes[i].name
    if kind == "negative_padding":
        i = draw(st.sampled_from(convs + pools))
        op = nodes[i].op
        pad = [list(p) for p in op.padding]
        pad[draw(st.integers(0, len(pad) - 1))][draw(st.integers(0, 1))] = draw(st.integers(-3, -1))
        return _replace_node(nodes, i, op=dataclasses.replace(op, padding=tuple(map(tuple, pad)))), output, nodes[i].name
    if kind == "pool_padding":
        i = draw(st.sampled_from(pools))
        op = nodes[i].op
        pad = [list(p) for p in op.padding]
        d = draw(st.integers(0, len(pad) - 1))
        pad[d][draw(st.integers(0, 1))] = op.kernel[d] + draw(st.integers(0, 2))
        return _replace_node(nodes, i, op=dataclasses.replace(op, padding=tuple(map(tuple, pad)))), output, nodes[i].name
    assert kind == "zero_size"
    i = draw(st.sampled_from(sized))
    op = nodes[i].op
    bad = draw(st.sampled_from([0, -1]))
    attrs = [a for a in _INT_ATTRS.get(type(op), ())] + [a for a in _INT_TUPLE_ATTRS.get(type(op), ())]
    attr = draw(st.sampled_from(attrs))
    if attr in _INT_ATTRS.get(type(op), ()):
        new = dataclasses.replace(op, **{attr: bad})
    else:
        t = list(getattr(op, attr))
        t[draw(st.integers(0, len(t) - 1))] = bad
        new = dataclasses.replace(op, **{attr: tuple(t)})
    return _replace_node(nodes, i, op=new), output, nodes[i].name


@settings(max_examples=100, deadline=None)
@given(structural_mutants())
def test_random_invalid_specs_raise_spec_error(mutant):
    nodes, output, where = mutant
    with pytest.raises(SpecError) as ei:
        ModelSpec("mutant", tuple(nodes), output)
    if where is not None:
        assert ei.value.node == where, str(ei.value)


_JUNK = st.sampled_from(["3", "", 2.5, 3.0, None, [], {}, [1, "2"]])


@st.composite
def type_mutants(draw):
    """A valid graph with one int-typed attribute (or a node's inputs) replaced by junk."""
    nodes, _ = draw(valid_graphs())
    targets = [(i, a) for i, n in enumerate(nodes) for a in _INT_ATTRS.get(type(n.op), ()) + _INT_TUPLE_ATTRS.get(type(n.op), ())]
    targets += [(i, "padding") for i, n in enumerate(nodes) if isinstance(n.op, (Conv, MaxPool, AvgPool))]
    targets += [(0, "shape")] + [(i, "inputs") for i in range(1, len(nodes))]
    i, attr = draw(st.sampled_from(targets))
    junk = draw(_JUNK)
    node = nodes[i]
    if attr == "inputs":
        return _replace_node(nodes, i, inputs=junk if junk is None else (junk,)), node.name
    value = getattr(node.op, attr)
    if isinstance(value, tuple) and draw(st.booleans()):  # one element of a tuple
        v = list(value)
        j = draw(st.integers(0, len(v) - 1))
        if attr == "padding":
            pair = list(v[j])
            pair[draw(st.integers(0, 1))] = junk
            v[j] = tuple(pair)
        else:
            v[j] = junk
        junk = tuple(v)
    return _replace_node(nodes, i, op=dataclasses.replace(node.op, **{attr: junk})), node.name


@settings(max_examples=100, deadline=None)
@given(type_mutants())
def test_random_wrong_attribute_types_raise_spec_error(mutant):
    """Strings, floats, None and lists where ints are expected: always SpecError,
    never a silent float shape or a TypeError from inside validation."""
    nodes, where = mutant
    try:
        ModelSpec("mutant", tuple(nodes))
    except SpecError:
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{type(exc).__name__} instead of SpecError: {exc}")
    pytest.fail(f"accepted a wrong attribute type at node {where!r}: {[n for n in nodes if n.name == where]}")


@settings(max_examples=60, deadline=None)
@given(valid_graphs(), st.data())
def test_random_json_junk_is_spec_error(graph, data):
    """Junk values for attributes inside a JSON document: from_dict raises SpecError or
    returns a valid spec; never any other exception."""
    nodes, _ = graph
    d = json.loads(ModelSpec("rand", tuple(nodes)).to_json())
    node = data.draw(st.sampled_from(d["nodes"]))
    keys = [k for k in node["attrs"] if k not in ("bias", "count_include_pad", "alpha")]
    if not keys:
        return
    key = data.draw(st.sampled_from(keys))
    node["attrs"][key] = data.draw(st.sampled_from(["x", None, -1, 0, 2.5, [], {}, [[1]], [None]]))
    try:
        ModelSpec.from_dict(d)
    except SpecError:
        pass


# ---------------------------------------------------------------------------
# strict parsing and bad arguments (issue 9)
# ---------------------------------------------------------------------------


def _doc():
    b = SpecBuilder("doc")
    return json.loads(b.build(b.batch_norm(b.conv(b.input((3, 8, 8)), 4, 3, name="conv"), name="bn")).to_json())


def _spec():
    return ModelSpec.from_dict(_doc())


class TestStrictParsing:
    @pytest.mark.parametrize("version", [True, 1.0, "1", None, 2, [1]])
    def test_schema_version_must_be_the_int_1(self, version):
        d = _doc()
        d["schema_version"] = version
        with pytest.raises(SpecError, match="schema_version"):
            ModelSpec.from_dict(d)

    def test_schema_version_is_required(self):
        d = _doc()
        del d["schema_version"]
        with pytest.raises(SpecError, match=r"missing keys \['schema_version'\]"):
            ModelSpec.from_dict(d)

    @pytest.mark.parametrize("where", ["spec", "node"])
    def test_unknown_keys_are_refused(self, where):
        """A misspelt key ("input" for "inputs") would otherwise be dropped without a word."""
        d = _doc()
        (d if where == "spec" else d["nodes"][1])["input"] = ["input"]
        with pytest.raises(SpecError, match=r"unknown keys \['input'\]"):
            ModelSpec.from_dict(d)

    def test_missing_required_attribute(self):
        d = _doc()
        conv = next(n for n in d["nodes"] if n["op"] == "Conv")
        del conv["attrs"]["kernel"]
        with pytest.raises(SpecError, match=r"missing keys \['kernel'\]") as ei:
            ModelSpec.from_dict(d)
        assert ei.value.node == "conv"

    def test_duplicate_json_keys_are_refused(self):
        text = json.dumps(_doc())
        with pytest.raises(SpecError, match="'name' appears twice"):
            ModelSpec.from_json(text.replace('"name": "doc"', '"name": "doc", "name": "other"'))

    @pytest.mark.parametrize("key,value", [("name", 3), ("output", ["bn"]), ("name", None)])
    def test_name_and_output_are_strings(self, key, value):
        d = _doc()
        d[key] = value
        with pytest.raises(SpecError, match=f"'{key}' must be a string"):
            ModelSpec.from_dict(d)

    def test_deeply_nested_json(self):
        with pytest.raises(SpecError, match="nested too deeply"):
            ModelSpec.from_json("[" * 200_000 + "]" * 200_000)

    def test_deeply_nested_attribute_value(self):
        deep: list = []
        cur = deep
        for _ in range(100_000):
            cur.append([])
            cur = cur[0]
        d = _doc()
        next(n for n in d["nodes"] if n["op"] == "Conv")["attrs"]["kernel"] = deep
        with pytest.raises(SpecError, match="Conv.kernel must be a tuple of ints"):
            ModelSpec.from_dict(d)
        b = SpecBuilder("b")
        with pytest.raises(SpecError, match="kernel must be an int or 2 ints"):
            b.conv(b.input((3, 4, 4)), 2, deep)

    @pytest.mark.parametrize("text", [3, None, ["{}"]])
    def test_from_json_wants_text(self, text):
        with pytest.raises(SpecError, match="str or bytes"):
            ModelSpec.from_json(text)

    def test_int_and_float_attributes_are_one_graph(self):
        d = _doc()
        bn = next(n for n in d["nodes"] if n["op"] == "BatchNorm")
        bn["attrs"]["momentum"] = 0  # the int 0 and the float 0.0: one value, one hash
        a = ModelSpec.from_dict(d)
        bn["attrs"]["momentum"] = 0.0
        assert a.hash == ModelSpec.from_dict(d).hash and a.node("bn").op.momentum == 0.0


class TestSizeLimits:
    def test_absurd_input_is_refused(self):
        with pytest.raises(SpecError, match="elements per sample") as ei:
            SpecBuilder("big").input((10**9, 10**9))
        assert ei.value.node == "input"

    def test_absurd_parameter_is_refused(self):
        b = SpecBuilder("big")
        x = b.input((2**21,))
        with pytest.raises(SpecError, match=r"parameter weight .* elements per sample") as ei:
            b.dense(x, 2**20, name="fc")  # 2**41 weights
        assert ei.value.node == "fc"


class TestBadArguments:
    @pytest.mark.parametrize("bad", [None, 3, ["a"], {"a": 1}])
    def test_lookups(self, bad):
        spec = _spec()
        for call in (spec.node, spec.shape, spec.in_shapes):
            with pytest.raises(SpecError):
                call(bad)
        with pytest.raises(SpecError):
            SpecBuilder("b").shape(bad)

    def test_in_shapes_wants_a_node_of_the_spec(self):
        spec = _spec()
        with pytest.raises(SpecError, match="one of its nodes"):
            spec.in_shapes(Node("ghost", Activation("relu"), ("input",)))

    @pytest.mark.parametrize("name", [None, 3, ["n"]])
    def test_spec_names(self, name):
        with pytest.raises(SpecError, match="name must be a string"):
            SpecBuilder(name)
        with pytest.raises(SpecError, match="name must be a string"):
            ModelSpec(name, _spec().nodes)

    @pytest.mark.parametrize("nodes", [None, 3, "abc"])
    def test_nodes_must_be_a_sequence(self, nodes):
        with pytest.raises(SpecError, match="nodes must be a tuple"):
            ModelSpec("s", nodes)

    def test_builder_arguments(self):
        b = SpecBuilder("b")
        x = b.input((3, 4, 4))
        for call in (lambda: b.input(5, name="i2"), lambda: b.conv(["x"], 2, 1), lambda: b.add(x, ["x"]),
                     lambda: b.op("Conv", (x,)), lambda: b.op(Activation("relu"), x), lambda: b.relu(x, name=7),
                     lambda: b.build(np.array([1, 2])), lambda: b.dense(b.flatten(x), "3")):
            with pytest.raises(SpecError):
                call()
        assert b.build().param_shapes() == {}
        with pytest.raises(SpecError, match="buffers must be a bool"):
            b.build().param_shapes(np.array([1, 2]))

    def test_input_shape_from_numpy(self):
        b = SpecBuilder("b")
        assert b.build(b.input(np.array([3, 4]))).input_shape == (3, 4)


# ---------------------------------------------------------------------------
# the ops of issue 10: attributes, shapes, params, FLOPs, inits, JSON
# ---------------------------------------------------------------------------


def _one(shape, add, dtype="float32"):
    b = SpecBuilder("one")
    spec = b.build(add(b, b.input(shape, dtype=dtype)))
    return spec, spec.node(spec.output), {r.name: r for r in spec.info()}[spec.output]


def _round_trips(spec):
    back = ModelSpec.from_json(spec.to_json())
    assert back == spec and back.hash == spec.hash and back.to_json() == spec.to_json()


def _refused(nodes, node, match):
    with pytest.raises(SpecError, match=match) as ei:
        ModelSpec("bad", tuple(nodes))
    assert ei.value.node == node


class TestActivationsAndPReLU:
    def test_published_json_and_hash_unchanged_by_late_attributes(self):
        """Activation gained beta and threshold (softplus) after specs were saved: a spec
        that does not use them has the JSON it had, so its hash and weights files hold."""
        spec = ModelSpec("t", (inp((3,)), Node("a", Activation("relu"), ("input",))))
        assert spec.to_json() == (
            '{"name": "t", "nodes": [{"attrs": {"dtype": "float32", "shape": [3]}, "inputs": [], "name": "input", '
            '"op": "Input"}, {"attrs": {"alpha": 0.01, "approximate": "none", "fn": "relu"}, "inputs": ["input"], '
            '"name": "a", "op": "Activation"}], "output": "a", "schema_version": 1}'
        )
        spec, node, _ = _one((3,), lambda b, x: b.softplus(x, beta=2, threshold=5))
        assert node.op.beta == 2.0 and type(node.op.beta) is float
        assert json.loads(spec.to_json())["nodes"][1]["attrs"] == {
            "alpha": 0.01, "approximate": "none", "fn": "softplus", "beta": 2.0, "threshold": 5.0}
        _round_trips(spec)
        assert _one((3,), lambda b, x: b.softplus(x))[0].to_json().count("beta") == 0

    @pytest.mark.parametrize("fn", ["relu6", "elu", "hardsigmoid", "hardswish", "softplus", "mish"])
    def test_new_functions_infer_and_count(self, fn):
        spec, _, row = _one((3, 4, 5), lambda b, x: b.activation(x, fn))
        assert row.shape == (3, 4, 5) and row.flops == 60 and row.params == 0
        _round_trips(spec)

    def test_elu_builder_default_is_torchs_alpha(self):
        assert _one((3,), lambda b, x: b.elu(x))[1].op.alpha == 1.0

    @pytest.mark.parametrize("bad,match", [
        (Activation("swish"), "activation must be one of"),
        (Activation("softplus", beta=0.0), "beta must be > 0"),
        (Activation("softplus", beta="2"), "beta must be a finite number"),
        (Activation("softplus", threshold=float("inf")), "threshold must be a finite number"),
    ])
    def test_bad_activation_attributes_name_the_node(self, bad, match):
        _refused([inp((3, 4)), Node("act", bad, ("input",))], "act", match)

    @pytest.mark.parametrize("shape,num", [((6,), 1), ((6,), 6), ((4, 5, 5), 4), ((4, 2, 2, 2), 1)])
    def test_prelu_params_init_and_flops(self, shape, num):
        spec, node, row = _one(shape, lambda b, x: b.prelu(x, num, name="p"))
        assert spec.param_shapes() == {"p.weight": (num,)} and spec.trainable() == ["p.weight"]
        assert row.shape == shape and row.flops == int(np.prod(shape))
        assert node.op.init("weight", (num,), [shape]) == Init("constant", 0.25)  # torch.nn.PReLU's init
        _round_trips(spec)

    @pytest.mark.parametrize("num,match", [(3, "1 or the 4 channels"), (0, "1 or the 4 channels"),
                                           (2.0, "num_parameters must be an int")])
    def test_prelu_refuses_other_slope_counts(self, num, match):
        _refused([inp((4, 5, 5)), Node("p", PReLU(num), ("input",))], "p", match)



def _pooled(k, name):
    return Node(name, AvgPool(k, k, ((0, 0), (0, 0))), ("input",))


class TestBroadcastingAndScale:
    @pytest.mark.parametrize("kind", [Add, Mul])
    @pytest.mark.parametrize("pools,out", [
        ([(4, 5)], (3, 4, 5)),  # with the input itself: SE
        ([(4, 1), (1, 5)], (3, 4, 5)),  # (3, 1, 5) and (3, 4, 1): outer
        ([(4, 5), (4, 5)], (3, 1, 1)),
    ])
    def test_legal_shapes_broadcast(self, kind, pools, out):
        pooled = [_pooled(k, f"p{i}") for i, k in enumerate(pools)]
        ins = tuple(n.name for n in pooled) + (("input",) if len(pools) == 1 else ())
        spec = ModelSpec("t", (inp((3, 4, 5)), *pooled, Node("op", kind(), ins)))
        assert spec.shape("op") == out
        assert {r.name: r for r in spec.info()}["op"].flops == (len(ins) - 1) * int(np.prod(out))
        _round_trips(spec)

    @pytest.mark.parametrize("kind", [Add, Mul])
    def test_illegal_shapes_name_the_node(self, kind):
        dense = Node("d", Dense(3), ("gap",))
        gap = Node("gap", GlobalAvgPool(), ("input",))
        _refused([inp((3, 4, 5)), gap, dense, Node("op", kind(), ("input", "d"))], "op", "equal rank")  # (3,) no
        conv = Node("c", Conv(2, (1, 1), (1, 1), P0, (1, 1)), ("input",))  # (2, 4, 5) with (3, 4, 5)
        _refused([inp((3, 4, 5)), conv, Node("op", kind(), ("input", "c"))], "op", "equal across inputs or 1")

    def test_scale_is_torchvisions_layer_scale(self):
        spec, node, row = _one((8, 5, 5), lambda b, x: b.scale(x, name="features.1.0"))
        assert spec.param_shapes() == {"features.1.0.layer_scale": (8, 1, 1)}  # CNBlock's name and shape
        assert node.op.init("layer_scale", (8, 1, 1), [(8, 5, 5)]) == Init("constant", 1e-6)
        assert _one((8,), lambda b, x: b.scale(x, init=0.1))[0].param_shapes() == {"scale_2.layer_scale": (8,)}
        assert row.flops == 200 and row.params == 8
        _round_trips(spec)
        _refused([inp((3,)), Node("s", Scale("1e-6"), ("input",))], "s", "init_value must be a finite number")



class TestNorms:
    @pytest.mark.parametrize("add,affine", [
        (lambda b, x: b.layer_norm(x, name="n"), True),
        (lambda b, x: b.group_norm(x, 2, name="n"), True),
        (lambda b, x: b.instance_norm(x, name="n"), False),  # nn.InstanceNorm2d's default
        (lambda b, x: b.instance_norm(x, affine=True, name="n"), True),
        (lambda b, x: b.layer_norm(x, affine=False, name="n"), False),
    ])
    def test_params_flops_init_json(self, add, affine):
        spec, node, row = _one((4, 3, 5), add)
        assert spec.param_shapes() == ({"n.weight": (4,), "n.bias": (4,)} if affine else {})
        assert row.shape == (4, 3, 5) and row.flops == (7 if affine else 5) * 60
        assert [node.op.init(p, (4,), [(4, 3, 5)]).value for p in ("weight", "bias")] == [1.0, 0.0]
        _round_trips(spec)

    def test_group_norm_positional_groups_and_json_keys(self):
        assert GroupNorm(2) == GroupNorm(groups=2, eps=1e-5, affine=True)
        spec, _, _ = _one((4, 3), lambda b, x: b.group_norm(x, 4, eps=1e-3))
        assert json.loads(spec.to_json())["nodes"][1]["attrs"] == {"groups": 4, "eps": 1e-3, "affine": True}

    @pytest.mark.parametrize("op,shape,match", [
        (GroupNorm(3), (4, 5), "groups 3 must be >= 1 and divide the 4 channels"),
        (GroupNorm(0), (4, 5), "groups 0 must be >= 1"),
        (GroupNorm(2.0), (4, 5), "groups must be an int"),
        (InstanceNorm(), (4,), "InstanceNorm needs spatial dims"),
        (LayerNorm(eps=0.0), (4, 5), "eps must be > 0"),
        (LayerNorm(affine=1), (4, 5), "affine must be a bool"),
    ])
    def test_bad_attributes_name_the_node(self, op, shape, match):
        _refused([inp(shape), Node("n", op, ("input",))], "n", match)



class TestPoolingAndPad:
    @pytest.mark.parametrize("n,k,s,pad,floor,ceil", [
        (6, 3, 2, (0, 0), 2, 3),
        (7, 2, 2, (1, 1), 4, 4),  # ceil's 5th window would start at 8 = n + before: dropped
        (5, 2, 2, (1, 1), 3, 3),
        (8, 3, 3, (1, 1), 3, 3),
        (10, 4, 3, (2, 0), 3, 4),
    ])
    def test_pool_out_floor_and_ceil(self, n, k, s, pad, floor, ceil):
        assert (pool_out(n, k, s, pad, False), pool_out(n, k, s, pad, True)) == (floor, ceil)
        spec, _, _ = _one((2, n), lambda b, x: b.max_pool(x, k, s, [pad], ceil_mode=True))
        assert spec.output_shape == (2, ceil)
        _round_trips(spec)

    def test_ceil_mode_is_late_json_holds_for_old_pools(self):
        spec, _, _ = _one((2, 6, 6), lambda b, x: b.avg_pool(x, 2))
        assert json.loads(spec.to_json())["nodes"][1]["attrs"] == {
            "kernel": [2, 2], "stride": [2, 2], "padding": [[0, 0], [0, 0]], "count_include_pad": True}
        spec, _, _ = _one((2, 6, 6), lambda b, x: b.avg_pool(x, 3, 2, ceil_mode=True))
        assert json.loads(spec.to_json())["nodes"][1]["attrs"]["ceil_mode"] is True

    @pytest.mark.parametrize("kind", [AdaptiveAvgPool, AdaptiveMaxPool])
    def test_adaptive(self, kind):
        spec = ModelSpec("t", (inp((3, 7, 5)), Node("a", kind((3, 8)), ("input",))))
        assert spec.output_shape == (3, 3, 8) and spec.num_params == 0
        _round_trips(spec)
        for size, match in (((3,), "each of the 2 spatial dims"), ((0, 2), "size >= 1"), ((2.0, 2), "tuple of ints")):
            _refused([inp((3, 7, 5)), Node("a", kind(size), ("input",))], "a", match)

    def test_pad_shapes_and_json(self):
        spec, node, row = _one((2, 4, 5), lambda b, x: b.pad(x, ((1, 2), (0, 3)), "reflect"))
        assert spec.output_shape == (2, 7, 8) and row.params == 0
        assert node.op == Pad(((1, 2), (0, 3)), "reflect")
        _round_trips(spec)
        assert _one((2, 4), lambda b, x: b.pad(x, 2))[0].output_shape == (2, 8)

    @pytest.mark.parametrize("op,match", [
        (Pad(((4, 0), (0, 0)), "reflect"), "must be smaller than the input"),
        (Pad(((1, 0), (0, 0)), "circular"), "pad mode must be one of"),
        (Pad(((1, 0), (0, 0)), "replicate", 1.0), "value is the constant mode's"),
        (Pad(((-1, 0), (0, 0))), "non-negative"),
        (Pad(((1, 0),)), "each of the 2 spatial dims"),
        (Pad(((1, 0), (0, 0)), value="0"), "value must be a finite number"),
    ])
    def test_bad_pads_name_the_node(self, op, match):
        _refused([inp((2, 4, 5)), Node("p", op, ("input",))], "p", match)



class TestChannelOps:
    def test_shapes_and_json(self):
        spec, _, row = _one((6, 3, 4), lambda b, x: b.channel_shuffle(x, 3))
        assert spec.output_shape == (6, 3, 4) and row.params == 0
        _round_trips(spec)
        spec, _, _ = _one((6, 3, 4), lambda b, x: b.channel_slice(x, 2, 5))
        assert spec.output_shape == (3, 3, 4)
        _round_trips(spec)

    @pytest.mark.parametrize("op,match", [
        (ChannelShuffle(4), "groups 4 must be >= 1 and divide the 6 channels"),
        (ChannelShuffle(0), "groups 0"),
        (ChannelSlice(3, 3), "0 <= start < stop <= 6"),
        (ChannelSlice(4, 7), "0 <= start < stop <= 6"),
        (ChannelSlice(-1, 2), "0 <= start < stop <= 6"),
        (ChannelSlice(0, 2.0), "stop must be an int"),
    ])
    def test_bad_attributes_name_the_node(self, op, match):
        _refused([inp((6, 3, 4)), Node("c", op, ("input",))], "c", match)



class TestUpsample:
    def test_builder_by_scale_and_by_size(self):
        spec, node, _ = _one((3, 5, 4), lambda b, x: b.upsample(x, scale=1.5, mode="bilinear"))
        assert node.op == Upsample((7, 6), (1.5, 1.5), "linear", False) and spec.output_shape == (3, 7, 6)
        _round_trips(spec)
        spec, node, _ = _one((3, 5, 4), lambda b, x: b.upsample(x, (9, 2), mode="bilinear", align_corners=True))
        assert node.op == Upsample((9, 2), (), "linear", True)
        _round_trips(spec)
        spec, node, _ = _one((3, 5, 4), lambda b, x: b.upsample(x, scale=(2, 3)))
        assert node.op.scale == (2.0, 3.0) and type(node.op.scale[0]) is float and spec.output_shape == (3, 10, 12)
        assert json.loads(spec.to_json())["nodes"][1]["attrs"]["scale"] == [2.0, 3.0]

    @pytest.mark.parametrize("call,match", [
        (lambda b, x: b.upsample(x), "exactly one of size and scale"),
        (lambda b, x: b.upsample(x, 4, 2.0), "exactly one of size and scale"),
        (lambda b, x: b.upsample(x, scale=2, mode="trilinear"), "'trilinear' is for 3 spatial dims"),
        (lambda b, x: b.upsample(x, scale=2, align_corners=True), "align_corners is linear"),
        (lambda b, x: b.upsample(x, scale=-2), "number > 0"),
        (lambda b, x: b.upsample(x, scale=2, mode="bicubic"), "mode must be one of"),
    ])
    def test_builder_errors_name_the_node(self, call, match):
        b = SpecBuilder("t")
        x = b.input((3, 5, 4))
        with pytest.raises(SpecError, match=match) as ei:
            call(b, x)
        assert ei.value.node

    @pytest.mark.parametrize("op,match", [
        (Upsample((7, 6), (1.5, 2.0)), r"gives size \(7, 8\)"),
        (Upsample((7,)), "each of the 2 spatial dims"),
        (Upsample((7, 6), ("1.5", 1.5)), "scale must be a tuple of finite numbers"),
        (Upsample((7, 6), (), "area"), "mode must be one of"),
    ])
    def test_bad_attributes_name_the_node(self, op, match):
        _refused([inp((3, 5, 4)), Node("u", op, ("input",))], "u", match)



class TestConvTranspose:
    def test_shape_params_flops_init_json(self):
        spec, node, row = _one((4, 5, 6), lambda b, x: b.conv_transpose(x, 6, 3, 2, 1, 1, groups=2, name="up"))
        assert spec.output_shape == (6, 10, 12)  # (n - 1) * 2 - 2 + 3 + 1: torch's formula
        assert spec.param_shapes() == {"up.weight": (4, 3, 3, 3), "up.bias": (6,)}  # (in, out/groups, *k) as torch
        assert row.flops == 2 * (4 * 5 * 6) * 3 * 9 + 6 * 10 * 12
        assert node.op.init("weight", (4, 3, 3, 3), [(4, 5, 6)]) == Init("normal", (2.0 / (4 * 9)) ** 0.5)
        assert node.op.padding == ((1, 1), (1, 1)) and node.op.output_padding == (1, 1)
        _round_trips(spec)
        spec, _, _ = _one((2, 7), lambda b, x: b.conv_transpose(x, 3, 4, 3, [(2, 0)], dilation=2))
        assert spec.output_shape == (3, 6 * 3 + 2 * 3 + 1 - 2)

    @pytest.mark.parametrize("kw,match", [
        (dict(output_padding=2, stride=2), "output_padding .* must be >= 0 and smaller than stride"),
        (dict(output_padding=1), "smaller than stride"),
        (dict(groups=3), "divisible by groups 3"),
        (dict(padding=((5, 5), (0, 0))), "non-positive output shape"),
        (dict(padding="same"), "explicit numbers"),
    ])
    def test_bad_attributes_name_the_node(self, kw, match):
        b = SpecBuilder("t")
        x = b.input((4, 3, 3))
        with pytest.raises(SpecError, match=match) as ei:
            b.conv_transpose(x, 6, 3, name="up", **kw)
        assert ei.value.node == "up"
        _refused([inp((4, 3, 3)), Node("up", ConvTranspose(6, (3, 3), (1, 1), P0, (0,), (1, 1)), ("input",))], "up",
                 "output_padding")



class TestStochasticDepth:
    def test_json_and_counts(self):
        spec, node, row = _one((3, 4, 4), lambda b, x: b.stochastic_depth(x, 0.1, "batch"))
        assert node.op == StochasticDepth(0.1, "batch") and row.params == row.flops == 0
        _round_trips(spec)
        assert _one((3,), lambda b, x: b.stochastic_depth(x, 1))[1].op.p == 1.0  # torchvision allows p = 1

    @pytest.mark.parametrize("op,match", [
        (StochasticDepth(1.5), r"p must be in \[0, 1\]"),
        (StochasticDepth(-0.1), r"p must be in \[0, 1\]"),
        (StochasticDepth(0.1, "sample"), "mode must be one of"),
        (StochasticDepth("0.1"), "p must be a finite number"),
    ])
    def test_bad_attributes_name_the_node(self, op, match):
        _refused([inp((3, 4)), Node("sd", op, ("input",))], "sd", match)


def test_op_init_rules_are_what_init_weights_draws():
    """Each op's declared init (``Op.init``) describes the arrays init_weights draws."""
    from hal.models import get
    from hal.weights import init_weights

    spec = get("small_cnn")
    w = init_weights(spec, seed=3)
    for n in spec.nodes:
        ins = spec.in_shapes(n)
        for p, shape in {**n.op.params(ins), **n.op.buffers(ins)}.items():
            rule, a = n.op.init(p, shape, ins), w[f"{n.name}.{p}"]
            if rule.dist == "constant":
                assert np.all(a == rule.value), (n.name, p)
            elif rule.dist == "uniform":
                assert np.abs(a).max() <= rule.value and np.abs(a).max() > 0.9 * rule.value, (n.name, p)
            else:
                assert a.std() == pytest.approx(rule.value, rel=0.15), (n.name, p)
