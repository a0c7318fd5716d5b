"""The machinery every logit-exchange strategy shares (FedMD, SD-Dist).

Devices hold a public reference set. Each round, a sampled device

1. receives its targets: logits on the reference set, mixed from other
   devices' predictions (none in warm-up rounds, or before the server holds
   any predictions),
2. trains on its private data while distilling towards those targets
   (``train.reference_distill``; see :class:`hetkd.distill.ReferenceKD`),
3. replies with its own predictions on the reference set — and nothing else.

The server keeps every device's latest predictions (the "messengers") and,
before each round, builds targets ``W @ Z`` for the sampled devices.
Strategies differ only in the mixing matrix ``W``
(:meth:`LogitExchange.mixing_weights`): FedMD averages everyone; SD-Dist
picks similar, good neighbours. Devices not sampled keep their predictions on
record; a late joiner gets targets once it has predictions on record.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from hetkd import protocol as P
from hetkd.distill.codec import PRECISIONS, decode_logits, encode_logits
from hetkd.distill.similarity import MIX_SPACES, mix_targets, row_sums
from hetkd.strategies.base import DeviceStrategy

__all__ = ["LogitExchange"]


class LogitExchange(DeviceStrategy):
    """Base class: devices exchange predictions on a shared reference set.

    Parameters
    ----------
    num_reference : int
        Size R of the reference set (every reply must have R rows).
    num_classes : int
        Number of classes C.
    reference_labels : torch.Tensor | None
        Labels of the reference set, when it is labelled; strategies may use
        them to score devices, never as training targets.
    rho : float
        Weight of the distillation term in ``(1 - rho) · CE + rho · KD``.
    temperature : float
        Distillation temperature T.
    reference_batch_size : int
        Reference samples beside each private batch (0: the private batch size).
    precision : str
        Encoding of predictions on the wire: ``float32``, ``float16`` or ``uint8``.
    warmup_rounds : int
        Rounds of purely local training before targets are sent.
    mix : str
        How targets combine predictions: ``logits`` (a weighted mean of logits,
        as in the SD-Dist paper) or ``probs`` (a weighted mean of the
        temperature-softened distributions; see :func:`hetkd.distill.mix_targets`).
    t_squared : bool
        Scale the KD term by T² (Hinton et al.); ``False`` follows SD-Dist's code.
    min_steps : int
        Each local epoch takes at least this many steps, repeating the private
        data when it is small (0: one pass over it, as in the paper).

    The defaults are the SD-Dist paper's (ρ = 0.9, T = 3, logit mean, no T²,
    float32); ``hetkd run`` configs use their own, see
    :class:`hetkd.config.ReferenceKDConfig`.
    **kwargs
        Sampling and set-up options of :class:`~hetkd.strategies.DeviceStrategy`.
    """

    train_action = P.TRAIN_REFERENCE_DISTILL

    def __init__(
        self,
        *,
        num_reference: int,
        num_classes: int,
        reference_labels: torch.Tensor | None = None,
        rho: float = 0.9,
        temperature: float = 3.0,
        reference_batch_size: int = 0,
        precision: str = "float32",
        warmup_rounds: int = 1,
        mix: str = "logits",
        t_squared: bool = False,
        min_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_reference < 1:
            raise ValueError(f"num_reference must be >= 1, got {num_reference}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if reference_labels is not None and tuple(reference_labels.shape) != (num_reference,):
            raise ValueError(f"reference_labels must have shape ({num_reference},), got {tuple(reference_labels.shape)}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
        if warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
        if mix not in MIX_SPACES:
            raise ValueError(f"unknown mix {mix!r}; valid choices: {', '.join(MIX_SPACES)}")
        self.num_reference = num_reference
        self.num_classes = num_classes
        self.reference_labels = reference_labels
        self.rho = rho
        self.temperature = temperature
        self.reference_batch_size = reference_batch_size
        self.precision = precision
        self.warmup_rounds = warmup_rounds
        self.mix = mix
        self.t_squared = t_squared
        if min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {min_steps}")
        self.min_steps = min_steps
        #: device id -> its latest reference log-probabilities, (R, C)
        self.predictions: dict[int, torch.Tensor] = {}
        self._targets: dict[int, torch.Tensor] = {}
        self._extras: dict[str, Any] = {}

    # ------------------------------------------------------------------ the algorithm's hook

    def mixing_weights(self, server_round: int, population: list[int], logits: torch.Tensor,
                       rows: list[int]) -> torch.Tensor:
        """The ``n × n`` mixing matrix over ``population`` (device ids, in row order),
        dense or sparse (COO).

        Only the rows listed in ``rows`` (the sampled devices with predictions
        on record) are used. Each used row sums to 1.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ round plumbing

    def population(self) -> tuple[list[int], torch.Tensor]:
        """Device ids with predictions on record, and their stacked predictions ``(n, R, C)``."""
        ids = sorted(self.predictions)
        if not ids:
            return [], torch.empty(0, self.num_reference, self.num_classes)
        return ids, torch.stack([self.predictions[d] for d in ids])

    def distilling(self, server_round: int) -> bool:
        """Whether targets are sent this round (after the warm-up)."""
        return server_round > self.warmup_rounds

    def before_train(self, server_round: int, node_ids: list[int]) -> None:
        self._targets, self._extras = {}, {}
        if not self.distilling(server_round):
            return
        ids, logits = self.population()
        sampled = {self.device_id(n) for n in node_ids}
        rows = [k for k, d in enumerate(ids) if d in sampled]
        if len(ids) < 2 or not rows:
            return
        weights = self.mixing_weights(server_round, ids, logits, rows)
        targets = mix_targets(weights, logits, self.mix, self.temperature)
        sums = row_sums(weights)
        for k in rows:
            if float(sums[k]) > 0:
                self._targets[ids[k]] = targets[k]

    def kd_config(self) -> dict[str, Any]:
        """Distillation settings every training message carries."""
        return {
            "rho": self.rho,
            "temperature": self.temperature,
            "reference-batch-size": self.reference_batch_size,
            "precision": self.precision,
            "mix": self.mix,
            "kd-scale": self.temperature**2 if self.t_squared else 1.0,
            "min-steps": self.min_steps,
        }

    def train_content(self, server_round: int, node_id: int, config: ConfigRecord, arrays: ArrayRecord) -> RecordDict:
        for key, value in self.kd_config().items():
            config[key] = value
        content = RecordDict({P.CONFIG: config})
        target = self._targets.get(self.device_id(node_id))
        if target is not None:
            content[P.TARGETS] = ArrayRecord({P.REFERENCE_LOGITS: Array(encode_logits(target, self.precision))})
        return content

    def check_train_reply(self, reply: Message) -> str | None:
        """A reply must carry exactly R x C finite predictions and nothing but metrics besides."""
        extra = set(reply.content.keys()) - {P.METRICS, P.PREDICTIONS}
        if extra:
            return f"reply carries records {sorted(extra)} beyond '{P.METRICS}' and '{P.PREDICTIONS}'"
        record = reply.content.array_records.get(P.PREDICTIONS)
        if record is None or P.REFERENCE_LOGITS not in record:
            return f"reply lacks '{P.PREDICTIONS}/{P.REFERENCE_LOGITS}'"
        array = record[P.REFERENCE_LOGITS].numpy()
        expected = (self.num_reference, self.num_classes)
        if tuple(array.shape) != expected:
            return f"predictions have shape {tuple(array.shape)}, expected {expected}"
        try:
            decoded = decode_logits(array)
        except ValueError as err:
            return str(err)
        if not torch.isfinite(decoded).all():
            return "predictions contain NaN or infinite values"
        return None

    def process_train_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        for reply in replies:
            array = reply.content[P.PREDICTIONS][P.REFERENCE_LOGITS].numpy()
            # store normalised log-probabilities, a fresh tensor per device
            self.predictions[self.device_id(reply.metadata.src_node_id)] = decode_logits(array).log_softmax(-1)
        distilled = [float(r.content[P.METRICS].get("distilled", 0.0)) for r in replies]
        self._extras["distilled_devices"] = int(sum(distilled))
        self._extras["devices_on_record"] = len(self.predictions)
        return None

    def round_extras(self, server_round: int) -> dict[str, Any]:
        return dict(self._extras)
