"""Procedural synthetic faces: a deterministic, numpy-only image source.

Every integer identity id maps to a fixed :class:`FaceIdentity` (face shape,
skin / hair / eye colours, hair style, feature geometry, accessories) and every
``(identity, index)`` pair to a :class:`Variation` (pose, lighting, background,
drawing style). :func:`render_face` rasterises the pair with anti-aliased
signed distance fields on a pixel grid, so one face can be drawn at 32 px for
tests or at 512 px for a demo. :func:`caption` describes an image using only the
small fixed vocabulary :data:`VOCAB` (plus a class word and a rare token).

Coordinates: the image spans [-1, 1] on both axes, ``y`` pointing down. Shapes
are placed in "face units" around the face centre; the pose transform maps
pixels into that frame.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np

from hdb_jax.images import to_unit_range

STYLES = ("photo", "cartoon", "sketch")
BACKGROUNDS = {  # name -> RGB in [0, 1]; names appear verbatim in captions.
    "red": (0.80, 0.20, 0.20), "green": (0.25, 0.62, 0.30),
    "blue": (0.22, 0.40, 0.80), "yellow": (0.95, 0.85, 0.25),
    "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.09),
    "gray": (0.55, 0.55, 0.55), "purple": (0.52, 0.30, 0.68),
    "orange": (0.95, 0.55, 0.15), "pink": (0.95, 0.62, 0.75),
    "brown": (0.50, 0.32, 0.18),
}
VOCAB = frozenset(
    "a an of photo cartoon sketch face with wearing on background glasses hat "
    "earrings and sks".split()) | frozenset(BACKGROUNDS)

P_GLASSES, P_HAT, P_EARRINGS = 0.3, 0.2, 0.25
HAIR_SHORT, HAIR_LONG, HAIR_BALD = 0, 1, 2
_HAIR_STYLE_P = (0.45, 0.4, 0.15)
_SKIN_TONES = np.array([(0.98, 0.85, 0.75), (0.93, 0.74, 0.60), (0.80, 0.58, 0.42),
                        (0.62, 0.42, 0.28), (0.42, 0.27, 0.17)])  # light -> dark
_HAIR_COLORS = [(0.08, 0.06, 0.05), (0.28, 0.17, 0.09), (0.48, 0.30, 0.15),
                (0.88, 0.75, 0.42), (0.68, 0.28, 0.12), (0.70, 0.70, 0.72)]
_EYE_COLORS = [(0.36, 0.22, 0.10), (0.25, 0.48, 0.78), (0.30, 0.55, 0.32),
               (0.48, 0.52, 0.56), (0.55, 0.42, 0.18)]
_ACCENTS = [(0.75, 0.15, 0.15), (0.15, 0.35, 0.70), (0.20, 0.55, 0.30),
            (0.90, 0.75, 0.20), (0.45, 0.25, 0.60), (0.20, 0.20, 0.22),
            (0.90, 0.90, 0.88), (0.85, 0.45, 0.15)]
_FACE_H = 0.5    # half-height of the face ellipse, image units at scale 1
_HEAD_Y = -0.02  # vertical position of the face centre in the image
_GOLD = (0.95, 0.78, 0.22)

Color = tuple  # (r, g, b) floats in [0, 1]


@dataclasses.dataclass(frozen=True)
class FaceIdentity:
    """Per-identity attributes (lengths in face units, colours RGB in [0, 1])."""
    identity_id: int
    face_ratio: float   # face ellipse width / height
    skin: Color
    hair_color: Color
    hair_style: int     # HAIR_SHORT (0), HAIR_LONG (1) or HAIR_BALD (2)
    hair_part: float    # in [-1, 1]: tilt of the fringe
    eye_color: Color
    eye_spacing: float  # half distance between the eye centres
    eye_height: float   # eye centre y relative to the face centre (< 0: up)
    nose_length: float
    mouth_width: float
    brow_tilt: float
    shirt_color: Color
    hat_color: Color
    glasses_color: Color
    glasses: bool
    hat: bool
    earrings: bool


@dataclasses.dataclass(frozen=True)
class Variation:
    """Per-image variation: pose, expression, lighting, background and style."""
    tx: float           # translation, image units
    ty: float
    scale: float
    rotation: float     # radians
    yaw: float          # in [-1, 1]: squashes the head, shifts the features
    smile: float        # in [0, 1]
    gain: float         # brightness multiplier
    contrast: float
    light_angle: float  # direction of the light gradient, radians
    light_strength: float
    background: str     # key of BACKGROUNDS
    style: str          # one of STYLES


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
        identity_id=int(identity_id), face_ratio=float(rng.uniform(0.72, 0.9)),
        skin=tuple(float(c) for c in skin), hair_color=_pick(rng, _HAIR_COLORS),
        hair_style=int(rng.choice(3, p=_HAIR_STYLE_P)), hair_part=float(rng.uniform(-1, 1)),
        eye_color=_pick(rng, _EYE_COLORS), eye_spacing=float(rng.uniform(0.15, 0.2)),
        eye_height=float(rng.uniform(-0.1, -0.03)), nose_length=float(rng.uniform(0.11, 0.18)),
        mouth_width=float(rng.uniform(0.14, 0.24)), brow_tilt=float(rng.uniform(-0.02, 0.02)),
        shirt_color=_pick(rng, _ACCENTS), hat_color=_pick(rng, _ACCENTS),
        glasses_color=_pick(rng, [(0.1, 0.1, 0.1), (0.35, 0.2, 0.1), (0.6, 0.1, 0.1)]),
        glasses=bool(rng.random() < P_GLASSES), hat=bool(rng.random() < P_HAT),
        earrings=bool(rng.random() < P_EARRINGS))


def variation(identity_id: int, index: int, seed: int = 0, style: Optional[str] = None,
              background: Optional[str] = None) -> Variation:
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
        tx=float(rng.uniform(-0.06, 0.06)), ty=float(rng.uniform(-0.05, 0.05)),
        scale=float(rng.uniform(0.93, 1.07)), rotation=float(rng.uniform(-0.12, 0.12)),
        yaw=float(rng.uniform(-1, 1)), smile=float(rng.uniform(0, 1)),
        gain=float(rng.uniform(0.85, 1.12)), contrast=float(rng.uniform(0.85, 1.1)),
        light_angle=float(rng.uniform(0, 2 * math.pi)),
        light_strength=float(rng.uniform(0, 0.25)),
        background=background or drawn_bg, style=style)


# --- signed distances (negative inside) on [H, W] coordinate arrays ---------
def _circle(u, v, cx, cy, r):
    return np.hypot(u - cx, v - cy) - r


def _ellipse(u, v, cx, cy, rx, ry):
    du, dv = (u - cx) / rx, (v - cy) / ry
    k = np.hypot(du, dv)
    grad = np.hypot(du / rx, dv / ry) / np.maximum(k, 1e-12)  # |grad k|
    return (k - 1) / np.maximum(grad, 1 / max(rx, ry))        # first-order distance


def _box(u, v, cx, cy, hw, hh, r=0.0):
    qx, qy = np.abs(u - cx) - hw + r, np.abs(v - cy) - hh + r
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _capsule(u, v, x0, y0, x1, y1, r):
    bx, by = x1 - x0, y1 - y0
    px, py = u - x0, v - y0
    h = np.clip((px * bx + py * by) / (bx * bx + by * by), 0, 1)
    return np.hypot(px - bx * h, py - by * h) - r


def _smooth_cover(sd, width):
    """Anti-aliased coverage: 1 inside, 0 outside, smoothstep over ``width``."""
    t = np.clip(0.5 - sd / width, 0, 1)
    return t * t * (3 - 2 * t)


def _shade(color: Color, k: float) -> Color:
    return tuple(min(1.0, c * k) for c in color)


def _mix(a: Color, b: Color, t: float) -> Color:
    return tuple(x * (1 - t) + y * t for x, y in zip(a, b))


class _Canvas:
    """An RGB float image plus the face-frame coordinates of its pixels."""

    def __init__(self, resolution: int, var: Variation):
        lin = (np.arange(resolution, dtype=np.float32) + 0.5) * (2 / resolution) - 1
        self.y, self.x = np.meshgrid(lin, lin, indexing="ij")  # [H, W] image coords
        c, s = math.cos(var.rotation), math.sin(var.rotation)
        x, y = self.x - var.tx, self.y - var.ty - _HEAD_Y
        squash = 1 - 0.08 * abs(var.yaw)  # a turned head looks narrower
        self.full_u = (c * x + s * y) / (var.scale * squash)  # [H, W] face frame
        self.full_v = (-s * x + c * y) / var.scale
        self.px = 2 / resolution / var.scale  # one pixel in face units
        self.var, self.res, self.squash = var, resolution, squash
        self.win = (slice(None), slice(None))
        self.style = var.style
        self.img = np.empty((resolution, resolution, 3), np.float32)
        self.img[:] = (0.97,) * 3 if var.style == "sketch" else BACKGROUNDS[var.background]
        self.line_width = {"photo": 0.0, "cartoon": max(1.2 * self.px, 0.014),
                           "sketch": max(1.0 * self.px, 0.01)}[var.style]
        self.ink = (0.07, 0.05, 0.05) if var.style == "cartoon" else (0.2, 0.2, 0.2)

    def focus(self, cx=None, cy=None, radius=None):
        """Restricts painting to a window around face point (cx, cy); no args: all.

        Returns the face coordinates (u, v) of the window's pixels, each [h, w].
        """
        self.win = (slice(None), slice(None))
        if cx is not None:  # face frame -> image coords, inverting the pose
            var, c, s = self.var, math.cos(self.var.rotation), math.sin(self.var.rotation)
            fx, fy = cx * var.scale * self.squash, cy * var.scale
            centre = (c * fx - s * fy + var.tx, s * fx + c * fy + var.ty + _HEAD_Y)
            half = (radius * var.scale + self.line_width) * self.res / 2 + 2  # pixels
            lo_hi = [(max(0, math.floor((p + 1) * self.res / 2 - half)),
                      max(0, math.ceil((p + 1) * self.res / 2 + half))) for p in centre]
            self.win = (slice(*lo_hi[1]), slice(*lo_hi[0]))
        return self.full_u[self.win], self.full_v[self.win]

    def blend(self, alpha, color: Color):
        """Alpha-blends ``color`` into the window, touching only where alpha > 0."""
        rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
        if rows.size == 0:
            return
        box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        img = self.img[self.win][box]  # a view: updated in place, [h, w, 3]
        img += alpha[box][..., None] * (np.asarray(color, np.float32) - img)

    def paint(self, sd, color: Color, opacity: float = 1.0, line: bool = True):
        """Fills the shape ``sd < 0``; draws its outline in cartoon / sketch."""
        if self.style == "sketch":  # pale paper tones, keeps a hint of value
            lum = 0.3 * color[0] + 0.59 * color[1] + 0.11 * color[2]
            color = (1 - 0.45 * (1 - lum),) * 3
        self.blend(_smooth_cover(sd, self.px) * opacity, color)
        if line and self.line_width:
            band = np.abs(sd) - self.line_width / 2
            self.blend(_smooth_cover(band, self.px), self.ink)


def render_face(ident: FaceIdentity, var: Variation, resolution: int = 64) -> np.ndarray:
    """Rasterises one face.

    Args:
      ident: the identity to draw.
      var: pose, lighting, background and style of this image.
      resolution: output height and width in pixels.

    Returns:
      uint8 array [resolution, resolution, 3].
    """
    cv = _Canvas(resolution, var)
    u, v = cv.focus()
    photo = var.style == "photo"
    b = _FACE_H
    a = b * ident.face_ratio           # face half-width
    du = 0.06 * var.yaw                # features shift with the head turn
    skin, hair = ident.skin, ident.hair_color
    ey = ident.eye_height

    # Hair behind the head, shoulders and neck.
    if ident.hair_style == HAIR_LONG:
        cv.paint(np.minimum(_ellipse(u, v, 0, -0.06, a * 1.2, b * 1.1),
                            _box(u, v, 0, 0.35, a * 1.18, 0.45, 0.12)), _shade(hair, 0.8))
    elif ident.hair_style == HAIR_SHORT:
        cv.paint(np.maximum(_ellipse(u, v, 0, -0.05, a * 1.12, b * 1.08), v + 0.02),
                 _shade(hair, 0.85))
    cv.paint(_ellipse(u, v, 0, 1.2, 0.95, 0.5), ident.shirt_color)
    neck = np.maximum(_box(u, v, 0, 0.55, a * 0.42, 0.35, 0.05), v - 0.98 + 1.2 * np.abs(u))
    cv.paint(neck, _shade(skin, 0.82))

    # Ears, face, earrings.
    for side in (-1, 1):
        u, v = cv.focus(side * a * 0.97, -0.01, 0.1)
        cv.paint(_ellipse(u, v, side * a * 0.97, -0.01, 0.06, 0.095), _shade(skin, 0.93))
    u, v = cv.focus()
    face = _ellipse(u, v, 0, 0, a, b)
    cv.paint(face, skin)
    if photo:  # soft darkening towards the rim of the face
        rim = np.clip((face + 0.12) / 0.12, 0, 1) * _smooth_cover(face, cv.px)
        cv.blend(0.3 * rim, _shade(skin, 0.7))
    if ident.earrings:
        for side in (-1, 1):
            u, v = cv.focus(side * a * 1.01, 0.14, 0.04)
            cv.paint(_circle(u, v, side * a * 1.01, 0.14, 0.04), _GOLD)

    # Eyes and eyebrows.
    gaze = 0.012 * var.yaw
    for side in (-1, 1):
        ex = side * ident.eye_spacing + du
        u, v = cv.focus(ex, ey - 0.03, 0.12)
        white = _ellipse(u, v, ex, ey, 0.07, 0.042)
        cv.paint(white, (0.96, 0.96, 0.94))
        cv.paint(np.maximum(_circle(u, v, ex + gaze, ey, 0.033), white), ident.eye_color)
        cv.paint(np.maximum(_circle(u, v, ex + gaze, ey, 0.015), white), (0.04, 0.03, 0.03),
                 line=False)
        if photo:
            cv.paint(np.maximum(np.abs(white) - 0.007, v - ey), (0.12, 0.08, 0.07))
            cv.paint(_circle(u, v, ex + gaze + 0.012, ey - 0.012, 0.008), (1, 1, 1))
        inner, outer = ex - side * 0.06, ex + side * 0.075
        brow = _capsule(u, v, inner, ey - 0.075 - ident.brow_tilt, outer, ey - 0.085, 0.017)
        cv.paint(brow, _shade(hair, 0.9), line=False)

    # Nose and mouth.
    nose_y = ey + ident.nose_length
    mouth_y = nose_y + 0.1
    u, v = cv.focus(du, (ey + mouth_y) / 2, (mouth_y - ey) / 2 + ident.mouth_width / 2 + 0.05)
    cv.paint(_capsule(u, v, du, ey + 0.04, du * 1.3, nose_y, 0.016), _shade(skin, 0.82),
             opacity=0.6 if photo else 1.0, line=False)
    for side in (-1, 1):
        cv.paint(_ellipse(u, v, du * 1.3 + side * 0.022, nose_y, 0.013, 0.008),
                 _shade(skin, 0.45), line=False)
    vb = v + var.smile * 2.5 * (u - du) ** 2  # bends the mouth into a smile
    lips = _ellipse(u, vb, du, mouth_y, ident.mouth_width / 2, 0.026)
    cv.paint(lips, _mix(skin, (0.75, 0.22, 0.28), 0.55))
    cv.paint(np.maximum(np.abs(vb - mouth_y) - 0.005, lips), (0.35, 0.08, 0.1), line=False)

    # Hair in front: a cap above a wavy, parted hairline (+ side locks if long).
    u, v = cv.focus()
    if ident.hair_style != HAIR_BALD:
        hairline = -b * 0.42 + 0.06 * ident.hair_part * u / a + 0.015 * np.cos(u * 40)
        cap = np.maximum(_ellipse(u, v, 0, -0.03, a * 1.07, b * 1.05), v - hairline)
        if ident.hair_style == HAIR_LONG:
            locks = np.maximum(_ellipse(u, v, 0, -0.03, a * 1.1, b * 1.08),
                               np.maximum(a * 0.86 - np.abs(u), v - 0.0))
            cap = np.minimum(cap, locks)
        cv.paint(cap, hair)

    # Hat and glasses.
    if ident.hat:
        cv.paint(_box(u, v, 0, -b * 1.0, a * 0.95, b * 0.45, 0.08), ident.hat_color)
        cv.paint(_box(u, v, 0, -b * 0.66, a * 0.95, 0.03), _shade(ident.hat_color, 0.6))
        cv.paint(_box(u, v, 0, -b * 0.55, a * 1.4, 0.032, 0.03), _shade(ident.hat_color, 0.85))
    if ident.glasses:
        r, s = 0.085, ident.eye_spacing
        u, v = cv.focus(du, ey, a + 0.15)
        frame = _capsule(u, v, du - s + r, ey - 0.01, du + s - r, ey - 0.01, 0.01)
        for side in (-1, 1):
            ex = side * s + du
            if photo:
                cv.paint(_circle(u, v, ex, ey, r), (1, 1, 1), opacity=0.15, line=False)
            frame = np.minimum(frame, np.abs(_circle(u, v, ex, ey, r)) - 0.011)
            frame = np.minimum(frame, _capsule(u, v, ex + side * r, ey - 0.01,
                                               side * a * 0.98, ey - 0.03, 0.009))
        cv.paint(frame, ident.glasses_color)

    # Lighting and final colour conversion.
    img = cv.img
    if var.style == "photo":
        ramp = math.cos(var.light_angle) * cv.x + math.sin(var.light_angle) * cv.y
        img = (img - 0.5) * var.contrast + 0.5
        img = img * (var.gain * (1 + var.light_strength * ramp))[..., None]
    elif var.style == "cartoon":
        img = img * var.gain
    else:  # sketch: grayscale
        gray = img @ np.array([0.3, 0.59, 0.11], np.float32)
        img = np.repeat(gray[..., None], 3, axis=-1)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def render_batch(identities: Sequence[int], indices: Sequence[int], styles: Sequence[str], seed: int,
                 resolution: int) -> np.ndarray:
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
    return np.stack([
        render_face(identity(int(i), seed), variation(int(i), int(j), seed, style=str(s)), resolution)
        for i, j, s in zip(identities, indices, styles)])


def caption(ident: FaceIdentity, var: Variation, class_word: str = "face",
            token: Optional[str] = None) -> str:
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
        example = dict(image=render_face(ident, var, self.resolution),
                       identity=ident_id, index=index)
        if self.with_captions:
            example["caption"] = caption(ident, var, token=self.token)
        return example

    def batches(self, batch_size: int, *, epoch_seed: int = 0, shuffle: bool = True,
                drop_remainder: bool = True) -> Iterator[dict]:
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
            examples = [self[int(i)] for i in order[start:start + batch_size]]
            images = np.stack([e["image"] for e in examples])  # [B, H, W, 3] uint8
            batch = dict(image=to_unit_range(images),
                         identity=np.array([e["identity"] for e in examples], np.int32),
                         index=np.array([e["index"] for e in examples], np.int32))
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
