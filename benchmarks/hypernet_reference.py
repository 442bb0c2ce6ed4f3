"""The reference of ``hypernet_step.py``'s formulation benchmark: per-sample merged weights.

``jax.vmap`` over the batch of a function that merges sample i's predicted LiDB weights into the
base parameters (``Adapter.merge``, UNet and text encoder) and runs both models on that one
sample: the obvious alternative to our step, which applies every sample's update in activation
space on one batched call. The VAE encoding, noise, timesteps, loss and optimizer are the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hdb_jax.blocks import diffusion
from hdb_jax.hypernet import decoder as dec
from hdb_jax.hypernet import encoder as enc
from hdb_jax.hypernet.model import HyperNetwork


def merged_denoising_loss(sd, sched_state, adapters, params, tree, basis, images, input_ids, key):
    """``diffusion.denoising_loss`` with sample i run on base params + its own merged ΔW_i.

    The VAE latents, noise and timesteps are drawn for the whole batch exactly as
    ``denoising_loss`` draws them (same key splits), so both formulations see the same numbers.
    """
    k_vae, k_noise = jax.random.split(key)
    latents = jax.lax.stop_gradient(sd.encode_images(params["vae"], images, k_vae))
    noisy, timesteps, target = diffusion.noise_and_target(sd, sched_state, latents, k_noise)

    def one(sample_tree, ids, z, t, eps):
        merged = {
            **params,
            **{c: a.merge(params[c], sample_tree[c], basis.get(c)) for c, a in adapters.items()},
        }
        context = sd.encode_text(merged["text_encoder"], ids[None])
        pred = sd.predict(merged["unet"], z[None], t[None], context)
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - eps[None].astype(jnp.float32)))

    return jnp.mean(jax.vmap(one)(tree, input_ids, noisy, timesteps, target))


def make_merged_step(sd, net: HyperNetwork, adapters, optimizer, alpha: float, beta: float):
    """``make_step`` with the UNet/text-encoder application replaced by :func:`merged_denoising_loss`."""
    sched_state = sd.noise_scheduler.create_state()

    def loss_fn(trainable, frozen, batch, key):
        tokens = net.apply(
            {"params": {**frozen["hyper"], **trainable}},
            enc.resize_images(batch["images"], net.image_size),
            method=HyperNetwork.predict_tokens,
        )
        tree = dec.tokens_to_tree(tokens, adapters, net.kind)
        denoise = merged_denoising_loss(
            sd,
            sched_state,
            adapters,
            frozen["sd"],
            tree,
            frozen["basis"],
            batch["images"],
            batch["input_ids"],
            key,
        )
        per_sample = jnp.mean(jnp.square(tokens - batch["target_tokens"]), axis=(1, 2))
        weights = batch["has_target"]
        regress = jnp.sum(weights * per_sample) / jnp.maximum(jnp.sum(weights), 1.0)
        return alpha * denoise + beta * regress, {"denoise": denoise, "regress": regress}

    def step(state, frozen, batch, rng):
        key = jax.random.fold_in(rng, state["step"])
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"], frozen, batch, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, out

    return step
