"""One experiment on a Flower grid: what the ServerApp does, start to finish.

:func:`prepare` resolves the output folder, builds the data picture and checks
that every device's architecture fits the data, all before any device is
contacted, so a bad config never starts a run. :func:`run_on_grid` then drives
the configured strategy and records every round as it ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from hetkd.config import ConfigError, HetkdConfig, to_yaml
from hetkd.data import DatasetUnavailableError, Federation, PartitionError, build_federation
from hetkd.models import ModelError, build_model, largest_architecture
from hetkd.results import RunRecorder, subset_accuracy
from hetkd.simulations.registry import CENTRAL, ENSEMBLE_STRATEGIES, build_strategy, check_strategy, initial_arrays

__all__ = ["PreparedRun", "USER_ERRORS", "prepare", "resolve_data_path", "resolve_output", "run_on_grid", "default_run_name"]

#: errors caused by what the user asked for: reported in one line, before any device starts
USER_ERRORS = (ConfigError, ModelError, PartitionError, DatasetUnavailableError)


def default_run_name(cfg: HetkdConfig) -> str:
    """``<strategy>-<dataset>-s<seed>-<timestamp>``."""
    return f"{cfg.strategy.name}-{cfg.dataset.name}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_output(cfg: HetkdConfig) -> HetkdConfig:
    """A copy of ``cfg`` whose ``output.dir`` is an absolute, fresh folder."""
    if cfg.output.dir:
        out = Path(cfg.output.dir).expanduser().resolve()
        return replace(cfg, output=replace(cfg.output, dir=str(out), run_name=cfg.output.run_name or out.name))
    name = cfg.output.run_name or default_run_name(cfg)
    out = Path(cfg.output.root).expanduser().resolve() / name
    candidate, k = out, 1
    while candidate.exists() and not cfg.output.run_name:
        k += 1
        candidate = out.with_name(f"{name}-{k}")
    return replace(cfg, output=replace(cfg.output, dir=str(candidate), run_name=candidate.name))


def resolve_data_path(cfg: HetkdConfig) -> HetkdConfig:
    """A copy of ``cfg`` whose ``dataset.path`` is absolute (from the working directory),
    so devices find the file whatever folder their process starts in."""
    if not cfg.dataset.path:
        return cfg
    path = str(Path(cfg.dataset.path).expanduser().resolve())
    return replace(cfg, dataset=replace(cfg.dataset, path=path))


@dataclass(frozen=True)
class PreparedRun:
    """A checked config with its data picture, ready to start."""

    cfg: HetkdConfig
    federation: Federation
    architectures: list[str]
    config_yaml: str


def prepare(cfg: HetkdConfig) -> PreparedRun:
    """Check everything that can be checked before devices start.

    Raises :class:`~hetkd.config.ConfigError` / ``ValueError`` naming the bad
    key: an unknown strategy, a partition that cannot be made, an
    architecture that does not fit the data.
    """
    check_strategy(cfg)
    if cfg.strategy.name == CENTRAL:
        raise ConfigError("strategy.name", "'central' pools all device data and runs in this process; "
                          "use `hetkd run strategy=central` or `hetkd compare`, not flwr run")
    cfg = resolve_data_path(resolve_output(cfg))
    federation = build_federation(cfg)
    archs = cfg.models.assign(cfg.simulation.num_devices)
    for arch in sorted(set(archs)):
        build_model(arch, federation.input_shape, federation.num_classes)  # raises if it does not fit
    if cfg.strategy.name in ENSEMBLE_STRATEGIES:
        try:
            build_model(cfg.strategy.ensemble.student, federation.input_shape, federation.num_classes)
        except ModelError as err:
            raise ConfigError("strategy.ensemble.student", str(err)) from None
    return PreparedRun(cfg, federation, archs, to_yaml(cfg))


def run_on_grid(grid: Grid, run: PreparedRun) -> dict[str, Any]:
    """Run the configured strategy on ``grid``; write results; return the summary."""
    cfg = run.cfg
    summary = run.federation.summary()
    for device, arch in zip(summary["devices"], run.architectures):
        device["architecture"] = arch
    recorder = RunRecorder(cfg.output.dir, plots=cfg.output.plots, progress=cfg.output.progress,
                           total_rounds=cfg.simulation.num_rounds, quiet=cfg.output.quiet)
    header = (
        f"hetkd: {cfg.strategy.name} on {cfg.dataset.name}, {cfg.simulation.num_devices} devices "
        f"({', '.join(sorted(set(run.architectures)))}), {cfg.partition.method} partition, "
        f"{cfg.simulation.num_rounds} rounds, seed {cfg.seed}"
    )
    recorder.start(run.config_yaml, summary, header)
    strategy = build_strategy(cfg, run.federation, run.config_yaml)
    strategy.start(
        grid=grid,
        initial_arrays=initial_arrays(cfg, run.federation),
        num_rounds=cfg.simulation.num_rounds,
        timeout=cfg.simulation.round_timeout,
        on_round_end=lambda report: recorder.record(report.as_row()),
    )
    strategy.write_artifacts(Path(cfg.output.dir))
    devices = {
        str(info.device_id): {"architecture": info.architecture, "num_params": info.num_params,
                              "model_bytes": info.model_bytes, "num_train": info.num_train}
        for info in strategy.devices.values()
    }
    largest = max((d["model_bytes"] for d in devices.values()), default=0)
    zoo_name, zoo_bytes = largest_architecture(run.federation.input_shape, run.federation.num_classes)
    return recorder.finish(
        run_facts(cfg, summary, recorder.rows)
        | {
            "largest_model_bytes": largest,
            # the zoo's largest model for this data: what one FedAvg transfer could cost
            "zoo_largest_model": {"architecture": zoo_name, "bytes": zoo_bytes},
            "devices": devices,
        }
    )


def run_facts(cfg: HetkdConfig, federation_summary: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures every run summary carries besides the per-round ones."""
    sparse = [d["device_id"] for d in federation_summary["devices"] if d.get("sparse")]
    return {
        "strategy": cfg.strategy.name,
        "dataset": cfg.dataset.name,
        "seed": cfg.seed,
        "num_devices": cfg.simulation.num_devices,
        "sparse_devices": sparse,
        "final_personalised_accuracy_sparse": subset_accuracy(rows, sparse) if sparse else None,
    }

