"""maskbn_tf: masked batch normalization for Keras 3 (TensorFlow, JAX and torch backends).

Batch statistics come only from the real (mask != 0) rows of a padded batch.
"""

from maskbn_tf.checkpoints import load_portable, load_stock_weights, save_portable
from maskbn_tf.layer import MaskedBatchNormalization

__all__ = ["MaskedBatchNormalization", "load_portable", "load_stock_weights", "save_portable"]
__version__ = "0.1.0"
