"""Point-cloud classification in PyTorch: masked batch norm against stock nn.BatchNorm1d.

    python examples/torch_pointcloud.py [--steps 300]

Same model, data, seed and optimizer twice; only the norm layer differs. The stock
layer sees the zero padding as points; MaskedBatchNorm takes its statistics from
the real points only.
"""

from __future__ import annotations

import torch
from pointclouds import FEATURES, NUM_CLASSES, bucketed_batches, compare, eval_batches, make_clouds
from torch import nn

from maskbn_torch import MaskedBatchNorm


class PointClassifier(nn.Module):
    """Per-point MLP with batch norm, masked max pooling over the real points, linear classifier."""

    def __init__(self, masked: bool, width: int = 64) -> None:
        super().__init__()
        self.masked = masked
        self.layers = nn.ModuleList([nn.Linear(FEATURES, width), nn.Linear(width, width)])
        norm = (lambda: MaskedBatchNorm(width, channel_axis=-1)) if masked else (lambda: nn.BatchNorm1d(width))
        self.norms = nn.ModuleList([norm(), norm()])
        self.head = nn.Linear(width, NUM_CLASSES)

    def forward(self, points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = points
        for layer, norm in zip(self.layers, self.norms):
            h = layer(h)
            if self.masked:
                h = norm(h, mask=mask)
            else:  # stock BN over every point of the padded batch, padding included
                h = norm(h.reshape(-1, h.shape[-1])).reshape(h.shape)
            h = torch.relu(h)
        pooled = h.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
        return self.head(pooled)


def train_and_evaluate(masked: bool, steps: int, batch_size: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = PointClassifier(masked)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = bucketed_batches(make_clouds(2048, seed=1), batch_size, seed=seed)
    model.train()
    for _ in range(steps):
        points, mask, labels = (torch.as_tensor(a) for a in next(batches))
        loss = nn.functional.cross_entropy(model(points, mask), labels.long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for points, mask, labels in eval_batches(make_clouds(1024, seed=2), batch_size):
            predicted = model(torch.as_tensor(points), torch.as_tensor(mask)).argmax(dim=1)
            correct += int((predicted == torch.as_tensor(labels)).sum())
            total += len(labels)
    return correct / total


if __name__ == "__main__":
    compare(
        __doc__.splitlines()[0], train_and_evaluate, "maskbn_torch.MaskedBatchNorm", "torch.nn.BatchNorm1d (unmasked)"
    )
