"""Peak memory of a process tree, sampled in a thread (what ``hetkd bench`` reports)."""

from __future__ import annotations

import os
import threading

import psutil

__all__ = ["GIB", "TreeMemoryMonitor"]

GIB = float(1 << 30)


class TreeMemoryMonitor:
    """Peak resident memory of a process and all its descendants, summed, sampled in a thread.

    Shared pages (e.g. Ray's object store mapped into several processes) count
    once per process, so the sum is an upper bound on what the tree holds.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.5) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.process = psutil.Process(pid if pid is not None else os.getpid())
        self.interval = interval
        self.peak_total = 0
        self.peak_root = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def sample(self) -> tuple[int, int, int]:
        """``(total RSS bytes, root RSS bytes, number of processes)`` now."""
        root = self.process.memory_info().rss
        total, count = root, 1
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
                count += 1
            except psutil.Error:  # it ended between listing and reading
                continue
        return total, root, count

    def _poll(self) -> None:
        while not self._stop.is_set():
            total, root, count = self.sample()
            self.peak_total = max(self.peak_total, total)
            self.peak_root = max(self.peak_root, root)
            self.peak_processes = max(self.peak_processes, count)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def as_row(self) -> dict[str, float]:
        return {
            "peak_rss_total_gib": self.peak_total / GIB,
            "peak_rss_server_gib": self.peak_root / GIB,
            "peak_rss_workers_gib": (self.peak_total - self.peak_root) / GIB if self.peak_total else 0.0,
            "max_processes": self.peak_processes,
        }
