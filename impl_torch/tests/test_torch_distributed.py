"""process_group: k gloo processes with uneven (and empty) shards get the unsharded batch's statistics."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch_helpers import prefix_mask

from maskbn_torch import MaskedBatchNorm, convert_batchnorm

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

SHARDS = [2, 1, 1]  # batch items per rank; rank 1's item has no real position
STEPS = [
    # (lengths of the 4 items, training); the all-empty step must take the inference path everywhere
    ([6, 2, 0, 3], True),
    ([1, 6, 0, 5], True),
    ([0, 0, 0, 0], True),
    ([6, 3, 2, 1], False),
]


def _data(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64) * 2 + 1
    dy = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64)
    return x, prefix_mask(4, 6, STEPS[step][0]), dy


def _run(layer: MaskedBatchNorm, items: slice) -> list[dict[str, torch.Tensor]]:
    """Every step on the given batch items: outputs, gradients and state after each."""
    records = []
    for step, (_, training) in enumerate(STEPS):
        x, mask, dy = _data(step)
        x = x[items].clone().requires_grad_()
        layer.train(training)
        layer.zero_grad()
        y = layer(x, mask[items])
        y.backward(dy[items])
        records.append(
            {
                "y": y.detach(),
                "dx": x.grad,
                "dweight": layer.weight.grad.clone(),
                "dbias": layer.bias.grad.clone(),
                **{k: v.clone() for k, v in layer.state_dict().items()},
            }
        )
    return records


def _layer(**kwargs) -> MaskedBatchNorm:
    layer = MaskedBatchNorm(3, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    return layer


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        start = sum(SHARDS[:rank])
        records = _run(_layer(process_group=dist.group.WORLD), slice(start, start + SHARDS[rank]))
        # a SyncBatchNorm's default group (None) converts to the initialized world
        converted = convert_batchnorm(nn.Sequential(nn.SyncBatchNorm(3)))[0]
        torch.save(
            {"records": records, "converted_group_is_world": converted.process_group is dist.group.WORLD},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_sharded_training_equals_the_unsharded_batch(tmp_path):
    mp.spawn(_worker, args=(len(SHARDS), str(tmp_path / "init"), str(tmp_path)), nprocs=len(SHARDS), join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(SHARDS))]
    assert all(s["converted_group_is_world"] for s in saved)
    shards = [s["records"] for s in saved]
    whole = _run(_layer(), slice(None))
    tol = {"rtol": 1e-12, "atol": 1e-12}
    for step, want in enumerate(whole):
        got = [records[step] for records in shards]
        for key in ("y", "dx"):
            torch.testing.assert_close(torch.cat([g[key] for g in got]), want[key], **tol, msg=f"step {step} {key}")
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            for rank, g in enumerate(got):
                torch.testing.assert_close(g[key], want[key], **tol, msg=f"step {step} rank {rank} {key}")
        # weight/bias gradients stay per replica (DDP reduces them): their sum is the whole batch's
        for key in ("dweight", "dbias"):
            torch.testing.assert_close(sum(g[key] for g in got), want[key], **tol, msg=f"step {step} {key}")
    assert shards[0][2]["num_batches_tracked"].item() == 2  # the all-empty step counted nowhere
