"""Random bad inputs to the core API: mutated zoo specs, arrays and weights mappings.

Every call either succeeds or raises a :class:`hal.errors.HalError`; anything else
(TypeError, KeyError, RecursionError, MemoryError...) is a bug that reached a user.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import hal
from hal.errors import HalError
from hal.models import get
from hal.spec import ModelSpec
from hal.weights import check_weights, from_state_dict, init_weights

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ZOO_DOCS = [get("small_cnn", input_size=8).to_dict(), get("resnet18", num_classes=4, input_size=16).to_dict()]
SMALL = get("small_cnn", input_size=8)
SMALL_WEIGHTS = init_weights(SMALL)

JUNK = st.one_of(
    st.sampled_from([None, True, False, -1, 0, 1, 2**63, 10**30, -(10**30), 1.5, 1.0, float("nan"), float("inf"),
                     "", "x", "Conv", "input", [], [1], [1, 2], [[1, 2]], [[1, 2], [3]], {}, {"a": 1}]),
    st.integers(-(2**40), 2**40),
    st.text(max_size=4),
)


def _paths(doc, prefix=()):
    """Every (path, value) of a JSON document."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def _at(doc, path):
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def bad_spec_docs(draw):
    """A zoo spec's JSON dict with one to three mutations."""
    doc = copy.deepcopy(draw(st.sampled_from(ZOO_DOCS)))
    for _ in range(draw(st.integers(1, 3))):
        nodes = doc.get("nodes") if isinstance(doc.get("nodes"), list) else []
        kind = draw(st.sampled_from(["replace", "delete", "add_key", "op", "cycle", "duplicate", "drop_node"]))
        named = [n for n in nodes if isinstance(n, dict) and isinstance(n.get("name"), str)]
        if kind in ("op", "cycle", "duplicate", "drop_node") and len(named) >= 2:
            i, j = sorted(draw(st.lists(st.integers(0, len(named) - 1), min_size=2, max_size=2, unique=True)))
            a, b = named[i], named[j]
            if kind == "op":
                a["op"] = draw(st.sampled_from(["Conv2D", "conv", "Lambda", "", "Input", "Add", "Dense"]))
            elif kind == "cycle":  # a node reads a later one
                a["inputs"] = [*a.get("inputs", []), b["name"]] if isinstance(a.get("inputs"), list) else [b["name"]]
            elif kind == "duplicate":
                b["name"] = a["name"]
            else:
                nodes.remove(a)
            continue
        path, value = draw(st.sampled_from(list(_paths(doc))))
        if not path:
            continue
        parent = _at(doc, path[:-1])
        if kind == "delete":
            del parent[path[-1]]
        elif kind == "add_key" and isinstance(value, dict):
            value[draw(st.sampled_from(["extra", "input", "attr", "name"]))] = draw(JUNK)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and draw(st.booleans()):
            parent[path[-1]] = draw(st.sampled_from([-value, 0, value * 10**9, -1, value + 0.5]))
        else:
            parent[path[-1]] = draw(JUNK)
    return doc


def _only_hal_errors(call, *args):
    try:
        return call(*args)
    except HalError:
        return None
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(exc).__name__} escaped instead of a hal error: {exc}")


@SETTINGS
@given(bad_spec_docs(), st.booleans())
def test_mutated_zoo_specs(doc, as_json):
    text = json.dumps(doc)  # NaN/Infinity allowed, as Python writes them
    spec = _only_hal_errors(ModelSpec.from_json, text) if as_json else _only_hal_errors(ModelSpec.from_dict, doc)
    if spec is not None:  # it parsed: then the rest of the static API works on it
        assert ModelSpec.from_json(spec.to_json()) == spec
        assert spec.num_params >= 0 and spec.flops >= 0 and len(spec.info()) == len(spec.nodes)


ARRAYS = st.one_of(
    hnp.arrays(
        st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.bool_, np.complex64, np.object_, "U2"]),
        hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5),
    ),
    st.sampled_from([None, "x", 3, 2.5, [1, [2]], {"a": 1}, [[float("nan")]]]),
)
KEYS = st.sampled_from([*SMALL_WEIGHTS, "fc2.num_batches_tracked", "nope.weight", "", 3, None, ("a",)])


@SETTINGS
@given(st.dictionaries(KEYS, ARRAYS, max_size=6), st.booleans(), st.booleans())
def test_random_weights_mappings(changes, drop, via_state_dict):
    """Start from good weights, replace or add a few entries (and perhaps drop one)."""
    w = {**SMALL_WEIGHTS, **changes}
    if drop:
        w.pop(next(iter(SMALL_WEIGHTS)))
    call = from_state_dict if via_state_dict else check_weights
    out = _only_hal_errors(call, SMALL, w)
    if out is not None:  # accepted: exactly the spec's names, finite floats of the right shapes
        assert set(out) == set(SMALL.param_shapes())
        for k, v in out.items():
            assert v.shape == SMALL.param_shapes()[k] and np.issubdtype(v.dtype, np.floating) and np.isfinite(v).all()


@SETTINGS
@given(st.one_of(st.none(), st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=3), ARRAYS))
def test_random_non_mappings_and_non_specs(value):
    _only_hal_errors(check_weights, SMALL, value)
    _only_hal_errors(init_weights, value)
    _only_hal_errors(ModelSpec.from_dict, value)
    _only_hal_errors(get, value)


@pytest.fixture(scope="module")
def executable():
    return hal.compile(SMALL, "numpy", SMALL_WEIGHTS)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf and nan inputs overflow, as they should
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    ARRAYS,
    hnp.arrays(st.sampled_from([np.float32, np.float64]), st.sampled_from([(1, 3, 8, 8), (2, 3, 8, 8), (3, 8, 8),
                                                                            (1, 3, 8, 9), (1, 8, 8, 3)]),
               elements=st.floats(allow_nan=True, allow_infinity=True, width=32)),
))
def test_random_arrays_to_predict(executable, x):
    y = _only_hal_errors(executable.predict, x)
    if y is not None:
        assert y.shape == (len(x), *SMALL.output_shape)
