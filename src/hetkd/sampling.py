"""Which devices take part in a round: the settings and the seeded draw.

Every strategy samples devices the same way (:class:`Sampling`): a fraction of
the registered devices trains each round, a fraction evaluates every few
rounds, and the run waits for the devices it expects before it starts. The
draw (:func:`sample_devices`) is seeded by (run seed, round, purpose) and made
over device ids, so the same seed samples the same devices however Flower
numbers its nodes and in whatever order they connect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hetkd.interrupt import raise_if_stopped
from hetkd.settings import require, require_types

__all__ = ["Sampling", "sample_devices", "wait_until"]


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How many devices take part, and when.

    ``fraction_train`` / ``fraction_evaluate`` of the registered devices train /
    evaluate each round, at least ``min_devices`` (0 evaluating devices skips
    evaluation). Evaluation runs every ``evaluate_every`` rounds and always
    after the last one. The first round waits up to ``wait_for_devices``
    seconds for the devices the run expects to connect; a later round that
    finds fewer than ``min_devices`` of them connected waits as long for those.
    """

    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_devices: int = 1
    evaluate_every: int = 1
    wait_for_devices: float = 120.0

    def __post_init__(self) -> None:
        require_types(self)
        require(0.0 < self.fraction_train <= 1.0, "fraction_train", f"must be in (0, 1], got {self.fraction_train}")
        require(0.0 <= self.fraction_evaluate <= 1.0, "fraction_evaluate",
                f"must be in [0, 1], got {self.fraction_evaluate}")
        require(self.min_devices >= 1, "min_devices", f"must be >= 1, got {self.min_devices}")
        require(self.evaluate_every >= 1, "evaluate_every", f"must be >= 1, got {self.evaluate_every}")
        require(self.wait_for_devices > 0, "wait_for_devices", f"must be > 0, got {self.wait_for_devices}")

    def evaluates(self, server_round: int, num_rounds: int) -> bool:
        """Whether round ``server_round`` of ``num_rounds`` evaluates."""
        return server_round % self.evaluate_every == 0 or server_round == num_rounds


def sample_devices(
    device_ids: Sequence[int], fraction: float, minimum: int, seed: int, server_round: int, purpose: str
) -> list[int]:
    """A seeded sample of ``fraction`` of ``device_ids`` (at least ``minimum``), in the given order.

    ``purpose`` (``"train"`` or ``"evaluate"``) draws an independent sample for
    each use in the same round. All devices are returned when the sample would
    hold them all; none when ``fraction`` is 0.
    """
    ids = list(device_ids)
    if fraction <= 0 or not ids:
        return []
    k = min(len(ids), max(minimum, int(round(fraction * len(ids)))))
    if k == len(ids):
        return ids
    rng = np.random.default_rng([seed, server_round, 0 if purpose == "train" else 1])
    chosen = rng.choice(len(ids), size=k, replace=False)
    return [ids[i] for i in sorted(chosen)]


def wait_until(ready: Callable[[], bool], seconds: float, poll: float = 0.5) -> bool:
    """Ask ``ready`` every ``poll`` seconds until it says yes or ``seconds`` have passed; return its
    last answer. Like Flower's ``sample_nodes`` waiting for nodes, but never forever, and a
    requested stop (Ctrl-C) ends the wait with :class:`~hetkd.interrupt.RunInterrupted`."""
    if seconds < 0 or poll <= 0:
        raise ValueError(f"wait_until needs seconds >= 0 and poll > 0, got seconds={seconds}, poll={poll}")
    deadline = time.monotonic() + seconds
    while not ready():
        raise_if_stopped("while waiting for devices to connect")
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True
