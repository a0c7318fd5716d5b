"""Where a node's device comes from, and how its state survives between messages.

A :class:`DeviceSource` opens a node's device — its model, its data and the
store of its learnt state. :class:`ZooDevices` builds it from hetkd's data and
model zoo, as the run config describes them; :func:`hetkd.clients.make_client_app`
from a model and data of the user's own. :func:`device_session` opens the
device with its stored state and saves it back afterwards.

The run config comes from the server's set-up request; without one (a
ServerApp of the user's own), a zoo device reads the run config Flower gives
it. Which device a node is (and, optionally, which model it holds and where
it keeps its state) comes from its node config, checked by
:func:`hetkd.clients.node_config.parse_node_config`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from flwr.app import Context

from hetkd.clients.device import DistillClient
from hetkd.clients.node_config import MODEL, NodeConfigError, parse_node_config
from hetkd.clients.state import DiskStateStore, StateStore, make_store
from hetkd.config import HetkdConfig, from_yaml, resolve_config
from hetkd.models import ModelError
from hetkd.training import TrainingUpdate, torch_threads

__all__ = ["CONFIG_STATE_KEY", "DeviceSource", "ZooDevices", "ZOO_DEVICES", "cached_config", "device_config",
           "device_id_of", "device_session", "device_state_dir"]

#: where a node keeps the run config the server sent at set-up
CONFIG_STATE_KEY = "hetkd.config"


def device_config(context: Context) -> HetkdConfig:
    """The run config this device was set up with (or Flower's run config)."""
    record = context.state.get(CONFIG_STATE_KEY)
    if record is not None:
        return cached_config(str(record["yaml"]))  # type: ignore[index]
    return resolve_config(overrides=dict(context.run_config))


_CONFIG_CACHE: dict[str, HetkdConfig] = {}


def cached_config(text: str) -> HetkdConfig:
    """The run config ``text`` (YAML) holds, parsed and validated once per process."""
    if text not in _CONFIG_CACHE:
        _CONFIG_CACHE.clear()
        _CONFIG_CACHE[text] = from_yaml(text)
    return _CONFIG_CACHE[text]


def device_id_of(context: Context, cfg: HetkdConfig) -> int:
    """The device's index, from the node config's ``partition-id`` (checked with the rest of it)."""
    return parse_node_config(context.node_config, cfg.simulation.num_devices).partition_id


def device_state_dir(cfg: HetkdConfig) -> Path:
    """Where the devices of a run with ``simulation.state_store=disk`` keep their state."""
    return Path(cfg.output.dir or cfg.output.root).expanduser() / "device-state"


class DeviceSource(Protocol):
    """Where a node's device comes from: its model, its data and its state store."""

    def open(self, context: Context) -> tuple[DistillClient, StateStore]:
        """This node's device, freshly initialised, and the store that holds its learnt state."""
        ...


class ZooDevices:
    """Devices from hetkd's data and model zoo, as the run config describes them.

    The node config's ``partition-id`` picks the device (its data partition and,
    through ``models.assignment``, its model); ``model`` replaces the
    architecture and ``state-dir`` keeps the state on disk there.
    """

    def open(self, context: Context) -> tuple[DistillClient, StateStore]:
        cfg = device_config(context)
        node = parse_node_config(context.node_config, cfg.simulation.num_devices)
        try:
            client = DistillClient.from_config(cfg, node.partition_id, architecture=node.model)
        except ModelError as err:
            if node.model is None:
                raise
            raise NodeConfigError(MODEL, f": {err}") from None
        if node.state_dir is not None:
            return client, DiskStateStore(node.state_dir, node.partition_id)
        return client, make_store(cfg.simulation.state_store, context, node.partition_id, device_state_dir(cfg))


ZOO_DEVICES = ZooDevices()


@contextmanager
def device_session(
    context: Context, devices: DeviceSource, save: bool = True, training: TrainingUpdate | None = None,
    server_round: int | None = None,
) -> Iterator[DistillClient]:
    """Open this node's device with its stored state, on its own thread count; save it back afterwards.

    ``training`` (a request's) updates the device's training settings for this
    message; ``server_round`` (a training request's) is the round the saved
    state belongs to. The thread count is the device's ``training.num_threads``,
    restored when the session ends, so a device served in the server's process
    (the in-process test grid) leaves the process as it found it.
    """
    client, store = devices.open(context)
    if training is not None:
        client.set_training(training.apply(client.training))
    with torch_threads(client.training.num_threads):
        state = store.load()
        if state is not None:
            client.load_state_dict(state)
        yield client
        if save:
            store.save(client.state_dict(), server_round)
