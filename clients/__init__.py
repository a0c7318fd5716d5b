"""Devices: :class:`DistillClient` (one device's model, data and optimizer), the
state stores that keep it between rounds, and the Flower ``ClientApp`` that
routes messages to it (:data:`hetkd.clients.app.app`)."""

from hetkd.clients.device import DistillClient
from hetkd.clients.state import ContextStateStore, DiskStateStore, StateStore

__all__ = ["DistillClient", "StateStore", "ContextStateStore", "DiskStateStore"]
