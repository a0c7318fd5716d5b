"""Running hetkd: the ServerApp, in-process simulations, the ``hetkd`` command line.

``from hetkd.simulations import run`` runs a config in this process on Flower's
Simulation Runtime; ``hetkd.simulations.server_app:app`` is the ServerApp that
``flwr run`` starts.
"""

import hetkd.core  # noqa: F401  (first: see hetkd.core)
from hetkd.simulations.runner import run

__all__ = ["run"]
