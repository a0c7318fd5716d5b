"""The machinery every logit-exchange strategy shares (FedMD, SD-Dist).

Devices hold a public reference set. Each round, a sampled device

1. receives its targets: log-probabilities on the reference set, mixed from
   other devices' predictions (none in warm-up rounds, or before the server
   holds any predictions),
2. trains on its private data while distilling towards those targets
   (:class:`~hetkd.protocol.ReferenceDistill`; see :class:`hetkd.distill.ReferenceKD`),
3. replies with its own predictions on the reference set — and nothing else.

The server keeps every device's latest predictions (the "messengers") and,
before each round, builds targets ``W @ Z`` for the sampled devices.
Strategies differ only in the mixing matrix ``W``
(:meth:`LogitExchange.mixing_weights`): FedMD averages everyone; SD-Dist
picks similar, good neighbours. With ``exchange.aggregate`` other than
``mean`` the teachers ``W`` names combine robustly: without the outliers, or
by a coordinate-wise median or trimmed mean
(:func:`~hetkd.distill.exchange.teacher_targets`). Devices not sampled keep
their predictions on record; a late joiner gets targets once it has
predictions on record.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord

from hetkd import protocol as P
from hetkd.distill.codec import decode_logits, encode_logits
from hetkd.distill.divergence import check_reference_labels
from hetkd.distill.exchange import ReferenceDistillSettings, teacher_targets
from hetkd.distill.similarity import reference_quality
from hetkd.strategies.base import DeviceInfo, DeviceStrategy, Figures, RoundPlan

__all__ = ["LogitExchange"]


class LogitExchange(DeviceStrategy):
    """Base class: devices exchange predictions on a shared reference set.

    Parameters
    ----------
    num_classes : int
        Number of classes C.
    num_reference : int | None
        Size R of the reference set (every reply must have R rows). ``None``:
        learnt from the devices' set-up replies; a device whose reference set
        has another size is refused at set-up, naming both sizes.
    reference_labels : torch.Tensor | None
        Labels of the reference set, when it is labelled; strategies may use
        them to score devices, never as training targets.
    exchange : ReferenceDistillSettings | None
        How devices distil and what travels (default: the run config's
        ``strategy.kd`` defaults; :meth:`ReferenceDistillSettings.paper` is the paper's).
    **kwargs
        Sampling and set-up options of :class:`~hetkd.strategies.DeviceStrategy`.
    """

    request_type = P.ReferenceDistill

    def __init__(
        self,
        *,
        num_classes: int,
        num_reference: int | None = None,
        reference_labels: torch.Tensor | None = None,
        exchange: ReferenceDistillSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if num_reference is not None and num_reference < 1:
            raise ValueError(f"num_reference must be >= 1, got {num_reference}")
        if reference_labels is not None:
            reference_labels = check_reference_labels(reference_labels, num_reference, num_classes)
            num_reference = num_reference or len(reference_labels)
        self.num_classes = num_classes
        self.num_reference = num_reference
        self.reference_labels = reference_labels
        self.exchange = exchange if exchange is not None else ReferenceDistillSettings()
        #: device id -> its latest reference log-probabilities, (R, C)
        self.predictions: dict[int, torch.Tensor] = {}

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"strategy.kd": self.exchange}

    # ------------------------------------------------------------------ set-up

    def admit(self, info: DeviceInfo) -> str | None:
        """A device joins only with a reference set of the federation's size (the first device's, unless given)."""
        if info.num_reference < 1:
            return "holds no reference set; logit exchange needs the public reference set on every device"
        if self.num_reference is None:
            self.num_reference = info.num_reference
        elif info.num_reference != self.num_reference:
            return (f"holds a reference set of {info.num_reference} rows, the federation's has "
                    f"{self.num_reference}: every device must hold the same reference set")
        return None

    # ------------------------------------------------------------------ the algorithm's hook

    def mixing_weights(self, server_round: int, population: list[int], logits: torch.Tensor,
                       rows: list[int]) -> tuple[torch.Tensor, Figures]:
        """The ``n × n`` mixing matrix over ``population`` (device ids, in row order),
        dense or sparse (COO), and the figures its choice produced.

        Only the rows listed in ``rows`` (the sampled devices with predictions
        on record) are used. Each used row sums to 1.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ targets

    def population(self) -> tuple[list[int], torch.Tensor]:
        """Device ids with predictions on record, and their stacked predictions ``(n, R, C)``."""
        ids = sorted(self.predictions)
        if not ids:
            return [], torch.empty(0, self.num_reference or 0, self.num_classes)
        return ids, torch.stack([self.predictions[d] for d in ids])

    def distilling(self, server_round: int) -> bool:
        """Whether targets are sent this round (after the warm-up)."""
        return server_round > self.exchange.warmup_rounds

    def targets(self, server_round: int, learners: list[int]) -> tuple[dict[int, torch.Tensor], Figures]:
        """Each learner's targets ``(R, C)`` (those with teachers on record), and the figures."""
        if not self.distilling(server_round):
            return {}, Figures()
        ids, logits = self.population()
        wanted = set(learners)
        rows = [k for k, d in enumerate(ids) if d in wanted]
        if len(ids) < 2 or not rows:
            return {}, Figures()
        weights, figures = self.mixing_weights(server_round, ids, logits, rows)
        e = self.exchange
        made = teacher_targets(weights, logits, space=e.mix, temperature=e.temperature, aggregate=e.aggregate,
                               trim_fraction=e.trim_fraction, quality=self.quality(logits))
        if e.aggregate == "screened_mean":  # who the screen kept from teaching this round
            figures.metrics["screened_teachers"] = len(made.screened)
            for k in made.screened:
                figures.devices.setdefault(ids[k], {})["screened_teacher"] = True
        return {ids[k]: made.targets[k] for k in rows if bool(made.taught[k])}, figures

    def quality(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Reference-set cross-entropy of each device on record (``None`` if unlabelled)."""
        if self.reference_labels is None:
            return None
        return reference_quality(logits, self.reference_labels)

    def request(self, server_round: int) -> P.ReferenceDistill:
        """A round's request without targets: the settings every device gets."""
        e = self.exchange
        return P.ReferenceDistill(server_round=server_round, kd=e.kd_term(), kl=e.kl_loss(), mix=e.mix,
                                  precision=e.precision, answer_model=e.answer_model)

    def plan_train(self, server_round: int, device_ids: list[int], arrays: ArrayRecord) -> RoundPlan:
        targets, figures = self.targets(server_round, device_ids)
        request, precision = self.request(server_round), self.exchange.precision
        return RoundPlan(
            {d: replace(request, targets=encode_logits(targets[d], precision)) if d in targets else request
             for d in device_ids},
            figures,
        )

    # ------------------------------------------------------------------ replies

    def check_reply(self, device_id: int, request: P.Request, reply: P.Reply) -> str | None:
        """Predictions must be R x C finite log-probabilities."""
        assert isinstance(reply, P.ReferencePredictions)
        expected = (self.num_reference, self.num_classes)
        if tuple(reply.reference_logits.shape) != expected:
            return f"predictions have shape {tuple(reply.reference_logits.shape)}, expected {expected}"
        try:
            decoded = decode_logits(reply.reference_logits)
        except ValueError as err:
            return str(err)
        if not torch.isfinite(decoded).all():
            return "predictions contain NaN or infinite values"
        return None

    def learn(self, server_round: int, plan: RoundPlan, replies: dict[int, P.Reply]) -> Figures:
        """Keep every answering device's predictions (normalised, a fresh tensor per device)."""
        distilled = 0
        for device, reply in replies.items():
            assert isinstance(reply, P.ReferencePredictions)
            self.predictions[device] = decode_logits(reply.reference_logits).log_softmax(-1)
            distilled += int(reply.distilled)
        return Figures({"distilled_devices": distilled, "devices_on_record": len(self.predictions)})

    def state_dict(self) -> dict[str, Any]:
        """The predictions on record."""
        return super().state_dict() | {"predictions": dict(self.predictions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.predictions = {int(d): p for d, p in state["predictions"].items()}
