"""Stopping a run on SIGINT / SIGTERM at the next safe point, keeping what is done.

Signals reach a process, not a run, so the request to stop is process-wide:
:func:`stop_on_signals` (``hetkd run``, ``hetkd compare``) turns the first
SIGINT or SIGTERM into a request instead of a ``KeyboardInterrupt`` in
whichever thread happens to run. The places that wait or loop for long (the
strategy's wait for replies, its round loop, every KD-steps loop) call
:func:`raise_if_stopped`, which raises :class:`RunInterrupted` in the
ServerApp's thread; the run then records what it finished and stops its
devices. A second signal acts as usual (``KeyboardInterrupt`` / terminate):
the way out when a device hangs.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = ["RunInterrupted", "request_stop", "stop_requested", "raise_if_stopped", "stop_on_signals"]

#: the signals :func:`stop_on_signals` turns into a request to stop
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """The run was asked to stop (by ``signum``); its completed rounds are kept."""

    def __init__(self, signum: int, detail: str = "", resumable: bool = False) -> None:
        self.signum = signum
        #: whether ``hetkd run --resume`` can go on with the run (it completed a round and its devices' state is on disk)
        self.resumable = resumable
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}" + (f": {detail}" if detail else ""))

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by ``signum``: 128 + the signal's number."""
        return 128 + self.signum


_requested: list[int] = []  # the signal that asked to stop, if any
_installed = 0  # nesting depth of stop_on_signals


def request_stop(signum: int = signal.SIGINT) -> None:
    """Ask the run in this process to stop at its next safe point."""
    if not _requested:
        _requested.append(int(signum))


def stop_requested() -> int | None:
    """The signal that asked this process's run to stop, or ``None``."""
    return _requested[0] if _requested else None


def raise_if_stopped(detail: str = "") -> None:
    """Raise :class:`RunInterrupted` if a stop was requested."""
    signum = stop_requested()
    if signum is not None:
        raise RunInterrupted(signum, detail)


def _on_signal(signum: int, frame: object) -> None:
    request_stop(signum)
    print(f"\nhetkd: {signal.Signals(signum).name} received: stopping after the last completed round "
          "(send it again to force)", file=sys.stderr, flush=True)
    # a second signal takes the usual way
    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within this block, the first SIGINT/SIGTERM requests a stop (see the module's text).

    Nested blocks share the outer one's request (and put the handlers back
    in place if something replaced them); the outermost clears it and puts
    the previous handlers back on leaving. Outside the main thread
    (where Python cannot set handlers) the block does nothing.
    """
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS} if _installed == 0 else {}
    if _installed == 0:
        _requested.clear()
    if not _requested:  # (again, when nested: ray.init replaces the SIGTERM handler)
        for s in STOP_SIGNALS:
            signal.signal(s, _on_signal)
    _installed += 1
    try:
        yield
    finally:
        _installed -= 1
        if _installed == 0:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            _requested.clear()
