"""SD-Dist: Similarity-based Decentralized Knowledge Distillation.

Ye et al., "A Decentralized Collaborative Learning Framework Across
Heterogeneous Devices for Personalized Predictive Analytics" (arXiv 2205.13705;
later "SQMD"). Every device holds the same public reference set and shares
only its predictions on it. Each round, for every sampled device ``i``:

1. **quality** — when the reference set is labelled, every device on record is
   scored by its cross-entropy there; the best ``Q`` are candidate teachers;
2. **similarity** — ``D[i, j] = KL(p_j ‖ p_i)`` between temperature-softened
   reference predictions (``T = 3``);
3. **neighbours** — ``i``'s ``K`` nearest candidates (never ``i`` itself);
4. **targets** — the neighbours' logits, averaged (or similarity-weighted);
5. **local step** — ``(1 − ρ)·CE(private batch) + ρ·KL`` towards the targets on
   a reference batch beside each private batch (``ρ = 0.9``).

Defaults are the paper's (K = 10, Q = 20, T = 3, ρ = 0.9, for 28 devices). With
``neighbour_selection="device"`` the server only relays everyone's predictions
(and quality scores); each device runs steps 2–4 itself and never reports whom
it chose, so no party holds the similarity graph.

Where we differ from the authors' code (gyed/SQMD): targets are built into a
fresh tensor (their server accumulated into a stored neighbour's logits in
place), the reference set lives on each device (their loss read a global one),
and the KD term carries Hinton's T² factor (theirs rescaled by batch sizes).
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore import log

from hetkd import protocol as P
from hetkd.distill.codec import encode_logits
from hetkd.distill.similarity import (
    NEIGHBOUR_RULES,
    SIMILARITIES,
    WEIGHTINGS,
    neighbour_plan,
    reference_quality,
)
from hetkd.strategies.logit_exchange import LogitExchange
from hetkd.training import derive_seed

__all__ = ["SDDist"]

NEIGHBOUR_SELECTIONS = ("server", "device")


class SDDist(LogitExchange):
    """SD-Dist as a Flower strategy.

    Parameters
    ----------
    num_neighbours : int
        K, teachers per device.
    num_candidates : int
        Q, devices with the best reference-set loss that may be teachers (used
        when ``reference_labels`` are given).
    neighbour_rule : str
        ``quality_distance`` (the paper), ``distance``, ``quality`` or ``random``.
    similarity : str
        ``kl`` (the paper), ``js`` or ``cosine``.
    weighting : str
        ``mean`` (the paper) or ``similarity``.
    neighbour_selection : str
        ``server`` or ``device`` (see the module docstring).
    exact_search_max : int
        Above this many candidate teachers the server searches a seeded random
        sample of ``search_sample`` of them each round (sampled neighbour
        search, linear in the population); 0 always searches exactly.
    search_sample : int
        Candidates searched per round above ``exact_search_max``.
    **kwargs
        The exchange options of :class:`~hetkd.strategies.LogitExchange`
        (``rho``, ``temperature``, ``precision``, ...) and sampling options.
    """

    def __init__(
        self,
        *,
        num_neighbours: int = 10,
        num_candidates: int = 20,
        neighbour_rule: str = "quality_distance",
        similarity: str = "kl",
        weighting: str = "mean",
        neighbour_selection: str = "server",
        exact_search_max: int = 0,
        search_sample: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if exact_search_max < 0:
            raise ValueError(f"exact_search_max must be >= 0 (0: always exact), got {exact_search_max}")
        if search_sample < 1:
            raise ValueError(f"search_sample must be >= 1, got {search_sample}")
        self.exact_search_max = exact_search_max
        self.search_sample = search_sample
        if num_neighbours < 1:
            raise ValueError(f"num_neighbours must be >= 1, got {num_neighbours}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        for name, value, choices in (
            ("neighbour_rule", neighbour_rule, NEIGHBOUR_RULES),
            ("similarity", similarity, SIMILARITIES),
            ("weighting", weighting, WEIGHTINGS),
            ("neighbour_selection", neighbour_selection, NEIGHBOUR_SELECTIONS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")
        self.num_neighbours = num_neighbours
        self.num_candidates = num_candidates
        self.neighbour_rule = neighbour_rule
        self.similarity = similarity
        self.weighting = weighting
        self.neighbour_selection = neighbour_selection
        #: device id -> its teachers' device ids, as last chosen (server selection)
        self.neighbours: dict[int, list[int]] = {}
        #: the last similarity rows: device ids of its rows, of its columns, and the matrix
        self.last_distance: tuple[list[int], list[int], torch.Tensor] | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t│\t└── K=%d Q=%d rule=%s similarity=%s weighting=%s selection=%s rho=%.2f T=%.1f",
            self.num_neighbours, self.num_candidates, self.neighbour_rule, self.similarity,
            self.weighting, self.neighbour_selection, self.rho, self.temperature)

    def quality(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Reference-set cross-entropy of each device on record (``None`` if unlabelled)."""
        if self.reference_labels is None:
            return None
        return reference_quality(logits, self.reference_labels)

    # ------------------------------------------------------------------ server-side selection

    def mixing_weights(self, server_round: int, population: list[int], logits: torch.Tensor,
                       rows: list[int]) -> torch.Tensor:
        weights, distance, neighbours = neighbour_plan(
            logits,
            rows,
            num_neighbours=self.num_neighbours,
            num_candidates=self.num_candidates,
            rule=self.neighbour_rule,
            similarity=self.similarity,
            weighting=self.weighting,
            temperature=self.temperature,
            quality=self.quality(logits),
            generator=torch.Generator().manual_seed(derive_seed(self.seed, "neighbours", server_round)),
            exact_search_max=self.exact_search_max,
            search_sample=self.search_sample,
        )
        self.last_distance = ([population[k] for k in rows], population, distance)
        distances, changed = [], []
        for a, k in enumerate(rows):
            chosen = sorted(population[j] for j in neighbours[k])
            device = population[k]
            if neighbours[k]:
                distances.append(float(distance[a, neighbours[k]].mean()))
            changed.append(self.neighbours.get(device) != chosen)
            self.neighbours[device] = chosen
            self.note_device(device, neighbours=chosen)
        self._extras["neighbour_distance_mean"] = float(np.mean(distances)) if distances else None
        self._extras["neighbour_churn"] = float(np.mean(changed)) if changed else None
        return weights

    def before_train(self, server_round: int, node_ids: list[int]) -> None:
        if self.neighbour_selection == "server":
            super().before_train(server_round, node_ids)
        else:
            self._targets, self._extras = {}, {}

    # ------------------------------------------------------------------ device-side selection

    def train_content(self, server_round: int, node_id: int, config: ConfigRecord, arrays: ArrayRecord) -> RecordDict:
        content = super().train_content(server_round, node_id, config, arrays)
        if self.neighbour_selection != "device" or not self.distilling(server_round):
            return content
        ids, logits = self.population()
        if not [d for d in ids if d != self.device_id(node_id)]:
            return content  # nobody else on record yet: local training
        config.update(
            {
                "num-neighbours": self.num_neighbours,
                "num-candidates": self.num_candidates,
                "neighbour-rule": self.neighbour_rule,
                "similarity": self.similarity,
                "weighting": self.weighting,
            }
        )
        population = ArrayRecord(
            {
                P.REFERENCE_LOGITS: Array(encode_logits(logits, self.precision)),
                P.DEVICE_IDS: Array(np.asarray(ids, dtype=np.int64)),
            }
        )
        quality = self.quality(logits)
        if quality is not None:
            population[P.QUALITY] = Array(quality.numpy().astype(np.float32))
        content[P.POPULATION] = population
        return content

    def process_train_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        super().process_train_replies(server_round, replies)
        if self.neighbour_selection == "device":
            metrics = [r.content[P.METRICS] for r in replies if "neighbour-distance" in r.content[P.METRICS]]
            if metrics:
                self._extras["neighbour_distance_mean"] = float(np.nanmean([m["neighbour-distance"] for m in metrics]))
                self._extras["neighbour_churn"] = float(np.mean([m["neighbours-changed"] for m in metrics]))
        return None

    # ------------------------------------------------------------------ artifacts

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        """``similarity.png``: the last similarity matrix (server-side selection only)."""
        if self.last_distance is None:
            return []
        from hetkd.plots import plot_matrix

        row_ids, column_ids, distance = self.last_distance
        title = f"SD-Dist {self.similarity.upper()} divergence of reference predictions (row i: D[i, j])"
        return [plot_matrix(distance.numpy(), [str(i) for i in row_ids], Path(out_dir) / "similarity.png", title,
                            column_labels=[str(j) for j in column_ids])]
