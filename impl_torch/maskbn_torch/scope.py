"""``mask_scope``: hand a padding mask to every :class:`MaskedBatchNorm` of an unmodified model.

PyTorch has no mask propagation: inside an ``nn.Sequential`` or an existing model's
``forward`` nobody passes ``mask=`` to a converted batch norm. A scope does::

    with mask_scope(point_mask, cloud_mask):
        logits = model(points)

Every ``MaskedBatchNorm`` called inside the ``with`` block without an explicit mask takes
the scoped mask that fits its input. The scope lives in a :mod:`contextvars` variable, so
threads and asyncio tasks each see their own masks (a new thread starts outside every
scope; an asyncio task starts in the scopes active where it was created).

Rules (tested in ``impl_torch/tests/test_scope.py``):

- **Fit.** A scoped mask fits an input ``x`` when its shape is ``x``'s shape without the
  layer's channel axis, or ``x``'s rank with size 1 at the channel axis and every other dim
  equal to ``x``'s or 1 (a mask that broadcasts over the channels). A scoped mask never
  varies along the channel axis: the readings of ``forward(x, mask)`` that do (Keras's
  leading-axes convention, same-rank per-channel masks) would let a length-64 point mask
  silently mask the 64 channels of a layer after a strided layer, or of a
  ``Linear(..., 64)`` head. Such masks are passed explicitly.
- **Choice.** Scopes are searched innermost first. In the first scope holding any mask that
  fits, exactly one must fit, else a ``ValueError`` (ambiguous); outer scopes are not
  consulted then. So an inner scope shadows the outer masks that fit the same inputs and
  extends the outer scope for the others (e.g. an inner scope for a downsampled
  resolution keeps the outer full-resolution mask visible). Two masks of one shape in one
  scope are refused when the scope is made.
- **Explicit wins.** ``layer(x, mask=m)`` uses ``m``, whatever is scoped.
- **No fit is an error.** A layer called inside a scope whose input no scoped mask fits
  raises a ``ValueError`` naming the layer (its path in the model when
  :func:`convert_batchnorm` converted it), its input shape and the scoped mask shapes.
  Outside every scope a layer without a mask treats every position as real, as before.
- **torch.compile.** The scope is read through a C-level property, which Dynamo resolves
  with a guard evaluated in the caller's context: the scoped masks become graph inputs
  guarded on shape/dtype (never on identity), so a new mask of the same shape reuses the
  compiled graph, and entering or leaving a scope recompiles once. Enter the scope outside
  the compiled function. Under ``fullgraph=True`` a scope error surfaces as Dynamo's
  ``Unsupported`` error quoting the ``ValueError``.
- **Activation checkpointing.** ``torch.utils.checkpoint`` re-runs the forward during
  backward, possibly outside the ``with`` block (and on CUDA in the autograd engine's
  own threads, which do not see the caller's context). Make the recomputation see the
  same masks with ``context_fn=checkpoint_context_fn`` (``use_reentrant=False``) or by
  checkpointing ``bind_mask_scope(fn)`` (either mode); on CPU, calling ``backward()``
  inside the ``with`` block also works. A recomputation that finds no scope while the
  layer's forward took a scoped mask raises a ``RuntimeError`` instead of silently
  using no mask. Compiled, the checkpointed region is traced with its masks as graph
  inputs and needs none of this.
"""

from __future__ import annotations

import contextvars
import functools
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["bind_mask_scope", "checkpoint_context_fn", "mask_scope"]

Stack = tuple[tuple[Tensor, ...], ...]  # the active scopes, outermost first

_SCOPES: contextvars.ContextVar[Stack] = contextvars.ContextVar("maskbn_torch.mask_scope")


class _ScopeReader:
    """``SCOPE_READER.stack`` is ``_SCOPES.get(SCOPE_READER)``.

    Dynamo cannot call ``ContextVar.get`` (a graph break), but it resolves a property whose
    getter is a C function at trace time and guards the result through the same attribute,
    re-read in the calling context at every call. The getter's argument is the default, so
    an unset variable (e.g. in a fresh thread) returns the reader itself.
    """

    __slots__ = ()
    stack = property(_SCOPES.get)


_READER = _ScopeReader()


def _active_stack() -> Stack:
    stack = _READER.stack
    return () if stack is _READER else stack


# layers whose latest forward (outside backward) took a scoped mask: a checkpoint
# recomputation of such a layer without a scope must raise, not run unmasked
_TOOK_SCOPED_MASK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
# a converted layer's path in its model, for error messages (set by convert_batchnorm)
_LAYER_PATHS: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _shape(t: Tensor | torch.Size) -> tuple[int, ...]:
    return tuple(int(s) for s in (t.shape if isinstance(t, Tensor) else t))


def _check_mask(mask: Any, position: int) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask_scope: mask {position} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"mask_scope: mask {position} (shape {_shape(mask)}) has dtype {str(mask.dtype).removeprefix('torch.')}; "
            "masks are bool or integer (non-zero = real): pass e.g. `mask > 0` or `mask.bool()`"
        )


class mask_scope(AbstractContextManager):  # lower case: used like a function, as torch.no_grad
    """Within ``with mask_scope(*masks):`` every ``MaskedBatchNorm`` called without a mask uses
    the scoped mask that fits its input.

    Args:
        *masks: bool or integer tensors (non-zero = real), at most one per shape; typically
            one per resolution of the model, e.g. a ``(B, N)`` point mask for the per-point
            layers and a ``(B,)`` item mask for the layers after pooling.

    See the module docstring for the rules (fit, innermost scope first, errors, compile,
    checkpointing). Reusable and re-entrant; nested scopes search the inner one first.
    """

    def __init__(self, *masks: Tensor) -> None:
        if not masks:
            raise ValueError("mask_scope needs at least one mask")
        for position, mask in enumerate(masks):
            _check_mask(mask, position)
        shapes = [_shape(m) for m in masks]
        repeated = sorted({s for s in shapes if shapes.count(s) > 1})
        if repeated:
            raise ValueError(
                f"mask_scope got several masks of shape {', '.join(map(str, repeated))}: a layer could not "
                f"choose between them (scoped shapes {shapes}); scope one mask per shape, or nest scopes"
            )
        self.masks: tuple[Tensor, ...] = masks
        self._tokens: list[contextvars.Token[Stack]] = []

    def __enter__(self) -> mask_scope:
        self._tokens.append(_SCOPES.set((*_active_stack(), self.masks)))
        return self

    def __exit__(self, *exc: object) -> None:
        _SCOPES.reset(self._tokens.pop())

    def __repr__(self) -> str:
        return f"mask_scope({', '.join(f'<mask {_shape(m)}>' for m in self.masks)})"


class _RestoredScopes(AbstractContextManager):
    """Run with exactly ``stack`` as the active scopes; re-enterable, since a checkpoint
    recomputes once per backward (``retain_graph=True``)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self._tokens: list[contextvars.Token[Stack]] = []

    def __enter__(self) -> None:
        self._tokens.append(_SCOPES.set(self.stack))

    def __exit__(self, *exc: object) -> None:
        _SCOPES.reset(self._tokens.pop())


def checkpoint_context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

    Called when the checkpointed forward starts, it captures the active scopes and
    restores them for the recomputation during backward, wherever backward runs::

        checkpoint(block, h, use_reentrant=False, context_fn=checkpoint_context_fn)
    """
    return nullcontext(), _RestoredScopes(_active_stack())


F = TypeVar("F", bound=Callable[..., Any])


def bind_mask_scope(fn: F) -> F:
    """``fn`` run inside the scopes active now, whenever it is called.

    For ``torch.utils.checkpoint`` in either ``use_reentrant`` mode: the recomputation
    during backward sees the masks of the original forward::

        h = checkpoint(bind_mask_scope(block), h, use_reentrant=True)
    """
    stack = _active_stack()

    @functools.wraps(fn)
    def bound(*args: Any, **kwargs: Any) -> Any:
        with _RestoredScopes(stack):
            return fn(*args, **kwargs)

    return bound  # type: ignore[return-value]


def remember_layer_path(layer: nn.Module, path: str) -> None:
    """Name ``layer`` by its path in a model in scope error messages (first name wins)."""
    _LAYER_PATHS.setdefault(layer, path)


def _layer_name(layer: nn.Module) -> str:
    path = _LAYER_PATHS.get(layer)
    return f"{type(layer).__name__} {path!r}" if path else repr(layer)


def mask_fits(mask_shape: torch.Size, x_shape: torch.Size, channel_axis: int) -> bool:
    """Whether a scoped mask of ``mask_shape`` fits an input of ``x_shape`` (see the module rules)."""
    rank = len(x_shape)
    axis = channel_axis % rank
    if mask_shape == x_shape[:axis] + x_shape[axis + 1 :]:
        return True
    return (
        len(mask_shape) == rank
        and mask_shape[axis] == 1
        and all(m == s or m == 1 for i, (m, s) in enumerate(zip(mask_shape, x_shape)) if i != axis)
    )


def _choose(layer: nn.Module, x: Tensor, channel_axis: int, stack: Stack) -> Tensor:
    for depth, masks in enumerate(reversed(stack)):
        fitting = [m for m in masks if mask_fits(m.shape, x.shape, channel_axis)]
        if len(fitting) == 1:
            return fitting[0]
        if fitting:
            where = "the innermost scope" if depth == 0 else f"the scope {depth} level(s) out"
            raise ValueError(
                f"{_layer_name(layer)}: input shape {_shape(x)} (channel axis {channel_axis}) is fitted by "
                f"several masks of {where}: shapes {[_shape(m) for m in fitting]}; scope only one of them, "
                "or pass mask= explicitly"
            )
    scoped = [[_shape(m) for m in masks] for masks in stack]
    raise ValueError(
        f"{_layer_name(layer)}: no scoped mask fits its input shape {_shape(x)} (channel axis {channel_axis}); "
        f"scoped mask shapes, outermost scope first: {scoped}. A fitting mask has the input's shape without "
        "the channel axis (or size 1 there). Scope one for this resolution (e.g. `mask.any(dim=-1)` for the "
        "layers after pooling, or the mask downsampled as a strided layer downsamples x), or pass mask= explicitly"
    )


def scoped_mask(layer: nn.Module, x: Tensor, channel_axis: int) -> Tensor | None:
    """The mask ``layer`` takes from the active scopes for input ``x``, or None outside every scope.

    Called by ``MaskedBatchNorm.forward`` when it has no explicit mask.
    """
    stack = _active_stack()
    if not isinstance(x, Tensor) or x.dim() < 1 or not -x.dim() <= channel_axis < x.dim():
        return None  # the functional names what is wrong with x
    if torch.compiler.is_compiling():
        # checkpointing is traced into the compiled graph, masks included: nothing to track
        return _choose(layer, x, channel_axis, stack) if stack else None
    if not stack and not _TOOK_SCOPED_MASK:
        return None  # no scope, none used since the last unscoped forwards: nothing to check
    in_backward = torch._C._current_graph_task_id() != -1
    if not stack:
        if in_backward and _TOOK_SCOPED_MASK.get(layer, False):
            raise RuntimeError(
                f"{_layer_name(layer)} is being recomputed during backward (torch.utils.checkpoint) outside "
                "the mask_scope its forward ran in, so it would run without its mask. Pass "
                "context_fn=maskbn_torch.checkpoint_context_fn (use_reentrant=False), checkpoint "
                "maskbn_torch.bind_mask_scope(fn) (either mode), or call backward() inside the scope"
            )
        if not in_backward:
            _TOOK_SCOPED_MASK.pop(layer, None)
        return None
    mask = _choose(layer, x, channel_axis, stack)
    if not in_backward:
        _TOOK_SCOPED_MASK[layer] = True
    return mask
