"""Running an experiment in-process on Flower's Simulation Runtime (Ray).

:func:`run` is what ``hetkd run``, the tests and the benchmarks use: the same
ServerApp and ClientApp as ``flwr run``, driven by
:func:`flwr.simulation.run_simulation` in this process, with the config
checked before Ray starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from hetkd.config import HetkdConfig
from hetkd.interrupt import stop_on_signals
from hetkd.simulations.experiment import prepare
from hetkd.simulations.registry import CENTRAL
from hetkd.simulations.server_app import make_server_app

__all__ = ["run", "backend_config", "ray_environment", "start_ray", "WORKER_NICENESS"]

#: Ray's setting for its workers' scheduling priority (Ray's default: 15, lower than the driver)
WORKER_NICENESS = "RAY_worker_niceness"
#: keep accelerator variables (CUDA_VISIBLE_DEVICES) as they are in actors that ask for no GPU
ACCELERATOR_OVERRIDE = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"


def backend_config(cfg: HetkdConfig) -> dict[str, Any]:
    """Flower/Ray backend settings from ``simulation.*``."""
    sim = cfg.simulation
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    else:
        if sim.ray_num_cpus:
            init_args["num_cpus"] = sim.ray_num_cpus
        if sim.ray_object_store_mb:
            init_args["object_store_memory"] = sim.ray_object_store_mb * 1024 * 1024
    return {
        "client_resources": {"num_cpus": sim.cpus_per_device, "num_gpus": sim.gpus_per_device},
        "init_args": init_args,
    }


@contextlib.contextmanager
def ray_environment(cfg: HetkdConfig) -> Iterator[None]:
    """The environment in which this process starts (or joins) Ray for ``cfg``, put back after.

    Every place that starts Ray in this process (:func:`run`, ``hetkd compare``)
    goes through here. Ray starts its workers at nice 15, so on a busy machine
    they get a fraction of the CPU the driver gets (``hetkd bench`` measured
    local training 2-3x slower in the workers than in a plain loop): a local
    Ray runs them at the driver's priority unless ``RAY_worker_niceness`` is
    set. Flower's Ray backend writes this process's ``sys.path`` into
    ``PYTHONPATH`` for its workers; the caller's value is restored, so later
    subprocesses are unaffected.
    """
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", WORKER_NICENESS, ACCELERATOR_OVERRIDE)}
    os.environ.setdefault(ACCELERATOR_OVERRIDE, "0")
    if not cfg.simulation.ray_address:
        os.environ.setdefault(WORKER_NICENESS, "0")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_ray(cfg: HetkdConfig) -> bool:
    """Start (or join, with ``simulation.ray_address``) Ray for ``cfg`` unless it runs; say whether it was started.

    Flower's Ray backend would start it too, but ``ray.init`` replaces the
    process's SIGTERM handler: started here first, the run's own handler
    (:func:`hetkd.interrupt.stop_on_signals`) is the one that stays.
    """
    import ray

    if ray.is_initialized():
        return False
    ray.init(**backend_config(cfg)["init_args"], include_dashboard=False)
    return True


class _DropDeprecationNotice(logging.Filter):
    """Hide Flower's notice that ``run_simulation`` is deprecated: we use it on purpose
    (it is the in-process Simulation Runtime; ``flwr run`` drives the same apps)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def run(cfg: HetkdConfig, verbose: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` to the end; return its summary (also in ``<out>/summary.json``).

    Raises before any device starts if the config cannot run; re-raises what
    the ServerApp raised. SIGINT / SIGTERM stop the run after its last
    completed round (:mod:`hetkd.interrupt`): the devices are stopped, the
    rounds done are kept in ``<out>`` and :class:`~hetkd.interrupt.RunInterrupted` is raised.
    ``resume`` goes on with the interrupted run in ``output.dir`` from its last
    completed round (:mod:`hetkd.simulations.checkpoint`).
    """
    if cfg.strategy.name == CENTRAL:
        from hetkd.simulations.central import run_central

        return run_central(cfg)
    import ray
    from flwr.simulation import run_simulation

    from hetkd.clients.app import app as client_app

    prepared = prepare(cfg, shared_output=True, resume=resume)
    summaries: list[dict[str, Any]] = []
    failures: list[BaseException] = []
    server_app = make_server_app(prepared.cfg, on_finish=summaries.append, on_failure=failures.append,
                                 shared_output=True, resume=resume)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    notice_filter = _DropDeprecationNotice()
    flwr_logger.addFilter(notice_filter)
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    with ray_environment(prepared.cfg):
        started_ray = start_ray(prepared.cfg)  # before stop_on_signals: ray.init sets its own SIGTERM handler
        try:
            with stop_on_signals():
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=prepared.cfg.simulation.num_devices,
                    backend_config=backend_config(prepared.cfg),  # type: ignore[arg-type]
                    verbose_logging=verbose,
                )
        finally:
            flwr_logger.setLevel(level)
            flwr_logger.removeFilter(notice_filter)
            if started_ray and ray.is_initialized():
                ray.shutdown()
    if failures:
        raise failures[0]
    if not summaries:
        raise RuntimeError(f"the simulation ended without a summary; see {prepared.cfg.output.dir}")
    return summaries[0]
