"""mask_scope: the masks of a padded batch reach every converted layer of an unmodified model.

The reference is the same model run by hand, each MaskedBatchNorm given its mask explicitly;
the scope must reproduce it bit for bit (float32), eagerly, compiled, checkpointed, across
threads and tasks, and under DDP with synchronized layers.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import threading
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from torch_helpers import prefix_mask

from maskbn_conformance.readme import readme_example
from maskbn_torch import (
    MaskedBatchNorm,
    bind_mask_scope,
    checkpoint_context_fn,
    convert_batchnorm,
    mask_scope,
)
from maskbn_torch.scope import mask_fits

B, N = 4, 16
LENGTHS = [[16, 11, 5, 0], [3, 16, 8, 9], [1, 2, 16, 4]]  # one batch per step; an empty cloud in the first


class PointNet(nn.Module):
    """A PointNet-like classifier as users write it: stock blocks, no notion of a mask.

    The sizes make shape coincidences on purpose: the head's 16 channels equal the point
    count N, and the strided block's 16 channels too, so a mask reading that varies over
    channels would fit layers it must not.
    """

    def __init__(self, classes: int = 3, track_running_stats: bool = True) -> None:
        super().__init__()
        bn = {"track_running_stats": track_running_stats}
        self.features = nn.Sequential(
            nn.Conv1d(3, 8, 1),
            nn.BatchNorm1d(8, **bn),
            nn.ReLU(),
            nn.Conv1d(8, 16, 2, stride=2),  # halves the length: (B, 16, N / 2)
            nn.BatchNorm1d(16, **bn),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16, **bn), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(points).amax(dim=2))


def masks_of(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One mask per resolution: points (B, N), after the strided conv (B, N/2), clouds (B,)."""
    points = prefix_mask(B, N, lengths)
    return points, points.view(B, N // 2, 2).any(-1), points.any(1)


def explicit_features(model: nn.Module, points: torch.Tensor, masks) -> torch.Tensor:
    f = model.features
    h = f[2](f[1](f[0](points), masks[0]))
    return f[5](f[4](f[3](h), masks[1]))


def explicit_head(model: nn.Module, features: torch.Tensor, masks) -> torch.Tensor:
    h = model.head
    return h[3](h[2](h[1](h[0](features.amax(dim=2)), masks[2])))


def explicit_forward(model: nn.Module, points: torch.Tensor, masks) -> torch.Tensor:
    """The hand-written model: every masked layer gets its mask passed explicitly."""
    return explicit_head(model, explicit_features(model, points, masks), masks)


def batch(step: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(10 + step)
    masks = masks_of(LENGTHS[step])
    points = torch.randn(B, 3, N, generator=gen, dtype=dtype) * 2 + 1
    # padded by repeating a cloud's first point, as PointNet pipelines do (the max-pool ignores
    # duplicates); only the masks keep the duplicates out of the statistics
    points = torch.where(masks[0][:, None, :], points, points[:, :, :1])
    dy = torch.randn(B, 3, generator=gen, dtype=dtype)
    return points, masks, dy


def converted_pair(padded_output: str = "normalize", dtype=torch.float32, **kwargs):
    """(scoped, explicit): two converted copies of one stock PointNet."""
    torch.manual_seed(0)
    model = convert_batchnorm(PointNet(**kwargs).to(dtype), padded_output=padded_output)
    return model, copy.deepcopy(model)


def in_scope(model: nn.Module, masks):
    """The unmodified model called inside a scope of ``masks``."""

    def run(points: torch.Tensor) -> torch.Tensor:
        with mask_scope(*masks):
            return model(points)

    return run


def by_hand(model: nn.Module, masks):
    return lambda points: explicit_forward(model, points, masks)


def record(model: nn.Module, run, points: torch.Tensor, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input and parameter gradients, and the state after one forward/backward."""
    points = points.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = run(points)
    y.backward(dy)
    return {
        "y": y.detach(),
        "dpoints": points.grad,
        **{f"grad {name}": p.grad for name, p in model.named_parameters()},
        **{name: t.clone() for name, t in model.state_dict().items()},
    }


def assert_same(got: dict, want: dict, exact: bool = True) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if exact:
            assert torch.equal(got[key], want[key]), key
        else:
            torch.testing.assert_close(got[key], want[key], msg=key)


# -- the scope equals explicit masks -----------------------------------------------------------


@pytest.mark.parametrize(
    ("training", "padded_output"),
    [(True, "normalize"), (True, "zero"), (False, "normalize"), (False, "zero")],
    ids=["train", "train-zero", "eval", "eval-zero"],
)
def test_scoped_model_equals_explicit_masks_bit_for_bit(training, padded_output):
    scoped, explicit = converted_pair(padded_output)
    scoped.train(training)
    explicit.train(training)
    for step in range(len(LENGTHS)):
        points, masks, dy = batch(step)
        assert_same(
            record(scoped, in_scope(scoped, masks), points, dy), record(explicit, by_hand(explicit, masks), points, dy)
        )


def test_scope_changes_the_statistics():
    # the equality above would also hold if neither side used its masks
    scoped, unscoped = converted_pair()
    points, masks, _ = batch(0)
    with mask_scope(*masks):
        scoped(points)
    unscoped(points)
    real = scoped.features[0](points).detach().transpose(1, 2)[masks[0]]  # (n, 8)
    torch.testing.assert_close(scoped.features[1].running_mean, 0.1 * real.mean(0))
    assert not torch.allclose(unscoped.features[1].running_mean, scoped.features[1].running_mean)


def test_explicit_mask_wins_over_the_scope():
    layer = MaskedBatchNorm(3)
    x = torch.randn(B, 3, N)
    scoped_mask, explicit_mask = prefix_mask(B, N, [16, 1, 2, 3]), prefix_mask(B, N, [4, 4, 9, 16])
    with mask_scope(scoped_mask):
        y = layer(x, explicit_mask)
    assert torch.equal(y, MaskedBatchNorm(3)(x, explicit_mask))


def test_outside_every_scope_a_layer_treats_every_position_as_real():
    layer, never_scoped = MaskedBatchNorm(3), MaskedBatchNorm(3)
    x = torch.randn(B, 3, N)
    with mask_scope(prefix_mask(B, N, [1, 2, 3, 4])):
        layer(x)
    layer.reset_running_stats()
    assert torch.equal(layer(x), never_scoped(x))
    assert torch.equal(layer.running_var, never_scoped.running_var)


def test_integer_masks_are_scoped_like_bool_ones():
    layer = MaskedBatchNorm(3)
    x = torch.randn(B, 3, N)
    mask = prefix_mask(B, N, [5, 16, 0, 2])
    with mask_scope(mask.to(torch.int64) * 7):
        y = layer(x)
    assert torch.equal(y, MaskedBatchNorm(3)(x, mask))


def test_a_scope_without_masked_layers_changes_nothing():
    torch.manual_seed(0)
    stock = PointNet()
    points, masks, _ = batch(0)
    want = stock(points)
    with mask_scope(*masks):
        got = stock(points)
    assert torch.equal(got, want)


# -- which mask fits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask_shape", "x_shape", "channel_axis", "fits"),
    [
        ((4, 16), (4, 8, 16), 1, True),  # x without its channel axis
        ((4, 1, 16), (4, 8, 16), 1, True),  # ... or with size 1 there
        ((4, 1, 1), (4, 8, 16), 1, True),  # broadcast over the length too: whole items
        ((4, 16), (4, 16, 8), -1, True),  # channels last
        ((4,), (4, 16), 1, True),  # the head after pooling
        ((4, 16), (4, 16), 1, False),  # would vary over the head's 16 channels
        ((4, 16), (4, 16, 8), 1, False),  # Keras's leading-axes reading: masks channels
        ((4, 16, 8), (4, 16, 8), 1, False),  # per channel: pass such a mask explicitly
        ((4, 8), (4, 8, 16), 1, False),  # another resolution
        ((2, 16), (4, 8, 16), 1, False),
    ],
)
def test_mask_fits(mask_shape, x_shape, channel_axis, fits):
    assert mask_fits(torch.Size(mask_shape), torch.Size(x_shape), channel_axis) is fits


def test_a_broadcast_item_mask_serves_every_length():
    layer = MaskedBatchNorm(3, track_running_stats=False)
    items = torch.tensor([True, False, True, True])[:, None, None]  # (B, 1, 1): whole clouds
    for length in (N, N // 2):
        x = torch.randn(B, 3, length)
        with mask_scope(items):
            y = layer(x)
        torch.testing.assert_close(y, layer(x, items.expand(B, 1, length)), rtol=0, atol=0)


# -- nesting -----------------------------------------------------------------------------------


def test_inner_scope_shadows_the_outer_mask_of_the_same_shape():
    layer = MaskedBatchNorm(3, track_running_stats=False)
    x = torch.randn(B, 3, N)
    outer, inner = prefix_mask(B, N, [16, 1, 2, 3]), prefix_mask(B, N, [4, 4, 9, 16])
    with mask_scope(outer):
        with mask_scope(inner):
            y_inner = layer(x)
        y_outer = layer(x)  # restored on exit
    assert torch.equal(y_inner, layer(x, inner))
    assert torch.equal(y_outer, layer(x, outer))


def test_inner_scope_extends_the_outer_one_for_other_shapes():
    scoped, explicit = converted_pair()
    points, (full, half, clouds), dy = batch(0)

    def run_nested(p):
        with mask_scope(full, clouds):
            with mask_scope(half):
                return scoped(p)

    want = record(explicit, by_hand(explicit, (full, half, clouds)), points, dy)
    assert_same(record(scoped, run_nested, points, dy), want)


def test_innermost_fitting_scope_decides_and_its_ambiguity_is_an_error():
    layer = MaskedBatchNorm(3, track_running_stats=False)
    x = torch.randn(B, 3, N)
    flat, keepdim = prefix_mask(B, N, [1, 2, 3, 4]), prefix_mask(B, N, [5, 6, 7, 8])[:, None, :]
    with mask_scope(flat, keepdim):
        with pytest.raises(
            ValueError, match=r"several masks of the innermost scope: shapes \[\(4, 16\), \(4, 1, 16\)\]"
        ):
            layer(x)
        with mask_scope(keepdim.squeeze(1)):  # the inner scope decides: the outer is not consulted
            assert torch.equal(layer(x), layer(x, keepdim))


@pytest.mark.parametrize(
    ("masks", "error", "match"),
    [
        ((), ValueError, "at least one mask"),
        ((torch.ones(B, N, dtype=torch.bool), torch.zeros(B, N, dtype=torch.bool)), ValueError, r"shape \(4, 16\)"),
        ((torch.ones(B, N),), TypeError, r"mask 0 \(shape \(4, 16\)\) has dtype float32.*mask > 0"),
        (([[True]],), TypeError, "mask 0 must be a torch.Tensor, got list"),
    ],
    ids=["none", "same-shape-twice", "float", "not-a-tensor"],
)
def test_scope_refuses_bad_masks_when_made(masks, error, match):
    with pytest.raises(error, match=match):
        mask_scope(*masks)


def test_scope_object_is_reusable_and_reentrant():
    layer = MaskedBatchNorm(3, track_running_stats=False)
    x = torch.randn(B, 3, N)
    mask = prefix_mask(B, N, [1, 2, 3, 4])
    scope = mask_scope(mask)
    with scope, scope:
        y = layer(x)
    with scope:
        assert torch.equal(layer(x), y)
    assert torch.equal(y, layer(x, mask))
    assert not torch.equal(layer(x), y)


# -- mismatch errors ---------------------------------------------------------------------------


def test_a_layer_no_scoped_mask_fits_names_itself_its_input_and_the_scoped_shapes():
    model, _ = converted_pair()
    points, (full, _, clouds), _ = batch(0)
    strided_bn = model.features[4]
    before = {k: v.clone() for k, v in strided_bn.state_dict().items()}
    # the strided conv halved the length and no (B, N/2) mask is scoped
    with mask_scope(full, clouds), pytest.raises(ValueError) as info:
        model(points)
    message = str(info.value)
    assert "MaskedBatchNorm 'features.4'" in message
    assert "input shape (4, 16, 8) (channel axis 1)" in message
    assert "[[(4, 16), (4,)]]" in message
    assert all(torch.equal(v, before[k]) for k, v in strided_bn.state_dict().items())


def test_a_layer_built_by_hand_is_named_by_its_repr():
    layer = MaskedBatchNorm(3)
    with mask_scope(prefix_mask(B, N, [1, 2, 3, 4])), pytest.raises(ValueError, match=r"MaskedBatchNorm\(3, eps="):
        layer(torch.randn(B, 3, N // 2))


# -- torch.compile -----------------------------------------------------------------------------


def test_compiled_model_compiles_once_across_batches_with_new_masks():
    torch._dynamo.reset()
    counters.clear()
    scoped, explicit = converted_pair()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(scoped, backend=counter, fullgraph=True)
    for step in range(len(LENGTHS)):
        points, masks, dy = batch(step)  # new mask tensors of the same shapes every step
        want = record(explicit, by_hand(explicit, masks), points, dy)
        # backward runs outside the scope: the compiled graph holds the masks
        assert_same(record(scoped, in_scope(compiled, masks), points, dy), want, exact=False)
    assert counter.frame_count == 1
    assert not counters["graph_break"]
    # leaving the scope is one more graph (the unmasked one), then reused
    for step in range(2):
        compiled(batch(step)[0])
    assert counter.frame_count == 2


def test_compiled_model_raises_the_scope_error():
    torch._dynamo.reset()
    model, _ = converted_pair()
    points, (full, _, clouds), _ = batch(0)
    with mask_scope(full, clouds), pytest.raises(ValueError, match=r"'features\.4': no scoped mask fits"):
        torch.compile(model, backend="aot_eager")(points)


# -- activation checkpointing --------------------------------------------------------------------


def checkpointed(model: nn.Module, features, **kwargs):
    """The unmodified model with its feature block checkpointed."""
    return lambda p: model.head(checkpoint(features, p, **kwargs).amax(dim=2))


def explicit_checkpointed(model: nn.Module, masks, **kwargs):
    """The hand-written model with its feature block checkpointed."""
    return lambda p: explicit_head(model, checkpoint(lambda q: explicit_features(model, q, masks), p, **kwargs), masks)


@pytest.mark.parametrize(
    ("use_reentrant", "how"),
    [
        (True, "backward-in-scope"),
        (False, "backward-in-scope"),
        (True, "bind"),
        (False, "bind"),
        (False, "context-fn"),
    ],
)
def test_checkpoint_recompute_sees_the_scoped_masks(use_reentrant, how):
    scoped, explicit = converted_pair()
    points, masks, dy = batch(0)
    want = record(explicit, explicit_checkpointed(explicit, masks, use_reentrant=use_reentrant), points, dy)

    scoped.zero_grad(set_to_none=True)
    with mask_scope(*masks):
        if how == "context-fn":
            run = checkpointed(scoped, scoped.features, use_reentrant=False, context_fn=checkpoint_context_fn)
        else:
            features = bind_mask_scope(scoped.features) if how == "bind" else scoped.features
            run = checkpointed(scoped, features, use_reentrant=use_reentrant)
        p = points.detach().clone().requires_grad_()
        y = run(p)
        if how == "backward-in-scope":
            y.backward(dy)
    if how != "backward-in-scope":
        y.backward(dy)
    got = {
        "y": y.detach(),
        "dpoints": p.grad,
        **{f"grad {name}": q.grad for name, q in scoped.named_parameters()},
        **{name: t.clone() for name, t in scoped.state_dict().items()},
    }
    assert_same(got, want)


def test_checkpoint_context_recomputes_with_the_masks_on_every_backward():
    scoped, explicit = converted_pair()
    points, masks, dy = batch(0)

    def twice(run):
        def backward_twice(p):
            y = run(p)
            y.backward(dy, retain_graph=True)  # the second backward (in record) recomputes again
            return y

        return backward_twice

    want = record(explicit, twice(explicit_checkpointed(explicit, masks, use_reentrant=False)), points, dy)
    run = checkpointed(scoped, scoped.features, use_reentrant=False, context_fn=checkpoint_context_fn)
    assert_same(record(scoped, twice(in_scope(run, masks)), points, dy), want)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_recompute_outside_the_scope_raises(use_reentrant):
    model, _ = converted_pair()
    points, masks, dy = batch(0)
    with mask_scope(*masks):
        y = checkpointed(model, model.features, use_reentrant=use_reentrant)(points.requires_grad_())
    with pytest.raises(RuntimeError, match=r"'features.1' is being recomputed during backward.*checkpoint_context_fn"):
        y.backward(dy)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_compiled_checkpoint_carries_the_masks_into_backward(use_reentrant):
    torch._dynamo.reset()
    counters.clear()
    scoped, explicit = converted_pair()
    counter = CompileCounterWithBackend("aot_eager")
    run = torch.compile(checkpointed(scoped, scoped.features, use_reentrant=use_reentrant), backend=counter)
    for step in range(len(LENGTHS)):
        points, masks, dy = batch(step)
        # compiled, the region updates the running stats once: as the model without checkpointing
        want = record(explicit, by_hand(explicit, masks), points, dy)
        assert_same(record(scoped, in_scope(run, masks), points, dy), want, exact=False)
    assert counter.frame_count == 1
    assert not counters["graph_break"]


def test_checkpoint_recompute_of_a_later_unscoped_forward_runs_unmasked():
    scoped, explicit = converted_pair()
    points, masks, dy = batch(0)
    with mask_scope(*masks):
        scoped(points).backward(dy)
    explicit_forward(explicit, points, masks).backward(dy)
    # the layers' latest forward took no scoped mask: its recomputation outside a scope is right
    points, _, dy = batch(1)
    every = masks_of([N] * B)
    want = record(explicit, explicit_checkpointed(explicit, every, use_reentrant=False), points, dy)
    got = record(scoped, checkpointed(scoped, scoped.features, use_reentrant=False), points, dy)
    assert_same(got, want, exact=False)


# -- threads and asyncio tasks -----------------------------------------------------------------


def stateless_model() -> nn.Module:
    # batch statistics without running stats: concurrent calls share no state
    torch.manual_seed(0)
    return convert_batchnorm(PointNet(track_running_stats=False))


def test_threads_see_their_own_scopes():
    model = stateless_model()
    points = batch(0)[0]
    masks = [masks_of(LENGTHS[0]), masks_of(LENGTHS[1])]
    both_inside = threading.Barrier(2, timeout=30)
    results: dict[int, torch.Tensor] = {}

    def worker(i: int) -> None:
        with mask_scope(*masks[i]):
            both_inside.wait()  # each scope is entered before either thread runs the model
            results[i] = model(points)
            both_inside.wait()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert torch.equal(results[i], explicit_forward(model, points, masks[i])), i


def test_asyncio_tasks_see_their_own_scopes():
    model = stateless_model()
    points = batch(0)[0]
    masks = [masks_of(LENGTHS[0]), masks_of(LENGTHS[1])]

    async def task(i: int, both_inside: asyncio.Barrier) -> torch.Tensor:
        with mask_scope(*masks[i]):
            await both_inside.wait()  # the other task entered its scope meanwhile
            return model(points)

    async def main():
        both_inside = asyncio.Barrier(2)
        return await asyncio.gather(task(0, both_inside), task(1, both_inside))

    results = asyncio.run(main())
    for i in range(2):
        assert torch.equal(results[i], explicit_forward(model, points, masks[i])), i


# -- DDP with synchronized layers --------------------------------------------------------------

WORLD = 2


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)
        model = convert_batchnorm(nn.SyncBatchNorm.convert_sync_batchnorm(PointNet().double()))
        ddp = DistributedDataParallel(model)
        points, masks, dy = batch(0, torch.float64)
        mine = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        with mask_scope(*(m[mine] for m in masks)):
            got = record(ddp, ddp, points[mine], dy[mine])
        torch.save({k.replace("module.", "", 1): v for k, v in got.items()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_with_synchronized_layers_equals_the_unsharded_explicit_model(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    _, explicit = converted_pair(dtype=torch.float64)
    points, masks, dy = batch(0, torch.float64)
    want = record(explicit, by_hand(explicit, masks), points, dy)
    tol = {"rtol": 1e-12, "atol": 1e-12}
    for key in ("y", "dpoints"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), want[key], **tol, msg=key)
    for key in want:
        if key.startswith("grad "):
            # DDP averages the replicas' gradients; the unsharded loss is their sum
            for r in ranks:
                torch.testing.assert_close(r[key] * WORLD, want[key], **tol, msg=key)
        elif key not in ("y", "dpoints"):
            for r in ranks:
                torch.testing.assert_close(r[key], want[key], **tol, msg=key)


# -- the top-level README's section ------------------------------------------------------------


def test_readme_scope_example_runs():
    exec(compile(readme_example("torch_scope"), "README.md (torch_scope example)", "exec"), {})
