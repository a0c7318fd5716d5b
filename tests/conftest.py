"""Shared fixtures: small configs and an in-process Flower grid.

:class:`InProcessGrid` delivers every message to the real hetkd ClientApp in
this process (one Flower ``Context`` per node, as the Simulation Runtime
keeps them), records all traffic, and can make chosen devices fail, time out
or send corrupted replies. Protocol tests run on it in seconds; end-to-end
tests (marked ``slow``) go through Flower's real runtime instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hetkd.config import HetkdConfig, resolve_config

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


@dataclass
class Traffic:
    """One message and its reply, as recorded by :class:`InProcessGrid`."""

    message: Message
    reply: Message | None


@dataclass
class InProcessGrid:
    """A Flower Grid whose nodes run the real ClientApp in this process."""

    num_devices: int
    client_app: object = None
    run_config: dict = field(default_factory=dict)
    traffic: list[Traffic] = field(default_factory=list)
    #: node id -> fault: "error", "drop" (no reply) or a function(reply) -> reply
    faults: dict[int, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.client_app is None:
            from hetkd.clients.app import app

            self.client_app = app
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0
        self.node_ids = [1000 + 7 * i for i in range(self.num_devices)]  # not 0..n: ids are opaque
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": self.num_devices},
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
            for i, node in enumerate(self.node_ids)
        }
        self.connected = set(self.node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.node_ids if n in self.connected]

    def _deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        fault = self.faults.get(node)
        if fault == "drop" or node not in self.connected:
            return None
        if fault == "error":
            return Message(Error(code=0, reason="simulated device crash"), reply_to=message)
        try:
            reply = self.client_app(message, self.contexts[node])  # type: ignore[operator]
        except Exception as err:  # what Flower's runtime does with a raising ClientApp
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
        if callable(fault):
            reply = fault(reply)
        return reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            reply = self._deliver(message)
            self.traffic.append(Traffic(message, reply))
            if reply is not None:
                replies.append(reply)
        return replies


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
