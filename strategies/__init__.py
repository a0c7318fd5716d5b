"""Server-side algorithms as Flower Message-API strategies.

Every class here is a :class:`flwr.serverapp.strategy.Strategy`: construct it
in any ``ServerApp`` and call ``strategy.start(grid=grid, ...)`` in place of
Flower's ``FedAvg``. With no arguments beyond what the data forces (the class
count, the public inputs) a strategy runs with the settings ``hetkd run
strategy=NAME`` resolves; ``SDDist.paper()`` gives the paper's. The devices
must run :data:`hetkd.clients.app.app` (or a ClientApp that answers the typed
requests of :mod:`hetkd.protocol`).

"""

from hetkd._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "hetkd.strategies.base": ("DeviceStrategy",),
    "hetkd.strategies.rounds": ("DeviceInfo", "Figures", "RoundPlan", "RoundReport",),
    "hetkd.strategies.ensemble_distill": ("EnsembleDistill", "EnsembleRound", "EnsembleTargets",),
    "hetkd.strategies.fedavg": ("FedAvg", "HeterogeneousModelsError",),
    "hetkd.strategies.feddf": ("FedDF",),
    "hetkd.strategies.fedmd": ("FedMD",),
    "hetkd.strategies.local_only": ("LocalOnly",),
    "hetkd.strategies.logit_exchange": ("LogitExchange",),
    "hetkd.strategies.mekd": ("MEKD",),
    "hetkd.strategies.metering": ("MeteredGrid", "payload_bytes",),
    "hetkd.strategies.sd_dist": ("SDDist",),
})
