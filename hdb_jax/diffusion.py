"""The denoising (DreamBooth) loss of Stable Diffusion, as one pure function.

Given clean images and prompts, with whatever adapters the caller has attached:
latents = VAE(x) · scaling factor; t ~ U{0, T-1}; z_t = √ᾱ_t · latents + √(1-ᾱ_t) · ε;
loss = mean ‖UNet(z_t, t, text(prompt)) − target‖² with target ε or v as the scheduler's
prediction type says.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from hdb_jax.sd.model import StableDiffusion


def noise_and_target(sd: StableDiffusion, sched_state, latents: jax.Array, key: jax.Array):
    """Samples timesteps and noise; returns ``(noisy, timesteps, target)``.

    Args:
      sd: the model bundle (its noise scheduler defines ᾱ_t and the prediction type).
      sched_state: ``sd.noise_scheduler.create_state()``.
      latents: clean scaled latents [B, C, h, w].
      key: PRNG key.

    Returns:
      noisy latents [B, C, h, w], integer timesteps [B], regression target [B, C, h, w].
    """
    k_noise, k_time = jax.random.split(key)
    noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
    num_steps = sd.noise_scheduler.config.num_train_timesteps
    timesteps = jax.random.randint(k_time, latents.shape[:1], 0, num_steps)
    noisy = sd.noise_scheduler.add_noise(sched_state, latents, noise, timesteps)
    if sd.prediction_type == "epsilon":
        target = noise
    elif sd.prediction_type == "v_prediction":
        target = sd.noise_scheduler.get_velocity(sched_state, latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {sd.prediction_type!r}")
    return noisy, timesteps, target


def denoising_loss(
    sd: StableDiffusion,
    sched_state,
    params: Mapping[str, Any],
    images: jax.Array,
    input_ids: jax.Array,
    key: jax.Array,
    *,
    per_sample: bool = False,
):
    """Mean squared error of the UNet's prediction on freshly noised latents.

    Adapters apply if the caller has entered their ``attach`` contexts around this call (text
    encoder adapters act on ``encode_text``, UNet adapters on ``predict``).

    Args:
      sd: the model bundle.
      sched_state: the noise scheduler's state.
      params: ``{"unet", "vae", "text_encoder"}`` base parameters.
      images: NHWC images in [-1, 1], [B, H, W, 3].
      input_ids: token ids [B, L].
      key: PRNG key (VAE sampling, noise, timesteps).
      per_sample: return the per-sample loss [B] instead of its mean.

    Returns:
      A scalar loss, or [B] losses.
    """
    k_vae, k_noise = jax.random.split(key)
    latents = jax.lax.stop_gradient(sd.encode_images(params["vae"], images, k_vae))
    context = sd.encode_text(params["text_encoder"], input_ids)
    noisy, timesteps, target = noise_and_target(sd, sched_state, latents, k_noise)
    pred = sd.predict(params["unet"], noisy, timesteps, context)
    errors = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
    return errors if per_sample else jnp.mean(errors)
