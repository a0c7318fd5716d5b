"""Server-side algorithms as Flower Message-API strategies.

Every class here is a :class:`flwr.serverapp.strategy.Strategy`: construct it
in any ``ServerApp`` and call ``strategy.start(grid=grid, ...)`` in place of
Flower's ``FedAvg``. The devices must run :data:`hetkd.clients.app.app` (or
a ClientApp that answers the same actions).
"""

import hetkd.core  # noqa: F401  (first: see hetkd.core)
from hetkd.strategies.base import DeviceInfo, DeviceStrategy, MeteredGrid, RoundReport, payload_bytes
from hetkd.strategies.ensemble_distill import EnsembleDistill
from hetkd.strategies.fedavg import FedAvg, HeterogeneousModelsError
from hetkd.strategies.feddf import FedDF
from hetkd.strategies.fedmd import FedMD
from hetkd.strategies.local_only import LocalOnly
from hetkd.strategies.logit_exchange import LogitExchange
from hetkd.strategies.mekd import MEKD
from hetkd.strategies.sd_dist import SDDist

__all__ = [
    "DeviceInfo",
    "DeviceStrategy",
    "EnsembleDistill",
    "FedAvg",
    "FedDF",
    "FedMD",
    "HeterogeneousModelsError",
    "LocalOnly",
    "LogitExchange",
    "MEKD",
    "MeteredGrid",
    "RoundReport",
    "SDDist",
    "payload_bytes",
]
