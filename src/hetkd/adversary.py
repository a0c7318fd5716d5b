"""Poisoning devices on purpose: the run config's ``adversary`` group.

To measure how a strategy holds up against a poisoning minority, a run can
make a seeded choice of ``adversary.fraction`` of its devices adversarial
(:func:`adversarial_devices`). What an adversary does is its ``kind``
(:data:`ADVERSARY_KINDS`):

* ``permuted_labels`` — the device trains on its private data with every label
  moved by one fixed class permutation without a fixed point
  (:func:`label_permutation`; every class is wrong, and all adversaries of a run
  share it, so they agree with each other). It then follows the protocol
  faithfully: everything it shares is poisoned but looks like an honest
  device's answer. The permutation lives in the data picture
  (:func:`hetkd.data.build_federation`), which every party computes alike.
* ``random_predictions`` — what the device sends (its reference predictions,
  its answers to queries) is its own logits with each row's entries shuffled
  at random: as confident as an honest answer, about a random class
  (:func:`poison_logits`).
* ``inverted_predictions`` — what it sends is its own logits negated: the class
  it believes most becomes the least likely.

Devices learn which they are from the data picture of the run config the
server sends at set-up (zoo devices); devices of
:func:`hetkd.clients.make_client_app` are never adversarial. The run's
figures report the honest devices separately
(``honest_global_accuracy_mean``, :func:`hetkd.results.honest_figures`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hetkd.settings import require, require_choice, require_types
from hetkd.training import derive_seed

__all__ = ["ADVERSARY_KINDS", "AdversarySettings", "adversarial_devices", "label_permutation", "poison_logits"]

#: what an adversarial device does
ADVERSARY_KINDS = ("permuted_labels", "random_predictions", "inverted_predictions")


@dataclass(frozen=True, kw_only=True)
class AdversarySettings:
    """Which devices poison the federation, and how: the run config's ``adversary``.

    ``fraction`` of the devices (``round(fraction · n)`` of them, chosen with the
    run seed; 0: none, the default) are adversarial of ``kind``:
    ``permuted_labels`` (they train on their private data under one fixed class
    permutation, shared by all of them), ``random_predictions`` (what they send
    is their logits shuffled within each row) or ``inverted_predictions`` (their
    logits negated). See :mod:`hetkd.adversary`.
    """

    fraction: float = 0.0
    kind: str = "permuted_labels"

    def __post_init__(self) -> None:
        require_types(self)
        require(0.0 <= self.fraction < 1.0, "fraction", f"must be in [0, 1), got {self.fraction}")
        require_choice(self.kind, "kind", ADVERSARY_KINDS)

    def count(self, num_devices: int) -> int:
        """How many of ``num_devices`` devices are adversarial."""
        return _count(num_devices, self.fraction)


def _count(num_devices: int, fraction: float) -> int:
    return min(num_devices, math.floor(fraction * num_devices + 0.5))


def adversarial_devices(num_devices: int, fraction: float, seed: int) -> list[int]:
    """The ids of the ``round(fraction · num_devices)`` adversarial devices, sorted: a choice
    fixed by ``seed`` (the same on the server and on every device)."""
    if num_devices < 0 or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"need num_devices >= 0 and fraction in [0, 1], got {num_devices}, {fraction}")
    count = _count(num_devices, fraction)
    if count == 0:
        return []
    rng = np.random.default_rng(derive_seed(seed, "adversary"))
    return sorted(int(d) for d in rng.permutation(num_devices)[:count])


def label_permutation(num_classes: int, seed: int) -> np.ndarray:
    """A permutation of ``0..num_classes-1`` without a fixed point (one cycle through every
    class, in an order fixed by ``seed``): ``perm[y]`` is the label an adversary trains on."""
    if num_classes < 2:
        raise ValueError(f"a label permutation needs at least 2 classes, got {num_classes}")
    order = np.random.default_rng(derive_seed(seed, "adversary-labels")).permutation(num_classes)
    perm = np.empty(num_classes, dtype=np.int64)
    perm[order] = np.roll(order, -1)  # order[k] -> order[k + 1]
    return perm


def poison_logits(logits: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """What an adversary of ``kind`` sends in place of its ``logits`` ``(..., C)``.

    ``random_predictions``: each row's entries shuffled by a permutation drawn
    from ``seed`` (same confidence, a random class); ``inverted_predictions``:
    the logits negated; ``permuted_labels``: the logits as they are (the poison
    is in what the device learnt).
    """
    require_choice(kind, "adversary.kind", ADVERSARY_KINDS)
    if kind == "permuted_labels":
        return logits
    if kind == "inverted_predictions":
        return -logits
    flat = logits.reshape(-1, logits.shape[-1])
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(flat.shape, generator=generator).argsort(dim=1).to(flat.device)
    return flat.gather(1, order).reshape(logits.shape)
