"""Robust statistics against a poisoning minority: an outlier test and robust aggregates.

Pure functions of tensors, shared by SD-Dist's neighbour search
(:class:`~hetkd.distill.similarity.NeighbourSearch`: who may teach), FedMD's
consensus (:func:`~hetkd.distill.exchange.robust_targets`) and the ensembles of
FedDF and MEKD (:func:`~hetkd.distill.ensemble.ensemble_responses`):

* :func:`robust_outliers` — which scores lie above ``median + t · 1.4826 · MAD``
  (the MAD scaled to a normal's standard deviation), the scores being each
  device's reference-set loss or its mean divergence from the others;
* :func:`robust_aggregate` — the coordinate-wise ``mean``, ``median`` or
  ``trimmed_mean`` of several teachers' values;
* :func:`robust_probabilities` — the same over probability rows, renormalised.

A coordinate-wise median or trimmed mean ignores how many teachers push a
coordinate far from the others, as long as they are a minority (fewer than
half for the median, at most ``trim_fraction`` of them for the trimmed mean);
the plain mean moves by ``1/n`` of whatever each of them sends.
"""

from __future__ import annotations

import math

import torch

__all__ = ["AGGREGATES", "COORDINATE_AGGREGATES", "MAD_SCALE", "MEAN_AD_SCALE", "OUTLIER_THRESHOLD",
           "robust_aggregate", "robust_outliers", "robust_probabilities", "screened_weights"]

#: how teachers' values combine: the plain mean (published behaviour), or robust to a poisoning
#: minority: the coordinate-wise median or trimmed mean, or the mean of the teachers an outlier
#: test keeps (``screened_mean``: :func:`screened_weights`)
AGGREGATES = ("mean", "median", "trimmed_mean", "screened_mean")
#: the aggregates :func:`robust_aggregate` computes coordinate by coordinate
COORDINATE_AGGREGATES = ("mean", "median", "trimmed_mean")
#: how many robust standard deviations above the median make a score an outlier (the default of every outlier test)
OUTLIER_THRESHOLD = 3.0
#: 1 / Φ⁻¹(3/4): the MAD times this estimates a normal's standard deviation
MAD_SCALE = 1.4826
#: sqrt(π/2): the mean absolute deviation times this estimates a normal's standard deviation
MEAN_AD_SCALE = math.sqrt(math.pi / 2)


def robust_outliers(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which of ``scores`` ``(n,)`` (higher is worse) are outliers: above
    ``median + threshold · 1.4826 · MAD`` of the finite scores.

    A non-finite score is always an outlier. When more than half the scores are
    equal (MAD 0), the mean absolute deviation from the median (times
    ``sqrt(π/2)``) stands in, as in the modified z-score; when that is 0 too, or
    there are fewer than 3 finite scores, no finite score is an outlier.
    Returns a boolean mask ``(n,)``.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (one per device), got shape {tuple(scores.shape)}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    s = scores.double()
    finite = torch.isfinite(s)
    out = ~finite
    kept = s[finite]
    if len(kept) < 3:
        return out
    median = _median(kept)
    deviation = (kept - median).abs()
    spread = MAD_SCALE * _median(deviation)
    if spread <= 0:
        spread = MEAN_AD_SCALE * deviation.mean()
    if spread <= 0:
        return out
    return out | (finite & (s > median + threshold * spread))


def _median(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The median along ``dim``; the mean of the two middle values for an even count."""
    n = values.shape[dim]
    ordered = values.sort(dim=dim).values
    upper = ordered.narrow(dim, n // 2, 1)
    if n % 2:
        return upper.squeeze(dim)
    return 0.5 * (upper + ordered.narrow(dim, n // 2 - 1, 1)).squeeze(dim)


def robust_aggregate(values: torch.Tensor, method: str = "mean", trim_fraction: float = 0.2) -> torch.Tensor:
    """The coordinate-wise aggregate of ``n`` teachers' ``values`` ``(n, ...)`` over the first axis.

    ``mean``: the plain mean. ``median``: the median (the mean of the two
    middle values for even ``n``). ``trimmed_mean``: the mean after dropping
    the ``floor(trim_fraction · n)`` lowest and highest values of every
    coordinate (at least one value is kept).
    """
    if method not in COORDINATE_AGGREGATES:
        raise ValueError(f"unknown coordinate-wise aggregate {method!r}; valid choices: {', '.join(COORDINATE_AGGREGATES)}")
    if values.dim() < 1 or values.shape[0] == 0:
        raise ValueError(f"values must be (teachers, ...) with at least one teacher, got {tuple(values.shape)}")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    if method == "mean":
        return values.mean(0)
    if method == "median":
        return _median(values)
    n = values.shape[0]
    cut = min(math.floor(trim_fraction * n), (n - 1) // 2)
    return values.sort(dim=0).values[cut : n - cut].mean(0)


def robust_probabilities(probabilities: torch.Tensor, method: str = "mean", trim_fraction: float = 0.2) -> torch.Tensor:
    """:func:`robust_aggregate` of ``n`` teachers' probability rows ``(n, ..., C)``, renormalised so that
    every row sums to 1 (a median of distributions is not one). A row whose aggregate is all
    zero (every class voted down) falls back to the plain mean's row."""
    p = probabilities.double()
    agg = robust_aggregate(p, method, trim_fraction).clamp_min(0.0)
    total = agg.sum(-1, keepdim=True)
    mean = p.mean(0)
    out = torch.where(total > 0, agg / total.clamp_min(1e-300), mean / mean.sum(-1, keepdim=True).clamp_min(1e-300))
    return out.to(probabilities.dtype)


def screened_weights(weights: torch.Tensor, outliers: list[int]) -> torch.Tensor:
    """A dense copy of the mixing matrix ``weights`` ``(m, n)`` without the teachers ``outliers``
    (their columns zeroed), each row rescaled to its former sum; a row left without
    teachers is all zero. The mean of what is left is the ``screened_mean`` aggregate."""
    dense = (weights.to_dense() if weights.is_sparse else weights).double()
    if dense.dim() != 2:
        raise ValueError(f"weights must be an (m, n) matrix, got shape {tuple(dense.shape)}")
    bad = [j for j in outliers if not 0 <= j < dense.shape[1]]
    if bad:
        raise ValueError(f"outliers must be column indices in 0..{dense.shape[1] - 1}, got {bad}")
    kept = dense.clone()
    kept[:, list(outliers)] = 0.0
    before, after = dense.sum(1, keepdim=True), kept.sum(1, keepdim=True)
    return torch.where(after > 0, kept * before / after.clamp_min(1e-300), torch.zeros_like(kept)).to(weights.dtype)
