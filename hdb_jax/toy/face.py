"""What a synthetic face is: an identity's attributes and one image's variation, as plain data.

:mod:`hdb_jax.toy.synthetic` draws them from integer ids; :mod:`hdb_jax.toy.render` draws them as
pixels. Colours are RGB in [0, 1]; lengths are in face units.
"""

from __future__ import annotations

import dataclasses

STYLES = ("photo", "cartoon", "sketch")
BACKGROUNDS = {  # name -> RGB in [0, 1]; names appear verbatim in captions.
    "red": (0.80, 0.20, 0.20),
    "green": (0.25, 0.62, 0.30),
    "blue": (0.22, 0.40, 0.80),
    "yellow": (0.95, 0.85, 0.25),
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.09),
    "gray": (0.55, 0.55, 0.55),
    "purple": (0.52, 0.30, 0.68),
    "orange": (0.95, 0.55, 0.15),
    "pink": (0.95, 0.62, 0.75),
    "brown": (0.50, 0.32, 0.18),
}
HAIR_SHORT, HAIR_LONG, HAIR_BALD = 0, 1, 2

Color = tuple  # (r, g, b) floats in [0, 1]


@dataclasses.dataclass(frozen=True)
class FaceIdentity:
    """Per-identity attributes (lengths in face units, colours RGB in [0, 1])."""

    identity_id: int
    face_ratio: float  # face ellipse width / height
    skin: Color
    hair_color: Color
    hair_style: int  # HAIR_SHORT (0), HAIR_LONG (1) or HAIR_BALD (2)
    hair_part: float  # in [-1, 1]: tilt of the fringe
    eye_color: Color
    eye_spacing: float  # half distance between the eye centres
    eye_height: float  # eye centre y relative to the face centre (< 0: up)
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

    tx: float  # translation, image units
    ty: float
    scale: float
    rotation: float  # radians
    yaw: float  # in [-1, 1]: squashes the head, shifts the features
    smile: float  # in [0, 1]
    gain: float  # brightness multiplier
    contrast: float
    light_angle: float  # direction of the light gradient, radians
    light_strength: float
    background: str  # key of BACKGROUNDS
    style: str  # one of STYLES
