"""Image-folder source: the few photos of one subject that a user personalises on.

:func:`load_image` turns one file of any common layout (EXIF-rotated phone photos,
grayscale, 16-bit, CMYK, palette or transparent images) into a square uint8 RGB array.
:class:`ImageFolder` scans a folder once, decodes every file fully so that broken ones
are found up front, keeps the good images in memory and reports the rest in a single
:class:`BadImagesWarning`; training then never meets a bad file. Its
:meth:`ImageFolder.batches` yields the same layout as ``SyntheticFaces.batches``.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import warnings
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hdb_jax.common.images import to_unit_range

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")  # a GIF is read at its first frame
MIN_SIZE = 64  # default smallest accepted short side, pixels
MAX_PIXELS = 64_000_000  # default largest accepted width x height (checked before decoding)

# Reasons a file is skipped, as they appear in warnings and errors.
UNSUPPORTED = "unsupported extension"
NOT_AN_IMAGE = "not an image"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
TOO_SMALL = "too small"
TOO_LARGE = "too large"
UNREADABLE = "unreadable"


class BadImagesWarning(UserWarning):
    """Some files of an image folder were skipped; the message lists each with its reason."""


class NoImagesError(ValueError):
    """An image folder holds no usable image."""


class BadImageError(ValueError):
    """One file cannot be used as a training image.

    Attributes:
      path: the file.
      reason: one of the reason constants of this module (e.g. ``TRUNCATED``).
      detail: a human-readable explanation.
    """

    def __init__(self, path: str, reason: str, detail: str = ""):
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))
        self.path, self.reason, self.detail = path, reason, detail


def _looks_like_text(data: bytes) -> bool:
    head = data[:4096]
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at the end is still text
        return e.start >= len(head) - 3
    return True


def _on_white(img: Image.Image) -> Image.Image:
    """Composites an image with transparency over a white background; returns RGB."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scales a 16-bit, 32-bit integer or float grayscale image to 8-bit RGB."""
    x = np.asarray(img).astype(np.float64)  # [H, W]
    if img.mode.startswith("I;16"):
        scale = 1 / 257  # 65535 -> 255
    else:  # "I" or "F": the range is not stored, infer it from the values
        top = float(x.max()) if x.size else 0.0
        if img.mode == "F" and top <= 1.0:
            scale = 255.0
        elif top <= 255:
            scale = 1.0
        elif top <= 65535:
            scale = 1 / 257
        else:
            scale = 255 / top
    gray = np.clip(np.rint(x * scale), 0, 255).astype(np.uint8)  # [H, W]
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")


def to_rgb8(img: Image.Image) -> Image.Image:
    """Converts an image of any Pillow mode to 8-bit RGB.

    Transparent pixels (RGBA, LA, palette with transparency) are composited on white;
    16-bit and 32-bit grayscale is scaled down to 8 bits (not clipped); CMYK, YCbCr
    and the others use Pillow's conversion.

    Args:
      img: a loaded Pillow image.

    Returns:
      An RGB image of the same size.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        return _on_white(img)
    if mode == "P":
        return img.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _on_white(img)
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV, RGBX


def center_square(img: Image.Image, resolution: int) -> Image.Image:
    """Centre-crops to a square on the short side, then resizes it to ``resolution``.

    Equivalent to resizing the short side to ``resolution`` and centre-cropping.

    Args:
      img: an image of any size.
      resolution: output side, pixels.

    Returns:
      An image of size (resolution, resolution).
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img


def _decode(
    data: bytes, path: str, resolution: int, min_size: int, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decodes file bytes to uint8 [resolution, resolution, 3] or raises BadImageError."""
    if not data:
        raise BadImageError(path, CORRUPT, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "error", Image.DecompressionBombWarning
            )  # Pillow's own guard, from the header
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(path, TOO_LARGE, str(e)) from None
    except UnidentifiedImageError:
        if _looks_like_text(data):
            raise BadImageError(path, NOT_AN_IMAGE, "text file") from None
        raise BadImageError(path, CORRUPT, "unrecognised image data") from None
    except Exception as e:  # noqa: BLE001 - any header parsing failure
        raise BadImageError(path, CORRUPT, f"{type(e).__name__}: {e}") from None
    if img.size[0] * img.size[1] > max_pixels:  # from the header: nothing decoded yet
        raise BadImageError(path, TOO_LARGE, f"{img.size[0]}x{img.size[1]} pixels, more than {max_pixels}")
    try:
        img.load()  # decode fully: truncated or broken data fails here, not later
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
        reason = TRUNCATED if "truncated" in str(e).lower() else CORRUPT
        raise BadImageError(path, reason, f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if min(w, h) < min_size:
        raise BadImageError(path, TOO_SMALL, f"{w}x{h}, short side < {min_size}")
    try:
        out = np.asarray(center_square(to_rgb8(img), resolution), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - an exotic mode Pillow cannot convert
        raise BadImageError(path, CORRUPT, f"{type(e).__name__}: {e}") from None
    return np.ascontiguousarray(out)  # [resolution, resolution, 3]


def load_image(
    path: str, resolution: int, *, min_size: int = MIN_SIZE, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Loads one image as a square, RGB, uint8 array.

    Applies the EXIF orientation, converts the colour layout with :func:`to_rgb8`,
    then :func:`center_square` (Lanczos resampling).

    Args:
      path: a .jpg, .jpeg, .png, .webp, .bmp or .gif file.
      resolution: output height and width.
      min_size: smallest accepted short side (after EXIF rotation), pixels.
      max_pixels: largest accepted width x height, checked from the header before decoding.

    Returns:
      uint8 array [resolution, resolution, 3].

    Raises:
      FileNotFoundError: ``path`` does not exist.
      BadImageError: the file is not a usable image; ``reason`` says why.
    """
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        raise BadImageError(path, UNSUPPORTED, f"expected one of {', '.join(IMAGE_EXTENSIONS)}")
    with open(path, "rb") as f:
        data = f.read()
    return _decode(data, path, resolution, min_size, max_pixels)


def _list_files(directory: str, recursive: bool) -> list:
    """Visible regular files under ``directory``, sorted; hidden files and folders skipped."""
    if not recursive:
        names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
        return [p for p in (os.path.join(directory, n) for n in names) if os.path.isfile(p)]
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(files) if not n.startswith(".")]
    return found


@dataclasses.dataclass
class ImageFolder:
    """The images of one folder, validated and decoded once, kept in memory.

    Attributes:
      directory: the folder to read.
      resolution: side of the square images, pixels.
      min_size: files whose short side is below this are skipped as too small.
      flip: randomly mirror images horizontally in :meth:`batches`.
      recursive: also read sub-folders (hidden ones are skipped).
      caption: a fixed prompt for every image, e.g. "a photo of sks face".
      paths: (after construction) the loaded files, in index order.
      skipped: (after construction) (path, reason, detail) of every skipped file.
    """

    directory: str
    resolution: int = 512
    min_size: int = MIN_SIZE
    flip: bool = False
    recursive: bool = False
    caption: Optional[str] = None
    paths: list = dataclasses.field(init=False, repr=False, default_factory=list)
    skipped: list = dataclasses.field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        if self.resolution < 1 or self.min_size < 1:
            raise ValueError("resolution and min_size must be positive")
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"image folder not found: {self.directory!r}")
        self._images = []  # uint8 [resolution, resolution, 3] each
        for path in _list_files(self.directory, self.recursive):
            try:
                image = load_image(path, self.resolution, min_size=self.min_size)
            except BadImageError as e:
                self.skipped.append((path, e.reason, e.detail))
                continue
            except OSError as e:  # permission denied, vanished meanwhile, I/O error
                self.skipped.append((path, UNREADABLE, f"{type(e).__name__}: {e}"))
                continue
            self.paths.append(path)
            self._images.append(image)
        if self.skipped:
            lines = [f"  {p}: {r}" + (f" ({d})" if d else "") for p, r, d in self.skipped]
            warnings.warn(
                BadImagesWarning(
                    f"skipped {len(self.skipped)} of {len(self.skipped) + len(self.paths)} files in "
                    f"{self.directory!r}:\n" + "\n".join(lines)
                ),
                stacklevel=3,
            )
        if not self._images:
            counts = {}
            for _, reason, _ in self.skipped:
                counts[reason] = counts.get(reason, 0) + 1
            found = ", ".join(f"{n} {r}" for r, n in sorted(counts.items())) or "no files"
            raise NoImagesError(
                f"no usable images in {self.directory!r} ({found}); "
                f"expected {', '.join(IMAGE_EXTENSIONS)} files with a short side "
                f">= {self.min_size} px"
            )

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> dict:
        """Returns dict(image=uint8 [H, W, 3], path=str[, caption=str])."""
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        example = dict(image=self._images[i], path=self.paths[i])
        if self.caption is not None:
            example["caption"] = self.caption
        return example

    def _epoch(self, seed: int, epoch: int, shuffle: bool, slots: int) -> tuple:
        """(order int [slots], flips bool [slots]) of one epoch, deterministic in (seed, epoch).

        The epoch's order is cycled to fill ``slots``; every slot draws its own flip.
        """
        rng = np.random.default_rng([seed, 3, epoch])
        n = len(self)
        order = rng.permutation(n) if shuffle else np.arange(n)
        flips = rng.random(slots) < 0.5 if self.flip else np.zeros(slots, bool)
        return np.resize(order, slots), flips

    def _batch(self, order, flips) -> dict:
        images = np.stack([self._images[i] for i in order])  # [B, H, W, 3] uint8
        if flips.any():
            images[flips] = images[flips, :, ::-1]
        batch = dict(image=to_unit_range(images), index=np.asarray(order, np.int32))
        if self.caption is not None:
            batch["caption"] = [self.caption] * len(order)
        return batch

    def batches(
        self, batch_size: int, *, seed: int, epoch: int = 0, shuffle: bool = True, repeat: bool = False
    ) -> Iterator[dict]:
        """Iterates over the images in full batches.

        One epoch is ``ceil(len / batch_size)`` batches that show every image at least
        once: the last batch (or the only one, when the folder holds fewer images than
        ``batch_size``) is filled by cycling through the epoch's order again. With
        ``repeat`` the epochs ``epoch, epoch + 1, ...`` follow each other without end,
        batches running across epoch boundaries. Each image's flip is drawn per epoch.

        Args:
          batch_size: examples per batch.
          seed: seeds the shuffle and the flips.
          epoch: the (first) epoch; each epoch has its own order.
          shuffle: whether to permute the images.
          repeat: iterate forever instead of for one epoch.

        Returns:
          An iterator of dicts: image float32 [B, H, W, 3] in [-1, 1], index int32 [B]
          (position in the folder) and, if ``caption`` is set, caption list[str].
        """
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        n = len(self)
        if not repeat:
            slots = -(-n // batch_size) * batch_size
            order, flips = self._epoch(seed, epoch, shuffle, slots)
            for start in range(0, slots, batch_size):
                yield self._batch(order[start : start + batch_size], flips[start : start + batch_size])
            return
        pending_order = np.zeros(0, np.int64)
        pending_flips = np.zeros(0, bool)
        for e in itertools.count(epoch):
            order, flips = self._epoch(seed, e, shuffle, n)
            pending_order = np.concatenate([pending_order, order])
            pending_flips = np.concatenate([pending_flips, flips])
            while len(pending_order) >= batch_size:
                yield self._batch(pending_order[:batch_size], pending_flips[:batch_size])
                pending_order, pending_flips = pending_order[batch_size:], pending_flips[batch_size:]
