"""maskbn conformance harness: the spec loader, the float64 reference, the
named invariants, the adapter protocol and the pytest plugin.

No ML framework is imported here; backends are found through the
``maskbn.backends`` entry-point group and loaded only when a run asks for them.
"""

from .adapter import Backend, Gradients, Layer, LayerConfig, Output, Unsupported

__all__ = ["Backend", "Gradients", "Layer", "LayerConfig", "Output", "Unsupported"]
__version__ = "0.1.0"
