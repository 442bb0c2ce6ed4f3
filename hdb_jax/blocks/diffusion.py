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


def _split_keys(key: jax.Array, per_sample_keys: bool) -> tuple[jax.Array, jax.Array]:
    if per_sample_keys:  # [B] keys -> two [B] key batches
        pair = jax.vmap(jax.random.split)(key)  # [B, 2, ...]
        return pair[:, 0], pair[:, 1]
    first, second = jax.random.split(key)
    return first, second


def _normal(key: jax.Array, shape: tuple[int, ...], dtype, per_sample_keys: bool) -> jax.Array:
    """N(0, 1) of ``shape``; with per-sample keys row i is drawn from ``key[i]`` alone."""
    if per_sample_keys:
        return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)
    return jax.random.normal(key, shape, dtype)


def noise_and_target(
    sd: StableDiffusion, sched_state, latents: jax.Array, key: jax.Array, *, per_sample_keys: bool = False
):
    """Samples timesteps and noise; returns ``(noisy, timesteps, target)``.

    Args:
      sd: the model bundle (its noise scheduler defines ᾱ_t and the prediction type).
      sched_state: ``sd.noise_scheduler.create_state()``.
      latents: clean scaled latents [B, C, h, w].
      key: PRNG key, or with ``per_sample_keys`` one key per row ``[B]``.
      per_sample_keys: row i's noise and timestep depend on ``key[i]`` only (not on its position
        in the batch or on the other rows).

    Returns:
      noisy latents [B, C, h, w], integer timesteps [B], regression target [B, C, h, w].
    """
    k_noise, k_time = _split_keys(key, per_sample_keys)
    noise = _normal(k_noise, latents.shape, latents.dtype, per_sample_keys)
    num_steps = sd.noise_scheduler.config.num_train_timesteps
    if per_sample_keys:
        timesteps = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_steps))(k_time)
    else:
        timesteps = jax.random.randint(k_time, latents.shape[:1], 0, num_steps)
    noisy = sd.noise_scheduler.add_noise(sched_state, latents, noise, timesteps)
    if sd.prediction_type == "epsilon":
        target = noise
    elif sd.prediction_type == "v_prediction":
        target = sd.noise_scheduler.get_velocity(sched_state, latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {sd.prediction_type!r}")
    return noisy, timesteps, target


def sample_latents(
    sd: StableDiffusion, vae_params, images: jax.Array, key: jax.Array, *, per_sample_keys: bool = False
) -> jax.Array:
    """Scaled latents [B, C, h, w] sampled from the VAE posterior of NHWC images in [-1, 1].

    With one key this is exactly ``sd.encode_images(vae_params, images, key)``; with
    ``per_sample_keys`` row i's sample depends on ``key[i]`` only.
    """
    pixels = jnp.transpose(images, (0, 3, 1, 2))  # [B, 3, H, W]
    dist = sd.vae.apply({"params": vae_params}, pixels, method=sd.vae.encode).latent_dist
    z = dist.mean + dist.std * _normal(key, dist.mean.shape, dist.mean.dtype, per_sample_keys)  # [B, h, w, C]
    return jnp.transpose(z, (0, 3, 1, 2)) * sd.scaling_factor


def denoising_loss(
    sd: StableDiffusion,
    sched_state,
    params: Mapping[str, Any],
    images: jax.Array,
    input_ids: jax.Array,
    key: jax.Array,
    *,
    per_sample: bool = False,
    per_sample_keys: bool = False,
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
      key: PRNG key (VAE sampling, noise, timesteps), or ``[B]`` keys with ``per_sample_keys``.
      per_sample: return the per-sample loss [B] instead of its mean.
      per_sample_keys: draw row i's VAE sample, noise and timestep from ``key[i]`` alone, so a
        row's loss does not depend on its position in the batch (batched pre-optimisation).

    Returns:
      A scalar loss, or [B] losses.
    """
    k_vae, k_noise = _split_keys(key, per_sample_keys)
    latents = jax.lax.stop_gradient(
        sample_latents(sd, params["vae"], images, k_vae, per_sample_keys=per_sample_keys)
    )
    context = sd.encode_text(params["text_encoder"], input_ids)
    noisy, timesteps, target = noise_and_target(
        sd, sched_state, latents, k_noise, per_sample_keys=per_sample_keys
    )
    pred = sd.predict(params["unet"], noisy, timesteps, context)
    errors = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
    return errors if per_sample else jnp.mean(errors)


def fixed_draw_loss(
    sd: StableDiffusion,
    sched_state,
    params: Mapping[str, Any],
    images: jax.Array,
    input_ids: jax.Array,
    key: jax.Array,
    *,
    draws: int,
    per_sample: bool = False,
):
    """:func:`denoising_loss` averaged over ``draws`` fixed draws of VAE sample, noise and timestep.

    The training loss is noisy by construction; with a fixed ``key`` this is a deterministic
    measure of a model on a fixed set of images, the one every evaluation here uses (held-out
    losses, progress of a run, a hypernetwork's prediction vs zero weights). Adapters apply when
    the caller has entered their ``attach`` contexts around this call.

    Args:
      sd, sched_state, params, images, input_ids: as for :func:`denoising_loss` (images NHWC in
        [-1, 1], never uint8).
      key: the fixed PRNG key; draw ``i`` uses ``split(key, draws)[i]``.
      draws: how many draws to average.
      per_sample: return ``[B]`` (each image's mean over draws) instead of a scalar.

    Returns:
      A scalar, or ``[B]``.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        raise TypeError(
            f"images must be float in [-1, 1], got {images.dtype} (normalise with hdb_jax.common.images.to_unit_range)"
        )
    losses = jax.lax.map(
        lambda k: denoising_loss(sd, sched_state, params, images, input_ids, k, per_sample=per_sample),
        jax.random.split(key, draws),
    )  # [draws] or [draws, B]
    return jnp.mean(losses, axis=0)


def make_heldout_loss(sd: StableDiffusion, draws: int):
    """Jitted ``loss(params, images, input_ids, key) -> scalar``: :func:`fixed_draw_loss` of plain params."""
    sched_state = sd.noise_scheduler.create_state()
    return jax.jit(
        lambda params, images, ids, key: fixed_draw_loss(
            sd, sched_state, params, images, ids, key, draws=draws
        )
    )
