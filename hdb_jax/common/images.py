"""Pixels in, pixels out: the one normaliser, uint8 conversion, PNG files and image grids.

Every model here takes NHWC float images in [-1, 1]; files and the identity scorers hold uint8
[0, 255]. :func:`to_unit_range` and :func:`to_uint8` are the only conversions between the two.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np


def to_unit_range(images):
    """uint8 images in [0, 255] -> float32 in [-1, 1] (any shape; numpy in, numpy out, jax in, jax out)."""
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """Float images in [-1, 1] -> uint8 [0, 255] (rounded, clipped; any shape)."""
    scaled = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def save_images(images: np.ndarray, directory, names: Sequence[str]) -> list[Path]:
    """Writes each uint8 image [H, W, 3] of ``images`` as ``directory/name`` (PNG).

    Args:
      images: uint8 [N, H, W, 3].
      directory: output folder (created).
      names: one file name per image (``.png`` added when missing).

    Returns:
      The written paths.
    """
    from PIL import Image

    if len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, name in zip(images, names):
        path = directory / (name if name.endswith(".png") else f"{name}.png")
        Image.fromarray(np.asarray(image, np.uint8)).save(path)
        paths.append(path)
    return paths


def grid(images: np.ndarray, *, cols: int | None = None, pad_value: int = 255) -> np.ndarray:
    """uint8 images [N, H, W, C] tiled row-major into one uint8 image [rows·H, cols·W, C]."""
    images = np.asarray(images, np.uint8)
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * h, cols * w, c), pad_value, np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        out[r * h : (r + 1) * h, k * w : (k + 1) * w] = image
    return out


def save_grid(
    images: np.ndarray,
    path,
    *,
    cols: int | None = None,
    labels: Sequence[str] | None = None,
    label_height: int = 14,
) -> Path:
    """Writes uint8 images [N, H, W, 3] as one PNG grid, row-major.

    Args:
      images: uint8 [N, H, W, 3].
      path: output file.
      cols: images per row (default ``ceil(sqrt(N))``).
      labels: optional caption per image, drawn in a strip under it.
      label_height: height of that strip in pixels.

    Returns:
      The path written. Without labels the grid is ``rows·H x cols·W`` pixels.
    """
    from PIL import Image, ImageDraw

    images = np.asarray(images, np.uint8)
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    if labels:
        cell_h = h + label_height
        canvas = Image.new("RGB", (cols * w, rows * cell_h), "white")
        draw = ImageDraw.Draw(canvas)
        for i, image in enumerate(images):
            x, y = (i % cols) * w, (i // cols) * cell_h
            canvas.paste(Image.fromarray(image), (x, y))
            draw.text((x + 1, y + h + 1), str(labels[i]), fill="black")
    else:
        canvas = Image.fromarray(grid(images, cols=cols))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
