"""Second derivatives through nested tf.GradientTape equal those of a plain masked batch norm
(the real rows gathered, tf.nn.moments, normalized): a gradient penalty's gradient with respect
to x, gamma and beta, in eager and tf.function, training and inference (issue 11)."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="nested GradientTape needs TensorFlow")

from maskbn_tf import MaskedBatchNormalization  # noqa: E402

NEEDS_TENSORFLOW_BACKEND = True
EPS = 1e-3


def _reference(x, mask, gamma, beta, training, moving_mean, moving_var):
    real = tf.boolean_mask(x, mask)
    if training:
        mean, var = tf.nn.moments(real, axes=[0])
    else:
        mean, var = moving_mean, moving_var
    return (real - mean) * tf.math.rsqrt(var + EPS) * gamma + beta


def _penalty_gradients(forward, x, weights, w):
    """d/d(x, weights) of sum((d sum(w * y^2) / dx)^2): a gradient penalty, as WGAN-GP uses."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = forward(x)
            loss = tf.reduce_sum(w * y * y)
        g = inner.gradient(loss, x)
        penalty = tf.reduce_sum(g * g)
    return outer.gradient(penalty, [x, *weights], unconnected_gradients=tf.UnconnectedGradients.ZERO)


@pytest.mark.parametrize("form", ["eager", "tf.function"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_gradient_penalty_matches_plain_batch_norm(training, form, padded_batch, rng):
    x_np, mask = padded_batch
    x_np = np.where(mask[..., None], x_np, np.nan).astype(np.float64)  # garbage padding
    layer = MaskedBatchNormalization(momentum=0.5, dtype="float64")
    layer.build(x_np.shape)
    layer.gamma.assign(rng.normal(1.0, 0.3, size=3))
    layer.beta.assign(rng.normal(0.0, 0.3, size=3))
    layer.moving_mean.assign([4.0, 3.0, 5.0])
    layer.moving_variance.assign([4.0, 2.0, 3.0])
    x, m = tf.constant(x_np), tf.constant(mask)
    w = tf.constant(rng.normal(size=(int(mask.sum()), 3)))
    weights = [layer.gamma, layer.beta]
    moving = (tf.constant(layer.moving_mean.numpy()), tf.constant(layer.moving_variance.numpy()))

    def ours(x):
        return tf.boolean_mask(layer(x, training=training, mask=m), m)

    def plain(x):
        x = tf.where(m[..., None], x, tf.zeros_like(x))  # the reference never sees the garbage
        return _reference(x, m, layer.gamma, layer.beta, training, *moving)

    run = (lambda f: f) if form == "eager" else tf.function
    got = run(lambda: _penalty_gradients(ours, x, weights, w))()
    want = run(lambda: _penalty_gradients(plain, x, weights, w))()
    dx = got[0].numpy()
    np.testing.assert_array_equal(dx[~mask], 0.0)
    assert np.abs(want[0].numpy()[mask]).max() > 1e-3  # the second derivative is not trivially 0
    np.testing.assert_allclose(dx[mask], want[0].numpy()[mask], rtol=1e-9, atol=1e-12)
    for g, r in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-9, atol=1e-12)
