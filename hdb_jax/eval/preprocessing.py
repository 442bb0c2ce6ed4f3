"""Image preprocessing of the real-model metrics (:mod:`hdb_jax.eval.real`), as transformers does it.

The transformers image processors resize with PIL in two separable passes (width, then height),
each rounded to 8 bits; :class:`Preprocessing` does the same in JAX, inside the jitted forward
pass, from the sizes, kernel and statistics of a ``preprocessor_config.json``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos3", 2: "linear", 3: "cubic"}  # processors' PIL codes -> JAX


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """uint8 images -> normalised model inputs, as a transformers image processor makes them.

    Attributes:
        shortest_edge: resize so that the shorter side has this length (aspect ratio kept), or
        size: resize to exactly ``(height, width)``; neither: no resizing.
        crop: center crop ``(height, width)`` after resizing, or None.
        method: the ``jax.image.resize`` kernel (PIL's bicubic is ``"cubic"``).
        rescale, mean, std: 8-bit values -> ``[0, 1]`` factor, then per-channel normalisation.
    """

    shortest_edge: int | None = None
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    method: str = "cubic"
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    rescale: float = 1.0 / 255.0

    @classmethod
    def clip_default(cls, image_size: int = 224) -> Preprocessing:
        """CLIP's processor: short side to ``image_size`` (bicubic), center crop, CLIP statistics."""
        return cls(shortest_edge=image_size, crop=(image_size, image_size), mean=CLIP_MEAN, std=CLIP_STD)

    @classmethod
    def dino_protocol(cls, image_size: int = 224) -> Preprocessing:
        """DreamBooth's DINO transform: short side to 256 (224 inputs), bicubic; crop; ImageNet stats."""
        return cls(
            shortest_edge=round(image_size * 256 / 224),
            crop=(image_size, image_size),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )

    @classmethod
    def from_config(
        cls, config: dict, fallback: Preprocessing, *, int_size_is_shortest_edge: bool, crops_by_default: bool
    ) -> Preprocessing:
        """Reads the contents of an image processor's ``preprocessor_config.json``.

        Args:
            config: the parsed JSON; fallback: values for the keys it lacks.
            int_size_is_shortest_edge: how a plain integer ``size`` reads (True for CLIP's processor;
                ViT's resizes to a square); crops_by_default: whether ``do_center_crop`` defaults to True.

        Returns:
            The preprocessing.
        """

        def pair(value) -> tuple[int, int]:
            if isinstance(value, int):
                return value, value
            if isinstance(value, dict) and {"height", "width"} <= set(value):
                return int(value["height"]), int(value["width"])
            raise ValueError(f"unsupported size {value!r}")

        shortest, size, raw = fallback.shortest_edge, fallback.size, config.get("size")
        if not config.get("do_resize", True):
            shortest, size = None, None
        elif isinstance(raw, int) and int_size_is_shortest_edge:
            shortest, size = raw, None
        elif isinstance(raw, dict) and "shortest_edge" in raw:
            shortest, size = int(raw["shortest_edge"]), None
        elif raw is not None:
            shortest, size = None, pair(raw)
        crop = (
            (pair(config["crop_size"]) if "crop_size" in config else fallback.crop)
            if config.get("do_center_crop", crops_by_default)
            else None
        )
        resample = config.get("resample", 3)
        if resample not in _PIL_RESAMPLE:
            raise ValueError(f"unsupported PIL resampling code {resample} (known: {sorted(_PIL_RESAMPLE)})")
        normalize = config.get("do_normalize", True)
        return cls(
            shortest_edge=shortest,
            size=size,
            crop=crop,
            method=_PIL_RESAMPLE[resample],
            mean=tuple(config.get("image_mean", fallback.mean)) if normalize else (0.0, 0.0, 0.0),
            std=tuple(config.get("image_std", fallback.std)) if normalize else (1.0, 1.0, 1.0),
            rescale=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0,
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after resizing (transformers' rounding: the long side is truncated)."""
        if self.size is not None or self.shortest_edge is None:
            return self.size or (height, width)
        short, long = sorted((height, width))
        new_long = int(self.shortest_edge * long / short)
        return (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Preprocesses a batch (traceable: the sizes depend on static shapes only).

        Args:
            images: uint8 (or 0..255 float) images ``[N, H, W, 3]``.

        Returns:
            float32 pixels ``[N, 3, h, w]``, channels first as the Flax models take them.
        """
        x = jnp.asarray(images, jnp.float32)  # [N, H, W, 3], 0..255
        n, height, width, channels = x.shape
        new_h, new_w = self.resized_size(height, width)
        # PIL resamples horizontally first, then vertically, rounding half up to 8 bits after each pass.
        for shape in ((n, height, new_w, channels), (n, new_h, new_w, channels)):
            if shape != x.shape:
                x = jnp.clip(jnp.floor(jax.image.resize(x, shape, self.method) + 0.5), 0.0, 255.0)
        if self.crop is not None:
            crop_h, crop_w = self.crop
            if crop_h > new_h or crop_w > new_w:
                raise ValueError(f"crop {self.crop} is larger than the resized image {(new_h, new_w)}")
            top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
            x = x[:, top : top + crop_h, left : left + crop_w]
        x = (x * self.rescale - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
        return jnp.transpose(x, (0, 3, 1, 2))  # [N, 3, h, w]
