"""The portable format and stock Keras checkpoints."""

import json

import keras
import numpy as np
import pytest

from maskbn_tf import MaskedBatchNormalization, load_portable, load_stock_weights, save_portable

as_numpy = keras.ops.convert_to_numpy  # any backend's tensor (a torch one requiring grad too)


def _trained(layer, x, mask=None):
    layer(x, training=True, mask=mask)
    layer(x * 2.0 + 1.0, training=True, mask=mask)
    return layer


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        dict(axis=1, center=False, padded_output="zero", epsilon=0.01, momentum=0.5),
        pytest.param(
            dict(dtype="float64"),
            marks=pytest.mark.skipif(
                keras.config.backend() == "jax", reason="JAX without jax_enable_x64 has no float64 variables"
            ),
        ),
        dict(unbiased_moving_variance=True),
    ],
    ids=["defaults", "channels-first-no-beta-zero-padding", "float64", "unbiased-moving-variance"],
)
def test_portable_round_trip_keeps_every_bit(knobs, tmp_path, rng):
    x = rng.normal(2.0, 3.0, size=(4, 5, 6))
    mask = rng.random((4, 5) if knobs.get("axis") != 1 else (4, 6)) < 0.6
    layer = _trained(MaskedBatchNormalization(**knobs), x, mask)
    save_portable(layer, tmp_path)
    written = json.loads((tmp_path / "maskbn.json").read_text())
    assert written["format"] == "maskbn-portable" and written["decay"] == layer.momentum
    assert written["moving_var"] == ("unbiased" if knobs.get("unbiased_moving_variance") else "population")
    loaded = load_portable(tmp_path)
    assert loaded.get_config() | {"name": None} == layer.get_config() | {"name": None}
    for got, want in zip(loaded.weights, layer.weights):
        assert got.name == want.name and got.dtype == want.dtype
        np.testing.assert_array_equal(as_numpy(got), as_numpy(want))
    np.testing.assert_array_equal(as_numpy(loaded(x, mask=mask)), as_numpy(layer(x, mask=mask)))


def test_stock_layer_exports_to_portable(tmp_path, rng):
    x = rng.normal(size=(8, 3)).astype(np.float32)
    stock = _trained(keras.layers.BatchNormalization(momentum=0.8), x)
    save_portable(stock, tmp_path)
    loaded = load_portable(tmp_path)
    assert loaded.momentum == 0.8 and loaded.padded_output == "normalize"
    np.testing.assert_allclose(as_numpy(loaded(x)), as_numpy(stock(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", ["not-portable", "missing-beta"])
def test_load_portable_rejects_a_bad_folder(bad, tmp_path):
    save_portable(_trained(MaskedBatchNormalization(), np.ones((4, 2), np.float32)), tmp_path)
    if bad == "not-portable":
        config = json.loads((tmp_path / "maskbn.json").read_text())
        (tmp_path / "maskbn.json").write_text(json.dumps(config | {"format": "other"}))
    else:
        with np.load(tmp_path / "maskbn.npz") as saved:
            np.savez(tmp_path / "maskbn.npz", **{k: v for k, v in saved.items() if k != "beta"})
    with pytest.raises(ValueError, match="maskbn"):
        load_portable(tmp_path)


def _model(bn):
    inputs = keras.Input(shape=(10, 3))
    h = bn(keras.layers.Dense(3)(keras.layers.Masking(mask_value=0.0)(inputs)))
    return keras.Model(inputs, keras.layers.Dense(1)(h))


@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras' warning on the doomed plain load
def test_stock_model_checkpoint_loads_into_the_masked_model(tmp_path, padded_batch):
    x, _ = padded_batch
    stock = _model(keras.layers.BatchNormalization())
    stock.compile(optimizer="sgd", loss="mse")
    stock.fit(x, np.ones((4, 10, 1)), epochs=2, verbose=0)  # trained weights, moving stats away from init
    path = tmp_path / "stock.weights.h5"
    stock.save_weights(path)
    masked = _model(MaskedBatchNormalization())
    # plain load_weights cannot: Keras keys weight-file entries by class name
    with pytest.raises(ValueError, match="masked_batch_normalization"):
        masked.load_weights(path)
    load_stock_weights(masked, path)
    for got, want in zip(masked.get_weights(), stock.get_weights()):
        np.testing.assert_array_equal(got, want)
    # no padding: in inference the masked model computes what the stock model does
    full = np.abs(x) + 1.0
    np.testing.assert_allclose(masked.predict(full, verbose=0), stock.predict(full, verbose=0), rtol=1e-5, atol=1e-6)


def test_renorm_state_has_no_portable_form(tmp_path):
    layer = MaskedBatchNormalization(renorm=True)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="renorm"):
        save_portable(layer, tmp_path)
