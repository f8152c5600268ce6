"""Run by test_keras_backends.py in a fresh process with KERAS_BACKEND set (Keras picks its
backend once per process): one masked training call and its gradients, through that
backend's own autodiff, with zero and with NaN padding.

usage: KERAS_BACKEND=jax python _keras_backend_worker.py OUT.npz
"""

import sys

import keras
import numpy as np

from maskbn_tf import MaskedBatchNormalization


def batch():
    rng = np.random.default_rng(0)
    mask = np.arange(10)[None, :] < np.array([10, 6, 3, 1])[:, None]
    x = rng.normal(4.0, 2.0, size=(4, 10, 3)).astype(np.float32)
    dy = np.where(mask[..., None], rng.normal(size=x.shape), 0.0).astype(np.float32)
    return x, mask, dy


def step(x, mask, dy):
    """y, moving stats and d sum(y * dy) / d (x, gamma, beta) of one training call."""
    layer = MaskedBatchNormalization(momentum=0.0)
    layer.build(x.shape)
    backend = keras.config.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_variables]
        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(x, trainable):
            y, state = layer.stateless_call(trainable, frozen, x, training=True, mask=jnp.asarray(mask))
            return jnp.sum(y * dy), (y, state)

        (_, (y, state)), (dx, (dgamma, dbeta)) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            jnp.asarray(x), trainable
        )
        moving_mean, moving_var = state
    elif backend == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt, training=True, mask=torch.tensor(mask))
        (y * torch.tensor(dy)).sum().backward()
        dx, dgamma, dbeta = xt.grad, layer.gamma.value.grad, layer.beta.value.grad
        moving_mean, moving_var = layer.moving_mean, layer.moving_variance
    else:
        raise SystemExit(f"no gradient recipe for Keras backend {backend!r}")
    return {
        name: keras.ops.convert_to_numpy(value)
        for name, value in dict(
            y=y, moving_mean=moving_mean, moving_var=moving_var, dx=dx, dgamma=dgamma, dbeta=dbeta
        ).items()
    }


def main(out):
    x, mask, dy = batch()
    results = {"x": x, "mask": mask, "dy": dy}
    for fill in ("zero", "nan"):
        padded = np.where(mask[..., None], x, 0.0 if fill == "zero" else np.nan).astype(np.float32)
        results.update({f"{fill}-{k}": v for k, v in step(padded, mask, dy).items()})
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
