"""The tiny SD-family model: SD 1.5's architecture at small widths, for tests and the toy world.

The component configs are data (``configs/tiny/*.json`` beside ``configs/sd15/``); :func:`tiny_configs`
fills in the sizes a caller chooses (resolution, UNet and VAE widths, text encoder width and
depth) and :func:`tiny` builds the bundle with our offline tokenizer. Weights come from
``random_params`` or a trained checkpoint (the toy base model is one).
"""

from __future__ import annotations

import json
from importlib import resources

import jax.numpy as jnp

from hdb_jax.sd import attention as attention_lib
from hdb_jax.sd import vocab
from hdb_jax.sd.model import StableDiffusion


def _template(name: str) -> dict:
    return json.loads(resources.files("hdb_jax.sd").joinpath("configs", "tiny", f"{name}.json").read_text())


def tiny_configs(
    *,
    resolution: int = 32,
    unet_channels: tuple[int, ...] = (32, 64),
    vae_channels: tuple[int, ...] = (32, 64),
    text_width: int = 32,
    text_layers: int = 2,
    vocab_size: int | None = None,
    tokenizer=None,
) -> dict:
    """Small configs of the SD 1.5 architecture family, for tests and the demo.

    The UNet keeps SD's layout (cross-attention down blocks, a plain last down block, mirrored
    up blocks, a cross-attention mid block) at small widths. GroupNorm uses 32 groups, so every
    width must be a multiple of 32.
    """
    depth = len(unet_channels)
    factor = 2 ** (len(vae_channels) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} must be a multiple of {factor}")
    tok = tokenizer
    if vocab_size is None:
        vocab_size = len(tok) if tok is not None else vocab.vocab_size()
    bos = tok.bos_token_id if tok is not None else vocab_size - 2
    eos = tok.eos_token_id if tok is not None else vocab_size - 1
    configs = {name: _template(name) for name in ("unet", "vae", "text_encoder", "scheduler")}
    configs["unet"].update(
        sample_size=resolution // factor,
        block_out_channels=list(unet_channels),
        cross_attention_dim=text_width,
        down_block_types=["CrossAttnDownBlock2D"] * (depth - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (depth - 1),
    )
    configs["vae"].update(
        block_out_channels=list(vae_channels),
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        sample_size=resolution,
    )
    configs["text_encoder"].update(
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=text_layers,
        vocab_size=vocab_size,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=text_width,
    )
    return configs


def tiny(
    *,
    resolution: int = 32,
    dtype=jnp.float32,
    attention: str = attention_lib.DEFAULT_IMPLEMENTATION,
    attention_chunk: int = attention_lib.DEFAULT_CHUNK,
    **overrides,
) -> StableDiffusion:
    """A tiny randomly-initialisable SD-family model with our own offline tokenizer.

    Args:
      resolution: image side in pixels.
      dtype: computation dtype.
      attention: the UNet attention implementation (see :mod:`hdb_jax.sd.attention`).
      attention_chunk: queries per chunk for the chunked implementations.
      **overrides: forwarded to :func:`tiny_configs` (widths, depth).

    Returns:
      The model bundle; weights come from ``init_params``.
    """
    tokenizer = vocab.tiny_tokenizer()
    configs = tiny_configs(resolution=resolution, tokenizer=tokenizer, **overrides)
    return StableDiffusion.from_configs(
        configs, tokenizer, name="tiny", dtype=dtype, attention=attention, attention_chunk=attention_chunk
    )
