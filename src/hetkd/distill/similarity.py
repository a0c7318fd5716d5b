"""Who should learn from whom: similarity between devices from their reference predictions.

SD-Dist (Similarity-based Decentralized Knowledge Distillation) lets every device
find the users most similar to it from their predictions on a shared reference set
and distil from those. This module is its math, as pure functions of tensors:

* :func:`pairwise_distance`, :func:`reference_quality`, :func:`mean_divergence`
  (from :mod:`hetkd.distill.divergence`) — ``D[i, j]``, how far device ``j``'s
  softened predictions are from device ``i``'s (``KL(p_j ‖ p_i)`` as in the
  paper, Jensen-Shannon or cosine); each device's cross-entropy on the labelled
  reference set (the best ``Q`` are candidate teachers); each device's mean
  divergence from the others;
* :func:`candidate_pool` — who may teach: the best ``Q``, none of the outliers
  that :func:`~hetkd.distill.robust.robust_outliers` finds among the quality
  scores or mean divergences, which keeps a poisoning minority out;
* :func:`select_neighbours` — each device's ``K`` teachers by a rule
  (quality+distance, distance, quality, random); never itself.
* :func:`neighbour_weights` — a row-stochastic ``n × n`` matrix ``W`` (zero
  diagonal for SD-Dist) so that everyone's targets are one product ``W @ Z``
  (:func:`hetkd.distill.exchange.mix_targets`).
* :class:`NeighbourSearch` — all of it as one settings object with one
  :meth:`~NeighbourSearch.plan`, which the server, a device choosing its own
  neighbours and ``hetkd bench`` all run; K and Q follow the population.

Scale: the search (:func:`neighbour_plan`) computes only the distance rows of the devices
that need targets, against the candidate columns, in one matrix product. Above
``exact_search_max`` candidates it searches a seeded random sample of
``search_sample`` of them (a *sampled* neighbour search), so a round costs
``O(rows · search_sample · R · C)``: linear in the population instead of
quadratic. ``hetkd bench`` measures both paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hetkd.distill.divergence import (
    SIMILARITIES,
    check_logits,
    distance_block,
    mean_divergence,
    pairwise_distance,
    reference_quality,
)
from hetkd.distill.robust import OUTLIER_THRESHOLD, robust_outliers
from hetkd.settings import require, require_choice, require_types

__all__ = [
    "NeighbourSearch",
    "NeighbourPlan",
    "NEIGHBOUR_SELECTIONS",
    "SIMILARITIES",
    "check_logits",
    "NEIGHBOUR_RULES",
    "OUTLIER_TESTS",
    "WEIGHTINGS",
    "pairwise_distance",
    "reference_quality",
    "select_neighbours",
    "neighbour_weights",
    "neighbour_plan",
    "with_self_weight",
    "candidate_pool",
    "mean_divergence",
    "nearest_in_block",
    "outlier_devices",
]

NEIGHBOUR_RULES = ("quality_distance", "distance", "quality", "random")
WEIGHTINGS = ("mean", "similarity")
#: who searches for neighbours: the server, or each device from the predictions the server relays
NEIGHBOUR_SELECTIONS = ("server", "device")
#: which outlier test keeps devices out of the candidates (``auto``: quality when labelled, else divergence)
OUTLIER_TESTS = ("none", "auto", "quality", "divergence")


def candidate_pool(
    n: int, rule: str, quality: torch.Tensor | None = None, num_candidates: int | None = None,
    excluded: Sequence[int] = (),
) -> list[int]:
    """The devices that may teach under ``rule``, none of ``excluded``: the ``num_candidates``
    best by ``quality`` (best first) for the quality rules when ``quality`` is known,
    otherwise everyone (in index order)."""
    out = set(excluded)
    if rule in ("quality_distance", "quality") and quality is not None:
        q = n if num_candidates is None else max(1, min(num_candidates, n))
        return [j for j in torch.argsort(quality, stable=True).tolist() if j not in out][:q]
    return [j for j in range(n) if j not in out]


def nearest_in_block(block: torch.Tensor, rows: Sequence[int], cols: Sequence[int], k: int) -> list[list[int]]:
    """Each row's ``k`` nearest columns of a distance ``block`` (``D[rows][:, cols]``),
    never the row's own device; ties go to the lower device index.

    One stable sort per row, all rows at once: the vectorised form of
    ``sorted(cols, key=lambda j: (D[i, j], j))[:k]``.
    """
    if block.shape != (len(rows), len(cols)):
        raise ValueError(f"block has shape {tuple(block.shape)}, expected ({len(rows)}, {len(cols)})")
    if not len(rows) or not len(cols):
        return [[] for _ in rows]
    col_ids = torch.as_tensor(list(cols), dtype=torch.long)
    order = torch.argsort(col_ids)  # index order first, so the stable sort breaks ties by index
    sorted_ids = col_ids[order]
    masked = block[:, order].double().clone()
    masked[torch.as_tensor(list(rows))[:, None] == sorted_ids[None, :]] = float("inf")
    take = min(k, len(cols))
    ranked = torch.argsort(masked, dim=1, stable=True)[:, :take]
    picked = sorted_ids[ranked]
    usable = torch.isfinite(masked.gather(1, ranked))
    return [row[ok].tolist() for row, ok in zip(picked, usable)]


def select_neighbours(
    distance: torch.Tensor,
    num_neighbours: int,
    rule: str = "quality_distance",
    quality: torch.Tensor | None = None,
    num_candidates: int | None = None,
    generator: torch.Generator | None = None,
    rows: list[int] | None = None,
) -> list[list[int]]:
    """Each device's teachers (indices into the population), never itself.

    ``rule``:

    * ``"quality_distance"`` (the paper's): the ``num_candidates`` devices with
      the best ``quality`` (lowest reference loss) are candidates; each device
      takes its ``num_neighbours`` nearest candidates by ``distance[i]``;
    * ``"distance"``: the nearest ``num_neighbours`` of everyone;
    * ``"quality"``: the best candidates, whatever their distance;
    * ``"random"``: ``num_neighbours`` others at random (``generator``).

    Without ``quality`` (an unlabelled reference set), the quality rules fall
    back to treating every device as a candidate. Fewer devices than asked for
    simply gives fewer neighbours. ``rows`` limits the search to those devices
    (the others get no neighbours), e.g. to the devices sampled this round.
    """
    n = distance.shape[0]
    if distance.shape != (n, n):
        raise ValueError(f"distance must be square, got {tuple(distance.shape)}")
    _check_selection(n, num_neighbours, rule, quality)
    wanted = list(range(n)) if rows is None else sorted(set(rows))
    if any(not 0 <= i < n for i in wanted):
        raise ValueError(f"rows must be in 0..{n - 1}, got {wanted}")
    pool = candidate_pool(n, rule, quality, num_candidates)
    block = distance[wanted][:, pool] if rule in ("quality_distance", "distance") else None
    return _pick(n, wanted, pool, block, num_neighbours, rule, generator)


def _check_selection(n: int, num_neighbours: int, rule: str, quality: torch.Tensor | None) -> None:
    if num_neighbours < 1:
        raise ValueError(f"num_neighbours must be >= 1, got {num_neighbours}")
    if rule not in NEIGHBOUR_RULES:
        raise ValueError(f"unknown neighbour rule {rule!r}; valid choices: {', '.join(NEIGHBOUR_RULES)}")
    if quality is not None and quality.shape != (n,):
        raise ValueError(f"quality must have one entry per device ({n}), got {tuple(quality.shape)}")


def _pick(
    n: int,
    rows: list[int],
    pool: list[int],
    block: torch.Tensor | None,
    num_neighbours: int,
    rule: str,
    generator: torch.Generator | None,
) -> list[list[int]]:
    """The neighbour lists of all ``n`` devices (empty outside ``rows``)."""
    out: list[list[int]] = [[] for _ in range(n)]
    if rule == "random":
        for i in rows:
            others = [j for j in pool if j != i]
            pick = torch.randperm(len(others), generator=generator)[:num_neighbours].tolist()
            out[i] = sorted(others[k] for k in pick)
    elif rule == "quality":
        for i in rows:
            out[i] = [j for j in pool if j != i][:num_neighbours]
    else:
        assert block is not None
        for i, row in zip(rows, nearest_in_block(block, rows, pool, num_neighbours)):
            out[i] = row
    return out


def neighbour_weights(
    neighbours: list[list[int]],
    distance: torch.Tensor | None = None,
    weighting: str = "mean",
    rows: Sequence[int] | None = None,
    sparse: bool = False,
) -> torch.Tensor:
    """The ``n × n`` mixing matrix: row ``i`` spreads weight 1 over ``i``'s neighbours.

    ``"mean"`` gives each neighbour ``1/K`` (the paper). ``"similarity"`` gives
    ``softmax(-D[i, j] / τ)`` over the neighbours with ``τ`` the mean of those
    distances, so the scale of the divergence does not matter. A device
    without neighbours gets an all-zero row. ``distance`` is ``n × n``, or
    ``len(rows) × n`` with row ``a`` belonging to device ``rows[a]``. With
    ``sparse`` the matrix is a sparse COO tensor (``n·K`` entries instead of
    ``n²``), which :func:`~hetkd.distill.exchange.mix_targets` takes as it is.
    """
    n = len(neighbours)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid choices: {', '.join(WEIGHTINGS)}")
    position = {i: i for i in range(n)} if rows is None else {d: a for a, d in enumerate(rows)}
    if weighting == "similarity" and (distance is None or distance.shape != (len(position), n)):
        raise ValueError(f"similarity weighting needs the distance rows ({len(position)} x {n})")
    index_rows: list[int] = []
    index_cols: list[int] = []
    values: list[torch.Tensor] = []
    for i, row in enumerate(neighbours):
        if not row:
            continue
        if any(not 0 <= j < n for j in row):
            raise ValueError(f"device {i} has a neighbour outside 0..{n - 1}: {row}")
        index_rows += [i] * len(row)
        index_cols += list(row)
        if weighting == "mean":
            values.append(torch.full((len(row),), 1.0 / len(row)))
        else:
            d = distance[position[i], row].double()  # type: ignore[index]
            tau = float(d.mean()) if float(d.mean()) > 0 else 1.0
            values.append(torch.softmax(-d / tau, 0).float())
    indices = torch.tensor([index_rows, index_cols], dtype=torch.long).reshape(2, -1)
    flat = torch.cat(values) if values else torch.zeros(0)
    if sparse:
        return torch.sparse_coo_tensor(indices, flat, (n, n), check_invariants=False).coalesce()
    w = torch.zeros(n, n)
    w[indices[0], indices[1]] = flat
    return w


def neighbour_plan(
    reference_logits: torch.Tensor,
    rows: list[int],
    *,
    num_neighbours: int,
    num_candidates: int,
    rule: str,
    similarity: str,
    weighting: str,
    temperature: float,
    quality: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    exact_search_max: int = 0,
    search_sample: int = 1000,
    excluded: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """SD-Dist's whole selection step for the devices in ``rows``.

    Returns the mixing matrix ``W`` (``n × n``, sparse COO; rows outside
    ``rows`` are empty; see :func:`~hetkd.distill.exchange.row_sums`), the distances ``D`` of the devices in ``rows`` (``len(rows) × n``,
    row ``a`` is device ``rows[a]``; columns that were not searched are NaN)
    and each device's neighbour list. Only ``D[rows][:, candidates]`` is
    computed, in one matrix product.

    When more than ``exact_search_max`` devices may teach (0: no limit), the
    search runs over a random sample of ``search_sample`` of them drawn with
    ``generator`` (sampled neighbour search: linear in the population).
    Devices in ``excluded`` (the outlier test's) never teach.

    The server runs it over the population (``neighbour_selection=server``); a
    device runs it with itself as row 0 (``neighbour_selection=device``), so
    both choose neighbours by exactly the same rule.
    """
    check_logits(reference_logits)
    n = reference_logits.shape[0]
    _check_selection(n, num_neighbours, rule, quality)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid choices: {', '.join(WEIGHTINGS)}")
    if exact_search_max < 0 or search_sample < 1:
        raise ValueError(f"exact_search_max must be >= 0 and search_sample >= 1, got {exact_search_max}, {search_sample}")
    rows = list(rows)
    pool = candidate_pool(n, rule, quality, num_candidates, excluded)
    if rule in ("quality_distance", "distance") and exact_search_max and len(pool) > exact_search_max:
        keep = torch.randperm(len(pool), generator=generator)[: min(search_sample, len(pool))]
        pool = sorted(pool[k] for k in keep.tolist())
    searched = pool if rule != "random" else list(range(n))
    block = distance_block(reference_logits, temperature, similarity, rows=rows, cols=searched)
    distance = torch.full((len(rows), n), float("nan"))
    distance[:, searched] = block
    wanted = sorted(set(rows))
    position = {d: a for a, d in enumerate(rows)}
    neighbours = _pick(
        n, wanted, pool, block[[position[i] for i in wanted]] if rule != "random" else None,
        num_neighbours, rule, generator,
    )
    return neighbour_weights(neighbours, distance, weighting, rows, sparse=True), distance, neighbours


def with_self_weight(weights: torch.Tensor, self_weight: float) -> torch.Tensor:
    """The mixing matrix ``weights`` (``n × n``, dense or sparse COO, rows summing to 1 or
    empty) with every device that has teachers also learning from itself: its row becomes
    ``(1 − self_weight) · row + self_weight · e_i``. Empty rows (no teachers) stay empty."""
    if not 0.0 <= self_weight < 1.0:
        raise ValueError(f"self_weight must be in [0, 1), got {self_weight}")
    if self_weight == 0.0:
        return weights
    if weights.is_sparse:
        w = weights.coalesce()
        taught = torch.unique(w.indices()[0][w.values() > 0])
        indices = torch.cat([w.indices(), taught.repeat(2, 1)], dim=1)
        values = torch.cat([w.values() * (1.0 - self_weight), torch.full((len(taught),), self_weight, dtype=w.dtype)])
        return torch.sparse_coo_tensor(indices, values, w.shape, check_invariants=False).coalesce()
    taught = torch.nonzero(weights.sum(1) > 0).flatten()
    mixed = weights * (1.0 - self_weight)
    mixed[taught, taught] += self_weight
    return mixed


@dataclass(frozen=True)
class NeighbourPlan:
    """The outcome of one neighbour search (see :meth:`NeighbourSearch.plan`).

    ``weights``: the ``n × n`` mixing matrix (sparse COO; rows outside the
    searched ones are empty, see :func:`~hetkd.distill.exchange.row_sums`); ``distance``: the searched
    rows' distances (``len(rows) × n``, NaN where not searched);
    ``neighbours``: every device's teachers (empty outside the searched rows);
    ``outliers``: the devices the outlier test kept from teaching.
    """

    weights: torch.Tensor
    distance: torch.Tensor
    neighbours: list[list[int]]
    outliers: list[int] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class NeighbourSearch:
    """SD-Dist's neighbour search: whom each device learns from.

    Each device distils from K teachers chosen by ``neighbour_rule`` among the
    Q candidates with the best reference-set loss (when the reference set is
    labelled), by ``similarity`` of softened reference predictions; targets
    are the neighbours' mean (``weighting=mean``) or a similarity-weighted mix.

    K and Q follow the devices on record, so one setting serves 4 devices and
    1,000: with ``n`` devices, ``Q = min(num_candidates, round(candidate_fraction · n))``
    and ``K = min(num_neighbours, round(neighbour_fraction · n))`` (at least 1
    each). For the default 10 devices that is the K = 5, Q = 7 every result in
    ``docs/results`` was measured with; in a federation of 4 it is K = 2,
    Q = 3, so the choice still filters. The paper used K = 10, Q = 20 for 28
    devices (:meth:`paper`).

    ``neighbour_selection`` says who searches: the ``server``, or each
    ``device`` from the predictions the server relays (then no party holds the
    similarity graph). Up to ``exact_search_max`` candidates the search is
    exact (one matrix product over the learners' rows and the candidates'
    columns); above that each round searches a seeded random sample of
    ``search_sample`` candidates (linear in the population). With the quality
    rules the candidates are at most Q, so only ``distance`` / ``random``
    rules or an unlabelled reference set reach the limit.

    Against a poisoning minority, ``outlier_test`` keeps outliers out of the
    candidates before the Q best are taken: ``quality`` drops a device whose
    reference-set loss is above ``median + outlier_threshold · 1.4826 · MAD``
    of the devices on record (:func:`~hetkd.distill.robust.robust_outliers`;
    needs a labelled reference set), ``divergence`` one whose mean divergence
    from the others (:func:`mean_divergence`, from at most ``search_sample``
    of them) is, ``auto`` (the default) the former when the reference set is
    labelled and the latter when not, ``none`` nobody. On by default: in the
    clean 10-device runs of ``docs/results`` it excluded no candidate that
    the quality ranking kept, so every published figure is unchanged.

    ``self_weight``: the share of a device's own predictions in its targets
    (:func:`with_self_weight`; 0, the paper's: its neighbours' alone). With
    private answers at ``rho = 1`` (``answer_model=private``) a device's own
    model reads no private data, and this is how what its private model knows
    of the device's own classes still reaches it: a larger share buys
    personalised accuracy at the cost of global accuracy.
    """

    num_neighbours: int = 5
    num_candidates: int = 7
    neighbour_fraction: float = 0.5
    candidate_fraction: float = 0.7
    neighbour_rule: str = "quality_distance"
    similarity: str = "kl"
    weighting: str = "mean"
    neighbour_selection: str = "server"
    exact_search_max: int = 2000
    search_sample: int = 1000
    outlier_test: str = "auto"
    outlier_threshold: float = OUTLIER_THRESHOLD
    self_weight: float = 0.0

    def __post_init__(self) -> None:
        require_types(self)
        require(self.num_neighbours >= 1, "num_neighbours", f"must be >= 1, got {self.num_neighbours}")
        require(self.num_candidates >= 1, "num_candidates", f"must be >= 1, got {self.num_candidates}")
        for key in ("neighbour_fraction", "candidate_fraction"):
            value = getattr(self, key)
            require(0.0 < value <= 1.0, key, f"must be in (0, 1], got {value}")
        require_choice(self.neighbour_rule, "neighbour_rule", NEIGHBOUR_RULES)
        require_choice(self.similarity, "similarity", SIMILARITIES)
        require_choice(self.weighting, "weighting", WEIGHTINGS)
        require_choice(self.neighbour_selection, "neighbour_selection", NEIGHBOUR_SELECTIONS)
        require(self.exact_search_max >= 0, "exact_search_max",
                f"must be >= 0 (0: always exact), got {self.exact_search_max}")
        require(self.search_sample >= 1, "search_sample", f"must be >= 1, got {self.search_sample}")
        require_choice(self.outlier_test, "outlier_test", OUTLIER_TESTS)
        require(self.outlier_threshold > 0, "outlier_threshold", f"must be > 0, got {self.outlier_threshold}")
        require(0.0 <= self.self_weight < 1.0, "self_weight", f"must be in [0, 1), got {self.self_weight}")

    @classmethod
    def paper(cls) -> NeighbourSearch:
        """The SD-Dist paper's search: K = 10 teachers among the Q = 20 best, whatever the population."""
        return cls(num_neighbours=10, num_candidates=20, neighbour_fraction=1.0, candidate_fraction=1.0)

    def sizes(self, population: int) -> tuple[int, int]:
        """``(K, Q)`` for ``population`` devices on record (see the class docstring)."""
        if population < 1:
            raise ValueError(f"the population must hold at least one device, got {population}")

        def share(fraction: float) -> int:
            return max(1, math.floor(fraction * population + 0.5))

        return (min(self.num_neighbours, share(self.neighbour_fraction)),
                min(self.num_candidates, share(self.candidate_fraction)))

    def plan(
        self,
        reference_logits: torch.Tensor,
        rows: Sequence[int],
        *,
        temperature: float,
        quality: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> NeighbourPlan:
        """The search for the devices in ``rows`` of the population ``reference_logits``
        (``(n, R, C)``), predictions softened at ``temperature``. The server runs it over
        the population; a device runs it with itself as row 0, so both choose by the
        same rule."""
        k, q = self.sizes(reference_logits.shape[0])
        outliers = self.outliers(reference_logits, temperature=temperature, quality=quality)
        weights, distance, neighbours = neighbour_plan(
            reference_logits, list(rows), num_neighbours=k, num_candidates=q, rule=self.neighbour_rule,
            similarity=self.similarity, weighting=self.weighting, temperature=temperature, quality=quality,
            generator=generator, exact_search_max=self.exact_search_max, search_sample=self.search_sample,
            excluded=outliers,
        )
        return NeighbourPlan(with_self_weight(weights, self.self_weight), distance, neighbours, outliers)

    def outliers(self, reference_logits: torch.Tensor, *, temperature: float,
                 quality: torch.Tensor | None = None) -> list[int]:
        """The devices ``outlier_test`` keeps from teaching (indices into the population)."""
        return outlier_devices(reference_logits, temperature=temperature, test=self.outlier_test,
                               threshold=self.outlier_threshold, quality=quality, similarity=self.similarity,
                               max_columns=self.search_sample)


def outlier_devices(
    reference_logits: torch.Tensor,
    *,
    temperature: float,
    test: str = "auto",
    threshold: float = OUTLIER_THRESHOLD,
    quality: torch.Tensor | None = None,
    similarity: str = "kl",
    max_columns: int = 0,
) -> list[int]:
    """The devices (rows of ``reference_logits`` ``(n, R, C)``) an outlier ``test`` flags.

    ``quality``: those whose reference-set loss ``quality`` ``(n,)`` lies above
    ``median + threshold · 1.4826 · MAD`` (:func:`~hetkd.distill.robust.robust_outliers`);
    ``divergence``: those whose mean divergence from the others
    (:func:`mean_divergence` at ``temperature``, from at most ``max_columns``
    of them) does; ``auto``: ``quality`` when it is known, else ``divergence``;
    ``none``: nobody. A poisoner that is confidently wrong is far from both the
    labels and the honest majority.
    """
    if test not in OUTLIER_TESTS:
        raise ValueError(f"unknown outlier test {test!r}; valid choices: {', '.join(OUTLIER_TESTS)}")
    if test == "auto":
        test = "quality" if quality is not None else "divergence"
    if test == "none" or (test == "quality" and quality is None):
        return []
    scores = quality if test == "quality" else mean_divergence(reference_logits, temperature, similarity, max_columns)
    assert scores is not None
    return torch.nonzero(robust_outliers(scores, threshold)).flatten().tolist()
