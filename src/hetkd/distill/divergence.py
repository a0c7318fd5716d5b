"""How far apart devices' predictions are: divergences between reference predictions.

Pure functions of tensors, the measuring half of SD-Dist's neighbour search
(:mod:`hetkd.distill.similarity` chooses with them, and re-exports them):

* :func:`pairwise_distance` — ``D[i, j]``, how far device ``j``'s softened
  predictions are from device ``i``'s: ``KL(p_j ‖ p_i)`` as in the paper (mean
  over reference samples), or Jensen-Shannon, or cosine distance. KL is one
  matrix product over the ``n × (R·C)`` prediction matrix; :func:`distance_block`
  is the same on logits already checked;
* :func:`reference_quality` — each device's cross-entropy on the labelled
  reference set (lower is better);
* :func:`mean_divergence` — each device's mean divergence from the others, the
  score of the outlier test on an unlabelled reference set
  (:func:`hetkd.distill.robust.robust_outliers`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

__all__ = ["SIMILARITIES", "check_logits", "check_reference_labels", "distance_block", "mean_divergence",
           "pairwise_distance", "reference_quality"]

SIMILARITIES = ("kl", "js", "cosine")


def check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"expected reference logits of shape (devices, samples, classes), got {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("reference logits contain NaN or infinite values")


def pairwise_distance(
    reference_logits: torch.Tensor,
    temperature: float = 3.0,
    kind: str = "kl",
    chunk: int = 256,
    rows: Sequence[int] | None = None,
    cols: Sequence[int] | None = None,
) -> torch.Tensor:
    """``D[i, j]``: divergence of device ``j``'s predictions from device ``i``'s.

    ``reference_logits`` is ``(n, R, C)``. Predictions are softened with
    ``temperature``. ``kind``:

    * ``"kl"``: ``KL(p_j ‖ p_i)`` averaged over the ``R`` reference samples (the
      paper's measure; asymmetric). Computed as ``(h_j - M[i, j]) / R`` with
      ``M = log(P) · Pᵀ`` over the flattened ``n × (R·C)`` matrices — one
      matrix product;
    * ``"js"``: Jensen-Shannon divergence (symmetric, bounded by log 2),
      ``chunk`` rows at a time;
    * ``"cosine"``: ``1 - cos`` between flattened probability vectors.

    ``rows`` / ``cols`` restrict the result to the block ``D[rows][:, cols]``
    (default: all devices), which is all a round needs when only some devices
    learn or only some may teach. Entries where a row and a column are the
    same device are zero.
    """
    check_logits(reference_logits)
    return distance_block(reference_logits, temperature, kind, chunk, rows, cols)


def distance_block(
    reference_logits: torch.Tensor,
    temperature: float,
    kind: str,
    chunk: int = 256,
    rows: Sequence[int] | None = None,
    cols: Sequence[int] | None = None,
) -> torch.Tensor:
    """:func:`pairwise_distance` on logits already checked."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind not in SIMILARITIES:
        raise ValueError(f"unknown similarity {kind!r}; valid choices: {', '.join(SIMILARITIES)}")
    n, r, _ = reference_logits.shape
    row_idx = _indices(rows, n, "rows")
    col_idx = _indices(cols, n, "cols")
    log_p = F.log_softmax(reference_logits.reshape(n, -1, reference_logits.shape[-1]).double() / temperature,
                          dim=-1).reshape(n, -1)
    every = torch.arange(n)
    lp_rows = log_p if torch.equal(row_idx, every) else log_p[row_idx]
    lp_cols = log_p if torch.equal(col_idx, every) else log_p[col_idx]
    p_cols = lp_cols.exp()
    if kind == "kl":
        cross = lp_rows @ p_cols.T  # cross[a, b] = sum p_b log p_a
        neg_entropy = (p_cols * lp_cols).sum(1)  # sum p_b log p_b
        dist = (neg_entropy[None, :] - cross) / r
    elif kind == "cosine":
        dist = 1.0 - F.normalize(lp_rows.exp(), dim=1) @ F.normalize(p_cols, dim=1).T
    else:
        p_rows = lp_rows.exp()
        dist = torch.empty(len(row_idx), len(col_idx), dtype=torch.float64)
        for start in range(0, len(row_idx), chunk):
            pi = p_rows[start : start + chunk, None, :]  # (c, 1, RC)
            m = 0.5 * (pi + p_cols[None, :, :])
            log_m = m.clamp_min(1e-300).log()
            kl_i = (pi * (lp_rows[start : start + chunk, None, :] - log_m)).sum(-1)
            kl_j = (p_cols[None, :, :] * (lp_cols[None, :, :] - log_m)).sum(-1)
            dist[start : start + chunk] = 0.5 * (kl_i + kl_j) / r
    dist = dist.clamp_min(0.0)
    dist[row_idx[:, None] == col_idx[None, :]] = 0.0
    return dist.float()


def _indices(values: Sequence[int] | None, n: int, name: str) -> torch.Tensor:
    if values is None:
        return torch.arange(n)
    idx = torch.as_tensor(list(values), dtype=torch.long)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{name} must be device indices in 0..{n - 1}, got {sorted(set(idx.tolist()))[:10]}...")
    return idx


def check_reference_labels(labels: object, num_reference: int | None, num_classes: int) -> torch.Tensor:
    """``labels`` as a ``(R,)`` integer tensor of classes in ``[0, num_classes)``, checked
    (``num_reference``: the reference set's size R, ``None`` when not yet known)."""
    tensor = torch.as_tensor(labels)
    want = num_reference if num_reference is not None else "R"
    if tensor.dim() != 1 or (num_reference is not None and len(tensor) != num_reference):
        raise ValueError(f"reference_labels must have shape ({want},), got {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"reference_labels must be integer classes, got dtype {tensor.dtype}")
    bad = ((tensor < 0) | (tensor >= num_classes)).nonzero().flatten()
    if len(bad):
        raise ValueError(f"reference_labels must be classes in [0, {num_classes}); rows {bad[:5].tolist()} hold "
                         f"{tensor[bad[:5]].tolist()}")
    return tensor.long()


def reference_quality(reference_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each device's mean cross-entropy on the labelled reference set (lower is better)."""
    check_logits(reference_logits)
    n, r, c = reference_logits.shape
    if labels.shape != (r,):
        raise ValueError(f"expected {r} reference labels, got shape {tuple(labels.shape)}")
    flat = reference_logits.reshape(n * r, c).float()
    losses = F.cross_entropy(flat, labels.repeat(n), reduction="none")
    return losses.reshape(n, r).mean(1)
def mean_divergence(reference_logits: torch.Tensor, temperature: float, kind: str = "kl",
                    max_columns: int = 0) -> torch.Tensor:
    """Each device's mean divergence ``D[i, j]`` from the others ``(n,)``; above ``max_columns``
    devices (0: no limit) from ``max_columns`` of them, evenly spaced by index."""
    check_logits(reference_logits)
    n = reference_logits.shape[0]
    cols = list(range(n)) if not max_columns or n <= max_columns else \
        torch.linspace(0, n - 1, max_columns).round().long().unique().tolist()
    block = distance_block(reference_logits, temperature, kind, cols=cols).double()
    others = (torch.arange(n)[:, None] != torch.as_tensor(cols)[None, :]).double()
    return ((block * others).sum(1) / others.sum(1).clamp_min(1.0)).float()
