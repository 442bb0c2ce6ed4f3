"""Procedural synthetic faces: a deterministic, numpy-only image source.

Every integer identity id maps to a fixed :class:`FaceIdentity` (face shape,
skin / hair / eye colours, hair style, feature geometry, accessories) and every
``(identity, index)`` pair to a :class:`Variation` (pose, lighting, background,
drawing style). :func:`render_face` (:mod:`hdb_jax.toy.render`) rasterises the
pair; :func:`render_batch` renders many. :func:`caption` describes an image using
only the small fixed vocabulary :data:`VOCAB` (plus a class word and a rare token).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np

from hdb_jax.common.images import to_unit_range
from hdb_jax.toy.face import (  # noqa: F401 (the face types are part of this module's API)
    BACKGROUNDS,
    HAIR_BALD,
    HAIR_LONG,
    HAIR_SHORT,
    STYLES,
    FaceIdentity,
    Variation,
)
from hdb_jax.toy.render import render_face

VOCAB = frozenset(
    "a an of photo cartoon sketch face with wearing on background glasses hat earrings and sks".split()
) | frozenset(BACKGROUNDS)

P_GLASSES, P_HAT, P_EARRINGS = 0.3, 0.2, 0.25
_HAIR_STYLE_P = (0.45, 0.4, 0.15)
_SKIN_TONES = np.array(
    [(0.98, 0.85, 0.75), (0.93, 0.74, 0.60), (0.80, 0.58, 0.42), (0.62, 0.42, 0.28), (0.42, 0.27, 0.17)]
)  # light -> dark
_HAIR_COLORS = [
    (0.08, 0.06, 0.05),
    (0.28, 0.17, 0.09),
    (0.48, 0.30, 0.15),
    (0.88, 0.75, 0.42),
    (0.68, 0.28, 0.12),
    (0.70, 0.70, 0.72),
]
_EYE_COLORS = [
    (0.36, 0.22, 0.10),
    (0.25, 0.48, 0.78),
    (0.30, 0.55, 0.32),
    (0.48, 0.52, 0.56),
    (0.55, 0.42, 0.18),
]
_ACCENTS = [
    (0.75, 0.15, 0.15),
    (0.15, 0.35, 0.70),
    (0.20, 0.55, 0.30),
    (0.90, 0.75, 0.20),
    (0.45, 0.25, 0.60),
    (0.20, 0.20, 0.22),
    (0.90, 0.90, 0.88),
    (0.85, 0.45, 0.15),
]


def _pick(rng: np.random.Generator, options: Sequence) -> tuple:
    return tuple(float(c) for c in options[int(rng.integers(len(options)))])


def identity(identity_id: int, seed: int = 0) -> FaceIdentity:
    """Draws the attributes of one identity.

    Args:
      identity_id: non-negative integer id.
      seed: global seed; the same ``(seed, identity_id)`` always gives the same face.

    Returns:
      The identity's :class:`FaceIdentity`.
    """
    if identity_id < 0 or seed < 0:
        raise ValueError("identity_id and seed must be non-negative")
    rng = np.random.default_rng([seed, 0, identity_id])
    t = rng.uniform(0, len(_SKIN_TONES) - 1)
    i = min(int(t), len(_SKIN_TONES) - 2)
    skin = _SKIN_TONES[i] * (1 - (t - i)) + _SKIN_TONES[i + 1] * (t - i)
    skin = np.clip(skin + rng.uniform(-0.03, 0.03, 3), 0, 1)
    return FaceIdentity(
        identity_id=int(identity_id),
        face_ratio=float(rng.uniform(0.72, 0.9)),
        skin=tuple(float(c) for c in skin),
        hair_color=_pick(rng, _HAIR_COLORS),
        hair_style=int(rng.choice(3, p=_HAIR_STYLE_P)),
        hair_part=float(rng.uniform(-1, 1)),
        eye_color=_pick(rng, _EYE_COLORS),
        eye_spacing=float(rng.uniform(0.15, 0.2)),
        eye_height=float(rng.uniform(-0.1, -0.03)),
        nose_length=float(rng.uniform(0.11, 0.18)),
        mouth_width=float(rng.uniform(0.14, 0.24)),
        brow_tilt=float(rng.uniform(-0.02, 0.02)),
        shirt_color=_pick(rng, _ACCENTS),
        hat_color=_pick(rng, _ACCENTS),
        glasses_color=_pick(rng, [(0.1, 0.1, 0.1), (0.35, 0.2, 0.1), (0.6, 0.1, 0.1)]),
        glasses=bool(rng.random() < P_GLASSES),
        hat=bool(rng.random() < P_HAT),
        earrings=bool(rng.random() < P_EARRINGS),
    )


def variation(
    identity_id: int, index: int, seed: int = 0, style: Optional[str] = None, background: Optional[str] = None
) -> Variation:
    """Draws the per-image variation of image ``index`` of an identity.

    Args:
      identity_id: non-negative identity id.
      index: non-negative image index within the identity.
      seed: global seed.
      style: one of STYLES; None means "photo".
      background: a BACKGROUNDS name; None draws one at random.

    Returns:
      A :class:`Variation`, deterministic in all arguments.
    """
    style = style or "photo"
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}")
    rng = np.random.default_rng([seed, 1, identity_id, index])
    names = sorted(BACKGROUNDS)
    drawn_bg = names[int(rng.integers(len(names)))]
    return Variation(
        tx=float(rng.uniform(-0.06, 0.06)),
        ty=float(rng.uniform(-0.05, 0.05)),
        scale=float(rng.uniform(0.93, 1.07)),
        rotation=float(rng.uniform(-0.12, 0.12)),
        yaw=float(rng.uniform(-1, 1)),
        smile=float(rng.uniform(0, 1)),
        gain=float(rng.uniform(0.85, 1.12)),
        contrast=float(rng.uniform(0.85, 1.1)),
        light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0, 0.25)),
        background=background or drawn_bg,
        style=style,
    )


def render_batch(
    identities: Sequence[int], indices: Sequence[int], styles: Sequence[str], seed: int, resolution: int
) -> np.ndarray:
    """Renders image ``indices[i]`` of identity ``identities[i]`` in ``styles[i]``.

    Args:
      identities: identity ids, one per image.
      indices: per-identity image indices (they fix pose, lighting and background).
      styles: one of :data:`STYLES` per image.
      seed: the synthetic world's seed.
      resolution: image side in pixels.

    Returns:
      uint8 [N, resolution, resolution, 3].
    """
    if not len(identities) == len(indices) == len(styles):
        raise ValueError(f"{len(identities)} identities, {len(indices)} indices, {len(styles)} styles")
    return np.stack(
        [
            render_face(identity(int(i), seed), variation(int(i), int(j), seed, style=str(s)), resolution)
            for i, j, s in zip(identities, indices, styles)
        ]
    )


# The generator's labels of an image, as class indices (what the toy attribute heads predict).
BACKGROUND_NAMES = tuple(sorted(BACKGROUNDS))
LABELS: dict[str, int] = {  # label -> number of classes
    "style": len(STYLES),
    "background": len(BACKGROUNDS),
    "hat": 2,
    "glasses": 2,
    "earrings": 2,
    "hair_color": len(_HAIR_COLORS),
    "hair_style": 3,
    "eye_color": len(_EYE_COLORS),
    "skin": len(_SKIN_TONES),
    "shirt": len(_ACCENTS),
}
IDENTITY_LABELS = ("hat", "glasses", "earrings", "hair_color", "hair_style", "eye_color", "skin", "shirt")
IMAGE_LABELS = ("style", "background")  # set per image, not per identity


def labels(ident: FaceIdentity, var: Variation) -> dict[str, int]:
    """Class index of every :data:`LABELS` entry for one image (``background`` is -1 for sketches,
    which have no background colour; ``skin`` is the nearest of the five base tones)."""
    tone = int(np.argmin(np.sum((_SKIN_TONES - np.asarray(ident.skin)) ** 2, axis=1)))
    return {
        "style": STYLES.index(var.style),
        "background": -1 if var.style == "sketch" else BACKGROUND_NAMES.index(var.background),
        "hat": int(ident.hat),
        "glasses": int(ident.glasses),
        "earrings": int(ident.earrings),
        "hair_color": _HAIR_COLORS.index(tuple(ident.hair_color)),
        "hair_style": int(ident.hair_style),
        "eye_color": _EYE_COLORS.index(tuple(ident.eye_color)),
        "skin": tone,
        "shirt": _ACCENTS.index(tuple(ident.shirt_color)),
    }


def caption(
    ident: FaceIdentity, var: Variation, class_word: str = "face", token: Optional[str] = None
) -> str:
    """Describes an image, e.g. "a photo of sks face with glasses on a red background".

    Sketches are grayscale, so their captions leave out the background colour.

    Args:
      ident: the identity drawn.
      var: the image's variation (style and background).
      class_word: the class noun.
      token: optional rare identifier placed right before ``class_word``.

    Returns:
      A lowercase caption using only VOCAB, ``class_word`` and ``token``.
    """

    def article(word):
        return "an" if word[0] in "aeiou" else "a"

    subject = f"{token} {class_word}" if token else f"{article(class_word)} {class_word}"
    words = [article(var.style), var.style, "of", subject]
    extras = [w for w, has in (("glasses", ident.glasses), ("earrings", ident.earrings)) if has]
    if extras:
        words += ["with", " and ".join(extras)]
    if ident.hat:
        words += ["wearing a hat"]
    if var.style != "sketch":
        words += ["on", article(var.background), var.background, "background"]
    return " ".join(words)


@dataclasses.dataclass
class SyntheticFaces:
    """A map-style source of ``images_per_identity`` renders per identity.

    Image ``index`` of an identity uses style ``styles[index % len(styles)]``.
    """

    identities: Sequence[int]
    images_per_identity: int = 4
    resolution: int = 64
    seed: int = 0
    styles: tuple = ("photo",)
    with_captions: bool = True
    token: Optional[str] = None

    def __post_init__(self):
        self.identities = tuple(int(i) for i in self.identities)
        self.styles = tuple(self.styles)
        if not self.styles or any(s not in STYLES for s in self.styles):
            raise ValueError(f"styles must be a non-empty subset of {STYLES}")

    def __len__(self) -> int:
        return len(self.identities) * self.images_per_identity

    def __getitem__(self, i: int) -> dict:
        """Returns dict(image=uint8 [H, W, 3], identity, index, caption)."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        ident_id = self.identities[i // self.images_per_identity]
        index = i % self.images_per_identity
        ident = identity(ident_id, self.seed)
        var = variation(ident_id, index, self.seed, style=self.styles[index % len(self.styles)])
        example = dict(image=render_face(ident, var, self.resolution), identity=ident_id, index=index)
        if self.with_captions:
            example["caption"] = caption(ident, var, token=self.token)
        return example

    def batches(
        self, batch_size: int, *, epoch_seed: int = 0, shuffle: bool = True, drop_remainder: bool = True
    ) -> Iterator[dict]:
        """Iterates over one epoch in batches.

        Args:
          batch_size: examples per batch.
          epoch_seed: seeds the (deterministic) shuffle.
          shuffle: whether to permute the examples.
          drop_remainder: whether to drop the last, smaller batch.

        Returns:
          An iterator of dicts: image float32 [B, H, W, 3] in [-1, 1], identity
          int32 [B], index int32 [B] and (with captions) caption list[str].
        """
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng([self.seed, 2, epoch_seed]).permutation(order)
        stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
        for start in range(0, stop, batch_size):
            examples = [self[int(i)] for i in order[start : start + batch_size]]
            images = np.stack([e["image"] for e in examples])  # [B, H, W, 3] uint8
            batch = dict(
                image=to_unit_range(images),
                identity=np.array([e["identity"] for e in examples], np.int32),
                index=np.array([e["index"] for e in examples], np.int32),
            )
            if self.with_captions:
                batch["caption"] = [e["caption"] for e in examples]
            yield batch


def save_folder(source: SyntheticFaces, directory: str) -> list:
    """Writes every image of ``source`` as ``id{identity:05d}_{index:02d}.png``.

    Args:
      source: the images to write.
      directory: output folder, created if missing.

    Returns:
      The list of written file paths.
    """
    from PIL import Image  # only needed here

    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(len(source)):
        ex = source[i]
        path = os.path.join(directory, f"id{ex['identity']:05d}_{ex['index']:02d}.png")
        Image.fromarray(ex["image"]).save(path)
        paths.append(path)
    return paths
