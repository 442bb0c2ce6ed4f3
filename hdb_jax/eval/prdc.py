"""Improved precision and recall of generative models (Kynkäänniemi et al., NeurIPS 2019).

Each set of feature vectors defines a manifold estimate: the union of balls around its points,
each ball's radius the distance to that point's k-th nearest neighbour within its own set.
*Precision* is the fraction of generated samples inside the real manifold (are samples
realistic?); *recall* the fraction of real samples inside the generated manifold (is the real
variety covered?).
"""

from __future__ import annotations

import numpy as np


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[len(a), len(b)]`` (float64)."""
    sq = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"k={k} needs more than {k} points, got {len(features)}")
    d = _distances(features, features)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def coverage_of(points: np.ndarray, manifold: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """``[len(points)]`` bool: inside at least one ball of ``manifold`` (radius ``radii``)."""
    return np.any(_distances(points, manifold) <= radii[None, :], axis=1)


def precision_recall(
    real: np.ndarray, generated: np.ndarray, k: int = 3, real_radii: np.ndarray | None = None
) -> dict[str, float]:
    """k-NN precision and recall of ``generated`` against ``real`` features ``[N, D]``.

    ``real_radii`` (``knn_radii(real, k)``, when the same real set scores many generated sets)
    skips recomputing the real manifold.

    Returns:
      ``{"precision", "recall", "k", "real", "generated"}``.
    """
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    radii = knn_radii(real, k) if real_radii is None else np.asarray(real_radii)
    if radii.shape != (len(real),):
        raise ValueError(f"real_radii has shape {radii.shape}; the real set has {len(real)} points")
    precision = coverage_of(generated, real, radii).mean()
    recall = coverage_of(real, generated, knn_radii(generated, k)).mean()
    return {
        "precision": float(precision),
        "recall": float(recall),
        "k": k,
        "real": len(real),
        "generated": len(generated),
    }
