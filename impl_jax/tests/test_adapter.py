"""The conformance adapter: name translation, dtypes, round trips, stock layer, entry point."""

from __future__ import annotations

from importlib.metadata import entry_points

import numpy as np
import pytest

pytest.importorskip("maskbn_conformance")
from maskbn_conformance.adapter import ENTRY_POINT_GROUP, LayerConfig, Unsupported
from maskbn_jax import conformance_adapter
from maskbn_jax.conformance_adapter import JaxBackend


def config(**kw):
    base = {
        "channels": 3,
        "axis": -1,
        "rank": 3,
        "decay": 0.9,
        "epsilon": 1e-3,
        "center": True,
        "scale": True,
        "padded_output": "normalize",
        "dtype": "float32",
    }
    base.update(kw)
    return LayerConfig(**base)


@pytest.fixture
def x(rng):
    return rng.normal(2.0, 3.0, (4, 5, 3)).astype(np.float32)


def test_entry_point_finds_the_backend():
    (ep,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "jax"]
    backend = ep.load()()
    assert backend.name == "jax" and isinstance(backend, JaxBackend)
    assert backend.expectations_path().is_file()


def test_state_uses_neutral_names_and_set_state_translates(x):
    layer = JaxBackend().layer(config(center=False))
    assert set(layer.get_state()) == {"gamma", "moving_mean", "moving_var"}
    layer.set_state({"gamma": np.full(3, 2.0), "moving_mean": np.arange(3.0)})
    state = layer.get_state()
    assert state["gamma"].dtype == np.float32
    np.testing.assert_array_equal(state["moving_mean"], [0, 1, 2])
    with pytest.raises(KeyError, match="beta"):
        layer.set_state({"beta": np.zeros(3)})


def test_decay_is_flax_momentum(x):
    layer = JaxBackend().layer(config(decay=0.25))
    layer.forward(x, "float32", None, True)
    flat = x.astype(np.float64).reshape(-1, 3)
    np.testing.assert_allclose(layer.get_state()["moving_mean"], 0.75 * flat.mean(0), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_outputs_carry_the_run_dtype(x, dtype):
    layer = JaxBackend().layer(config(dtype=dtype))
    out, grads = layer.forward_backward(x, dtype, np.ones((4, 5), bool), np.ones_like(x))
    assert out.dtype == grads.x.dtype == dtype
    assert out.value.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert layer.get_state()["moving_var"].dtype == (np.float64 if dtype == "float64" else np.float32)


@pytest.mark.parametrize("flax_installed", [True, False], ids=["msgpack", "npz"])
def test_round_trip_keeps_config_and_state(tmp_path, x, monkeypatch, flax_installed):
    if flax_installed:
        pytest.importorskip("flax")
    else:
        monkeypatch.setattr(conformance_adapter, "_flax_available", lambda: False)
    layer = JaxBackend().layer(config(padded_output="zero"))
    layer.forward(x, "float32", None, True)
    loaded = layer.round_trip(tmp_path)
    assert loaded.config == layer.config
    [written] = tmp_path.iterdir()
    assert written.suffix == (".msgpack" if flax_installed else ".npz")
    for k, v in layer.get_state().items():
        np.testing.assert_array_equal(loaded.get_state()[k], v)
    mask = np.arange(20).reshape(4, 5) % 3 > 0
    np.testing.assert_array_equal(
        loaded.forward(x, "float32", mask, False).value, layer.forward(x, "float32", mask, False).value
    )


def test_stock_layer_is_flax_batchnorm_and_matches_without_mask(x):
    pytest.importorskip("flax")
    backend = JaxBackend()
    stock, ours = backend.stock_layer(config()), backend.layer(config())
    np.testing.assert_allclose(
        stock.forward(x, "float32", None, True).value, ours.forward(x, "float32", None, True).value, atol=1e-5
    )
    for k, v in ours.get_state().items():
        np.testing.assert_allclose(stock.get_state()[k], v, rtol=1e-6)


def test_stock_layer_is_unsupported_without_flax(monkeypatch):
    monkeypatch.setattr(conformance_adapter, "_flax_available", lambda: False)
    with pytest.raises(Unsupported, match="flax"):
        JaxBackend().stock_layer(config())


def test_bad_input_leaves_the_layer_unchanged(x):
    layer = JaxBackend().layer(config())
    before = layer.get_state()
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        layer.forward(x, "float32", np.ones((4, 4), bool), True)
    with pytest.raises(TypeError, match="int32"):
        layer.forward(x.astype(np.int32), "int32", None, True)
    for k, v in layer.get_state().items():
        np.testing.assert_array_equal(v, before[k])
