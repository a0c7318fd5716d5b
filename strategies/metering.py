"""Metering: how many bytes each device sends and receives, as Flower serialises them.

:class:`MeteredGrid` wraps any Flower :class:`~flwr.serverapp.Grid`, books the
protobuf payload size of every message under the phase it belongs to
(``setup``, ``train``, ``evaluate``), and notes the nodes that did not answer
in time. An error the SuperLink returns for a node that left is re-addressed
from that node (:func:`addressed`), so the right device is reported. While it
waits for replies it stops at a requested interrupt
(:func:`hetkd.interrupt.raise_if_stopped`): the round is abandoned.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from hetkd import protocol as P
from hetkd.interrupt import raise_if_stopped

__all__ = ["MeteredGrid", "payload_bytes", "addressed"]

#: the longest pause between two looks for replies (and for a request to stop), in seconds
MAX_PULL_INTERVAL = 0.5


def payload_bytes(content: RecordDict) -> int:
    """Size of a message's content as Flower serialises it (protobuf bytes)."""
    return recorddict_to_proto(content).ByteSize()


class MeteredGrid:
    """A :class:`~flwr.serverapp.Grid` wrapper that counts payload bytes per node.

    Traffic is booked under the current ``phase`` (``"train"`` for the
    algorithm's exchange, ``"evaluate"`` for measurement), set-up messages
    under ``"setup"`` whenever they are sent.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.phase = "train"
        self.reset()

    def reset(self) -> None:
        self.down: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.up: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.unanswered: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        # a set-up is booked as set-up whenever it happens (at the start, or a device that rejoins mid-round)
        setup = bool(messages) and messages[0].metadata.message_type == P.SetupRequest.message_type
        phase = "setup" if setup else self.phase
        for m in messages:
            self.down[phase][m.metadata.dst_node_id] += payload_bytes(m.content)
        if not messages:
            return []
        replies = self._push_and_pull(messages, timeout)
        sent = {m.metadata.message_id: m for m in messages if m.metadata.message_id}  # ids are set on sending
        replies = [addressed(r, sent) for r in replies]
        answered = set()
        for r in replies:
            answered.add(r.metadata.src_node_id)
            if not r.has_error():
                self.up[phase][r.metadata.src_node_id] += payload_bytes(r.content)
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.unanswered[m.metadata.dst_node_id] = f"no reply within {timeout}s ({m.metadata.message_type})"
        return replies

    def _push_and_pull(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Flower's ``Grid.send_and_receive``, looking for a request to stop between pulls.

        A stand-in that is not a Flower :class:`~flwr.serverapp.Grid` (a test's
        in-process grid) answers through its own ``send_and_receive``.
        """
        if not isinstance(self.grid, Grid):
            replies = list(self.grid.send_and_receive(messages, timeout=timeout))
            raise_if_stopped(f"'{messages[0].metadata.message_type}' abandoned")
            return replies
        pending = set(self.grid.push_messages(messages))
        action = messages[0].metadata.message_type
        interval = min(float(getattr(self.grid, "pull_interval", MAX_PULL_INTERVAL)), MAX_PULL_INTERVAL)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            raise_if_stopped(f"'{action}' abandoned, waiting for {len(pending)} of {len(messages)} replies")
            pulled = list(self.grid.pull_messages(pending))
            replies.extend(pulled)
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if not pending or deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(interval)
        return replies

    def per_device(self, phase: str) -> tuple[float | None, float | None]:
        """Mean bytes (up, down) per device that took part in ``phase``."""
        nodes = set(self.down[phase]) | set(self.up[phase])
        if not nodes:
            return None, None
        n = len(nodes)
        return sum(self.up[phase].values()) / n, sum(self.down[phase].values()) / n


def addressed(reply: Message, sent: dict[str, Message]) -> Message:
    """``reply`` as coming from the node it answers for.

    An error the SuperLink returns itself (e.g. "node unavailable" for a
    SuperNode that left mid-round) comes from the SuperLink's own node id;
    it is re-addressed from the node the message was sent to, so that node
    is the one reported and left out.
    """
    original = sent.get(reply.metadata.reply_to_message_id)
    if original is None or not reply.has_error() or reply.metadata.src_node_id == original.metadata.dst_node_id:
        return reply
    return Message(reply.error, reply_to=original)
