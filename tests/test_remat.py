"""UNet remat policies: the same gradients, fewer saved activations, set from the model config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import adapters as A
from hdb_jax.blocks import build
from hdb_jax.sd import remat


@pytest.fixture(scope="module")
def loss_inputs(tiny_sd):
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    latents = jax.random.normal(k1, tiny_sd.latent_shape(32, batch=2))
    context = jax.random.normal(k2, (2, tiny_sd.max_text_length, tiny_sd.text_width))
    return latents, jnp.array([10, 700]), context


def _loss(sd, inputs):
    latents, timesteps, context = inputs

    def loss(unet_params):
        return jnp.mean(jnp.square(sd.predict(unet_params, latents, timesteps, context)))

    return loss


def _residual_bytes(sd, params, inputs) -> int:
    """Bytes the backward pass keeps: the leaves of the VJP closure, by shape only (nothing runs)."""
    vjp = jax.eval_shape(lambda p: jax.vjp(_loss(sd, inputs), p)[1], params)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(vjp))


def test_policies_keep_fewer_activations_in_order(tiny_sd, tiny_params, loss_inputs):
    saved = {
        p: _residual_bytes(dataclasses.replace(tiny_sd, remat=p), tiny_params["unet"], loss_inputs)
        for p in remat.POLICIES
    }
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(tiny_params["unet"]))
    assert saved["none"] > saved["layers"] > saved["blocks"] > saved["full"], saved
    # full keeps the UNet's inputs (weights, latents, context, timestep features), no activations:
    # beyond the weights, under 2% of what "none" keeps beyond them.
    assert saved["full"] - weights < 0.02 * (saved["none"] - weights), (saved, weights)
    assert saved["none"] > 2 * weights  # not vacuous: activations are most of what "none" keeps


def test_policies_give_the_same_gradients_with_adapters_attached(tiny_sd, tiny_params, loss_inputs):
    """Weights and LoRA factors alike: the adapters' interceptors find their layers inside the
    lifted regions (``attach`` refuses a target that is never called) and train the same."""
    latents, timesteps, context = loss_inputs
    adapter = A.Adapter.create(A.LoRA(rank=2), tiny_params["unet"], [A.PATTERNS["unet_attention"]], "unet")
    leaves, tree = jax.tree_util.tree_flatten(adapter.init(jax.random.PRNGKey(4)))
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    factors = tree.unflatten([0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])  # up != 0
    grads = {}
    for p in ("none", "blocks"):  # "blocks": regions via Flax's lifted checkpoint; "full" is jax.checkpoint
        sd = dataclasses.replace(tiny_sd, remat=p)

        def loss(unet_params, factors, sd=sd):
            with adapter.attach(factors):
                return jnp.mean(jnp.square(sd.predict(unet_params, latents, timesteps, context)))

        grads[p] = jax.tree_util.tree_leaves(
            jax.jit(jax.grad(loss, argnums=(0, 1)))(tiny_params["unet"], factors)
        )
    scale = max(float(jnp.abs(g).max()) for g in grads["none"])
    assert scale > 0
    # A recomputed forward pass is the same float32 program, possibly fused differently: allow
    # a few hundred ulps of the largest gradient, far below any real difference.
    err = max(float(jnp.abs(a - b).max()) for a, b in zip(grads["none"], grads["blocks"]))
    assert err <= 256 * np.finfo(np.float32).eps * scale, (err, scale)


def test_model_config_sets_remat_and_attention_and_refuses_bad_values():
    sd, _ = build.base_model({"source": "tiny", "resolution": 32, "remat": "blocks", "attention": "chunked"})
    assert (sd.remat, sd.attention) == ("blocks", "chunked")
    sd, _ = build.base_model({"source": "tiny", "resolution": 32})  # both optional
    assert (sd.remat, sd.attention) == (remat.DEFAULT, "auto")
    with pytest.raises(ValueError, match=r"config.model: unknown UNet remat policy 'some'"):
        build.base_model({"source": "/nonexistent", "remat": "some"})  # refused before any read
    with pytest.raises(ValueError, match=r"config.model: unknown attention implementation"):
        build.model_settings({"attention": "fast"})
