"""Running hetkd: the ServerApp, in-process simulations, the ``hetkd`` command line.

``from hetkd.simulations import run`` runs a config in this process on Flower's
Simulation Runtime; ``hetkd.simulations.server_app:app`` is the ServerApp that
``flwr run`` starts.

"""

from hetkd._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "hetkd.simulations.runner": ("run",),
})
