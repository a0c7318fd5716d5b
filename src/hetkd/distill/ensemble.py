"""Teachers' answers and their ensembles: pure tensor math, no models.

A teacher answers a batch of inputs with *responses* of one of three kinds
(:data:`RESPONSE_KINDS`): ``"logits"`` are raw scores; ``"soft"`` are
probabilities (what a device sends in the federated protocol); ``"hard"`` are
one-hot labels. This module validates answers (:func:`check_responses`),
turns them into the teacher logits the distillation losses use
(:func:`teacher_logits`), and mixes several teachers' answers into ensembles
(:func:`ensemble_responses`, :func:`combine_responses`, optionally corrected
to a uniform class prior by :func:`class_balanced`). Black-box distillation
(:mod:`hetkd.distill.blackbox`), the generator's information term
(:mod:`hetkd.distill.deprivatization`) and the federated strategies all read
teachers' answers through these functions.

Teacher logits. The loss needs teacher *logits*: :func:`teacher_logits` turns
soft probabilities into log-probabilities, which equal the logits up to a
per-row constant, and centres both forms (subtracts the row mean), so logits
and soft responses give identical targets. (The MEKD reference feeds raw
logits to G; centring picks one representative of the shift-equivalence
class that the softmax cannot tell apart.) Hard responses replace the teacher
output by its one-hot argmax scaled by a margin ``m`` in both terms of the
mapping-emulation loss: ``G(m·onehot/T_g)`` and ``softmax(m·onehot/T)``. The
reference uses ``m = 1``, a nearly flat target at ``T = 5`` (the labelled
class gets 12 % of the mass against 9.8 % for each other class), so its
students learn a one-logit margin that noise on unseen inputs overturns;
``m = log(1 + (1 − ε)·C/ε)`` is the target of label smoothing ``ε``
(:func:`label_smoothing_margin`, ``DistillSettings.hard_margin``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from hetkd.distill.codec import PRECISIONS
from hetkd.distill.losses import KDTerm
from hetkd.distill.robust import AGGREGATES, robust_probabilities, screened_weights
from hetkd.distill.similarity import SIMILARITIES, WEIGHTINGS, outlier_devices
from hetkd.models import check_architecture
from hetkd.settings import require, require_choice, require_types
from hetkd.training import require_device_name

__all__ = [
    "ANSWER_MODELS",
    "EnsembleSettings",
    "RESPONSE_KINDS",
    "check_kind",
    "responses_from_logits",
    "check_responses",
    "teacher_logits",
    "label_smoothing_margin",
    "teacher_confidence",
    "class_balanced",
    "answer_outliers",
    "ensemble_responses",
    "combine_responses",
]

#: what a teacher may answer with
RESPONSE_KINDS: tuple[str, ...] = ("logits", "soft", "hard")
#: which model a device answers with (queries, reference predictions): its own (which
#: also distils from the others), or a private one that trains on its private data alone
ANSWER_MODELS: tuple[str, ...] = ("personal", "private")


@dataclass(frozen=True, kw_only=True)
class EnsembleSettings:
    """Ensemble distillation on query inputs (FedDF, MEKD): the run config's ``strategy.ensemble``.

    The server keeps a global ``student`` (a zoo architecture; ``""``: none).
    After ``warmup_rounds`` of local training (and, for MEKD,
    ``deprivatize_rounds`` that train the generator on the devices' answers,
    spreading ``mekd.gan.steps`` over them), every round the devices answer on
    ``num_queries`` query inputs (reference rows for FedDF, generator samples
    for MEKD), the server distils the ensemble into its student for
    ``server_steps`` SGD steps on the queries and targets of the last
    ``student_memory`` distillation rounds (1: the round's own; 0: every
    round's so far), and each device distils towards its targets with weight
    ``rho`` beside its cross-entropy, ``query_batch_size`` query inputs beside
    each private batch (0: the private batch size), at least ``min_steps``
    steps per epoch. The default 64 is what every figure in ``docs/results``
    was measured with: the string-key protocol before typed messages let the
    query's own batch size (64) overwrite this setting on the wire, whatever
    it was configured to. Targets are the plain mean of the answers (``weighting=mean``) or,
    per device, a similarity-weighted mix over its ``num_neighbours`` nearest
    devices by ``similarity`` of their answers; ``balance_classes`` corrects
    every ensemble to a uniform class prior over the query inputs, over each
    source (reference rows, G's samples) of a mixed query on its own
    (:func:`class_balanced`; off: the published plain mean). Soft answers and
    targets travel at ``precision``. ``answer_model`` says which model a
    device answers with: ``private`` (a second copy of its model that trains
    on its private data alone from the first distillation round on, so the
    answers never echo the ensemble) or ``personal`` (its own, which distils).
    ``aggregate`` says how the teachers' probabilities combine before the
    class balancing: the weighted ``mean`` (the published behaviour), or,
    robust to a poisoning minority, ``screened_mean`` (the weighted mean
    without the teachers whose answers diverge from the others' far more
    than the others' do: :func:`~hetkd.distill.similarity.outlier_devices`)
    or their coordinate-wise ``median`` or ``trimmed_mean`` (``trim_fraction``
    of them dropped at each end of every coordinate), the teachers with
    weight counting equally. The server computes — its student, MEKD's
    generator and discriminator — on ``device``: ``cpu``, ``cuda``/``cuda:N``
    or ``auto`` (CUDA when there is one); its random draws stay on the CPU,
    so a run on the CPU does not depend on this setting, and whatever leaves
    the server (weights, query inputs, checkpoints, artifacts) is on the CPU.
    """

    student: str = "resnet8"
    warmup_rounds: int = 2
    deprivatize_rounds: int = 5
    num_queries: int = 1024
    server_steps: int = 100
    student_memory: int = 1
    weighting: str = "mean"
    balance_classes: bool = True
    num_neighbours: int = 5
    similarity: str = "kl"
    rho: float = 0.8
    answer_model: str = "private"
    query_batch_size: int = 64
    min_steps: int = 10
    precision: str = "float16"
    aggregate: str = "mean"
    trim_fraction: float = 0.2
    device: str = "cpu"

    def __post_init__(self) -> None:
        require_types(self)
        if self.student:
            check_architecture(self.student, "student")
        for key in ("warmup_rounds", "server_steps", "student_memory", "query_batch_size", "min_steps"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.deprivatize_rounds >= 1, "deprivatize_rounds", f"must be >= 1, got {self.deprivatize_rounds}")
        require(self.num_queries >= 2, "num_queries", f"must be >= 2, got {self.num_queries}")
        require_choice(self.weighting, "weighting", WEIGHTINGS)
        require(self.num_neighbours >= 1, "num_neighbours", f"must be >= 1, got {self.num_neighbours}")
        require_choice(self.similarity, "similarity", SIMILARITIES)
        require(0.0 <= self.rho <= 1.0, "rho", f"must be in [0, 1], got {self.rho}")
        require_choice(self.answer_model, "answer_model", ANSWER_MODELS)
        require_choice(self.precision, "precision", PRECISIONS)
        require_choice(self.aggregate, "aggregate", AGGREGATES)
        require(0.0 <= self.trim_fraction < 0.5, "trim_fraction", f"must be in [0, 0.5), got {self.trim_fraction}")
        require_device_name(self.device, "device")

    def kd_term(self) -> KDTerm:
        """How a device's distillation term sits beside its private loss."""
        return KDTerm(rho=self.rho, batch_size=self.query_batch_size, min_steps=self.min_steps)


def check_kind(kind: str, name: str = "response") -> str:
    """``kind`` if it is one of :data:`RESPONSE_KINDS`; otherwise a ``ValueError`` naming ``name``."""
    if kind not in RESPONSE_KINDS:
        raise ValueError(f"unknown {name} {kind!r}; valid choices: {', '.join(RESPONSE_KINDS)}")
    return kind


def responses_from_logits(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The ``kind`` answer a model with these logits gives: logits, softmax, or one-hot argmax."""
    check_kind(kind)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if kind == "logits":
        return logits
    if kind == "soft":
        return F.softmax(logits, dim=1)
    return F.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)


def check_responses(
    responses: torch.Tensor,
    kind: str,
    batch_size: int | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Validate teacher responses and return them as float32.

    Rejects (with the reason) a non-tensor, a wrong shape, non-finite values,
    soft rows that are not distributions (tolerance 1e-2 for float16 replies)
    and hard rows that are not one-hot. A device's broken reply fails here
    instead of corrupting a student.
    """
    check_kind(kind)
    if not isinstance(responses, torch.Tensor):
        raise TypeError(f"responses must be a tensor, got {type(responses).__name__}")
    if responses.dim() != 2:
        raise ValueError(f"responses must be 2-D (N, C), got shape {tuple(responses.shape)}")
    if batch_size is not None and responses.shape[0] != batch_size:
        raise ValueError(f"expected responses for {batch_size} inputs, got {responses.shape[0]}")
    if num_classes is not None and responses.shape[1] != num_classes:
        raise ValueError(f"expected {num_classes} classes per response, got {responses.shape[1]}")
    if responses.shape[1] < 2:
        raise ValueError(f"responses need at least 2 classes, got {responses.shape[1]}")
    r = responses.detach().float()
    if not torch.isfinite(r).all():
        raise ValueError("responses contain NaN or infinite values")
    if kind == "soft":
        sums = r.sum(1)
        if (r < -1e-6).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-2):
            raise ValueError(
                "soft responses must be probability rows (>= 0, summing to 1); "
                f"row sums range over [{sums.min().item():.4f}, {sums.max().item():.4f}]"
            )
    elif kind == "hard":
        if not (((r == 0) | (r == 1)).all() and (r.sum(1) == 1).all()):
            raise ValueError("hard responses must be one-hot rows (a single 1, zeros elsewhere)")
    return r


def teacher_logits(responses: torch.Tensor, kind: str, eps: float = 1e-8, hard_margin: float = 1.0) -> torch.Tensor:
    """The logits the loss uses for the teacher, from its responses.

    ``logits``: centred (row mean subtracted). ``soft``: centred
    ``log(max(p, eps))``, equal to the centred logits whenever no probability
    underflows ``eps``. ``hard``: the one-hot rows times ``hard_margin``, the
    logit gap a label stands for (1: the reference's choice, the one-hot label
    itself in both terms; see :func:`label_smoothing_margin`).
    """
    check_kind(kind)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not hard_margin > 0:
        raise ValueError(f"hard_margin must be > 0, got {hard_margin}")
    if kind == "hard":
        return responses.float() * hard_margin
    scores = responses.float() if kind == "logits" else torch.log(responses.float().clamp_min(eps))
    return scores - scores.mean(1, keepdim=True)


def label_smoothing_margin(smoothing: float, num_classes: int) -> float:
    """The logit gap of a label smoothed by ``smoothing``: ``log(1 + (1 − ε)·C/ε)``.

    Label smoothing ``ε`` puts ``1 − ε + ε/C`` on the label and ``ε/C`` on each
    other class; the log-ratio of the two is the margin. ``ε = 0.1`` with 10
    classes gives 4.51.
    """
    if not 0 < smoothing < 1:
        raise ValueError(f"smoothing must be in (0, 1), got {smoothing}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return math.log1p((1 - smoothing) * num_classes / smoothing)


def teacher_confidence(responses: torch.Tensor, kind: str) -> torch.Tensor:
    """The teacher's maximum response per input: max softmax probability (1 for hard labels)."""
    check_kind(kind)
    if kind == "hard":
        return torch.ones(responses.shape[0], dtype=torch.float32, device=responses.device)
    probs = F.softmax(responses.float(), 1) if kind == "logits" else responses.float()
    return probs.max(1).values.clamp(0.0, 1.0)


def class_balanced(probabilities: torch.Tensor) -> torch.Tensor:
    """Probabilities ``(..., N, C)`` on ``N`` class-balanced inputs, corrected to a uniform class prior.

    Each class's probability is divided by its mean over the ``N`` inputs and
    each row renormalised: one step of Saerens et al.'s prior correction
    (Neural Computation 2002) towards uniform, with the batch mean as the
    estimate of the prior the answers carry. An ensemble of devices that each
    saw a few classes over-predicts the classes many of them know on every
    input; on inputs drawn evenly from all classes (a public set, samples of a
    generator trained on one) this removes that bias and leaves the
    ensemble's ranking within each class. All-zero rows (an ensemble without
    weight) and classes no answer ever predicts stay zero.
    """
    if probabilities.dim() < 2 or probabilities.shape[-2] == 0:
        raise ValueError(f"probabilities must be (..., N, C) with N >= 1, got {tuple(probabilities.shape)}")
    p = probabilities.float()
    if (p < 0).any() or not torch.isfinite(p).all():
        raise ValueError("probabilities must be finite and non-negative")
    prior = p.mean(-2, keepdim=True)
    q = p / prior.clamp_min(1e-12)
    return q / q.sum(-1, keepdim=True).clamp_min(1e-12)


def answer_outliers(responses: torch.Tensor, kind: str, quality: torch.Tensor | None = None) -> list[int]:
    """The teachers (rows of ``responses`` ``(n, N, C)``) the ``screened_mean`` aggregate leaves out.

    With ``quality`` ``(n,)`` — each teacher's score on labelled query inputs,
    lower is better (:func:`answer_quality`) — those whose score is an
    outlier; otherwise those whose answers' mean divergence from the others'
    is (:func:`~hetkd.distill.similarity.outlier_devices`). Two poisoners that
    agree with each other can escape the divergence test; the labels cannot
    be escaped by agreeing.
    """
    check_kind(kind)
    if responses.dim() != 3:
        raise ValueError(f"responses must be (teachers, N, C), got {tuple(responses.shape)}")
    if quality is not None and tuple(quality.shape) != (responses.shape[0],):
        raise ValueError(f"quality must hold one loss per teacher ({responses.shape[0]},), got {tuple(quality.shape)}")
    probs = F.softmax(responses.float(), 2) if kind == "logits" else responses.float()
    return outlier_devices(probs.clamp_min(1e-6).log(), temperature=1.0, quality=quality)


def answer_quality(responses: torch.Tensor, kind: str, labels: torch.Tensor) -> torch.Tensor:
    """How far each teacher ``(n,)`` is from knowing any class: ``1 −`` its best per-class
    recall on query inputs whose classes ``labels`` ``(N,)`` are known (lower is better).

    A label-skewed honest device knows a few classes well and is confidently
    wrong on the rest, so its cross-entropy on all rows can be as bad as a
    poisoner's; but it recalls the classes it holds, while a device trained on
    permuted labels recalls none (measured on FedDF's private answers:
    digits, Dirichlet 0.5, 2 of 10 devices label-permuted, best recall of
    honest devices 0.84–1.0, of the poisoners 0.03–0.35).
    """
    check_kind(kind)
    if responses.dim() != 3 or labels.shape != (responses.shape[1],):
        raise ValueError(f"need responses (teachers, N, C) and N labels, got {tuple(responses.shape)} "
                         f"and {tuple(labels.shape)}")
    num_classes = responses.shape[2]
    predicted = F.one_hot(responses.argmax(2), num_classes).float()  # (n, N, C)
    truth = F.one_hot(labels.long(), num_classes).float()  # (N, C)
    present = truth.sum(0) > 0
    recall = (predicted * truth).sum(1)[:, present] / truth.sum(0)[present]  # (n, classes present)
    return 1.0 - recall.max(1).values


def ensemble_responses(
    responses: torch.Tensor, kind: str, weights: torch.Tensor, *, balance: bool = False, aggregate: str = "mean",
    trim_fraction: float = 0.2, quality: torch.Tensor | None = None, balance_groups: Sequence[int] | None = None,
) -> tuple[torch.Tensor, str]:
    """Ensemble answers ``(m, N, C)`` from ``n`` teachers' answers ``(n, N, C)`` and an ``m x n`` weight matrix.

    Row ``i`` of ``weights`` says how much each teacher counts for ensemble
    ``i`` (one row: one ensemble for everyone; ``n`` rows: one per device, as
    with SD-Dist's neighbour weights). Logits and soft answers average as
    probabilities and come back as ``"soft"``; hard answers are a weighted
    majority vote and come back as ``"hard"`` (ties go to the lowest class).
    With ``balance`` each ensemble is first corrected to a uniform class prior
    over the ``N`` inputs (:func:`class_balanced`; for hard answers, the vote
    shares, before the vote); ``balance_groups`` (sizes summing to ``N``)
    corrects each run of consecutive inputs on its own: inputs from another
    source, such as a generator's samples beside real rows, need not share
    the real rows' class prior and would skew theirs. Rows with zero total weight come back as
    all-zero answers. With ``aggregate`` ``screened_mean`` the teachers
    :func:`answer_outliers` flags (by their loss ``quality`` on labelled
    inputs when given, else by their divergence from the others) lose their
    weight first; with ``median`` or ``trimmed_mean`` each ensemble is instead the
    coordinate-wise robust aggregate of the probabilities (or one-hot votes)
    of the teachers its row weighs, counting equally
    (:func:`~hetkd.distill.robust.robust_probabilities`).
    """
    check_kind(kind)
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; valid choices: {', '.join(AGGREGATES)}")
    if responses.dim() != 3 or len(responses) == 0:
        raise ValueError(f"responses must be (teachers, N, C) with at least one teacher, got {tuple(responses.shape)}")
    n = responses.shape[0]
    if balance_groups is not None and (sum(balance_groups) != responses.shape[1] or min(balance_groups) < 1):
        raise ValueError(f"balance_groups must be positive sizes summing to the {responses.shape[1]} inputs, "
                         f"got {list(balance_groups)}")
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.dim() != 2 or w.shape[1] != n or (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError(f"weights must be a non-negative (m, {n}) matrix, got shape {tuple(w.shape)}")
    r = responses.float()
    if kind == "logits":
        r = F.softmax(r, dim=2)
    if aggregate == "screened_mean":
        w = screened_weights(w, answer_outliers(r, "soft", quality))
    totals = w.sum(1, keepdim=True)
    w = torch.where(totals > 0, w / totals.clamp_min(1e-12), w)
    if aggregate in ("mean", "screened_mean"):
        mixed = torch.einsum("mn,nkc->mkc", w, r)
    else:
        mixed = torch.zeros(w.shape[0], *r.shape[1:])
        for i, row in enumerate(w):
            if float(totals[i]) > 0:
                mixed[i] = robust_probabilities(r[row > 0], aggregate, trim_fraction)
    if balance:
        groups = list(balance_groups) if balance_groups is not None else [mixed.shape[1]]
        mixed = torch.cat([class_balanced(part) for part in mixed.split(groups, dim=1)], dim=1)
    if kind == "hard":
        voted = F.one_hot(mixed.argmax(2), mixed.shape[2]).float()
        return voted * (totals > 0).float().unsqueeze(2), "hard"
    return mixed, "soft"


def combine_responses(
    responses: Sequence[torch.Tensor], kind: str, weights: Sequence[float] | None = None
) -> tuple[torch.Tensor, str]:
    """One ensemble answer from several teachers' answers on the same inputs
    (:func:`ensemble_responses` with a single weight row; equal weights by default)."""
    check_kind(kind)
    if len(responses) == 0:
        raise ValueError("combine_responses needs at least one response tensor")
    shapes = {tuple(r.shape) for r in responses}
    if len(shapes) != 1:
        raise ValueError(f"responses to combine must share one shape, got {sorted(shapes)}")
    w = torch.ones(len(responses)) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    if w.shape != (len(responses),) or (w < 0).any() or w.sum() <= 0 or not torch.isfinite(w).all():
        raise ValueError(f"weights must be {len(responses)} non-negative numbers with a positive sum, got {weights}")
    mixed, out_kind = ensemble_responses(torch.stack([r.float() for r in responses]), kind, w[None])
    return mixed[0], out_kind
