"""One training call and its vector-Jacobian product through the running Keras backend's own
autodiff (TensorFlow GradientTape, jax.grad over `stateless_call`, torch.autograd).

Used by the conformance adapter and the tests, so that both run on every Keras backend.
"""

from __future__ import annotations

import keras


def training_vjp(layer, x, dy, **call_kwargs):
    """(y, dx, weight grads): y = layer(x, training=True, **call_kwargs) and the gradient of
    sum(y * dy) with respect to x and each of ``layer.trainable_variables`` (in that order).
    The layer's non-trainable state is updated as by an ordinary training call."""
    backend = keras.config.backend()
    x = keras.ops.convert_to_tensor(x)
    dy = keras.ops.convert_to_tensor(dy, dtype=x.dtype)
    weights = list(layer.trainable_variables)
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, **call_kwargs)
        # ZERO: a zero-size batch uses no weight; its gradient is zeros of the weight's shape, not None
        dx, *grads = tape.gradient(
            y, [x, *(w.value for w in weights)], output_gradients=dy, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return y, dx, grads
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(x, trainable):
            y, state = layer.stateless_call(trainable, frozen, x, training=True, **call_kwargs)
            return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)), (y, state)

        (_, (y, state)), (dx, grads) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            x, [v.value for v in weights]
        )
        for variable, value in zip(layer.non_trainable_variables, state):
            variable.assign(value)
        return y, dx, list(grads)
    if backend == "torch":
        import torch

        x = x.detach().requires_grad_(True)
        y = layer(x, training=True, **call_kwargs)
        sources = [x, *(w.value for w in weights)]
        # allow_unused: a zero-size batch uses no weight; its gradient is the zeros it means
        grads = torch.autograd.grad(y, sources, grad_outputs=dy.to(y.dtype), allow_unused=True)
        grads = [torch.zeros_like(s) if g is None else g for g, s in zip(grads, sources)]
        return y.detach(), grads[0], grads[1:]
    raise NotImplementedError(f"no autodiff recipe for Keras backend {backend!r}")
