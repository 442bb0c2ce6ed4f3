"""Confidence intervals for evaluation figures: the multi-way bootstrap.

A personalisation metric is measured on a grid of identities x prompts x seeds; its uncertainty
comes from all three (other identities, other prompts and other seeds would give other numbers).
:func:`bootstrap` resamples each axis independently with replacement (the "multi-way" or
"random-effects" bootstrap: a replicate draws I identities, P prompts and S seeds and averages
the resulting sub-grid), which is the resampling the evaluation's design implies; a 1-D array is
the ordinary bootstrap. Missing cells (NaN: e.g. prompt fidelity of a prompt without modifiers)
are left out of every mean.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap(
    values, *, replicates: int = 2000, level: float = 0.95, seed: int = 0, axes: Sequence[int] | None = None
) -> dict[str, float | list[float] | int]:
    """Mean of ``values`` and its bootstrap confidence interval.

    Args:
      values: an array of any rank, e.g. ``[identities, prompts, seeds]``; NaN cells are missing.
      replicates: bootstrap replicates.
      level: confidence level (0.95: the 2.5% and 97.5% percentiles).
      seed: the resampling seed (the interval is deterministic given it).
      axes: the axes resampled (default: all); the others are averaged as they are.

    Returns:
      ``{"mean": m, "ci95": [lo, hi], "n": cells counted}`` (the key says 95 whatever ``level``
      is only when ``level == 0.95``; otherwise ``ci`` with the level).
    """
    x = np.asarray(values, np.float64)
    if x.size == 0 or np.all(np.isnan(x)):
        raise ValueError("bootstrap of an empty (or all-missing) set of values")
    axes = tuple(range(x.ndim)) if axes is None else tuple(axes)
    rng = np.random.default_rng(seed)
    means = np.empty(replicates)
    for r in range(replicates):
        sample = x
        for axis in axes:
            sample = np.take(sample, rng.integers(0, x.shape[axis], x.shape[axis]), axis=axis)
        means[r] = np.nanmean(sample) if not np.all(np.isnan(sample)) else np.nan
    lo, hi = np.nanpercentile(means, [50 * (1 - level), 50 * (1 + level)])
    key = "ci95" if abs(level - 0.95) < 1e-12 else f"ci{round(100 * level)}"
    return {"mean": float(np.nanmean(x)), key: [float(lo), float(hi)], "n": int(np.sum(~np.isnan(x)))}


def overlaps(a: dict, b: dict) -> bool:
    """Whether two :func:`bootstrap` results' 95% intervals overlap."""
    return not (a["ci95"][1] < b["ci95"][0] or b["ci95"][1] < a["ci95"][0])


def fmt(result: dict, digits: int = 3) -> str:
    """``0.512 [0.47, 0.55]``."""
    lo, hi = result["ci95"]
    return f"{result['mean']:.{digits}f} [{lo:.{digits - 1}f}, {hi:.{digits - 1}f}]"
