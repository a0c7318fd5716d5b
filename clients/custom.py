"""Bring your own model and data: any PyTorch model and data as a hetkd device.

:func:`make_client_app` turns two functions you already have — one that
builds your ``torch.nn.Module`` and one that loads a node's data — into a
Flower ``ClientApp`` that answers every hetkd action (SD-Dist, FedMD, FedDF,
MEKD, local-only and the FedAvg baseline), without hetkd's dataset
registry or model zoo::

    from hetkd.clients import DeviceDataset, make_client_app

    def model_fn(context):
        return Net()                                 # your model: inputs -> logits

    def data_fn(context):
        pid = int(context.node_config["partition-id"])
        train, test = load_partition(pid)            # DataLoaders, Datasets or (x, y) tensors
        return DeviceDataset(train=train, test=test, reference=public_inputs)

    app = make_client_app(model_fn, data_fn, num_classes=10)

What each device needs: its private ``train`` and ``test`` data; for the
logit-exchange strategies (SD-Dist, FedMD) and FedDF, the public
``reference`` inputs, the same rows in the same order on every device (labels
optional, never trained on); optionally a ``global_test`` set every device
also evaluates on. Data are read into memory once per message (in deployment
every message runs in a fresh process), as float32 inputs and int64 labels.

A node's ``partition-id`` node config is its device id (checked, with the
other keys, by :func:`hetkd.clients.node_config.parse_node_config`; keys of
your own are allowed). Its weights and optimizer state stay on the node, in
Flower's ``Context.state`` or, with ``state-dir`` in the node config, on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hetkd.clients.app import build_client_app
from hetkd.clients.device import DistillClient
from hetkd.clients.node_config import parse_node_config
from hetkd.clients.state import ContextStateStore, DiskStateStore, StateStore
from hetkd.data import ArrayDataset, DataView, DeviceData
from hetkd.privacy import PrivacySettings
from hetkd.training import TrainingConfig, TrainingUpdate, seeded

__all__ = ["DataLike", "DeviceDataset", "OwnDevices", "make_client_app", "to_array_dataset"]

#: a ``DataLoader``, a map-style ``Dataset`` of ``(input, label)``, or an ``(inputs, labels)`` pair
DataLike = Union[DataLoader, Dataset, tuple, list]


@dataclass(frozen=True)
class DeviceDataset:
    """One device's data, as :func:`make_client_app`'s ``data_fn`` returns it.

    ``train`` / ``test``: the device's private data. ``reference``: the
    public inputs every device holds (a tensor of inputs, or labelled data
    like the others), needed by SD-Dist, FedMD and FedDF. ``global_test``:
    a held-out set every device evaluates on (optional). ``batch_keys``
    names the input and label entries when batches are dicts (e.g.
    ``("img", "label")`` for Hugging Face datasets).
    """

    train: Any
    test: Any
    reference: Any = None
    global_test: Any = None
    batch_keys: tuple[str, str] | None = field(default=None)


def _batch_pair(batch: Any, keys: tuple[str, str] | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        if keys is None:
            raise ValueError(
                f"'{name}' yields dict batches with keys {sorted(batch)}; say which are the input and the label "
                "with DeviceDataset(batch_keys=(INPUT_KEY, LABEL_KEY))"
            )
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"'{name}': batches lack key(s) {missing} (batch_keys); they have {sorted(batch)}")
        return torch.as_tensor(batch[keys[0]]), torch.as_tensor(batch[keys[1]])
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
    raise ValueError(f"'{name}' must yield (input, label) pairs, got a {type(batch).__name__}")


def _tensors(data: Any, keys: tuple[str, str] | None, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs and labels (``None`` for bare inputs) held by ``data``."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(data), None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(d, (torch.Tensor, np.ndarray)) for d in data
    ):
        return torch.as_tensor(data[0]), torch.as_tensor(data[1])
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=256, shuffle=False)
    if isinstance(data, Iterable):
        xs, ys = [], []
        for batch in data:
            x, y = _batch_pair(batch, keys, name)
            xs.append(x)
            ys.append(y.reshape(-1))
        if not xs:
            raise ValueError(f"'{name}' holds no samples")
        return torch.cat(xs), torch.cat(ys)
    raise ValueError(
        f"'{name}' must be a DataLoader, a Dataset of (input, label), an (inputs, labels) pair of tensors "
        f"or a tensor of inputs; got {type(data).__name__}"
    )


def to_array_dataset(data: Any, num_classes: int, name: str, batch_keys: tuple[str, str] | None = None,
                     labelled: bool = True) -> ArrayDataset:
    """Read ``data`` (see :data:`DataLike`) into an in-memory :class:`~hetkd.data.ArrayDataset`.

    Labels must lie in ``0..num_classes-1``. With ``labelled=False`` bare
    inputs are accepted (labels are then recorded as 0 and never read).
    """
    x, y = _tensors(data, batch_keys, name)
    if y is None:
        if labelled:
            raise ValueError(f"'{name}' needs labels: give (inputs, labels), a Dataset or a DataLoader")
        y = torch.zeros(len(x), dtype=torch.int64)
    if len(x) != len(y):
        raise ValueError(f"'{name}' has {len(x)} inputs but {len(y)} labels")
    if not torch.is_floating_point(x):
        x = x.float()
    y = y.to(torch.int64)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"'{name}' has labels outside 0..{num_classes - 1} (num_classes={num_classes})")
    return ArrayDataset(name, x.to(torch.float32).numpy(), y.numpy(), num_classes)


def _view(dataset: ArrayDataset) -> DataView:
    return dataset.view(np.arange(len(dataset)))


class OwnDevices:
    """A :class:`~hetkd.clients.session.DeviceSource` built from a user's ``model_fn`` and ``data_fn``."""

    def __init__(
        self,
        model_fn: Callable[[Context], nn.Module],
        data_fn: Callable[[Context], DeviceDataset],
        num_classes: int,
        training: TrainingConfig | None = None,
        seed: int = 0,
        state_dir: str | Path | None = None,
        privacy: PrivacySettings | None = None,
        private_model_fn: Callable[[Context], nn.Module] | None = None,
    ) -> None:
        if not callable(model_fn):
            raise TypeError(f"model_fn must be callable (context -> torch.nn.Module), got {type(model_fn).__name__}")
        if not callable(data_fn):
            raise TypeError(f"data_fn must be callable (context -> DeviceDataset), got {type(data_fn).__name__}")
        if private_model_fn is not None and not callable(private_model_fn):
            raise TypeError("private_model_fn must be callable (context -> torch.nn.Module) or None, "
                            f"got {type(private_model_fn).__name__}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.model_fn = model_fn
        self.data_fn = data_fn
        self.num_classes = num_classes
        self.training = training if training is not None else TrainingConfig()
        self.seed = seed
        self.state_dir = Path(state_dir).expanduser() if state_dir is not None else None
        self.privacy = privacy
        self.private_model_fn = private_model_fn

    def training_for(self, context: Context) -> TrainingConfig:
        """The device's training settings: ``make_client_app``'s, with the run config's ``lr``,
        ``local-epochs`` and ``batch-size`` (Flower's template keys) over them."""
        update, _ = TrainingUpdate.from_flower(context.run_config)
        return update.apply(self.training) if update is not None else self.training

    def open(self, context: Context) -> tuple[DistillClient, StateStore]:
        node = parse_node_config(context.node_config, strict=False)
        device_id = node.partition_id
        data = self.data_fn(context)
        if not isinstance(data, DeviceDataset):
            raise TypeError(f"data_fn must return a hetkd.clients.DeviceDataset, got {type(data).__name__}")
        keys, c = data.batch_keys, self.num_classes
        train = to_array_dataset(data.train, c, "train", keys)
        test = to_array_dataset(data.test, c, "test", keys)
        reference = (
            _view(to_array_dataset(data.reference, c, "reference", keys, labelled=False))
            if data.reference is not None else None
        )
        if data.global_test is not None:
            global_test = _view(to_array_dataset(data.global_test, c, "global_test", keys))
        else:  # none: devices report personalised accuracy only
            global_test = _view(ArrayDataset("global_test", train.raw[:0], train.labels[:0], c))
        with seeded(self.seed, "init", device_id):  # the same initial weights for a node's every message
            model = self.model_fn(context)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
        private_init = None
        if self.private_model_fn is not None:
            with seeded(self.seed, "init-private", device_id):
                private_init = self.private_model_fn(context)
            if not isinstance(private_init, nn.Module):
                raise TypeError(f"private_model_fn must return a torch.nn.Module, got {type(private_init).__name__}")
        client = DistillClient(
            device_id=device_id,
            architecture=type(model).__name__,
            model=model,
            data=DeviceData(device_id, _view(train), _view(test)),
            global_test=global_test,
            training=self.training_for(context),
            seed=self.seed,
            reference=reference,
            privacy=self.privacy,
            planned_rounds=int(context.run_config.get("num-server-rounds", 0)),  # Flower's template key
            private_model_init=private_init,
        )
        state_dir = node.state_dir or self.state_dir
        store: StateStore = DiskStateStore(state_dir, device_id) if state_dir is not None else ContextStateStore(context)
        return client, store


def make_client_app(
    model_fn: Callable[[Context], nn.Module],
    data_fn: Callable[[Context], DeviceDataset],
    *,
    num_classes: int,
    training: TrainingConfig | None = None,
    seed: int = 0,
    state_dir: str | Path | None = None,
    privacy: PrivacySettings | None = None,
    private_model_fn: Callable[[Context], nn.Module] | None = None,
) -> ClientApp:
    """A Flower ``ClientApp`` whose devices hold your model and your data.

    Parameters
    ----------
    model_fn : Callable[[Context], nn.Module]
        Builds the node's model (any module mapping a batch of inputs to
        ``num_classes`` logits). Called with the same seed for every message,
        so a node's model starts from the same weights; its learnt state is
        then restored from the node's store.
    data_fn : Callable[[Context], DeviceDataset]
        Loads the node's data (``context.node_config["partition-id"]`` says
        which device it is).
    num_classes : int
        Number of classes; every device and the server must agree on it.
    training : TrainingConfig | None
        Local optimisation (epochs, batch size, optimizer, learning rate);
        default :class:`hetkd.training.TrainingConfig`'s. These are defaults:
        the run config's ``lr``, ``local-epochs`` and ``batch-size`` (the keys
        of Flower's templates) replace them, and the ServerApp's
        ``train_config`` entries of those names replace both.
    seed : int
        Seeds initial weights, shuffling and dropout, per device and round.
    state_dir : str | Path | None
        Keep every device's model and optimizer on disk, in
        ``state_dir/device-<partition-id>.pt`` (a node config ``state-dir``
        wins), instead of Flower's ``Context.state``: the personalised models
        then outlive the run, and ``hetkd.clients.DiskStateStore(state_dir,
        device_id).load()["model"]`` reads one back.
    privacy : PrivacySettings | None
        With ``enabled``, every device trains with DP-SGD and reports its ε
        (:mod:`hetkd.privacy`); a model DP-SGD cannot train is refused at
        set-up naming its layers. ``target_epsilon`` plans over the run
        config's ``num-server-rounds``.
    private_model_fn : Callable[[Context], nn.Module] | None
        Builds the node's private answer model, when the strategy asks devices
        to answer with one (``answer_model="private"``): a model that trains on
        the private data alone, of any architecture (under DP a small one, such
        as a linear model, learns most for its ε). None: a copy of the node's
        model, forked when it first distils.
    """
    return build_client_app(OwnDevices(model_fn, data_fn, num_classes, training, seed, state_dir, privacy,
                                       private_model_fn))
