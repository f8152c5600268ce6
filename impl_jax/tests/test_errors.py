"""Bad input raises early and clearly: at trace time, naming shapes as tuples and dtypes by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskbn_jax import init, masked_batch_norm

X = np.zeros((4, 8, 3), np.float32)
BOOL_MASK = np.ones((4, 8), bool)

# (id, call kwargs overriding the defaults, error type, strings the message must contain)
CASES = [
    ("mask-shape-wrong-length", {"mask": np.ones((4, 7), bool)}, ValueError, ["(4, 7)", "(4, 8, 3)"]),
    (
        "mask-same-rank-not-broadcastable",
        {"mask": np.ones((4, 2, 3), bool)},
        ValueError,
        ["(4, 2, 3)", "(4, 8, 3)", "(4, 8)", "(4, 8, 1)", "broadcasts"],
    ),
    ("mask-rank-too-high", {"mask": np.ones((1, 4, 8, 3), bool)}, ValueError, ["(1, 4, 8, 3)", "(4, 8, 3)"]),
    ("x-complex64", {"x": X.astype(np.complex64)}, TypeError, ["complex64", "real"]),
    ("mask-shape-too-short", {"mask": np.ones((8,), bool)}, ValueError, ["(8,)", "(4, 8, 3)"]),
    ("mask-float32", {"mask": BOOL_MASK.astype(np.float32)}, TypeError, ["float32", "mask", "astype(bool)"]),
    # NumPy arrays only at import (here, an ml_dtypes bfloat16 one): a jax array would start JAX's runtime
    # during collection, before the jax conformance backend can ask for its shard devices
    ("mask-bfloat16", {"mask": BOOL_MASK.astype(jnp.bfloat16)}, TypeError, ["bfloat16", "mask"]),
    ("x-int32", {"x": X.astype(np.int32)}, TypeError, ["int32", "(4, 8, 3)"]),
    ("channels-mismatch", {"channels": 5}, ValueError, ["5", "3", "channels"]),
    ("axis-out-of-range", {"axis": 3}, ValueError, ["axis 3", "(4, 8, 3)"]),
    ("axis-negative-out-of-range", {"axis": -4}, ValueError, ["axis -4", "(4, 8, 3)"]),
    ("padded-output-unknown", {"padded_output": "drop"}, ValueError, ["drop", "normalize"]),
    ("training-not-bool", {"training": np.array(True)}, TypeError, ["training", "bool"]),
]


def _call(overrides, *, traced: bool):
    kw = {
        "mask": BOOL_MASK,
        "x": X,
        "channels": 3,
        "axis": -1,
        "padded_output": "normalize",
        "training": True,
    }
    kw.update(overrides)
    params, state = init(kw.pop("channels"))
    x, mask = kw.pop("x"), kw.pop("mask")
    f = lambda x, mask, params, state: masked_batch_norm(x, mask, params, state, **kw)  # noqa: E731
    # eval_shape only traces: an error there proves it is raised before anything runs
    return (jax.eval_shape if traced else lambda g, *a: g(*a))(f, x, mask, params, state)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "at-trace-time"])
@pytest.mark.parametrize(("overrides", "error", "mentions"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(overrides, error, mentions, traced):
    with pytest.raises(error) as info:
        _call(overrides, traced=traced)
    message = str(info.value)
    missing = [s for s in mentions if s.lower() not in message.lower()]
    assert not missing, f"{message!r} does not mention {missing}"


def test_good_input_passes_the_same_checks():
    # the harness of this file: with no override the call is valid
    y, _ = _call({}, traced=True)
    assert y.shape == X.shape


@pytest.mark.parametrize(
    ("overrides", "named"),
    [({"x": X.astype(np.int64)}, "int64"), ({"mask": BOOL_MASK.astype(np.float64)}, "float64")],
    ids=["x-int64", "mask-float64"],
)
def test_errors_name_the_dtype_as_given_even_where_jax_would_narrow_it(overrides, named):
    """Without x64, jnp.asarray turns int64/float64 NumPy arrays into int32/float32: the
    check looks at the array as passed, so the message names what the caller gave."""
    with pytest.raises(TypeError, match=named):
        _call(overrides, traced=False)
