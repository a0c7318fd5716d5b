"""FedMD-style consensus distillation: every device learns from everyone's average.

Li & Wang, "FedMD: Heterogenous Federated Learning via Model Distillation"
(2019): devices share predictions on a public set and distil towards their
plain average. Here it is the "no similarity" ablation of SD-Dist: the same
exchange, with the mixing matrix ``W = 1/n`` (every device, itself included).
"""

from __future__ import annotations

import torch

from hetkd.distill.exchange import uniform_weights
from hetkd.strategies.base import Figures
from hetkd.strategies.logit_exchange import LogitExchange

__all__ = ["FedMD"]


class FedMD(LogitExchange):
    """Devices distil towards the mean of all devices' reference predictions."""

    def mixing_weights(self, server_round: int, population: list[int], logits: torch.Tensor,
                       rows: list[int]) -> tuple[torch.Tensor, Figures]:
        return uniform_weights(len(population), include_self=True), Figures()
