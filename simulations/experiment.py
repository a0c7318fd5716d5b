"""One experiment on a Flower grid: what the ServerApp does, start to finish.

:func:`prepare` resolves the output folder, builds the data picture and checks
that every device's architecture fits the data, all before any device is
contacted, so a bad config never starts a run. :func:`run_on_grid` then drives
the configured strategy and records every round as it ends.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from hetkd.config import ConfigError, HetkdConfig, to_yaml
from hetkd.data import DatasetUnavailableError, Federation, PartitionError, build_federation
from hetkd.interrupt import RunInterrupted
from hetkd.models import ModelError, build_model, largest_architecture
from hetkd.privacy import PrivacyError, private_model, require_opacus
from hetkd.results import RunRecorder, subset_accuracy
from hetkd.simulations.checkpoint import ResumePoint, resume_point, save_checkpoint
from hetkd.simulations.registry import CENTRAL, ENSEMBLE_STRATEGIES, build_strategy, check_strategy, initial_arrays
from hetkd.strategies import DeviceStrategy, RoundReport

__all__ = ["PreparedRun", "RunFailedError", "USER_ERRORS", "ensure_writable", "prepare", "resolve_data_path",
           "resolve_output", "run_on_grid", "default_run_name"]

#: errors caused by what the user asked for: reported in one line, before any device starts
USER_ERRORS = (ConfigError, ModelError, PartitionError, DatasetUnavailableError)


class RunFailedError(RuntimeError):
    """A run that started could not go on: no device trained, or its results could not be written.

    Every round completed before it is in ``metrics.jsonl`` and ``summary.json``.
    """


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and write a file into it, or raise a :class:`ConfigError` naming ``output.dir``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hetkd-write-test-") as probe:
            probe.write(b"hetkd")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise ConfigError("output.dir", f"cannot write results to '{folder}': {err.strerror or err}") from None


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
    #: where a resumed run goes on from (``None``: a new run)
    resume: ResumePoint | None = None


def prepare(cfg: HetkdConfig, shared_output: bool = False, resume: bool = False) -> PreparedRun:
    """Check everything that can be checked before devices start.

    Raises :class:`~hetkd.config.ConfigError` / ``ValueError`` naming the bad
    key: an unknown strategy, a partition that cannot be made, an
    architecture that does not fit the data. ``shared_output``: the server
    and every device share the output folder (resolves
    ``simulation.state_store=auto``). ``resume``: go on with the interrupted
    run in ``output.dir`` (:func:`~hetkd.simulations.checkpoint.resume_point`).
    """
    check_strategy(cfg)
    if cfg.strategy.name == CENTRAL:
        raise ConfigError("strategy.name", "'central' pools all device data and runs in this process; "
                          "use `hetkd run strategy=central` or `hetkd compare`, not flwr run")
    cfg = resolve_data_path(resolve_output(cfg))
    cfg = replace(cfg, simulation=replace(cfg.simulation,
                                          state_store=cfg.simulation.resolved_state_store(shared_output)))
    ensure_writable(Path(cfg.output.dir))  # before any data is built or any device is started
    point = resume_point(cfg) if resume else None
    federation = build_federation(cfg)
    archs = cfg.models.assign(cfg.simulation.num_devices)
    if cfg.privacy.enabled:
        try:
            require_opacus()
        except PrivacyError as err:
            raise ConfigError("privacy.enabled", str(err)) from None
    private = {cfg.models.private_architecture} - {""}  # the devices' private answer models, when set
    for arch in sorted(set(archs) | private):
        model = build_model(arch, federation.input_shape, federation.num_classes)  # raises if it does not fit
        if cfg.privacy.enabled:
            try:
                private_model(model, arch, cfg.privacy)  # DP-SGD can train it (or fix_layers can make it so)
            except PrivacyError as err:
                raise ConfigError("privacy.fix_layers", str(err)) from None
    if cfg.strategy.name in ENSEMBLE_STRATEGIES:
        try:
            build_model(cfg.strategy.ensemble.student, federation.input_shape, federation.num_classes)
        except ModelError as err:
            raise ConfigError("strategy.ensemble.student", str(err)) from None
    return PreparedRun(cfg, federation, archs, to_yaml(cfg), point)


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
    strategy = build_strategy(cfg, run.federation, run.config_yaml)
    first_round, arrays = 1, initial_arrays(cfg, run.federation)
    if run.resume is not None:
        header += f", resumed after round {run.resume.completed_round}"
        strategy.load_state_dict(run.resume.strategy_state)
        first_round, arrays = run.resume.completed_round + 1, strategy.global_arrays() or ArrayRecord()
    recorder.start(run.config_yaml, summary, header, rows=run.resume.rows if run.resume is not None else None)
    watch = _RoundWatch(recorder, cfg.simulation.max_idle_rounds, strategy)
    try:
        strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=cfg.simulation.num_rounds,
            timeout=cfg.simulation.round_timeout,
            on_round_end=watch,
            first_round=first_round,
        )
        watch.check_trained()
    except RunFailedError:
        if not watch.write_failed:
            recorder.finish(run_facts(cfg, summary, recorder.rows) | {"failed": True})
        raise
    except RunInterrupted as err:
        recorder.finish(run_facts(cfg, summary, recorder.rows) | {"interrupted": signal.Signals(err.signum).name})
        done = len(recorder.rows)
        resumable = done > 0 and cfg.simulation.state_store == "disk"
        raise RunInterrupted(err.signum, (f"rounds 1-{done} of {cfg.simulation.num_rounds}" if done else "no round")
                             + f" completed, kept in {cfg.output.dir}"
                             + (f"; `hetkd run --resume {cfg.output.dir}` goes on from there" if resumable else ""),
                             resumable=resumable) from None
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


class _RoundWatch:
    """Records each round as it ends with the strategy's checkpoint; stops a run whose devices no
    longer train or whose results cannot be written."""

    def __init__(self, recorder: RunRecorder, max_idle_rounds: int, strategy: DeviceStrategy) -> None:
        self.recorder = recorder
        self.max_idle_rounds = max_idle_rounds
        self.strategy = strategy
        self.idle = 0
        for row in reversed(recorder.rows):  # a resumed run's idle rounds count on
            if row.get("trained"):
                break
            self.idle += 1
        self.write_failed = False

    def __call__(self, report: RoundReport) -> None:
        row = report.as_row()
        try:
            self.recorder.record(row)
            save_checkpoint(self.recorder.out_dir, report.round, self.strategy.state_dict())
        except OSError as err:
            self.write_failed = True
            kept = f"; rounds 1-{report.round - 1} are in metrics.jsonl" if report.round > 1 else ""
            raise RunFailedError(f"could not write round {report.round}'s results to {self.recorder.out_dir}: "
                                 f"{err.strerror or err}{kept}") from None
        self.idle = self.idle + 1 if report.trained == 0 else 0
        if self.max_idle_rounds and self.idle >= self.max_idle_rounds:
            raise RunFailedError(f"no device completed training in the last {self.idle} rounds "
                                 f"(simulation.max_idle_rounds={self.max_idle_rounds}); {_why(row)}")

    def check_trained(self) -> None:
        """At the end: a run in which no device ever completed training failed."""
        rows = self.recorder.rows
        if rows and not any(row.get("trained") for row in rows):
            raise RunFailedError(f"no device completed training in any of the {len(rows)} rounds; "
                                 f"{_why(rows[-1])}")


def _why(row: dict[str, Any]) -> str:
    """Why the devices of the round ``row`` did not train: its failures' reasons."""
    reasons = sorted({str(f.get("reason")) for f in row.get("failures", [])})
    if not reasons:
        return "no device was sampled or answered"
    return f"round {row['round']}'s failures: " + "; ".join(reasons[:3]) + (" ..." if len(reasons) > 3 else "")


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

