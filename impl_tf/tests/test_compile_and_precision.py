"""Eager, tf.function and XLA give the masked-BN results; mixed precision keeps float32 state and stats."""

import keras
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="tf.function and XLA forms need TensorFlow")

from maskbn_tf import MaskedBatchNormalization  # noqa: E402

NEEDS_TENSORFLOW_BACKEND = True

MODES = {
    "eager": lambda f: f,
    "tf.function": lambda f: tf.function(f),
    "jit_compile": lambda f: tf.function(f, jit_compile=True),
}


def _train_step(layer):
    def step(x, mask, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
        dx, dgamma, dbeta = tape.gradient(y, [x, layer.gamma, layer.beta], output_gradients=dy)
        return y, dx, dgamma, dbeta

    return step


def _reference(x, mask, dy, eps=1e-3):
    """float64 masked BN forward and backward (gamma 1, beta 0) on the real rows."""
    real, g = x.astype(np.float64)[mask], dy.astype(np.float64)[mask]
    mean, var = real.mean(0), real.var(0)
    xhat = (real - mean) / np.sqrt(var + eps)
    s1, s2 = g.sum(0), (g * xhat).sum(0)
    dx = np.zeros(x.shape)
    dx[mask] = (g - (s1 + xhat * s2) / len(real)) / np.sqrt(var + eps)
    return mean, var, (x - mean) / np.sqrt(var + eps), dx, s2, s1


@pytest.fixture
def batch(padded_batch, rng):
    x, mask = padded_batch
    dy = np.where(mask[..., None], rng.normal(size=x.shape), 0.0).astype(np.float32)
    return x, mask, dy


@pytest.mark.parametrize("mode", list(MODES))
def test_forward_backward_matches_reference(mode, batch):
    x, mask, dy = batch
    layer = MaskedBatchNormalization(momentum=0.0)
    layer.build(x.shape)
    y, dx, dgamma, dbeta = MODES[mode](_train_step(layer))(tf.constant(x), tf.constant(mask), tf.constant(dy))
    mean, var, y_ref, dx_ref, dgamma_ref, dbeta_ref = _reference(x, mask, dy)
    np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=2e-6 * np.abs(y_ref).max())
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=2e-5 * np.abs(dx_ref).max())
    np.testing.assert_array_equal(dx.numpy()[~mask], 0.0)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("garbage", [np.nan, np.inf, 1e38], ids=["nan", "inf", "1e38"])
@pytest.mark.parametrize("mode", list(MODES))
def test_garbage_padding_is_isolated_bit_for_bit(mode, garbage, batch):
    x, mask, dy = batch
    results = []
    for fill in (0.0, garbage):
        layer = MaskedBatchNormalization(momentum=0.5)
        layer.build(x.shape)
        xf = np.where(mask[..., None], x, np.float32(fill))
        y, dx, dgamma, dbeta = MODES[mode](_train_step(layer))(tf.constant(xf), tf.constant(mask), tf.constant(dy))
        results.append([y.numpy()[mask], dx.numpy(), dgamma.numpy(), dbeta.numpy()] + layer.get_weights())
    for clean, dirty in zip(*results):
        np.testing.assert_array_equal(dirty, clean)


@pytest.mark.parametrize("mode", list(MODES))
def test_empty_mask_falls_back_without_python_branching(mode, batch):
    x, mask, dy = batch
    layer = MaskedBatchNormalization(moving_mean_initializer=keras.initializers.Constant(2.0))
    layer.build(x.shape)
    step = MODES[mode](_train_step(layer))
    step(tf.constant(x), tf.constant(mask), tf.constant(dy))  # trace with a non-empty mask first
    before = [w.copy() for w in layer.get_weights()]
    empty = np.zeros_like(mask)
    y, dx, dgamma, dbeta = step(tf.constant(x), tf.constant(empty), tf.constant(dy * 0))
    for got, want in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(got, want)
    # XLA fuses the arithmetic differently from eager: an ulp apart, not bit-equal
    np.testing.assert_allclose(y, layer(x, training=False), rtol=1e-6, atol=1e-6)
    assert np.isfinite(y.numpy()).all()
    for grad in (dx, dgamma, dbeta):
        np.testing.assert_array_equal(grad, 0.0)


def _check_mixed(layer, x16, x_rounded, masked_moments, mask, compute):
    y = layer(x16, training=True, mask=mask)
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert all(w.dtype == "float32" for w in layer.weights)
    mean, var = masked_moments(x_rounded, mask)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "loc,scale",
    [(4.0, 2.0), (300.0, 100.0), (0.0, 1e-3)],
    ids=["plain", "squares-overflow-float16", "variance-below-float16-normals"],
)
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_layer_policy(policy, loc, scale, padded_batch, masked_moments, rng):
    _, mask = padded_batch
    compute = policy.removeprefix("mixed_")
    x16 = tf.cast(tf.constant(rng.normal(loc, scale, size=(4, 10, 3)), tf.float32), compute)
    x_rounded = tf.cast(x16, tf.float64).numpy()
    layer = MaskedBatchNormalization(momentum=0.0, dtype=policy)
    _check_mixed(layer, x16, x_rounded, masked_moments, mask, compute)


@pytest.mark.usefixtures("restore_dtype_policy")
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_global_mixed_precision_policy_in_a_model(policy, padded_batch, masked_moments):
    x, mask = padded_batch
    compute = policy.removeprefix("mixed_")
    keras.config.set_dtype_policy(policy)
    bn = MaskedBatchNormalization(momentum=0.0)
    inputs = keras.Input(shape=(10, 3))
    model = keras.Model(inputs, bn(keras.layers.Masking(mask_value=0.0)(inputs)))
    y = model(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert all(w.dtype == "float32" for w in bn.weights)
    x_rounded = tf.cast(tf.cast(x, compute), tf.float64).numpy()
    mean, var = masked_moments(x_rounded, mask)
    np.testing.assert_allclose(bn.moving_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance, var, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_raw_low_precision_input_is_autocast_like_any_keras_layer(dtype, padded_batch, masked_moments):
    x, mask = padded_batch
    layer = MaskedBatchNormalization(momentum=0.0)  # float32 policy
    y = layer(tf.cast(x, dtype), training=True, mask=mask)
    assert y.dtype == tf.float32  # Keras casts float inputs to the layer's compute dtype
    mean, _ = masked_moments(tf.cast(tf.cast(x, dtype), tf.float64).numpy(), mask)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-6)


def test_float64_layer_keeps_float64_state(padded_batch, masked_moments):
    x, mask = padded_batch
    layer = MaskedBatchNormalization(momentum=0.0, dtype="float64")
    y = layer(x.astype(np.float64), training=True, mask=mask)
    assert y.dtype == tf.float64 and all(w.dtype == "float64" for w in layer.weights)
    mean, var = masked_moments(x, mask)
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-13)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-12)
