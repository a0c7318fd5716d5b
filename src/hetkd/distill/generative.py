"""Generator G and discriminator D for MEKD's deprivatization, for every input kind.

MEKD (Ma et al., CVPR 2024) trains a generator whose latent space is the
teacher's *logit space*: the latent size equals the number of classes, so the
same G that draws synthetic inputs from ``z ~ N(0, I)`` can also map a model's
(temperature-scaled) logits to an input-space point, which is what the
distillation loss compares. The shapes follow the DCGAN layout of the paper's
reference code, scaled to the inputs we meet:

* **images** ``C x H x W`` (H and W multiples of 4: 8x8 digits, 28x28, 32x32):
  a linear map to ``width x H/4 x W/4``, two upsample+conv blocks, a conv to
  ``C`` channels; D is a stack of stride-2 conv blocks (as many as halve the
  smaller side down to one pixel, at most four) and a linear "realness" head,
  without the reference's BatchNorm in D (see :class:`ImageDiscriminator`);
* **signals** ``C x L`` (MNIST-1D's ``1 x 40``): the same design with 1-D
  convolutions and upsampling to exact lengths, so any ``L >= 4`` works;
* **flat vectors** ``D``: fully connected G and D.

The output layer maps to the data's range: a ``tanh`` rescaled to
``output_range``. Images live in ``[-1, 1]`` (the default for images, a plain
``tanh``). MNIST-1D is standardised, not bounded: its values have unit
variance and stay within about ±4 (99.9 % within ±3.6), so signals and flat
vectors default to ``(-4, 4)``; a caller that knows its data (e.g. the range of
the public proxy set) passes that instead. A bounded output keeps G's samples
where the teacher has seen data and keeps the GAN well conditioned.

D returns a *logit* of "real" (no sigmoid): losses use the numerically stable
``binary_cross_entropy_with_logits`` and ``softplus`` forms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "Generator",
    "Discriminator",
    "ImageGenerator",
    "ImageDiscriminator",
    "SignalGenerator",
    "SignalDiscriminator",
    "VectorGenerator",
    "VectorDiscriminator",
    "BoundedOutput",
    "input_kind",
    "default_output_range",
    "default_width",
    "make_generator",
    "make_discriminator",
    "init_dcgan_weights",
]


def input_kind(input_shape: Sequence[int]) -> str:
    """``"image"`` (C x H x W), ``"signal"`` (C x L) or ``"vector"`` (D); raises otherwise."""
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be non-empty with positive sides, got {tuple(input_shape)}")
    kind = {1: "vector", 2: "signal", 3: "image"}.get(len(shape))
    if kind is None:
        raise ValueError(
            f"input_shape {shape} has {len(shape)} axes; generators exist for images (C, H, W), "
            "signals (C, L) and flat vectors (D,)"
        )
    if kind == "image" and (shape[1] % 4 or shape[2] % 4):
        raise ValueError(
            f"image generators need H and W divisible by 4 (e.g. 8, 28, 32), got {shape[1]}x{shape[2]}"
        )
    if kind == "signal" and shape[1] < 4:
        raise ValueError(f"signal generators need length >= 4, got {shape[1]}")
    return kind


def default_output_range(input_shape: Sequence[int]) -> tuple[float, float]:
    """``(-1, 1)`` for images (scaled pixels), ``(-4, 4)`` for standardised signals/vectors."""
    return (-1.0, 1.0) if input_kind(input_shape) == "image" else (-4.0, 4.0)


class BoundedOutput(nn.Module):
    """``low + (high - low) * (tanh(x) + 1) / 2``: a tanh stretched onto ``[low, high]``."""

    def __init__(self, low: float, high: float) -> None:
        super().__init__()
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"output_range must be finite with low < high, got ({low}, {high})")
        self.low = float(low)
        self.high = float(high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * 0.5 * (torch.tanh(x) + 1.0)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """A map from latent codes ``(N, latent_dim)`` to inputs ``(N, *output_shape)``.

    ``latent_dim`` is the number of classes, so logits can be fed in directly.
    """

    latent_dim: int
    output_shape: tuple[int, ...]

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"generator expects latent codes of shape (N, {self.latent_dim}), got {tuple(z.shape)}"
            )


class Discriminator(nn.Module):
    """A map from inputs ``(N, *input_shape)`` to one "real" logit per sample ``(N,)``."""

    input_shape: tuple[int, ...]


class ImageGenerator(Generator):
    """DCGAN generator for ``C x H x W`` images: linear, 2 x (upsample, conv), conv, bounded output."""

    def __init__(
        self,
        output_shape: Sequence[int],
        latent_dim: int,
        width: int = 128,
        output_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        self.output_shape = tuple(int(d) for d in output_shape)
        self.latent_dim = int(latent_dim)
        channels, height, width_px = self.output_shape
        self.init_size = (height // 4, width_px // 4)
        self.width = width
        self.project = nn.Linear(latent_dim, width * self.init_size[0] * self.init_size[1])
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width // 2, channels, 3, padding=1),
            BoundedOutput(*output_range),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_latent(z)
        out = self.project(z).view(z.shape[0], self.width, *self.init_size)
        return self.blocks(out)


def _num_halvings(side: int, most: int = 4) -> int:
    """Stride-2 blocks that take ``side`` down to one pixel (at most ``most``)."""
    return max(1, min(most, math.ceil(math.log2(side)) if side > 1 else 1))


class _StridedConvDiscriminator(Discriminator):
    """Stride-2 conv blocks (LeakyReLU, channel dropout) down to about one pixel, and a linear head."""

    def __init__(self, input_shape: Sequence[int], widths: Sequence[int], conv: type[nn.Module],
                 dropout: type[nn.Module], side: int) -> None:
        super().__init__()
        self.input_shape = tuple(int(d) for d in input_shape)
        layers: list[nn.Module] = []
        c_in = self.input_shape[0]
        for c_out in widths[: _num_halvings(side, len(widths))]:
            layers += [conv(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True), dropout(0.25)]
            c_in = c_out
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features.eval()(torch.zeros(2, *self.input_shape)).shape[1]
        self.features.train()
        self.head = nn.Linear(flat, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


class ImageDiscriminator(_StridedConvDiscriminator):
    """DCGAN discriminator: stride-2 conv blocks (LeakyReLU, channel dropout), linear head.

    Unlike the reference, no BatchNorm: D sees all-real and all-fake batches
    separately, and BatchNorm over such a batch normalises away exactly the
    batch-level statistics that tell them apart. On 8x8 inputs the last map is
    1x1, so D's mean logit was the same for real and fake batches; D stayed at
    ``log 4`` loss and G collapsed to one class. Per-sample layers avoid that.
    """

    def __init__(self, input_shape: Sequence[int], widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__(input_shape, widths, nn.Conv2d, nn.Dropout2d, min(int(d) for d in input_shape[1:]))


class SignalGenerator(Generator):
    """The image generator's design in 1-D: linear, 2 x (upsample to exact length, conv), conv."""

    def __init__(
        self,
        output_shape: Sequence[int],
        latent_dim: int,
        width: int = 128,
        kernel: int = 5,
        output_range: tuple[float, float] = (-4.0, 4.0),
    ) -> None:
        super().__init__()
        self.output_shape = tuple(int(d) for d in output_shape)
        self.latent_dim = int(latent_dim)
        channels, length = self.output_shape
        self.init_length = math.ceil(length / 4)
        self.width = width
        pad = kernel // 2
        self.project = nn.Linear(latent_dim, width * self.init_length)
        self.blocks = nn.Sequential(
            nn.BatchNorm1d(width),
            nn.Upsample(size=math.ceil(length / 2)),
            nn.Conv1d(width, width, kernel, padding=pad),
            nn.BatchNorm1d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(size=length),
            nn.Conv1d(width, width // 2, kernel, padding=pad),
            nn.BatchNorm1d(width // 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv1d(width // 2, channels, kernel, padding=pad),
            BoundedOutput(*output_range),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_latent(z)
        out = self.project(z).view(z.shape[0], self.width, self.init_length)
        return self.blocks(out)


class SignalDiscriminator(_StridedConvDiscriminator):
    """Stride-2 1-D conv blocks (LeakyReLU, channel dropout) and a linear head (no BatchNorm:
    see :class:`ImageDiscriminator`)."""

    def __init__(self, input_shape: Sequence[int], widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__(input_shape, widths, nn.Conv1d, nn.Dropout1d, int(input_shape[1]))


class VectorGenerator(Generator):
    """Fully connected generator for flat vectors: two BN+LeakyReLU hidden layers."""

    def __init__(
        self,
        output_shape: Sequence[int],
        latent_dim: int,
        width: int = 256,
        output_range: tuple[float, float] = (-4.0, 4.0),
    ) -> None:
        super().__init__()
        self.output_shape = tuple(int(d) for d in output_shape)
        self.latent_dim = int(latent_dim)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, width),
            nn.BatchNorm1d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(width, 2 * width),
            nn.BatchNorm1d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(2 * width, self.output_shape[0]),
            BoundedOutput(*output_range),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self._check_latent(z)
        return self.net(z)


class VectorDiscriminator(Discriminator):
    """Fully connected discriminator for flat vectors."""

    def __init__(self, input_shape: Sequence[int], width: int = 256) -> None:
        super().__init__()
        self.input_shape = tuple(int(d) for d in input_shape)
        self.net = nn.Sequential(
            nn.Linear(self.input_shape[0], width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Dropout(0.25),
            nn.Linear(width, width // 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(width // 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def default_width(input_shape: Sequence[int]) -> int:
    """G's first feature-map width: the reference's 128 for images of side >= 16, 32 for
    smaller images (8x8 digits: as good samples at a fraction of the CPU time), 64 for
    signals, 256 hidden units for flat vectors."""
    kind = input_kind(input_shape)
    if kind == "image":
        return 128 if min(input_shape[1:]) >= 16 else 32
    return 64 if kind == "signal" else 256


def make_generator(
    input_shape: Sequence[int],
    num_classes: int,
    output_range: tuple[float, float] | None = None,
    width: int | None = None,
) -> Generator:
    """A DCGAN-style generator with latent size ``num_classes`` for inputs of ``input_shape``.

    ``output_range`` defaults to :func:`default_output_range`; ``width`` (the
    channel count of the first feature map, or hidden units for vectors)
    defaults to :func:`default_width`.
    """
    kind = input_kind(input_shape)
    if num_classes < 2:
        raise ValueError(f"num_classes (the latent size) must be >= 2, got {num_classes}")
    if width is not None and width < 2:
        raise ValueError(f"width must be >= 2, got {width}")
    width = width or default_width(input_shape)
    low, high = output_range if output_range is not None else default_output_range(input_shape)
    if kind == "image":
        g: Generator = ImageGenerator(input_shape, num_classes, width, (low, high))
    elif kind == "signal":
        g = SignalGenerator(input_shape, num_classes, width, output_range=(low, high))
    else:
        g = VectorGenerator(input_shape, num_classes, width, (low, high))
    g.apply(init_dcgan_weights)
    return g


def make_discriminator(input_shape: Sequence[int]) -> Discriminator:
    """The discriminator matching :func:`make_generator` for inputs of ``input_shape``."""
    kind = input_kind(input_shape)
    if kind == "image":
        d: Discriminator = ImageDiscriminator(input_shape)
    elif kind == "signal":
        d = SignalDiscriminator(input_shape)
    else:
        d = VectorDiscriminator(input_shape)
    d.apply(init_dcgan_weights)
    return d
