"""Distillation losses, as pure functions of tensors.

All take the student's *logits* and a teacher target given either as logits
(:func:`kd_kl`) or as a probability distribution (:func:`kd_kl_to_probs`, for
black-box teachers that only return probabilities or one-hot labels).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["kd_kl", "kd_kl_to_probs", "soften"]


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
