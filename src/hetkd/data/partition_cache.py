"""A disk cache of flwr-datasets partitions, so a process that builds a device skips making them.

flwr-datasets' partitioners work on a Hugging Face ``datasets.Dataset``: importing
``datasets`` (pyarrow and all) and making the partition cost a process that builds
the default device 2.6 s of its 4.3 (``hetkd bench bench.parts=[startup]``, 2 cores).
Every process that builds a device paid it: each Ray worker of a simulation, and on
a deployed SuperNode every ClientApp process, which Flower starts once per message. A
partition is a pure function of the labels, the partitioner's settings and the
flwr-datasets release, so it is computed once and read back from
``HETKD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/hetkd``, else ``~/.cache/hetkd``;
set it to an empty string to turn the cache off). Entries are small (four bytes a
sample) and the folder can be deleted at any time.

An entry is written to a temporary file and renamed into place, so processes
racing to write the same entry never leave half a file; an entry that cannot be
read, or does not hold a partition of the labels it is keyed on, is computed
again and replaced. A cache folder that cannot be written slows the run down
but never stops it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

__all__ = ["CACHE_DIR_ENV", "cache_dir", "partition_key", "load_parts", "store_parts"]

#: the environment variable naming the cache folder ("" turns the cache off)
CACHE_DIR_ENV = "HETKD_CACHE_DIR"

_log = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    """Where partitions are cached, or ``None`` when ``HETKD_CACHE_DIR`` is set empty."""
    chosen = os.environ.get(CACHE_DIR_ENV)
    if chosen is not None:
        return Path(chosen).expanduser() if chosen.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "hetkd"


def partition_key(partitioner: str, settings: dict[str, object], labels: np.ndarray) -> str:
    """The entry's name: a digest of the partitioner, its settings, the labels and the
    flwr-datasets release (a new release may partition differently)."""
    try:
        release = version("flwr-datasets")
    except PackageNotFoundError:  # pragma: no cover - a declared dependency
        release = "unknown"
    described = json.dumps({"partitioner": partitioner, "settings": settings, "flwr-datasets": release},
                           sort_keys=True, default=str)
    digest = hashlib.sha256(described.encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return f"{partitioner}-{digest.hexdigest()[:32]}"


def _entry(key: str) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / "partitions" / f"{key}.npz"


def load_parts(key: str, num_labels: int) -> list[np.ndarray] | None:
    """The cached partition under ``key`` of ``num_labels`` labels, or ``None`` when there is
    none or the entry is unreadable or not such a partition (each position at most once)."""
    path = _entry(key)
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as entry:
            parts = [np.asarray(entry[f"part{i}"], dtype=np.int64) for i in range(int(entry["count"]))]
    except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed
        _log.warning("partition cache entry %s is unreadable (%s); computing it again", path, err)
        return None
    positions = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    valid = (positions.ndim == 1 and (len(positions) == 0 or (positions.min() >= 0 and positions.max() < num_labels))
             and len(np.unique(positions)) == len(positions))
    if not valid:
        _log.warning("partition cache entry %s does not hold a partition of %d labels; computing it again",
                     path, num_labels)
        return None
    return parts


def store_parts(key: str, parts: list[np.ndarray]) -> None:
    """Keep ``parts`` under ``key``; a folder that cannot be written is logged once and skipped."""
    path = _entry(key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                np.savez(out, count=np.int64(len(parts)), **{f"part{i}": _compact(p) for i, p in enumerate(parts)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        _warn_unwritable(path.parent, err)


def _compact(positions: np.ndarray) -> np.ndarray:
    """Positions as int32 where they fit (an entry for all of MNIST: 280 KB instead of 560)."""
    return positions.astype(np.int32) if len(positions) == 0 or positions.max() < 2**31 else positions


_warned: set[Path] = set()


def _warn_unwritable(folder: Path, err: OSError) -> None:
    if folder not in _warned:
        _warned.add(folder)
        _log.warning("cannot cache partitions in %s (%s); set %s to a writable folder, or to '' to stop "
                     "trying", folder, err, CACHE_DIR_ENV)
