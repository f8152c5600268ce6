"""The layer inside Keras models: mask propagation, .keras save/load, model.fit."""

import keras
import numpy as np
import pytest

from maskbn_tf import MaskedBatchNormalization

as_numpy = keras.ops.convert_to_numpy  # any backend's tensor (a torch one requiring grad too)


@keras.saving.register_keras_serializable(package="maskbn_tests")
class MaskProbe(keras.layers.Layer):
    """Passes its input through and records the mask Keras handed it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.seen = None

    def call(self, inputs, mask=None):
        self.seen = mask
        return inputs


def _masking_model(bn):
    inputs = keras.Input(shape=(10, 3))
    h = keras.layers.Masking(mask_value=0.0)(inputs)
    return keras.Model(inputs, MaskProbe()(bn(h)))


def _embedding_model(bn):
    inputs = keras.Input(shape=(10,), dtype="int32")
    h = keras.layers.Embedding(
        20, 3, mask_zero=True, embeddings_initializer=keras.initializers.RandomNormal(3.0, seed=1)
    )(inputs)
    return keras.Model(inputs, MaskProbe()(bn(h)))


@pytest.mark.parametrize("source", ["masking", "embedding-mask-zero"])
def test_propagated_keras_mask_is_used_and_handed_on(source, padded_batch, masked_moments):
    x, mask = padded_batch
    bn = MaskedBatchNormalization(momentum=0.0)
    if source == "masking":
        model, data, features = _masking_model(bn), x, x
    else:
        tokens = np.where(mask, np.arange(40).reshape(4, 10) % 19 + 1, 0).astype(np.int32)
        model, data = _embedding_model(bn), tokens
        features = keras.ops.convert_to_numpy(model.layers[1](tokens))
    model(data, training=True)
    mean, var = masked_moments(features, mask)
    np.testing.assert_allclose(bn.moving_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance, var, rtol=1e-5)
    # the same statistics as passing the mask by hand
    by_hand = MaskedBatchNormalization(momentum=0.0)
    by_hand(features, training=True, mask=mask)
    np.testing.assert_allclose(bn.moving_mean, by_hand.moving_mean, rtol=1e-6, atol=1e-7)
    # and the mask reaches the next layer unchanged
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.layers[-1].seen), mask)


def test_explicit_mask_is_handed_on_by_compute_mask(padded_batch):
    x, mask = padded_batch
    layer = MaskedBatchNormalization()
    np.testing.assert_array_equal(layer.compute_mask(x, mask), mask)
    y = layer(keras.ops.convert_to_tensor(x), mask=keras.ops.convert_to_tensor(mask))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(y._keras_mask), mask)


@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
def test_keras_file_round_trip_gives_identical_outputs(padded_output, padded_batch, tmp_path):
    x, _ = padded_batch
    bn = MaskedBatchNormalization(momentum=0.5, padded_output=padded_output, gamma_regularizer="l2")
    model = _masking_model(bn)
    for _ in range(2):  # moving stats away from their initial values
        model(x, training=True)
    bn.gamma.assign([0.5, 1.5, -2.0])
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_bn = loaded.layers[2]
    assert type(loaded_bn) is MaskedBatchNormalization
    assert loaded_bn.get_config() == bn.get_config()
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(as_numpy(loaded(x, training=False)), as_numpy(model(x, training=False)))
    np.testing.assert_array_equal(as_numpy(loaded(x, training=True)), as_numpy(model(x, training=True)))
    np.testing.assert_array_equal(loaded_bn.moving_variance, bn.moving_variance)


def test_fit_on_padded_model_learns_from_real_rows_only(padded_batch, masked_moments):
    x, mask = padded_batch
    target = x.sum(axis=(1, 2)) / mask.sum(axis=1)
    bn = MaskedBatchNormalization(momentum=0.0)
    inputs = keras.Input(shape=(10, 3))
    h = bn(keras.layers.Masking(mask_value=0.0)(inputs))
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", jit_compile=True)
    history = model.fit(x, target, batch_size=4, epochs=5, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # momentum 0: the moving stats are the last batch's real-row stats (the one batch is all of x)
    mean, var = masked_moments(x, mask)
    np.testing.assert_allclose(bn.moving_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance, var, rtol=1e-5)
    # gamma/beta trained (the gradients reached them)
    assert not np.allclose(bn.gamma, 1.0) and not np.allclose(bn.beta, 0.0)
