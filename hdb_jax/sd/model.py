"""Stable Diffusion as modules plus pure functions over a separate parameter tree.

A :class:`StableDiffusion` holds the Flax modules (UNet, VAE, CLIP text encoder), the tokenizer,
the training noise scheduler and the configs they were built from; it holds no weights. Weights
live in a plain dict ``{"unet": ..., "vae": ..., "text_encoder": ...}`` that callers pass to the
pure functions below, so they can be sharded, donated, frozen or differentiated independently.

Layout conventions (those of diffusers' Flax models): images are NHWC in [-1, 1] at our API,
latents are NCHW, already multiplied by the VAE scaling factor.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from importlib import resources
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax.sd import attention as attention_lib
from hdb_jax.sd import hf
from hdb_jax.sd import remat as remat_lib

Params = Mapping[str, Any]
COMPONENTS = ("unet", "vae", "text_encoder")

# Config keys the Flax classes do not take but whose value they implement anyway (the value
# listed is the only one they implement). Any other value is refused rather than ignored.
_UNET_FIXED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
    "upcast_attention": None,
    "cross_attention_norm": None,
    "encoder_hid_dim": None,
    "dual_cross_attention": False,
    "time_cond_proj_dim": None,
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "time_embedding_act_fn": None,
    "attention_type": "default",
    "encoder_hid_dim_type": None,
    "reverse_transformer_layers_per_block": None,
}
_VAE_FIXED: dict[str, Any] = {
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}
# Keys that describe the checkpoint rather than the architecture.
_IGNORED_KEYS = ("architectures", "torch_dtype", "transformers_version", "mid_block_type")


def exact_geglu(next_fun, args, kwargs, context):
    """Method interceptor: diffusers' Flax GEGLU with exact (erf) GELU, as in PyTorch.

    diffusers' Flax ``FlaxGEGLU`` calls ``flax.linen.gelu``, whose default is the tanh
    approximation, while the PyTorch UNet that SD checkpoints were trained with uses the exact
    GELU; the difference moves UNet outputs by ~1e-4. We compute the exact form instead.
    """
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, hf.FlaxGEGLU):
        return next_fun(*args, **kwargs)
    hidden = module.proj(args[0])
    linear, gate = jnp.split(hidden, 2, axis=-1)
    return linear * jax.nn.gelu(gate, approximate=False)


class ConfigError(ValueError):
    """A model config asks for something the Flax classes cannot build."""


def _module_kwargs(cls, config: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> dict:
    """Splits a diffusers config into constructor kwargs, refusing unsupported settings."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in fields:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key in fixed:
            if value != fixed[key] and not (not value and not fixed[key]):
                raise ConfigError(
                    f"{where}: '{key}'={value!r} is not supported by {cls.__name__} (only {fixed[key]!r})"
                )
        elif key not in _IGNORED_KEYS and value not in (None, False):
            # Keys of newer diffusers versions are harmless only at their defaults; we cannot
            # know those, so name them rather than guess.
            raise ConfigError(f"{where}: unknown config key '{key}'={value!r}")
    if "mid_block_type" in config and config["mid_block_type"] not in (
        None,
        "UNetMidBlock2DCrossAttn",
    ):
        raise ConfigError(f"{where}: mid_block_type={config['mid_block_type']!r} is not supported")
    return kwargs


def _scheduler_kwargs(cls, config: Mapping[str, Any]) -> dict:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "dtype"}
    return {k: v for k, v in config.items() if k in accepted}


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """Modules, tokenizer, noise schedule and configs of one Stable Diffusion model.

    Attributes:
      unet: diffusers' ``FlaxUNet2DConditionModel`` (a linen module).
      vae: diffusers' ``FlaxAutoencoderKL``.
      text_encoder: transformers' ``FlaxCLIPTextModule`` (the bare linen module).
      tokenizer: a ``CLIPTokenizer`` or None (shape-only models need none).
      noise_scheduler: a ``FlaxDDPMScheduler`` built from the model's scheduler config; it defines
        the forward (noising) process used by every training loss.
      configs: the raw configs, keyed ``unet``, ``vae``, ``text_encoder``, ``scheduler``.
      name: where the model came from (a directory, a hub id, ``tiny`` or ``sd15-shapes``).
      attention: how the UNet's attention layers compute (one of
        :data:`hdb_jax.sd.attention.IMPLEMENTATIONS`; ``diffusers`` runs the library's code).
      attention_chunk: queries per chunk for the chunked implementations.
      remat: what the UNet's backward pass recomputes instead of keeping (one of
        :data:`hdb_jax.sd.remat.POLICIES`; ``none`` keeps every activation).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    configs: Mapping[str, Mapping[str, Any]]
    name: str
    attention: str = attention_lib.DEFAULT_IMPLEMENTATION
    attention_chunk: int = attention_lib.DEFAULT_CHUNK
    remat: str = remat_lib.DEFAULT

    def __post_init__(self):
        attention_lib.interceptor(self.attention, self.attention_chunk)  # validates both
        remat_lib.validate(self.remat)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_configs(
        cls,
        configs: Mapping[str, Mapping[str, Any]],
        tokenizer=None,
        *,
        name: str,
        dtype=jnp.float32,
        attention: str = attention_lib.DEFAULT_IMPLEMENTATION,
        attention_chunk: int = attention_lib.DEFAULT_CHUNK,
    ) -> "StableDiffusion":
        """Builds the modules from diffusers/transformers config dicts.

        Args:
          configs: dicts keyed ``unet``, ``vae``, ``text_encoder``, ``scheduler``.
          tokenizer: a CLIPTokenizer, or None.
          name: a human-readable identifier of the model.
          dtype: the computation dtype of the modules (parameters keep their own dtype).
          attention: the UNet attention implementation (see :mod:`hdb_jax.sd.attention`).
          attention_chunk: queries per chunk for the chunked implementations.

        Returns:
          The model bundle.
        """
        for key in ("unet", "vae", "text_encoder", "scheduler"):
            if key not in configs:
                raise ConfigError(f"{name}: the model has no '{key}' config")
        unet_kw = _module_kwargs(hf.FlaxUNet2DConditionModel, configs["unet"], _UNET_FIXED, f"{name}/unet")
        vae_kw = _module_kwargs(hf.FlaxAutoencoderKL, configs["vae"], _VAE_FIXED, f"{name}/vae")
        text_cfg = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
        text_config = hf.CLIPTextConfig(**text_cfg)
        scheduler = hf.FlaxDDPMScheduler(
            **_scheduler_kwargs(hf.FlaxDDPMScheduler, configs["scheduler"]),
        )
        return cls(
            unet=hf.FlaxUNet2DConditionModel(**unet_kw, dtype=dtype),
            vae=hf.FlaxAutoencoderKL(**vae_kw, dtype=dtype),
            text_encoder=hf.FlaxCLIPTextModule(text_config, dtype=dtype),
            tokenizer=tokenizer,
            noise_scheduler=scheduler,
            configs={k: dict(v) for k, v in configs.items()},
            name=name,
            attention=attention,
            attention_chunk=attention_chunk,
        )

    # ---------------------------------------------------------------- static facts
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.in_channels)

    @property
    def max_text_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def text_width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    def latent_shape(self, resolution: int, batch: int = 1) -> tuple[int, int, int, int]:
        """NCHW latent shape for square images of ``resolution`` pixels."""
        if resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} is not a multiple of the VAE factor {self.vae_scale_factor}"
            )
        side = resolution // self.vae_scale_factor
        return (batch, self.latent_channels, side, side)

    # ---------------------------------------------------------------- parameters
    def _init_fns(self, resolution: int):
        latents = jnp.zeros(self.latent_shape(resolution), jnp.float32)
        length = self.max_text_length
        ids = jnp.zeros((1, length), jnp.int32)

        def unet(key):
            ctx = jnp.zeros((1, length, self.unet.cross_attention_dim), jnp.float32)
            return self.unet.init(key, latents, jnp.zeros((1,), jnp.int32), ctx)["params"]

        def vae(key):
            image = jnp.zeros((1, 3, resolution, resolution), jnp.float32)
            return self.vae.init({"params": key, "gaussian": key}, image)["params"]

        def text_encoder(key):
            pos = jnp.broadcast_to(jnp.arange(length), ids.shape)
            return self.text_encoder.init(key, ids, jnp.ones_like(ids), pos)["params"]

        return {"unet": unet, "vae": vae, "text_encoder": text_encoder}

    def init_params(self, key: jax.Array, resolution: int | None = None) -> dict:
        """Randomly initialised parameters ``{"unet", "vae", "text_encoder"}`` (float32)."""
        resolution = resolution or self.default_resolution
        fns = self._init_fns(resolution)
        keys = jax.random.split(key, len(COMPONENTS))
        return {name: jax.jit(fns[name])(k) for name, k in zip(COMPONENTS, keys)}

    def random_params(self, key: jax.Array, resolution: int | None = None) -> dict:
        """Random parameters drawn from the abstract shapes, without tracing the model's init.

        Flax's defaults, per leaf name: ``kernel`` ~ N(0, 1/fan_in) (LeCun), ``bias`` = 0,
        ``scale`` = 1, ``embedding`` ~ N(0, 0.02²). Seconds instead of the minutes a compiled
        ``init`` of every component costs on two CPU cores; the tiny model, tests and demo use it.
        """
        abstract = self.abstract_params(resolution)
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        rng = np.random.default_rng(seed)

        def draw(path, leaf):
            name = str(getattr(path[-1], "key", path[-1]))
            shape = tuple(leaf.shape)
            if name == "bias":
                value = np.zeros(shape)
            elif name == "scale":
                value = np.ones(shape)
            elif name == "kernel":
                value = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
            else:
                value = 0.02 * rng.standard_normal(shape)
            return jnp.asarray(value, leaf.dtype)

        return jax.tree_util.tree_map_with_path(draw, abstract)

    def abstract_params(self, resolution: int | None = None) -> dict:
        """Parameter shapes and dtypes (``jax.ShapeDtypeStruct``) without allocating anything."""
        resolution = resolution or self.default_resolution
        fns = self._init_fns(resolution)
        key = jax.random.PRNGKey(0)
        return {name: jax.eval_shape(fns[name], key) for name in COMPONENTS}

    @property
    def default_resolution(self) -> int:
        return int(self.unet.sample_size) * self.vae_scale_factor

    # ---------------------------------------------------------------- pure functions
    def tokenize(self, prompts: list[str] | tuple[str, ...]) -> np.ndarray:
        """Token ids [B, max_text_length] (int32), padded and truncated like SD's pipeline."""
        if self.tokenizer is None:
            raise ValueError(f"model '{self.name}' has no tokenizer")
        out = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_text_length,
            truncation=True,
            return_tensors="np",
        )
        return out["input_ids"].astype(np.int32)

    def encode_text(self, params: Params, input_ids: jax.Array) -> jax.Array:
        """CLIP text features [B, L, D] (the last hidden state, as SD conditions on)."""
        position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        out = self.text_encoder.apply({"params": params}, input_ids, jnp.ones_like(input_ids), position_ids)
        return out[0]

    def predict(self, params: Params, latents: jax.Array, timesteps: jax.Array, context: jax.Array):
        """UNet output [B, C, h, w] (ε or v, as the scheduler's prediction type says)."""
        # diffusers wraps anything that is not a jax array in an extra axis: convert first.
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0:
            timesteps = jnp.broadcast_to(timesteps, latents.shape[:1])
        attend = attention_lib.interceptor(self.attention, self.attention_chunk)

        def unet(params, latents, timesteps, context):
            with nn.intercept_methods(exact_geglu), nn.intercept_methods(attend):
                return self.unet.apply({"params": params}, latents, timesteps, context).sample

        return remat_lib.apply(self.remat, unet)(params, jnp.asarray(latents), timesteps, context)

    def encode_images(self, params: Params, images: jax.Array, key: jax.Array | None = None):
        """Scaled latents [B, C, h, w] of NHWC images in [-1, 1]; the mean if ``key`` is None."""
        pixels = jnp.transpose(images, (0, 3, 1, 2))  # [B, 3, H, W]
        dist = self.vae.apply({"params": params}, pixels, method=self.vae.encode).latent_dist
        latents = dist.mean if key is None else dist.sample(key)  # [B, h, w, C]
        return jnp.transpose(latents, (0, 3, 1, 2)) * self.scaling_factor

    def decode_latents(self, params: Params, latents: jax.Array) -> jax.Array:
        """NHWC images in about [-1, 1] from scaled latents."""
        # The VAE guesses the layout from the last axis; hand it NHWC so it never has to.
        nhwc = jnp.transpose(latents, (0, 2, 3, 1)) / self.scaling_factor
        pixels = self.vae.apply({"params": params}, nhwc, method=self.vae.decode).sample
        return jnp.transpose(pixels, (0, 2, 3, 1))  # [B, H, W, 3]


# -------------------------------------------------------------------- factories
def _load_json(*parts: str) -> dict:
    path = resources.files("hdb_jax.sd").joinpath("configs", *parts)
    return json.loads(path.read_text())


def sd15_configs() -> dict:
    """The real SD 1.5 component configs shipped in the package (no weights)."""
    return {
        "unet": _load_json("sd15", "unet.json"),
        "vae": _load_json("sd15", "vae.json"),
        "text_encoder": _load_json("sd15", "text_encoder.json"),
        "scheduler": _load_json("sd15", "scheduler.json"),
    }


def sd15_shapes() -> StableDiffusion:
    """SD 1.5 modules for shape-only work (``abstract_params``); no tokenizer, no weights."""
    return StableDiffusion.from_configs(sd15_configs(), None, name="sd15-shapes")
