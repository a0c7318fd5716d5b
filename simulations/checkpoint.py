"""Checkpoints: where an interrupted run goes on from (``hetkd run --resume DIR``).

After every completed round, :func:`~hetkd.simulations.experiment.run_on_grid`
writes ``<out>/checkpoint.pt``: the round and the strategy's
:meth:`~hetkd.strategies.DeviceStrategy.state_dict` (what the server has
learnt). The devices' own models and optimizers are in ``<out>/device-state``
(``simulation.state_store=disk``, the default of in-process runs), where each
device also keeps its state of the round before
(:class:`~hetkd.clients.DiskStateStore`). Every other random stream of a run is
derived from the seed and the round, so a resumed run repeats exactly what
the interrupted one would have done.

:func:`resume_point` reads a run folder back, refusing with the reason when
it cannot go on; :func:`resumed_config` checks that a resumed run keeps its
config.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetkd.clients.session import device_state_dir
from hetkd.clients.state import DiskStateStore
from hetkd.config import ConfigError, HetkdConfig, from_yaml, resolve_config
from hetkd.results import read_metrics, write_atomic
from hetkd.settings import flatten

__all__ = ["CHECKPOINT_FILE", "ResumePoint", "save_checkpoint", "resume_point", "resumed_config"]

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class ResumePoint:
    """An interrupted run read back: its last completed round, the strategy's state then, and its rounds' rows."""

    completed_round: int
    strategy_state: dict[str, Any]
    rows: list[dict[str, Any]]


def save_checkpoint(out_dir: Path, completed_round: int, strategy_state: dict[str, Any]) -> None:
    """Write ``<out_dir>/checkpoint.pt`` atomically (a kill mid-write keeps the previous one)."""
    buffer = io.BytesIO()
    torch.save({"completed_round": completed_round, "strategy": strategy_state}, buffer)
    write_atomic(Path(out_dir) / CHECKPOINT_FILE, buffer.getvalue())


def resume_point(cfg: HetkdConfig) -> ResumePoint:
    """The run in ``cfg.output.dir`` read back, its devices' state put back to its last completed round.

    Raises :class:`~hetkd.config.ConfigError` (key ``--resume``) when the folder
    holds no checkpoint, the run is complete, or its devices' state was not kept.
    """
    out = Path(cfg.output.dir)
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError("--resume", f"'{out}' holds no {CHECKPOINT_FILE}: it is not a run hetkd can resume "
                          "(none was started there, or it stopped before its first round ended)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        done, state = int(saved["completed_round"]), dict(saved["strategy"])
    except Exception as err:  # a torn or foreign file
        raise ConfigError("--resume", f"cannot read {path}: {type(err).__name__}: {err}") from None
    if done >= cfg.simulation.num_rounds:
        raise ConfigError("--resume", f"the run in '{out}' is complete ({done} of {cfg.simulation.num_rounds} rounds)")
    stores = [DiskStateStore(device_state_dir(cfg), d) for d in range(cfg.simulation.num_devices)]
    if cfg.simulation.state_store != "disk" or any(store.saved_round() is None for store in stores):
        raise ConfigError("--resume", f"the devices of the run in '{out}' did not keep their models on disk "
                          f"in {device_state_dir(cfg)} (simulation.state_store=context keeps them in memory, "
                          "gone with the run); runs with simulation.state_store=disk (or auto, in hetkd run) "
                          "can be resumed")
    for device_id, store in enumerate(stores):
        try:
            store.rewind(done)
        except RuntimeError as err:
            raise ConfigError("--resume", f"device {device_id}'s state cannot go back to round {done}: {err}") from None
    rows = [row for row in read_metrics(out / "metrics.jsonl") if row.get("round", 0) <= done]
    if len(rows) != done:
        raise ConfigError("--resume", f"'{out}/metrics.jsonl' holds {len(rows)} of the {done} rounds the checkpoint "
                          "records")
    return ResumePoint(done, state, rows)


def resumed_config(run_dir: str | Path, items: tuple[str | None, list[str]] = (None, [])) -> HetkdConfig:
    """The config of the run in ``run_dir``, with the ``(CONFIG, overrides)`` given on resuming.

    A resumed run computes what the interrupted one would have: a CONFIG or an
    override that changes anything but the ``output`` settings (how results
    are shown) is refused, naming the keys.
    """
    out = Path(run_dir).expanduser().resolve()
    saved_file = out / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError("--resume", f"'{out}' holds no config.yaml: it is not a hetkd run folder")
    saved = from_yaml(saved_file.read_text())
    config, overrides = items
    resumed = resolve_config(config or str(saved_file), [*overrides, f"output.dir={out}"])
    before, after = flatten(saved), flatten(resumed)
    changed = sorted(k for k in set(before) | set(after)
                     if not k.startswith("output.") and before.get(k) != after.get(k))
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:5])
        raise ConfigError("--resume", f"a resumed run keeps the config it started with; this changes {shown}"
                          + (" ..." if len(changed) > 5 else "") + ". Start a new run to change it")
    return resumed
