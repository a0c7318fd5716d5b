"""Ensemble distillation on shared query inputs: the machinery FedDF and MEKD share.

The server holds a **global student** of any architecture. Each round, every
sampled device

1. receives a *query* — which public inputs to answer on, named compactly by a
   :class:`~hetkd.distill.queries.QuerySpec` (rows of the reference set, or
   samples of a generator whose weights it holds) — and, once the server has
   answered a query before, the *targets*: the ensemble's answers on the
   previous round's query;
2. trains on its private data, distilling towards those targets on the
   previous query's inputs beside its cross-entropy (:class:`~hetkd.protocol.EnsembleDistill`);
3. answers the new query — soft probabilities, or with ``response="hard"``
   its predicted classes only — and nothing else; with
   ``answer_model="private"`` the answers come from a second model that
   trains on the device's private data alone, so they never echo the
   ensemble the device's own model distils from.

The server then forms the ensemble of the answers (a plain mean, or per device
a similarity-weighted mix over its nearest devices, SD-Dist's neighbour
weights computed on the answers; with ``aggregate`` a coordinate-wise median
or trimmed mean instead of the mean; with ``balance_classes`` corrected to a
uniform class prior over the query inputs), distils its student on the query
inputs, and keeps the targets for the next round (:class:`EnsembleTargets`).
Targets thus arrive one round after the answers they come from: one message
exchange per round.

Subclasses choose the queries and the loss: :class:`~hetkd.strategies.FedDF`
asks about reference rows and distils with KL; :class:`~hetkd.strategies.MEKD`
first trains a generator against the devices' answers and then distils with
the mapping-emulation loss on its samples.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from hetkd import protocol as P
from hetkd.distill.codec import decode_answers, encode_answers
from hetkd.distill.emulation import DistillSettings, EmulationLoss, StudentOptimizer, kd_steps, transfer_batches
from hetkd.distill.ensemble import (
    EnsembleSettings,
    answer_outliers,
    answer_quality,
    ensemble_responses,
    teacher_logits,
)
from hetkd.distill.queries import QuerySpec, resolve_queries
from hetkd.distill.robust import screened_weights
from hetkd.distill.similarity import NeighbourSearch
from hetkd.models import build_model
from hetkd.strategies.base import DeviceInfo, DeviceStrategy, Figures, RoundPlan
from hetkd.training import resolve_device, seeded, to_cpu

__all__ = ["EnsembleDistill", "EnsembleRound", "EnsembleTargets"]


@dataclass(frozen=True)
class EnsembleTargets:
    """The ensemble's answers on one query, which the devices distil towards one round later.

    ``common`` is the plain (class-balanced) ensemble ``(N, C)`` the student
    learns from; ``own`` holds a device's similarity-weighted mix where it has
    one. ``kind``: ``soft`` (probabilities) or ``hard`` (one-hot rows).
    """

    query: QuerySpec
    kind: str
    common: torch.Tensor
    own: dict[int, torch.Tensor] = field(default_factory=dict)

    def for_device(self, device_id: int) -> torch.Tensor:
        """What device ``device_id`` distils towards."""
        return self.own.get(device_id, self.common)


@dataclass
class EnsembleRound(RoundPlan):
    """A training round of ensemble distillation: its phase, its query and the server's
    view of the query's inputs."""

    phase: str = "warmup"
    query: QuerySpec | None = None
    inputs: torch.Tensor | None = None


class EnsembleDistill(DeviceStrategy):
    """Base class: devices answer shared queries; the server distils their ensemble.

    Parameters
    ----------
    num_classes : int
        Number of classes C.
    public_inputs : torch.Tensor
        The server's unlabelled public inputs (the reference/proxy set).
    response : str
        What devices answer with: ``soft`` (probabilities) or ``hard`` (classes).
    student : torch.nn.Module | None
        The server's global student (any architecture). ``None``: the zoo
        architecture ``ensemble.student`` for the public inputs' shape
        (``""``: no server-side model; devices still distil from the ensemble).
        It is moved to ``ensemble.device`` (:attr:`torch_device`).
    global_test : tuple[torch.Tensor, torch.Tensor] | None
        Inputs and labels the student is evaluated on after every round.
    ensemble : EnsembleSettings | None
        The schedule, the ensemble and the devices' distillation (default:
        the run config's ``strategy.ensemble`` defaults).
    distill : DistillSettings | None
        The loss (temperatures, ``w_f``, ``w_kl``, distance) for student and
        devices, and the student's optimizer; ``steps`` is set from the
        number of distillation rounds when the run starts.
    **kwargs
        Sampling and set-up options of :class:`~hetkd.strategies.DeviceStrategy`.
    """

    request_type = P.EnsembleDistill
    #: the plan of a training round (MEKD's remembers more)
    round_type: type[EnsembleRound] = EnsembleRound

    def __init__(
        self,
        *,
        num_classes: int,
        public_inputs: torch.Tensor,
        response: str,
        student: nn.Module | None = None,
        global_test: tuple[torch.Tensor, torch.Tensor] | None = None,
        ensemble: EnsembleSettings | None = None,
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
        if global_test is not None and len(global_test[0]) != len(global_test[1]):
            raise ValueError("global_test must be (inputs, labels) of equal length")
        self.num_classes = num_classes
        self.public_inputs = public_inputs.detach().float()
        self.response = response
        self.ensemble = ensemble if ensemble is not None else EnsembleSettings()
        self.distill = distill if distill is not None else DistillSettings()
        #: where the server computes (``strategy.ensemble.device``); its tensors that leave it are on the CPU
        self.torch_device = resolve_device(self.ensemble.device, "strategy.ensemble.device")
        if student is None and self.ensemble.student:
            with seeded(self.seed, "student-init"):  # built on the CPU: the same weights on any device
                student = build_model(self.ensemble.student, tuple(self.public_inputs.shape[1:]), num_classes)
        self.student = None if student is None else student.to(self.torch_device)
        self.global_test = global_test
        #: what the devices distil towards next round (``None`` before the first ensemble)
        self.targets: EnsembleTargets | None = None
        #: the rounds' (query inputs, teacher logits, which inputs are G's samples) the student
        #: distils on, oldest first
        self.student_memory: deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = deque(
            maxlen=self.ensemble.student_memory or None)
        self._student_optimizer: StudentOptimizer | None = None

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"strategy.ensemble": self.ensemble}

    # ------------------------------------------------------------------ what subclasses choose

    def phase(self, server_round: int) -> str:
        """``warmup`` or ``distill`` (MEKD adds ``deprivatize``)."""
        return "warmup" if server_round <= self.ensemble.warmup_rounds else "distill"

    def student_learns(self, server_round: int) -> bool:
        """Whether the ensemble's answers of this round teach the student and, next round, the
        devices (the ``distill`` phase; MEKD adds its last deprivatization round's reference rows)."""
        return self.phase(server_round) == "distill"

    def distill_rounds(self) -> int:
        """Rounds of the run in which the student learns (``num_rounds`` is set by ``start``):
        its optimizer's schedule spans them."""
        return sum(1 for r in range(1, self.num_rounds + 1) if self.student_learns(r))

    def make_query(self, server_round: int, phase: str) -> QuerySpec | None:
        """The query of this round (``None``: nothing to answer)."""
        raise NotImplementedError

    def asks_about_reference_rows(self) -> bool:
        """Whether this strategy's queries name rows of the reference set (FedDF; MEKD with
        ``mekd.reference_queries``), which every device must then hold as the server does."""
        return False

    def admit(self, info: DeviceInfo) -> str | None:
        """A device joins only with the server's reference set when queries name its rows: rows are
        sent as indices, so another set would answer about other inputs (or fail every round)."""
        if self.asks_about_reference_rows() and info.num_reference != len(self.public_inputs):
            return (f"holds a reference set of {info.num_reference} rows, the server's has "
                    f"{len(self.public_inputs)}: {type(self).__name__}'s queries name its rows, so every "
                    "device must hold the same reference set")
        return None

    def query_inputs(self, query: QuerySpec) -> torch.Tensor:
        """The server's view of the query's inputs."""
        return resolve_queries(query, reference_inputs=self.public_inputs)

    def generator_fields(self, device_id: int, plan: EnsembleRound, targets: bool) -> dict[str, Any]:
        """Extra request fields a device needs to resolve this round's query and, if it gets
        ``targets``, the targets' query (MEKD: the generator)."""
        return {}

    def loss_generator(self) -> nn.Module | None:
        """The generator of the mapping-emulation term (``None``: plain KL)."""
        return None

    def emulation_loss(self) -> EmulationLoss:
        """The loss the student and the devices distil with (MEKD: G's term on G's samples only
        when ``mekd.emulation_inputs`` says so)."""
        return self.distill.loss()

    def learn_answers(self, server_round: int, plan: EnsembleRound, device_ids: list[int],
                      answers: torch.Tensor) -> Figures:
        """Use the devices' answers ``(n, N, C)`` on the query: by default (the
        ``distill`` phase) form the targets and distil the student."""
        if plan.phase != "distill":
            return Figures()
        assert plan.query is not None and plan.inputs is not None
        return self.learn_from_ensemble(server_round, plan.query, plan.inputs, device_ids, answers)

    def learn_from_ensemble(self, server_round: int, query: QuerySpec, inputs: torch.Tensor, device_ids: list[int],
                            answers: torch.Tensor) -> Figures:
        """Form the targets on ``query`` (its ``inputs``) from the devices' ``answers``, keep them for
        the devices' next round and distil the student towards them."""
        self.targets, figures = self.form_targets(query, device_ids, answers)
        return figures.add(self.distill_student(server_round, inputs, self.targets))

    # ------------------------------------------------------------------ the ensemble

    def ensemble_weights(self, answers: torch.Tensor) -> tuple[torch.Tensor, Figures]:
        """Per-device mixing weights ``(n, n)`` over the answering devices (similarity weighting)."""
        n = answers.shape[0]
        search = NeighbourSearch(
            num_neighbours=min(self.ensemble.num_neighbours, n - 1), num_candidates=n, neighbour_fraction=1.0,
            candidate_fraction=1.0, neighbour_rule="distance", similarity=self.ensemble.similarity,
            weighting="similarity", exact_search_max=0,
        )
        plan = search.plan(answers.clamp_min(1e-6).log(), list(range(n)), temperature=self.distill.temperature)
        used = [float(plan.distance[i, j]) for i, row in enumerate(plan.neighbours) for j in row]
        return plan.weights.to_dense(), Figures({"neighbour_distance_mean": sum(used) / len(used) if used else math.nan})

    def query_labels(self, query: QuerySpec) -> torch.Tensor | None:
        """The classes ``(N,)`` of the query's inputs when the server knows them (FedDF on a
        labelled reference set), to score the teachers; never a training target. Default: ``None``."""
        return None

    def answer_quality(self, query: QuerySpec, answers: torch.Tensor) -> torch.Tensor | None:
        """Each teacher's score ``(n,)`` on the query's labels, lower is better (``None``:
        unlabelled): :func:`~hetkd.distill.ensemble.answer_quality`."""
        labels = self.query_labels(query)
        return None if labels is None else answer_quality(answers, self.response, labels)

    def screened(self, answers: torch.Tensor, quality: torch.Tensor | None) -> list[int]:
        """The teachers (rows of ``answers``) the ``screened_mean`` aggregate leaves out this round:
        outliers by their score ``quality`` on the query's labels when known, else by divergence
        (:func:`~hetkd.distill.ensemble.answer_outliers`); nobody under another aggregate."""
        if self.ensemble.aggregate != "screened_mean":
            return []
        return answer_outliers(answers, self.response, quality)

    def mean_ensemble(self, query: QuerySpec, answers: torch.Tensor, screened: list[int]) -> tuple[torch.Tensor, str]:
        """All devices' answers ``(n, N, C)`` on ``query`` weighted equally but the ``screened`` ones:
        the ensemble ``(N, C)`` and its kind (their mean, or with ``aggregate`` a robust aggregate;
        with ``balance_classes`` class-balanced over each of the query's sources on its own)."""
        common, kind = self._ensemble(query, answers, torch.ones(1, answers.shape[0]), screened)
        return common[0], kind

    def _ensemble(self, query: QuerySpec, answers: torch.Tensor, weights: torch.Tensor,
                  screened: list[int]) -> tuple[torch.Tensor, str]:
        e = self.ensemble
        aggregate = e.aggregate
        if aggregate == "screened_mean":  # the screen ran once for the round: the mean of who it kept
            weights, aggregate = screened_weights(weights, screened), "mean"
        return ensemble_responses(answers, self.response, weights, balance=e.balance_classes, aggregate=aggregate,
                                  trim_fraction=e.trim_fraction, balance_groups=query.source_sizes)

    def form_targets(self, query: QuerySpec, device_ids: list[int],
                     answers: torch.Tensor) -> tuple[EnsembleTargets, Figures]:
        """The plain ensemble (for the student and any device) and, with similarity
        weighting, each answering device's own mix; both without the screened teachers."""
        quality = self.answer_quality(query, answers)
        screened = self.screened(answers, quality)
        common, kind = self.mean_ensemble(query, answers, screened)
        own: dict[int, torch.Tensor] = {}
        figures = Figures()
        if self.ensemble.weighting == "similarity" and answers.shape[0] >= 2:
            weights, figures = self.ensemble_weights(answers)
            mixed, _ = self._ensemble(query, answers, weights, screened)
            own = {d: mixed[i] for i, d in enumerate(device_ids) if float(mixed[i].sum()) > 0}  # someone taught it
        if kind == "soft":
            figures.metrics["ensemble_entropy"] = float(-(common * common.clamp_min(1e-12).log()).sum(1).mean())
        if quality is not None:
            for k, score in enumerate(quality.tolist()):
                figures.devices.setdefault(device_ids[k], {})["best_class_recall"] = 1.0 - score
        if self.ensemble.aggregate == "screened_mean":  # who the screen kept from teaching this round
            figures.metrics["screened_teachers"] = len(screened)
            for k in screened:
                figures.devices.setdefault(device_ids[k], {})["screened_teacher"] = True
        return EnsembleTargets(query, kind, common, own), figures

    # ------------------------------------------------------------------ the global student

    def student_loss(self, student_logits: torch.Tensor, target_logits: torch.Tensor,
                     generated: torch.Tensor | None = None) -> torch.Tensor:
        """``w_f · dist(G(s/T_g), G(t/T_g)) + w_kl · T · KL`` (``w_f = 0`` or no G: KL only);
        ``generated`` marks the rows that are G's samples (:meth:`emulation_loss`)."""
        return self.emulation_loss().bind(self.loss_generator() if self.distill.w_f > 0 else None)(
            student_logits, target_logits, generated)

    def distill_student(self, server_round: int, inputs: torch.Tensor, targets: EnsembleTargets) -> Figures:
        """``server_steps`` SGD steps of the student towards the plain ensemble: on ``inputs``
        and, with ``student_memory`` other than 1, on earlier rounds' inputs and targets too."""
        steps = self.ensemble.server_steps
        if self.student is None or steps == 0:
            return Figures()
        if self._student_optimizer is None:
            self._student_optimizer = self._new_student_optimizer()
        logits = teacher_logits(targets.common, targets.kind, hard_margin=self.distill.hard_margin)
        self.student_memory.append((inputs, logits, targets.query.generated_rows()))
        inputs, logits, generated = (torch.cat(parts) for parts in zip(*self.student_memory))
        logits, generated = logits.to(self.torch_device), generated.to(self.torch_device)  # once, not per step

        def loss(student_logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self.student_loss(student_logits, logits[rows], generated[rows])

        with seeded(self.seed, "student", server_round) as rng:  # batches and any dropout: from the seed
            draw = transfer_batches(inputs, torch.arange(len(inputs)), self.distill.batch_size, rng)
            losses = kd_steps(self._student_optimizer, steps, self._on_device(draw), loss)
        return Figures({"student_loss": sum(losses) / len(losses), "student_inputs": len(inputs)})

    def _on_device(self, draw: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
                   ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        """``draw``'s batches moved to the server's device: rows are drawn on the CPU (from the
        CPU generator), so the batches and a CPU run do not depend on where the student is."""

        def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            inputs, targets = draw(step)
            return inputs.to(self.torch_device), targets.to(self.torch_device)

        return next_batch

    def _new_student_optimizer(self) -> StudentOptimizer:
        """The student's optimizer, its schedule spread over every distillation round of the run."""
        assert self.student is not None
        total = max(1, self.ensemble.server_steps * self.distill_rounds())
        return StudentOptimizer(self.student, replace(self.distill, steps=total))

    def state_dict(self) -> dict[str, Any]:
        """The student and its optimizer (on the CPU, whatever the server's device), the targets
        the devices distil towards next, the student's memory."""
        t = self.targets
        optimizer = self._student_optimizer
        return super().state_dict() | {
            "student": None if self.student is None else to_cpu(self.student.state_dict()),
            "student_optimizer": None if optimizer is None else to_cpu(optimizer.state_dict()),
            "targets": None if t is None else {"query": asdict(t.query), "kind": t.kind, "common": t.common,
                                               "own": dict(t.own)},
            "student_memory": list(self.student_memory),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.student is not None and state["student"] is not None:
            self.student.load_state_dict(state["student"])
        if self.student is not None and state["student_optimizer"] is not None:
            self._student_optimizer = self._new_student_optimizer()
            self._student_optimizer.load_state_dict(state["student_optimizer"])
        t = state["targets"]
        self.targets = None if t is None else EnsembleTargets(
            QuerySpec(**t["query"]), t["kind"], t["common"], {int(d): v for d, v in t["own"].items()})
        self.student_memory.clear()
        for inputs, logits, *generated in state["student_memory"]:
            if not generated:  # a checkpoint from before the mask: G's term was on every row
                generated = [torch.ones(len(inputs), dtype=torch.bool)]
            self.student_memory.append((inputs, logits, generated[0]))

    @torch.no_grad()
    def student_accuracy(self) -> float | None:
        """The student's accuracy on the global test set (``None`` without one)."""
        if self.student is None or self.global_test is None:
            return None
        self.student.eval()
        x, y = self.global_test
        correct = sum(int((self.student(xb.to(self.torch_device)).argmax(1).cpu() == yb).sum())
                      for xb, yb in zip(x.split(512), y.split(512)))
        return correct / max(1, len(y))

    def initial_global(self, initial_arrays: ArrayRecord) -> ArrayRecord | None:
        """The student starts from ``initial_arrays`` when they are given (a quickstart's ``Net()``
        weights, with ``student=Net()``); they must fit it."""
        if self.student is None:
            if len(initial_arrays):
                raise ValueError(f"{type(self).__name__} was given initial_arrays but keeps no global student "
                                 "(ensemble.student is empty); pass student=<your nn.Module>")
            return None
        if len(initial_arrays):
            try:
                self.student.load_state_dict(initial_arrays.to_torch_state_dict())
            except RuntimeError as err:
                first = str(err).strip().splitlines()[0:2]
                raise ValueError(f"initial_arrays do not fit the global student ({type(self.student).__name__}): "
                                 f"{' '.join(first)}; pass the module they belong to as student=") from None
        return self.global_arrays()

    def global_arrays(self) -> ArrayRecord | None:
        """The global student's weights (on the CPU): what a Flower ServerApp saves as its final model."""
        return None if self.student is None else ArrayRecord(to_cpu(self.student.state_dict()))

    # ------------------------------------------------------------------ round plumbing

    def request(self, server_round: int, query: QuerySpec | None) -> P.EnsembleDistill:
        """A round's request without targets or generator: the settings every device gets."""
        e = self.ensemble
        return P.EnsembleDistill(
            server_round=server_round, kd=e.kd_term(), loss=self.emulation_loss(), response=self.response,
            answer_model=e.answer_model, precision=e.precision, query=query,
        )

    def plan_train(self, server_round: int, device_ids: list[int], arrays: ArrayRecord) -> EnsembleRound:
        phase = self.phase(server_round)
        query = self.make_query(server_round, phase)
        plan = self.round_type({}, Figures({"phase": phase}), phase, query,
                               None if query is None else self.query_inputs(query))
        request = self.request(server_round, query)
        for device in device_ids:
            targets = None
            if self.targets is not None:
                target = self.targets.for_device(device)
                targets = P.Targets(query=self.targets.query, kind=self.targets.kind,
                                    answers=encode_answers(target.clamp_min(1e-12).log(), self.targets.kind,
                                                           self.ensemble.precision))
            plan.requests[device] = replace(request, targets=targets,
                                            **self.generator_fields(device, plan, targets is not None))
        return plan

    def check_reply(self, device_id: int, request: P.Request, reply: P.Reply) -> str | None:
        """When queried, a reply carries one answer per query input."""
        assert isinstance(request, P.EnsembleDistill) and isinstance(reply, P.QueryAnswers)
        if request.query is None:
            return None if reply.answers is None else "answers to a round without a query"
        if reply.answers is None:
            return "no answers to the round's query"
        try:
            answers = decode_answers(reply.answers, self.response, self.num_classes)
        except ValueError as err:
            return str(err)
        if len(answers) != request.query.count:
            return f"{len(answers)} answers for {request.query.count} query inputs"
        return None

    def learn(self, server_round: int, plan: RoundPlan, replies: dict[int, P.Reply]) -> Figures:
        assert isinstance(plan, EnsembleRound)
        figures = Figures()
        if plan.query is not None and replies:
            answers = torch.stack([
                decode_answers(r.answers, self.response, self.num_classes)  # type: ignore[attr-defined]
                for r in replies.values()
            ])
            figures.add(self.learn_answers(server_round, plan, list(replies), answers))
            figures.metrics["answering_devices"] = len(replies)
        accuracy = self.student_accuracy()
        if accuracy is not None:
            figures.metrics["student_accuracy"] = accuracy
        return figures

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        """``student.pt``: the global student's weights."""
        if self.student is None:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "student.pt"
        torch.save({"state_dict": to_cpu(self.student.state_dict()), "num_classes": self.num_classes}, path)
        return [path]
