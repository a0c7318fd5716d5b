"""Distillation math: losses, similarity between devices, generative black-box KD."""

from hetkd.distill.codec import decode_logits, encode_logits
from hetkd.distill.losses import ReferenceKD, kd_kl, kd_kl_to_probs, soften
from hetkd.distill.similarity import (
    mix_targets,
    neighbour_weights,
    pairwise_distance,
    reference_quality,
    select_neighbours,
    uniform_weights,
)

__all__ = [
    "ReferenceKD",
    "decode_logits",
    "encode_logits",
    "kd_kl",
    "kd_kl_to_probs",
    "mix_targets",
    "neighbour_weights",
    "pairwise_distance",
    "reference_quality",
    "select_neighbours",
    "soften",
    "uniform_weights",
]
