"""The logit exchange FedMD and SD-Dist share: its settings, and how targets are mixed.

Devices share log-probabilities on a public reference set; the server mixes
them into each learner's targets ``W @ Z`` with a row-stochastic matrix ``W``
(FedMD: everyone equally; SD-Dist: the learner's neighbours). A learner then
distils towards its targets beside its private cross-entropy
(:class:`~hetkd.distill.losses.ReferenceKD`).

* :class:`ReferenceDistillSettings` — every setting of the exchange, with the
  run config's defaults (``strategy.kd``); :meth:`ReferenceDistillSettings.paper`
  is the SD-Dist paper's.
* :func:`mix_targets` — ``W @ Z`` on logits or on softened probabilities, as a
  sparse product over the teaching columns, so each learner costs its K teachers.
* :func:`robust_targets` — the robust option (``aggregate``): each learner's
  teachers combined by a coordinate-wise median or trimmed mean instead.
* :func:`teacher_targets` — the targets ``aggregate`` asks for (the one
  dispatch the server and a device that picks its own teachers both use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn import functional as F

from hetkd.distill.codec import PRECISIONS
from hetkd.distill.divergence import check_logits
from hetkd.distill.ensemble import ANSWER_MODELS
from hetkd.distill.losses import KDTerm, KLLoss
from hetkd.distill.robust import AGGREGATES, robust_aggregate, robust_probabilities, screened_weights
from hetkd.distill.similarity import outlier_devices
from hetkd.settings import require, require_choice, require_types

__all__ = ["MIX_SPACES", "ReferenceDistillSettings", "mix_targets", "robust_targets", "row_sums", "teacher_targets",
           "TeacherTargets", "uniform_weights"]

#: how teachers' predictions combine into a target
MIX_SPACES = ("logits", "probs")


@dataclass(frozen=True, kw_only=True)
class ReferenceDistillSettings:
    """How devices distil towards targets on the reference set (FedMD, SD-Dist).

    Each private batch is paired with a reference batch of
    ``reference_batch_size`` samples (0: the private batch size); the loss is
    ``(1 - rho) * CE(private) + rho * s * KL(target/T ‖ student/T)`` with
    ``T = temperature`` and ``s = T²`` if ``t_squared`` (Hinton et al.) else 1
    (SD-Dist's own code). ``mix`` says how teachers' predictions combine into
    a target: ``logits`` (their mean, as in the SD-Dist paper) or ``probs``
    (the mean of their softened distributions, robust to label skew).
    Predictions travel as log-probabilities at ``precision`` (``float32``,
    ``float16`` or ``uint8``). The first ``warmup_rounds`` rounds are local
    training only. A local epoch takes at least ``min_steps`` steps, passing
    over the private data again when it is small (0: one pass, as in the
    paper); 10 is about one pass over a 300-sample reference set at batch
    size 32, so devices with a few samples still distil.

    ``answer_model`` says which model's predictions a device sends:
    ``personal`` (its own, which distils: the published behaviour) or
    ``private`` (a copy of it that trains on the private data alone from the
    first distillation round on, as FedDF's answer model, so the predictions
    never echo the neighbours'). With ``rho = 1`` the device's own model then
    learns only by distillation on public inputs; under differential privacy
    (:mod:`hetkd.privacy`) it never reads private data, and only the private
    model's steps are accounted.

    ``aggregate`` says how a learner's teachers combine: ``mean`` (``W @ Z``,
    the published behaviour), or, robust to a poisoning minority,
    ``screened_mean`` (``W @ Z`` without the teachers the outlier test of
    :func:`~hetkd.distill.similarity.outlier_devices` flags: a reference-set
    loss far above the others' when the reference set is labelled, else a
    divergence from the others far above theirs), or the coordinate-wise
    ``median`` or ``trimmed_mean`` (dropping ``trim_fraction`` of the teachers
    at each end of every coordinate) of their predictions in the ``mix``
    space, the teachers counting equally (:func:`teacher_targets`). FedMD's
    teachers are the whole population; SD-Dist's, each device's neighbours
    (whom its own ``outlier_test`` already screens).

    The paper ran ρ = 0.9 without T² for ~1000 one-epoch rounds
    (:meth:`paper`); for runs of tens of rounds the defaults are ρ = 0.3 with
    T² (a KD weight of 3.9 against CE, vs the paper's 9 on an unscaled KL),
    which reached the best accuracy on digits in our sweeps (see the README's
    results).
    """

    rho: float = 0.3
    temperature: float = 3.0
    reference_batch_size: int = 0
    precision: str = "float16"
    warmup_rounds: int = 1
    mix: str = "probs"
    t_squared: bool = True
    min_steps: int = 10
    aggregate: str = "mean"
    trim_fraction: float = 0.2
    answer_model: str = "personal"

    def __post_init__(self) -> None:
        require_types(self)
        require(0.0 <= self.rho <= 1.0, "rho", f"must be in [0, 1], got {self.rho}")
        require_choice(self.answer_model, "answer_model", ANSWER_MODELS)
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(self.reference_batch_size >= 0, "reference_batch_size",
                f"must be >= 0 (0 = the private batch size), got {self.reference_batch_size}")
        require_choice(self.precision, "precision", PRECISIONS)
        require(self.warmup_rounds >= 0, "warmup_rounds", f"must be >= 0, got {self.warmup_rounds}")
        require_choice(self.mix, "mix", MIX_SPACES)
        require(self.min_steps >= 0, "min_steps", f"must be >= 0, got {self.min_steps}")
        require_choice(self.aggregate, "aggregate", AGGREGATES)
        require(0.0 <= self.trim_fraction < 0.5, "trim_fraction", f"must be in [0, 0.5), got {self.trim_fraction}")

    @classmethod
    def paper(cls) -> ReferenceDistillSettings:
        """The SD-Dist paper's exchange: ρ = 0.9, T = 3, logit mean, no T², float32, one pass per epoch."""
        return cls(rho=0.9, temperature=3.0, precision="float32", mix="logits", t_squared=False, min_steps=0)

    def kd_term(self) -> KDTerm:
        """How the KD term sits beside a device's private loss."""
        return KDTerm(rho=self.rho, batch_size=self.reference_batch_size, min_steps=self.min_steps)

    def kl_loss(self) -> KLLoss:
        """The KD term itself: temperature-``T`` KL, scaled by ``T²`` with ``t_squared``."""
        return KLLoss(temperature=self.temperature, scale=self.temperature**2 if self.t_squared else 1.0)


def mix_targets(
    weights: torch.Tensor, reference_logits: torch.Tensor, space: str = "logits", temperature: float = 1.0
) -> torch.Tensor:
    """Targets ``(m, R, C)`` from an ``m × n`` mixing matrix ``W`` over ``n`` devices' logits.

    * ``space="logits"`` (the paper): ``T_i = Σ_j W[i, j] · Z_j``, a weighted
      mean of logits — a geometric-mean ensemble of the distributions;
    * ``space="probs"``: the weighted mean of the softened distributions,
      ``q_i = Σ_j W[i, j] · softmax(Z_j / T)``, returned as logits
      ``T · log q_i`` so that ``softmax(target / T) = q_i`` exactly. Under
      label skew, where a device puts almost no mass on classes it never saw,
      this arithmetic mean keeps the classes that only some teachers know.

    A fresh tensor is returned (stored predictions are never modified).
    """
    check_logits(reference_logits)
    n = reference_logits.shape[0]
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must have {n} columns (one per device), got shape {tuple(weights.shape)}")
    out_shape = (weights.shape[0], *reference_logits.shape[1:])
    sums = row_sums(weights)
    if ((sums > 0) & ((sums - 1.0).abs() > 1e-4)).any():
        raise ValueError(f"each non-empty row of the weights must sum to 1, got row sums {sums.tolist()}")
    if space not in MIX_SPACES:
        raise ValueError(f"unknown mixing space {space!r}; valid choices: {', '.join(MIX_SPACES)}")
    if space == "probs" and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # only the columns that teach, as one sparse product
    w = weights.coalesce() if weights.is_sparse else weights.to_sparse()
    teachers = torch.unique(w.indices()[1])
    position = torch.full((n,), -1, dtype=torch.long)
    position[teachers] = torch.arange(len(teachers))
    w = torch.sparse_coo_tensor(
        torch.stack([w.indices()[0], position[w.indices()[1]]]), w.values().double(), (weights.shape[0], len(teachers)),
        check_invariants=False,
    )
    chosen = reference_logits[teachers].double().reshape(len(teachers), -1, reference_logits.shape[-1])
    if space == "probs":
        chosen = F.softmax(chosen / temperature, dim=-1)
    mixed = torch.sparse.mm(w, chosen.reshape(len(teachers), -1)).reshape(out_shape)
    if space == "logits":
        return mixed.float()
    return (temperature * mixed.clamp_min(1e-12).log()).float()


def robust_targets(
    weights: torch.Tensor, reference_logits: torch.Tensor, space: str = "probs", temperature: float = 1.0,
    aggregate: str = "median", trim_fraction: float = 0.2,
) -> torch.Tensor:
    """Targets ``(m, R, C)`` as :func:`mix_targets` makes them, but each learner's teachers
    (the columns where its row of ``W`` is positive) combine by ``aggregate``
    (:func:`~hetkd.distill.robust.robust_aggregate`), counting equally.

    ``space="probs"``: the aggregate of their softened distributions,
    renormalised, as logits ``T · log q``; ``"logits"``: of their logits.
    Learners with the same teachers share one aggregate (FedMD: one for
    everyone). Rows without teachers are zero.
    """
    check_logits(reference_logits)
    n = reference_logits.shape[0]
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must have {n} columns (one per device), got shape {tuple(weights.shape)}")
    if space not in MIX_SPACES:
        raise ValueError(f"unknown mixing space {space!r}; valid choices: {', '.join(MIX_SPACES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dense = weights.to_dense() if weights.is_sparse else weights
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(dense):
        teachers = tuple(torch.nonzero(row > 0).flatten().tolist())
        if teachers:
            groups.setdefault(teachers, []).append(i)
    out = torch.zeros(weights.shape[0], *reference_logits.shape[1:])
    for teachers, rows in groups.items():
        chosen = reference_logits[list(teachers)].double()
        if space == "probs":
            q = robust_probabilities(F.softmax(chosen / temperature, dim=-1), aggregate, trim_fraction)
            out[rows] = (temperature * q.clamp_min(1e-12).log()).float()
        else:
            out[rows] = robust_aggregate(chosen, aggregate, trim_fraction).float()
    return out


class TeacherTargets(NamedTuple):
    """What :func:`teacher_targets` made: the targets ``(m, R, C)``, which learners have a
    teacher left ``(m,)`` (the others' rows are no target), and the devices the screen kept
    from teaching."""

    targets: torch.Tensor
    taught: torch.Tensor
    screened: list[int]


def teacher_targets(
    weights: torch.Tensor, reference_logits: torch.Tensor, *, space: str = "probs", temperature: float = 1.0,
    aggregate: str = "mean", trim_fraction: float = 0.2, quality: torch.Tensor | None = None,
) -> TeacherTargets:
    """Each learner's targets ``(m, R, C)`` from its teachers (the positive entries of its row
    of ``weights``) combined by ``aggregate`` (see :class:`ReferenceDistillSettings`).

    ``mean``: :func:`mix_targets`; ``median`` / ``trimmed_mean``:
    :func:`robust_targets`; ``screened_mean``: :func:`mix_targets` after
    :func:`~hetkd.distill.robust.screened_weights` removed the devices
    :func:`~hetkd.distill.similarity.outlier_devices` flags (its ``auto``
    test on ``quality``, the devices' reference-set losses, when known).
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown aggregate {aggregate!r}; valid choices: {', '.join(AGGREGATES)}")
    if aggregate in ("median", "trimmed_mean"):
        targets = robust_targets(weights, reference_logits, space, temperature, aggregate, trim_fraction)
        return TeacherTargets(targets, row_sums(weights) > 0, [])
    screened: list[int] = []
    if aggregate == "screened_mean":
        screened = outlier_devices(reference_logits, temperature=temperature, quality=quality)
        weights = screened_weights(weights, screened)
    return TeacherTargets(mix_targets(weights, reference_logits, space, temperature), row_sums(weights) > 0, screened)


def row_sums(weights: torch.Tensor) -> torch.Tensor:
    """Each row's total weight, for a dense or a sparse mixing matrix."""
    if weights.is_sparse:
        return torch.sparse.sum(weights, dim=1).to_dense() if weights._nnz() else torch.zeros(weights.shape[0])
    return weights.sum(1)


def uniform_weights(n: int, include_self: bool = True) -> torch.Tensor:
    """Everyone learns from the plain average of all devices (FedMD's consensus)."""
    if n < 1:
        raise ValueError(f"need at least one device, got {n}")
    if include_self or n == 1:
        return torch.full((n, n), 1.0 / n)
    w = torch.full((n, n), 1.0 / (n - 1))
    w.fill_diagonal_(0.0)
    return w
