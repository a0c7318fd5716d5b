"""One device: its own model, its private data and its optimizer state.

:class:`DistillClient` is plain PyTorch, free of Flower, so it can be tested and
reused on its own; :mod:`hetkd.clients.app` routes Flower messages to it. Its
weights never leave it except through :meth:`DistillClient.get_weights`, which
only the FedAvg baseline calls.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hetkd.adversary import poison_logits
from hetkd.config import HetkdConfig
from hetkd.data import DataView, DeviceData, build_federation
from hetkd.distill.losses import KDTerm, ReferenceKD
from hetkd.models import build_model, count_parameters, state_bytes
from hetkd.privacy import (
    DeviceAccountant,
    PrivacyError,
    PrivacySettings,
    dp_step,
    dp_training,
    planned_steps,
    poisson_steps,
    private_model,
    public_step,
)
from hetkd.training import (
    LossFn,
    TrainingConfig,
    cross_entropy_step,
    derive_seed,
    evaluate_accuracy,
    make_optimizer,
    predict_logits,
    resolve_device,
    seeded,
    train_epoch,
)

__all__ = ["DistillClient", "peak_rss_mb"]

_log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _models_per_round(cfg: HetkdConfig) -> int:
    """How many models a zoo device of ``cfg``'s strategy trains on its private data each round,
    for DP noise calibration: 2 with a private answer model beside an own model that keeps a
    private term (``rho < 1``), else 1."""
    if cfg.strategy.name in ("feddf", "mekd"):
        settings = cfg.strategy.ensemble
    elif cfg.strategy.name in ("fedmd", "sd-dist"):
        settings = cfg.strategy.kd
    else:
        return 1
    return 2 if settings.answer_model == "private" and settings.rho < 1 else 1


class DistillClient:
    """A device that learns from its private data and from others' predictions.

    Parameters
    ----------
    device_id : int
        The device's index in the federation (its partition id).
    architecture : str
        The zoo name (or dotted factory path) of its model, for reports.
    model : nn.Module
        The device's own model; any module mapping inputs to logits.
    data : DeviceData
        Its private train and test parts.
    global_test : DataView
        The global test set (for comparing strategies on equal terms).
    training : TrainingConfig
        Local optimisation settings.
    seed : int
        The run seed; every random choice derives from (seed, device, round).
    reference : DataView | None
        The public reference set every device holds (logit-exchange strategies).
    adversary : str | None
        For measurements only: the kind of adversary this device is
        (:mod:`hetkd.adversary`; ``None``, the default: honest). Zoo devices
        take it from the run's data picture; ``random_predictions`` and
        ``inverted_predictions`` poison what :meth:`outgoing` lets out.
    privacy : PrivacySettings | None
        With ``enabled``, every step that reads private data is a DP-SGD step,
        counted by the device's :class:`~hetkd.privacy.DeviceAccountant`
        (:mod:`hetkd.privacy`); a model DP-SGD cannot train is refused (or
        fixed with ``fix_layers``).
    planned_rounds, planned_models : int
        What the device plans to train, for ``privacy.target_epsilon``: rounds,
        and the models trained on its private data each round (2 with a private
        answer model); see :func:`~hetkd.privacy.planned_steps`.

    private_model_init : nn.Module | None
        The model to start the private answer model from (:meth:`fork_private_model`):
        a fresh model, of any architecture (``models.private_architecture``); None:
        a copy of ``model`` forked when it first distils.
    private_architecture : str | None
        ``private_model_init``'s architecture, as messages name it (default: its class name).

    A device may also keep a **private model** (:meth:`fork_private_model`): a
    model that only ever trains on its private data, so its answers and
    predictions say what the device learnt itself and never echo what the
    device's own model distils from (``answer_model="private"``).
    """

    def __init__(
        self,
        device_id: int,
        architecture: str,
        model: nn.Module,
        data: DeviceData,
        global_test: DataView,
        training: TrainingConfig,
        seed: int = 0,
        reference: DataView | None = None,
        adversary: str | None = None,
        privacy: PrivacySettings | None = None,
        planned_rounds: int = 0,
        planned_models: int = 1,
        private_model_init: nn.Module | None = None,
        private_architecture: str | None = None,
    ) -> None:
        self.device_id = device_id
        self.architecture = architecture
        self.torch_device = resolve_device(training.device)
        self.accountant: DeviceAccountant | None = None
        #: whether the privacy budget stopped training this round
        self.privacy_exhausted = False
        if privacy is not None and privacy.enabled:
            model = private_model(model, architecture, privacy)
            if private_model_init is not None:
                private_model_init = private_model(private_model_init,
                                                   private_architecture or type(private_model_init).__name__, privacy)
            planned = 0
            if privacy.target_epsilon > 0:
                if planned_rounds < 1:
                    raise PrivacyError("privacy.target_epsilon needs the rounds the device plans to train "
                                       f"(planned_rounds >= 1), got {planned_rounds}")
                planned = planned_steps(num_train=len(data.train), batch_size=training.batch_size,
                                        local_epochs=training.local_epochs, rounds=planned_rounds,
                                        max_steps=training.max_steps, models=planned_models)
            self.accountant = DeviceAccountant(privacy, num_train=len(data.train), batch_size=training.batch_size,
                                               planned=planned)
        self.model = model.to(self.torch_device)
        self.data = data
        self.global_test = global_test
        self.training = training
        self.seed = seed
        self.reference = reference
        self.adversary = adversary
        self.optimizer = make_optimizer(self.model, training)
        self.rounds_trained = 0
        self.private_model_init = private_model_init
        self.private_model: nn.Module | None = None
        self.private_optimizer: torch.optim.Optimizer | None = None

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, cfg: HetkdConfig, device_id: int, architecture: str | None = None) -> DistillClient:
        """The device ``device_id`` of the run described by ``cfg``, freshly initialised.

        ``architecture`` replaces the one ``models.assignment`` gives the
        device (a SuperNode's ``model`` node config).
        """
        federation = build_federation(cfg)
        data = federation.device(device_id)
        if architecture is None:
            architecture = cfg.models.assign(cfg.simulation.num_devices)[device_id]
        with seeded(cfg.seed, "init", device_id):
            model = build_model(architecture, federation.input_shape, federation.num_classes)
        private_init = None
        if cfg.models.private_architecture:
            with seeded(cfg.seed, "init-private", device_id):
                private_init = build_model(cfg.models.private_architecture, federation.input_shape,
                                           federation.num_classes)
        return cls(
            device_id, architecture, model, data, federation.global_test, cfg.training, cfg.seed, federation.reference,
            adversary=data.adversary, privacy=cfg.privacy, planned_rounds=cfg.simulation.num_rounds,
            planned_models=_models_per_round(cfg), private_model_init=private_init,
            private_architecture=cfg.models.private_architecture or None,
        )

    def describe(self) -> dict[str, Any]:
        """Public facts about the device: sizes and architecture, nothing learnt
        (the fields of :class:`hetkd.protocol.SetupReply`)."""
        return {
            "device_id": self.device_id,
            "architecture": self.architecture,
            "num_train": len(self.data.train),
            "num_test": len(self.data.test),
            "num_params": count_parameters(self.model),
            "model_bytes": state_bytes(self.model),
            "num_reference": len(self.reference) if self.reference is not None else 0,
        }

    # ----------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        """Everything the device must keep between rounds."""
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rounds_trained": self.rounds_trained,
        }
        if self.private_model is not None and self.private_optimizer is not None:
            state["private_model"] = self.private_model.state_dict()
            state["private_optimizer"] = self.private_optimizer.state_dict()
        if self.accountant is not None:
            state["privacy"] = self.accountant.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the learning rate stays ``training.lr``:
        the settings the device runs with now win over the ones it was saved with)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds_trained = int(state.get("rounds_trained", 0))
        if "private_model" in state:
            self.fork_private_model()
            self.private_model.load_state_dict(state["private_model"])  # type: ignore[union-attr]
            self.private_optimizer.load_state_dict(state["private_optimizer"])  # type: ignore[union-attr]
        if self.accountant is not None and "privacy" in state:
            self.accountant.load_state_dict(state["privacy"])
        elif self.accountant is not None and self.rounds_trained:
            raise PrivacyError(f"device {self.device_id}'s saved state has no privacy ledger but it trained "
                               f"{self.rounds_trained} round(s): it was trained without privacy.enabled")
        self.set_training(self.training)

    def set_training(self, training: TrainingConfig) -> None:
        """Train with ``training`` from now on; the optimizers' learning rate follows it."""
        self.training = training
        for optimizer in (self.optimizer, self.private_optimizer):
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = training.lr

    def fork_private_model(self) -> nn.Module:
        """The private model: ``private_model_init`` or else a fork of the device's model
        (weights and optimizer state), made the first time it is asked for.

        Fork it before the device's model first learns from others: until then
        both have trained on the private data alone, so the fork continues the
        very model the device would have trained by itself. A model of its own
        (``private_model_init``) is asked for from the first round.
        """
        if self.private_model is None:
            fork = self.private_model_init is None
            self.private_model = copy.deepcopy(self.model) if fork else self.private_model_init.to(self.torch_device)
            self.private_optimizer = make_optimizer(self.private_model, self.training)
            if fork:  # the fork continues the device's optimizer too
                self.private_optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        return self.private_model

    def get_weights(self) -> dict[str, torch.Tensor]:
        """The model's weights (only the FedAvg baseline ever sends these)."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the model's weights (FedAvg baseline)."""
        self.model.load_state_dict(weights)

    # ----------------------------------------------------------------- work

    def fit(
        self,
        server_round: int,
        epochs: int | None = None,
        loss_fn: LossFn = cross_entropy_step,
        min_steps: int = 0,
    ) -> dict[str, float]:
        """Train on the private data for ``epochs`` (default ``training.local_epochs``).

        ``loss_fn(model, x, y)`` is the loss of one private batch; distillation
        strategies pass one that adds their term. An epoch takes at least
        ``min_steps`` optimisation steps, passing over the private data again
        if needed (so a device with very little data still takes enough
        distillation steps). Shuffling and dropout are seeded by (run seed,
        device, round), so results do not depend on scheduling. With
        ``training.max_steps`` > 0 the round stops after that many steps.
        """
        self.privacy_exhausted = False
        metrics = self._train(self.model, self.optimizer, server_round, epochs, loss_fn, min_steps)
        self.rounds_trained += 1
        return metrics | self.privacy_report()

    def fit_private(self, server_round: int, epochs: int | None = None, min_steps: int = 0) -> dict[str, float]:
        """Train the private model (:meth:`fork_private_model`) on the private data
        alone, on the batches :meth:`fit` would draw this round; metrics prefixed
        ``private-``."""
        model = self.fork_private_model()
        metrics = self._train(model, self.private_optimizer, server_round, epochs, cross_entropy_step, min_steps)  # type: ignore[arg-type]
        loss = None if self.accountant is not None else metrics["train_loss"]  # a DP device keeps its loss home
        return {"private_train_loss": loss, "private_train_seconds": metrics["train_seconds"], **self.privacy_report()}

    def untrained_report(self) -> dict[str, Any]:
        """What training reports of a round in which the model takes no step (privacy aside)."""
        return {"train_loss": math.nan, "num_examples": len(self.data.train), "samples_seen": 0, "train_seconds": 0.0}

    def privacy_report(self) -> dict[str, Any]:
        """What a DP device reports of its privacy after training: its ε so far and whether the
        budget stopped training this round (empty without DP)."""
        if self.accountant is None:
            return {}
        return {"epsilon": self.accountant.epsilon(), "privacy_exhausted": self.privacy_exhausted}

    def _train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        server_round: int,
        epochs: int | None,
        loss_fn: LossFn,
        min_steps: int,
    ) -> dict[str, float]:
        """One round of ``epochs`` over the private data (see :meth:`fit`)."""
        epochs = self.training.local_epochs if epochs is None else epochs
        if self.accountant is not None:
            return self._train_private(model, optimizer, server_round, epochs, loss_fn, min_steps)
        budget = self.training.max_steps or None
        start = time.perf_counter()
        losses, seen = [], 0
        with seeded(self.seed, "train", self.device_id, server_round) as generator:
            for _ in range(epochs):
                if budget is not None and budget <= 0:
                    break
                taken = [0]
                batches = itertools.islice(self._epoch_batches(generator, min_steps, taken), budget)
                loss, n = train_epoch(model, optimizer, batches, loss_fn, self.torch_device,
                                      clip_grad_norm=self.training.clip_grad_norm)
                if budget is not None:
                    budget -= taken[0]
                if n:
                    losses.append(loss)
                seen += n
        return {
            "train_loss": sum(losses) / len(losses) if losses else math.nan,
            "num_examples": len(self.data.train),
            "samples_seen": seen,
            "train_seconds": time.perf_counter() - start,
        }

    def _train_private(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        server_round: int,
        epochs: int,
        loss_fn: LossFn,
        min_steps: int,
    ) -> dict[str, Any]:
        """:meth:`_train` with DP-SGD: ``epochs`` of Poisson-sampled private batches
        (:func:`~hetkd.privacy.poisson_steps` each, at most ``training.max_steps``), every
        step clipped, noised and counted; refused before any step when the round would
        take the device over its budget. A distillation term's public half runs as a
        separate plain step beside each private one, and ``min_steps`` (enough
        distillation for a device with little data) adds public steps only: they are free."""
        accountant = self.accountant
        assert accountant is not None
        batch_size = self.training.batch_size
        public = loss_fn if isinstance(loss_fn, ReferenceKD) else None
        # rho = 1: the private term weighs nothing, so the model takes public steps only and reads no private data
        steps = epochs * poisson_steps(len(self.data.train), batch_size) if public is None or public.rho < 1 else 0
        public_steps = epochs * poisson_steps(len(self.data.train), batch_size, min_steps) if public and public.rho else 0
        if self.training.max_steps:
            steps, public_steps = min(steps, self.training.max_steps), min(public_steps, self.training.max_steps)
        report = self.untrained_report()
        if not accountant.allows(steps):
            _log.warning("device %d: %d more DP step(s) would take epsilon from %.3f to %.3f, over the budget %.3f; "
                         "it stops training and keeps answering with the model it has", self.device_id, steps,
                         accountant.epsilon(), accountant.epsilon(steps), accountant.settings.budget())
            self.privacy_exhausted = True
            return report
        which = "private" if model is self.private_model else "own"
        noise_seed = derive_seed(self.seed, "dp-noise", self.device_id, server_round, which)
        # distillation beside a private batch (ReferenceKD) splits in two steps: the private
        # cross-entropy, a DP step; the public term, free (it reads public data and DP weights only)
        private_loss = cross_entropy_step if public is not None else loss_fn
        private_weight = 1.0 - public.rho if public is not None else 1.0
        start = time.perf_counter()
        seen = 0
        with seeded(self.seed, "train", self.device_id, server_round) as generator, \
                dp_training(model, optimizer, accountant, noise_seed=noise_seed) as (dp_model, dp_optimizer):
            dp_model.train()
            draws = self.data.train.poisson_batches(batch_size, steps, generator)
            for step in range(max(steps, public_steps)):
                if step < steps:
                    x, y = next(draws)
                    x, y = x.to(self.torch_device), y.to(self.torch_device)
                    dp_step(dp_model, dp_optimizer, private_loss, x, y, weight=private_weight)
                    seen += len(y)
                if step < public_steps:
                    public_step(dp_model, dp_optimizer, public, self.torch_device)
        accountant.record(steps)
        # the loss is a statistic of the private data: it stays on the device
        return report | {"samples_seen": seen, "train_seconds": time.perf_counter() - start}

    def _epoch_batches(self, generator: torch.Generator, min_steps: int, taken: list[int] | None = None):
        """Shuffled private batches: one pass, repeated until ``min_steps`` batches
        (``taken[0]`` counts the batches handed out)."""
        steps = 0
        while True:
            for batch in self.data.train.batches(self.training.batch_size, shuffle=True, generator=generator):
                steps += 1
                if taken is not None:
                    taken[0] += 1
                yield batch
            if steps == 0 or steps >= min_steps:
                return

    def fit_towards(
        self,
        server_round: int,
        target_logits: torch.Tensor,
        kd: KDTerm,
        loss: Callable[..., torch.Tensor],
        inputs: torch.Tensor | None = None,
        epochs: int | None = None,
        generated: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Train on private data while distilling towards ``target_logits`` on public inputs.

        ``inputs`` are the public inputs the targets refer to (default: the
        reference set); ``target_logits`` has one row per input. ``kd`` says
        how the distillation term sits beside the private loss (weight, public
        inputs per private batch, steps per epoch); ``loss(student_logits,
        target_logits)`` is the term itself (:class:`hetkd.distill.KLLoss`, or
        MEKD's mapping-emulation loss); see :class:`hetkd.distill.ReferenceKD`.
        ``generated`` (one boolean per input) marks G's samples, for a loss
        that computes G's term on them alone.
        """
        inputs = self.reference_inputs() if inputs is None else inputs
        if target_logits.shape[0] != len(inputs):
            raise ValueError(f"targets have {target_logits.shape[0]} rows but there are {len(inputs)} public inputs")
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "reference", self.device_id, server_round))
        term = ReferenceKD(inputs, target_logits, kd.rho, kd.batch_size or self.training.batch_size, loss, generator,
                           generated=generated)
        return self.fit(server_round, epochs, term, kd.min_steps)

    def reference_inputs(self) -> torch.Tensor:
        """The public reference set's inputs (raises if this device holds none)."""
        if self.reference is None or len(self.reference) == 0:
            raise ValueError(f"device {self.device_id} holds no reference set (reference.size=0?)")
        return self.reference.base.inputs(self.reference.indices)

    def reference_logits(self, private: bool = False) -> torch.Tensor:
        """The model's logits on the reference set: its "messenger", ``(R, C)`` (with
        ``private``, its private model's, as :meth:`predict`)."""
        return self.predict(self.reference_inputs(), private=private)

    def evaluate(self, include_global: bool = True) -> dict[str, float]:
        """Personalised (own test split) and global (global test set, when the device holds one) accuracy."""
        bs = max(256, self.training.batch_size)
        acc, loss, n = evaluate_accuracy(self.model, self.data.test.batches(bs), self.torch_device)
        out = {"personalised_accuracy": acc, "personalised_loss": loss, "num_test": n}
        if include_global and len(self.global_test) > 0:
            g_acc, g_loss, g_n = evaluate_accuracy(self.model, self.global_test.batches(bs), self.torch_device)
            out.update({"global_accuracy": g_acc, "global_loss": g_loss, "num_global_test": g_n})
        return out

    def outgoing(self, logits: torch.Tensor, server_round: int) -> torch.Tensor:
        """What the device sends of its ``logits`` (reference predictions, answers): the logits,
        or an adversary's poison (:func:`hetkd.adversary.poison_logits`, seeded by device and round)."""
        if self.adversary is None:
            return logits
        return poison_logits(logits, self.adversary, derive_seed(self.seed, "poison", self.device_id, server_round))

    def predict(self, inputs: torch.Tensor, private: bool = False) -> torch.Tensor:
        """Logits of the device's model on ``inputs`` (e.g. the reference set), or
        with ``private`` of its private model (the device's model while it has none)."""
        model = self.private_model if private and self.private_model is not None else self.model
        return predict_logits(model, inputs, device=self.torch_device)
