"""The hetkd ``ClientApp``: routes Flower messages to a device's handlers.

:data:`app` serves devices built from hetkd's data and model zoo, as the run
config describes them (:class:`~hetkd.clients.session.ZooDevices`);
:func:`hetkd.clients.make_client_app` serves a model and data of the user's
own. Both come from :func:`build_client_app`, which wires any
:class:`~hetkd.clients.session.DeviceSource` to every handler of
:mod:`hetkd.clients.handlers` — one per request type of :mod:`hetkd.protocol`.
"""

from __future__ import annotations

import functools

from flwr.app import MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import DEFAULT_ACTION

from hetkd.clients.handlers import HANDLERS
from hetkd.clients.session import ZOO_DEVICES, DeviceSource

__all__ = ["app", "build_client_app"]


def build_client_app(devices: DeviceSource) -> ClientApp:
    """A ``ClientApp`` answering every hetkd action with the devices ``devices`` opens."""
    client_app = ClientApp()
    for message_type, handler in HANDLERS.items():
        category, _, action = message_type.partition(".")
        if category not in (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY):
            raise ValueError(f"message type {message_type!r} is not train, evaluate or query")
        getattr(client_app, category)(action or DEFAULT_ACTION)(functools.partial(handler, devices=devices))
    return client_app


#: the hetkd ClientApp: devices from the data and model zoo the run config names
app = build_client_app(ZOO_DEVICES)
