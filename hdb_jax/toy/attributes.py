"""The toy world's attribute classifier: what a sample shows, read back from its pixels.

The paper scores subject fidelity (DINO, CLIP-I: does the sample show the subject's details?)
and prompt fidelity (CLIP-T: does it show what the prompt asked?). In the synthetic world a
small CNN trained on the generator's own labels reads those attributes from an image:

* identity attributes (:data:`hdb_jax.toy.synthetic.IDENTITY_LABELS`): hat, glasses, earrings,
  hair colour and style, eye colour, skin tone, shirt colour;
* image attributes (:data:`hdb_jax.toy.synthetic.IMAGE_LABELS`): style and background colour;
* ``face``: the probability that the image is a face at all (trained against flat colours,
  smoothed noise and block-shuffled renders), for the fraction of non-face samples;
* its pooled features (``features``), the space the k-NN precision/recall of samples against
  real renders is measured in (the classifier sees every style, the identity encoder does not).

Weights ship in ``hdb_jax/toy/weights/attributes`` (trained by :mod:`hdb_jax.jobs.toy_attributes`).
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

SHIPPED_DIR = pathlib.Path(__file__).parent / "weights" / "attributes"
FORMAT = "hdb_jax.toy_attributes"
HEADS = tuple(synthetic.LABELS) + ("face",)


class AttributesWeightsError(OSError):
    """Attribute classifier weights are missing, unreadable or do not fit their architecture."""


class AttributeNet(nn.Module):
    """A small CNN: images [B, H, W, 3] in [-1, 1] -> ``{head: logits [B, C]}`` and features.

    Attributes:
      widths: channels per stage (two 3x3 convs each); every stage after the first halves the size.
      hidden: width of the pooled feature vector.
      resolution: working size; other input sizes are resized (antialiased) to it first.
      groups: GroupNorm groups.
    """

    widths: Sequence[int] = (32, 64, 128)
    hidden: int = 256
    resolution: int = 32
    groups: int = 8

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
        x = jnp.asarray(images, jnp.float32)
        size = (self.resolution, self.resolution)
        if x.shape[1:3] != size:
            x = jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "linear", antialias=True)
        for i, width in enumerate(self.widths):
            for j, stride in enumerate((1 if i == 0 else 2, 1)):
                x = nn.Conv(width, (3, 3), strides=stride, name=f"conv{i}_{j}")(x)
                x = nn.relu(nn.GroupNorm(min(self.groups, width), name=f"norm{i}_{j}")(x))
        pooled = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        features = nn.relu(nn.Dense(self.hidden, name="hidden")(pooled))  # [B, hidden]
        logits = {
            name: nn.Dense(classes, name=f"head_{name}")(features)
            for name, classes in synthetic.LABELS.items()
        }
        logits["face"] = nn.Dense(1, name="head_face")(features)[:, 0]
        return logits, features


@dataclasses.dataclass
class AttributeScorer:
    """A trained classifier; every method takes uint8 ``[B, H, W, 3]`` (or float in [-1, 1]) images."""

    module: AttributeNet
    params: Any
    meta: dict = dataclasses.field(default_factory=dict)
    _apply: Callable = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self._apply = jax.jit(self.module.apply)

    def _run(self, images, batch: int = 256):
        x = np.asarray(images)
        x = x[None] if x.ndim == 3 else x
        x = to_unit_range(x) if x.dtype == np.uint8 else x.astype(np.float32)
        outs = [self._apply(self.params, jnp.asarray(x[i : i + batch])) for i in range(0, len(x), batch)]
        logits = {k: np.concatenate([np.asarray(o[0][k]) for o in outs]) for k in HEADS}
        return logits, np.concatenate([np.asarray(o[1]) for o in outs])

    def predict(self, images) -> dict[str, np.ndarray]:
        """``{label: predicted class [B]}`` for every :data:`hdb_jax.toy.synthetic.LABELS` entry,
        and ``face``: the probability ``[B]`` that the image is a face."""
        logits, _ = self._run(images)
        out = {k: np.argmax(v, axis=-1) for k, v in logits.items() if k != "face"}
        out["face"] = 1.0 / (1.0 + np.exp(-logits["face"]))
        return out

    def features(self, images) -> np.ndarray:
        """Pooled features ``[B, hidden]`` (the space of the realism metric)."""
        return self._run(images)[1]


def negatives(rng: np.random.Generator, count: int, resolution: int, seed: int = 0) -> np.ndarray:
    """uint8 non-faces ``[count, R, R, 3]``: flat colours, smoothed noise and block-shuffled renders."""
    out = []
    for k in range(count):
        kind = k % 4
        if kind == 0:  # a flat colour field
            out.append(
                np.broadcast_to(rng.integers(0, 256, (1, 1, 3)), (resolution, resolution, 3)).astype(np.uint8)
            )
        elif kind in (1, 2):  # smoothed noise at 1/4 or 1/8 of the resolution
            cell = 4 if kind == 1 else 8
            noise = rng.normal(0, 1, (resolution // cell, resolution // cell, 3))
            noise = np.repeat(np.repeat(noise, cell, 0), cell, 1)
            out.append(np.clip(128 + rng.uniform(30, 90) * noise, 0, 255).astype(np.uint8))
        else:  # a real render with its 4x4 or 8x8 blocks shuffled: a face's colours, no structure
            i = int(rng.integers(0, 10**6))
            face = synthetic.render_face(
                synthetic.identity(i, seed),
                synthetic.variation(i, int(rng.integers(0, 2**30)), seed),
                resolution,
            )
            out.append(shuffle_blocks(face, 4 if rng.random() < 0.5 else 8, rng))
    return np.stack(out)


def shuffle_blocks(image: np.ndarray, block: int, rng: np.random.Generator) -> np.ndarray:
    """``image [H, W, C]`` with its ``block x block`` tiles permuted."""
    h, w, c = image.shape
    tiles = (
        image.reshape(h // block, block, w // block, block, c)
        .transpose(0, 2, 1, 3, 4)
        .reshape(-1, block, block, c)
    )
    tiles = tiles[rng.permutation(len(tiles))]
    return tiles.reshape(h // block, w // block, block, block, c).transpose(0, 2, 1, 3, 4).reshape(h, w, c)


def save(directory: str | os.PathLike, params: Any, meta: dict) -> pathlib.Path:
    """Writes the classifier folder (``config.json`` with ``meta``, ``params.safetensors``)."""
    return store.save(directory, params, meta, format=FORMAT)


def load(directory: str | os.PathLike | None = None) -> AttributeScorer:
    """Reads a classifier written by :func:`save` (None: the shipped one)."""
    directory = pathlib.Path(directory) if directory is not None else SHIPPED_DIR
    module, params, meta = store.load(
        directory,
        AttributeNet,
        lambda m: jnp.zeros((1, m.resolution, m.resolution, 3)),
        error=AttributesWeightsError,
        what="attribute classifier",
        hint="python -m hdb_jax.train --config configs/attributes_toy.py",
    )
    return AttributeScorer(module, params, meta)


@functools.lru_cache(maxsize=1)
def shipped() -> AttributeScorer:
    """The shipped classifier (loaded once)."""
    return load()
