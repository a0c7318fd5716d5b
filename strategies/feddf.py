"""FedDF-style ensemble distillation on the public set, for heterogeneous devices.

Lin et al., "Ensemble Distillation for Robust Model Fusion in Federated
Learning" (NeurIPS 2020): the server distils the ensemble of the devices'
models into its model on unlabelled public inputs with KL. With devices that
each keep their own architecture, no weights are averaged: every distillation
round the devices answer on ``num_queries`` reference rows (the server sends a
seed, not the inputs: every device holds the reference set), the server
distils the mean ensemble of their soft answers (corrected to a uniform class
prior over the rows unless ``balance_classes=False``) into its global student,
and the devices distil towards the ensemble on the same rows beside their
private cross-entropy (one round later, see
:class:`~hetkd.strategies.EnsembleDistill`). It is MEKD's baseline: the same
exchange on real public inputs instead of generated ones, with ``w_f = 0``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from hetkd.distill.divergence import check_reference_labels
from hetkd.distill.emulation import DistillSettings
from hetkd.distill.queries import QuerySpec, reference_rows
from hetkd.strategies.ensemble_distill import EnsembleDistill
from hetkd.training import derive_seed

__all__ = ["FedDF"]


class FedDF(EnsembleDistill):
    """Devices answer on reference rows; the server and the devices distil their ensemble with KL.

    Takes the arguments of :class:`~hetkd.strategies.EnsembleDistill` but
    ``response`` (FedDF's devices answer soft); ``public_inputs`` must be the
    reference set the devices hold (the same rows in the same order).
    ``distill`` (default: the run config's ``mekd.distill``) sets the
    student's optimizer and the temperature; its mapping-emulation weight is
    set to 0: FedDF's loss is ``w_kl · T · KL`` alone. ``reference_labels``
    ``(R,)``: the reference set's classes when it is labelled; with
    ``aggregate=screened_mean`` they score each device's answers on the
    queried rows (:func:`~hetkd.distill.ensemble.answer_quality`), so the screen
    finds poisoners by the labels, not only by their disagreement (never a
    training target).
    """

    def __init__(self, *, distill: DistillSettings | None = None, reference_labels: torch.Tensor | None = None,
                 **kwargs: Any) -> None:
        self.configured = distill if distill is not None else DistillSettings()
        kl_only = replace(self.configured, w_f=0.0, w_kl=self.configured.w_kl or 1.0)
        super().__init__(response="soft", distill=kl_only, **kwargs)
        self.reference_labels = None if reference_labels is None else \
            check_reference_labels(reference_labels, len(self.public_inputs), self.num_classes)

    def query_labels(self, query: QuerySpec) -> torch.Tensor | None:
        if self.reference_labels is None:
            return None
        return self.reference_labels[reference_rows(query, len(self.public_inputs))]

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"mekd.distill": self.configured}

    def asks_about_reference_rows(self) -> bool:
        return True

    def make_query(self, server_round: int, phase: str) -> QuerySpec | None:
        if phase != "distill":
            return None
        count = min(self.ensemble.num_queries, len(self.public_inputs))
        return QuerySpec(source="reference", seed=derive_seed(self.seed, "feddf-query", server_round), count=count)
