"""MEKD: source-blind, black-box knowledge distillation by mapping emulation.

Ma et al., "Aligning Logits Generatively for Principled Black-Box Knowledge
Distillation" (CVPR 2024; arXiv 2205.10490). The teacher is a black box: a
function from a batch of inputs to *responses* (logits, soft probabilities or
one-hot labels); we never see its weights, gradients or training data. Two steps:

1. **Deprivatization** (:func:`deprivatize`, :class:`Deprivatizer`): a generator
   G with latent size = number of classes is trained against a discriminator D
   on *unlabelled public proxy inputs*, plus an information term built from the
   teacher's responses on G(z). G is then frozen; it emulates the teacher's
   inverse mapping (logit space -> input space).
2. **Distillation** (:func:`distill`, :class:`MappingEmulationDistiller`): on
   synthetic inputs ``x = G(z)`` the student minimises
   :func:`mapping_emulation_loss`
   ``w_f · dist(G(s/T_g), G(t/T_g)) + w_kl · T · KL(softmax(t/T) ‖ softmax(s/T))``
   where ``s``, ``t`` are the student's and the teacher's logits on ``x`` and
   ``dist`` is L1 or L2 (mean over elements). The KL is scaled by ``T``, not
   ``T²``, as in the reference code.

Responses. ``"logits"`` are raw scores; ``"soft"`` are probabilities (what a
device sends in the federated protocol); ``"hard"`` are one-hot labels. The
loss needs teacher *logits*: :func:`teacher_logits` turns soft probabilities
into log-probabilities, which equal the logits up to a per-row constant, and
centres both forms (subtracts the row mean), so logits and soft responses
give identical targets. (The reference feeds raw logits to G; centring picks
one representative of the shift-equivalence class that the softmax cannot
tell apart.) Hard responses replace the teacher output by its one-hot argmax
scaled by a margin ``m`` in both terms: ``G(m·onehot/T_g)`` and
``softmax(m·onehot/T)``. The reference uses ``m = 1``, a nearly flat target
at ``T = 5`` (the labelled class gets 12 % of the mass against 9.8 % for each
other class), so its students learn a one-logit margin that noise on unseen
inputs overturns; ``m = log(1 + (1 − ε)·C/ε)`` is the target of label
smoothing ``ε`` (``DistillSettings.hard_margin``).

Teachers. Everything that needs a teacher takes a *responder*: a callable from
an input batch to responses, always called under ``torch.no_grad()`` on
detached inputs. :class:`BlackBoxTeacher` wraps a model into one and refuses
every attribute access but the forward call; a plain ``nn.Module`` passed as a
teacher is wrapped that way. Any other callable (e.g. one that sends the batch
to devices over the network and averages their replies) is used as is, with
``response=`` naming what it returns. The step classes also accept responses
computed elsewhere, so a Flower strategy can send G(z) out, collect replies,
and call ``step`` when they arrive.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hetkd.distill.generative import Discriminator, Generator, make_discriminator, make_generator
from hetkd.distill.losses import kd_kl
from hetkd.training import derive_seed, seeded

__all__ = [
    "RESPONSE_KINDS",
    "DISTANCES",
    "Responder",
    "BlackBoxError",
    "BlackBoxTeacher",
    "as_responder",
    "responses_from_logits",
    "check_responses",
    "query_teacher",
    "teacher_logits",
    "label_smoothing_margin",
    "teacher_confidence",
    "class_balanced",
    "combine_responses",
    "ensemble_responses",
    "generate_queries",
    "query_latents",
    "generated_distance",
    "mapping_emulation_terms",
    "mapping_emulation_loss",
    "discriminator_loss",
    "generator_loss",
    "GanSettings",
    "DistillSettings",
    "StudentOptimizer",
    "Deprivatizer",
    "MappingEmulationDistiller",
    "freeze",
    "proxy_inputs",
    "deprivatize",
    "distill",
    "progress_bar",
]

#: what a teacher may answer with
RESPONSE_KINDS: tuple[str, ...] = ("logits", "soft", "hard")
#: the distance between generated points in the mapping-emulation term
DISTANCES: tuple[str, ...] = ("l1", "l2")

#: a black-box teacher: input batch -> responses (N x C)
Responder = Callable[[torch.Tensor], torch.Tensor]
#: per-step metrics callback: (step, {"loss": ..., ...})
StepCallback = Callable[[int, dict[str, float]], None]


def _check_kind(kind: str, name: str = "response") -> str:
    if kind not in RESPONSE_KINDS:
        raise ValueError(f"unknown {name} {kind!r}; valid choices: {', '.join(RESPONSE_KINDS)}")
    return kind


# --------------------------------------------------------------------------- the black box


class BlackBoxError(AttributeError):
    """Something other than a forward query was asked of a black-box teacher."""


def _forward_only(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A closure that runs ``model`` (in eval mode if it is a module) and nothing else."""
    is_module = isinstance(model, nn.Module)

    def answer(inputs: torch.Tensor) -> torch.Tensor:
        if is_module:
            model.eval()  # type: ignore[union-attr]
        return model(inputs)

    return answer


class BlackBoxTeacher:
    """A teacher seen only through its answers: call it on a batch, get responses.

    Wraps any callable from inputs to logits (a ``torch.nn.Module``, a user's
    function). Calls run under ``torch.no_grad()`` on detached inputs, and the
    answer is turned into the ``response`` kind: ``"logits"``, ``"soft"``
    (softmax probabilities) or ``"hard"`` (one-hot argmax). ``queries`` counts
    the inputs answered so far. Reading anything else — parameters, state,
    gradients, the wrapped model — raises :class:`BlackBoxError`.
    """

    __slots__ = ("_answer", "response", "num_classes", "queries")

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], response: str = "soft") -> None:
        if not callable(model):
            raise TypeError(f"a teacher must be callable on a batch of inputs, got {type(model).__name__}")
        self._answer = _forward_only(model)
        self.response = _check_kind(response)
        self.num_classes: int | None = None
        self.queries = 0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"a teacher answers float input batches (N, ...), got {shape}")
        with torch.no_grad():
            logits = self._answer(inputs.detach())
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"the wrapped teacher must return logits of shape ({inputs.shape[0]}, C), got {got}")
        if not torch.isfinite(logits).all():
            raise ValueError("the wrapped teacher returned non-finite logits")
        if self.num_classes is None:
            self.num_classes = int(logits.shape[1])
        elif logits.shape[1] != self.num_classes:
            raise ValueError(f"the teacher answered with {logits.shape[1]} classes after {self.num_classes}")
        self.queries += int(inputs.shape[0])
        return responses_from_logits(logits.detach().float(), self.response)

    def __getattr__(self, name: str) -> Any:
        raise BlackBoxError(
            f"a black-box teacher answers forward queries only; '{name}' (parameters, gradients, "
            "state, the model itself) is not available"
        )

    def __repr__(self) -> str:
        return f"BlackBoxTeacher(response={self.response!r}, queries={self.queries})"


def as_responder(teacher: Any, response: str | None = None) -> tuple[Responder, str]:
    """``(responder, response kind)`` for any accepted teacher.

    * a :class:`BlackBoxTeacher`: used as is (``response``, if given, must match);
    * a ``torch.nn.Module`` (a model returning logits): wrapped in a
      :class:`BlackBoxTeacher` answering with ``response`` (default ``"soft"``);
    * any other callable: a responder that already returns ``response``-kind
      answers (``response`` is then required).
    """
    if isinstance(teacher, BlackBoxTeacher):
        if response is not None and _check_kind(response) != teacher.response:
            raise ValueError(f"response={response!r} but the black-box teacher answers {teacher.response!r}")
        return teacher, teacher.response
    if isinstance(teacher, nn.Module):
        kind = _check_kind(response or "soft")
        return BlackBoxTeacher(teacher, kind), kind
    if not callable(teacher):
        raise TypeError(f"a teacher must be callable on a batch of inputs, got {type(teacher).__name__}")
    if response is None:
        raise ValueError(
            f"response= must say what the callable teacher returns ({', '.join(RESPONSE_KINDS)})"
        )
    return teacher, _check_kind(response)


# --------------------------------------------------------------------------- responses (pure)


def responses_from_logits(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The ``kind`` answer a model with these logits gives: logits, softmax, or one-hot argmax."""
    _check_kind(kind)
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
    _check_kind(kind)
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
    _check_kind(kind)
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
    _check_kind(kind)
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


def ensemble_responses(
    responses: torch.Tensor, kind: str, weights: torch.Tensor, *, balance: bool = False
) -> tuple[torch.Tensor, str]:
    """Ensemble answers ``(m, N, C)`` from ``n`` teachers' answers ``(n, N, C)`` and an ``m x n`` weight matrix.

    Row ``i`` of ``weights`` says how much each teacher counts for ensemble
    ``i`` (one row: one ensemble for everyone; ``n`` rows: one per device, as
    with SD-Dist's neighbour weights). Logits and soft answers average as
    probabilities and come back as ``"soft"``; hard answers are a weighted
    majority vote and come back as ``"hard"`` (ties go to the lowest class).
    With ``balance`` each ensemble is first corrected to a uniform class prior
    over the ``N`` inputs (:func:`class_balanced`; for hard answers, the vote
    shares, before the vote). Rows with zero total weight come back as
    all-zero answers.
    """
    _check_kind(kind)
    if responses.dim() != 3 or len(responses) == 0:
        raise ValueError(f"responses must be (teachers, N, C) with at least one teacher, got {tuple(responses.shape)}")
    n = responses.shape[0]
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.dim() != 2 or w.shape[1] != n or (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError(f"weights must be a non-negative (m, {n}) matrix, got shape {tuple(w.shape)}")
    totals = w.sum(1, keepdim=True)
    w = torch.where(totals > 0, w / totals.clamp_min(1e-12), w)
    r = responses.float()
    if kind == "logits":
        r = F.softmax(r, dim=2)
    mixed = torch.einsum("mn,nkc->mkc", w, r)
    if balance:
        mixed = class_balanced(mixed)
    if kind == "hard":
        voted = F.one_hot(mixed.argmax(2), mixed.shape[2]).float()
        return voted * (totals > 0).float().unsqueeze(2), "hard"
    return mixed, "soft"


def combine_responses(
    responses: Sequence[torch.Tensor], kind: str, weights: Sequence[float] | None = None
) -> tuple[torch.Tensor, str]:
    """One ensemble answer from several teachers' answers on the same inputs
    (:func:`ensemble_responses` with a single weight row; equal weights by default)."""
    _check_kind(kind)
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


def query_latents(seed: int, count: int, latent_dim: int) -> torch.Tensor:
    """The ``count`` latent codes ``z ~ N(0, I)`` a query with ``seed`` stands for."""
    return torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(int(seed)))


def generate_queries(
    generator: Generator, seed: int, count: int, batch_size: int, train_mode: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, G(z))`` for ``count`` latent codes ``z ~ N(0, I)`` drawn from ``seed``: the same on every machine.

    A server and a device that hold the same G weights call this with the same
    arguments and get the same inputs, so the server can send a seed instead
    of the inputs. ``train_mode`` runs G's BatchNorm on batch statistics (as
    G sees its samples during deprivatization), in chunks of ``batch_size``;
    otherwise on its running statistics (a frozen G). G itself is left as it
    was (a copy runs in train mode, so running statistics do not move).
    """
    if count < 1 or batch_size < 2:
        raise ValueError(f"need count >= 1 and batch_size >= 2, got count={count}, batch_size={batch_size}")
    if train_mode and count % batch_size:
        raise ValueError(f"in train mode count ({count}) must be a multiple of batch_size ({batch_size})")
    z = query_latents(seed, count, generator.latent_dim)
    model = copy.deepcopy(generator).train() if train_mode else generator
    was_training = generator.training
    if not train_mode:
        generator.eval()
    try:
        with torch.no_grad():
            return z, torch.cat([model(part) for part in z.split(batch_size)])
    finally:
        generator.train(was_training)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dist(G(s/T_g), G(t/T_g)), T · KL(softmax(t/T) ‖ softmax(s/T)))``.

    The teacher side of the first term carries no gradient. ``generator`` may
    be ``None`` only to skip the first term (returned as 0).
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
    teacher_logits = teacher_logits.detach()
    kl = kd_kl(student_logits, teacher_logits, temperature, scale=temperature)
    if generator is None:
        return student_logits.new_zeros(()), kl
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
) -> torch.Tensor:
    """MEKD's distillation loss ``w_f · dist(G(s/T_g), G(t/T_g)) + w_kl · T · KL(t/T ‖ s/T)``.

    ``w_f = 0`` is plain KD on the same inputs (G is then not evaluated and
    may be ``None``).
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
    )
    return w_f * f + w_kl * kl


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``BCE(D(real), 1) + BCE(D(fake), 0)`` on D's "real" logits."""
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: torch.Tensor, confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(adversarial, information)`` terms of G's loss from D's logits on G(z).

    adversarial = ``mean(-log D(G(z)))``, the non-saturating GAN loss;
    information = ``mean(c · -log D(G(z)))`` with ``c`` the teacher's maximum
    response on each G(z) (:func:`teacher_confidence`), so samples the teacher
    answers confidently weigh more in pulling G towards the data: our reading
    of the paper's information term (the teacher's maximum response). The reference code (``DCGAN.py``) multiplies
    ``-log D`` (shape N x 1) by the teacher's *argmax class index* (shape N),
    which broadcasts to N x N: its term is the mean class index times the mean
    of ``-log D``, i.e. a rescaled adversarial loss that ignores which sample
    the teacher was sure about. For hard responses ``c = 1`` and the two terms
    coincide.
    """
    if confidence.shape != fake_logits.shape:
        raise ValueError(
            f"confidence {tuple(confidence.shape)} must have one entry per generated sample {tuple(fake_logits.shape)}"
        )
    neg_log_d = F.softplus(-fake_logits)  # -log sigmoid(logit)
    return neg_log_d.mean(), (confidence.detach() * neg_log_d).mean()


# --------------------------------------------------------------------------- settings


def _require(ok: bool, name: str, value: Any, what: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}, got {value!r}")


@dataclass(frozen=True)
class GanSettings:
    """Deprivatization: ``steps`` D-then-G updates on ``batch_size`` proxy inputs each.

    Adam with betas ``(beta1, beta2)`` = DCGAN's (0.5, 0.999). The learning
    rates follow the two-timescale rule (Heusel et al., 2017): D 4e-4, G 1e-4,
    instead of the reference's 2e-4 for both. On 400 proxy digits, equal rates
    let G drift between modes: in our runs the rarest class (by the teacher's
    label) made up 0.2-2.6 % of G's samples, and students distilled from hard
    labels reached 52-64 % accuracy, barely predicting that class. With the
    two-timescale rates the rarest class stayed at 2.9-4.9 % (a fair share is
    10 %) and the same students reached 89-93 %. ``w_info`` weighs the
    information term (reference: 0.5);
    ``generator_width`` is G's first feature-map width (0: by input size, see
    :func:`hetkd.distill.generative.default_width`).
    """

    steps: int = 1500
    batch_size: int = 64
    lr_generator: float = 1e-4
    lr_discriminator: float = 4e-4
    beta1: float = 0.5
    beta2: float = 0.999
    w_info: float = 0.5
    generator_width: int = 0

    def __post_init__(self) -> None:
        _require(self.steps >= 0, "steps", self.steps, ">= 0")
        _require(self.batch_size >= 2, "batch_size", self.batch_size, ">= 2 (BatchNorm)")
        _require(self.lr_generator > 0, "lr_generator", self.lr_generator, "> 0")
        _require(self.lr_discriminator > 0, "lr_discriminator", self.lr_discriminator, "> 0")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", (self.beta1, self.beta2), "in [0, 1)")
        _require(self.w_info >= 0, "w_info", self.w_info, ">= 0")
        _require(self.generator_width >= 0, "generator_width", self.generator_width, ">= 0 (0: by input size)")

    @classmethod
    def from_config(cls, cfg: Any) -> GanSettings:
        """From a :class:`hetkd.config.MEKDConfig`."""
        return cls(
            steps=cfg.gan_steps,
            batch_size=cfg.gan_batch_size,
            lr_generator=cfg.gan_lr_generator,
            lr_discriminator=cfg.gan_lr_discriminator,
            beta1=cfg.gan_beta1,
            beta2=cfg.gan_beta2,
            w_info=cfg.w_info,
            generator_width=cfg.generator_width,
        )


@dataclass(frozen=True)
class DistillSettings:
    """Distillation: ``steps`` SGD updates on ``batch_size`` inputs each.

    SGD with ``lr``, ``momentum``, ``weight_decay``; the learning rate is
    multiplied by ``gamma`` at each fraction of ``steps`` in ``milestones``
    (the reference decays 10x at epochs 80 and 160 of 240). Loss weights,
    temperatures and the distance are those of :func:`mapping_emulation_loss`;
    ``hard_margin`` is the logit gap a hard label stands for
    (:func:`teacher_logits`; 1 as in the reference).
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
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        _require(self.steps >= 1, "steps", self.steps, ">= 1")
        _require(self.batch_size >= 2, "batch_size", self.batch_size, ">= 2 (BatchNorm)")
        _require(self.lr > 0, "lr", self.lr, "> 0")
        _require(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _require(all(0 < m < 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
                 "milestones", self.milestones, "increasing fractions in (0, 1)")
        _require(0 < self.gamma <= 1, "gamma", self.gamma, "in (0, 1]")
        _require(self.temperature > 0, "temperature", self.temperature, "> 0")
        _require(self.generator_temperature > 0, "generator_temperature", self.generator_temperature, "> 0")
        _require(self.w_f >= 0 and self.w_kl >= 0 and self.w_f + self.w_kl > 0, "w_f/w_kl",
                 (self.w_f, self.w_kl), ">= 0 and not both 0")
        _require(self.distance in DISTANCES, "distance", self.distance, f"one of {', '.join(DISTANCES)}")
        _require(self.hard_margin > 0, "hard_margin", self.hard_margin, "> 0")

    @classmethod
    def from_config(cls, cfg: Any) -> DistillSettings:
        """From a :class:`hetkd.config.MEKDConfig`."""
        return cls(
            steps=cfg.distill_steps,
            batch_size=cfg.distill_batch_size,
            lr=cfg.distill_lr,
            momentum=cfg.distill_momentum,
            weight_decay=cfg.distill_weight_decay,
            milestones=tuple(cfg.lr_milestones),
            gamma=cfg.lr_gamma,
            temperature=cfg.temperature,
            generator_temperature=cfg.generator_temperature,
            w_f=cfg.w_f,
            w_kl=cfg.w_kl,
            distance=cfg.distance,
            hard_margin=cfg.hard_margin,
        )


def _settings(cls: type, settings: Any, overrides: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; valid: {', '.join(sorted(names))}")
    base = settings if settings is not None else cls()
    if not isinstance(base, cls):
        raise TypeError(f"settings must be a {cls.__name__}, got {type(base).__name__}")
    return replace(base, **overrides) if overrides else base


# --------------------------------------------------------------------------- steps


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A transient ``rich`` progress bar; yields ``advance()`` (a no-op when disabled)."""
    if not enabled or total <= 0:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients for the parameters (G after deprivatization)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def proxy_inputs(proxy_data: Any) -> torch.Tensor:
    """The unlabelled inputs of a tensor, a ``DataView`` or an ``ArrayDataset`` (labels are dropped)."""
    if isinstance(proxy_data, torch.Tensor):
        x = proxy_data
    elif hasattr(proxy_data, "tensors"):
        x = proxy_data.tensors()[0]
    elif hasattr(proxy_data, "inputs"):
        x = proxy_data.inputs()
    else:
        raise TypeError(f"proxy data must be a tensor, DataView or ArrayDataset, got {type(proxy_data).__name__}")
    if not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"proxy inputs must be a float batch (N, ...), got dtype {x.dtype} shape {tuple(x.shape)}")
    if len(x) < 2:
        raise ValueError(f"proxy data must hold at least 2 inputs, got {len(x)}")
    return x.detach().float()


def query_teacher(
    teacher: Responder, inputs: torch.Tensor, kind: str, num_classes: int | None = None, chunk: int = 1024
) -> torch.Tensor:
    """Ask ``teacher`` about ``inputs`` (in chunks, under ``no_grad``); checked float32 responses."""
    answers = []
    with torch.no_grad():
        for part in inputs.detach().split(chunk):
            answers.append(check_responses(teacher(part), kind, len(part), num_classes))
            num_classes = answers[-1].shape[1]
    return torch.cat(answers)


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


class Deprivatizer:
    """G and D with their optimizers; one GAN update at a time.

    ``discriminator_step(real)`` then ``generator_step(z, teacher, kind)`` is
    one step of :func:`deprivatize`. ``teacher`` is a responder or the
    responses already collected on ``self.generator(z)`` (same weights, same
    batch: G is deterministic given them), so answers can come from devices.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        settings: GanSettings | None = None,
        *,
        seed: int = 0,
        output_range: tuple[float, float] | None = None,
    ) -> None:
        self.settings = settings or GanSettings()
        self.num_classes = int(num_classes)
        with seeded("mekd-deprivatize-init", seed):
            width = self.settings.generator_width or None
            self.generator: Generator = make_generator(input_shape, num_classes, output_range, width)
            self.discriminator: Discriminator = make_discriminator(input_shape)
        betas = (self.settings.beta1, self.settings.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.settings.lr_generator, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.settings.lr_discriminator, betas=betas)
        self.latent_rng = torch.Generator().manual_seed(derive_seed("mekd-deprivatize-latent", seed))

    def sample_latent(self, n: int) -> torch.Tensor:
        """``n`` latent codes ~ N(0, I) from this run's own random stream."""
        return torch.randn(n, self.num_classes, generator=self.latent_rng)

    def discriminator_step(self, real: torch.Tensor) -> float:
        """Update D on a real proxy batch against as many fresh G samples."""
        self.generator.train()
        self.discriminator.train()
        with torch.no_grad():
            fake = self.generator(self.sample_latent(len(real)))
        self.opt_d.zero_grad(set_to_none=True)
        loss = discriminator_loss(self.discriminator(real), self.discriminator(fake))
        loss.backward()
        self.opt_d.step()
        return float(loss.item())

    def generator_step(self, z: torch.Tensor, teacher: Responder | torch.Tensor, kind: str) -> dict[str, float]:
        """Update G on ``G(z)``: adversarial term + ``w_info`` · information term."""
        _check_kind(kind)
        self.generator.train()
        self.discriminator.train()
        fake = self.generator(z)
        if isinstance(teacher, torch.Tensor):
            responses = check_responses(teacher, kind, len(z), self.num_classes)
        else:
            responses = query_teacher(teacher, fake.detach(), kind, self.num_classes)
        adversarial, information = generator_loss(self.discriminator(fake), teacher_confidence(responses, kind))
        loss = adversarial + self.settings.w_info * information
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        return {"g_loss": float(loss.item()), "g_adversarial": float(adversarial.item()),
                "g_information": float(information.item())}


class MappingEmulationDistiller:
    """A student, the frozen G and the SGD schedule; one distillation update at a time.

    ``sample_inputs()`` draws synthetic inputs G(z); ``step(inputs, responses,
    kind)`` updates the student on them with the teacher's (or an ensemble's)
    responses, however those were obtained.
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

    def step(self, inputs: torch.Tensor, responses: torch.Tensor, kind: str) -> float:
        """One SGD update of the student with :func:`mapping_emulation_loss`; returns the loss."""
        targets = teacher_logits(check_responses(responses, kind, len(inputs), self.num_classes), kind,
                                 hard_margin=self.settings.hard_margin)
        s = self.settings
        return self.optimizer.step(
            lambda: mapping_emulation_loss(
                self.student(inputs),
                targets,
                self.generator,
                temperature=s.temperature,
                generator_temperature=s.generator_temperature,
                w_f=s.w_f,
                w_kl=s.w_kl,
                distance=s.distance,
            )
        )


# --------------------------------------------------------------------------- whole runs


def _num_classes(proxy_data: Any, teacher: Responder, inputs: torch.Tensor, kind: str) -> int:
    known = getattr(teacher, "num_classes", None) if isinstance(teacher, BlackBoxTeacher) else None
    if known:
        return int(known)
    if not isinstance(proxy_data, torch.Tensor) and getattr(proxy_data, "num_classes", None):
        return int(proxy_data.num_classes)
    return int(query_teacher(teacher, inputs[:2], kind).shape[1])


def deprivatize(
    teacher: Any,
    proxy_data: Any,
    *,
    response: str | None = None,
    settings: GanSettings | None = None,
    seed: int = 0,
    output_range: tuple[float, float] | None = None,
    num_classes: int | None = None,
    progress: bool = False,
    on_step: StepCallback | None = None,
    **overrides: Any,
) -> Generator:
    """Train G (latent size = classes) on unlabelled proxy inputs and the teacher's answers; return it frozen.

    ``proxy_data``: a tensor, ``DataView`` or ``ArrayDataset`` of public inputs
    (labels, if any, are never read). ``settings`` / keyword ``overrides`` are
    :class:`GanSettings` fields (``steps=``, ``batch_size=``,
    ``lr_generator=``, ``w_info=``...). Deterministic given ``seed``.
    """
    settings = _settings(GanSettings, settings, overrides)
    responder, kind = as_responder(teacher, response)
    inputs = proxy_inputs(proxy_data)
    with seeded("mekd-deprivatize", seed) as rng:
        classes = num_classes or _num_classes(proxy_data, responder, inputs, kind)
        trainer = Deprivatizer(inputs.shape[1:], classes, settings, seed=seed, output_range=output_range)
        batch = min(settings.batch_size, len(inputs))
        order, cursor = torch.randperm(len(inputs), generator=rng), 0
        with progress_bar(settings.steps, "deprivatization (G vs D)", progress) as advance:
            for step in range(settings.steps):
                if cursor + batch > len(order):
                    order, cursor = torch.randperm(len(inputs), generator=rng), 0
                real = inputs[order[cursor : cursor + batch]]
                cursor += batch
                d_loss = trainer.discriminator_step(real)
                metrics = trainer.generator_step(trainer.sample_latent(batch), responder, kind)
                if on_step is not None:
                    on_step(step, {"d_loss": d_loss, **metrics})
                advance()
    return freeze(trainer.generator)


def distill(
    teacher: Any,
    student: nn.Module,
    generator: Generator,
    *,
    response: str | None = None,
    settings: DistillSettings | None = None,
    seed: int = 0,
    progress: bool = False,
    on_step: StepCallback | None = None,
    **overrides: Any,
) -> nn.Module:
    """Distil the black-box ``teacher`` into ``student`` on G's samples; returns ``student`` (trained in place).

    Each step draws ``batch_size`` inputs G(z), asks the teacher, and applies
    :func:`mapping_emulation_loss`. ``settings`` / keyword ``overrides`` are
    :class:`DistillSettings` fields (``steps=``, ``w_f=``, ``distance=``...);
    ``w_f=0`` is the KD-on-generated-inputs ablation. Deterministic given ``seed``.
    """
    settings = _settings(DistillSettings, settings, overrides)
    responder, kind = as_responder(teacher, response)
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    with seeded("mekd-distill", seed):
        distiller = MappingEmulationDistiller(student, generator, settings, seed=seed)
        with progress_bar(settings.steps, "distillation", progress) as advance:
            for step in range(settings.steps):
                inputs = distiller.sample_inputs()
                responses = query_teacher(responder, inputs, kind, distiller.num_classes)
                loss = distiller.step(inputs, responses, kind)
                if on_step is not None:
                    on_step(step, {"loss": loss, "lr": distiller.optimizer.scheduler.get_last_lr()[0]})
                advance()
    student.eval()
    return student

