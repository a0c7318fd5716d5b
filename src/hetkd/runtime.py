"""How a run executes: devices, rounds, Ray's resources, where devices keep their state.

:class:`SimulationConfig` is the run config's ``simulation`` group. The
simulation runner (:mod:`hetkd.simulations.runner`) reads the Ray settings,
the strategies' round loop the round timeout, and the devices
(:mod:`hetkd.clients`) the population size and the state store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hetkd.settings import require, require_choice, require_types

__all__ = ["STATE_STORES", "SimulationConfig"]


STATE_STORES = ("auto", "context", "disk")


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """How many devices, how many rounds, and how Flower/Ray run them.

    ``cpus_per_device`` / ``gpus_per_device`` are Ray resources per simulated
    device: Ray runs ``min(CPUs / cpus_per_device, GPUs / gpus_per_device)``
    devices side by side per node, so ``cpus_per_device=0.5`` runs two per
    core and ``gpus_per_device=0.25`` four per GPU (set ``training.device``
    to ``auto`` or ``cuda`` then). ``ray_address`` connects to an existing
    Ray cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; empty:
    start a local one with ``ray_num_cpus`` CPUs, 0 = all, and an object
    store of ``ray_object_store_mb`` MiB, 0 = Ray's default).
    ``state_store`` keeps each device's weights and optimizer between rounds
    in Flower's ``Context.state`` (``context``: memory of the simulation
    process, N devices × model size) or on disk (``disk``, one atomically
    replaced file per device under the run's output folder, beside its state
    of the round before: memory for hundreds of devices, and what
    ``hetkd run --resume`` goes on from); ``auto`` is ``disk`` where the
    server and every device share the output folder (``hetkd run`` /
    ``compare`` on a local Ray) and ``context`` elsewhere (``flwr run``, a
    Ray cluster: :meth:`resolved_state_store`). A round waits at most ``round_timeout`` seconds for replies.
    A run stops, failed, after ``max_idle_rounds`` rounds in a row in which no
    device completed training (0: never early; a run in which no device ever
    trained fails at its end either way).
    """

    num_devices: int = 10
    num_rounds: int = 20
    cpus_per_device: float = 1.0
    gpus_per_device: float = 0.0
    ray_address: str = ""
    ray_num_cpus: int = 0
    ray_object_store_mb: int = 0
    state_store: str = "auto"
    round_timeout: float = 600.0
    max_idle_rounds: int = 3

    def __post_init__(self) -> None:
        require_types(self)
        require(self.num_devices >= 1, "num_devices", f"must be >= 1, got {self.num_devices}")
        require(self.num_rounds >= 1, "num_rounds", f"must be >= 1 (num-server-rounds), got {self.num_rounds}")
        require(self.cpus_per_device > 0, "cpus_per_device", f"must be > 0, got {self.cpus_per_device}")
        require(self.gpus_per_device >= 0, "gpus_per_device", f"must be >= 0, got {self.gpus_per_device}")
        require(self.gpus_per_device <= 1 or float(self.gpus_per_device).is_integer(), "gpus_per_device",
                f"must be a fraction <= 1 or a whole number of GPUs, got {self.gpus_per_device}")
        require(self.ray_address in ("", "auto")
                or re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", self.ray_address) is not None,
                "ray_address", f"must be empty (local Ray), 'auto', 'HOST:PORT' or 'ray://HOST:PORT', "
                f"got {self.ray_address!r}")
        for key in ("ray_num_cpus", "ray_object_store_mb"):
            require(getattr(self, key) >= 0, key, f"must be >= 0 (0: Ray's default), got {getattr(self, key)}")
            require(not self.ray_address or getattr(self, key) == 0, key,
                    "applies only to a local Ray instance; a cluster's nodes set their own resources "
                    "(ray start --num-cpus/--object-store-memory); leave it 0 with simulation.ray_address")
        require_choice(self.state_store, "state_store", STATE_STORES)
        require(self.round_timeout > 0, "round_timeout", f"must be > 0, got {self.round_timeout}")
        require(self.max_idle_rounds >= 0, "max_idle_rounds", f"must be >= 0 (0: never stop early), got {self.max_idle_rounds}")

    def resolved_state_store(self, shared_output: bool) -> str:
        """``state_store`` with ``auto`` resolved: ``disk`` when the server and every device share the
        output folder (``shared_output``: an in-process run on a local Ray), ``context`` otherwise."""
        if self.state_store != "auto":
            return self.state_store
        return "disk" if shared_output and not self.ray_address else "context"
