"""Where a device keeps its model and optimizer between rounds.

A device's weights never leave it, yet they must survive from one message to
the next: in simulation a ClientApp instance serves many devices, and in
deployment every message runs in a fresh process. Two stores:

* :class:`ContextStateStore` keeps the state in Flower's per-node
  ``Context.state`` (a ``RecordDict`` that Flower keeps for the whole run),
* :class:`DiskStateStore` keeps one file per device, written atomically
  (temporary file, fsync, rename), so a crash mid-write leaves the previous
  state intact; memory then holds only the devices being served.

Both store the same bytes (:func:`pack_state` / :func:`unpack_state`).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ConfigRecord, Context

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
    """Load and save one device's state."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


class ContextStateStore:
    """State in ``context.state`` under :data:`STATE_KEY`."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def load(self) -> dict[str, Any] | None:
        record = self.context.state.get(STATE_KEY)
        if record is None:
            return None
        return unpack_state(record["blob"])  # type: ignore[index,arg-type]

    def save(self, state: dict[str, Any]) -> None:
        self.context.state[STATE_KEY] = ConfigRecord({"blob": pack_state(state)})


class DiskStateStore:
    """State in ``root/device-<id>.pt``, replaced atomically on every save.

    A writer killed mid-save leaves the previous file untouched and at most a
    stray temporary file, which the device's next save removes (a device is
    served by one worker at a time, so no other save of it can be in flight).
    """

    def __init__(self, root: str | Path, device_id: int) -> None:
        if device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {device_id}")
        self.path = Path(root).expanduser() / f"device-{device_id}.pt"

    def stray_files(self) -> list[Path]:
        """Temporary files that killed writers of this device left behind."""
        if not self.path.parent.is_dir():
            return []
        return sorted(self.path.parent.glob(f"{self.path.name}*.tmp"))

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return unpack_state(self.path.read_bytes())

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stray in self.stray_files():
            stray.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pack_state(state))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def make_store(kind: str, context: Context, device_id: int, root: str | Path) -> StateStore:
    """The store named by ``simulation.state_store``."""
    if kind == "context":
        return ContextStateStore(context)
    if kind == "disk":
        return DiskStateStore(root, device_id)
    raise ValueError(f"unknown simulation.state_store {kind!r}; valid choices: context, disk")
