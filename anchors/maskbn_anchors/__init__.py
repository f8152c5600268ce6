"""Anchor backends: the field's usual masked batch norms, run through the spec beside ours.

Each anchor is a thin subclass of our adapter of its framework: the layer it builds
is the stock one a user would reach for, called as that user would call it. What the
anchor gets wrong is data (``<anchor>_expectations.yaml`` next to it, one reason per
entry, strict: an entry that stops failing fails the report); what it cannot express
(a padded-output mode, the portable format) raises Unsupported, a visible skip.
"""

from pathlib import Path


def expectations(anchor: str) -> Path:
    """The expectations file of the anchor module ``anchor`` (its ``__name__``)."""
    return Path(__file__).with_name(anchor.rsplit(".", 1)[-1] + "_expectations.yaml")
