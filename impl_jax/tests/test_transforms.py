"""jit, vmap (a batch of models) and grad compose with the functional core."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxbn_helpers import affine, make_mask

from maskbn_jax import masked_batch_norm

train = functools.partial(masked_batch_norm, training=True, momentum=0.9, epsilon=1e-3)


@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_matches_eager(rng, padded_output, training):
    x = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    m = make_mask("random", (4, 6))
    params, state = affine(rng, 3)
    f = functools.partial(masked_batch_norm, training=training, padded_output=padded_output)
    eager = f(x, m, params, state)
    jitted = jax.jit(f)(x, m, params, state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), eager, jitted)


def test_one_compiled_function_serves_empty_and_full_masks(rng):
    """The empty-mask fallback is a where, not a Python branch: no retrace, right answer both ways."""
    x = jnp.asarray(rng.normal(3.0, 1.0, size=(2, 5, 3)), jnp.float32)
    params, state = affine(rng, 3)
    traces = []

    @jax.jit
    def f(x, m, params, state):
        traces.append(None)
        return train(x, m, params, state)

    _, kept = f(x, np.zeros((2, 5), bool), params, state)
    _, moved = f(x, np.ones((2, 5), bool), params, state)
    assert len(traces) == 1
    np.testing.assert_array_equal(kept["mean"], state["mean"])
    np.testing.assert_allclose(moved["mean"], 0.9 * state["mean"] + 0.1 * x.reshape(-1, 3).mean(0), rtol=1e-6)


def test_vmap_over_a_batch_of_models(rng):
    """Three models with their own params, state, inputs and masks, one of them empty."""
    k = 3
    models = [affine(rng, 4) for _ in range(k)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[p for p, _ in models])
    state = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in models])
    x = jnp.asarray(rng.normal(size=(k, 5, 6, 4)), jnp.float32)
    m = np.stack([make_mask("random", (5, 6), seed=i) for i in range(k - 1)] + [np.zeros((5, 6), bool)])
    y, new = jax.jit(jax.vmap(train))(x, m, params, state)
    for i, (p, s) in enumerate(models):
        y_i, new_i = train(x[i], m[i], p, s)
        np.testing.assert_allclose(y[i], y_i, rtol=1e-6, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-6), new, new_i)  # noqa: B023
    np.testing.assert_array_equal(new["mean"][-1], state["mean"][-1])


def test_vmap_of_grad_per_model(rng):
    k = 2
    models = [affine(rng, 3) for _ in range(k)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[p for p, _ in models])
    state = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in models])
    x = jnp.asarray(rng.normal(size=(k, 4, 7, 3)), jnp.float32)
    m = np.stack([make_mask("random", (4, 7), seed=i) for i in range(k)])

    # a random projection: sum(y**2) would make dx a tiny difference of O(1) terms
    w = jnp.asarray(rng.normal(size=(4, 7, 3)), jnp.float32)

    def loss(x, m, params, state):
        y, _ = train(x, m, params, state)
        return jnp.sum(jnp.where(m[..., None], y * w, 0))

    grads = jax.jit(jax.vmap(jax.grad(loss, (0, 2))))(x, m, params, state)
    for i, (p, s) in enumerate(models):
        dx_i, dp_i = jax.grad(loss, (0, 2))(x[i], m[i], p, s)
        np.testing.assert_allclose(grads[0][i], dx_i, rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6), grads[1], dp_i)  # noqa: B023


def test_vmap_over_the_batch_axis_is_per_example_normalization(rng):
    """vmap over examples with shared params gives each example its own statistics."""
    params, state = affine(rng, 2)
    x = jnp.asarray(rng.normal(size=(3, 10, 2)), jnp.float32)
    m = make_mask("random", (3, 10))
    y, new = jax.vmap(train, in_axes=(0, 0, None, None))(x, m, params, state)
    y0, _ = train(x[0], m[0], params, state)
    np.testing.assert_allclose(y[0], y0, rtol=1e-6, atol=1e-6)
    assert new["mean"].shape == (3, 2)


def test_training_step_under_jit_grad_updates_params_and_state(rng):
    """A plain functional training step: jit(value_and_grad) with the new state as aux."""
    params, state = affine(rng, 3)
    x = jnp.asarray(rng.normal(2.0, 1.0, size=(4, 8, 3)), jnp.float32)
    m = make_mask("prefix", (4, 8))
    target = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    @jax.jit
    def step(params, state):
        def loss(params):
            y, new = train(x, m, params, state)
            return jnp.mean(jnp.where(m[..., None], (y - target) ** 2, 0)), new

        (value, new), g = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda p, d: p - 0.1 * d, params, g), new, value

    state0, losses = state, []
    for _ in range(5):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    expected_mean = state0["mean"] * 0.9**5 + (1 - 0.9**5) * x[m].mean(0)
    np.testing.assert_allclose(state["mean"], expected_mean, rtol=1e-5)
