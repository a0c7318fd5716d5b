"""Your own model and data as hetkd devices: ``make_client_app(model_fn, data_fn)``.

Every node builds ``Net`` of width ``16 * (1 + partition-id % 3)``, so the
federation holds three different models; knowledge moves between them by
distillation on the public reference set.
"""

from __future__ import annotations

from flwr.app import Context
from torch import nn

from hetkd.clients import DeviceDataset, make_client_app
from hetkd.simulations.examples.task import NUM_CLASSES, Net, load_data, load_public
from hetkd.training import TrainingConfig


def model_fn(context: Context) -> nn.Module:
    """This node's model: heterogeneous widths across the federation."""
    return Net(width=16 * (1 + int(context.node_config["partition-id"]) % 3))


def data_fn(context: Context) -> DeviceDataset:
    """This node's private data and the public reference inputs."""
    train, test = load_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    return DeviceDataset(train=train, test=test, reference=load_public())


app = make_client_app(model_fn, data_fn, num_classes=NUM_CLASSES, training=TrainingConfig(local_epochs=2, lr=0.05))
