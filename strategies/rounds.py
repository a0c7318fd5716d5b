"""What a round is made of: the devices on record, the server's plan, and the report.

* :class:`DeviceInfo` — what a node said about itself at set-up (public facts only);
* :class:`RoundPlan` — the requests a strategy decided to send, one per sampled device,
  and the :class:`Figures` the decision produced;
* :class:`RoundReport` — everything measured in one round, one ``metrics.jsonl`` line;
* :class:`RoundLog` — the round in flight while the base strategy builds its report;
* :func:`decode_reply` — a device's reply as its typed message, or why it cannot be used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message
from flwr.supercore import log

from hetkd import protocol as P

__all__ = ["DeviceInfo", "Figures", "RoundLog", "RoundPlan", "RoundReport", "decode_reply", "finite", "privacy_figures",
           "say_where_the_models_are", "sum_finite", "warn_ignored_flower_config"]


@dataclass(frozen=True)
class DeviceInfo:
    """What a node said about itself at set-up (public facts only)."""

    node_id: int
    device_id: int
    architecture: str
    num_train: int
    num_test: int
    num_params: int
    model_bytes: int
    num_reference: int


@dataclass
class Figures:
    """Figures for a round's report: round-level ``metrics`` and per-device rows."""

    metrics: dict[str, Any] = field(default_factory=dict)
    devices: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, other: Figures) -> Figures:
        """Fold ``other`` into these figures (its values win); returns ``self``."""
        self.metrics.update(other.metrics)
        for device, row in other.devices.items():
            self.devices.setdefault(device, {}).update(row)
        return self


@dataclass
class RoundPlan:
    """What the server decided for a training round: one request per sampled device
    (by device id), and the figures the decision produced. Strategies that need more
    of the round when the replies come back subclass it."""

    requests: dict[int, P.Request]
    figures: Figures = field(default_factory=Figures)


@dataclass
class RoundReport:
    """Everything measured in one round; flattened into one ``metrics.jsonl`` line."""

    round: int
    seconds: float
    sampled: int
    trained: int
    metrics: dict[str, Any] = field(default_factory=dict)
    devices: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"round": self.round, "seconds": self.seconds, "sampled": self.sampled,
                               "trained": self.trained}
        row.update(self.metrics)
        row["failures"] = self.failures
        row["devices"] = {str(k): v for k, v in sorted(self.devices.items())}
        return row


@dataclass
class RoundLog:
    """The round in flight: its plan, the figures so far, and who failed."""

    plan: RoundPlan | None = None
    evaluating: dict[int, P.Request] = field(default_factory=dict)
    figures: Figures = field(default_factory=Figures)
    failures: list[dict[str, Any]] = field(default_factory=list)


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite number."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def sum_finite(values: Iterable[float]) -> float | None:
    """The sum of the finite ``values`` (``None``: there are none)."""
    kept = [v for v in values if finite(v)]
    return sum(kept) if kept else None


def decode_reply(reply: Message, reply_type: type[P.Reply]) -> tuple[P.Reply | None, str | None]:
    """The reply decoded as ``reply_type``, or why it cannot be used."""
    if reply.has_error():
        return None, f"device error: {reply.error.reason}"
    try:
        return reply_type.from_record(reply.content), None
    except P.ProtocolError as err:
        return None, f"malformed {reply_type.__name__}: {err}"


_IGNORED_WARNED: set[str] = set()


def warn_ignored_flower_config(keys: list[str], name: str) -> None:
    """Flower ``train_config`` / ``evaluate_config`` entries that are not training settings: say once they stay here."""
    if keys and name not in _IGNORED_WARNED:
        _IGNORED_WARNED.add(name)
        log(WARNING, "%s keys %s are not sent to devices: hetkd's messages are typed (hetkd.protocol) and carry "
            "from Flower's config only lr, local-epochs and batch-size; configure the rest through the strategy's "
            "settings", name, sorted(keys))


def privacy_figures(replies: dict[int, P.Reply]) -> Figures:
    """What differentially private devices report of their budget: each one's ``epsilon`` and
    ``privacy_exhausted``, and the round's ``epsilon_max`` / ``epsilon_mean`` over them (no
    figures when no device runs with DP)."""
    figures = Figures()
    spent = {d: r for d, r in replies.items() if isinstance(r, P.TrainReply) and r.epsilon is not None}
    for device, reply in spent.items():
        figures.devices[device] = {"epsilon": reply.epsilon, "privacy_exhausted": bool(reply.privacy_exhausted)}
    if spent:
        epsilons = [float(r.epsilon) for r in spent.values()]  # type: ignore[arg-type]
        figures.metrics.update(epsilon_max=max(epsilons), epsilon_mean=sum(epsilons) / len(epsilons),
                               privacy_exhausted_devices=sum(bool(r.privacy_exhausted) for r in spent.values()))
    return figures


def say_where_the_models_are(strategy: str, handed: bool) -> None:
    """Once, at the end: there is no global model in ``result.arrays``; the devices hold theirs.

    A warning when the caller handed ``initial_arrays`` (a Flower quickstart
    saves ``result.arrays`` as its final model), a note otherwise.
    """
    log(WARNING if handed else INFO,
        "%s keeps no global model: result.arrays is empty%s. Every device keeps its own personalised "
        "model on its node: in Flower's Context.state, or on disk with make_client_app(..., state_dir=DIR) or "
        "the node config state-dir=DIR (hetkd run: simulation.state_store=disk, DIR=<out>/device-state), from "
        "where hetkd.clients.DiskStateStore(DIR, device_id).load()['model'] reads its weights",
        strategy, " (the initial_arrays handed to start() were not trained)" if handed else "")
