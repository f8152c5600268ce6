"""The padded point-cloud task every example trains on (NumPy only, no framework).

Synthetic clouds of four shapes (sphere, cube surface, cylinder, cone), each
stretched per axis, shifted, and sampled with 16 to 256 points, then zero padded
to 256 points: the static shape a batched pipeline feeds a model. Batches are
length-bucketed (clouds of similar size together), which is what a
throughput-minded pipeline does and where unmasked batch norm suffers most: a
batch of small clouds is mostly padding, so its statistics are mostly zeros, while
a batch of large clouds has almost none, and inference's moving statistics match
neither.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_POINTS = 256
MIN_POINTS = 16
NUM_CLASSES = 4
FEATURES = 3


def _shape_points(kind: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == 0:  # sphere surface
        p = rng.normal(size=(n, 3))
        p /= np.linalg.norm(p, axis=1, keepdims=True)
    elif kind == 1:  # cube surface: one coordinate pushed to a face
        p = rng.uniform(-1.0, 1.0, size=(n, 3))
        face = rng.integers(0, 3, size=n)
        p[np.arange(n), face] = rng.choice([-1.0, 1.0], size=n)
    elif kind == 2:  # cylinder side
        angle = rng.uniform(0.0, 2 * np.pi, size=n)
        p = np.stack([np.cos(angle), np.sin(angle), rng.uniform(-1.0, 1.0, size=n)], axis=1)
    else:  # cone side, apex up
        angle = rng.uniform(0.0, 2 * np.pi, size=n)
        h = rng.uniform(0.0, 1.0, size=n)
        p = np.stack([(1 - h) * np.cos(angle), (1 - h) * np.sin(angle), 2 * h - 1], axis=1)
    stretch = rng.uniform(0.6, 1.4, size=3)
    shift = rng.normal(scale=0.3, size=3)
    return p * stretch + shift + rng.normal(scale=0.03, size=(n, 3))


@dataclass
class Clouds:
    """``points`` (N, MAX_POINTS, 3) zero padded, ``mask`` (N, MAX_POINTS) bool, ``labels`` (N,)."""

    points: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


def make_clouds(count: int, seed: int) -> Clouds:
    rng = np.random.default_rng(seed)
    points = np.zeros((count, MAX_POINTS, FEATURES), np.float32)
    mask = np.zeros((count, MAX_POINTS), bool)
    labels = rng.integers(0, NUM_CLASSES, size=count)
    sizes = rng.integers(MIN_POINTS, MAX_POINTS + 1, size=count)
    for i, (kind, n) in enumerate(zip(labels, sizes)):
        points[i, :n] = _shape_points(int(kind), int(n), rng)
        mask[i, :n] = True
    return Clouds(points, mask, labels.astype(np.int32))


def bucketed_batches(clouds: Clouds, batch_size: int, seed: int):
    """Endless length-bucketed batches: clouds sorted by size, cut into batches, batches shuffled."""
    rng = np.random.default_rng(seed)
    order = np.argsort(clouds.mask.sum(axis=1), kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    while True:
        for b in rng.permutation(len(batches)):
            idx = batches[b]
            yield clouds.points[idx], clouds.mask[idx], clouds.labels[idx]


def eval_batches(clouds: Clouds, batch_size: int):
    """The evaluation set in order, in batches of ``batch_size`` (inference uses the moving stats)."""
    for i in range(0, len(clouds.labels), batch_size):
        yield clouds.points[i : i + batch_size], clouds.mask[i : i + batch_size], clouds.labels[i : i + batch_size]


def report(name: str, accuracy: float, seconds: float) -> None:
    print(f"{name:<34} eval accuracy {accuracy:.3f}  ({seconds:.1f}s)", flush=True)


def compare(
    description: str, train_and_evaluate: Callable[[bool, int, int, int], float], masked: str, stock: str
) -> None:
    """The command line every example shares: train the masked and the stock model, print both accuracies."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=300, help="training steps per model (default 300)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for use_mask, name in [(True, masked), (False, stock)]:
        t0 = time.perf_counter()
        accuracy = train_and_evaluate(use_mask, args.steps, args.batch_size, args.seed)
        report(name, accuracy, time.perf_counter() - t0)
