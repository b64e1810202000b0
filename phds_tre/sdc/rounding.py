"""Rounding of published counts (policy ``rounding``).

* ``base5``: every count to the nearest multiple of 5, halves up (2.5 → 5,
  7 → 5, 8 → 10); 0 stays 0.
* ``midpoint6``: every non-zero count to the midpoint of its band of six,
  ``ceil(x / 6) * 6 − 3`` (1–6 → 3, 7–12 → 9), as OpenSAFELY does; 0 stays 0.

**Totals rule**: margins are rounded independently from their own unrounded
values, never summed from rounded cells, so a rounded table need not add up.
Rounding comes after suppression, which is decided on unrounded counts; a
suppressed cell stays suppressed. Pooling across sites treats a rounded count
``y`` as the interval of values that round to ``y`` (see :func:`interval`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["interval", "round_counts"]


def round_counts(counts: np.ndarray, method: str) -> np.ndarray:
    """Round an array of non-negative counts; NaN (suppressed) stays NaN."""
    x = np.asarray(counts, dtype=np.float64)
    if method == "none":
        return x.copy()
    if method == "base5":
        return np.floor(x / 5.0 + 0.5) * 5.0
    if method == "midpoint6":
        return np.where(x == 0, 0.0, np.ceil(x / 6.0) * 6.0 - 3.0)
    raise ValueError(f"unknown rounding method {method!r} (use none, base5 or midpoint6)")


def interval(published: float, method: str) -> tuple[float, float]:
    """The range of true counts that a published rounded count can stand for."""
    if method == "none":
        return (published, published)
    if method == "base5":
        return (max(0.0, published - 2.0) if published > 0 else 0.0, published + 2.0)
    if method == "midpoint6":
        if published == 0:
            return (0.0, 0.0)
        return (published - 2.0, published + 3.0)
    raise ValueError(f"unknown rounding method {method!r}")
