"""Server-side algorithms as Flower Message-API strategies.

Every class here is a :class:`flwr.serverapp.strategy.Strategy`: construct it
in any ``ServerApp`` and call ``strategy.start(grid=grid, ...)`` in place of
Flower's ``FedAvg``. The devices must run :data:`hetkd.clients.app.app` (or
a ClientApp that answers the same actions).
"""

from hetkd.strategies.base import DeviceInfo, DeviceStrategy, MeteredGrid, RoundReport, payload_bytes
from hetkd.strategies.fedavg import FedAvg, HeterogeneousModelsError
from hetkd.strategies.local_only import LocalOnly

__all__ = [
    "DeviceInfo",
    "DeviceStrategy",
    "FedAvg",
    "HeterogeneousModelsError",
    "LocalOnly",
    "MeteredGrid",
    "RoundReport",
    "payload_bytes",
]
