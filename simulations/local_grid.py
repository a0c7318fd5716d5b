"""A Flower Grid whose nodes run the real hetkd ClientApp in this process.

:class:`InProcessGrid` keeps one Flower ``Context`` per node, as the
Simulation Runtime does, delivers every message to the ClientApp in turn,
records all traffic, and can make chosen devices fail, time out or send
corrupted replies. The protocol tests run on it in seconds, and ``hetkd
bench`` meters each strategy's bytes on it without starting Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "Traffic"]


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
    #: node id -> a function(message) -> message applied to what the node is sent (a malformed request)
    tamper: dict[int, Callable[[Message], Message]] = field(default_factory=dict)

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
        if node in self.tamper:
            message = self.tamper[node](message)
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
