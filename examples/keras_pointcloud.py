"""Point-cloud classification in Keras 3: masked batch norm against stock BatchNormalization.

    python examples/keras_pointcloud.py [--steps 300]

Same model, data, seed and optimizer twice; only the norm layer differs. The stock
layer is called without a mask (what a plain model does); MaskedBatchNormalization
takes its statistics from the real points only. Runs on any Keras backend.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops
from pointclouds import FEATURES, MAX_POINTS, NUM_CLASSES, bucketed_batches, compare, eval_batches, make_clouds

from maskbn_tf import MaskedBatchNormalization

# A few hundred training steps: the moving stats must follow the weights, so both
# layers decay at 0.9 (torch's default) instead of Keras' 0.99
MOMENTUM = 0.9


def point_classifier(masked: bool, width: int = 64) -> keras.Model:
    """Per-point MLP with batch norm, masked max pooling over the real points, linear classifier."""
    points = keras.Input((MAX_POINTS, FEATURES), name="points")
    mask = keras.Input((MAX_POINTS,), dtype="bool", name="mask")
    h = points
    for _ in range(2):
        h = keras.layers.Dense(width)(h)
        if masked:
            h = MaskedBatchNormalization(momentum=MOMENTUM)(h, mask=mask)
        else:
            h = keras.layers.BatchNormalization(momentum=MOMENTUM)(h)
        h = keras.layers.ReLU()(h)
    pooled = keras.layers.Lambda(
        lambda args: ops.max(ops.where(args[1][..., None], args[0], -np.inf), axis=1), output_shape=(width,)
    )([h, mask])
    return keras.Model([points, mask], keras.layers.Dense(NUM_CLASSES)(pooled))


def train_and_evaluate(masked: bool, steps: int, batch_size: int, seed: int) -> float:
    keras.utils.set_random_seed(seed)
    model = point_classifier(masked)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    batches = bucketed_batches(make_clouds(2048, seed=1), batch_size, seed=seed)
    for _ in range(steps):
        points, mask, labels = next(batches)
        model.train_on_batch([points, mask], labels)
    correct = total = 0
    for points, mask, labels in eval_batches(make_clouds(1024, seed=2), batch_size):
        logits = model.predict_on_batch([points, mask])
        correct += int((np.argmax(logits, axis=1) == labels).sum())
        total += len(labels)
    return correct / total


if __name__ == "__main__":
    compare(
        __doc__.splitlines()[0],
        train_and_evaluate,
        "maskbn_tf.MaskedBatchNormalization",
        "keras BatchNormalization (unmasked)",
    )
