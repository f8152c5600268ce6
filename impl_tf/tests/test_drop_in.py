"""Drop-in for keras.layers.BatchNormalization (issue 11): every mask the stock layer takes, with
its meaning; batch renormalization; the moving-variance convention; zero-size batches. Runs on
whichever Keras backend the env selects."""

import inspect
import re

import keras
import numpy as np
import pytest

from maskbn_tf import MaskedBatchNormalization
from maskbn_tf.autodiff import training_vjp

as_numpy = keras.ops.convert_to_numpy  # any backend's tensor (a torch one requiring grad too)


def _moments_per_channel(x, full_mask, axis):
    """float64 mean and population variance of each channel over its own real positions."""
    x, m = np.moveaxis(np.asarray(x, np.float64), axis, -1), np.moveaxis(full_mask, axis, -1)
    return (
        np.array([x[..., c][m[..., c]].mean() for c in range(x.shape[-1])]),
        np.array([x[..., c][m[..., c]].var() for c in range(x.shape[-1])]),
    )


MASKS = {
    # name: (x shape, axis, mask shape, how the mask covers x)
    "keras-leading-axes-channels-first": ((4, 3, 5), 1, (4, 3), lambda m, x: np.broadcast_to(m[..., None], x)),
    "without-channel-axis": ((4, 3, 5), 1, (4, 5), lambda m, x: np.broadcast_to(m[:, None, :], x)),
    "ambiguous-shape-reads-without-channel": ((4, 3, 3), 1, (4, 3), lambda m, x: np.broadcast_to(m[:, None, :], x)),
    "same-rank-keras-form-unambiguous": ((4, 3, 3), 1, (4, 3, 1), lambda m, x: np.broadcast_to(m, x)),
    "broadcast-leading-axes": ((2, 4, 3, 5), -1, (1, 4, 1), lambda m, x: np.broadcast_to(m[..., None], x)),
    "broadcast-leading-axes-channels-first": ((4, 3, 5), 1, (4, 1), lambda m, x: np.broadcast_to(m[..., None], x)),
    "same-rank-broadcast": ((4, 6, 3), -1, (1, 6, 1), lambda m, x: np.broadcast_to(m, x)),
    "per-channel": ((4, 6, 3), -1, (4, 6, 3), lambda m, x: m),
    "per-channel-channels-first": ((4, 3, 6), 1, (4, 3, 6), lambda m, x: m),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_every_stock_mask_form_with_its_meaning(name, rng):
    shape, axis, m_shape, cover = MASKS[name]
    x = rng.normal(3.0, 2.0, size=shape).astype(np.float32)
    mask = rng.random(m_shape) < 0.6
    mask.flat[0] = True
    full = cover(mask, shape)
    layer = MaskedBatchNormalization(axis=axis, momentum=0.0)
    y = as_numpy(layer(x, training=True, mask=mask))
    mean, var = _moments_per_channel(x, full, axis)
    np.testing.assert_allclose(as_numpy(layer.moving_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(as_numpy(layer.moving_variance), var, rtol=1e-5, atol=1e-6)
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    want = (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-3)
    np.testing.assert_allclose(y[full], want[full], rtol=1e-4, atol=1e-5)


def test_channel_without_real_positions_keeps_moving_stats_and_gets_no_gradient(rng):
    x = rng.normal(3.0, 2.0, size=(4, 6, 3)).astype(np.float32)
    mask = rng.random((4, 6, 3)) < 0.6
    mask[..., 1] = False
    layer = MaskedBatchNormalization(
        momentum=0.5, moving_mean_initializer=keras.initializers.Constant(2.0), moving_variance_initializer="ones"
    )
    layer.build(x.shape)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, dx, (dgamma, dbeta) = training_vjp(layer, x, dy, mask=mask)
    assert as_numpy(layer.moving_mean)[1] == 2.0 and as_numpy(layer.moving_variance)[1] == 1.0
    np.testing.assert_allclose(as_numpy(y)[..., 1], (x[..., 1] - 2.0) / np.sqrt(1.0 + 1e-3), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(as_numpy(dx)[..., 1], 0.0)
    assert as_numpy(dgamma)[1] == 0.0 and as_numpy(dbeta)[1] == 0.0
    mean, _ = _moments_per_channel(x, mask, -1)
    np.testing.assert_allclose(as_numpy(layer.moving_mean)[[0, 2]], 1.0 + 0.5 * mean[[0, 2]], rtol=1e-5)


@pytest.mark.parametrize(
    "mask,error,text",
    [
        ([[1.0, 0.0]] * 3, TypeError, "np.asarray(mask) > 0"),
        (np.ones((3, 2), np.float32), TypeError, "float32"),
        ([[True, False]] * 2, ValueError, "(2, 2)"),
    ],
    ids=["float-list", "float-numpy", "wrong-shape-list"],
)
def test_bad_python_masks_raise_clearly(mask, error, text):
    layer = MaskedBatchNormalization()
    with pytest.raises(error, match=re.escape(text)):
        layer(np.ones((3, 2, 4), np.float32), training=True, mask=mask)


def test_rank_minus_one_mask_broadcasting_to_neither_reading_is_refused():
    # (1, 5) for (4, 3, 5) with channels on axis 1: x without the channel axis is (4, 5), exact
    # only (reading a); it does not broadcast to the leading axes (4, 3) (reading b)
    layer = MaskedBatchNormalization(axis=1)
    with pytest.raises(ValueError, match=re.escape("mask shape (1, 5) does not fit x shape (4, 3, 5)")):
        layer(np.ones((4, 3, 5), np.float32), training=True, mask=np.ones((1, 5), bool))


def test_integer_numpy_x_is_refused_naming_its_dtype():
    # JAX without x64 would make int64 int32 before the layer sees it; the error names int64
    layer = MaskedBatchNormalization()
    with pytest.raises(TypeError, match="x dtype int64"):
        layer(np.ones((3, 2, 4), np.int64), training=True)
    assert not layer.built


def test_python_list_mask_is_converted(padded_batch):
    x, mask = padded_batch
    a, b = MaskedBatchNormalization(momentum=0.0), MaskedBatchNormalization(momentum=0.0)
    np.testing.assert_array_equal(
        as_numpy(a(x, training=True, mask=mask.tolist())), as_numpy(b(x, training=True, mask=mask))
    )


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3)], ids=["no-batch-items", "no-steps"])
def test_zero_size_batch_gives_empty_output_and_changes_nothing(shape, training):
    layer = MaskedBatchNormalization(dtype="mixed_bfloat16")
    layer.build((None, None, 3))
    before = [as_numpy(w).copy() for w in layer.weights]
    y = layer(np.ones(shape, np.float32), training=training, mask=np.ones(shape[:-1], bool))
    assert tuple(y.shape) == shape and keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    for got, want in zip(layer.weights, before):
        np.testing.assert_array_equal(as_numpy(got), want)


@pytest.mark.parametrize("real_per_channel", [[5, 1, 3]], ids=["n-5-1-3"])
def test_unbiased_moving_variance_stores_n_over_n_minus_1(real_per_channel, rng):
    x = rng.normal(1.0, 2.0, size=(8, 3)).astype(np.float32)
    mask = np.arange(8)[:, None] < np.array(real_per_channel)[None, :]
    layer = MaskedBatchNormalization(momentum=0.0, unbiased_moving_variance=True)
    y = layer(x, training=True, mask=mask)
    _, var = _moments_per_channel(x, mask, -1)
    n = np.array(real_per_channel, np.float64)
    np.testing.assert_allclose(as_numpy(layer.moving_variance), var * n / np.maximum(n - 1, 1), rtol=1e-5)
    # the batch is still normalized with its population variance
    population = MaskedBatchNormalization(momentum=0.0)
    np.testing.assert_array_equal(as_numpy(y), as_numpy(population(x, training=True, mask=mask)))
    assert MaskedBatchNormalization.from_config(layer.get_config()).unbiased_moving_variance


needs_stock_renorm = pytest.mark.skipif(
    "renorm" not in inspect.signature(keras.layers.BatchNormalization.__init__).parameters,
    reason=f"keras {keras.__version__}'s BatchNormalization has no renorm to compare with",
)
RENORM = dict(momentum=0.9, renorm=True, renorm_momentum=0.8, renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.6})


@needs_stock_renorm
@pytest.mark.parametrize("clipping", [True, False], ids=["clipped", "unclipped"])
def test_renorm_equals_stock_renorm_when_every_row_is_real(clipping, rng):
    knobs = dict(RENORM) if clipping else {k: v for k, v in RENORM.items() if k != "renorm_clipping"}
    ours, stock = MaskedBatchNormalization(**knobs), keras.layers.BatchNormalization(**knobs)
    for layer in (ours, stock):
        layer.build((None, 5, 3))
    stock.gamma.assign([0.5, 2.0, -1.0])
    ours.set_weights(stock.get_weights())
    assert [w.name for w in ours.weights] == [w.name for w in stock.weights]
    for step in range(4):  # the renorm statistics move, so r and d leave 1 and 0 (and clip)
        x = rng.normal(2.0 * step, 1.0 + step, size=(6, 5, 3)).astype(np.float32)
        dy = rng.normal(size=x.shape).astype(np.float32)
        got, want = training_vjp(ours, x, dy), training_vjp(stock, x, dy)
        np.testing.assert_allclose(as_numpy(got[0]), as_numpy(want[0]), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(as_numpy(got[1]), as_numpy(want[1]), rtol=1e-4, atol=1e-5)
        for g, w in zip(got[2], want[2]):
            np.testing.assert_allclose(as_numpy(g), as_numpy(w), rtol=1e-4, atol=1e-4)
        for g, w in zip(ours.weights, stock.weights):
            np.testing.assert_allclose(as_numpy(g), as_numpy(w), rtol=1e-5, atol=1e-6, err_msg=w.name)
    np.testing.assert_allclose(as_numpy(ours(x)), as_numpy(stock(x)), rtol=1e-5, atol=1e-5)


@needs_stock_renorm
def test_masked_renorm_equals_stock_renorm_on_the_real_rows(padded_batch):
    x, mask = padded_batch
    ours, stock = MaskedBatchNormalization(**RENORM), keras.layers.BatchNormalization(**RENORM)
    ours.build((None, 10, 3))
    stock.build((None, 3))
    for scale in (1.0, 3.0, 0.2):
        xs = x * scale + scale
        y = as_numpy(ours(xs, training=True, mask=mask))
        np.testing.assert_allclose(y[mask], as_numpy(stock(xs[mask], training=True)), rtol=1e-5, atol=1e-5)
    for g, w in zip(ours.weights, stock.weights):
        np.testing.assert_allclose(as_numpy(g), as_numpy(w), rtol=1e-5, atol=1e-6, err_msg=w.name)
