"""MEKD: source-blind, black-box knowledge distillation by mapping emulation.

Ma et al., "Aligning Logits Generatively for Principled Black-Box Knowledge
Distillation" (CVPR 2024; arXiv 2205.10490). The teacher is a black box: a
function from a batch of inputs to *responses* (logits, soft probabilities or
one-hot labels; :mod:`hetkd.distill.teacher`, :mod:`hetkd.distill.ensemble`);
we never see its weights, gradients or training data. Two steps:

1. **Deprivatization** (:func:`hetkd.distill.blackbox.deprivatize`,
   :class:`hetkd.distill.deprivatization.Deprivatizer`): a generator G with
   latent size = number of classes is trained against a discriminator D on
   *unlabelled public proxy inputs*, plus an information term built from the
   teacher's responses on G(z). G is then frozen; it emulates the teacher's
   inverse mapping (logit space -> input space).
2. **Distillation** (:func:`hetkd.distill.blackbox.distill`,
   :class:`MappingEmulationDistiller`): on synthetic inputs ``x = G(z)`` the
   student minimises :func:`mapping_emulation_loss`
   ``w_f · dist(G(s/T_g), G(t/T_g)) + w_kl · T · KL(softmax(t/T) ‖ softmax(s/T))``
   where ``s``, ``t`` are the student's and the teacher's logits on ``x`` and
   ``dist`` is L1 or L2 (mean over elements). The KL is scaled by ``T``, not
   ``T²``, as in the reference code. When real public inputs sit beside G's
   samples in the transfer set, G's term may be restricted to the samples
   (``generated``; :attr:`MEKDSettings.emulation_inputs`). Teacher logits come from the responses by
   :func:`hetkd.distill.ensemble.teacher_logits` (centred; hard labels scaled
   by ``DistillSettings.hard_margin``).

This module holds step 2 and the student side every distillation shares: the
loss, :class:`DistillSettings`, the SGD schedule (:class:`StudentOptimizer`)
and :func:`kd_steps`, the one loop of KD updates ("draw a batch, one
optimizer step, record") that black-box distillation, the baselines of
:mod:`hetkd.distill.blackbox` and the federated server's student
(:meth:`hetkd.strategies.EnsembleDistill.distill_student`) all run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hetkd.distill.deprivatization import GanSettings
from hetkd.distill.ensemble import check_responses, teacher_logits
from hetkd.distill.generative import Generator
from hetkd.distill.losses import kd_kl
from hetkd.interrupt import raise_if_stopped
from hetkd.settings import require, require_choice, require_types
from hetkd.training import derive_seed

__all__ = [
    "DISTANCES",
    "DEVICE_LOSSES",
    "EMULATION_INPUTS",
    "StepCallback",
    "EmulationLossFn",
    "generated_distance",
    "mapping_emulation_terms",
    "mapping_emulation_loss",
    "EmulationLoss",
    "DistillSettings",
    "MEKDSettings",
    "StudentOptimizer",
    "MappingEmulationDistiller",
    "freeze",
    "kd_steps",
    "transfer_batches",
]

#: the distance between generated points in the mapping-emulation term
DISTANCES: tuple[str, ...] = ("l1", "l2")

#: what MEKD's devices distil with: the mapping-emulation loss or KL alone (``MEKDSettings.device_loss``)
DEVICE_LOSSES: tuple[str, ...] = ("emulation", "kl")

#: which rows of a transfer set G's term is computed on (``MEKDSettings.emulation_inputs``)
EMULATION_INPUTS: tuple[str, ...] = ("all", "generated")

#: per-step metrics callback: (step, {"loss": ..., ...})
StepCallback = Callable[[int, dict[str, float]], None]

#: a bound :class:`EmulationLoss`: ``loss(student_logits, teacher_logits, generated=None)``
EmulationLossFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------- losses (pure)


def generated_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean absolute (``"l1"``) or mean squared (``"l2"``) difference."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; valid choices: {', '.join(DISTANCES)}")
    if a.shape != b.shape:
        raise ValueError(f"generated points differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.l1_loss(a, b) if distance == "l1" else F.mse_loss(a, b)


def mapping_emulation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    generator: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    temperature: float = 5.0,
    generator_temperature: float = 5.0,
    distance: str = "l1",
    generated: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dist(G(s/T_g), G(t/T_g)), T · KL(softmax(t/T) ‖ softmax(s/T)))``.

    The teacher side of the first term carries no gradient. ``generator`` may
    be ``None`` only to skip the first term (returned as 0). ``generated``
    (boolean, one entry per row) restricts the first term to the rows it marks
    (G's own samples), each weighing as it would among all ``N`` rows: the
    term is ``dist`` over those rows times their share of ``N`` (0 when none
    is marked). ``None``: every row.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must share one (N, C) shape"
        )
    if temperature <= 0 or generator_temperature <= 0:
        raise ValueError(
            f"temperatures must be > 0, got temperature={temperature}, generator_temperature={generator_temperature}"
        )
    if generated is not None and (generated.dtype != torch.bool or tuple(generated.shape) != student_logits.shape[:1]):
        raise ValueError(f"generated must be a boolean mask of {student_logits.shape[0]} rows, got "
                         f"{generated.dtype} of shape {tuple(generated.shape)}")
    teacher_logits = teacher_logits.detach()
    kl = kd_kl(student_logits, teacher_logits, temperature, scale=temperature)
    if generator is None or (generated is not None and not bool(generated.any())):
        return student_logits.new_zeros(()), kl
    if generated is not None:
        share = generated.float().mean()
        student_logits, teacher_logits = student_logits[generated], teacher_logits[generated]
        f, _ = mapping_emulation_terms(student_logits, teacher_logits, generator, temperature=temperature,
                                       generator_temperature=generator_temperature, distance=distance)
        return share * f, kl
    with torch.no_grad():
        target = generator(teacher_logits / generator_temperature)
    emulated = generator(student_logits / generator_temperature)
    return generated_distance(emulated, target, distance), kl


def mapping_emulation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    generator: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    temperature: float = 5.0,
    generator_temperature: float = 5.0,
    w_f: float = 1.0,
    w_kl: float = 1.0,
    distance: str = "l1",
    generated: torch.Tensor | None = None,
) -> torch.Tensor:
    """MEKD's distillation loss ``w_f · dist(G(s/T_g), G(t/T_g)) + w_kl · T · KL(t/T ‖ s/T)``.

    ``w_f = 0`` is plain KD on the same inputs (G is then not evaluated and
    may be ``None``). ``generated``: the rows G's term is computed on
    (:func:`mapping_emulation_terms`; ``None``: all).
    """
    if w_f < 0 or w_kl < 0:
        raise ValueError(f"weights must be >= 0, got w_f={w_f}, w_kl={w_kl}")
    if w_f > 0 and generator is None:
        raise ValueError("w_f > 0 needs a generator")
    f, kl = mapping_emulation_terms(
        student_logits,
        teacher_logits,
        generator if w_f > 0 else None,
        temperature=temperature,
        generator_temperature=generator_temperature,
        distance=distance,
        generated=generated,
    )
    return w_f * f + w_kl * kl


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class EmulationLoss:
    """MEKD's distillation loss with its weights: what a device needs to distil like the server.

    ``w_f · dist(G(s/T_g), G(t/T_g)) + w_kl · T · KL(t/T ‖ s/T)`` with ``T =
    temperature``, ``T_g = generator_temperature`` and ``dist`` = ``distance``;
    a hard label stands for the logit gap ``hard_margin``
    (:func:`~hetkd.distill.ensemble.teacher_logits`). Made from
    :meth:`DistillSettings.loss`; ``w_f = 0`` is KL alone (FedDF).
    ``generated_only``: G's term on G's samples only, KL alone on the real
    rows beside them (MEKD sets it from :attr:`MEKDSettings.emulation_inputs`);
    the loss is then given which rows are G's samples.
    """

    temperature: float
    generator_temperature: float
    w_f: float
    w_kl: float
    distance: str
    hard_margin: float
    generated_only: bool = False

    def __post_init__(self) -> None:
        require_types(self)
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(self.generator_temperature > 0, "generator_temperature",
                f"must be > 0, got {self.generator_temperature}")
        require(self.w_f >= 0, "w_f", f"must be >= 0, got {self.w_f}")
        require(self.w_kl >= 0, "w_kl", f"must be >= 0, got {self.w_kl}")
        require(self.w_f + self.w_kl > 0, "w_kl", "w_f and w_kl cannot both be 0")
        require_choice(self.distance, "distance", DISTANCES)
        require(self.hard_margin > 0, "hard_margin", f"must be > 0, got {self.hard_margin}")

    def bind(self, generator: Callable[[torch.Tensor], torch.Tensor] | None) -> EmulationLossFn:
        """``loss(student_logits, teacher_logits, generated=None)`` with ``generator`` as G
        (``None`` with ``w_f = 0``). With :attr:`generated_only` and ``w_f > 0`` the caller must say
        which rows are G's samples (``generated``); otherwise ``generated`` is ignored."""

        def loss(student_logits: torch.Tensor, target_logits: torch.Tensor,
                 generated: torch.Tensor | None = None) -> torch.Tensor:
            if self.generated_only and self.w_f > 0 and generated is None:
                raise ValueError("this loss computes G's term on G's samples only (generated_only): "
                                 "pass generated, the mask of the rows that are G's samples")
            return mapping_emulation_loss(
                student_logits, target_logits, generator, temperature=self.temperature,
                generator_temperature=self.generator_temperature, w_f=self.w_f, w_kl=self.w_kl,
                distance=self.distance, generated=generated if self.generated_only else None,
            )

        return loss


@dataclass(frozen=True, kw_only=True)
class DistillSettings:
    """Distillation: ``steps`` SGD updates on ``batch_size`` inputs each.

    SGD with ``lr``, ``momentum``, ``weight_decay``; the learning rate is
    multiplied by ``gamma`` at each fraction of ``steps`` in ``milestones``
    (the reference decays 10x at epochs 80 and 160 of 240). Loss weights,
    temperatures and the distance are those of :func:`mapping_emulation_loss`
    (:meth:`loss`); ``hard_margin`` is the logit gap a hard label stands for
    (:func:`~hetkd.distill.ensemble.teacher_logits`): 1 is the reference's
    one-hot-as-logits, a nearly flat target at T = 5; label smoothing ε
    corresponds to ``log(1 + (1 − ε)·C/ε)`` (4.51 for ε = 0.1, C = 10).

    The reference uses T = T_g = 5, w_f = w_kl = 1, L1, SGD 0.1 decayed 10x at
    1/3 and 2/3 of 240 epochs x 500 iterations of 128.
    """

    steps: int = 1000
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.33, 0.67)
    gamma: float = 0.1
    temperature: float = 5.0
    generator_temperature: float = 5.0
    w_f: float = 1.0
    w_kl: float = 1.0
    distance: str = "l1"
    hard_margin: float = 1.0

    def __post_init__(self) -> None:
        require_types(self)
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.batch_size >= 2, "batch_size", f"must be >= 2 (BatchNorm), got {self.batch_size}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(all(0 < m < 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
                "milestones", f"must be increasing fractions in (0, 1), got {list(self.milestones)}")
        require(0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        self.loss()  # checks the loss's own settings

    def loss(self) -> EmulationLoss:
        """The loss these settings describe."""
        return EmulationLoss(temperature=self.temperature, generator_temperature=self.generator_temperature,
                             w_f=self.w_f, w_kl=self.w_kl, distance=self.distance, hard_margin=self.hard_margin)


@dataclass(frozen=True, kw_only=True)
class MEKDSettings:
    """MEKD's hyperparameters (Ma et al., CVPR 2024): the run config's ``mekd`` group.

    ``response``: what devices answer with in the federated strategy, ``soft``
    (probabilities) or ``hard`` (labels); ``gan``: deprivatization
    (:class:`~hetkd.distill.deprivatization.GanSettings`); ``distill``: the
    loss and the student's optimizer (:class:`DistillSettings`), which FedDF's
    student uses too (with ``w_f = 0``). ``hetkd b2kd`` reads ``gan`` and
    ``distill`` (its responses are ``b2kd.responses``).

    ``reference_queries``: how many of each distillation round's queries
    (``strategy.ensemble.num_queries``) are rows of the public reference set
    rather than G's samples. 0 is the paper's transfer set (G's samples only).
    On real images a generator trained on a CPU budget draws few class-typical
    samples, and real public inputs beside them give the student (and the
    devices) targets on the data's own manifold; the mapping-emulation loss
    still compares the answers through G. With ``reference_queries`` equal to
    ``num_queries`` the transfer set is the reference rows alone and G enters
    only through that loss (on real MNIST neither transfer set won on both
    seeds measured: ``docs/results/mnist_htfllib.md``). The devices must hold the reference
    set; it stays source-blind: the server still sees only answers. The last
    deprivatization round asks about the reference rows too, so the student and
    the devices start distilling a round before G's first samples are queried.

    ``device_loss``: the loss the devices distil the ensemble's targets with
    in the federated strategy, ``emulation`` (the student's: G's term beside
    KL) or ``kl`` (KL alone, as with ``w_f = 0``). G's term costs every device
    a forward pass of G per batch for the targets and a forward and backward
    pass for its own logits; the global student keeps G's term either way.

    ``emulation_inputs``: the rows of the transfer set G's term is computed
    on, ``all`` or ``generated`` (G's samples only: the reference rows that
    ``reference_queries`` mixes in get KL alone, the paper's loss on the
    paper's inputs). Replayed on the same answers of real MNIST
    (``docs/results/mnist_htfllib.md``), G's term on the real rows cost the
    student 0.8-1.7 points on each of three seeds; on G's samples alone it
    changed nothing on the mean. With no reference rows in the transfer set
    the two are the same; with reference rows only, ``generated`` leaves KL
    alone.
    """

    response: str = "soft"
    reference_queries: int = 0
    device_loss: str = "emulation"
    emulation_inputs: str = "all"
    gan: GanSettings = field(default_factory=GanSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)

    def __post_init__(self) -> None:
        require_types(self)
        require_choice(self.response, "response", ("soft", "hard"))
        require_choice(self.device_loss, "device_loss", DEVICE_LOSSES)
        require_choice(self.emulation_inputs, "emulation_inputs", EMULATION_INPUTS)
        require(self.reference_queries >= 0, "reference_queries", f"must be >= 0, got {self.reference_queries}")

    def reference_queries_problem(self, num_queries: int, reference_size: int) -> str | None:
        """Why ``reference_queries`` does not fit queries of ``num_queries`` inputs over a reference
        set of ``reference_size`` rows (``None``: it fits). The config check and the strategy both ask."""
        k = self.reference_queries
        if k <= num_queries and k <= reference_size:
            return None
        return (f"{k} reference rows per query must be at most strategy.ensemble.num_queries ({num_queries}) "
                f"and at most the reference set's {reference_size} rows")


# --------------------------------------------------------------------------- the student


class StudentOptimizer:
    """SGD with momentum and step decay at fractions of a fixed step budget."""

    def __init__(self, student: nn.Module, settings: DistillSettings) -> None:
        self.student = student
        self.settings = settings
        self.optimizer = torch.optim.SGD(
            student.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
        marks = sorted({max(1, round(f * settings.steps)) for f in settings.milestones})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, marks, settings.gamma)
        self.steps_done = 0

    def step(self, compute_loss: Callable[[], torch.Tensor]) -> float:
        """One update: ``compute_loss()`` (student in train mode), backward, SGD, schedule."""
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = compute_loss()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {loss.item()} at step {self.steps_done}")
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.steps_done += 1
        return float(loss.item())

    def state_dict(self) -> dict[str, Any]:
        """SGD's momentum, the schedule's position and the steps done (the student's weights are its own)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = int(state["steps_done"])


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients for the parameters (G after deprivatization)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class MappingEmulationDistiller:
    """A student, the frozen G and the SGD schedule; one distillation update at a time.

    ``sample_inputs()`` draws synthetic inputs G(z); ``step(inputs, responses,
    kind)`` updates the student on them with the teacher's (or an ensemble's)
    responses, however those were obtained. ``targets`` and ``loss`` are the
    two halves of ``step``, for :func:`kd_steps`.
    """

    def __init__(
        self, student: nn.Module, generator: Generator, settings: DistillSettings | None = None, *, seed: int = 0
    ) -> None:
        self.settings = settings or DistillSettings()
        self.student = student
        self.generator = freeze(generator)
        self.num_classes = int(generator.latent_dim)
        self.optimizer = StudentOptimizer(student, self.settings)
        self.latent_rng = torch.Generator().manual_seed(derive_seed("mekd-distill-latent", seed))

    def sample_inputs(self, n: int | None = None) -> torch.Tensor:
        """``n`` (default: the batch size) synthetic inputs G(z), z ~ N(0, I)."""
        z = torch.randn(n or self.settings.batch_size, self.num_classes, generator=self.latent_rng)
        with torch.no_grad():
            return self.generator(z)

    def targets(self, inputs: torch.Tensor, responses: torch.Tensor, kind: str) -> torch.Tensor:
        """The teacher logits the loss uses, from (checked) ``kind`` responses on ``inputs``."""
        return teacher_logits(check_responses(responses, kind, len(inputs), self.num_classes), kind,
                              hard_margin=self.settings.hard_margin)

    def loss(self, student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:func:`mapping_emulation_loss` with this run's G and settings."""
        return self.settings.loss().bind(self.generator)(student_logits, targets)

    def step(self, inputs: torch.Tensor, responses: torch.Tensor, kind: str) -> float:
        """One SGD update of the student with :func:`mapping_emulation_loss`; returns the loss."""
        targets = self.targets(inputs, responses, kind)
        return self.optimizer.step(lambda: self.loss(self.student(inputs), targets))


# --------------------------------------------------------------------------- the KD-steps loop


def kd_steps(
    optimizer: StudentOptimizer,
    steps: int,
    next_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    on_step: StepCallback | None = None,
    advance: Callable[[], None] | None = None,
) -> list[float]:
    """``steps`` KD updates of ``optimizer.student``; returns the per-step losses.

    Step ``i`` draws ``(inputs, targets) = next_batch(i)`` (student inputs and
    teacher targets, e.g. teacher logits; any randomness of the draw comes
    before the update's), makes one :meth:`StudentOptimizer.step` on
    ``loss(student(inputs), targets)``, reports
    ``on_step(optimizer.steps_done - 1, {"loss": ...})`` (numbered by the
    optimizer, so successive calls on one optimizer count on) and calls
    ``advance()`` (a progress bar). Every student update of the package runs
    through here, and stops here on a requested interrupt
    (:func:`hetkd.interrupt.raise_if_stopped`).
    """
    losses = []
    for step in range(steps):
        raise_if_stopped(f"distillation step {step + 1} of {steps} abandoned")
        inputs, targets = next_batch(step)
        value = optimizer.step(lambda inputs=inputs, targets=targets: loss(optimizer.student(inputs), targets))
        losses.append(value)
        if on_step is not None:
            on_step(optimizer.steps_done - 1, {"loss": value})
        if advance is not None:
            advance()
    return losses


def transfer_batches(
    inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, rng: torch.Generator
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``next_batch`` for :func:`kd_steps` on a transfer set ``(inputs, targets)``.

    Each call draws ``min(batch_size, len(inputs))`` rows uniformly with
    replacement, one ``torch.randint`` from ``rng``, and returns those rows of both.
    """
    batch = min(batch_size, len(inputs))

    def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(inputs), (batch,), generator=rng)
        return inputs[idx], targets[idx]

    return next_batch
