"""Reference predictions on the wire: normalised logits at a chosen precision.

Devices send their predictions as log-probabilities (``log_softmax`` of the
logits). That loses nothing a distillation target needs: a softmax is blind to
a constant shift per sample, so mixing log-probabilities mixes the same
distributions as mixing raw logits, at any temperature. It also bounds the
values, which makes compact encodings safe:

* ``float32`` — 4 bytes per value,
* ``float16`` — 2 bytes,
* ``uint8``   — 1 byte: log-probabilities clipped to ``[-32, 0]`` and quantised
  to 256 levels (step 1/8, so at most 1/16 off; probabilities below
  e^-32 ≈ 1e-14 become e^-32, which even at T = 3 is ~2e-5 per class).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["PRECISIONS", "encode_logits", "decode_logits", "encode_answers", "decode_answers", "LOGPROB_FLOOR"]

PRECISIONS = ("float32", "float16", "uint8")
LOGPROB_FLOOR = -32.0


def encode_logits(logits: torch.Tensor, precision: str = "float32") -> np.ndarray:
    """Normalise ``logits`` (last axis = classes) and encode them at ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
    log_p = F.log_softmax(logits.detach().float(), dim=-1).cpu()
    if precision == "float32":
        return log_p.numpy().astype(np.float32)
    if precision == "float16":
        return log_p.clamp_min(-60000.0).numpy().astype(np.float16)
    q = (log_p.clamp(LOGPROB_FLOOR, 0.0) / LOGPROB_FLOOR * 255.0).round()
    return q.numpy().astype(np.uint8)


def decode_logits(encoded: np.ndarray) -> torch.Tensor:
    """Float32 log-probabilities from what :func:`encode_logits` produced."""
    if encoded.dtype == np.uint8:
        return torch.from_numpy(encoded.astype(np.float32) / 255.0 * LOGPROB_FLOOR)
    if encoded.dtype in (np.float16, np.float32, np.float64):
        return torch.from_numpy(np.ascontiguousarray(encoded, dtype=np.float32))
    raise ValueError(f"cannot decode reference predictions of dtype {encoded.dtype}")


def encode_answers(logits: torch.Tensor, kind: str, precision: str = "float32") -> np.ndarray:
    """A black-box answer to queries, as it goes on the wire.

    ``kind="hard"``: the predicted class of each query and nothing else, a
    1-D integer array (``uint8`` up to 256 classes), so a hard answer cannot
    carry soft information. ``"soft"`` and ``"logits"``: the log-probabilities
    (:func:`encode_logits`, at ``precision``).
    """
    if logits.dim() != 2:
        raise ValueError(f"answers are encoded from (N, C) logits, got shape {tuple(logits.shape)}")
    if kind == "hard":
        labels = logits.argmax(-1).cpu().numpy()
        return labels.astype(np.uint8 if logits.shape[1] <= 256 else np.int32)
    if kind not in ("soft", "logits"):
        raise ValueError(f"unknown answer kind {kind!r}; valid choices: logits, soft, hard")
    return encode_logits(logits, precision)


def decode_answers(encoded: np.ndarray, kind: str, num_classes: int) -> torch.Tensor:
    """The ``(N, C)`` responses :func:`encode_answers` stood for: probabilities
    (``soft``), one-hot rows (``hard``) or log-probabilities (``logits``).
    Raises ``ValueError`` on a shape, dtype or class index that does not fit."""
    if kind == "hard":
        if encoded.ndim != 1 or encoded.dtype.kind not in "iu":
            raise ValueError(f"hard answers must be a 1-D array of class indices, got {encoded.dtype} {encoded.shape}")
        labels = torch.from_numpy(encoded.astype(np.int64))
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"hard answers hold class indices outside 0..{num_classes - 1}")
        return F.one_hot(labels, num_classes).float()
    if kind not in ("soft", "logits"):
        raise ValueError(f"unknown answer kind {kind!r}; valid choices: logits, soft, hard")
    if encoded.ndim != 2 or encoded.shape[1] != num_classes:
        raise ValueError(f"{kind} answers must have shape (N, {num_classes}), got {encoded.shape}")
    log_p = decode_logits(encoded)
    if not torch.isfinite(log_p).all():
        raise ValueError(f"{kind} answers contain NaN or infinite values")
    return log_p.softmax(-1) if kind == "soft" else log_p  # renormalised after quantisation
