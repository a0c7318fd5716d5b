"""The messages: one request type per action, one reply type per request.

==============================  ===========================  ===============================
action (Flower message type)    server -> device             device -> server
==============================  ===========================  ===============================
``query.setup``                 :class:`SetupRequest`        :class:`SetupReply`
``train.local``                 :class:`LocalTrainRequest`   :class:`TrainReply`
``train.reference_distill``     :class:`ReferenceDistill`    :class:`ReferencePredictions`
``train.ensemble_distill``      :class:`EnsembleDistill`     :class:`QueryAnswers`
``train``                       :class:`FedAvgRequest`       :class:`FedAvgReply`
``evaluate``                    :class:`EvaluateRequest`     :class:`EvaluateReply`
==============================  ===========================  ===============================

The settings a device needs travel as the settings objects of the code that
uses them (:class:`~hetkd.distill.losses.KDTerm`,
:class:`~hetkd.distill.similarity.NeighbourSearch`, ...), so a setting's wire
form is its field in that class and nothing else. The replies are the
allow-list of what may leave a device: predictions on public inputs (or
answers to queries), public facts about the device, scalar metrics, and
weights only in the FedAvg baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hetkd.distill.emulation import EmulationLoss
from hetkd.distill.ensemble import ANSWER_MODELS
from hetkd.distill.losses import KDTerm, KLLoss
from hetkd.distill.queries import GeneratorSpec, QuerySpec
from hetkd.distill.similarity import NeighbourSearch
from hetkd.protocol.wire import Reply, Request, StateDict
from hetkd.settings import require_choice
from hetkd.training import TrainingUpdate

__all__ = [
    "ANSWER_MODELS",
    "SetupRequest",
    "SetupReply",
    "TrainRequest",
    "LocalTrainRequest",
    "TrainReply",
    "ReferenceDistill",
    "Population",
    "ReferencePredictions",
    "EnsembleDistill",
    "Targets",
    "QueryAnswers",
    "FedAvgRequest",
    "FedAvgReply",
    "EvaluateRequest",
    "EvaluateReply",
    "REQUESTS",
    "DEVICE_TO_SERVER",
]

# --------------------------------------------------------------------------- set-up


@dataclass(frozen=True, kw_only=True, eq=False)
class SetupReply(Reply):
    """Public facts about a device: who it is, its architecture and sizes; nothing learnt.

    ``num_reference`` is the size of the public reference set it holds (0: none).
    """

    device_id: int
    architecture: str
    num_train: int
    num_test: int
    num_params: int
    model_bytes: int
    num_reference: int


@dataclass(frozen=True, kw_only=True, eq=False)
class SetupRequest(Request):
    """Set a device up. ``run_config``: the run config as YAML (hetkd's zoo devices build
    their data and model from it); ``None`` lets the device use its own."""

    message_type: ClassVar[str] = "query.setup"
    reply_type: ClassVar[type[Reply]] = SetupReply

    run_config: str | None = None


# --------------------------------------------------------------------------- training


@dataclass(frozen=True, kw_only=True, eq=False)
class TrainReply(Reply):
    """What every training round reports: the private data's size and the training loss
    (NaN when no batch was trained, and from a DP device, which keeps it home), samples
    seen, seconds spent training; a DP device (:mod:`hetkd.privacy`) adds its ``epsilon``
    so far and whether its budget stopped training this round (``privacy_exhausted``;
    both ``None`` from a device without DP, so nothing about privacy travels then); a
    device that keeps a private answer model adds that model's training loss and seconds
    (``None`` otherwise; the loss ``None`` from a DP device too)."""

    num_examples: int
    train_loss: float
    samples_seen: int
    train_seconds: float
    epsilon: float | None = None
    privacy_exhausted: bool | None = None
    private_train_loss: float | None = None
    private_train_seconds: float | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class TrainRequest(Request):
    """What every training request carries: the round, and the training settings the run sets
    over the device's own (``training``: from the ServerApp's ``train_config``, e.g. ``lr``)."""

    server_round: int
    training: TrainingUpdate | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class LocalTrainRequest(TrainRequest):
    """Train on the private data alone (local-only)."""

    message_type: ClassVar[str] = "train.local"
    reply_type: ClassVar[type[Reply]] = TrainReply


@dataclass(frozen=True, kw_only=True, eq=False)
class Population:
    """Everyone's predictions, relayed so a device picks its own neighbours (SD-Dist's
    device-side selection): log-probabilities ``(n, R, C)`` of the devices
    ``device_ids``, their reference-set quality when the set is labelled, the
    search to run, and how the chosen neighbours combine (``aggregate``,
    ``trim_fraction``: :class:`~hetkd.distill.exchange.ReferenceDistillSettings`')."""

    reference_logits: np.ndarray
    device_ids: np.ndarray
    quality: np.ndarray | None = None
    search: NeighbourSearch
    aggregate: str
    trim_fraction: float


@dataclass(frozen=True, kw_only=True, eq=False)
class ReferencePredictions(TrainReply):
    """The device's log-probabilities on the reference set ``(R, C)``, at the requested
    precision, whether it distilled this round, and with device-side selection the mean
    distance to its neighbours and whether they changed (never who they are)."""

    reference_logits: np.ndarray
    distilled: bool
    neighbour_distance: float | None = None
    neighbours_changed: bool | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class ReferenceDistill(TrainRequest):
    """FedMD / SD-Dist: train on the private data, distilling towards ``targets``
    (log-probabilities ``(R, C)`` on the reference set) when there are any, or towards
    the mix of neighbours the device picks from ``population``; reply with predictions
    on the reference set encoded at ``precision``, made by the model ``answer_model``
    names (``private``: a copy trained on its private data alone)."""

    message_type: ClassVar[str] = "train.reference_distill"
    reply_type: ClassVar[type[Reply]] = ReferencePredictions

    kd: KDTerm
    kl: KLLoss
    mix: str
    precision: str
    answer_model: str
    targets: np.ndarray | None = None
    population: Population | None = None

    def __post_init__(self) -> None:
        require_choice(self.answer_model, "answer_model", ANSWER_MODELS)


@dataclass(frozen=True, kw_only=True, eq=False)
class Targets:
    """The ensemble's answers on an earlier query: of ``kind`` ``soft`` (log-probabilities
    ``(N, C)``) or ``hard`` (class indices ``(N,)``)."""

    query: QuerySpec
    kind: str
    answers: np.ndarray

    def __post_init__(self) -> None:
        require_choice(self.kind, "kind", ("soft", "hard"))


@dataclass(frozen=True, kw_only=True, eq=False)
class QueryAnswers(TrainReply):
    """The device's answers on this round's query (``None`` when there was none) and whether it
    distilled."""

    answers: np.ndarray | None = None
    distilled: bool


@dataclass(frozen=True, kw_only=True, eq=False)
class EnsembleDistill(TrainRequest):
    """FedDF / MEKD: distil towards ``targets`` on the inputs of their query beside the
    private loss (``loss``: MEKD's mapping-emulation loss, or KL alone with ``w_f = 0``),
    then answer this round's ``query`` with the model ``answer_model`` names, as
    ``response`` (``soft`` or ``hard``) encoded at ``precision``.

    Queries on generator samples and MEKD's loss need G: ``generator`` says how to build it and which
    version; ``generator_weights`` carries it when the device does not hold that
    version. ``query_inputs`` carries the inputs themselves when they are smaller.
    """

    message_type: ClassVar[str] = "train.ensemble_distill"
    reply_type: ClassVar[type[Reply]] = QueryAnswers

    kd: KDTerm
    loss: EmulationLoss
    response: str
    answer_model: str
    precision: str
    query: QuerySpec | None = None
    query_inputs: np.ndarray | None = None
    targets: Targets | None = None
    generator: GeneratorSpec | None = None
    generator_weights: StateDict | None = None

    def __post_init__(self) -> None:
        require_choice(self.response, "response", ("soft", "hard"))
        require_choice(self.answer_model, "answer_model", ANSWER_MODELS)


@dataclass(frozen=True, kw_only=True, eq=False)
class FedAvgReply(TrainReply):
    """FedAvg baseline only: the device's weights after training."""

    weights: StateDict


@dataclass(frozen=True, kw_only=True, eq=False)
class FedAvgRequest(TrainRequest):
    """FedAvg baseline: start from the global ``weights``, train, send the weights back."""

    message_type: ClassVar[str] = "train"
    reply_type: ClassVar[type[Reply]] = FedAvgReply

    weights: StateDict


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, kw_only=True, eq=False)
class EvaluateReply(Reply):
    """Accuracy and loss of the device's model on its own test split (personalised) and,
    when it holds one, on the global test set."""

    personalised_accuracy: float
    personalised_loss: float
    num_test: int
    global_accuracy: float | None = None
    global_loss: float | None = None
    num_global_test: int | None = None


@dataclass(frozen=True, kw_only=True, eq=False)
class EvaluateRequest(Request):
    """Evaluate the device's own model, or the global ``weights`` (FedAvg baseline)."""

    message_type: ClassVar[str] = "evaluate"
    reply_type: ClassVar[type[Reply]] = EvaluateReply

    server_round: int
    weights: StateDict | None = None


#: every request type, by Flower message type
REQUESTS: dict[str, type[Request]] = {
    r.message_type: r
    for r in (SetupRequest, LocalTrainRequest, ReferenceDistill, EnsembleDistill, FedAvgRequest, EvaluateRequest)
}

#: the records a device may send, by Flower message type: derived from the reply types
DEVICE_TO_SERVER: dict[str, frozenset[str]] = {
    message_type: request.reply_type.record_names() for message_type, request in REQUESTS.items()
}
