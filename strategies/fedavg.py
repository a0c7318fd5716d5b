"""FedAvg for homogeneous devices: the weight-averaging reference point.

The one strategy in hetkd where weights cross the wire, kept only to compare
against. Averaging is Flower's own (:class:`flwr.serverapp.strategy.FedAvg`,
sample-weighted); this class adds hetkd's device registry, reply checking and
reports, and refuses federations whose devices hold different architectures.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from hetkd import protocol as P
from hetkd.strategies.base import DeviceInfo, DeviceStrategy

__all__ = ["FedAvg", "HeterogeneousModelsError"]


class HeterogeneousModelsError(ValueError):
    """FedAvg was asked to average different architectures."""


class FedAvg(DeviceStrategy):
    """Federated averaging of the devices' (identical) models.

    Devices receive the global weights (``train``), train locally and return
    their weights; the server averages them weighted by ``num-examples``.
    Evaluation sends the global weights, so personalised accuracy is that of
    the global model on each device's test split.
    """

    train_action = P.TRAIN_FEDAVG

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._averaging = FlowerFedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)

    def on_devices_added(self, added: list[DeviceInfo]) -> None:
        architectures: dict[str, list[int]] = {}
        for info in self.devices.values():
            architectures.setdefault(info.architecture, []).append(info.device_id)
        if len(architectures) > 1:
            held = "; ".join(f"{a}: devices {sorted(ids)}" for a, ids in sorted(architectures.items()))
            raise HeterogeneousModelsError(
                f"FedAvg averages weights, so every device must hold the same architecture, but {held}. "
                "Use models.assignment=homogeneous, or a distillation strategy."
            )

    def train_content(self, server_round: int, node_id: int, config: ConfigRecord, arrays: ArrayRecord) -> RecordDict:
        return RecordDict({P.ARRAYS: arrays, P.CONFIG: config})

    def evaluate_content(self, server_round: int, node_id: int, config: ConfigRecord, arrays: ArrayRecord) -> RecordDict:
        return RecordDict({P.ARRAYS: arrays, P.CONFIG: config})

    def check_train_reply(self, reply: Message) -> str | None:
        arrays = reply.content.array_records.get(P.ARRAYS)
        if arrays is None:
            return f"FedAvg reply lacks its '{P.ARRAYS}' record"
        if len(reply.content.array_records) != 1:
            return "FedAvg reply must carry exactly one ArrayRecord"
        for key, array in arrays.items():
            values = array.numpy()
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return f"FedAvg reply has non-finite values in '{key}'"
        return None

    def process_train_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        if not replies:
            return None
        keys = set(replies[0].content[P.ARRAYS].keys())
        consistent = [r for r in replies if set(r.content[P.ARRAYS].keys()) == keys]
        for r in replies:
            if r not in consistent:
                self._report_failure(r.metadata.src_node_id, "FedAvg reply has different array keys", "train")
        try:
            arrays, _ = self._averaging.aggregate_train(server_round, consistent)
        except InconsistentMessageReplies as err:
            for r in consistent:
                self._report_failure(r.metadata.src_node_id, f"not averaged: {err}", "train")
            return None
        return arrays
