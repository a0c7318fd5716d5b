"""Distillation math: losses, similarity between devices, generative black-box KD."""

from hetkd.distill.losses import kd_kl, kd_kl_to_probs, soften

__all__ = ["kd_kl", "kd_kl_to_probs", "soften"]
