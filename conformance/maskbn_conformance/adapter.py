"""The adapter protocol: what a backend must provide for the harness to run it.

Adapters are thin. NumPy goes in, NumPy comes out, and an adapter never
asserts anything: every comparison belongs to the harness. A backend is found
through the ``maskbn.backends`` entry-point group, whose value points at a
subclass of :class:`Backend`; the class is instantiated with no arguments,
after which ``backend.layer(config)`` builds one layer instance (a
:class:`Layer`). Optional capabilities (second derivatives, the portable
format, stock checkpoints, synchronized layers) have defaults in the base
classes that raise :class:`Unsupported`, which the harness reports as a
visible skip: an adapter overrides only what its framework can do.

Dtypes travel as names, never as NumPy dtypes, because NumPy has no bfloat16:
``x`` arrives as a float32 array whose values are exactly representable in
``x_dtype`` (the harness rounds them first), and the adapter converts it to the
framework's native dtype of that name. Outputs come back as float32/float64
arrays together with the framework dtype's name.

Names of state entries are neutral (``gamma``, ``beta``, ``moving_mean``,
``moving_var``); the adapter translates to its framework's weight names.
``decay`` is neutral too: the adapter translates it to its framework's
``momentum`` convention.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ENTRY_POINT_GROUP = "maskbn.backends"

#: dtype names a backend may be asked to run in.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: dtype names the harness may hand to ``forward`` as ``x_dtype`` (bad-input
#: cases pass integer tensors on purpose).
X_DTYPES = FLOAT_DTYPES + ("int32", "int64")
#: state keys, in a stable order
STATE_KEYS = ("gamma", "beta", "moving_mean", "moving_var")


class Unsupported(Exception):
    """Raised by an adapter for a feature or dtype its framework cannot run.

    The harness turns it into a visible skip carrying ``str(exc)`` as reason.
    """


@dataclass(frozen=True)
class LayerConfig:
    """A layer's configuration in the spec's neutral terms."""

    channels: int
    #: channel axis of ``x`` (negative counts from the end)
    axis: int
    #: rank of the inputs the layer will see (Keras builds from a shape)
    rank: int
    #: moving = decay * moving + (1 - decay) * batch
    decay: float
    epsilon: float
    center: bool
    scale: bool
    #: "normalize" (padded rows normalized like real ones) or "zero"
    padded_output: str
    #: the run dtype: the dtype of ``x``; the layer keeps float32 state
    #: unless this is float64
    dtype: str
    #: what a training call stores as the batch variance: "population" (1/n) or
    #: "unbiased" (n / max(n - 1, 1) times it, per channel: torch's convention)
    moving_var: str = "population"
    #: how the layer is called: one of the backend's ``forms`` (None: its
    #: first, default form), e.g. torch "compile", Keras "function" or "xla"
    form: str | None = None


@dataclass(frozen=True)
class Output:
    """A framework tensor brought back to NumPy, with its framework dtype name."""

    value: np.ndarray
    dtype: str


@dataclass(frozen=True)
class Gradients:
    """Gradients of ``loss = sum(y * dy)`` with respect to x, gamma and beta.

    ``gamma`` / ``beta`` are None when the layer has no such weight.
    """

    x: Output
    gamma: np.ndarray | None
    beta: np.ndarray | None


class Layer:
    """One stateful layer instance of a backend. Subclasses implement the
    required methods; the optional ones raise Unsupported here, so a layer
    without them gets visible skips, never a crash."""

    def forward(self, x: np.ndarray, x_dtype: str, mask: np.ndarray | None, training: bool) -> Output:
        """One call of the layer. ``mask`` keeps its NumPy dtype (bool, int, or a
        float on purpose in bad-input cases) and is passed on as is; None means
        no mask argument at all. Framework errors must propagate unchanged."""
        raise NotImplementedError

    def forward_backward(
        self, x: np.ndarray, x_dtype: str, mask: np.ndarray | None, dy: np.ndarray
    ) -> tuple[Output, Gradients]:
        """A training call followed by the backward pass of sum(y * dy).

        ``dy`` is float32 holding values exact in ``x_dtype``; convert it like x.
        The moving stats update exactly as in ``forward(..., training=True)``."""
        raise NotImplementedError

    def get_state(self) -> dict[str, np.ndarray]:
        """Current weights and moving stats under neutral names, in the dtype
        the layer stores them in (float32, or float64 for a float64 layer).
        Keys whose weight does not exist (center/scale off) are absent."""
        raise NotImplementedError

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Overwrite weights and moving stats (neutral names; a subset is fine)."""
        raise NotImplementedError

    def round_trip(self, directory: Path) -> Layer:
        """Serialize this layer (config + state) through the framework's own
        format into ``directory`` and return a freshly loaded layer."""
        raise NotImplementedError

    # ------------------------------------------------------------ optional

    def hvp(self, x: np.ndarray, x_dtype: str, mask: np.ndarray | None, dy: np.ndarray, v: np.ndarray) -> Output:
        """Optional: a training call and its second derivative, the
        Hessian-vector product d/dx <d/dx sum(y * dy), v>, through the
        framework's own autodiff (double backward, nested tapes, grad of grad).
        ``dy`` and ``v`` arrive like ``dy`` above. The moving stats update as in
        ``forward(..., training=True)``."""
        raise Unsupported(f"{type(self).__name__} has no second derivatives (Layer.hvp)")

    def export_portable(self, directory: Path) -> None:
        """Optional: write config + state in the framework-neutral portable
        format (spec/README.md, "Portable state") into ``directory``, through
        the backend's public API."""
        raise Unsupported(f"{type(self).__name__} cannot export the portable format (Layer.export_portable)")


def wide_dtype(name: str) -> str:
    """The dtype a framework tensor of dtype ``name`` travels back to NumPy in:
    float64 stays float64; float16, bfloat16 and float32 widen (exactly) to float32."""
    return "float64" if name == "float64" else "float32"


class AdapterLayer(Layer):
    """The Layer base of a framework adapter: it owns the translation of the
    neutral state names and the widening of outputs, so an adapter supplies only
    its framework's primitives: read and write one weight by the framework's
    name, name a tensor's dtype, and bring a tensor to the host in a dtype."""

    #: neutral state name (``STATE_KEYS``) -> the framework's name for it
    weight_names: Mapping[str, str]

    def _read_weight(self, name: str) -> np.ndarray | None:
        """The framework's weight ``name`` as NumPy, in its storage dtype; None
        where the layer has no such weight (center/scale off)."""
        raise NotImplementedError

    def _write_weight(self, name: str, value: np.ndarray) -> None:
        """Overwrite the framework's weight ``name`` with ``value``."""
        raise NotImplementedError

    def _dtype_name(self, tensor: Any) -> str:
        """The framework dtype's name (``float16``, ``bfloat16``, ...)."""
        raise NotImplementedError

    def _host(self, tensor: Any, dtype: str) -> np.ndarray:
        """``tensor`` cast to ``dtype`` (float32 or float64), as a NumPy copy."""
        raise NotImplementedError

    def _output(self, tensor: Any) -> Output:
        name = self._dtype_name(tensor)
        return Output(self._host(tensor, wide_dtype(name)), name)

    def get_state(self) -> dict[str, np.ndarray]:
        state = {neutral: self._read_weight(name) for neutral, name in self.weight_names.items()}
        return {neutral: value for neutral, value in state.items() if value is not None}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        unknown = sorted(set(state) - set(self.weight_names))
        if unknown:
            raise KeyError(f"no state entries {unknown}: the neutral names are {list(self.weight_names)}")
        for neutral, value in state.items():
            self._write_weight(self.weight_names[neutral], np.asarray(value))


@dataclass(frozen=True)
class ShardedGradients:
    """Gradients of the global loss ``sum over shards of sum(y_k * dy_k)``.

    ``xs`` holds one d/dx per shard; ``gamma`` / ``beta`` are the gradients of
    the global loss (the sum of the replicas' gradients), None when absent.
    """

    xs: list[Output]
    gamma: np.ndarray | None
    beta: np.ndarray | None

    @classmethod
    def of_replicas(cls, replicas: list[Gradients]) -> ShardedGradients:
        """From each replica's own gradients: every replica holds its shard's
        share of the weight gradients, and the global loss's is their sum (what
        a data-parallel all-reduce of parameter gradients adds up)."""

        def summed(grads: list[np.ndarray | None]) -> np.ndarray | None:
            return None if grads[0] is None else np.sum(grads, axis=0)

        return cls([g.x for g in replicas], summed([g.gamma for g in replicas]), summed([g.beta for g in replicas]))


class ShardedLayer:
    """One synchronized layer replicated over k shards (devices or processes).

    Shard k gets ``xs[k]`` / ``masks[k]`` (a slice of the batch along axis 0);
    statistics are merged across shards with the framework's own collective.
    """

    def forward(
        self, xs: list[np.ndarray], x_dtype: str, masks: list[np.ndarray | None], training: bool
    ) -> list[Output]:
        """One call on every shard; returns each shard's output."""
        raise NotImplementedError

    def forward_backward(
        self, xs: list[np.ndarray], x_dtype: str, masks: list[np.ndarray | None], dys: list[np.ndarray]
    ) -> tuple[list[Output], ShardedGradients]:
        """A training call and the backward of the global loss, on every shard."""
        raise NotImplementedError

    def get_state(self) -> dict[str, np.ndarray]:
        """The (replicated) state, as Layer.get_state."""
        raise NotImplementedError

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Set the state on every replica."""
        raise NotImplementedError

    def close(self) -> None:
        """Release processes or devices the layer holds (nothing by default)."""


class ReplicatedLayer(ShardedLayer):
    """Shards on the devices of one process, every replica reading the weights of one layer,
    ``one``: the state is that layer's. Closing drops it; the devices belong to the process."""

    one: Layer | None

    def get_state(self) -> dict[str, np.ndarray]:
        assert self.one is not None, "the layer is closed"
        return self.one.get_state()

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        assert self.one is not None, "the layer is closed"
        self.one.set_state(state)

    def close(self) -> None:
        self.one = None


class Backend:
    """A framework's entry point into the harness: subclass it, set the class
    attributes and implement ``layer``; the optional capabilities below raise
    Unsupported until a subclass provides them."""

    #: short name, used in test ids (``torch``, ``tf``, ``jax``)
    name: str
    #: an anchor is not ours but what a user already has (a stock layer called
    #: with a mask, gather / BN / scatter): the report shows it beside ours, its
    #: failures are its expectations, and it gets no fuzz pass
    anchor: bool = False
    #: the moving-variance convention of the framework's stock batch norm
    #: ("unbiased" for torch, "population" elsewhere): parity cases run the
    #: masked layer in it, so masked and stock layers store the same thing
    stock_moving_var: str = "population"
    #: the forms the adapter runs a layer in (eager, graph, compiled ...), the
    #: default first; spec cases marked ``every_form`` run in each, with ids
    #: ``<name>-<form>-<case>-...`` for the non-default ones
    forms: tuple[str, ...]
    #: training calls of the fuzz suite's long run. A backend whose eager call
    #: is too slow for 10 000 within the fuzz folder's CI budget (about 3
    #: minutes per backend on 2 slow cores) lowers it, with its measurement.
    #: MASKBN_FUZZ_LONG_RUN_STEPS overrides every backend.
    long_run_steps: int = 10_000
    #: multiplier of a fuzz profile's examples per property, from the backend's
    #: measured cost per example (torch about 1 ms, JAX 0.3-1.5 s as it compiles per
    #: layer and shape), so each backend's fuzz folder takes 1-2 minutes in CI
    fuzz_example_scale: float = 1.0

    def layer(self, config: LayerConfig) -> Layer:
        """Build a masked batch norm layer; raise Unsupported for a dtype or
        option the framework cannot run."""
        raise NotImplementedError

    def expectations_path(self) -> Path | None:
        """The YAML file of this backend's expected skips/xfails/tolerance
        overrides (see spec/README.md), or None when it has none."""
        return None

    # ------------------------------------------------------------ optional

    def stock_layer(self, config: LayerConfig) -> Layer:
        """The framework's own unmasked batch norm with the same config, used
        for parity cases; it is only ever called with ``mask=None``."""
        raise Unsupported(f"backend {self.name} has no stock batch norm (Backend.stock_layer)")

    def sharded_layer(self, config: LayerConfig, num_shards: int) -> ShardedLayer:
        """A synchronized layer over ``num_shards`` replicas."""
        raise Unsupported(f"backend {self.name} has no synchronized (sharded) layer (Backend.sharded_layer)")

    def import_portable(self, directory: Path) -> Layer:
        """A layer loaded from the portable format, written by any backend,
        through this backend's public API."""
        raise Unsupported(f"backend {self.name} cannot import the portable format (Backend.import_portable)")

    def from_stock_checkpoint(self, stock: Layer, directory: Path) -> Layer:
        """Save ``stock`` (a ``stock_layer``) with the framework's usual
        checkpoint (state_dict, Keras weights, Flax variables) into
        ``directory`` and load that checkpoint into a new masked layer."""
        raise Unsupported(f"backend {self.name} cannot load its stock checkpoints (Backend.from_stock_checkpoint)")

    def process_variants(self) -> dict[str, dict[str, str]]:
        """Further report columns of this backend that need a process of their own, because
        the framework fixes a choice once per process (Keras' backend): column suffix ->
        the environment variables of that process. The report runs each as a child report
        of this backend alone; pytest runs only the current process's. None by default."""
        return {}


def float32_of(x: np.ndarray) -> np.ndarray:
    """Convenience for adapters: a contiguous float32 (or float64) copy."""
    x = np.asarray(x)
    return np.ascontiguousarray(x if x.dtype == np.float64 else x.astype(np.float32))
