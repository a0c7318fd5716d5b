"""Distillation math: losses, similarity between devices, ensembles, generative black-box KD.

Each module also holds the settings of what it computes: the logit exchange's
(:class:`~hetkd.distill.exchange.ReferenceDistillSettings`), SD-Dist's
neighbour search (:class:`~hetkd.distill.similarity.NeighbourSearch`), ensemble
distillation's (:class:`~hetkd.distill.ensemble.EnsembleSettings`) and MEKD's
(:class:`~hetkd.distill.emulation.MEKDSettings`). Names below are imported
from their modules on first use (:mod:`hetkd._exports`).
"""

from hetkd._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "hetkd.distill.blackbox": ("active_mixup", "deprivatize", "distill", "kd_on_generated", "kd_on_proxy"),
    "hetkd.distill.codec": ("decode_logits", "encode_logits"),
    "hetkd.distill.deprivatization": ("GanSettings",),
    "hetkd.distill.emulation": ("DistillSettings", "EmulationLoss", "MEKDSettings", "mapping_emulation_loss"),
    "hetkd.distill.ensemble": ("EnsembleSettings",),
    "hetkd.distill.exchange": ("ReferenceDistillSettings", "mix_targets", "uniform_weights"),
    "hetkd.distill.generative": ("make_discriminator", "make_generator"),
    "hetkd.distill.losses": ("KDTerm", "KLLoss", "ReferenceKD", "kd_kl", "kd_kl_to_probs", "soften"),
    "hetkd.distill.similarity": ("NeighbourSearch", "neighbour_weights", "pairwise_distance", "reference_quality",
                                 "select_neighbours"),
    "hetkd.distill.teacher": ("BlackBoxTeacher",),
})
