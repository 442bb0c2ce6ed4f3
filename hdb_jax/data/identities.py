"""Sources of many identities with several views each: what stages 1-2 of HyperDreamBooth read.

An identity source has ``identities`` (hashable ids, in order) and ``views(identity)`` returning
uint8 ``[V, H, W, 3]`` images of that identity; ``source_name(identity)`` says where the images
came from (it goes into the pre-optimised weights index). :func:`from_config` builds one from a
``data`` config section.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from hdb_jax.data import synthetic


@dataclasses.dataclass(frozen=True)
class SyntheticIdentities:
    """Renders ``0 .. views - 1`` of synthetic identities (varied pose, light and background)."""

    ids: tuple[int, ...]
    views_per_identity: int
    resolution: int
    seed: int = 0
    style: str = "photo"

    @property
    def identities(self) -> tuple[int, ...]:
        return self.ids

    def views(self, identity: int, indices: Sequence[int] | None = None) -> np.ndarray:
        """uint8 ``[V, H, W, 3]``: renders ``indices`` (default ``0 .. views - 1``) of ``identity``."""
        indices = list(range(self.views_per_identity)) if indices is None else list(indices)
        return synthetic.render_batch([identity] * len(indices), indices, [self.style] * len(indices), self.seed,
                                      self.resolution)

    def source_name(self, identity: int) -> str:
        return f"synthetic:{identity}"


def from_config(data: Any, resolution: int, identities: Sequence[Any] | None = None):
    """The identity source a ``data`` config section names (``source="synthetic"``).

    Args:
      data: the section (``source``, ``identities``, ``images_per_identity``, ``seed``).
      resolution: image side in pixels.
      identities: use these identities instead of ``data.identities`` (e.g. those of a
        pre-optimised weights dataset).
    """
    ids = data["identities"] if identities is None else identities
    if data["source"] == "synthetic":
        return SyntheticIdentities(tuple(int(i) for i in ids), int(data["images_per_identity"]), resolution,
                                   int(data["seed"]))
    raise ValueError(f"config.data.source={data['source']!r}: choose 'synthetic'")
