"""Differentially private devices: DP-SGD on every step that reads private data, accounted per device.

Sharing predictions instead of weights keeps the weights home, not the
information: predictions on public inputs still say something about the
examples a model trained on. With ``privacy.enabled`` every device trains with
DP-SGD (Abadi et al., CCS 2016) through Opacus: each optimisation step of its
model (and of its private answer model, when it keeps one) that reads a batch
of private examples clips every example's gradient to ``max_grad_norm`` and
adds Gaussian noise of standard deviation ``noise_multiplier · max_grad_norm``
to their sum. Everything the device sends afterwards — reference predictions,
answers to queries — is computed by those models alone, so it is
post-processing of a DP mechanism and carries the same guarantee.

Which steps are accounted, and why:

* **private steps** — every step on a private batch, whether the device trains
  alone or distils (FedMD, SD-Dist, FedDF and MEKD put a public batch beside
  every private one): the private cross-entropy is a DP step, each example's
  gradient clipped, the noise added, the accountant counting it; its weight
  ``1 − rho`` scales the noised gradient (post-processing). Private batches are drawn by **Poisson sampling** (each example
  independently with probability ``q = batch_size / num_train``), the sampling
  the accountant's analysis assumes; a step whose draw is empty still adds its
  noise and still counts.
* **public steps** — the distillation term of those strategies is taken as a
  separate plain step on the public batch alone, right after the private step
  (:meth:`hetkd.distill.losses.ReferenceKD.public_loss`): it reads public
  inputs, the server's targets and the current (DP) weights only, so it is
  post-processing, neither noised nor counted. A strategy's ``min_steps`` (at
  least that many distillation steps per epoch, for devices with little data)
  adds public steps only.
* **public computation** — predicting on the reference set or on query inputs,
  evaluation on the global test set: a function of the DP models and public
  data, so it costs nothing further.

How to spend the budget well: a device whose strategy answers with a
**private model** (``strategy.kd.answer_model=private`` for FedMD/SD-Dist,
FedDF's and MEKD's default) and distils with ``rho = 1`` keeps its private data
to that one model: the private model takes the DP steps and its predictions
are what the device sends, while the device's own model takes public steps
only, towards the others' (and through them its own) predictions — it never
reads private data, is never noised, and costs nothing. The noise is then
planned for one model instead of two, and the own model's knowledge, learnt
in plain steps, is not erased by the noise of later private steps. Give that
private model a small architecture of its own (``models.private_architecture=
linear``; ``make_client_app(private_model_fn=...)``): DP-SGD adds noise to every
parameter it updates while the clipped signal stays the same size, so a linear
model learns far more for the same ε than a CNN on a device's few examples
(Tramèr & Boneh, "Differentially Private Learning Needs Better Features",
ICLR 2021), and the own models, of any architecture, learn it from its answers
(measured in ``docs/results/privacy.md``).

Not covered: the device's size (``num_examples``, sent as Flower does) and
its evaluation replies (accuracy on its own held-out split), which are
measurements of the experiment; a deployment that must not reveal them turns
evaluation off (``fraction_evaluate=0``). A DP device reports no training loss
(it is a statistic of the private data).

The accountant (Opacus' RDP accountant by default; ``prv`` also available)
gives each device's ε at ``delta`` after every round; it is kept with the
device's state, so a resumed or redeployed device goes on counting. With
``target_epsilon`` the noise multiplier is calibrated so that the device's
planned steps (:func:`planned_steps`, an upper bound) end at that ε; the budget
(``max_epsilon``, else ``target_epsilon``) is enforced: a device whose next
round would take it over the budget stops training, keeps answering with the
model it has, and says so in its reply (``privacy_exhausted``).

Models: Opacus needs per-example gradients, which BatchNorm (it mixes the
examples of a batch) and PyTorch's fused RNN layers do not give.
:func:`unsupported_layers` names the offending layers; a device refuses such a
model at set-up, naming its architecture and layers, unless ``fix_layers``
replaces them (BatchNorm by GroupNorm, GRU/LSTM by Opacus' DP versions).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hetkd.settings import require, require_choice, require_types

__all__ = [
    "ACCOUNTANTS",
    "PrivacySettings",
    "PrivacyError",
    "DeviceAccountant",
    "require_opacus",
    "unsupported_layers",
    "private_model",
    "planned_steps",
    "poisson_steps",
    "dp_training",
    "dp_step",
    "public_step",
]

#: the privacy accountants a device may use (Opacus' names)
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")


class PrivacyError(ValueError):
    """A model or setting that differentially private training cannot use."""


@dataclass(frozen=True, kw_only=True)
class PrivacySettings:
    """Differential privacy on the devices: the run config's ``privacy`` group.

    ``enabled`` turns DP-SGD on for every device (see :mod:`hetkd.privacy`).
    Each private example's gradient is clipped to ``max_grad_norm``; the noise
    multiplier σ is ``noise_multiplier``, or, with ``target_epsilon`` > 0, the
    smallest σ whose planned steps end at ``target_epsilon``. ε is reported at
    ``delta`` by the ``accountant``. The budget is ``max_epsilon`` (0:
    ``target_epsilon``; both 0: none): a device whose next round would exceed
    it stops training. ``fix_layers`` replaces layers DP-SGD cannot train
    (BatchNorm → GroupNorm, RNNs → Opacus' DP RNNs); off, such a model is
    refused.
    """

    enabled: bool = False
    target_epsilon: float = 0.0
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    max_epsilon: float = 0.0
    accountant: str = "rdp"
    fix_layers: bool = False

    def __post_init__(self) -> None:
        require_types(self)
        require(self.target_epsilon >= 0, "target_epsilon", f"must be >= 0 (0: use noise_multiplier), "
                f"got {self.target_epsilon}")
        require(self.noise_multiplier > 0, "noise_multiplier", f"must be > 0, got {self.noise_multiplier}")
        require(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        require(0.0 < self.delta < 1.0, "delta", f"must be in (0, 1), got {self.delta}")
        require(self.max_epsilon >= 0, "max_epsilon", f"must be >= 0 (0: target_epsilon), got {self.max_epsilon}")
        require_choice(self.accountant, "accountant", ACCOUNTANTS)

    def budget(self) -> float:
        """The ε a device may not exceed (``inf``: no budget)."""
        return self.max_epsilon or self.target_epsilon or math.inf


# --------------------------------------------------------------------------- models


def require_opacus() -> None:
    """Raise a :class:`PrivacyError` saying how to install Opacus when it is missing."""
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise PrivacyError("privacy.enabled needs Opacus, which is not installed: pip install 'hetkd[dp]' "
                           "(or pip install opacus)") from None


def unsupported_layers(model: nn.Module) -> list[str]:
    """The layers of ``model`` DP-SGD cannot train, as ``"name (Type)"`` (empty: compatible)."""
    require_opacus()
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    found = []
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None and validator(module):
            found.append(f"{name or '<model>'} ({type(module).__name__})")
    return found


def private_model(model: nn.Module, architecture: str, settings: PrivacySettings) -> nn.Module:
    """``model`` ready for DP-SGD: itself when compatible, its layers replaced with
    ``fix_layers``, refused otherwise (a :class:`PrivacyError` naming ``architecture``
    and the layers). In-place activations (``ReLU(inplace=True)``) are switched to
    out-of-place in ``model`` itself: the same function, which per-example gradient
    hooks can follow."""
    for module in model.modules():  # per-example gradient hooks cannot see through in-place activations
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # type: ignore[assignment]
    layers = unsupported_layers(model)
    if not layers:
        return model
    if not settings.fix_layers:
        shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
        raise PrivacyError(
            f"architecture '{architecture}' cannot train with differential privacy: layer(s) {shown} mix the "
            "examples of a batch or lack per-example gradients; set privacy.fix_layers=true to replace them "
            "(BatchNorm -> GroupNorm, GRU/LSTM -> DP versions) or choose a compatible architecture")
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(model)
    left = unsupported_layers(fixed)
    if left:
        raise PrivacyError(f"architecture '{architecture}': privacy.fix_layers could not replace {', '.join(left)}")
    return fixed


# --------------------------------------------------------------------------- steps


def poisson_steps(num_train: int, batch_size: int, min_steps: int = 0) -> int:
    """Steps of one DP epoch: ``ceil(num_train / batch_size)`` Poisson draws (at least ``min_steps``)."""
    if num_train < 1 or batch_size < 1:
        raise ValueError(f"need num_train >= 1 and batch_size >= 1, got {num_train} and {batch_size}")
    return max(math.ceil(num_train / batch_size), min_steps)


def planned_steps(*, num_train: int, batch_size: int, local_epochs: int, rounds: int, max_steps: int = 0,
                  models: int = 1) -> int:
    """An upper bound on a device's DP steps over ``rounds``: ``models`` models trained
    each round for ``local_epochs`` epochs of :func:`poisson_steps` (at most ``max_steps``
    per model and round when > 0)."""
    if rounds < 1 or models < 1:
        raise ValueError(f"need rounds >= 1 and models >= 1, got {rounds} and {models}")
    per_round = local_epochs * poisson_steps(num_train, batch_size)
    if max_steps:
        per_round = min(per_round, max_steps)
    return rounds * models * per_round


@functools.lru_cache(maxsize=64)
def _calibrated_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=0.005))


class DeviceAccountant:
    """One device's privacy ledger: its noise multiplier, sample rate and the steps taken so far.

    ``num_train`` and ``batch_size`` give the sample rate ``q``; with
    ``settings.target_epsilon`` the noise multiplier is calibrated for
    ``planned`` steps (:func:`planned_steps`).
    """

    def __init__(self, settings: PrivacySettings, *, num_train: int, batch_size: int, planned: int = 0) -> None:
        if not settings.enabled:
            raise ValueError("privacy.enabled is false: a device without DP keeps no accountant")
        if num_train < 1:
            raise PrivacyError(f"a DP device needs private examples, got num_train={num_train}")
        from opacus.accountants import create_accountant

        self.settings = settings
        self.sample_rate = min(1.0, batch_size / num_train)
        #: the mean size of a Poisson draw, ``q · num_train``: what a DP step's summed gradient is divided by
        self.expected_batch_size = max(1, round(self.sample_rate * num_train))
        if settings.target_epsilon > 0:
            if planned < 1:
                raise ValueError("privacy.target_epsilon needs the planned number of steps (planned >= 1)")
            self.noise_multiplier = _calibrated_noise(settings.target_epsilon, settings.delta, self.sample_rate,
                                                      planned, settings.accountant)
        else:
            self.noise_multiplier = settings.noise_multiplier
        self._accountant = create_accountant(settings.accountant)

    @property
    def steps(self) -> int:
        """DP steps taken so far."""
        return int(sum(entry[-1] for entry in self._accountant.history))

    def record(self, steps: int) -> None:
        """Count ``steps`` more DP steps at this device's noise and sample rate."""
        for _ in range(steps):
            self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self, extra_steps: int = 0) -> float:
        """ε at ``settings.delta`` after the steps taken (and ``extra_steps`` more); 0 before any."""
        if self.steps + extra_steps == 0:
            return 0.0
        ledger = self
        if extra_steps:
            ledger = copy.copy(self)
            ledger._accountant = copy.deepcopy(self._accountant)
            ledger.record(extra_steps)
        return float(ledger._accountant.get_epsilon(delta=self.settings.delta))

    def allows(self, steps: int) -> bool:
        """Whether ``steps`` more steps stay within the budget."""
        budget = self.settings.budget()
        return math.isinf(budget) or self.epsilon(steps) <= budget

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self._accountant.history), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the steps taken; refuses a ledger kept at another noise or sample rate."""
        for key in ("noise_multiplier", "sample_rate"):
            if not math.isclose(float(state[key]), getattr(self, key), rel_tol=1e-9):
                raise PrivacyError(f"the device's saved privacy ledger has {key}={state[key]}, its settings now give "
                                   f"{getattr(self, key)}: the privacy settings or the data changed since it was saved")
        self._accountant.history = [tuple(entry) for entry in state["history"]]


# --------------------------------------------------------------------------- training


@contextmanager
def dp_training(model: nn.Module, optimizer: torch.optim.Optimizer, accountant: DeviceAccountant, *,
                noise_seed: int) -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
    """``(model, optimizer)`` that take DP-SGD steps for the duration of the block.

    The model computes per-example gradients (Opacus' ``GradSampleModule``),
    the optimizer clips them, adds seeded noise (``DPOptimizer``; the
    noise is drawn from ``noise_seed``, so a run is reproducible) and divides
    the sum by the expected size of a draw (``accountant.expected_batch_size``:
    a device with fewer examples than ``batch_size`` averages over its whole
    data, not over an absent batch). The
    wrapped ``optimizer``'s state is the one that persists; the hooks are
    removed when the block ends. The caller counts the steps with
    :meth:`DeviceAccountant.record`.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(noise_seed)
    wrapped = GradSampleModule(model, loss_reduction="mean")
    dp = DPOptimizer(optimizer, noise_multiplier=accountant.noise_multiplier,
                     max_grad_norm=accountant.settings.max_grad_norm,
                     expected_batch_size=accountant.expected_batch_size,
                     loss_reduction="mean", generator=generator)
    try:
        with warnings.catch_warnings():  # the hooks' note that inputs need no gradient is expected here
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield wrapped, dp
    finally:
        wrapped._close()


def dp_step(model: nn.Module, optimizer: torch.optim.Optimizer,
            loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
            x: torch.Tensor, y: torch.Tensor, *, weight: float = 1.0) -> None:
    """One DP-SGD step of ``model`` and ``optimizer`` (from :func:`dp_training`) on a private batch.

    Every example's gradient of ``loss_fn(model, x, y)`` (a mean of per-example
    terms) is clipped, the noise added, and the result scaled by ``weight``
    (scaling after the noise is post-processing) before the update. An empty
    Poisson draw takes the step all the same: noise alone, as the analysis assumes.
    """
    optimizer.zero_grad(set_to_none=True)
    if len(y):
        loss = loss_fn(model, x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}")
        loss.backward()
    else:
        for p in model.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    if optimizer.pre_step():  # type: ignore[attr-defined]  # clip, add noise, average
        if weight != 1.0:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(weight)
        optimizer.original_optimizer.step()  # type: ignore[attr-defined]
    optimizer.zero_grad(set_to_none=True)


def public_step(model: nn.Module, optimizer: torch.optim.Optimizer, public: Any, device: torch.device) -> None:
    """A plain step of ``model`` on ``public.public_loss`` (public inputs only, no noise, not
    counted): the per-example hooks are off, the wrapped optimizer steps."""
    optimizer.zero_grad(set_to_none=True)
    model.disable_hooks()  # type: ignore[operator]
    try:
        loss = public.public_loss(model, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {loss.item()}")
        loss.backward()
        optimizer.original_optimizer.step()  # type: ignore[attr-defined]
    finally:
        model.enable_hooks()  # type: ignore[operator]
        optimizer.zero_grad(set_to_none=True)
