"""Params and moving stats round-trip through npz and through Flax's msgpack."""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxbn_helpers import affine

from maskbn_jax import init, load, load_portable, masked_batch_norm, save, save_portable
from maskbn_jax.serialization import from_bytes, to_bytes

CONFIG = {"momentum": 0.9, "epsilon": 1e-3, "axis": -1, "padded_output": "zero"}


def assert_same_tree(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("target", ["path", "file-object"])
@pytest.mark.parametrize(("use_scale", "use_bias"), [(True, True), (False, True), (False, False)])
def test_npz_round_trip(tmp_path, rng, target, use_scale, use_bias):
    params, state = affine(rng, 4)
    params = {k: v for k, v in params.items() if {"scale": use_scale, "bias": use_bias}[k]}
    file = tmp_path / "bn.npz" if target == "path" else io.BytesIO()
    save(file, params, state, CONFIG)
    if target == "file-object":
        file.seek(0)
    params2, state2, config2 = load(file)
    assert_same_tree(params2, params)
    assert_same_tree(state2, state)
    assert config2 == CONFIG


def test_npz_without_config_loads_an_empty_config(tmp_path, rng):
    params, state = affine(rng, 2)
    save(tmp_path / "a.npz", params, state)
    assert load(tmp_path / "a.npz")[2] == {}


def test_config_must_be_json_compatible(tmp_path, rng):
    params, state = affine(rng, 2)
    with pytest.raises(TypeError, match="JSON"):
        save(tmp_path / "a.npz", params, state, {"dtype": jnp.float32})


def test_loaded_layer_continues_identically(tmp_path, rng):
    params, state = affine(rng, 3)
    x = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
    _, state = masked_batch_norm(x, None, params, state, training=True)
    save(tmp_path / "bn.npz", params, state, CONFIG)
    params2, state2, config = load(tmp_path / "bn.npz")
    jax.tree.map(
        np.testing.assert_array_equal,
        masked_batch_norm(x, None, params, state, training=True, **config),
        masked_batch_norm(x, None, params2, state2, training=True, **config),
    )


def test_float64_layer_round_trips_as_float64(tmp_path):
    with jax.enable_x64(True):
        params, state = init(3, param_dtype=jnp.float64, stats_dtype=jnp.float64)
        save(tmp_path / "f64.npz", params, state)
        params2, state2, _ = load(tmp_path / "f64.npz")
        assert_same_tree(params2, params)
        assert_same_tree(state2, state)
        assert state2["var"].dtype == jnp.float64


@pytest.fixture
def flax_serialization():
    return pytest.importorskip("flax.serialization")


@pytest.mark.parametrize("use_bias", [True, False], ids=["with-bias", "no-bias"])
def test_flax_msgpack_round_trip(rng, flax_serialization, use_bias):
    params, state = affine(rng, 4)
    if not use_bias:
        params.pop("bias")
    params2, state2, config2 = from_bytes(to_bytes(params, state, CONFIG))
    assert_same_tree(params2, params)
    assert_same_tree(state2, state)
    assert config2 == CONFIG


def test_stock_flax_batchnorm_checkpoint_loads(rng, flax_serialization):
    from flax import linen as nn

    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    params, state, config = from_bytes(flax_serialization.to_bytes(variables))
    assert config == {}
    assert_same_tree(params, dict(variables["params"]))
    assert_same_tree(state, dict(variables["batch_stats"]))


@pytest.mark.parametrize("unbiased_var", [False, True], ids=["population", "unbiased"])
def test_portable_format_records_the_moving_var_convention(tmp_path, rng, unbiased_var):
    params, state = affine(rng, 3)
    save_portable(tmp_path, params, state, momentum=0.9, epsilon=1e-3, unbiased_var=unbiased_var)
    written = json.loads((tmp_path / "maskbn.json").read_text())
    assert written["moving_var"] == ("unbiased" if unbiased_var else "population")
    _, _, kwargs = load_portable(tmp_path)
    assert kwargs["unbiased_var"] is unbiased_var
    # a file from before the key existed is population
    del written["moving_var"]
    (tmp_path / "maskbn.json").write_text(json.dumps(written))
    assert load_portable(tmp_path)[2]["unbiased_var"] is False
    written["moving_var"] = "sample"
    (tmp_path / "maskbn.json").write_text(json.dumps(written))
    with pytest.raises(ValueError, match="moving_var must be one of"):
        load_portable(tmp_path)
