"""A toy identity encoder: embeds *who* a synthetic face is, not *how* it was drawn.

The paper scores identity preservation with a face-recognition network (cosine similarity of
embeddings). In the synthetic-faces world (:mod:`hdb_jax.toy.synthetic`) a small CNN plays that
role. It is trained with a supervised contrastive loss: each batch holds several renders of each
of a few identities (fresh pose, expression, lighting, background, photo or cartoon style), and
renders of one identity must embed closer to each other than to any other render. An auxiliary
head regresses the generator's per-identity attributes (colours, hair style, accessories,
geometry) from the pooled features.

The trained encoder ships in ``hdb_jax/toy/weights/identity`` (``config.json`` +
``params.safetensors``); :func:`load` reads it into an :class:`IdentityScorer` and
:func:`identity_similarity` scores images against a reference with it. Its training job is
:mod:`hdb_jax.jobs.toy_identity`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax.common.images import to_unit_range
from hdb_jax.toy import store, synthetic

SHIPPED_DIR = pathlib.Path(__file__).parent / "weights" / "identity"
FORMAT = "hdb_jax.toy_identity"


class IdentityWeightsError(OSError):
    """Identity encoder weights are missing, unreadable or do not fit their architecture."""


class IdentityEncoder(nn.Module):
    """A small CNN: images [B, H, W, 3] in [-1, 1] -> L2-normalised embeddings [B, embed_dim].

    Attributes:
      widths: channels per stage (two 3x3 convs each); every stage after the first halves the size.
      embed_dim: embedding size.
      resolution: working size; other input sizes are resized (antialiased) to it first.
      groups: GroupNorm groups (at most the stage width).
    """

    widths: Sequence[int] = (16, 32, 64, 128)
    embed_dim: int = 64
    resolution: int = 32
    groups: int = 8

    @nn.compact
    def __call__(self, images: jax.Array, with_features: bool = False, tokens: bool = False):
        """Embeds images [B, H, W, 3] in [-1, 1].

        Returns:
          The embedding ``[B, embed_dim]``; with ``with_features`` also the pooled hidden
          features ``[B, 2·widths[-1]]``; with ``tokens`` instead the feature tokens
          ``[B, cells + 2, widths[-1]]``: every cell of the last stage's map, then the pooled
          hidden features as two tokens (what the hypernetwork attends to).
        """
        x = jnp.asarray(images, jnp.float32)
        size = (self.resolution, self.resolution)
        if x.shape[1:3] != size:
            x = jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "linear", antialias=True)
        for i, width in enumerate(self.widths):
            for j, stride in enumerate((1 if i == 0 else 2, 1)):
                x = nn.Conv(width, (3, 3), strides=stride, name=f"conv{i}_{j}")(x)
                x = nn.relu(nn.GroupNorm(min(self.groups, width), name=f"norm{i}_{j}")(x))
        pooled = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        features = nn.relu(nn.Dense(2 * self.widths[-1], name="hidden")(pooled))
        embedding = nn.Dense(self.embed_dim, name="project")(features)
        embedding = embedding / jnp.linalg.norm(embedding, axis=-1, keepdims=True).clip(1e-6)
        if tokens:
            cells = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, h·w, C]
            return jnp.concatenate([cells, features.reshape(x.shape[0], 2, x.shape[-1])], axis=1)
        return (embedding, features) if with_features else embedding


@dataclasses.dataclass
class IdentityScorer:
    """An encoder with its parameters; ``embed`` runs jitted (one compile per input shape)."""

    module: IdentityEncoder
    params: Any
    meta: dict = dataclasses.field(default_factory=dict)
    _apply: Callable = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self._apply = jax.jit(self.module.apply)

    def embed(self, images: Any) -> jax.Array:
        """Embeds images: uint8 [B, H, W, 3] or float in [-1, 1] (a single [H, W, 3] too) -> [B, D]."""
        x = jnp.asarray(images)
        x = x[None] if x.ndim == 3 else x
        x = to_unit_range(x) if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        return self._apply(self.params, x)

    def similarity(self, images: Any, reference: Any) -> jax.Array:
        """Cosine similarities [B] of ``images`` to a reference.

        Args:
          images: [B, H, W, 3] uint8 or float images.
          reference: one image ([H, W, 3] or [1, H, W, 3]), one per image ([B, H, W, 3]), or
            embeddings ([D] or [B, D]; normalised here).

        Returns:
          float32 [B] in [-1, 1].
        """
        ref = jnp.asarray(reference)
        if ref.ndim <= 2:
            ref = ref.astype(jnp.float32) / jnp.linalg.norm(ref, axis=-1, keepdims=True).clip(1e-6)
        else:
            ref = self.embed(ref)
        return jnp.sum(self.embed(images) * ref, axis=-1)


def render(
    identities: Sequence[int], indices: Sequence[int], styles: Sequence[str], seed: int, resolution: int
) -> np.ndarray:
    """Renders image ``indices[i]`` of identity ``identities[i]`` in ``styles[i]``: uint8 [N, R, R, 3]."""
    return np.stack(
        [
            synthetic.render_face(
                synthetic.identity(int(i), seed),
                synthetic.variation(int(i), int(j), seed, style=str(s)),
                resolution,
            )
            for i, j, s in zip(identities, indices, styles)
        ]
    )


def attribute_vector(ident: synthetic.FaceIdentity) -> np.ndarray:
    """The generator's attributes of one identity as a float32 vector (colours, one-hots, geometry)."""
    colors = [
        ident.skin,
        ident.hair_color,
        ident.eye_color,
        ident.shirt_color,
        np.multiply(ident.hat_color, ident.hat),
        np.multiply(ident.glasses_color, ident.glasses),
    ]
    scalars = [
        ident.glasses,
        ident.hat,
        ident.earrings,
        ident.face_ratio,
        ident.hair_part,
        ident.eye_spacing,
        ident.eye_height,
        ident.nose_length,
        ident.mouth_width,
    ]
    return np.concatenate([*colors, np.eye(3)[ident.hair_style], scalars]).astype(np.float32)


def save(directory: str | os.PathLike, params: Any, meta: dict) -> pathlib.Path:
    """Writes the encoder folder (``config.json`` with ``meta``, ``params.safetensors``); see :mod:`hdb_jax.toy.store`."""
    return store.save(directory, params, meta, format=FORMAT)


def load(directory: str | os.PathLike | None = None) -> IdentityScorer:
    """Reads an encoder written by :func:`save`.

    Args:
      directory: the folder; None means the encoder shipped with the package (:data:`SHIPPED_DIR`).

    Returns:
      An :class:`IdentityScorer` whose ``meta`` is the folder's ``config.json``.

    Raises:
      IdentityWeightsError: the directory lacks the files, they are unreadable, or the
        parameters do not fit the architecture in ``config.json``; the message names the path.
    """
    directory = pathlib.Path(directory) if directory is not None else SHIPPED_DIR
    module, params, meta = store.load(
        directory,
        IdentityEncoder,
        lambda m: jnp.zeros((1, m.resolution, m.resolution, 3)),
        error=IdentityWeightsError,
        what="identity encoder",
        hint="python -m hdb_jax.train --config configs/identity_toy.py",
    )
    return IdentityScorer(module, params, meta)


@functools.lru_cache(maxsize=1)
def _shipped() -> IdentityScorer:
    return load()


def identity_similarity(images: Any, reference: Any, scorer: IdentityScorer | None = None) -> jax.Array:
    """Cosine identity similarity [B] of ``images`` to ``reference`` (see :meth:`IdentityScorer.similarity`).

    Args:
      images: [B, H, W, 3] uint8 or float in [-1, 1].
      reference: an image, [B] images, or an embedding.
      scorer: the encoder to use; None loads the shipped one (once).

    Returns:
      float32 [B] cosine similarities.
    """
    return (scorer if scorer is not None else _shipped()).similarity(images, reference)


def evaluate_retrieval(
    params_or_encoder: Any,
    identities: Sequence[int],
    seed: int = 0,
    *,
    queries_per_identity: int = 3,
    styles: Sequence[str] = ("photo", "cartoon"),
    module: IdentityEncoder | None = None,
) -> dict:
    """Nearest-identity retrieval: a photo gallery (image 0 per identity) against other renders.

    Args:
      params_or_encoder: an :class:`IdentityScorer`, or encoder parameters for ``module``.
      identities: identity ids (use ids the encoder never saw in training).
      seed: the synthetic world's seed.
      queries_per_identity: queries are images 1..k of each identity (random backgrounds),
        query j drawn in ``styles[j % len(styles)]``.
      styles: query styles.
      module: the architecture when parameters are given (default :class:`IdentityEncoder`).

    Returns:
      ``top1`` (fraction of queries whose most similar gallery image is their identity),
      ``chance`` (1 / #identities), ``mean_positive`` / ``mean_negative`` (query-gallery cosine
      to the own / other identities) and the counts.
    """
    scorer = (
        params_or_encoder
        if isinstance(params_or_encoder, IdentityScorer)
        else IdentityScorer(module or IdentityEncoder(), params_or_encoder)
    )
    ids, k = [int(i) for i in identities], queries_per_identity
    resolution = scorer.module.resolution
    gallery = scorer.embed(render(ids, [0] * len(ids), ["photo"] * len(ids), seed, resolution))
    q_index = np.tile(np.arange(1, k + 1), len(ids))
    queries = render(np.repeat(ids, k), q_index, [styles[j % len(styles)] for j in q_index], seed, resolution)
    sims = np.asarray(scorer.embed(queries) @ gallery.T)  # [Q, G]
    own = np.repeat(np.arange(len(ids)), k)
    positive = sims[np.arange(len(own)), own]
    return {
        "top1": float(np.mean(sims.argmax(1) == own)),
        "chance": 1.0 / len(ids),
        "mean_positive": float(positive.mean()),
        "mean_negative": float((sims.sum(1) - positive).sum() / (sims.size - len(own))),
        "num_identities": len(ids),
        "num_queries": len(own),
    }
