"""Text-to-image sampling: one compiled denoising loop with classifier-free guidance.

The sampler is a pure function ``(params, cond_ids, uncond_ids, latents0) -> images``,
jitted once per (model, scheduler, steps, guidance) and reused for every batch of that shape.
Inside it, the text encoder runs once, then ``lax.fori_loop`` walks the scheduler's timesteps
carrying ``(latents, scheduler state)``: each step runs the UNet on the conditional and
unconditional halves as one batch of 2B, combines them as
``ε = ε_u + g · (ε_c − ε_u)`` and takes one step of diffusers' Flax DDIM or DPM-Solver++
scheduler. The VAE decodes the result in the same program.

Personal weights are merged into the base parameters before sampling
(:func:`hdb_jax.adapters.merge_all`), so the sampler itself knows nothing about adapters.

The command line is :mod:`hdb_jax.jobs.sample` (``python -m hdb_jax.sample``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax.common.images import to_uint8
from hdb_jax.sd import hf
from hdb_jax.sd.model import StableDiffusion

SCHEDULERS = ("ddim", "dpm++")
# Settings we impose on top of the model's scheduler config, per sampler name.
_OVERRIDES: dict[str, dict[str, Any]] = {"ddim": {}, "dpm++": {"algorithm_type": "dpmsolver++"}}
_CLASSES = {"ddim": "FlaxDDIMScheduler", "dpm++": "FlaxDPMSolverMultistepScheduler"}

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (latents [B,C,h,w], t []) -> output


# -------------------------------------------------------------------- schedulers
def make_scheduler(sd_or_config: StableDiffusion | Mapping[str, Any], name: str = "ddim"):
    """A diffusers Flax inference scheduler built from a model's scheduler config.

    Args:
      sd_or_config: the model bundle (its ``configs["scheduler"]`` is used) or a config dict.
      name: ``ddim`` or ``dpm++`` (DPM-Solver++ multistep, ``algorithm_type="dpmsolver++"``).

    Returns:
      A ``FlaxDDIMScheduler`` or ``FlaxDPMSolverMultistepScheduler``; keys of the config that
      the class's ``__init__`` does not take (e.g. PNDM's ``skip_prk_steps``) are dropped.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")
    config = sd_or_config.configs["scheduler"] if isinstance(sd_or_config, StableDiffusion) else sd_or_config
    cls = getattr(hf, _CLASSES[name])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "dtype"}
    kwargs = {k: v for k, v in config.items() if k in accepted}
    kwargs.update(_OVERRIDES[name])
    return cls(**kwargs)


def denoise(scheduler, num_steps: int, model_fn: ModelFn, latents: jax.Array) -> jax.Array:
    """Runs the reverse process from ``latents`` with ``lax.fori_loop`` (traceable, pure).

    Args:
      scheduler: a diffusers Flax scheduler (DDIM or DPM-Solver multistep).
      num_steps: number of inference steps (static).
      model_fn: ``(latents [B,C,h,w], t scalar int) -> model output [B,C,h,w]``; the
        scheduler's prediction type says whether that is ε, v or x0.
      latents: initial noisy latents [B, C, h, w], already scaled by ``init_noise_sigma``.

    Returns:
      The denoised latents [B, C, h, w].
    """
    state = scheduler.create_state()
    state = scheduler.set_timesteps(state, num_steps, latents.shape)

    def body(i, carry):
        x, st = carry  # x: [B, C, h, w]
        t = st.timesteps[i]
        model_in = scheduler.scale_model_input(st, x, t)
        out = model_fn(model_in, t).astype(x.dtype)  # a bf16 UNet must not change the carry
        return scheduler.step(st, out, t, x, return_dict=False)

    latents, _ = jax.lax.fori_loop(0, num_steps, body, (latents, state))
    return latents


def timesteps(sd: StableDiffusion, scheduler: str, num_steps: int, shape=(1, 4, 8, 8)) -> np.ndarray:
    """The integer timesteps the sampler visits, in order (for logs and tests)."""
    sched = make_scheduler(sd, scheduler)
    return np.asarray(sched.set_timesteps(sched.create_state(), num_steps, shape).timesteps)


# -------------------------------------------------------------------- the sampler
@dataclasses.dataclass(frozen=True)
class LagSpec:
    """What LAG sampling needs besides the base weights (see :mod:`hdb_jax.blocks.lag`).

    Attributes:
      adapter: the Residual adapter on the UNet's ``proj_out`` layers.
      token_ids: the ids of V* and the class word in the prompt.
      mask_override: None (LAG), or 1.0 / 0.0 (residual everywhere / nowhere, for tests).
    """

    adapter: Any
    token_ids: tuple[int, ...]
    mask_override: float | None = None


def lag_token_ids(sd: StableDiffusion, words) -> tuple[int, ...]:
    """Token ids of V* and the class word for :class:`LagSpec`; each word must be one token."""
    out = []
    for word in words:
        pieces = sd.tokenizer.tokenize(word)
        if len(pieces) != 1 or sd.tokenizer.convert_tokens_to_ids(pieces[0]) == sd.tokenizer.unk_token_id:
            raise ValueError(f"LAG word {word!r} is not a single token of the model's vocabulary: {pieces}")
        out.append(int(sd.tokenizer.convert_tokens_to_ids(pieces[0])))
    return tuple(out)


def guided_model_fn(
    sd: StableDiffusion,
    params_unet,
    cond: jax.Array,
    uncond: jax.Array | None,
    guidance_scale: float,
    lag: tuple[LagSpec, Any, Any, jax.Array] | None = None,
) -> ModelFn:
    """The UNet under classifier-free guidance, as a ``model_fn`` for :func:`denoise`.

    Args:
      sd: the model bundle.
      params_unet: UNet parameters (adapters already merged).
      cond: conditional text features [B, L, D].
      uncond: unconditional text features [B, L, D], or None for no guidance.
      guidance_scale: g in ``ε_u + g · (ε_c − ε_u)``.
      lag: ``(LagSpec, residual trainable, residual frozen, cond token ids [B, L])``: apply a
        Personalized Residual with localized attention guidance (conditional rows only).

    Returns:
      ``(latents [B,C,h,w], t) -> guided output [B,C,h,w]``; with ``uncond`` the two halves
      run as one UNet batch of 2B.
    """

    def predict(x, t, context, branch, weights):
        if lag is None:
            return sd.predict(params_unet, x, t, context)
        from hdb_jax.blocks import lag as lag_lib

        spec, trainable, frozen, _ = lag
        with lag_lib.lag(spec.adapter, trainable, frozen, weights, branch, mask_override=spec.mask_override):
            return sd.predict(params_unet, x, t, context)

    b = cond.shape[0]
    weights = None
    if lag is not None:
        from hdb_jax.blocks import lag as lag_lib

        weights = lag_lib.token_weights(lag[3], lag[0].token_ids)  # [B, L]
    if uncond is None:
        return lambda x, t: predict(x, t, cond, jnp.ones((b,)), weights)
    context = jnp.concatenate([uncond, cond], axis=0)  # [2B, L, D]
    branch = jnp.concatenate([jnp.zeros((b,)), jnp.ones((b,))])  # unconditional rows: base weights
    weights2 = None if weights is None else jnp.concatenate([jnp.zeros_like(weights), weights])

    def model_fn(x, t):
        out = predict(jnp.concatenate([x, x], axis=0), t, context, branch, weights2)  # [2B, C, h, w]
        out_u, out_c = jnp.split(out, 2, axis=0)
        return out_u + guidance_scale * (out_c - out_u)

    return model_fn


@functools.lru_cache(maxsize=16)
def make_sampler(
    sd: StableDiffusion,
    *,
    scheduler: str = "ddim",
    num_steps: int = 25,
    guidance_scale: float = 7.5,
    decode: bool = True,
    wrap: Callable | None = None,
    lag: LagSpec | None = None,
) -> Callable:
    """The jitted sampler ``(params, cond_ids, uncond_ids, latents0) -> images``.

    Cached per arguments, so repeated calls (and :func:`sample`) share one compiled program per
    batch shape.

    Args:
      sd: the model bundle.
      scheduler: ``ddim`` or ``dpm++``.
      num_steps: inference steps.
      guidance_scale: classifier-free guidance scale; exactly 1 skips the unconditional half
        (``uncond_ids`` is then ignored).
      decode: if False, the function returns the final latents [B, C, h, w] instead of images.
      wrap: applied to the traced function before ``jax.jit`` (tests pin traces with
        ``chex.assert_max_traces``).
      lag: sample a Personalized Residual with localized attention guidance; the function then
        takes ``lag_trees=(trainable, frozen)`` of the residual (one personal model).

    Returns:
      A jitted function of ``params`` (``{"unet", "vae", "text_encoder"}``), ``cond_ids`` and
      ``uncond_ids`` (int [B, L]) and ``latents0`` [B, C, h, w] (from :func:`initial_latents`),
      returning NHWC float images [B, H, W, 3] clipped to [-1, 1].
    """
    sched = make_scheduler(sd, scheduler)
    guided = float(guidance_scale) != 1.0

    def run(params, cond_ids, uncond_ids, latents0, lag_trees=None):
        cond = sd.encode_text(params["text_encoder"], cond_ids)  # [B, L, D]
        uncond = sd.encode_text(params["text_encoder"], uncond_ids) if guided else None
        lag_args = None if lag is None else (lag, lag_trees[0], lag_trees[1], cond_ids)
        model_fn = guided_model_fn(sd, params["unet"], cond, uncond, float(guidance_scale), lag_args)
        latents = denoise(sched, num_steps, model_fn, latents0.astype(jnp.float32))
        if not decode:
            return latents
        return jnp.clip(sd.decode_latents(params["vae"], latents), -1.0, 1.0)  # [B, H, W, 3]

    return jax.jit(wrap(run) if wrap is not None else run)


def initial_latents(
    sd: StableDiffusion, seeds: Sequence[int], resolution: int | None = None, *, scheduler: str = "ddim"
) -> jax.Array:
    """Starting noise [N, C, h, w]: row i depends only on ``seeds[i]`` (``PRNGKey(seed)``).

    Scaled by the scheduler's ``init_noise_sigma``, so a (prompt, seed) pair gives the same image
    whatever else is in its batch.
    """
    shape = sd.latent_shape(resolution or sd.default_resolution)[1:]  # (C, h, w)
    keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
    sched = make_scheduler(sd, scheduler)
    return noise * sched.create_state().init_noise_sigma


def sample(
    sd: StableDiffusion,
    params: Mapping[str, Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    negative_prompt: str = "",
    scheduler: str = "ddim",
    num_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 4,
    resolution: int | None = None,
    progress: bool = True,
    lag: tuple[LagSpec, Any, Any] | None = None,
) -> np.ndarray:
    """Images of (prompt, seed) pairs, in fixed-size batches through one compiled sampler.

    Args:
      sd: the model bundle (it needs a tokenizer).
      params: ``{"unet", "vae", "text_encoder"}`` with any personal weights already merged.
      prompts: one prompt per image.
      seeds: one seed per image (same length as ``prompts``).
      negative_prompt: the unconditional prompt for guidance.
      scheduler: ``ddim`` or ``dpm++``.
      num_steps: inference steps.
      guidance_scale: classifier-free guidance scale.
      batch_size: images per compiled call; every batch (even a lone short one) is padded to
        this size, so each image comes out of the same compiled program.
      resolution: image side in pixels (default: the model's).
      progress: show a tqdm bar over batches.
      lag: ``(LagSpec, trainable, frozen)`` of a Personalized Residual sampled with localized
        attention guidance (``params`` are then the base weights, the residual unmerged).

    Returns:
      uint8 images [N, H, W, 3].
    """
    from tqdm.auto import tqdm

    n = len(prompts)
    if n != len(seeds) or not n or batch_size < 1:
        raise ValueError(
            f"need one seed per prompt and a positive batch size; got {n} prompts, "
            f"{len(seeds)} seeds, batch_size={batch_size}"
        )
    fn = make_sampler(
        sd,
        scheduler=scheduler,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        lag=None if lag is None else lag[0],
    )
    extra = () if lag is None else ((lag[1], lag[2]),)
    cond_ids = sd.tokenize(list(prompts))  # [N, L]
    uncond_ids = np.broadcast_to(sd.tokenize([negative_prompt]), cond_ids.shape)  # [N, L]
    latents = np.asarray(initial_latents(sd, seeds, resolution, scheduler=scheduler))  # [N, C, h, w]
    chunks = []
    for start in tqdm(range(0, n, batch_size), desc="sampling", unit="batch", disable=not progress):
        rows = np.arange(start, start + batch_size).clip(max=n - 1)  # pad by repeating the last
        out = fn(params, cond_ids[rows], uncond_ids[rows], latents[rows], *extra)
        chunks.append(to_uint8(out)[: n - start])
    return np.concatenate(chunks, axis=0)
