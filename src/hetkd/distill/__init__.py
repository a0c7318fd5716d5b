"""Distillation math: losses, similarity between devices, generative black-box KD."""

from hetkd.distill.blackbox import active_mixup, deprivatize, distill, kd_on_generated, kd_on_proxy
from hetkd.distill.codec import decode_logits, encode_logits
from hetkd.distill.emulation import mapping_emulation_loss
from hetkd.distill.generative import make_discriminator, make_generator
from hetkd.distill.losses import ReferenceKD, kd_kl, kd_kl_to_probs, soften
from hetkd.distill.similarity import (
    mix_targets,
    neighbour_weights,
    pairwise_distance,
    reference_quality,
    select_neighbours,
    uniform_weights,
)
from hetkd.distill.teacher import BlackBoxTeacher

__all__ = [
    "BlackBoxTeacher",
    "ReferenceKD",
    "active_mixup",
    "decode_logits",
    "deprivatize",
    "distill",
    "encode_logits",
    "kd_kl",
    "kd_kl_to_probs",
    "kd_on_generated",
    "kd_on_proxy",
    "make_discriminator",
    "make_generator",
    "mapping_emulation_loss",
    "mix_targets",
    "neighbour_weights",
    "pairwise_distance",
    "reference_quality",
    "select_neighbours",
    "soften",
    "uniform_weights",
]
