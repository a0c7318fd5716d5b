"""Shared fixtures: small configs and an in-process Flower grid.

:class:`~hetkd.simulations.local_grid.InProcessGrid` delivers every message to
the real hetkd ClientApp in this process (one Flower ``Context`` per node, as
the Simulation Runtime keeps them), records all traffic, and can make chosen
devices fail, time out or send corrupted replies. Protocol tests run on it in seconds; end-to-end
tests (marked ``slow``) go through Flower's real runtime instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
from flwr.app import Message, MetricRecord, RecordDict

from hetkd.config import HetkdConfig, resolve_config
from hetkd.simulations.local_grid import InProcessGrid, Traffic  # noqa: F401  (re-exported for tests)

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def small_config(tmp_path, *overrides: str, devices: int = 4) -> HetkdConfig:
    """A quick digits config writing under ``tmp_path``."""
    return resolve_config(
        None,
        [
            f"simulation.num_devices={devices}",
            "strategy=local",
            "num-server-rounds=2",
            "reference.size=200",
            "partition.min_samples=5",
            "training.local_epochs=2",
            "output.plots=false",
            "output.progress=false",
            f"output.dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


def corrupt_metric(key: str, value: float = math.nan) -> Callable[[Message], Message]:
    """A fault that overwrites one metric of a device's replies."""

    def fault(reply: Message) -> Message:
        if reply.has_error():
            return reply
        metrics = reply.content.metric_records.get("metrics")
        if metrics is not None and key in metrics:
            content = RecordDict(dict(reply.content.items()))
            patched = MetricRecord(dict(metrics))
            patched[key] = value
            content["metrics"] = patched
            return _with_content(reply, content)
        return reply

    return fault


def _with_content(reply: Message, content: RecordDict) -> Message:
    return Message(content=content, metadata=reply.metadata)


@pytest.fixture
def in_process_grid() -> Callable[..., InProcessGrid]:
    return InProcessGrid
