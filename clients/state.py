"""Where a device keeps its model and optimizer between rounds.

A device's weights never leave it, yet they must survive from one message to
the next: in simulation a ClientApp instance serves many devices, and in
deployment every message runs in a fresh process. Two stores:

* :class:`ContextStateStore` keeps the state in Flower's per-node
  ``Context.state`` (a ``RecordDict`` that Flower keeps for the whole run),
* :class:`DiskStateStore` keeps one file per device, written atomically
  (temporary file, fsync, rename), so a crash mid-write leaves the previous
  state intact; memory then holds only the devices being served. It also
  keeps the state of the round before, from which an interrupted run resumes.

Both store the same bytes (:func:`pack_state` / :func:`unpack_state`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ConfigRecord, Context

from hetkd.results import write_atomic

__all__ = ["StateStore", "ContextStateStore", "DiskStateStore", "pack_state", "unpack_state", "make_store"]

STATE_KEY = "hetkd.device-state"


def pack_state(state: dict[str, Any]) -> bytes:
    """Serialise a dict of tensors / plain values (model + optimizer state)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def unpack_state(blob: bytes) -> dict[str, Any]:
    """Inverse of :func:`pack_state` (tensors only: ``weights_only=True``)."""
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


class StateStore(Protocol):
    """Load and save one device's state.

    ``save`` is told the server round whose message produced the state
    (``None``: the state's round did not change, e.g. at set-up); a store may
    keep the previous round's state so that a run can resume from it.
    """

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any], server_round: int | None = None) -> None: ...


class ContextStateStore:
    """State in ``context.state`` under :data:`STATE_KEY`."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self) -> dict[str, Any] | None:
        record = self.context.state.get(STATE_KEY)
        if record is None:
            return None
        return unpack_state(record["blob"])  # type: ignore[index,arg-type]

    def save(self, state: dict[str, Any], server_round: int | None = None) -> None:
        self.context.state[STATE_KEY] = ConfigRecord({"blob": pack_state(state)})


class DiskStateStore:
    """State in ``root/device-<id>.pt``, replaced atomically on every save.

    A writer killed mid-save leaves the previous file untouched and at most a
    stray temporary file, which the device's next save removes (a device is
    served by one worker at a time, so no other save of it can be in flight).
    The first save of a new round first moves the state of the round before
    to ``device-<id>.previous.pt``: a run interrupted in round ``r + 1``
    resumes from every device's state at the end of round ``r``
    (:meth:`rewind`).
    """

    ROUND_KEY = "server_round"

    def __init__(self, root: str | Path, device_id: int) -> None:
        if device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {device_id}")
        self.path = Path(root).expanduser() / f"device-{device_id}.pt"
        self.previous = self.path.with_name(f"device-{device_id}.previous.pt")
        self._round: int | None = None  # the round of the state on disk, once known

    def stray_files(self) -> list[Path]:
        """Temporary files that killed writers of this device left behind."""
        if not self.path.parent.is_dir():
            return []
        return sorted(self.path.parent.glob(f"{self.path.name}*.tmp"))

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state = unpack_state(self.path.read_bytes())
        self._round = int(state.pop(self.ROUND_KEY, 0))
        return state

    def saved_round(self) -> int | None:
        """The server round of the state on disk (``None``: none saved)."""
        if self._round is None and self.path.exists():
            self.load()
        return self._round

    def save(self, state: dict[str, Any], server_round: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stray in self.stray_files():
            stray.unlink(missing_ok=True)
        on_disk = self.saved_round()
        if server_round is None:
            server_round = on_disk or 0
        elif on_disk is not None and on_disk < server_round:
            os.replace(self.path, self.previous)  # the end of the round before, for a resume
        write_atomic(self.path, pack_state({**state, self.ROUND_KEY: server_round}))
        self._round = server_round

    def rewind(self, completed_round: int) -> None:
        """Put back this device's state at the end of ``completed_round``, where a later round already saved one.

        Raises ``RuntimeError`` if that state is no longer on disk.
        """
        on_disk = self.saved_round()
        if on_disk is None or on_disk <= completed_round:
            return
        kept = unpack_state(self.previous.read_bytes()).get(self.ROUND_KEY) if self.previous.exists() else None
        if kept is None or int(kept) > completed_round:
            raise RuntimeError(f"{self.path} holds round {on_disk}'s state and no state of round "
                               f"{completed_round} or before is kept beside it")
        os.replace(self.previous, self.path)
        self._round = int(kept)


def make_store(kind: str, context: Context, device_id: int, root: str | Path) -> StateStore:
    """The store named by ``simulation.state_store`` (``auto``, which the server resolves before
    set-up, is ``context`` on a device that reads an unresolved run config)."""
    if kind in ("auto", "context"):
        return ContextStateStore(context)
    if kind == "disk":
        return DiskStateStore(root, device_id)
    raise ValueError(f"unknown simulation.state_store {kind!r}; valid choices: auto, context, disk")
