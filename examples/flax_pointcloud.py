"""Point-cloud classification in JAX/Flax: masked batch norm against stock flax.linen.BatchNorm.

    python examples/flax_pointcloud.py [--steps 300]

Same model, data, seed and optimizer twice; only the norm layer differs. The stock
layer is called without a mask (what a plain model does); maskbn_jax.linen's
MaskedBatchNorm takes its statistics from the real points only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from pointclouds import NUM_CLASSES, bucketed_batches, compare, eval_batches, make_clouds

import maskbn_jax.linen

# A few hundred training steps: the moving stats must follow the weights, so both
# layers decay at 0.9 (torch's default) instead of Flax's 0.99
MOMENTUM = 0.9


class PointClassifier(nn.Module):
    """Per-point MLP with batch norm, masked max pooling over the real points, linear classifier."""

    masked: bool
    width: int = 64

    @nn.compact
    def __call__(self, points, mask, train: bool):
        h = points
        for _ in range(2):
            h = nn.Dense(self.width)(h)
            if self.masked:
                h = maskbn_jax.linen.MaskedBatchNorm(use_running_average=not train, momentum=MOMENTUM)(h, mask=mask)
            else:
                h = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM)(h)
            h = nn.relu(h)
        pooled = jnp.max(jnp.where(mask[..., None], h, -jnp.inf), axis=1)
        return nn.Dense(NUM_CLASSES)(pooled)


def train_and_evaluate(masked: bool, steps: int, batch_size: int, seed: int) -> float:
    model = PointClassifier(masked)
    batches = bucketed_batches(make_clouds(2048, seed=1), batch_size, seed=seed)
    points, mask, _ = next(batches)
    variables = model.init(jax.random.key(seed), points, mask, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, points, mask, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, points, mask, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

        (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    @jax.jit
    def predict(params, batch_stats, points, mask):
        return jnp.argmax(model.apply({"params": params, "batch_stats": batch_stats}, points, mask, train=False), -1)

    for _ in range(steps):
        params, batch_stats, opt_state = train_step(params, batch_stats, opt_state, *next(batches))
    correct = total = 0
    for points, mask, labels in eval_batches(make_clouds(1024, seed=2), batch_size):
        correct += int((np.asarray(predict(params, batch_stats, points, mask)) == labels).sum())
        total += len(labels)
    return correct / total


if __name__ == "__main__":
    compare(
        __doc__.splitlines()[0],
        train_and_evaluate,
        "maskbn_jax.linen.MaskedBatchNorm",
        "flax.linen.BatchNorm (unmasked)",
    )
