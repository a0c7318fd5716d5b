"""One device: its own model, its private data and its optimizer state.

:class:`DistillClient` is plain PyTorch, free of Flower, so it can be tested and
reused on its own; :mod:`hetkd.clients.app` routes Flower messages to it. Its
weights never leave it except through :meth:`DistillClient.get_weights`, which
only the FedAvg baseline calls.
"""

from __future__ import annotations

import copy
import itertools
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


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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

    A device may also keep a **private model** (:meth:`fork_private_model`): a
    copy of its architecture that only ever trains on its private data, so its
    answers to queries say what the device learnt itself and never echo the
    ensemble the device's own model distils from (ensemble distillation with
    ``answer_model="private"``).
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
    ) -> None:
        self.device_id = device_id
        self.architecture = architecture
        self.torch_device = resolve_device(training.device)
        self.model = model.to(self.torch_device)
        self.data = data
        self.global_test = global_test
        self.training = training
        self.seed = seed
        self.reference = reference
        self.adversary = adversary
        self.optimizer = make_optimizer(self.model, training)
        self.rounds_trained = 0
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
        return cls(
            device_id, architecture, model, data, federation.global_test, cfg.training, cfg.seed, federation.reference,
            adversary=data.adversary,
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
        self.set_training(self.training)

    def set_training(self, training: TrainingConfig) -> None:
        """Train with ``training`` from now on; the optimizers' learning rate follows it."""
        self.training = training
        for optimizer in (self.optimizer, self.private_optimizer):
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = training.lr

    def fork_private_model(self) -> nn.Module:
        """The private model, forked from the device's model (weights and optimizer
        state) the first time it is asked for.

        Fork it before the device's model first learns from others: until then
        both have trained on the private data alone, so the fork continues the
        very model the device would have trained by itself.
        """
        if self.private_model is None:
            self.private_model = copy.deepcopy(self.model)
            self.private_optimizer = make_optimizer(self.private_model, self.training)
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
        metrics = self._train(self.model, self.optimizer, server_round, epochs, loss_fn, min_steps)
        self.rounds_trained += 1
        return metrics

    def fit_private(self, server_round: int, epochs: int | None = None, min_steps: int = 0) -> dict[str, float]:
        """Train the private model (:meth:`fork_private_model`) on the private data
        alone, on the batches :meth:`fit` would draw this round; metrics prefixed
        ``private-``."""
        model = self.fork_private_model()
        metrics = self._train(model, self.private_optimizer, server_round, epochs, cross_entropy_step, min_steps)  # type: ignore[arg-type]
        return {"private_train_loss": metrics["train_loss"], "private_train_seconds": metrics["train_seconds"]}

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
        budget = self.training.max_steps or None
        start = time.perf_counter()
        losses, seen = [], 0
        with seeded(self.seed, "train", self.device_id, server_round) as generator:
            for _ in range(epochs):
                if budget is not None and budget <= 0:
                    break
                taken = [0]
                batches = itertools.islice(self._epoch_batches(generator, min_steps, taken), budget)
                loss, n = train_epoch(model, optimizer, batches, loss_fn, self.torch_device)
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
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        inputs: torch.Tensor | None = None,
        epochs: int | None = None,
    ) -> dict[str, float]:
        """Train on private data while distilling towards ``target_logits`` on public inputs.

        ``inputs`` are the public inputs the targets refer to (default: the
        reference set); ``target_logits`` has one row per input. ``kd`` says
        how the distillation term sits beside the private loss (weight, public
        inputs per private batch, steps per epoch); ``loss(student_logits,
        target_logits)`` is the term itself (:class:`hetkd.distill.KLLoss`, or
        MEKD's mapping-emulation loss); see :class:`hetkd.distill.ReferenceKD`.
        """
        inputs = self.reference_inputs() if inputs is None else inputs
        if target_logits.shape[0] != len(inputs):
            raise ValueError(f"targets have {target_logits.shape[0]} rows but there are {len(inputs)} public inputs")
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "reference", self.device_id, server_round))
        term = ReferenceKD(inputs, target_logits, kd.rho, kd.batch_size or self.training.batch_size, loss, generator)
        return self.fit(server_round, epochs, term, kd.min_steps)

    def reference_inputs(self) -> torch.Tensor:
        """The public reference set's inputs (raises if this device holds none)."""
        if self.reference is None or len(self.reference) == 0:
            raise ValueError(f"device {self.device_id} holds no reference set (reference.size=0?)")
        return self.reference.base.inputs(self.reference.indices)

    def reference_logits(self) -> torch.Tensor:
        """The model's logits on the reference set: its "messenger", ``(R, C)``."""
        return self.predict(self.reference_inputs())

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
