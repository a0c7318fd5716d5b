"""Machinery shared by every hetkd strategy: devices that keep their own models.

:class:`DeviceStrategy` is a Flower Message-API :class:`~flwr.serverapp.strategy.Strategy`
that adds what heterogeneous, distillation-based federations need around
Flower's round loop:

* a **device registry**: each node is set up once (``query.setup``) and
  answers with its device id, architecture and data sizes (never data or
  weights); nodes that join late are set up at the next round;
* **seeded sampling** by device id, so the same seed samples the same devices
  however Flower numbers its nodes;
* **reply checking**: errors, timeouts, missing keys and non-finite values
  leave that device out of the round and are reported, never raised;
* **metering**: bytes each way per device and round (protobuf payload size);
* **evaluation**: every device evaluates its own model on its test split
  (personalised accuracy) and on the global test set;
* a per-round :class:`RoundReport` handed to ``on_round_end`` callbacks.

Subclasses say what a training round sends and does with the replies
(:meth:`DeviceStrategy.train_content`, :meth:`DeviceStrategy.process_train_replies`).
"""

from __future__ import annotations

import math
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import DEBUG, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from hetkd import protocol as P
from hetkd.results import accuracy_summary

__all__ = [
    "DeviceInfo",
    "DeviceStrategy",
    "MeteredGrid",
    "RoundReport",
    "payload_bytes",
    "check_reply",
]


def payload_bytes(content: RecordDict) -> int:
    """Size of a message's content as Flower serialises it (protobuf bytes)."""
    return recorddict_to_proto(content).ByteSize()


class MeteredGrid:
    """A :class:`~flwr.serverapp.Grid` wrapper that counts payload bytes per node.

    Traffic is booked under the current ``phase`` (``"train"`` for the
    algorithm's exchange, ``"evaluate"`` for measurement).
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
        for m in messages:
            self.down[self.phase][m.metadata.dst_node_id] += payload_bytes(m.content)
        if not messages:
            return []
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        sent = {m.metadata.message_id: m for m in messages if m.metadata.message_id}  # ids are set on sending
        replies = [_addressed(r, sent) for r in replies]
        answered = set()
        for r in replies:
            answered.add(r.metadata.src_node_id)
            if not r.has_error():
                self.up[self.phase][r.metadata.src_node_id] += payload_bytes(r.content)
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.unanswered[m.metadata.dst_node_id] = f"no reply within {timeout}s ({m.metadata.message_type})"
        return replies

    def per_device(self, phase: str) -> tuple[float | None, float | None]:
        """Mean bytes (up, down) per device that took part in ``phase``."""
        nodes = set(self.down[phase]) | set(self.up[phase])
        if not nodes:
            return None, None
        n = len(nodes)
        return sum(self.up[phase].values()) / n, sum(self.down[phase].values()) / n


def _addressed(reply: Message, sent: dict[str, Message]) -> Message:
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
        row: dict[str, Any] = {
            "round": self.round,
            "seconds": self.seconds,
            "sampled": self.sampled,
            "trained": self.trained,
        }
        row.update(self.metrics)
        row["failures"] = self.failures
        row["devices"] = {str(k): v for k, v in sorted(self.devices.items())}
        return row


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_reply(message: Message, required: Iterable[str] = (), finite: Iterable[str] = ()) -> str | None:
    """Why a reply cannot be used, or ``None`` if it can.

    ``required`` metric keys must be present in its ``metrics`` record;
    ``finite`` ones must also be finite numbers.
    """
    if message.has_error():
        return f"device error: {message.error.reason}"
    metrics = message.content.metric_records.get(P.METRICS)
    if metrics is None:
        return f"reply lacks its '{P.METRICS}' record"
    missing = [k for k in required if k not in metrics]
    if missing:
        return f"reply lacks metric(s) {missing}"
    bad = [k for k in finite if not _finite(metrics.get(k))]
    if bad:
        return f"reply has non-finite metric(s) {bad}"
    return None


class DeviceStrategy(Strategy):
    """Base class: a federation of devices that each keep their own model.

    Parameters
    ----------
    fraction_train : float
        Fraction of registered devices sampled for each training round.
    fraction_evaluate : float
        Fraction of registered devices asked to evaluate (0 skips evaluation).
    min_devices : int
        At least this many devices are sampled, and the run waits for at
        least this many before it starts.
    num_devices : int | None
        How many devices the run expects; the first round waits up to
        ``wait_for_devices`` seconds for all of them.
    evaluate_every : int
        Evaluate every this many rounds (and always after the last round).
    seed : int
        Seeds device sampling (together with the round number).
    device_config : str | None
        The run configuration (YAML) sent to devices at set-up; ``None`` lets
        each device use the run config Flower gives it.
    wait_for_devices : float
        Seconds to wait for ``num_devices`` nodes to connect.
    """

    #: message type of a training round; subclasses set their action
    train_action: str = P.TRAIN_LOCAL

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_devices: int = 1,
        num_devices: int | None = None,
        evaluate_every: int = 1,
        seed: int = 0,
        device_config: str | None = None,
        wait_for_devices: float = 120.0,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate}")
        if min_devices < 1:
            raise ValueError(f"min_devices must be >= 1, got {min_devices}")
        if num_devices is not None and num_devices < min_devices:
            raise ValueError(f"num_devices ({num_devices}) must be >= min_devices ({min_devices})")
        if evaluate_every < 1:
            raise ValueError(f"evaluate_every must be >= 1, got {evaluate_every}")
        if wait_for_devices <= 0:
            raise ValueError(f"wait_for_devices must be > 0, got {wait_for_devices}")
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_devices = min_devices
        self.num_devices = num_devices
        self.evaluate_every = evaluate_every
        self.seed = seed
        self.device_config = device_config
        self.wait_for_devices = wait_for_devices
        self.devices: dict[int, DeviceInfo] = {}  # node id -> info
        self.rejected: dict[int, str] = {}  # node id -> why its set-up failed
        self.timeout: float = 3600.0
        self.num_rounds = 0  # the running start()'s, for strategies with phases
        self._failures: list[dict[str, Any]] = []
        self._device_rows: dict[int, dict[str, Any]] = defaultdict(dict)
        self._round_metrics: dict[str, Any] = {}

    # ------------------------------------------------------------------ registry

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> %s", type(self).__name__)
        log(INFO, "\t│\t├── fraction train %.2f | evaluate %.2f", self.fraction_train, self.fraction_evaluate)
        log(INFO, "\t│\t└── min devices %d | expected %s", self.min_devices, self.num_devices)

    def device_id(self, node_id: int) -> int:
        """The device id a registered node reported (its partition id)."""
        return self.devices[node_id].device_id

    def _report_failure(self, node_id: int, reason: str, phase: str) -> None:
        device = self.devices[node_id].device_id if node_id in self.devices else None
        self._failures.append({"device": device, "node": node_id, "phase": phase, "reason": reason})
        log(WARNING, "device %s (node %d) left out of %s: %s", device, node_id, phase, reason)
        if device is not None:
            self.on_device_failed(device, reason, phase)

    def on_device_failed(self, device_id: int, reason: str, phase: str) -> None:
        """Hook: a registered device was left out of ``phase`` (forget what it may have lost)."""

    def setup_devices(self, grid: Grid, block: bool = False) -> list[DeviceInfo]:
        """Set up nodes not yet registered; with ``block``, wait for the expected number.

        Returns the devices registered by this call.
        """
        expected = self.num_devices or self.min_devices
        if block:
            deadline = time.monotonic() + self.wait_for_devices
            while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
                time.sleep(0.5)
            connected = len(list(grid.get_node_ids()))
            if connected < self.min_devices:
                raise RuntimeError(
                    f"only {connected} device(s) connected after {self.wait_for_devices:.0f}s, need at least "
                    f"{self.min_devices}; in a simulation, pass --federation-config "
                    f"\"num-supernodes={expected}\" to flwr run (simulation.num_devices={expected})"
                )
            if connected < expected:
                log(WARNING, "%d of %d expected devices connected; starting with those", connected, expected)
        new = [n for n in grid.get_node_ids() if n not in self.devices and n not in self.rejected]
        if not new:
            return []
        config = ConfigRecord({P.RUN_CONFIG_YAML: self.device_config} if self.device_config else {})
        messages = [Message(RecordDict({P.CONFIG: config}), n, P.SETUP) for n in new]
        added = []
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            problem = check_reply(reply, ("device-id", "num-train", "num-test", "num-params", "model-bytes"))
            if problem is None and P.DEVICE not in reply.content.config_records:
                problem = f"setup reply lacks its '{P.DEVICE}' record"
            if problem:
                self._report_failure(node, problem, "setup")
                self.rejected[node] = problem  # not asked again: its answer would not change
                continue
            m = reply.content.metric_records[P.METRICS]
            info = DeviceInfo(
                node_id=node,
                device_id=int(m["device-id"]),
                architecture=str(reply.content.config_records[P.DEVICE]["architecture"]),
                num_train=int(m["num-train"]),
                num_test=int(m["num-test"]),
                num_params=int(m["num-params"]),
                model_bytes=int(m["model-bytes"]),
            )
            # a device that rejoined under a new node id replaces its old entry
            for old in [n for n, d in self.devices.items() if d.device_id == info.device_id]:
                del self.devices[old]
            self.devices[node] = info
            added.append(info)
        if added:
            log(INFO, "set up %d device(s); %d registered", len(added), len(self.devices))
        self.on_devices_added(added)
        return added

    def on_devices_added(self, added: list[DeviceInfo]) -> None:
        """Hook: called after set-up with the newly registered devices."""

    def available(self, grid: Grid) -> list[int]:
        """Registered nodes that are connected now, ordered by device id."""
        connected = set(grid.get_node_ids())
        return sorted((n for n in self.devices if n in connected), key=self.device_id)

    def sample(self, grid: Grid, server_round: int, fraction: float, purpose: str) -> list[int]:
        """Seeded sample of ``fraction`` of the available devices (node ids)."""
        nodes = self.available(grid)
        if fraction <= 0 or not nodes:
            return []
        k = min(len(nodes), max(self.min_devices, int(round(fraction * len(nodes)))))
        if k == len(nodes):
            return nodes
        rng = np.random.default_rng([self.seed, server_round, 0 if purpose == "train" else 1])
        chosen = rng.choice(len(nodes), size=k, replace=False)
        return [nodes[i] for i in sorted(chosen)]

    # ------------------------------------------------------------------ training

    def train_content(self, server_round: int, node_id: int, config: ConfigRecord, arrays: ArrayRecord) -> RecordDict:
        """What a sampled device receives for training (override to add payloads)."""
        return RecordDict({P.CONFIG: config})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One ``train_action`` message per sampled device."""
        nodes = self.sample(grid, server_round, self.fraction_train, "train")
        log(DEBUG, "configure_train: %d of %d devices", len(nodes), len(self.devices))
        self.before_train(server_round, nodes)
        messages = []
        for node in nodes:
            cfg = ConfigRecord(dict(config))
            cfg[P.SERVER_ROUND] = server_round
            messages.append(Message(self.train_content(server_round, node, cfg, arrays), node, self.train_action))
        return messages

    def before_train(self, server_round: int, node_ids: list[int]) -> None:
        """Hook: called with the sampled nodes before their training messages are built."""

    #: metric keys a training reply must carry (finite)
    train_required: tuple[str, ...] = ("num-examples",)

    def valid_replies(self, replies: Iterable[Message], phase: str, required: Iterable[str] = (),
                      finite: Iterable[str] = ()) -> list[Message]:
        """Replies that pass :func:`check_reply`, in device order; the others are reported.

        Device order, not arrival order: floating-point sums over the replies
        (ensembles, averages) then do not depend on which device the runtime
        finished first.
        """
        valid = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self.devices:
                self._report_failure(node, "reply from a node that was never set up", phase)
                continue
            problem = check_reply(reply, required, finite)
            if problem is None:
                problem = self.check_train_reply(reply) if phase == "train" else None
            if problem:
                self._report_failure(node, problem, phase)
            else:
                valid.append(reply)
        return sorted(valid, key=lambda reply: self.device_id(reply.metadata.src_node_id))

    def check_train_reply(self, reply: Message) -> str | None:
        """Hook: strategy-specific check of a training reply's payload."""
        return None

    def process_train_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """Hook: use the valid training replies (e.g. compute targets). Returns new global arrays."""
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check replies, hand the valid ones to :meth:`process_train_replies`, average metrics."""
        valid = self.valid_replies(replies, "train", self.train_required, self.train_required)
        arrays = self.process_train_replies(server_round, valid)
        if not valid:
            return arrays, None
        losses, weights = [], []
        for reply in valid:
            m = reply.content.metric_records[P.METRICS]
            device = self.device_id(reply.metadata.src_node_id)
            row = self._device_rows[device]
            row["train_loss"] = m.get("train-loss")
            row["trained"] = True
            if _finite(m.get("train-loss")):
                losses.append(float(m["train-loss"]))  # type: ignore[arg-type]
                weights.append(float(m["num-examples"]))  # type: ignore[arg-type]
            self._note_peak(m)
        # where the devices' time went (summed): their handlers, and training within them
        for key in ("handler-seconds", "train-seconds"):
            values = [float(r.content[P.METRICS][key]) for r in valid if _finite(r.content[P.METRICS].get(key))]
            self._round_metrics[f"devices_{key.replace('-', '_')}"] = sum(values) if values else None
        metrics = MetricRecord({"num-devices": len(valid)})
        if losses and sum(weights) > 0:
            metrics["train-loss"] = float(np.average(losses, weights=weights))
        self._round_metrics["train_loss"] = metrics.get("train-loss")
        return arrays, metrics

    def note_device(self, device_id: int, **values: Any) -> None:
        """Add per-device figures to this round's report (``devices`` in metrics.jsonl)."""
        self._device_rows[device_id].update(values)

    def _note_peak(self, metrics: MetricRecord) -> None:
        peak = metrics.get("peak-rss-mb")
        if _finite(peak):
            current = self._round_metrics.get("device_peak_rss_mb") or 0.0
            self._round_metrics["device_peak_rss_mb"] = max(current, float(peak))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ evaluation

    def evaluate_content(self, server_round: int, node_id: int, config: ConfigRecord, arrays: ArrayRecord) -> RecordDict:
        """What a device receives for evaluation (its own model is evaluated by default)."""
        return RecordDict({P.CONFIG: config})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sampled devices to evaluate their model, personalised and global."""
        nodes = self.sample(grid, server_round, self.fraction_evaluate, "evaluate")
        messages = []
        for node in nodes:
            cfg = ConfigRecord(dict(config))
            cfg[P.SERVER_ROUND] = server_round
            messages.append(Message(self.evaluate_content(server_round, node, cfg, arrays), node, MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Personalised and global accuracy: mean, std, worst 10%, sample-weighted."""
        valid = self.valid_replies(replies, "evaluate", ("personalised-accuracy", "num-test"))
        if not valid:
            return None
        pers, weights, glob = [], [], []
        for reply in valid:
            m = reply.content.metric_records[P.METRICS]
            device = self.device_id(reply.metadata.src_node_id)
            row = self._device_rows[device]
            row["personalised_accuracy"] = m.get("personalised-accuracy")
            row["global_accuracy"] = m.get("global-accuracy")
            pers.append(float(m["personalised-accuracy"]))  # type: ignore[arg-type]
            weights.append(float(m["num-test"]))  # type: ignore[arg-type]
            glob.append(float(m.get("global-accuracy", math.nan)))  # type: ignore[arg-type]
            self._note_peak(m)
        summary = accuracy_summary(pers, weights, "personalised_accuracy_")
        g = accuracy_summary(glob, None, "global_accuracy_")
        summary["global_accuracy_mean"] = g["global_accuracy_mean"]
        summary["global_accuracy_std"] = g["global_accuracy_std"]
        self._round_metrics.update(summary)
        return MetricRecord({k.replace("_", "-"): v for k, v in summary.items()} | {"num-devices": len(valid)})

    # ------------------------------------------------------------------ the loop

    def round_extras(self, server_round: int) -> dict[str, Any]:
        """Hook: strategy-specific figures for this round's report."""
        return {}

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        """Hook: write strategy-specific files (e.g. plots) after the run; returns them."""
        return []

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        on_round_end: Callable[[RoundReport], None] | None = None,
    ) -> Result:
        """Flower's round loop (train, evaluate, ``evaluate_fn``) plus device set-up,
        metering and a :class:`RoundReport` per round for ``on_round_end``.

        Takes the same arguments as :meth:`flwr.serverapp.strategy.Strategy.start`
        and returns the same :class:`~flwr.serverapp.strategy.Result`.
        """
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        self.timeout = timeout
        self.num_rounds = num_rounds
        meter = MeteredGrid(grid)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        arrays = ArrayRecord() if initial_arrays is None else initial_arrays
        result = Result(arrays=arrays)
        log(INFO, "Starting %s for %d rounds", type(self).__name__, num_rounds)
        self.summary()
        self._failures, self._device_rows, self._round_metrics = [], defaultdict(dict), {}
        meter.phase = "setup"
        self.setup_devices(meter, block=True)
        if evaluate_fn is not None:
            res = evaluate_fn(0, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        for server_round in range(1, num_rounds + 1):
            started = time.perf_counter()
            meter.reset()
            meter.phase = "setup"
            self.setup_devices(meter)  # late joiners
            meter.phase = "train"
            messages = list(self.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), meter))
            sampled = len(messages)
            replies = meter.send_and_receive(messages, timeout=timeout)
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            if server_round % self.evaluate_every == 0 or server_round == num_rounds:
                meter.phase = "evaluate"
                messages = list(self.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config)), meter))
                replies = meter.send_and_receive(messages, timeout=timeout)
                eval_metrics = self.aggregate_evaluate(server_round, replies)
                if eval_metrics is not None:
                    result.evaluate_metrics_clientapp[server_round] = eval_metrics
            if evaluate_fn is not None:
                res = evaluate_fn(server_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
                    self._round_metrics.update({f"server_{k.replace('-', '_')}": v for k, v in res.items()})
            for node, reason in meter.unanswered.items():
                self._report_failure(node, reason, "round")
            report = self._report(server_round, time.perf_counter() - started, meter, sampled)
            log(INFO, "round %d: %s", server_round, {k: v for k, v in report.metrics.items() if "accuracy_mean" in k})
            self._failures, self._device_rows, self._round_metrics = [], defaultdict(dict), {}
            if on_round_end is not None:
                on_round_end(report)
        return result

    def _report(self, server_round: int, seconds: float, meter: MeteredGrid, sampled: int) -> RoundReport:
        up, down = meter.per_device("train")
        eval_up, eval_down = meter.per_device("evaluate")
        metrics = dict(self._round_metrics)
        metrics.update(
            {
                "bytes_up_per_device": up,
                "bytes_down_per_device": down,
                "eval_bytes_up_per_device": eval_up,
                "eval_bytes_down_per_device": eval_down,
                "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            }
        )
        metrics.update(self.round_extras(server_round))
        trained = sum(1 for row in self._device_rows.values() if row.get("trained"))
        return RoundReport(server_round, seconds, sampled, trained, metrics, dict(self._device_rows), list(self._failures))
