"""Sources of many identities with several views each: what stages 1-2 of HyperDreamBooth read.

An identity source has ``identities`` (hashable ids, in order) and ``views(identity)`` returning
uint8 ``[V, H, W, 3]`` images of that identity; ``source_name(identity)`` says where the images
came from (it goes into the pre-optimised weights index). :func:`from_config` builds one from a
``data`` config section.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from hdb_jax.data import folder as folder_lib
from hdb_jax.toy import synthetic


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
        return synthetic.render_batch(
            [identity] * len(indices), indices, [self.style] * len(indices), self.seed, self.resolution
        )

    def source_name(self, identity: int) -> str:
        return f"synthetic:{identity}"


@dataclasses.dataclass(frozen=True)
class ArrayIdentities:
    """Identities whose views are given as arrays (e.g. one reference photo each)."""

    images: Mapping[Any, np.ndarray]  # identity -> uint8 [V, H, W, 3]

    @property
    def identities(self) -> tuple:
        return tuple(self.images)

    @property
    def views_per_identity(self) -> int:
        return min(len(v) for v in self.images.values())

    def views(self, identity, indices: Sequence[int] | None = None) -> np.ndarray:
        """uint8 ``[V, H, W, 3]``; indices wrap around the identity's own number of views."""
        views = self.images[identity]
        return views if indices is None else views[[i % len(views) for i in indices]]

    def source_name(self, identity) -> str:
        return f"array:{identity}"


class FolderIdentities:
    """A folder of identities: one sub-folder per identity, each holding its photos.

    Every file is decoded once, up front, with :class:`hdb_jax.data.folder.ImageFolder`'s
    handling (EXIF rotation, odd layouts, centre crop): bad files are skipped and listed in one
    warning; identities left with fewer than ``min_views`` usable photos are skipped too (named in
    the warning). Identities are the sub-folder names, sorted.

    Args:
      directory: the folder of sub-folders.
      resolution: side of the square images.
      min_views: the fewest usable photos an identity needs.
      min_size: smallest accepted short side of a photo.
    """

    def __init__(
        self, directory: str, resolution: int, *, min_views: int = 1, min_size: int = folder_lib.MIN_SIZE
    ):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"identities folder not found: {directory!r}")
        self.directory, self._views, self.skipped = directory, {}, []
        names = sorted(
            n
            for n in os.listdir(directory)
            if not n.startswith(".") and os.path.isdir(os.path.join(directory, n))
        )
        for name in names:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", folder_lib.BadImagesWarning)
                try:
                    photos = folder_lib.ImageFolder(
                        os.path.join(directory, name), resolution=resolution, min_size=min_size
                    )
                except folder_lib.NoImagesError as err:
                    self.skipped.append((name, str(err)))
                    continue
            self.skipped += [(name, str(w.message)) for w in caught]
            if len(photos) < min_views:
                self.skipped.append((name, f"{len(photos)} usable photos, fewer than {min_views}"))
                continue
            self._views[name] = np.stack([photos[i]["image"] for i in range(len(photos))])
        if self.skipped:
            warnings.warn(
                folder_lib.BadImagesWarning(
                    f"{directory!r}: " + "; ".join(f"{n}: {why}" for n, why in self.skipped)
                ),
                stacklevel=2,
            )
        if not self._views:
            raise folder_lib.NoImagesError(f"no usable identity sub-folders in {directory!r}")

    @property
    def identities(self) -> tuple[str, ...]:
        return tuple(self._views)

    @property
    def views_per_identity(self) -> int:
        return min(len(v) for v in self._views.values())

    def views(self, identity: str, indices: Sequence[int] | None = None) -> np.ndarray:
        """uint8 ``[V, H, W, 3]``; indices wrap around an identity's own number of photos."""
        views = self._views[identity]
        return views if indices is None else views[[i % len(views) for i in indices]]

    def source_name(self, identity: str) -> str:
        return f"folder:{os.path.join(self.directory, identity)}"


def number(identity: Any) -> int:
    """A non-negative int32 for an identity (its id, or a stable hash of its name): what seeds its randomness."""
    if isinstance(identity, (int, np.integer)):
        return int(identity) % 2**31
    return zlib.crc32(str(identity).encode()) & 0x7FFFFFFF


def from_config(data: Any, resolution: int, identities: Sequence[Any] | None = None):
    """The identity source a ``data`` config section names (``source="synthetic"``).

    Args:
      data: the section (``source``, ``identities``, ``images_per_identity``, ``seed``).
      resolution: image side in pixels.
      identities: use these identities instead of ``data.identities`` (e.g. those of a
        pre-optimised weights dataset).
    """
    source = data["source"]
    if source == "synthetic":
        ids = data["identities"] if identities is None else identities
        return SyntheticIdentities(
            tuple(int(i) for i in ids), int(data["images_per_identity"]), resolution, int(data["seed"])
        )
    if source == "folder":
        found = FolderIdentities(
            data["folder"],
            resolution,
            min_views=int(data.get("min_views", 1) or 1),
            min_size=int(data.get("min_size", folder_lib.MIN_SIZE) or folder_lib.MIN_SIZE),
        )
        return found if identities is None else _subset(found, identities)
    if source == "tfds":
        from hdb_jax.data import tfds_source

        return ArrayIdentities(tfds_source.example_views(data, resolution, identities))
    raise ValueError(f"config.data.source={source!r}: choose 'synthetic', 'folder' or 'tfds'")


def _subset(source, identities: Sequence[Any]) -> ArrayIdentities:
    missing = [i for i in identities if i not in source.identities]
    if missing:
        raise KeyError(f"identities {missing[:3]} are not in {getattr(source, 'directory', source)}")
    return ArrayIdentities({i: source.views(i) for i in identities})
