"""Devices: :class:`DistillClient` (one device's model, data and optimizer), the
state stores that keep it between rounds, and the Flower ``ClientApp`` that
routes messages to it (:data:`hetkd.clients.app.app`, devices from hetkd's
data and model zoo; :func:`make_client_app`, devices from a model and data of
your own). A node's ``--node-config`` keys are checked by
:func:`parse_node_config`."""

import hetkd.core  # noqa: F401  (first: see hetkd.core)
from hetkd.clients.custom import DeviceDataset, make_client_app
from hetkd.clients.device import DistillClient
from hetkd.clients.node_config import NodeConfig, NodeConfigError, parse_node_config
from hetkd.clients.state import ContextStateStore, DiskStateStore, StateStore

__all__ = [
    "DistillClient",
    "StateStore",
    "ContextStateStore",
    "DiskStateStore",
    "DeviceDataset",
    "make_client_app",
    "NodeConfig",
    "NodeConfigError",
    "parse_node_config",
]
