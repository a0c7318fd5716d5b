"""Who should learn from whom: similarity between devices from their reference predictions.

SD-Dist (Similarity-based Decentralized Knowledge Distillation) lets every device
find the users most similar to it from their predictions on a shared reference set
and distil from those. This module is its math, as pure functions of tensors:

* :func:`pairwise_distance` — ``D[i, j]``, how far device ``j``'s softened
  predictions are from device ``i``'s: ``KL(p_j ‖ p_i)`` as in the paper (mean
  over reference samples), or Jensen-Shannon, or cosine distance. KL is one
  matrix product over the ``n × (R·C)`` prediction matrix.
* :func:`reference_quality` — each device's cross-entropy on the labelled
  reference set (lower is better); the best ``Q`` are candidate teachers.
* :func:`select_neighbours` — each device's ``K`` teachers by a rule
  (quality+distance, distance, quality, random); never itself.
* :func:`neighbour_weights` — a row-stochastic ``n × n`` matrix ``W`` (zero
  diagonal for SD-Dist) so that everyone's targets are one product ``W @ Z``.
* :func:`mix_targets` — that product, on logits.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = [
    "SIMILARITIES",
    "NEIGHBOUR_RULES",
    "WEIGHTINGS",
    "MIX_SPACES",
    "pairwise_distance",
    "reference_quality",
    "select_neighbours",
    "neighbour_weights",
    "mix_targets",
    "uniform_weights",
    "neighbour_plan",
]

SIMILARITIES = ("kl", "js", "cosine")
NEIGHBOUR_RULES = ("quality_distance", "distance", "quality", "random")
WEIGHTINGS = ("mean", "similarity")
MIX_SPACES = ("logits", "probs")


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"expected reference logits of shape (devices, samples, classes), got {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("reference logits contain NaN or infinite values")


def pairwise_distance(
    reference_logits: torch.Tensor, temperature: float = 3.0, kind: str = "kl", chunk: int = 256
) -> torch.Tensor:
    """``D[i, j]``: divergence of device ``j``'s predictions from device ``i``'s.

    ``reference_logits`` is ``(n, R, C)``. Predictions are softened with
    ``temperature``. ``kind``:

    * ``"kl"``: ``KL(p_j ‖ p_i)`` averaged over the ``R`` reference samples (the
      paper's measure; asymmetric). Computed as ``(h_j - M[j, i]) / R`` with
      ``M = P · log(P)ᵀ`` over the flattened ``n × (R·C)`` matrices;
    * ``"js"``: Jensen-Shannon divergence (symmetric, bounded by log 2);
    * ``"cosine"``: ``1 - cos`` between flattened probability vectors.

    The diagonal is zero.
    """
    _check_logits(reference_logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, r, _ = reference_logits.shape
    log_p = F.log_softmax(reference_logits.double() / temperature, dim=-1).reshape(n, -1)
    p = log_p.exp()
    if kind == "kl":
        cross = p @ log_p.T  # cross[j, i] = sum p_j log p_i
        neg_entropy = cross.diagonal()
        dist = (neg_entropy[None, :] - cross.T) / r
    elif kind == "cosine":
        unit = F.normalize(p, dim=1)
        dist = 1.0 - unit @ unit.T
    elif kind == "js":
        dist = torch.empty(n, n, dtype=torch.float64)
        for start in range(0, n, chunk):
            pi = p[start : start + chunk, None, :]  # (c, 1, RC)
            m = 0.5 * (pi + p[None, :, :])
            log_m = m.clamp_min(1e-300).log()
            kl_i = (pi * (log_p[start : start + chunk, None, :] - log_m)).sum(-1)
            kl_j = (p[None, :, :] * (log_p[None, :, :] - log_m)).sum(-1)
            dist[start : start + chunk] = 0.5 * (kl_i + kl_j) / r
    else:
        raise ValueError(f"unknown similarity {kind!r}; valid choices: {', '.join(SIMILARITIES)}")
    dist = dist.clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    return dist.float()


def reference_quality(reference_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each device's mean cross-entropy on the labelled reference set (lower is better)."""
    _check_logits(reference_logits)
    n, r, c = reference_logits.shape
    if labels.shape != (r,):
        raise ValueError(f"expected {r} reference labels, got shape {tuple(labels.shape)}")
    flat = reference_logits.reshape(n * r, c).float()
    losses = F.cross_entropy(flat, labels.repeat(n), reduction="none")
    return losses.reshape(n, r).mean(1)


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
    if num_neighbours < 1:
        raise ValueError(f"num_neighbours must be >= 1, got {num_neighbours}")
    if rule not in NEIGHBOUR_RULES:
        raise ValueError(f"unknown neighbour rule {rule!r}; valid choices: {', '.join(NEIGHBOUR_RULES)}")
    if quality is not None and quality.shape != (n,):
        raise ValueError(f"quality must have one entry per device ({n}), got {tuple(quality.shape)}")
    if rule in ("quality_distance", "quality") and quality is not None:
        q = n if num_candidates is None else max(1, min(num_candidates, n))
        order = torch.argsort(quality, stable=True)
        candidates = order[: q].tolist()
    else:
        candidates = list(range(n))
    wanted = set(range(n)) if rows is None else set(rows)
    if any(not 0 <= i < n for i in wanted):
        raise ValueError(f"rows must be in 0..{n - 1}, got {sorted(wanted)}")
    out: list[list[int]] = []
    for i in range(n):
        if i not in wanted:
            out.append([])
            continue
        pool = [j for j in candidates if j != i]
        if rule == "random":
            pool = [j for j in range(n) if j != i]
            pick = torch.randperm(len(pool), generator=generator)[:num_neighbours].tolist()
            out.append(sorted(pool[k] for k in pick))
        elif rule == "quality":
            out.append(pool[:num_neighbours])
        else:
            ranked = sorted(pool, key=lambda j: (float(distance[i, j]), j))
            out.append(ranked[:num_neighbours])
    return out


def neighbour_weights(
    neighbours: list[list[int]], distance: torch.Tensor | None = None, weighting: str = "mean"
) -> torch.Tensor:
    """The ``n × n`` mixing matrix: row ``i`` spreads weight 1 over ``i``'s neighbours.

    ``"mean"`` gives each neighbour ``1/K`` (the paper). ``"similarity"`` gives
    ``softmax(-D[i, j] / τ)`` over the neighbours with ``τ`` the mean of those
    distances, so the scale of the divergence does not matter. A device
    without neighbours gets an all-zero row.
    """
    n = len(neighbours)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid choices: {', '.join(WEIGHTINGS)}")
    if weighting == "similarity" and (distance is None or distance.shape != (n, n)):
        raise ValueError("similarity weighting needs the n x n distance matrix")
    w = torch.zeros(n, n)
    for i, row in enumerate(neighbours):
        if not row:
            continue
        if any(not 0 <= j < n for j in row):
            raise ValueError(f"device {i} has a neighbour outside 0..{n - 1}: {row}")
        if weighting == "mean":
            w[i, row] = 1.0 / len(row)
        else:
            d = distance[i, row].double()  # type: ignore[index]
            tau = float(d.mean()) if float(d.mean()) > 0 else 1.0
            w[i, row] = torch.softmax(-d / tau, 0).float()
    return w


def uniform_weights(n: int, include_self: bool = True) -> torch.Tensor:
    """Everyone learns from the plain average of all devices (FedMD's consensus)."""
    if n < 1:
        raise ValueError(f"need at least one device, got {n}")
    if include_self or n == 1:
        return torch.full((n, n), 1.0 / n)
    w = torch.full((n, n), 1.0 / (n - 1))
    w.fill_diagonal_(0.0)
    return w


def mix_targets(
    weights: torch.Tensor, reference_logits: torch.Tensor, space: str = "logits", temperature: float = 1.0
) -> torch.Tensor:
    """Targets ``(m, R, C)`` from an ``m × n`` mixing matrix ``W`` over ``n`` devices' logits.

    * ``space="logits"`` (the paper): ``T_i = Σ_j W[i, j] · Z_j``, a weighted
      mean of logits — a geometric-mean ensemble of the distributions;
    * ``space="probs"``: the weighted mean of the softened distributions,
      ``q_i = Σ_j W[i, j] · softmax(Z_j / T)``, returned as logits
      ``T · log q_i`` so that ``softmax(target / T) = q_i`` exactly. Under
      label skew, where a device puts almost no mass on classes it never saw,
      this arithmetic mean keeps the classes that only some teachers know.

    A fresh tensor is returned (stored predictions are never modified).
    """
    _check_logits(reference_logits)
    n = reference_logits.shape[0]
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must have {n} columns (one per device), got shape {tuple(weights.shape)}")
    out_shape = (weights.shape[0], *reference_logits.shape[1:])
    rows = weights.sum(1)
    if ((rows > 0) & ((rows - 1.0).abs() > 1e-4)).any():
        raise ValueError(f"each non-empty row of the weights must sum to 1, got row sums {rows.tolist()}")
    w = weights.double()
    if space == "logits":
        return (w @ reference_logits.reshape(n, -1).double()).reshape(out_shape).float()
    if space == "probs":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        probs = F.softmax(reference_logits.double() / temperature, dim=-1).reshape(n, -1)
        mixed = (w @ probs).reshape(out_shape)
        return (temperature * mixed.clamp_min(1e-12).log()).float()
    raise ValueError(f"unknown mixing space {space!r}; valid choices: {', '.join(MIX_SPACES)}")


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
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """SD-Dist's whole selection step for the devices in ``rows``.

    Returns the mixing matrix ``W`` (rows outside ``rows`` are zero), the
    distance matrix ``D`` and each device's neighbour list. The server runs it
    over the population (``neighbour_selection=server``); a device runs it
    with itself as row 0 (``neighbour_selection=device``), so both choose
    neighbours by exactly the same rule.
    """
    distance = pairwise_distance(reference_logits, temperature, similarity)
    neighbours = select_neighbours(
        distance, num_neighbours, rule, quality, num_candidates, generator, rows=rows
    )
    return neighbour_weights(neighbours, distance, weighting), distance, neighbours
