"""A user's own model and data, written without hetkd (as in Flower's quickstart ``task.py``).

The data are scikit-learn's 8x8 digits (offline). The first ``REFERENCE_SIZE``
samples are the public reference set every device holds; the rest is split
evenly and at random over the devices, each keeping a fifth of its share to
test on.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 10
REFERENCE_SIZE = 200


class Net(nn.Module):
    """A small CNN for 1x8x8 images."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Linear(16 * width, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(bunch.target, dtype=torch.int64)


def load_public() -> torch.Tensor:
    """The public reference inputs (no labels): the same rows on every device."""
    x, _ = _digits()
    return x[:REFERENCE_SIZE]


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders of one device's share of the private data."""
    x, y = _digits()
    order = np.random.default_rng(42).permutation(np.arange(REFERENCE_SIZE, len(y)))
    part = np.array_split(order, num_partitions)[partition_id]
    cut = int(0.8 * len(part))
    train = TensorDataset(x[part[:cut]], y[part[:cut]])
    test = TensorDataset(x[part[cut:]], y[part[cut:]])
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(test, batch_size=batch_size)
