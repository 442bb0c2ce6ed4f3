"""The hypernetwork's image encoder: a CLIP vision tower, and its torch-free weight loading.

The encoder is transformers' Flax CLIP vision transformer (reached through
:mod:`hdb_jax.sd.hf`), built from a :class:`CLIPVisionConfig`:

* ``tiny``: 32 px images, 8 px patches, width 32, 2 layers, 4 heads (17 tokens), for tests;
* ``sd15``: the ViT-H/14 vision tower of OpenCLIP ViT-H-14 (224 px, 14 px patches, width 1280,
  32 layers, 16 heads, MLP 5120, exact GELU): 257 tokens of width 1280, 630,766,080 parameters.

Its parameter tree is exactly the one transformers' ``FlaxCLIPVisionModule`` has,
``{"vision_model": ...}``, so PyTorch ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` /
``CLIPModel`` checkpoints in safetensors convert with transformers' own key helper
(:func:`load_encoder_params`), the same way :mod:`hdb_jax.sd.loading` loads the text encoder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax.sd import hf, loading
from hdb_jax.sd.loading import ModelLoadError

# OpenAI CLIP's pixel statistics (also those of OpenCLIP ViT-H-14), per RGB channel.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Fields that define the architecture: a checkpoint must agree with the config on all of them.
_ARCH_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
)

ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
    ),
    # OpenCLIP ViT-H-14 (laion2B-s32B-b79K), vision tower only.
    "sd15": dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1024,
    ),
}


def encoder_config(name: str) -> hf.CLIPVisionConfig:
    """The CLIP vision config called ``name`` (``tiny`` or ``sd15``)."""
    if name not in ENCODER_CONFIGS:
        raise ValueError(f"unknown encoder config {name!r}; choose from {sorted(ENCODER_CONFIGS)}")
    return hf.CLIPVisionConfig(**ENCODER_CONFIGS[name])


def num_tokens(config: hf.CLIPVisionConfig) -> int:
    """Feature tokens per image: one per patch plus the class token."""
    return (config.image_size // config.patch_size) ** 2 + 1


class ImageEncoder(hf.FlaxCLIPVisionModule):
    """CLIP vision tower taking NHWC images in [-1, 1]; returns all last-layer tokens.

    A subclass of transformers' ``FlaxCLIPVisionModule`` (same ``setup``, same parameter tree
    ``{"vision_model": ...}``) whose ``__call__`` normalises the pixels first and returns the
    last hidden state, not a model-output object.

    Attributes:
      config: the ``CLIPVisionConfig``.
      dtype: computation dtype.
    """

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def __call__(self, images: jax.Array) -> jax.Array:  # pylint: disable=arguments-differ
        """Encodes images.

        Args:
          images: ``[B, S, S, 3]`` in [-1, 1], ``S`` = ``config.image_size`` (see
            :func:`resize_images`).

        Returns:
          Features ``[B, N, D]``: the class token then one per patch, before any final norm.
        """
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(
                f"image encoder expects NHWC images [B, {size}, {size}, 3] in [-1, 1], got "
                f"{tuple(images.shape)}; resize with hdb_jax.hypernet.resize_images"
            )
        mean = jnp.asarray(CLIP_MEAN, jnp.float32)
        std = jnp.asarray(CLIP_STD, jnp.float32)
        pixels = ((images.astype(jnp.float32) + 1.0) * 0.5 - mean) / std  # [B, S, S, 3]
        out = self.vision_model(pixel_values=pixels.astype(self.dtype), deterministic=True)
        return out.last_hidden_state  # [B, N, D]


def resize_images(images: jax.Array, size: int) -> jax.Array:
    """Bicubic (antialiased) resize of NHWC images to ``[B, size, size, C]``, clipped to [-1, 1].

    Images already at ``size`` are returned unchanged.
    """
    b, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    out = jax.image.resize(images, (b, size, size, c), method="cubic", antialias=True)
    return jnp.clip(out, -1.0, 1.0)


def abstract_encoder_params(config: hf.CLIPVisionConfig) -> dict:
    """The encoder's parameter shapes (``jax.ShapeDtypeStruct``), without allocating them."""
    encoder = ImageEncoder(config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda k, x: encoder.init(k, x)["params"], jax.random.PRNGKey(0), images)


def _read_config(folder: Path) -> hf.CLIPVisionConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: missing file 'config.json'")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from err
    raw = raw.get("vision_config", raw)  # a full CLIPModel config nests the vision tower
    return hf.CLIPVisionConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [folder / s for s in shards]
    raise ModelLoadError(f"{folder}: no 'model.safetensors' (or sharded index); PyTorch pickles are not read")


def convert_vision_state(state: Mapping[str, np.ndarray], abstract: Mapping[str, Any], source: str) -> dict:
    """PyTorch CLIP tensors -> the encoder's Flax tree, checked against ``abstract`` shapes.

    Keys outside ``vision_model.`` (a projection head, a text tower, ``logit_scale``) and
    ``position_ids`` buffers are skipped.

    Raises:
      ModelLoadError: missing, unexpected or mis-shaped vision-tower parameters.
    """

    def rename(name, tensor, expected):
        return hf.transformers_rename_and_reshape(
            tuple(name.split(".")), np.asarray(tensor), expected, "vision_model"
        )

    return loading.convert_tensors(
        state,
        abstract,
        rename,
        what="the image encoder",
        source=source,
        skip=lambda name: not name.startswith("vision_model.") or name.endswith("position_ids"),
    )


def load_encoder_params(
    path: str | os.PathLike,
    config: hf.CLIPVisionConfig | None = None,
    *,
    param_dtype=jnp.float32,
) -> tuple[hf.CLIPVisionConfig, dict]:
    """Loads a CLIP vision tower from a local transformers directory, without torch.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index),
        as PyTorch ``CLIPVisionModel(WithProjection)`` or ``CLIPModel.save_pretrained`` writes.
      config: the config the weights must fit (e.g. ``encoder_config("sd15")``); None: use the
        directory's. Architecture fields are compared and a mismatch is refused.
      param_dtype: dtype of the returned arrays.

    Returns:
      ``(config, params)`` with ``params = {"vision_model": ...}`` of jax arrays.

    Raises:
      ModelLoadError: missing files, another architecture, or parameters that do not fit.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"image encoder directory {folder} does not exist")
    found = _read_config(folder)
    if config is None:
        config = found
    else:
        diff = [
            f"{f}={getattr(found, f)!r} (expected {getattr(config, f)!r})"
            for f in _ARCH_FIELDS
            if getattr(found, f) != getattr(config, f)
        ]
        if diff:
            raise ModelLoadError(f"{folder}: not the configured image encoder: {', '.join(diff)}")
    files = _weight_files(folder)
    tree = convert_vision_state(
        loading.read_safetensors(files), abstract_encoder_params(config), os.fspath(files[0])
    )
    return config, jax.tree_util.tree_map(lambda x: jnp.asarray(x, param_dtype), tree)
