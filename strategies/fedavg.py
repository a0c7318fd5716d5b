"""FedAvg for homogeneous devices: the weight-averaging reference point.

The one strategy in hetkd where weights cross the wire, kept only to compare
against. Averaging is Flower's own (:func:`flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`,
sample-weighted); this class adds hetkd's device registry, reply checking and
reports, and refuses federations whose devices hold different architectures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from hetkd import protocol as P
from hetkd.strategies.base import DeviceInfo, DeviceStrategy, Figures, RoundPlan

__all__ = ["FedAvg", "HeterogeneousModelsError"]


class HeterogeneousModelsError(ValueError):
    """FedAvg was asked to average different architectures."""


class FedAvg(DeviceStrategy):
    """Federated averaging of the devices' (identical) models.

    Devices receive the global weights (:class:`~hetkd.protocol.FedAvgRequest`),
    train locally and return their weights; the server averages them weighted
    by ``num_examples``. Evaluation sends the global weights, so personalised
    accuracy is that of the global model on each device's test split.
    """

    request_type = P.FedAvgRequest

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weights: ArrayRecord | None = None

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

    def initial_global(self, initial_arrays: ArrayRecord) -> ArrayRecord | None:
        self.weights = initial_arrays
        return initial_arrays

    def plan_train(self, server_round: int, device_ids: list[int], arrays: ArrayRecord) -> RoundPlan:
        self.weights = arrays
        weights = arrays.to_torch_state_dict()
        return RoundPlan({d: P.FedAvgRequest(server_round=server_round, weights=weights) for d in device_ids})

    def plan_evaluate(self, server_round: int, device_ids: list[int], arrays: ArrayRecord) -> dict[int, P.Request]:
        weights = arrays.to_torch_state_dict() if len(arrays) else None
        return {d: P.EvaluateRequest(server_round=server_round, weights=weights) for d in device_ids}

    def check_reply(self, device_id: int, request: P.Request, reply: P.Reply) -> str | None:
        assert isinstance(reply, P.FedAvgReply) and isinstance(request, P.FedAvgRequest)
        if set(reply.weights) != set(request.weights):
            return "FedAvg reply has different array keys"
        for key, tensor in reply.weights.items():
            values = tensor.numpy()
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                return f"FedAvg reply has non-finite values in '{key}'"
        return None

    def learn(self, server_round: int, plan: RoundPlan, replies: dict[int, P.Reply]) -> Figures:
        records = [RecordDict({"weights": ArrayRecord(r.weights), "size": MetricRecord({"n": r.num_examples})})  # type: ignore[attr-defined]
                   for r in replies.values()]
        if records:
            self.weights = aggregate_arrayrecords(records, "n")
        return Figures()

    def global_arrays(self) -> ArrayRecord | None:
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        """The global model."""
        return super().state_dict() | {"weights": None if self.weights is None else self.weights.to_torch_state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.weights = None if state["weights"] is None else ArrayRecord(state["weights"])
