"""MEKD's deprivatization: a generator trained against a discriminator and a black-box teacher.

Step 1 of MEKD (:mod:`hetkd.distill.emulation`): a generator G with latent
size = number of classes is trained against a discriminator D on
*unlabelled public proxy inputs*, plus an information term built from the
teacher's responses on G(z) (:func:`generator_loss`). G is then frozen; it
emulates the teacher's inverse mapping (logit space -> input space), and the
student is distilled on its samples and through it.

This module holds the GAN side: the losses (:func:`discriminator_loss`,
:func:`generator_loss`), the Adam settings (:class:`GanSettings`) and one
D-then-G update at a time (:class:`Deprivatizer`), which a Flower strategy can
drive with answers collected from devices. The whole black-box run over a
proxy set is :func:`hetkd.distill.blackbox.deprivatize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from hetkd.distill.ensemble import check_kind, check_responses, teacher_confidence
from hetkd.distill.generative import Discriminator, Generator, make_discriminator, make_generator
from hetkd.distill.teacher import Responder, query_teacher
from hetkd.settings import require, require_types
from hetkd.training import derive_seed, seeded

__all__ = ["discriminator_loss", "generator_loss", "GanSettings", "Deprivatizer"]


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``BCE(D(real), 1) + BCE(D(fake), 0)`` on D's "real" logits."""
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: torch.Tensor, confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(adversarial, information)`` terms of G's loss from D's logits on G(z).

    adversarial = ``mean(-log D(G(z)))``, the non-saturating GAN loss;
    information = ``mean(c · -log D(G(z)))`` with ``c`` the teacher's maximum
    response on each G(z) (:func:`~hetkd.distill.ensemble.teacher_confidence`), so samples the teacher
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


@dataclass(frozen=True, kw_only=True)
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

    3000 steps by default: with an ensemble of label-skewed devices as the
    teacher, the MEKD strategy's student reached 77 ± 6 % on digits with 1500
    and 85 ± 4 % with 3000, over 3 seeds (the ``b2kd`` configs set 1500).
    """

    steps: int = 3000
    batch_size: int = 64
    lr_generator: float = 1e-4
    lr_discriminator: float = 4e-4
    beta1: float = 0.5
    beta2: float = 0.999
    w_info: float = 0.5
    generator_width: int = 0

    def __post_init__(self) -> None:
        require_types(self)
        require(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        require(self.batch_size >= 2, "batch_size", f"must be >= 2 (BatchNorm), got {self.batch_size}")
        require(self.lr_generator > 0, "lr_generator", f"must be > 0, got {self.lr_generator}")
        require(self.lr_discriminator > 0, "lr_discriminator", f"must be > 0, got {self.lr_discriminator}")
        require(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        require(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        require(self.w_info >= 0, "w_info", f"must be >= 0, got {self.w_info}")
        require(self.generator_width >= 0, "generator_width",
                f"must be >= 0 (0: by input size), got {self.generator_width}")


class Deprivatizer:
    """G and D with their optimizers; one GAN update at a time.

    ``discriminator_step(real)`` then ``generator_step(z, teacher, kind)`` is
    one step of :func:`~hetkd.distill.blackbox.deprivatize`. ``teacher`` is a responder or the
    responses already collected on ``self.generator(z)`` (same weights, same
    batch: G is deterministic given them), so answers can come from devices.

    G and D live on ``device``; latent codes are drawn on the CPU (from
    :attr:`latent_rng`) and moved there, as are the batches and answers the
    steps are given, so on the CPU the device changes nothing. A responder
    ``teacher`` is asked about inputs on ``device``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        settings: GanSettings | None = None,
        *,
        seed: int = 0,
        output_range: tuple[float, float] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.settings = settings or GanSettings()
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        with seeded("mekd-deprivatize-init", seed):  # built on the CPU: the same weights on any device
            width = self.settings.generator_width or None
            self.generator: Generator = make_generator(input_shape, num_classes, output_range, width).to(self.device)
            self.discriminator: Discriminator = make_discriminator(input_shape).to(self.device)
        betas = (self.settings.beta1, self.settings.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.settings.lr_generator, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.settings.lr_discriminator, betas=betas)
        self.latent_rng = torch.Generator().manual_seed(derive_seed("mekd-deprivatize-latent", seed))

    def sample_latent(self, n: int) -> torch.Tensor:
        """``n`` latent codes ~ N(0, I) from this run's own random stream (drawn on the CPU), on G's device."""
        return torch.randn(n, self.num_classes, generator=self.latent_rng).to(self.device)

    def discriminator_step(self, real: torch.Tensor) -> float:
        """Update D on a real proxy batch against as many fresh G samples."""
        self.generator.train()
        self.discriminator.train()
        with torch.no_grad():
            fake = self.generator(self.sample_latent(len(real)))
        self.opt_d.zero_grad(set_to_none=True)
        loss = discriminator_loss(self.discriminator(real.to(self.device)), self.discriminator(fake))
        loss.backward()
        self.opt_d.step()
        return float(loss.item())

    def generator_step(self, z: torch.Tensor, teacher: Responder | torch.Tensor, kind: str) -> dict[str, float]:
        """Update G on ``G(z)``: adversarial term + ``w_info`` · information term."""
        check_kind(kind)
        self.generator.train()
        self.discriminator.train()
        fake = self.generator(z.to(self.device))
        if isinstance(teacher, torch.Tensor):
            responses = check_responses(teacher, kind, len(z), self.num_classes).to(self.device)
        else:
            responses = query_teacher(teacher, fake.detach(), kind, self.num_classes).to(self.device)
        adversarial, information = generator_loss(self.discriminator(fake), teacher_confidence(responses, kind))
        loss = adversarial + self.settings.w_info * information
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        return {"g_loss": float(loss.item()), "g_adversarial": float(adversarial.item()),
                "g_information": float(information.item())}
