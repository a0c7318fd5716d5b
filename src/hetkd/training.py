"""Local optimisation, evaluation and prediction loops shared by devices and servers.

Pure PyTorch: a model, an optimizer and batches in; numbers out. The loops take
any iterable of ``(inputs, labels)`` batches, so a user's own ``DataLoader``
works as well as our :class:`~hetkd.data.DataView`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from hetkd.settings import require, require_choice, require_types

__all__ = [
    "TrainingConfig",
    "TrainingUpdate",
    "OPTIMIZERS",
    "derive_seed",
    "seeded",
    "torch_threads",
    "make_optimizer",
    "DEVICE_CHOICES",
    "require_device_name",
    "resolve_device",
    "module_device",
    "to_cpu",
    "train_epoch",
    "evaluate_accuracy",
    "predict_logits",
]

Batch = tuple[torch.Tensor, torch.Tensor]

OPTIMIZERS = ("sgd", "adam")
#: where a model may compute (``cuda:N``: the N-th GPU; ``auto``: CUDA when there is one)
DEVICE_CHOICES = ("cpu", "auto", "cuda", "cuda:N")


def require_device_name(name: str, key: str) -> None:
    """Raise :class:`~hetkd.settings.SettingsError` for ``key`` unless ``name`` is one of
    :data:`DEVICE_CHOICES` (checked when the settings are read, before any GPU is looked for)."""
    require(re.fullmatch(r"cpu|auto|cuda(:\d+)?", name) is not None, key,
            f"unknown value {name!r}; valid choices: {', '.join(DEVICE_CHOICES)}")


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Each device's local optimisation.

    ``local_epochs`` passes over the private data per round, in batches of
    ``batch_size``, with ``optimizer`` (``sgd`` with ``momentum``, or
    ``adam``) at learning rate ``lr`` and ``weight_decay``. ``max_steps`` > 0
    caps the optimisation steps of one round (private batches over all
    ``local_epochs``): with large partitions a round then trains on a seeded
    random part of the data, so devices with 100x more samples do not set the
    round's pace (0 = no cap, whole epochs). A device computes on
    ``num_threads`` threads, on ``device`` (``cpu``, ``cuda``/``cuda:N``, or
    ``auto``: CUDA when there is one). ``clip_grad_norm`` > 0 scales each
    step's gradient down to that norm when it is larger (0 = no clipping), so
    one extreme batch cannot throw a model to infinity: on real MNIST at lr
    0.05 MobileNetV2 devices otherwise diverged to NaN and sat out the rest of
    the run (``docs/results/mnist_htfllib.md``). DP-SGD clips per example
    instead (``privacy.max_grad_norm``): a run config with both is rejected.
    """

    local_epochs: int = 5
    max_steps: int = 0
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad_norm: float = 0.0
    num_threads: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        require_types(self)
        require(self.clip_grad_norm >= 0, "clip_grad_norm", f"must be >= 0 (0 = no clipping), got {self.clip_grad_norm}")
        require(self.local_epochs >= 0, "local_epochs", f"must be >= 0, got {self.local_epochs}")
        require(self.max_steps >= 0, "max_steps", f"must be >= 0 (0 = no cap), got {self.max_steps}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require_choice(self.optimizer, "optimizer", OPTIMIZERS)
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.num_threads >= 1, "num_threads", f"must be >= 1, got {self.num_threads}")
        require_device_name(self.device, "device")


@dataclass(frozen=True, kw_only=True)
class TrainingUpdate:
    """Training settings a run sets for its devices, over what each device was built with.

    A Flower ServerApp passes ``train_config=ConfigRecord({"lr": lr})`` and a
    Flower App's run config holds ``local-epochs``; :meth:`from_flower` reads
    those names (Flower's templates use ``lr``, ``local-epochs`` and
    ``batch-size``; underscores work too). ``None`` keeps the device's value.
    """

    lr: float | None = None
    local_epochs: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        require_types(self)
        require(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.local_epochs is None or self.local_epochs >= 0, "local_epochs",
                f"must be >= 0, got {self.local_epochs}")
        require(self.batch_size is None or self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")

    @classmethod
    def from_flower(cls, config: Mapping[str, Any]) -> tuple[TrainingUpdate | None, list[str]]:
        """The update a Flower config's training keys ask for (``None``: none), and the keys it does not know."""
        found, unknown = {}, []
        for key, value in config.items():
            name = str(key).replace("-", "_")
            if name in ("lr", "local_epochs", "batch_size"):
                found[name] = float(value) if name == "lr" and isinstance(value, int) else value
            else:
                unknown.append(str(key))
        return (cls(**found) if found else None), unknown

    def apply(self, training: TrainingConfig) -> TrainingConfig:
        """``training`` with the fields this update sets replaced."""
        changes = {k: v for k, v in (("lr", self.lr), ("local_epochs", self.local_epochs),
                                     ("batch_size", self.batch_size)) if v is not None}
        return replace(training, **changes) if changes else training


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts (run seed, device id, round, purpose).

    Seeds derived this way do not depend on which process or in which order
    devices run, so a simulation is reproducible however Ray schedules it.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class seeded:
    """Context manager: seed torch's global RNG from ``parts``; restore it after."""

    def __init__(self, *parts: object) -> None:
        self.seed = derive_seed(*parts)
        self._state: torch.Tensor | None = None

    def __enter__(self) -> torch.Generator:
        self._state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        return torch.Generator().manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        assert self._state is not None
        torch.random.set_rng_state(self._state)


class torch_threads:
    """Context manager: run with ``n`` intra-op threads; restore the previous count after.

    The thread count is process-wide and changes the order of floating-point
    reductions, so code that sets it for itself (central training) must not
    leave it set for whatever the process runs next (a strategy's server side
    in the same ``hetkd compare``).
    """

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of threads must be an integer >= 1, got {n!r}")
        self.n = n
        self._previous: int | None = None

    def __enter__(self) -> int:
        self._previous = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self.n

    def __exit__(self, *exc: object) -> None:
        assert self._previous is not None
        torch.set_num_threads(self._previous)


def resolve_device(name: str, key: str = "training.device") -> torch.device:
    """``cpu``, ``cuda``/``cuda:N``, or ``auto`` (CUDA when available); a ``RuntimeError`` naming the
    config ``key`` when the CUDA device asked for is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{key}={name!r} but CUDA is not available here; use 'cpu' or 'auto'")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"{key}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU for a module that holds neither."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_cpu(state: Any) -> Any:
    """``state`` (a ``state_dict`` of a module or optimizer: nested dicts, lists, tuples) with every
    tensor on the CPU, for what leaves a GPU-side server (messages, checkpoints, artifacts).
    A CPU tensor is not copied; dicts keep their type and attributes (a module's ``_metadata``)."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        moved = copy.copy(state)
        for key, value in state.items():
            moved[key] = to_cpu(value)
        return moved
    if isinstance(state, list):
        return [to_cpu(value) for value in state]
    if type(state) is tuple:
        return tuple(to_cpu(value) for value in state)
    return state


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``training.optimizer`` with its settings."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown training.optimizer {cfg.optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain supervised loss on one private batch."""
    return nn.functional.cross_entropy(model(x), y)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    loss_fn: LossFn = cross_entropy_step,
    device: torch.device | None = None,
    clip_grad_norm: float = 0.0,
) -> tuple[float, int]:
    """One pass over ``batches``; returns (mean loss per sample, samples seen).

    ``loss_fn(model, x, y)`` gives the batch loss, so distillation strategies
    add their terms without rewriting the loop. A non-finite loss stops the
    epoch with an error instead of silently corrupting the weights. With
    ``clip_grad_norm`` > 0 each step's gradient is scaled down to at most that
    norm (:func:`torch.nn.utils.clip_grad_norm_`).
    """
    if clip_grad_norm < 0:
        raise ValueError(f"clip_grad_norm must be >= 0 (0 = no clipping), got {clip_grad_norm}")
    model.train()
    total, seen = 0.0, 0
    for x, y in batches:
        if device is not None:
            x, y = x.to(device), y.to(device)
        if len(y) < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            continue  # BatchNorm cannot train on a single sample
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} after {seen} samples")
        loss.backward()
        if clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        total += loss.item() * len(y)
        seen += len(y)
    return (total / seen if seen else math.nan), seen


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, batches: Iterable[Batch], device: torch.device | None = None
) -> tuple[float, float, int]:
    """(accuracy, mean cross-entropy, number of samples) of ``model`` on ``batches``."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in batches:
        if device is not None:
            x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum().item())
        n += len(y)
    if n == 0:
        return math.nan, math.nan, 0
    return correct / n, loss / n, n


@torch.no_grad()
def predict_logits(
    model: nn.Module, inputs: torch.Tensor | Iterator[torch.Tensor], batch_size: int = 256,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) on ``inputs``, on the CPU."""
    model.eval()
    chunks = inputs.split(batch_size) if isinstance(inputs, torch.Tensor) else inputs
    outs = []
    for x in chunks:
        if device is not None:
            x = x.to(device)
        outs.append(model(x).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)
