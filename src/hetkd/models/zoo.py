"""The model zoo: architectures by name, built for any input shape.

Every architecture is a factory ``(input_shape, num_classes) -> nn.Module``
mapping a batch of inputs (channels first) to logits. Small CNNs/ResNets and
MLPs cover tiny images such as 1x8x8 digits; 1-D CNNs, a 1-D ResNet and a GRU
cover signals such as MNIST-1D (1x40); torchvision's families (ResNet,
MobileNet, ShuffleNet, EfficientNet, SqueezeNet, GoogLeNet) cover 28x28 and
larger images. :data:`MODEL_GROUPS` names sets that the heterogeneous-FL
literature compares on (HtFLlib's ``htfe-img-8``).

A user's own model is a dotted path ``package.module:factory`` to a function
with the same signature ("bring your own model").
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hetkd.settings import SettingsError, did_you_mean

__all__ = [
    "ModelError",
    "ARCHITECTURES",
    "MODEL_GROUPS",
    "available_architectures",
    "check_architecture",
    "build_model",
    "count_parameters",
    "largest_architecture",
    "state_bytes",
]


class ModelError(SettingsError):
    """An architecture name, path or input shape is unusable; the message says which,
    and names the config key when one chose the architecture."""

    kind = "config key"

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key or ""
        self.message = message
        ValueError.__init__(self, f"{self.kind} '{key}': {message}" if key else message)

    def within(self, prefix: str, kind: type[SettingsError] | None = None) -> ModelError:
        return ModelError(self.message, f"{prefix}.{self.key}" if prefix and self.key else (self.key or prefix))


ModelFactory = Callable[[tuple[int, ...], int], nn.Module]


@dataclass(frozen=True)
class Architecture:
    """A registered architecture and the inputs it accepts.

    ``inputs`` is ``"image"`` (C x H x W), ``"signal"`` (C x L) or ``"any"``;
    ``min_size`` is the smallest spatial side an image architecture supports.
    ``dp_compatible``: DP-SGD trains it as it is (no BatchNorm, no fused RNN;
    :func:`hetkd.privacy.unsupported_layers`); the others need ``privacy.fix_layers``.
    """

    factory: ModelFactory
    inputs: str
    min_size: int = 1
    description: str = ""
    dp_compatible: bool = True


# --------------------------------------------------------------------------- building blocks


def _flat_dim(module: nn.Module, input_shape: Sequence[int]) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, *input_shape)).flatten(1).shape[1])


class MLP(nn.Module):
    """Flatten, then fully connected layers with ReLU."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int]) -> None:
        super().__init__()
        dims = [int(torch.tensor(input_shape).prod()), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv blocks (conv-ReLU, max-pool between stages), global average pool, linear."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, stages: Sequence[Sequence[int]]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = input_shape[0]
        size = min(input_shape[1:])
        for s, widths in enumerate(stages):
            for w in widths:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
                c = w
            if s < len(stages) - 1 and size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN4(nn.Module):
    """HtFLlib's "4-layer CNN" (FedAvgCNN): two 5x5 conv+pool layers, FC-512, FC.

    Identical to the published model for 28x28 and 32x32 inputs; smaller inputs
    get padded convolutions so the same design works on 8x8 digits.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        pad = 0 if min(input_shape[1:]) >= 20 else 2
        self.features = nn.Sequential(
            nn.Conv2d(input_shape[0], 32, 5, padding=pad),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=pad),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_dim(self.features, input_shape), 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) for 2-D or 1-D inputs."""

    def __init__(self, c_in: int, c_out: int, stride: int, dims: int = 2, norm: str = "bn") -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d

        def make_norm(c: int) -> nn.Module:
            if dims == 2:
                return _norm2d(norm, c)
            return nn.BatchNorm1d(c) if norm == "bn" else nn.GroupNorm(min(8, c), c)

        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(c_out)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = make_norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False), make_norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-style ResNet-(6n+2) of He et al.: three stages of ``n`` basic
    blocks with 16/32/64 channels (``width`` scales them), for 2-D or 1-D inputs.
    ResNet-8, -20 and -32 are n = 1, 3, 5 (MEKD's teacher/student pair is 32 -> 8)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        blocks_per_stage: int,
        width: int = 16,
        norm: str = "bn",
    ) -> None:
        super().__init__()
        dims = len(input_shape) - 1
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool1d(1)
        norm_layer = (
            _norm2d(norm, width)
            if dims == 2
            else (nn.BatchNorm1d(width) if norm == "bn" else nn.GroupNorm(min(8, width), width))
        )
        layers: list[nn.Module] = [conv(input_shape[0], width, 3, padding=1, bias=False), norm_layer, nn.ReLU(inplace=True)]
        c = width
        for stage in range(3):
            c_out = width * 2**stage
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(c, c_out, stride, dims, norm))
                c = c_out
        layers += [pool, nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SeparableCNN(nn.Module):
    """A tiny MobileNet: depthwise-separable conv blocks with BatchNorm."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        c = input_shape[0]
        layers: list[nn.Module] = [nn.Conv2d(c, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        c = widths[0]
        size = min(input_shape[1:])
        for w in widths[1:]:
            stride = 2 if size >= 4 else 1
            size = (size + 1) // stride
            layers += [
                nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, w, 1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN1D(nn.Module):
    """1-D conv blocks (conv-BN-ReLU, max-pool between stages), global pool, linear."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int], kernel: int = 5) -> None:
        super().__init__()
        c = input_shape[0]
        length = input_shape[1]
        layers: list[nn.Module] = []
        for i, w in enumerate(widths):
            layers += [nn.Conv1d(c, w, kernel, padding=kernel // 2), nn.BatchNorm1d(w), nn.ReLU(inplace=True)]
            c = w
            if i < len(widths) - 1 and length >= 4:
                layers.append(nn.MaxPool1d(2))
                length //= 2
        layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class GRUClassifier(nn.Module):
    """A GRU reading the signal along its length (channels are features per step)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 64, layers: int = 1) -> None:
        super().__init__()
        self.gru = nn.GRU(input_shape[0], hidden, num_layers=layers, batch_first=True)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.transpose(1, 2))  # N x C x L -> N x L x C
        return self.classifier(out[:, -1])


class ChannelAdapter(nn.Module):
    """Feeds C-channel images to a network built for 3 channels (repeats a grey channel)."""

    def __init__(self, net: nn.Module, in_channels: int) -> None:
        super().__init__()
        self.net = net
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)


def _torchvision(name: str, **kwargs: object) -> ModelFactory:
    def factory(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        import torchvision.models as tvm

        if input_shape[0] not in (1, 3):
            raise ModelError(f"architecture '{name}' takes 1- or 3-channel images, got {input_shape[0]} channels")
        net = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        return ChannelAdapter(net, input_shape[0])

    return factory


# --------------------------------------------------------------------------- registry


ARCHITECTURES: dict[str, Architecture] = {
    # any input: flattened
    "linear": Architecture(lambda s, c: MLP(s, c, []), "any", description="linear (softmax regression)"),
    "mlp_s": Architecture(lambda s, c: MLP(s, c, [64]), "any", description="MLP 64"),
    "mlp_m": Architecture(lambda s, c: MLP(s, c, [128, 64]), "any", description="MLP 128-64"),
    "mlp_l": Architecture(lambda s, c: MLP(s, c, [256, 128, 64]), "any", description="MLP 256-128-64"),
    # the MLPs of HtFLlib's MNIST families: FedAvg's one hidden layer of 200 (FedAvgMLP), and a wider one
    "mlp_200": Architecture(lambda s, c: MLP(s, c, [200]), "any", description="MLP 200 (HtFLlib's FedAvgMLP)"),
    "mlp_512": Architecture(lambda s, c: MLP(s, c, [512]), "any", description="MLP 512"),
    # small images (8x8 and up)
    "cnn_s": Architecture(lambda s, c: SmallCNN(s, c, [[16], [32]]), "image", 4, "2 conv layers, 16/32"),
    "cnn_m": Architecture(lambda s, c: SmallCNN(s, c, [[32, 32], [64, 64]]), "image", 4, "4 conv layers, 32/64"),
    "cnn_l": Architecture(lambda s, c: SmallCNN(s, c, [[32, 32], [64, 64], [128]]), "image", 4, "5 conv layers, 32-128"),
    "cnn4": Architecture(CNN4, "image", 8, "HtFLlib's 4-layer CNN (FedAvgCNN)"),
    "resnet8": Architecture(lambda s, c: CifarResNet(s, c, 1), "image", 4, "CIFAR ResNet-8", dp_compatible=False),
    "resnet8_gn": Architecture(lambda s, c: CifarResNet(s, c, 1, norm="gn"), "image", 4, "ResNet-8, GroupNorm"),
    "resnet20": Architecture(lambda s, c: CifarResNet(s, c, 3), "image", 4, "CIFAR ResNet-20", dp_compatible=False),
    "resnet32": Architecture(lambda s, c: CifarResNet(s, c, 5), "image", 4, "CIFAR ResNet-32", dp_compatible=False),
    "mobilenet_s": Architecture(SeparableCNN, "image", 4, "tiny depthwise-separable CNN", dp_compatible=False),
    # 1-D signals
    "cnn1d_s": Architecture(lambda s, c: CNN1D(s, c, [16, 32]), "signal", description="1-D CNN 16/32", dp_compatible=False),
    "cnn1d_m": Architecture(lambda s, c: CNN1D(s, c, [32, 64, 64]), "signal", description="1-D CNN 32/64/64", dp_compatible=False),
    "resnet1d": Architecture(lambda s, c: CifarResNet(s, c, 1), "signal", description="1-D ResNet-8", dp_compatible=False),
    "resnet1d_20": Architecture(lambda s, c: CifarResNet(s, c, 3), "signal", description="1-D ResNet-20", dp_compatible=False),
    "gru": Architecture(lambda s, c: GRUClassifier(s, c), "signal", description="GRU, 64 hidden", dp_compatible=False),
    # torchvision families, for 28x28 and larger images
    **{
        name: Architecture(_torchvision(kw.pop("family", name), **kw), "image", 28, f"torchvision {name}",
                           dp_compatible=name == "squeezenet1_1")  # the others hold BatchNorm
        for name, kw in {
            "resnet18": {},
            "resnet34": {},
            "resnet50": {},
            "resnet101": {},
            "resnet152": {},
            "mobilenet_v2": {},
            "mobilenet_v2_035": {"family": "mobilenet_v2", "width_mult": 0.35},  # trains 2x faster on CPU
            "mobilenet_v3_small": {},
            "shufflenet_v2_x0_5": {},
            "shufflenet_v2_x1_0": {},
            "efficientnet_b0": {},
            "squeezenet1_1": {},
            "googlenet": {"aux_logits": False, "init_weights": True},
        }.items()
    },
}

#: Named architecture lists for ``models.architectures``.
MODEL_GROUPS: dict[str, list[str]] = {
    # HtFLlib's HtFE-img-8, assigned models[i % 8]
    "htfe-img-8": ["cnn4", "googlenet", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
    "digits-5": ["cnn_s", "cnn_m", "resnet8", "mlp_s", "mlp_m"],
    # 28x28 images on a CPU: HtFLlib's CNN, small MobileNetV2 / ShuffleNetV2, ResNet-8, an MLP
    "mnist-5": ["cnn4", "mobilenet_v2_035", "shufflenet_v2_x0_5", "resnet8", "mlp_m"],
    # HtFLlib's kind of MNIST family: its 2-conv CNN (FedAvgCNN) and two one-hidden-layer MLPs
    "htfl-mnist-3": ["cnn4", "mlp_200", "mlp_512"],
    "mnist1d-5": ["cnn1d_s", "cnn1d_m", "resnet1d", "gru", "mlp_m"],
}


def available_architectures(input_kind: str | None = None) -> list[str]:
    """Registered names, optionally only those for ``"image"`` or ``"signal"`` inputs."""
    return sorted(
        name
        for name, arch in ARCHITECTURES.items()
        if input_kind is None or arch.inputs in ("any", input_kind)
    )


def _load_factory(path: str, key: str | None = None) -> ModelFactory:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"cannot import module '{module_name}' of '{path}' ({err})", key) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"'{path}' does not name a callable factory(input_shape, num_classes)", key)
    return factory


def check_architecture(name: str, key: str | None = None) -> None:
    """Raise :class:`ModelError` naming ``key`` unless ``name`` is usable."""
    if ":" in name:
        _load_factory(name, key)
        return
    if name not in ARCHITECTURES and name not in MODEL_GROUPS:
        raise ModelError(
            f"unknown architecture {name!r}{did_you_mean(name, list(ARCHITECTURES))}; valid choices: "
            f"{', '.join(sorted(ARCHITECTURES))}; groups: {', '.join(sorted(MODEL_GROUPS))}; "
            "or a dotted path 'package.module:factory'",
            key,
        )


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build architecture ``name`` for inputs of ``input_shape`` (without the batch axis)."""
    input_shape = tuple(int(d) for d in input_shape)
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    if ":" in name:
        model = _load_factory(name)(input_shape, num_classes)
        if not isinstance(model, nn.Module):
            raise ModelError(f"factory '{name}' returned {type(model).__name__}, not a torch.nn.Module")
        return model
    check_architecture(name)
    arch = ARCHITECTURES[name]
    kind = {2: "signal", 3: "image"}.get(len(input_shape), "other")
    if arch.inputs != "any" and arch.inputs != kind:
        raise ModelError(
            f"architecture '{name}' takes {arch.inputs} inputs, but the data has shape {input_shape}; "
            f"architectures for {kind} inputs: {', '.join(available_architectures(kind))}"
        )
    if kind == "image" and min(input_shape[1:]) < arch.min_size:
        raise ModelError(
            f"architecture '{name}' needs images of at least {arch.min_size}x{arch.min_size}, "
            f"got {input_shape[1]}x{input_shape[2]}"
        )
    return arch.factory(input_shape, num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (the trainable state a FedAvg round would send)."""
    return sum(p.numel() for p in model.parameters())


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (parameters and buffers): what one FedAvg transfer carries."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def largest_architecture(input_shape: Sequence[int], num_classes: int) -> tuple[str, int]:
    """``(name, state bytes)`` of the registered architecture with the largest state that
    accepts inputs of ``input_shape``: what one weight-averaging transfer would cost at
    most with this zoo. Builds each candidate once per shape (seconds for the torchvision
    families); the answer is cached."""
    return _largest_architecture(tuple(int(d) for d in input_shape), int(num_classes))


@functools.lru_cache(maxsize=16)
def _largest_architecture(shape: tuple[int, ...], num_classes: int) -> tuple[str, int]:
    best: tuple[str, int] | None = None
    for name in available_architectures():
        try:
            size = state_bytes(build_model(name, shape, num_classes))
        except ModelError:
            continue  # does not take this input shape
        if best is None or size > best[1]:
            best = (name, size)
    if best is None:
        raise ModelError(f"no registered architecture accepts inputs of shape {shape}")
    return best
