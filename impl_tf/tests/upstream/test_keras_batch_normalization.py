"""Keras' own BatchNormalization tests, run FROM THE INSTALLED keras package with
MaskedBatchNormalization in place of keras.layers.BatchNormalization (nothing copied).

The upstream module's `layers` name is swapped for a view of keras.src.layers whose
BatchNormalization is ours, for the duration of each test. Tests that maskbn answers
differently by design are entries of expectations.json (strict xfails, see conftest.py).
"""

import types

import pytest

upstream = pytest.importorskip(
    "keras.src.layers.normalization.batch_normalization_test",
    reason="the installed keras does not ship its batch-normalization tests",
)

from maskbn_tf import MaskedBatchNormalization  # noqa: E402


def _layers_with_ours():
    view = types.SimpleNamespace(**vars(upstream.layers))
    view.BatchNormalization = MaskedBatchNormalization
    return view


@pytest.fixture(autouse=True)
def masked_layer_in_place_of_stock(monkeypatch):
    monkeypatch.setattr(upstream, "layers", _layers_with_ours())


class TestKerasBatchNormalizationSuite(upstream.BatchNormalizationTest):
    """Every test of keras' BatchNormalizationTest, against MaskedBatchNormalization."""
