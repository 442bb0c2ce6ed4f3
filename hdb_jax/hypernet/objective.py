"""The hypernetwork's objective: the weight-space distance, R², and the pure train / eval steps.

``α · ‖ε̂(θ̂) − ε‖² + β · ‖ΔŴ − ΔW‖²`` (methods.md): θ̂ = H(x) are the LiDB weights predicted
from a face image x, applied per sample in activation space while the UNet denoises an image of
that identity; the weight term is the squared Frobenius norm of the difference of the dense
updates, computed on the small ``a x b`` products (the LiDB bases are orthonormal), so it does
not depend on how an update is factorised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hdb_jax import adapters as A
from hdb_jax.blocks import diffusion
from hdb_jax.hypernet import decoder as dec
from hdb_jax.hypernet import encoder as enc
from hdb_jax.hypernet.model import HyperNetwork


def weight_products(tokens: jax.Array, kind: A.LiDB) -> jax.Array:
    """Weight tokens ``[..., n, (a+b)·r]`` -> the per-layer products ``A_train·B_train`` ``[..., n, a, b]``."""
    factor_a, factor_b = dec.token_factors(tokens, kind)
    return factor_a @ factor_b


def weight_distance(predicted: jax.Array, target: jax.Array, kind: A.LiDB) -> jax.Array:
    """``Σ_layers ‖ΔŴ − ΔW‖_F²`` per sample ``[...]`` (= the dense distance, the bases being orthonormal)."""
    diff = weight_products(predicted, kind) - weight_products(target, kind)
    return jnp.sum(jnp.square(diff), axis=(-3, -2, -1))


def factor_distance(predicted: jax.Array, target: jax.Array) -> jax.Array:
    """``Σ_layers ‖θ̂ − θ‖²`` over the LiDB factors themselves, per sample ``[...]``.

    Unlike :func:`weight_distance` it has no saddle at a zero prediction (its gradient there is
    ``-2θ``), but it is only meaningful for targets whose factorisation is shared: stage 1 with
    one init for every identity (and ``a_train`` held at it), so that the sign and scale of the
    factors mean the same thing for every identity.
    """
    return jnp.sum(jnp.square(predicted - target), axis=(-2, -1))


WEIGHT_SPACES = {"dw": "weight_distance", "factor": "factor_distance"}


def r_squared(predicted: np.ndarray, target: np.ndarray, kind: A.LiDB) -> float:
    """``1 − Σ‖ΔŴ − ΔW‖² / Σ‖ΔW − mean ΔW‖²`` over identities (tokens ``[N, n, W]``), in ΔW space.

    Computed in float64 on the factors, without forming the ``[N, n, a, b]`` products: a
    difference ``Â B̂ − A B = [Â, A] · [B̂; −B]`` has rank ``2r``, so its squared Frobenius norm
    is ``Σ (XᵀX) ∘ (YYᵀ)`` over ``2r x 2r`` Gram matrices (exactly 0 when ``Â B̂ = A B`` term by
    term). Only the mean target product is dense (``[n, a, b]``, once).
    """
    pa, pb = dec.token_factors(np.asarray(predicted, np.float64), kind)
    ta, tb = dec.token_factors(np.asarray(target, np.float64), kind)
    x = np.concatenate([pa, ta], axis=-1)  # [N, n, a, 2r]
    y = np.concatenate([pb, -tb], axis=-2)  # [N, n, 2r, b]
    gram_x = np.einsum("inar,inas->inrs", x, x)
    gram_y = np.einsum("inrb,insb->inrs", y, y)
    residual = np.einsum("inrs,inrs->in", gram_x, gram_y).sum()
    # Σ_i ‖T_i − T̄‖² = Σ_i ‖T_i‖² − N ‖T̄‖², T̄ the mean product (dense, by one matmul per layer);
    # ‖T_i‖² from the targets' own blocks of the Gram matrices above.
    r, (n_id, layers) = kind.rank, ta.shape[:2]
    own = np.einsum("inrs,inrs->in", gram_x[..., r:, r:], gram_y[..., r:, r:])
    stacked_a = ta.transpose(1, 2, 0, 3).reshape(layers, kind.a, -1)  # [n, a, N r]
    stacked_b = tb.transpose(1, 0, 2, 3).reshape(layers, -1, kind.b)  # [n, N r, b]
    mean = (stacked_a @ stacked_b) / n_id
    total = own.sum() - n_id * np.sum(mean**2)
    return float(1.0 - residual / total) if total > 0 else float("nan")


def make_step(
    sd,
    net: HyperNetwork,
    adapters,
    optimizer,
    alpha: float,
    beta: float,
    regress_only_steps: int = 0,
    weight_space: str = "dw",
):
    """``step(state, frozen, batch, rng) -> (state, metrics)`` (pure; jitted by the caller).

    ``weight_space`` is where β's distance is measured: ``dw`` (:func:`weight_distance`, invariant
    to the factorisation) or ``factor`` (:func:`factor_distance`).

    ``alpha = 0`` traces no UNet at all (weight regression only). ``regress_only_steps > 0``
    compiles both losses into one program and runs only the regression (a ``lax.cond`` on the
    step: the UNet branch is not executed) for the first steps: a cheap warm-up on the targets.

    ``frozen = {"params": base params, "basis": LiDB bases, "hyper": frozen hypernet params}``;
    ``batch = {"images" [B,H,W,3] (what H sees), "targets" [B,H,W,3] (what the UNet denoises),
    "input_ids" [B,L], "target_tokens" [B,n,W], "has_target" [B]}``.
    """
    if weight_space not in WEIGHT_SPACES:
        raise ValueError(f"config.loss.space={weight_space!r}: choose from {sorted(WEIGHT_SPACES)}")
    sched_state = sd.noise_scheduler.create_state()
    size = net.image_size

    def denoising(tokens, frozen, batch, key):
        tree = dec.tokens_to_tree(tokens, adapters, net.kind)
        with A.attach_all(adapters, tree, frozen["basis"], per_sample=True):
            return diffusion.denoising_loss(
                sd, sched_state, frozen["params"], batch["targets"], batch["input_ids"], key
            )

    def loss_fn(trainable, frozen, batch, key, step):
        tokens = net.apply(
            {"params": {**frozen["hyper"], **trainable}},
            enc.resize_images(batch["images"], size),
            method=HyperNetwork.predict_tokens,
        )  # [B, n, W]
        if not alpha:  # weight regression only: no UNet in the program at all
            denoise = jnp.zeros((), jnp.float32)
        elif regress_only_steps:
            denoise = jax.lax.cond(
                step < regress_only_steps,
                lambda *_: jnp.zeros((), jnp.float32),
                denoising,
                tokens,
                frozen,
                batch,
                key,
            )
        else:
            denoise = denoising(tokens, frozen, batch, key)
        if weight_space == "factor":
            per_sample = factor_distance(tokens, batch["target_tokens"])  # [B]
        else:
            per_sample = weight_distance(tokens, batch["target_tokens"], net.kind)  # [B]
        weights = batch["has_target"]
        regress = jnp.sum(weights * per_sample) / jnp.maximum(jnp.sum(weights), 1.0)
        return alpha * denoise + beta * regress, {"denoise": denoise, "regress": regress}

    def step(state, frozen, batch, rng):
        key = jax.random.fold_in(rng, state["step"])
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["trainable"], frozen, batch, key, state["step"]
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, out

    return step


def make_eval(sd, net: HyperNetwork, adapters, draws: int = 4):
    """``evaluate(trainable, frozen, refs, views, ids, key) -> (loss with predicted, with zero weights)``.

    ``refs`` [I, H, W, 3] are what the hypernetwork sees; ``views`` [I, V, H, W, 3] the *other*
    images of the same identities the denoising loss is measured on; ``ids`` [I·V, L].
    """
    sched_state = sd.noise_scheduler.create_state()

    def evaluate(trainable, frozen, refs, views, ids, key):
        tokens = net.apply(
            {"params": {**frozen["hyper"], **trainable}},
            enc.resize_images(refs, net.image_size),
            method=HyperNetwork.predict_tokens,
        )  # [I, n, W]
        v = views.shape[1]
        pixels = views.reshape(-1, *views.shape[2:])  # [I·V, H, W, 3]

        def loss(tok):
            tree = dec.tokens_to_tree(jnp.repeat(tok, v, axis=0), adapters, net.kind)
            with A.attach_all(adapters, tree, frozen["basis"], per_sample=True):
                return diffusion.fixed_draw_loss(
                    sd, sched_state, frozen["params"], pixels, ids, key, draws=draws
                )

        return loss(tokens), loss(jnp.zeros_like(tokens))

    return evaluate


# -------------------------------------------------------------------- setup
