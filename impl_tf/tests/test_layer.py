"""The layer on its own: config round trip, weights layout, errors, training semantics."""

import keras
import numpy as np
import pytest

from maskbn_tf import MaskedBatchNormalization

as_numpy = keras.ops.convert_to_numpy  # any backend's tensor (a torch one requiring grad too)

EVERY_KNOB = dict(
    axis=1,
    momentum=0.75,
    epsilon=1e-5,
    center=False,
    scale=True,
    beta_initializer="ones",
    gamma_initializer=keras.initializers.Constant(2.5),
    moving_mean_initializer=keras.initializers.RandomNormal(seed=3),
    moving_variance_initializer="ones",
    beta_regularizer=keras.regularizers.L1(0.1),
    gamma_regularizer=keras.regularizers.L2(0.01),
    beta_constraint=keras.constraints.NonNeg(),
    gamma_constraint=keras.constraints.MaxNorm(2.0),
    padded_output="zero",
    renorm=True,
    renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
    renorm_momentum=0.9,
    unbiased_moving_variance=True,
    name="knobs",
    dtype="mixed_bfloat16",
)


@pytest.mark.parametrize("knobs", [{}, EVERY_KNOB], ids=["defaults", "every-knob-changed"])
def test_get_config_from_config_round_trip(knobs):
    layer = MaskedBatchNormalization(**knobs)
    config = layer.get_config()
    clone = MaskedBatchNormalization.from_config(config)
    assert clone.get_config() == config
    # and through Keras' generic (registered) serialization
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is MaskedBatchNormalization
    assert revived.get_config() == config


def test_registered_name():
    assert keras.saving.get_registered_name(MaskedBatchNormalization) == "maskbn>MaskedBatchNormalization"


@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False), (False, False)])
def test_weights_named_and_ordered_like_stock(center, scale):
    ours = MaskedBatchNormalization(center=center, scale=scale)
    stock = keras.layers.BatchNormalization(center=center, scale=scale)
    ours.build((None, 5, 3))
    stock.build((None, 5, 3))
    names = [w.name for w in ours.weights]
    assert names == [w.name for w in stock.weights]
    assert [w.name for w in ours.non_trainable_weights] == ["moving_mean", "moving_variance"]
    assert all(w.dtype == "float32" for w in ours.weights)
    assert len(ours.trainable_weights) == int(center) + int(scale)


def test_stock_weights_load_and_give_stock_outputs(rng):
    x = rng.normal(1.0, 3.0, size=(6, 5, 3)).astype(np.float32)
    stock = keras.layers.BatchNormalization(momentum=0.5)
    for _ in range(2):  # non-default moving stats
        stock(x, training=True)
    stock.gamma.assign([0.5, 2.0, -1.0])
    stock.beta.assign([1.0, 0.0, -2.0])
    ours = MaskedBatchNormalization(momentum=0.5)
    ours.build(x.shape)
    ours.set_weights(stock.get_weights())
    for got, want in zip(ours.get_weights(), stock.get_weights()):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(
        as_numpy(ours(x, training=False)), as_numpy(stock(x, training=False)), rtol=1e-6, atol=1e-6
    )
    # without a mask every row is real: training matches the stock layer too
    np.testing.assert_allclose(
        as_numpy(ours(x, training=True)), as_numpy(stock(x, training=True)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(ours.moving_mean, stock.moving_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.moving_variance, stock.moving_variance, rtol=1e-5)


def test_masked_statistics_and_update(padded_batch, masked_moments):
    x, mask = padded_batch
    layer = MaskedBatchNormalization(momentum=0.25)
    y = layer(x, training=True, mask=mask)
    mean, var = masked_moments(x, mask)
    np.testing.assert_allclose(layer.moving_mean, 0.75 * mean, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, 0.25 + 0.75 * var, rtol=1e-6)
    want = (x - mean) / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(as_numpy(y), want, rtol=1e-5, atol=1e-5)


def test_empty_mask_uses_moving_stats_and_updates_nothing(padded_batch):
    x, mask = padded_batch
    layer = MaskedBatchNormalization(
        moving_mean_initializer="ones", moving_variance_initializer=keras.initializers.Constant(4.0)
    )
    y = layer(x, training=True, mask=np.zeros_like(mask))
    np.testing.assert_array_equal(layer.moving_mean, np.ones(3, np.float32))
    np.testing.assert_array_equal(layer.moving_variance, np.full(3, 4.0, np.float32))
    np.testing.assert_array_equal(as_numpy(y), as_numpy(layer(x, training=False)))


def test_not_trainable_means_inference_like_stock(padded_batch):
    x, mask = padded_batch
    layer = MaskedBatchNormalization()
    layer.trainable = False
    y = layer(x, training=True, mask=mask)
    np.testing.assert_array_equal(layer.moving_mean, np.zeros(3, np.float32))
    np.testing.assert_array_equal(as_numpy(y), as_numpy(layer(x, training=False, mask=mask)))


def test_regularizer_losses_are_collected():
    layer = MaskedBatchNormalization(gamma_regularizer=keras.regularizers.L2(0.5), beta_regularizer="l1")
    layer.build((None, 4))
    assert len(layer.losses) == 2
    np.testing.assert_allclose(float(sum(layer.losses)), 0.5 * 4, rtol=1e-6)  # gamma = 1, beta = 0


def test_constraint_is_attached():
    layer = MaskedBatchNormalization(gamma_constraint=keras.constraints.NonNeg())
    layer.build((None, 2))
    assert isinstance(layer.gamma.constraint, keras.constraints.NonNeg)


def _state(layer):
    return [keras.ops.convert_to_numpy(w).copy() for w in layer.weights]


BAD_CALLS = {
    "mask-shape": (
        lambda: dict(x=np.ones((4, 8, 3), np.float32), mask=np.ones((4, 7), bool)),
        ValueError,
        ["(4, 7)", "(4, 8, 3)"],
    ),
    "same-rank-mask-not-broadcasting": (
        lambda: dict(x=np.ones((4, 8, 3), np.float32), mask=np.ones((4, 8, 2), bool)),
        ValueError,
        ["(4, 8, 2)", "(4, 8, 3)"],
    ),
    "float-mask": (
        lambda: dict(x=np.ones((4, 8, 3), np.float32), mask=np.ones((4, 8), np.float32)),
        TypeError,
        ["float32"],
    ),
    "integer-x": (lambda: dict(x=np.ones((4, 8, 3), np.int32), mask=None), TypeError, ["int32"]),
    "channel-count": (lambda: dict(x=np.ones((4, 8, 5), np.float32), mask=None), ValueError, ["5", "3"]),
    "rank-too-small-for-axis": (lambda: dict(x=np.ones((4,), np.float32), mask=None), ValueError, ["axis"]),
}


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_input_raises_clearly_and_changes_nothing(case, policy):
    make, error, mentions = BAD_CALLS[case]
    layer = MaskedBatchNormalization(axis=2 if case == "rank-too-small-for-axis" else -1, dtype=policy)
    layer.build((None, None, 3))
    before = _state(layer)
    args = make()
    kwargs = {} if args["mask"] is None else {"mask": keras.ops.convert_to_tensor(args["mask"])}
    with pytest.raises(error) as info:
        layer(keras.ops.convert_to_tensor(args["x"]), training=True, **kwargs)
    for text in mentions:
        # under mixed_float16 Keras would autocast a float32 mask to float16; the message names
        # what the caller passed
        assert text in str(info.value)
    for got, want in zip(_state(layer), before):
        np.testing.assert_array_equal(got, want)


def test_axis_out_of_range_raises_at_build():
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        MaskedBatchNormalization(axis=3).build((None, 4, 2))


def test_mask_with_size_one_channel_axis_channels_first(rng, masked_moments):
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # NCHW
    mask = rng.random((2, 1, 4, 5)) < 0.5
    layer = MaskedBatchNormalization(axis=1, momentum=0.0)
    layer(x, training=True, mask=mask.astype(np.uint8))
    mean, var = masked_moments(np.moveaxis(x, 1, -1), mask[:, 0])
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-5)


def test_unknown_padded_output_raises():
    with pytest.raises(ValueError, match="padded_output"):
        MaskedBatchNormalization(padded_output="drop")


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="synchronized=True needs the TensorFlow backend")
def test_synchronized_outside_a_strategy_is_the_local_layer(padded_batch):
    x, mask = padded_batch
    synced, local = MaskedBatchNormalization(synchronized=True), MaskedBatchNormalization()
    np.testing.assert_array_equal(synced(x, training=True, mask=mask), local(x, training=True, mask=mask))
    for got, want in zip(synced.get_weights(), local.get_weights()):
        np.testing.assert_array_equal(got, want)
