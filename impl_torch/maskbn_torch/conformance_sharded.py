"""The harness's synchronized layer for torch: k gloo processes, one MaskedBatchNorm replica each.

Each replica holds a layer built by the adapter's replica builder (a
``MaskedBatchNorm(process_group=WORLD)``) in its own process and sees
only its shard; the statistics travel through torch.distributed's all_reduce, exactly as
in a real multi-process job. Spawning k processes that import torch costs seconds, so the
worker pools (one per k) live for the whole harness run and each layer only rebuilds its
replicas; daemon workers end with the harness process.
"""

from __future__ import annotations

import atexit
import datetime
import multiprocessing
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from maskbn_conformance.adapter import Layer, LayerConfig, Output, ShardedGradients, ShardedLayer

#: builds one replica's Layer from (config, process group); a module-level function,
#: so it pickles by name into the worker processes
ReplicaBuilder = Callable[[LayerConfig, Any], Layer]

#: seconds a collective may wait for a replica; the parent waits a little longer
_COLLECTIVE_TIMEOUT_S = 60
_REPLY_TIMEOUT_S = _COLLECTIVE_TIMEOUT_S + 30


def _worker(rank: int, world: int, init_file: str, conn: Any) -> None:
    """One replica's command loop: build/drop a layer, call its Layer methods."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # k replicas share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT_S),
    )
    layer = None
    try:
        while True:
            command, args = conn.recv()
            if command == "exit":
                break
            try:
                if command == "build":
                    build, config = args
                    layer = build(config, dist.group.WORLD)
                    result = None
                elif command == "drop":
                    layer, result = None, None
                else:
                    result = getattr(layer, command)(*args)
                conn.send(("ok", result))
            except Exception as exc:  # handed to the harness, which judges it
                try:
                    pickle.dumps(exc)
                except Exception:  # an unpicklable error still reports its text
                    exc = RuntimeError(f"{type(exc).__name__}: {exc}")
                conn.send(("error", exc))
    finally:
        dist.destroy_process_group()


class _Pool:
    """k replica processes in one gloo world."""

    def __init__(self, world: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory(prefix="maskbn-torch-gloo-")
        init_file = str(Path(self._tmp.name) / "init")
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = context.Pipe()
            proc = context.Process(target=_worker, args=(rank, world, init_file, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def call(self, command: str, per_rank: list[tuple]) -> list[Any]:
        """Send a command to every replica at once (collectives need all), gather the replies."""
        for conn, args in zip(self.conns, per_rank):
            conn.send((command, args))
        replies = []
        for rank, conn in enumerate(self.conns):
            if not conn.poll(_REPLY_TIMEOUT_S):
                raise TimeoutError(f"replica {rank} did not answer {command!r} within {_REPLY_TIMEOUT_S} s")
            replies.append(conn.recv())
        errors = [value for status, value in replies if status == "error"]
        if errors:
            raise errors[0]
        return [value for _, value in replies]

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                conn.send(("exit", None))
        for proc in self.procs:
            proc.join(timeout=10)
        self._tmp.cleanup()


_POOLS: dict[int, _Pool] = {}


def _pool(world: int) -> _Pool:
    if world not in _POOLS:
        _POOLS[world] = _Pool(world)
    return _POOLS[world]


@atexit.register
def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()


class TorchShardedLayer(ShardedLayer):
    """The adapter protocol's ShardedLayer over a pool of replica processes."""

    def __init__(self, build: ReplicaBuilder, config: LayerConfig, num_shards: int) -> None:
        self._pool = _pool(num_shards)
        self._k = num_shards
        self._pool.call("build", [(build, config)] * num_shards)

    def forward(
        self, xs: list[np.ndarray], x_dtype: str, masks: list[np.ndarray | None], training: bool
    ) -> list[Output]:
        return self._pool.call("forward", [(x, x_dtype, m, training) for x, m in zip(xs, masks)])

    def forward_backward(
        self, xs: list[np.ndarray], x_dtype: str, masks: list[np.ndarray | None], dys: list[np.ndarray]
    ) -> tuple[list[Output], ShardedGradients]:
        replies = self._pool.call("forward_backward", [(x, x_dtype, m, dy) for x, m, dy in zip(xs, masks, dys)])
        return [out for out, _ in replies], ShardedGradients.of_replicas([g for _, g in replies])

    def get_state(self) -> dict[str, np.ndarray]:
        # replicated: every replica applies the same all-reduced statistics
        return self._pool.call("get_state", [()] * self._k)[0]

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        self._pool.call("set_state", [(state,)] * self._k)

    def close(self) -> None:
        self._pool.call("drop", [()] * self._k)
