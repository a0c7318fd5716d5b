"""Ensemble distillation on shared query inputs: the machinery FedDF and MEKD share.

The server holds a **global student** of any architecture. Each round, every
sampled device

1. receives a *query* — which public inputs to answer on, named compactly by a
   :class:`~hetkd.distill.queries.QuerySpec` (rows of the reference set, or
   samples of a generator whose weights it holds) — and, once the server has
   answered a query before, the *targets*: the ensemble's answers on the
   previous round's query;
2. trains on its private data, distilling towards those targets on the
   previous query's inputs beside its cross-entropy (``train.ensemble_distill``);
3. answers the new query — soft probabilities, or with ``response="hard"``
   its predicted classes only — and nothing else; with
   ``answer_model="private"`` the answers come from a second model that
   trains on the device's private data alone, so they never echo the
   ensemble the device's own model distils from.

The server then forms the ensemble of the answers (a plain mean, or per device
a similarity-weighted mix over its nearest devices, SD-Dist's neighbour
weights computed on the answers; with ``balance_classes`` corrected to a
uniform class prior over the query inputs), distils its student on the query inputs,
and keeps each device's targets for the next round. Targets thus arrive one
round after the answers they come from: one message exchange per round.

Subclasses choose the queries and the loss: :class:`~hetkd.strategies.FedDF`
asks about reference rows and distils with KL; :class:`~hetkd.strategies.MEKD`
first trains a generator against the devices' answers and then distils with
the mapping-emulation loss on its samples.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from torch import nn

from hetkd import protocol as P
from hetkd.distill.codec import PRECISIONS, decode_answers, encode_answers
from hetkd.distill.emulation import (
    DistillSettings,
    StudentOptimizer,
    kd_steps,
    mapping_emulation_loss,
    transfer_batches,
)
from hetkd.distill.ensemble import ensemble_responses, teacher_logits
from hetkd.distill.queries import QuerySpec, resolve_queries
from hetkd.distill.similarity import SIMILARITIES, WEIGHTINGS, neighbour_plan
from hetkd.strategies.base import DeviceStrategy
from hetkd.training import seeded

__all__ = ["EnsembleDistill", "ENSEMBLE_WEIGHTINGS"]

#: how the devices' answers are combined into targets
ENSEMBLE_WEIGHTINGS = WEIGHTINGS  # "mean", "similarity"


class EnsembleDistill(DeviceStrategy):
    """Base class: devices answer shared queries; the server distils their ensemble.

    Parameters
    ----------
    num_classes : int
        Number of classes C.
    public_inputs : torch.Tensor
        The server's unlabelled public inputs (the reference/proxy set).
    student : torch.nn.Module | None
        The server's global student (any architecture), or ``None`` for no
        server-side model (devices still distil from the ensemble).
    global_test : tuple[torch.Tensor, torch.Tensor] | None
        Inputs and labels the student is evaluated on after every round.
    response : str
        What devices answer with: ``soft`` (probabilities) or ``hard`` (classes).
    num_queries : int
        Query inputs per distillation round.
    warmup_rounds : int
        Rounds of local training before the first query.
    weighting : str
        ``mean`` (one ensemble for all) or ``similarity`` (per device, over its
        ``num_neighbours`` nearest devices by ``similarity`` of their answers).
    balance_classes : bool
        Correct every ensemble to a uniform class prior over the round's query
        inputs (:func:`~hetkd.distill.ensemble.class_balanced`). Under label skew
        each device answers with the classes it knows, so the plain ensemble
        over-predicts the classes many devices know on every input; the query
        inputs (reference rows, samples of a generator trained on the proxy
        set) are drawn evenly from all classes, so the ensemble's own mean
        answer over them estimates that bias. ``False``: the published plain
        mean (or vote).
    rho : float
        Weight of a device's distillation term beside its cross-entropy.
    answer_model : str
        Which model a device answers queries with: ``private`` (the default), a
        copy of its model that trains on the device's private data alone from
        the first distillation round on, or ``personal``, its own model, which
        distils from the ensemble. Private answers never echo the ensemble the
        devices distil from, so the teachers the student learns from stay
        independent and the targets stay sharp; the price is a second model
        per device to keep and train in distillation rounds.
    query_batch_size : int
        Query inputs beside each private batch on a device (0: the private batch size).
    min_steps : int
        Each local epoch takes at least this many steps.
    precision : str
        Encoding of soft answers and targets on the wire.
    server_steps : int
        The student's SGD steps per distillation round.
    student_memory : int
        How many distillation rounds' query inputs and ensemble targets the
        student keeps distilling on: ``1`` the round's own only, ``k`` the
        last ``k`` rounds', ``0`` every round's so far. Nothing more crosses
        the wire (server memory only: ``k x num_queries`` inputs and targets).
        MEKD's rounds draw fresh samples of G, so the memory adds distinct
        inputs; FedDF's ask about the same reference rows, so it gives each
        row the targets of several rounds.
    distill : DistillSettings | None
        The loss (temperatures, ``w_f``, ``w_kl``, distance) for student and
        devices, and the student's optimizer; ``steps`` is set from the
        number of distillation rounds when the run starts.
    """

    train_action = P.TRAIN_ENSEMBLE_DISTILL

    def __init__(
        self,
        *,
        num_classes: int,
        public_inputs: torch.Tensor,
        student: nn.Module | None = None,
        global_test: tuple[torch.Tensor, torch.Tensor] | None = None,
        response: str = "soft",
        num_queries: int = 256,
        warmup_rounds: int = 1,
        weighting: str = "mean",
        balance_classes: bool = True,
        num_neighbours: int = 5,
        similarity: str = "kl",
        rho: float = 0.5,
        answer_model: str = "private",
        query_batch_size: int = 0,
        min_steps: int = 0,
        precision: str = "float16",
        server_steps: int = 100,
        student_memory: int = 1,
        distill: DistillSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not isinstance(public_inputs, torch.Tensor) or public_inputs.dim() < 2 or len(public_inputs) < 2:
            raise ValueError("public_inputs must be a float tensor (N, ...) holding at least 2 inputs")
        if response not in ("soft", "hard"):
            raise ValueError(f"unknown response {response!r}; valid choices: soft, hard")
        if num_queries < 2:
            raise ValueError(f"num_queries must be >= 2, got {num_queries}")
        if warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
        if weighting not in ENSEMBLE_WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid choices: {', '.join(ENSEMBLE_WEIGHTINGS)}")
        if not isinstance(balance_classes, bool):
            raise ValueError(f"balance_classes must be True or False, got {balance_classes!r}")
        if num_neighbours < 1:
            raise ValueError(f"num_neighbours must be >= 1, got {num_neighbours}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; valid choices: {', '.join(SIMILARITIES)}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        if answer_model not in P.ANSWER_MODELS:
            raise ValueError(f"unknown answer_model {answer_model!r}; valid choices: {', '.join(P.ANSWER_MODELS)}")
        if query_batch_size < 0 or min_steps < 0:
            raise ValueError(f"query_batch_size and min_steps must be >= 0, got {query_batch_size}, {min_steps}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
        if server_steps < 0:
            raise ValueError(f"server_steps must be >= 0, got {server_steps}")
        if isinstance(student_memory, bool) or not isinstance(student_memory, int) or student_memory < 0:
            raise ValueError(f"student_memory must be an integer >= 0 (0: every round), got {student_memory!r}")
        if global_test is not None and len(global_test[0]) != len(global_test[1]):
            raise ValueError("global_test must be (inputs, labels) of equal length")
        self.num_classes = num_classes
        self.public_inputs = public_inputs.detach().float()
        self.student = student
        self.global_test = global_test
        self.response = response
        self.num_queries = num_queries
        self.warmup_rounds = warmup_rounds
        self.weighting = weighting
        self.balance_classes = balance_classes
        self.num_neighbours = num_neighbours
        self.similarity = similarity
        self.rho = rho
        self.answer_model = answer_model
        self.query_batch_size = query_batch_size
        self.min_steps = min_steps
        self.precision = precision
        self.server_steps = server_steps
        self.student_memory = student_memory
        #: the rounds' (query inputs, teacher logits) the student distils on, oldest first
        self._student_memory: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=student_memory or None)
        self.settings = distill or DistillSettings()
        self._student_optimizer: StudentOptimizer | None = None
        self._query: QuerySpec | None = None  # this round's query
        self._targets: dict[int, torch.Tensor] = {}  # device id -> its ensemble answers on _target_query
        self._common_target: torch.Tensor | None = None  # the plain ensemble, for devices without their own
        self._target_kind = "soft" if response == "soft" else "hard"
        self._target_query: QuerySpec | None = None
        self._cached_inputs: tuple[QuerySpec, torch.Tensor] | None = None
        self._extras: dict[str, Any] = {}

    # ------------------------------------------------------------------ what subclasses choose

    def phase(self, server_round: int) -> str:
        """``warmup`` or ``distill`` (MEKD adds ``deprivatize``)."""
        return "warmup" if server_round <= self.warmup_rounds else "distill"

    def distill_rounds(self) -> int:
        """Rounds in the ``distill`` phase of the run (``num_rounds`` is set by ``start``)."""
        return sum(1 for r in range(1, self.num_rounds + 1) if self.phase(r) == "distill")

    def make_query(self, server_round: int, phase: str) -> QuerySpec | None:
        """The query of this round (``None``: nothing to answer)."""
        raise NotImplementedError

    def query_records(
        self, node_id: int, query: QuerySpec | None, targets: bool, config: ConfigRecord
    ) -> dict[str, ArrayRecord]:
        """Extra records (and ``config`` entries) a device needs to resolve this
        round's query and, if it gets ``targets``, last round's query."""
        return {}

    def query_inputs(self, query: QuerySpec) -> torch.Tensor:
        """The server's view of the query's inputs."""
        return resolve_queries(query, reference_inputs=self.public_inputs)

    def round_inputs(self, query: QuerySpec) -> torch.Tensor:
        """This round's query inputs, computed once per round."""
        if self._cached_inputs is None or self._cached_inputs[0] != query:
            self._cached_inputs = (query, self.query_inputs(query))
        return self._cached_inputs[1]

    def loss_generator(self) -> nn.Module | None:
        """The generator of the mapping-emulation term (``None``: plain KL)."""
        return None

    def learn(self, server_round: int, phase: str, query: QuerySpec, inputs: torch.Tensor,
              device_ids: list[int], answers: torch.Tensor) -> None:
        """Use the devices' answers ``(n, N, C)`` on ``inputs``: by default (the
        ``distill`` phase) form targets and distil the student."""
        if phase == "distill":
            self.form_targets(query, device_ids, answers)
            self.distill_student(server_round, inputs)

    # ------------------------------------------------------------------ the ensemble

    def ensemble_weights(self, answers: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-device mixing weights ``(n, n)`` over the answering devices (similarity weighting)."""
        n = answers.shape[0]
        logits = answers.clamp_min(1e-6).log()
        k = min(self.num_neighbours, n - 1)
        weights, distance, neighbours = neighbour_plan(
            logits, list(range(n)), num_neighbours=k, num_candidates=n, rule="distance",
            similarity=self.similarity, weighting="similarity", temperature=self.settings.temperature,
        )
        used = [float(distance[i, j]) for i, row in enumerate(neighbours) for j in row]
        return weights.to_dense(), {"neighbour_distance_mean": float(sum(used) / len(used)) if used else math.nan}

    def mean_ensemble(self, answers: torch.Tensor) -> tuple[torch.Tensor, str]:
        """All devices' answers ``(n, N, C)`` weighted equally: the ensemble ``(N, C)`` and its kind
        (class-balanced with ``balance_classes``)."""
        common, kind = ensemble_responses(answers, self.response, torch.ones(1, answers.shape[0]),
                                          balance=self.balance_classes)
        return common[0], kind

    def form_targets(self, query: QuerySpec, device_ids: list[int], answers: torch.Tensor) -> None:
        """The plain ensemble (for the student and any device) and, with similarity
        weighting, each answering device's own mix."""
        n = answers.shape[0]
        self._common_target, self._target_kind = self.mean_ensemble(answers)
        self._targets = {}
        if self.weighting == "similarity" and n >= 2:
            weights, stats = self.ensemble_weights(answers)
            own, _ = ensemble_responses(answers, self.response, weights, balance=self.balance_classes)
            self._targets = {d: own[i] for i, d in enumerate(device_ids) if float(weights[i].sum()) > 0}
            self._extras.update(stats)
        self._target_query = query
        if self._target_kind == "soft":
            p = self._common_target
            self._extras["ensemble_entropy"] = float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())

    def target_for(self, device_id: int) -> torch.Tensor | None:
        """The answers a device distils towards this round (``None`` before any ensemble)."""
        return self._targets.get(device_id, self._common_target)

    # ------------------------------------------------------------------ the global student

    def student_loss(self, student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
        """``w_f · dist(G(s/T_g), G(t/T_g)) + w_kl · T · KL`` (``w_f = 0`` or no G: KL only)."""
        s = self.settings
        return mapping_emulation_loss(
            student_logits, target_logits, self.loss_generator() if s.w_f > 0 else None,
            temperature=s.temperature, generator_temperature=s.generator_temperature,
            w_f=s.w_f, w_kl=s.w_kl, distance=s.distance,
        )

    def distill_student(self, server_round: int, inputs: torch.Tensor) -> None:
        """``server_steps`` SGD steps of the student towards the plain ensemble: on ``inputs``
        and, with ``student_memory`` other than 1, on earlier rounds' inputs and targets too."""
        if self.student is None or self._common_target is None or self.server_steps == 0:
            return
        if self._student_optimizer is None:
            total = max(1, self.server_steps * self.distill_rounds())
            self._student_optimizer = StudentOptimizer(self.student, replace(self.settings, steps=total))
        targets = teacher_logits(self._common_target, self._target_kind, hard_margin=self.settings.hard_margin)
        self._student_memory.append((inputs, targets))
        inputs = torch.cat([x for x, _ in self._student_memory])
        targets = torch.cat([t for _, t in self._student_memory])
        with seeded(self.seed, "student", server_round) as rng:  # batches and any dropout: from the seed
            losses = kd_steps(self._student_optimizer, self.server_steps,
                              transfer_batches(inputs, targets, self.settings.batch_size, rng), self.student_loss)
        self._extras["student_loss"] = sum(losses) / len(losses)
        self._extras["student_inputs"] = len(inputs)

    @torch.no_grad()
    def student_accuracy(self) -> float | None:
        """The student's accuracy on the global test set (``None`` without one)."""
        if self.student is None or self.global_test is None:
            return None
        self.student.eval()
        x, y = self.global_test
        correct = sum(int((self.student(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(512), y.split(512)))
        return correct / max(1, len(y))

    # ------------------------------------------------------------------ round plumbing

    def before_train(self, server_round: int, node_ids: list[int]) -> None:
        self._extras = {"phase": self.phase(server_round)}
        self._query = self.make_query(server_round, self.phase(server_round))

    def ensemble_config(self) -> dict[str, Any]:
        """Distillation settings every training message carries."""
        s = self.settings
        return {
            "response": self.response,
            "target-kind": self._target_kind,
            "rho": self.rho,
            P.ANSWER_MODEL: self.answer_model,
            "temperature": s.temperature,
            "generator-temperature": s.generator_temperature,
            "w-f": s.w_f,
            "w-kl": s.w_kl,
            "distance": s.distance,
            "hard-margin": s.hard_margin,
            "query-batch-size": self.query_batch_size,
            "min-steps": self.min_steps,
            "precision": self.precision,
        }

    def train_content(self, server_round: int, node_id: int, config: ConfigRecord, arrays: ArrayRecord) -> RecordDict:
        for key, value in self.ensemble_config().items():
            config[key] = value
        if self._query is not None:
            for key, value in self._query.to_config(P.QUERY).items():
                config[key] = value
        content = RecordDict({P.CONFIG: config})
        target = self.target_for(self.device_id(node_id)) if self._target_query is not None else None
        if target is not None:
            for key, value in self._target_query.to_config(P.TARGET_QUERY).items():  # type: ignore[union-attr]
                config[key] = value
            encoded = encode_answers(target.clamp_min(1e-12).log(), self._target_kind, self.precision)
            content[P.TARGETS] = ArrayRecord({P.TARGET_RESPONSES: Array(encoded)})
        for key, record in self.query_records(node_id, self._query, target is not None, config).items():
            content[key] = record
        return content

    def check_train_reply(self, reply: Message) -> str | None:
        """A reply carries only metrics and, when queried, one answer per query input."""
        extra = set(reply.content.keys()) - {P.METRICS, P.PREDICTIONS}
        if extra:
            return f"reply carries records {sorted(extra)} beyond '{P.METRICS}' and '{P.PREDICTIONS}'"
        if self._query is None:
            return None
        record = reply.content.array_records.get(P.PREDICTIONS)
        if record is None or P.RESPONSES not in record:
            return f"reply lacks '{P.PREDICTIONS}/{P.RESPONSES}'"
        array = record[P.RESPONSES].numpy()
        try:
            answers = decode_answers(array, self.response, self.num_classes)
        except ValueError as err:
            return str(err)
        if len(answers) != self._query.count:
            return f"{len(answers)} answers for {self._query.count} query inputs"
        return None

    def process_train_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        query, phase = self._query, self.phase(server_round)
        if query is not None and replies:
            ids = [self.device_id(r.metadata.src_node_id) for r in replies]
            answers = torch.stack([
                decode_answers(r.content[P.PREDICTIONS][P.RESPONSES].numpy(), self.response, self.num_classes)
                for r in replies
            ])
            self.learn(server_round, phase, query, self.round_inputs(query), ids, answers)
            self._extras["answering_devices"] = len(ids)
        accuracy = self.student_accuracy()
        if accuracy is not None:
            self._extras["student_accuracy"] = accuracy
        return None

    def round_extras(self, server_round: int) -> dict[str, Any]:
        return dict(self._extras)

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        """``student.pt``: the global student's weights."""
        if self.student is None:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "student.pt"
        torch.save({"state_dict": self.student.state_dict(), "num_classes": self.num_classes}, path)
        return [path]
