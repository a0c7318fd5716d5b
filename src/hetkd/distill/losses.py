"""Distillation losses, as pure functions of tensors.

All take the student's *logits* and a teacher target given either as logits
(:func:`kd_kl`) or as a probability distribution (:func:`kd_kl_to_probs`, for
black-box teachers that only return probabilities or one-hot labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from hetkd.settings import require, require_types

__all__ = ["kd_kl", "kd_kl_to_probs", "soften", "KDTerm", "KLLoss", "ReferenceKD"]


@dataclass(frozen=True, kw_only=True)
class KDTerm:
    """How a device's distillation term sits beside its private loss.

    ``(1 − rho) · CE(private batch) + rho · KD(public batch)``, with
    ``batch_size`` public inputs drawn beside each private batch (0: the
    private batch size), and each local epoch at least ``min_steps`` steps
    (passing over small private data again). Built by a strategy from its
    settings and sent to the device with every distillation request.
    """

    rho: float
    batch_size: int
    min_steps: int

    def __post_init__(self) -> None:
        require_types(self)
        require(0.0 <= self.rho <= 1.0, "rho", f"must be in [0, 1], got {self.rho}")
        require(self.batch_size >= 0, "batch_size", f"must be >= 0 (0: the private batch size), got {self.batch_size}")
        require(self.min_steps >= 0, "min_steps", f"must be >= 0, got {self.min_steps}")


@dataclass(frozen=True, kw_only=True)
class KLLoss:
    """The KD term towards target logits: ``scale · KL(softmax(t/T) ‖ softmax(s/T))`` with
    ``T = temperature`` (``scale``: ``T²`` after Hinton et al., or 1 as in SD-Dist's code)."""

    temperature: float
    scale: float

    def __post_init__(self) -> None:
        require_types(self)
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(self.scale > 0, "scale", f"must be > 0, got {self.scale}")

    def __call__(self, student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
        return kd_kl(student_logits, target_logits, self.temperature, scale=self.scale)


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-softened probabilities ``softmax(logits / T)``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.softmax(logits / temperature, dim=-1)


def kd_kl_to_probs(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    temperature: float = 1.0,
    scale: float | None = None,
) -> torch.Tensor:
    """``scale · KL(target ‖ softmax(student / T))``, averaged over the batch.

    ``target_probs`` is a distribution per row (already softened by the
    teacher side if it should be). ``scale`` defaults to ``T²``, Hinton et
    al.'s factor that keeps gradient magnitudes comparable across
    temperatures. Zero target entries contribute nothing (``0 · log 0 = 0``).
    """
    if student_logits.shape != target_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and targets {tuple(target_probs.shape)} differ in shape"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = F.kl_div(log_student, target_probs, reduction="batchmean")
    return kl * (temperature**2 if scale is None else scale)


def kd_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Hinton's KD loss ``scale · KL(softmax(t/T) ‖ softmax(s/T))`` (``scale`` = T² by default)."""
    return kd_kl_to_probs(student_logits, soften(teacher_logits, temperature), temperature, scale)


class ReferenceKD:
    """A private batch's loss plus distillation on a public batch drawn beside it.

    ``(1 - rho) · CE(student(x), y) + rho · loss(student(x_ref), t)`` where
    ``x_ref`` are ``batch_size`` public inputs drawn (with replacement, from
    ``generator``) for every private batch and ``t`` their target logits.
    ``loss`` is the KD term: :class:`KLLoss` (FedMD, SD-Dist), or MEKD's
    mapping-emulation loss on generated inputs
    (:meth:`hetkd.distill.emulation.EmulationLoss.bind`). Both batches go
    through the model in one forward pass. Use it as the ``loss_fn`` of
    :func:`hetkd.training.train_epoch`. With ``generated`` (one boolean per
    public input: which are G's samples) the drawn rows' entries are passed
    to ``loss`` as ``generated=``, for MEKD's loss with G's term on G's
    samples only.
    """

    def __init__(
        self,
        reference_inputs: torch.Tensor,
        target_logits: torch.Tensor,
        rho: float,
        batch_size: int,
        loss: Callable[..., torch.Tensor],
        generator: torch.Generator | None = None,
        *,
        generated: torch.Tensor | None = None,
    ) -> None:
        if len(reference_inputs) != len(target_logits):
            raise ValueError(
                f"{len(reference_inputs)} reference inputs but {len(target_logits)} target rows"
            )
        if len(reference_inputs) == 0:
            raise ValueError("the reference set is empty")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        if batch_size < 1:
            raise ValueError(f"reference batch size must be >= 1, got {batch_size}")
        if not torch.isfinite(target_logits).all():
            raise ValueError("target logits contain NaN or infinite values")
        if generated is not None and (generated.dtype != torch.bool or tuple(generated.shape) != (len(reference_inputs),)):
            raise ValueError(f"generated must be one boolean per public input ({len(reference_inputs)}), "
                             f"got {generated.dtype} of shape {tuple(generated.shape)}")
        self.inputs = reference_inputs
        self.targets = target_logits.float()
        self.rho = rho
        self.batch_size = batch_size
        self.loss = loss
        self.generator = generator
        self.generated = generated

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        idx = self._draw()
        ref_x = self.inputs[idx].to(x.device)
        logits = model(torch.cat([x, ref_x]))
        ce = F.cross_entropy(logits[: len(x)], y)
        kd = self._kd(logits[len(x) :], idx, x.device)
        return (1.0 - self.rho) * ce + self.rho * kd

    def public_loss(self, model: torch.nn.Module, device: torch.device | None = None) -> torch.Tensor:
        """``rho · loss`` on a public batch alone: the distillation half of a step, taken on its
        own when the private half must be a separate (differentially private) step. It draws
        the same public rows :meth:`__call__` would have drawn at this point."""
        idx = self._draw()
        ref_x = self.inputs[idx] if device is None else self.inputs[idx].to(device)
        return self.rho * self._kd(model(ref_x), idx, device)

    def _kd(self, logits: torch.Tensor, idx: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        """``loss`` on the drawn rows ``idx`` (with their ``generated`` entries when given)."""
        target = self.targets[idx] if device is None else self.targets[idx].to(device)
        if self.generated is None:
            return self.loss(logits, target)
        generated = self.generated[idx] if device is None else self.generated[idx].to(device)
        return self.loss(logits, target, generated=generated)

    def _draw(self) -> torch.Tensor:
        return torch.randint(len(self.inputs), (self.batch_size,), generator=self.generator)
