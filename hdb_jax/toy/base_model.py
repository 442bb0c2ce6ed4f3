"""The toy base model's architecture, training data and steps: what :mod:`hdb_jax.jobs.toy_base` trains.

:func:`build_model` is SD 1.5's architecture at the widths of ``config.model``; :class:`FreshFaces`
is the endless stream of captioned synthetic faces it learns from (each batch a pure function of
``(seed, step)``); :func:`make_vae_step` and :func:`make_unet_step` are the two phases' jitted,
donated steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdb_jax.blocks import diffusion
from hdb_jax.common import images
from hdb_jax.sd import model
from hdb_jax.sd import tiny as tiny_lib
from hdb_jax.toy import synthetic


# -------------------------------------------------------------------- model and data
def build_model(
    config: ml_collections.ConfigDict, scaling_factor: float | None = None
) -> model.StableDiffusion:
    """The toy architecture of ``config.model``; ``scaling_factor`` overrides the VAE's."""
    m = config.model
    sd = tiny_lib.tiny(
        resolution=m.resolution,
        unet_channels=tuple(m.unet_channels),
        vae_channels=tuple(m.vae_channels),
        text_width=m.text_width,
        text_layers=m.text_layers,
    )
    if scaling_factor is None:
        return sd
    configs = {k: dict(v) for k, v in sd.configs.items()}
    configs["vae"]["scaling_factor"] = float(scaling_factor)
    return model.StableDiffusion.from_configs(configs, sd.tokenizer, name="toy")


def toy_caption(
    ident: synthetic.FaceIdentity, var: synthetic.Variation, rng: np.random.Generator, drop: float
) -> str:
    """A caption of the image with each modifier (style, accessories, background) kept w.p. 1 - drop."""
    keep = lambda: rng.random() >= drop  # noqa: E731
    words = [f"{'an' if var.style[0] in 'aeiou' else 'a'} {var.style} of a face" if keep() else "a face"]
    extras = [w for w, has in (("glasses", ident.glasses), ("earrings", ident.earrings)) if has and keep()]
    if extras:
        words.append("with " + " and ".join(extras))
    if ident.hat and keep():
        words.append("wearing a hat")
    if var.style != "sketch" and keep():
        words.append(f"on {'an' if var.background[0] in 'aeiou' else 'a'} {var.background} background")
    return " ".join(words)


@dataclasses.dataclass(frozen=True)
class FreshFaces:
    """An endless stream of synthetic faces: every batch draws identities it has never drawn.

    Batch ``step`` is a pure function of ``(stream_seed, step)``: identity ids uniform in
    ``[id_range[0], id_range[1])`` (a range of a million ids or more, so repeats are rare), image
    indices (pose, lighting, background) uniform in ``[0, 2**30)``, styles drawn with
    ``style_weights``, captions from the generator's attributes with each modifier dropped w.p.
    ``caption_drop`` and an empty caption w.p. ``uncond_prob``.
    """

    id_range: tuple[int, int]
    resolution: int
    styles: tuple[str, ...]
    style_weights: tuple[float, ...]
    world_seed: int  # the synthetic world's seed: which face an identity id is
    stream_seed: int  # which faces a step draws
    caption_drop: float
    uncond_prob: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "FreshFaces":
        d = config.data
        return cls(
            tuple(d.train_ids),
            config.model.resolution,
            tuple(d.styles),
            tuple(d.style_weights),
            d.seed,
            d.stream_seed,
            d.caption_drop,
            d.uncond_prob,
        )

    def draw(
        self, step: int, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray, list[str], np.random.Generator]:
        """Identity ids [B], image indices [B] and styles of batch ``step``, plus its caption rng."""
        rng = np.random.default_rng([self.stream_seed, 11, step])
        ids = rng.integers(self.id_range[0], self.id_range[1], batch_size)
        indices = rng.integers(0, 2**30, batch_size)
        weights = np.asarray(self.style_weights, np.float64)
        styles = [self.styles[k] for k in rng.choice(len(self.styles), batch_size, p=weights / weights.sum())]
        return ids, indices, styles, rng

    def batch(self, step: int, batch_size: int, tokenize) -> dict[str, np.ndarray]:
        """``{"images": float32 [B, H, W, 3] in [-1, 1], "input_ids": int32 [B, L]}`` of batch ``step``."""
        ids, indices, styles, rng = self.draw(step, batch_size)
        pixels = synthetic.render_batch(ids, indices, styles, self.world_seed, self.resolution)
        captions = []
        for i, j, style in zip(ids, indices, styles):
            ident, var = (
                synthetic.identity(int(i), self.world_seed),
                synthetic.variation(int(i), int(j), self.world_seed, style),
            )
            captions.append(
                "" if rng.random() < self.uncond_prob else toy_caption(ident, var, rng, self.caption_drop)
            )
        return {"images": images.to_unit_range(pixels), "input_ids": np.asarray(tokenize(captions), np.int32)}


# -------------------------------------------------------------------- losses and steps
def vae_loss(sd: model.StableDiffusion, vae_params, images: jax.Array, key: jax.Array, kl_weight: float):
    """L1 + L2 reconstruction of NHWC images in [-1, 1] plus ``kl_weight`` · KL to N(0, I)."""
    pixels = jnp.transpose(images, (0, 3, 1, 2))
    dist = sd.vae.apply({"params": vae_params}, pixels, method=sd.vae.encode).latent_dist
    z = dist.sample(key)  # [B, h, w, C]
    recon = sd.vae.apply({"params": vae_params}, z, method=sd.vae.decode).sample  # [B, 3, H, W]
    err = recon - pixels
    kl = 0.5 * jnp.mean(jnp.square(dist.mean) + dist.var - 1.0 - dist.logvar)
    recon_loss = jnp.mean(jnp.abs(err)) + jnp.mean(jnp.square(err))
    return recon_loss + kl_weight * kl, {"recon": jnp.mean(jnp.square(err)), "kl": kl}


def make_vae_step(sd: model.StableDiffusion, optimizer, kl_weight: float):
    """Jitted ``step(state, images, rng) -> (state, metrics)`` over ``state["trainable"]["vae"]``; donated."""

    def step(state, images, rng):
        key = jax.random.fold_in(rng, state["step"])
        vae = state["trainable"]["vae"]
        (loss, aux), grads = jax.value_and_grad(vae_loss, argnums=1, has_aux=True)(
            sd, vae, images, key, kl_weight
        )
        updates, opt = optimizer.update(grads, state["opt_state"]["vae"], vae)
        new = {
            **state,
            "step": state["step"] + 1,
            "trainable": {**state["trainable"], "vae": optax.apply_updates(vae, updates)},
            "opt_state": {**state["opt_state"], "vae": opt},
        }
        return new, {"loss": loss, **aux}

    return jax.jit(step, donate_argnums=(0,))


def make_unet_step(sd: model.StableDiffusion, optimizer, ema_decay: float):
    """Jitted ``step(state, batch, rng) -> (state, metrics)`` over ``state["trainable"]["denoiser"]``
    (UNet + text encoder) with its EMA; donated."""
    sched = sd.noise_scheduler.create_state()

    def loss_fn(trainable, vae, batch, key):
        return diffusion.denoising_loss(
            sd, sched, {**trainable, "vae": vae}, batch["images"], batch["input_ids"], key
        )

    def step(state, batch, rng):
        key = jax.random.fold_in(rng, state["step"])
        trained = state["trainable"]
        loss, grads = jax.value_and_grad(loss_fn)(trained["denoiser"], trained["vae"], batch, key)
        updates, opt = optimizer.update(grads, state["opt_state"]["denoiser"], trained["denoiser"])
        denoiser = optax.apply_updates(trained["denoiser"], updates)
        ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], denoiser)
        new = {
            **state,
            "step": state["step"] + 1,
            "trainable": {**trained, "denoiser": denoiser},
            "opt_state": {**state["opt_state"], "denoiser": opt},
            "ema": ema,
        }
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0,))
