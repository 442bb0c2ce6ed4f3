"""The rasteriser of the synthetic faces: signed distance fields on a pixel grid.

:func:`render_face` draws a :class:`~hdb_jax.toy.face.FaceIdentity` under a
:class:`~hdb_jax.toy.face.Variation` back to front (hair behind, shoulders and neck; ears,
face and earrings; eyes and brows; nose and mouth; hair in front; hat and glasses), each shape
an anti-aliased signed distance field, then applies the style's lighting. The image spans
[-1, 1] on both axes, ``y`` pointing down; shapes are placed in "face units" around the face
centre and the pose transform maps pixels into that frame, so one face can be drawn at 32 px for
tests or at 512 px for a demo.
"""

from __future__ import annotations

import math

import numpy as np

from hdb_jax.toy.face import BACKGROUNDS, HAIR_BALD, HAIR_LONG, HAIR_SHORT, Color, FaceIdentity, Variation

_FACE_H = 0.5  # half-height of the face ellipse, image units at scale 1
_HEAD_Y = -0.02  # vertical position of the face centre in the image
_GOLD = (0.95, 0.78, 0.22)


# --- signed distances (negative inside) on [H, W] coordinate arrays ---------
def _circle(u, v, cx, cy, r):
    return np.hypot(u - cx, v - cy) - r


def _ellipse(u, v, cx, cy, rx, ry):
    du, dv = (u - cx) / rx, (v - cy) / ry
    k = np.hypot(du, dv)
    grad = np.hypot(du / rx, dv / ry) / np.maximum(k, 1e-12)  # |grad k|
    return (k - 1) / np.maximum(grad, 1 / max(rx, ry))  # first-order distance


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

    def __init__(self, resolution: int, var: "Variation"):
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
        self.line_width = {
            "photo": 0.0,
            "cartoon": max(1.2 * self.px, 0.014),
            "sketch": max(1.0 * self.px, 0.01),
        }[var.style]
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
            lo_hi = [
                (
                    max(0, math.floor((p + 1) * self.res / 2 - half)),
                    max(0, math.ceil((p + 1) * self.res / 2 + half)),
                )
                for p in centre
            ]
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


def _hair_behind(cv: _Canvas, ident: "FaceIdentity", a: float, b: float) -> None:
    """Hair behind the head, shoulders and neck."""
    u, v = cv.focus()
    skin, hair = ident.skin, ident.hair_color
    if ident.hair_style == HAIR_LONG:
        cv.paint(
            np.minimum(_ellipse(u, v, 0, -0.06, a * 1.2, b * 1.1), _box(u, v, 0, 0.35, a * 1.18, 0.45, 0.12)),
            _shade(hair, 0.8),
        )
    elif ident.hair_style == HAIR_SHORT:
        cv.paint(np.maximum(_ellipse(u, v, 0, -0.05, a * 1.12, b * 1.08), v + 0.02), _shade(hair, 0.85))
    cv.paint(_ellipse(u, v, 0, 1.2, 0.95, 0.5), ident.shirt_color)
    neck = np.maximum(_box(u, v, 0, 0.55, a * 0.42, 0.35, 0.05), v - 0.98 + 1.2 * np.abs(u))
    cv.paint(neck, _shade(skin, 0.82))


def _head(cv: _Canvas, ident: "FaceIdentity", a: float, b: float, photo: bool) -> None:
    """Ears, face (with a rim shadow in photos) and earrings."""
    skin = ident.skin
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


def _eyes(cv: _Canvas, ident: "FaceIdentity", var: "Variation", du: float, photo: bool) -> None:
    """Eyes (white, iris, pupil; lids and a highlight in photos) and eyebrows."""
    ey, gaze = ident.eye_height, 0.012 * var.yaw
    for side in (-1, 1):
        ex = side * ident.eye_spacing + du
        u, v = cv.focus(ex, ey - 0.03, 0.12)
        white = _ellipse(u, v, ex, ey, 0.07, 0.042)
        cv.paint(white, (0.96, 0.96, 0.94))
        cv.paint(np.maximum(_circle(u, v, ex + gaze, ey, 0.033), white), ident.eye_color)
        cv.paint(np.maximum(_circle(u, v, ex + gaze, ey, 0.015), white), (0.04, 0.03, 0.03), line=False)
        if photo:
            cv.paint(np.maximum(np.abs(white) - 0.007, v - ey), (0.12, 0.08, 0.07))
            cv.paint(_circle(u, v, ex + gaze + 0.012, ey - 0.012, 0.008), (1, 1, 1))
        inner, outer = ex - side * 0.06, ex + side * 0.075
        brow = _capsule(u, v, inner, ey - 0.075 - ident.brow_tilt, outer, ey - 0.085, 0.017)
        cv.paint(brow, _shade(ident.hair_color, 0.9), line=False)


def _nose_and_mouth(cv: _Canvas, ident: "FaceIdentity", var: "Variation", du: float, photo: bool) -> None:
    skin, ey = ident.skin, ident.eye_height
    nose_y = ey + ident.nose_length
    mouth_y = nose_y + 0.1
    u, v = cv.focus(du, (ey + mouth_y) / 2, (mouth_y - ey) / 2 + ident.mouth_width / 2 + 0.05)
    cv.paint(
        _capsule(u, v, du, ey + 0.04, du * 1.3, nose_y, 0.016),
        _shade(skin, 0.82),
        opacity=0.6 if photo else 1.0,
        line=False,
    )
    for side in (-1, 1):
        cv.paint(
            _ellipse(u, v, du * 1.3 + side * 0.022, nose_y, 0.013, 0.008), _shade(skin, 0.45), line=False
        )
    vb = v + var.smile * 2.5 * (u - du) ** 2  # bends the mouth into a smile
    lips = _ellipse(u, vb, du, mouth_y, ident.mouth_width / 2, 0.026)
    cv.paint(lips, _mix(skin, (0.75, 0.22, 0.28), 0.55))
    cv.paint(np.maximum(np.abs(vb - mouth_y) - 0.005, lips), (0.35, 0.08, 0.1), line=False)


def _hair_in_front(cv: _Canvas, ident: "FaceIdentity", a: float, b: float) -> None:
    """A cap above a wavy, parted hairline (plus side locks if long)."""
    u, v = cv.focus()
    if ident.hair_style != HAIR_BALD:
        hairline = -b * 0.42 + 0.06 * ident.hair_part * u / a + 0.015 * np.cos(u * 40)
        cap = np.maximum(_ellipse(u, v, 0, -0.03, a * 1.07, b * 1.05), v - hairline)
        if ident.hair_style == HAIR_LONG:
            locks = np.maximum(
                _ellipse(u, v, 0, -0.03, a * 1.1, b * 1.08), np.maximum(a * 0.86 - np.abs(u), v - 0.0)
            )
            cap = np.minimum(cap, locks)
        cv.paint(cap, ident.hair_color)


def _hat_and_glasses(cv: _Canvas, ident: "FaceIdentity", a: float, b: float, du: float, photo: bool) -> None:
    u, v = cv.focus()
    if ident.hat:
        cv.paint(_box(u, v, 0, -b * 1.0, a * 0.95, b * 0.45, 0.08), ident.hat_color)
        cv.paint(_box(u, v, 0, -b * 0.66, a * 0.95, 0.03), _shade(ident.hat_color, 0.6))
        cv.paint(_box(u, v, 0, -b * 0.55, a * 1.4, 0.032, 0.03), _shade(ident.hat_color, 0.85))
    if ident.glasses:
        r, s, ey = 0.085, ident.eye_spacing, ident.eye_height
        u, v = cv.focus(du, ey, a + 0.15)
        frame = _capsule(u, v, du - s + r, ey - 0.01, du + s - r, ey - 0.01, 0.01)
        for side in (-1, 1):
            ex = side * s + du
            if photo:
                cv.paint(_circle(u, v, ex, ey, r), (1, 1, 1), opacity=0.15, line=False)
            frame = np.minimum(frame, np.abs(_circle(u, v, ex, ey, r)) - 0.011)
            frame = np.minimum(
                frame, _capsule(u, v, ex + side * r, ey - 0.01, side * a * 0.98, ey - 0.03, 0.009)
            )
        cv.paint(frame, ident.glasses_color)


def _finish(cv: _Canvas, var: "Variation") -> np.ndarray:
    """Lighting and contrast (photos), gain (cartoons) or grayscale (sketches); uint8."""
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


def render_face(ident: "FaceIdentity", var: "Variation", resolution: int = 64) -> np.ndarray:
    """Rasterises one face, back to front.

    Args:
      ident: the identity to draw.
      var: pose, lighting, background and style of this image.
      resolution: output height and width in pixels.

    Returns:
      uint8 array [resolution, resolution, 3].
    """
    cv = _Canvas(resolution, var)
    photo = var.style == "photo"
    b = _FACE_H
    a = b * ident.face_ratio  # face half-width
    du = 0.06 * var.yaw  # features shift with the head turn
    _hair_behind(cv, ident, a, b)
    _head(cv, ident, a, b, photo)
    _eyes(cv, ident, var, du, photo)
    _nose_and_mouth(cv, ident, var, du, photo)
    _hair_in_front(cv, ident, a, b)
    _hat_and_glasses(cv, ident, a, b, du, photo)
    return _finish(cv, var)
