"""The toy world's identity-aware image encoder for the hypernetwork.

HyperDreamBooth encodes the face with a pretrained ViT-H; a randomly initialised tiny ViT
trained from scratch on a few dozen identities learns nothing about identity. In the toy world
the shipped identity encoder (:mod:`hdb_jax.toy.identity`, trained to tell synthetic identities
apart) plays the pretrained ViT: :class:`IdentityImageEncoder` runs it and returns its feature
tokens ``[B, 18, 128]`` (the 4x4 map of its last stage and its pooled features), frozen by
default like the paper's encoder.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax

from hdb_jax.toy import identity as identity_lib

NAME = "toy_identity"


class IdentityImageEncoder(nn.Module):
    """NHWC images ``[B, S, S, 3]`` in [-1, 1] -> identity feature tokens ``[B, N, D]``.

    Attributes:
      widths, embed_dim, resolution, groups: the identity encoder's architecture.
    """

    widths: tuple[int, ...] = (16, 32, 64, 128)
    embed_dim: int = 64
    resolution: int = 32
    groups: int = 8

    @property
    def image_size(self) -> int:
        return int(self.resolution)

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        encoder = identity_lib.IdentityEncoder(
            tuple(self.widths), self.embed_dim, self.resolution, self.groups, name="identity"
        )
        return encoder(images, tokens=True)


def build(path: str | os.PathLike | None = None) -> tuple[IdentityImageEncoder, dict[str, Any]]:
    """The encoder and its trained parameters (``{"identity": ...}``) from an identity encoder folder.

    Args:
      path: a folder written by :func:`hdb_jax.toy.identity.save`; None: the shipped encoder.
    """
    scorer = identity_lib.load(path)
    m = scorer.module
    module = IdentityImageEncoder(tuple(m.widths), m.embed_dim, m.resolution, m.groups)
    return module, {"identity": scorer.params["params"]}
