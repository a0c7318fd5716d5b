"""Machinery shared by every hetkd strategy: devices that keep their own models.

:class:`DeviceStrategy` is a Flower Message-API :class:`~flwr.serverapp.strategy.Strategy`
that adds what heterogeneous, distillation-based federations need around
Flower's round loop:

* a **device registry**: each node is set up once (:class:`~hetkd.protocol.SetupRequest`)
  and answers with its device id, architecture and data sizes (never data or
  weights); nodes that join late are set up at the next round;
* **seeded sampling** by device id (:mod:`hetkd.sampling`), so the same seed
  samples the same devices however Flower numbers its nodes;
* **typed replies**: every reply is decoded into the reply type of its request
  (:mod:`hetkd.protocol`); an error, a timeout, a malformed reply or one the
  strategy's own check refuses leaves that device out of the round and is
  reported, never raised;
* **metering**: bytes each way per device and round (:mod:`hetkd.strategies.metering`);
* **evaluation**: every device evaluates its own model on its test split
  (personalised accuracy) and on the global test set;
* a per-round :class:`RoundReport` handed to ``on_round_end`` callbacks.

A strategy says what a training round sends and what it learns from the
replies, in two hooks that return what they compute:
:meth:`DeviceStrategy.plan_train` (the round's requests, per device) and
:meth:`DeviceStrategy.learn` (the figures it made of the replies). What the
algorithm keeps across rounds (predictions on record, a generator, a
student) lives on the strategy; the round in flight lives in the base class,
because Flower's ``configure_train`` and ``aggregate_train`` are separate calls.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from logging import DEBUG, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from hetkd import protocol as P
from hetkd.interrupt import raise_if_stopped
from hetkd.results import accuracy_summary
from hetkd.sampling import Sampling, sample_devices, wait_until
from hetkd.settings import with_overrides
from hetkd.strategies.metering import MeteredGrid
from hetkd.strategies.rounds import (
    DeviceInfo,
    Figures,
    RoundLog,
    RoundPlan,
    RoundReport,
    decode_reply,
    finite,
    privacy_figures,
    say_where_the_models_are,
    sum_finite,
    warn_ignored_flower_config,
)
from hetkd.training import TrainingUpdate

__all__ = ["DeviceInfo", "DeviceStrategy", "Figures", "RoundPlan", "RoundReport"]


class DeviceStrategy(Strategy):
    """Base class: a federation of devices that each keep their own model.

    Parameters
    ----------
    fraction_train, fraction_evaluate, min_devices, evaluate_every, wait_for_devices
        Override single fields of ``sampling`` (Flower's names; ``None``: keep it).
    sampling : Sampling | None
        Who takes part and when (default :class:`~hetkd.sampling.Sampling`'s).
    num_devices : int | None
        How many devices the run expects; the first round waits up to
        ``sampling.wait_for_devices`` seconds for all of them.
    seed : int
        Seeds device sampling and every random choice of the strategy.
    device_config : str | None
        The run configuration (YAML) sent to devices at set-up; ``None`` lets
        each device use its own (the run config Flower gives it, or the model
        and data of :func:`hetkd.clients.make_client_app`).
    """

    #: the request a training round sends (subclasses set theirs)
    request_type: type[P.Request] = P.LocalTrainRequest

    def __init__(
        self,
        *,
        fraction_train: float | None = None,
        fraction_evaluate: float | None = None,
        min_devices: int | None = None,
        evaluate_every: int | None = None,
        wait_for_devices: float | None = None,
        sampling: Sampling | None = None,
        num_devices: int | None = None,
        seed: int = 0,
        device_config: str | None = None,
    ) -> None:
        given = {"fraction_train": fraction_train, "fraction_evaluate": fraction_evaluate,
                 "min_devices": min_devices, "evaluate_every": evaluate_every, "wait_for_devices": wait_for_devices}
        self.sampling = with_overrides(Sampling, sampling, {k: v for k, v in given.items() if v is not None})
        if num_devices is not None and num_devices < self.sampling.min_devices:
            raise ValueError(f"num_devices ({num_devices}) must be >= min_devices ({self.sampling.min_devices})")
        self.num_devices = num_devices
        self.seed = seed
        self.device_config = device_config
        self.devices: dict[int, DeviceInfo] = {}  # node id -> info
        self.rejected: dict[int, str] = {}  # node id -> why its set-up failed
        self.timeout: float = 3600.0
        self.num_rounds = 0  # the running start()'s, for strategies with phases
        self._round = RoundLog()

    # ------------------------------------------------------------------ settings

    def settings(self) -> dict[str, Any]:
        """The strategy's settings objects, by the run-config group they come from."""
        return {"strategy": self.sampling}

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> %s", type(self).__name__)
        s = self.sampling
        log(INFO, "\t│\t├── fraction train %.2f | evaluate %.2f", s.fraction_train, s.fraction_evaluate)
        log(INFO, "\t│\t└── min devices %d | expected %s", s.min_devices, self.num_devices)

    # ------------------------------------------------------------------ registry

    def device_id(self, node_id: int) -> int:
        """The device id a registered node reported (its partition id)."""
        return self.devices[node_id].device_id

    def _messages(self, requests: dict[int, P.Request]) -> list[Message]:
        """The requests (by device id) as Flower messages to the nodes that serve those devices."""
        node_of = {info.device_id: node for node, info in self.devices.items()}
        return [request.message(node_of[device]) for device, request in requests.items()]

    def report_failure(self, node_id: int, reason: str, phase: str, device: int | None = None) -> None:
        """Leave ``node_id`` (serving ``device``, when known) out of ``phase``, log why, and note it
        in the round's report."""
        if device is None and node_id in self.devices:
            device = self.devices[node_id].device_id
        self._round.failures.append({"device": device, "node": node_id, "phase": phase, "reason": reason})
        log(WARNING, "device %s (node %d) left out of %s: %s", device, node_id, phase, reason)
        if device is not None:
            self.on_device_failed(device, reason, phase)

    def on_device_failed(self, device_id: int, reason: str, phase: str) -> None:
        """Hook: a registered device was left out of ``phase`` (forget what it may have lost)."""

    def setup_devices(self, grid: Grid, block: bool = False) -> list[DeviceInfo]:
        """Set up nodes not yet registered; with ``block``, wait for the expected number.

        Returns the devices registered by this call.
        """
        expected = self.num_devices or self.sampling.min_devices
        if block:
            wait = self.sampling.wait_for_devices
            wait_until(lambda: len(list(grid.get_node_ids())) >= expected, wait)
            connected = len(list(grid.get_node_ids()))
            if connected < self.sampling.min_devices:
                raise RuntimeError(
                    f"only {connected} device(s) connected after {wait:.0f}s, need at least "
                    f"{self.sampling.min_devices}; in a simulation, pass --federation-config "
                    f"\"num-supernodes={expected}\" to flwr run (simulation.num_devices={expected})"
                )
            if connected < expected:
                log(WARNING, "%d of %d expected devices connected; starting with those", connected, expected)
        new = [n for n in grid.get_node_ids() if n not in self.devices and n not in self.rejected]
        if not new:
            return []
        request = P.SetupRequest(run_config=self.device_config)
        added = []
        for reply in grid.send_and_receive([request.message(n) for n in new], timeout=self.timeout):
            node = reply.metadata.src_node_id
            decoded, problem = decode_reply(reply, P.SetupReply)
            if problem is not None:
                self.report_failure(node, problem, "setup")
                self.rejected[node] = problem  # not asked again: its answer would not change
                continue
            assert isinstance(decoded, P.SetupReply)
            info = DeviceInfo(node, decoded.device_id, decoded.architecture, decoded.num_train, decoded.num_test,
                              decoded.num_params, decoded.model_bytes, decoded.num_reference)
            refused = self.admit(info)
            if refused is not None:
                self.report_failure(node, refused, "setup", device=info.device_id)
                self.rejected[node] = refused
                continue
            # a device that rejoined under a new node id replaces its old entry
            for old in [n for n, d in self.devices.items() if d.device_id == info.device_id]:
                del self.devices[old]
            self.devices[node] = info
            added.append(info)
        if added:
            log(INFO, "set up %d device(s); %d registered", len(added), len(self.devices))
        self.on_devices_added(added)
        return added

    def admit(self, info: DeviceInfo) -> str | None:
        """Hook: why a device that was set up cannot join this federation, or ``None``."""
        return None

    def on_devices_added(self, added: list[DeviceInfo]) -> None:
        """Hook: called after set-up with the newly registered devices."""

    def available(self, grid: Grid) -> list[int]:
        """Registered nodes that are connected now, ordered by device id."""
        connected = set(grid.get_node_ids())
        return sorted((n for n in self.devices if n in connected), key=self.device_id)

    def sample(self, grid: Grid, server_round: int, fraction: float, purpose: str) -> list[int]:
        """Seeded sample of ``fraction`` of the available devices (node ids, in device order).

        With fewer than ``min_devices`` of them connected (nodes that missed heartbeats or rejoined
        under a new node id), it first waits up to ``wait_for_devices`` s, as the first round does.
        """
        nodes, least = self.available(grid), self.sampling.min_devices
        if len(nodes) < least and fraction > 0:
            log(WARNING, "round %d (%s): %d registered device(s) connected, fewer than min_devices=%d; waiting up "
                "to %.0fs", server_round, purpose, len(nodes), least, self.sampling.wait_for_devices)
            def back() -> bool:
                self.setup_devices(grid)  # a device back under a new node id is set up again
                return len(self.available(grid)) >= least
            back_in_time = wait_until(back, self.sampling.wait_for_devices)
            nodes = self.available(grid)
            if not back_in_time:
                log(WARNING, "round %d (%s): going on with %d device(s)", server_round, purpose, len(nodes))
        by_device = {self.device_id(n): n for n in nodes}
        chosen = sample_devices(list(by_device), fraction, self.sampling.min_devices, self.seed, server_round,
                                purpose)
        return [by_device[d] for d in chosen]

    # ------------------------------------------------------------------ the algorithm's hooks

    def plan_train(self, server_round: int, device_ids: list[int], arrays: ArrayRecord) -> RoundPlan:
        """The requests of a training round for the sampled ``device_ids`` (override it)."""
        return RoundPlan({d: P.LocalTrainRequest(server_round=server_round) for d in device_ids})

    def check_reply(self, device_id: int, request: P.Request, reply: P.Reply) -> str | None:
        """Why a decoded training reply cannot be used (its payload's shape, say), or ``None``."""
        return None

    def learn(self, server_round: int, plan: RoundPlan, replies: dict[int, P.Reply]) -> Figures:
        """Use the round's valid training replies (by device id, in device order); return figures."""
        return Figures()

    def initial_global(self, initial_arrays: ArrayRecord) -> ArrayRecord | None:
        """Hook: take the ``initial_arrays`` handed to :meth:`start` as the global model's starting
        weights, and return the global model (``None``: the strategy keeps none)."""
        return None

    def global_arrays(self) -> ArrayRecord | None:
        """The global model after the latest round, for Flower's ``Result.arrays`` (``None``: none)."""
        return None

    def plan_evaluate(self, server_round: int, device_ids: list[int], arrays: ArrayRecord) -> dict[int, P.Request]:
        """The requests of an evaluation (each device evaluates its own model)."""
        return {d: P.EvaluateRequest(server_round=server_round) for d in device_ids}

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        """Hook: write strategy-specific files (e.g. plots) after the run; returns them."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What the strategy has learnt so far, for a checkpoint: tensors and plain values (not its
        settings, and not the devices on record, which set-up learns again). Learning strategies extend it."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned (a resumed run)."""

    # ------------------------------------------------------------------ Flower's Strategy interface

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One request per sampled device, as :meth:`plan_train` decides."""
        nodes = self.sample(grid, server_round, self.sampling.fraction_train, "train")
        log(DEBUG, "configure_train: %d of %d devices", len(nodes), len(self.devices))
        training, unknown = TrainingUpdate.from_flower(config)
        warn_ignored_flower_config(unknown, "train_config")
        plan = self.plan_train(server_round, [self.device_id(n) for n in nodes], arrays)
        if training is not None:  # the ServerApp's training settings (lr, local epochs, batch size) go to every device
            plan.requests = {d: replace(r, training=training) for d, r in plan.requests.items()}
        self._round.plan = plan
        self._round.figures.add(plan.figures)
        return self._messages(plan.requests)

    def _valid(self, replies: Iterable[Message], requests: dict[int, P.Request], phase: str) -> dict[int, P.Reply]:
        """Decoded replies that pass every check, by device id in device order; the others are reported.

        Device order, not arrival order: floating-point sums over the replies
        (ensembles, averages) then do not depend on which device the runtime
        finished first.
        """
        valid: dict[int, P.Reply] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self.devices:
                self.report_failure(node, "reply from a node that was never set up", phase)
                continue
            device = self.device_id(node)
            request = requests.get(device)
            if request is None:
                self.report_failure(node, "reply to a request this round never sent it", phase)
                continue
            decoded, problem = decode_reply(reply, request.reply_type)
            if problem is None and phase == "train":
                problem = self.check_reply(device, request, decoded)  # type: ignore[arg-type]
            if problem:
                self.report_failure(node, problem, phase)
            else:
                valid[device] = decoded  # type: ignore[assignment]
        return dict(sorted(valid.items()))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check the replies, hand the valid ones to :meth:`learn`, sum up training."""
        plan = self._round.plan or RoundPlan({})
        valid = self._valid(replies, plan.requests, "train")
        self._round.figures.add(self.learn(server_round, plan, valid))
        if not valid:
            return self.global_arrays(), None
        losses, weights, rows = [], [], self._round.figures.devices
        for device, reply in valid.items():
            assert isinstance(reply, P.TrainReply)
            rows.setdefault(device, {}).update(train_loss=reply.train_loss, trained=True)
            if math.isfinite(reply.train_loss):
                losses.append(reply.train_loss)
                weights.append(float(reply.num_examples))
        train = [r for r in valid.values() if isinstance(r, P.TrainReply)]
        self._round.figures.add(privacy_figures(valid))
        metrics = self._round.figures.metrics
        # where the devices' time went (summed): their handlers, and training within them
        metrics["devices_handler_seconds"] = sum_finite(r.handler_seconds for r in train)
        metrics["devices_train_seconds"] = sum_finite(r.train_seconds for r in train)
        self._note_peak(valid.values())
        record = MetricRecord({"num-devices": len(valid)})
        if losses and sum(weights) > 0:
            record["train-loss"] = float(np.average(losses, weights=weights))
        metrics["train_loss"] = record.get("train-loss")
        return self.global_arrays(), record

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sampled devices to evaluate their model, personalised and global (not those that
        failed earlier in the round)."""
        nodes = self.sample(grid, server_round, self.sampling.fraction_evaluate, "evaluate")
        warn_ignored_flower_config(list(config.keys()), "evaluate_config")
        # a device that failed this round (its training, say) is reported among the failures,
        # not averaged into the round's figures
        failed = {f["device"] for f in self._round.failures}
        requests = self.plan_evaluate(server_round, [d for d in map(self.device_id, nodes) if d not in failed], arrays)
        self._round.evaluating = requests
        return self._messages(requests)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Personalised and global accuracy: mean, std, worst 10%, sample-weighted.

        Global figures cover the devices that hold a global test set; with none,
        they are left out (not reported as NaN).
        """
        valid = self._valid(replies, self._round.evaluating, "evaluate")
        if not valid:
            return None
        personal, weights, global_ = [], [], []
        rows = self._round.figures.devices
        for device, reply in valid.items():
            assert isinstance(reply, P.EvaluateReply)
            rows.setdefault(device, {}).update(personalised_accuracy=reply.personalised_accuracy,
                                               global_accuracy=reply.global_accuracy)
            personal.append(reply.personalised_accuracy)
            weights.append(float(reply.num_test))
            if reply.global_accuracy is not None:
                global_.append(reply.global_accuracy)
        self._note_peak(valid.values())
        summary = accuracy_summary(personal, weights, "personalised_accuracy_")
        if global_:
            g = accuracy_summary(global_, None, "global_accuracy_")
            summary["global_accuracy_mean"] = g["global_accuracy_mean"]
            summary["global_accuracy_std"] = g["global_accuracy_std"]
        self._round.figures.metrics.update(summary)
        return MetricRecord({k.replace("_", "-"): v for k, v in summary.items() if finite(v)}
                            | {"num-devices": len(valid)})

    def _note_peak(self, replies: Iterable[P.Reply]) -> None:
        peaks = [r.peak_rss_mb for r in replies if finite(r.peak_rss_mb)]
        if peaks:
            metrics = self._round.figures.metrics
            metrics["device_peak_rss_mb"] = max([metrics.get("device_peak_rss_mb") or 0.0, *peaks])

    # ------------------------------------------------------------------ the loop

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
        first_round: int = 1,
    ) -> Result:
        """Flower's round loop (train, evaluate, ``evaluate_fn``) plus device set-up,
        metering and a :class:`RoundReport` per round for ``on_round_end``.

        Takes the same arguments as :meth:`flwr.serverapp.strategy.Strategy.start`
        and returns the same :class:`~flwr.serverapp.strategy.Result`. A resumed
        run (its state taken back with :meth:`load_state_dict`) starts at
        ``first_round``; the loop stops at a requested interrupt
        (:mod:`hetkd.interrupt`), abandoning the round under way.
        """
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        if not 1 <= first_round <= num_rounds:
            raise ValueError(f"first_round must be in [1, num_rounds={num_rounds}], got {first_round}")
        self.timeout = timeout
        self.num_rounds = num_rounds
        meter = MeteredGrid(grid)
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        arrays = ArrayRecord() if initial_arrays is None else initial_arrays
        global_model = self.initial_global(arrays)
        result = Result(arrays=global_model if global_model is not None else ArrayRecord())
        log(INFO, "Starting %s for %d rounds", type(self).__name__, num_rounds)
        self.summary()
        self._round = RoundLog()
        self.setup_devices(meter, block=True)  # type: ignore[arg-type]
        if evaluate_fn is not None and first_round == 1:
            res = evaluate_fn(0, arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        for server_round in range(first_round, num_rounds + 1):
            raise_if_stopped(f"before round {server_round}")
            started = time.perf_counter()
            meter.reset()
            self.setup_devices(meter)  # type: ignore[arg-type]  # late joiners
            meter.phase = "train"
            messages = list(self.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), meter))  # type: ignore[arg-type]
            sampled = len(messages)
            replies = meter.send_and_receive(messages, timeout=timeout)
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            if self.sampling.evaluates(server_round, num_rounds):
                meter.phase = "evaluate"
                messages = list(self.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config)), meter))  # type: ignore[arg-type]
                replies = meter.send_and_receive(messages, timeout=timeout)
                eval_metrics = self.aggregate_evaluate(server_round, replies)
                if eval_metrics is not None:
                    result.evaluate_metrics_clientapp[server_round] = eval_metrics
            if evaluate_fn is not None:
                res = evaluate_fn(server_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
                    self._round.figures.metrics.update({f"server_{k.replace('-', '_')}": v for k, v in res.items()})
            for node, reason in meter.unanswered.items():
                self.report_failure(node, reason, "round")
            report = self._report(server_round, time.perf_counter() - started, meter, sampled)
            log(INFO, "round %d: %s", server_round,
                {k: v for k, v in report.metrics.items()
                 if (k.endswith("accuracy_mean") or k == "student_accuracy") and finite(v)})
            self._round = RoundLog()
            if on_round_end is not None:
                on_round_end(report)
        if global_model is None:
            say_where_the_models_are(type(self).__name__, handed=len(arrays) > 0)
        return result

    def _report(self, server_round: int, seconds: float, meter: MeteredGrid, sampled: int) -> RoundReport:
        up, down = meter.per_device("train")
        eval_up, eval_down = meter.per_device("evaluate")
        metrics = dict(self._round.figures.metrics)
        metrics.update(
            {
                "bytes_up_per_device": up,
                "bytes_down_per_device": down,
                "eval_bytes_up_per_device": eval_up,
                "eval_bytes_down_per_device": eval_down,
                "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            }
        )
        devices = self._round.figures.devices
        trained = sum(1 for row in devices.values() if row.get("trained"))
        return RoundReport(server_round, seconds, sampled, trained, metrics, dict(devices),
                           list(self._round.failures))

