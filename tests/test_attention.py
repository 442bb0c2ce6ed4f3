"""Our attention implementations against diffusers' own, inside the tiny UNet with adapters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import adapters as A
from hdb_jax.sd import attention, hf

EXACT = ("xla", "chunked", "flash")
CHUNK = 48  # 256 latent tokens: five full chunks and a padded one


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture(scope="module")
def lora(tiny_params):
    """A LoRA on every attention q/k/v/out, with both factors non-zero."""
    adapter = A.Adapter.create(A.LoRA(rank=2), tiny_params["unet"], [A.PATTERNS["unet_attention"]], "unet")
    leaves, treedef = jax.tree_util.tree_flatten(adapter.init(jax.random.PRNGKey(0)))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    trained = treedef.unflatten([0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return adapter, trained


@pytest.fixture(scope="module")
def results(tiny_sd, tiny_params, unet_inputs, lora):
    """impl -> (UNet output, gradients of a fixed projection of it w.r.t. the LoRA factors).

    All implementations share one compiled program: each attention layer picks its
    implementation with ``lax.switch`` on a traced index (one UNet compile instead of five).
    """
    adapter, trained = lora
    latents, timesteps, context = unet_inputs
    probe = jax.random.normal(jax.random.PRNGKey(2), latents.shape)
    sd = dataclasses.replace(tiny_sd, attention="diffusers")  # the switch below decides
    impls = ("diffusers",) + EXACT

    def loss(tr, index):
        def switching(next_fun, args, kwargs, context):
            if context.method_name != "__call__" or not isinstance(context.module, hf.FlaxAttention):
                return next_fun(*args, **kwargs)
            branches = [attention.AttentionInterceptor(impl, CHUNK) for impl in impls]
            return jax.lax.switch(
                index, [lambda b=b: b(next_fun, args, kwargs, context) for b in branches]
            )

        with adapter.attach(tr), nn.intercept_methods(switching):
            out = sd.predict(tiny_params["unet"], latents, timesteps, context)
        return jnp.sum(out * probe), out

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return {impl: (out, grads) for i, impl in enumerate(impls) for (_, out), grads in [step(trained, i)]}


@pytest.mark.parametrize("impl", EXACT)
def test_output_and_adapter_gradients_match_diffusers(impl, results):
    out, grads = results[impl]
    ref_out, ref_grads = results["diffusers"]
    assert float(jnp.max(jnp.abs(out - ref_out))) <= 1e-5
    assert float(jnp.abs(ref_out).mean()) > 1e-2  # not vacuous
    flat, ref_flat = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)
    assert len(flat) == len(ref_flat) == 2 * 32  # down/up of 32 attention matrices
    worst = max(_rel(g, r) for g, r in zip(flat, ref_flat))
    assert worst <= 1e-5, worst


def test_default_model_applies_adapters_like_merged_weights(tiny_sd, tiny_params, unet_inputs, lora, results):
    adapter, trained = lora
    latents, timesteps, context = unet_inputs
    assert tiny_sd.attention == attention.DEFAULT_IMPLEMENTATION == "flash"

    @jax.jit
    def predict(unet_params, factors):
        with adapter.attach(factors):
            return tiny_sd.predict(unet_params, latents, timesteps, context)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, trained)
    out = predict(tiny_params["unet"], trained)
    merged = adapter.merge(tiny_params["unet"], trained)
    np.testing.assert_allclose(out, predict(merged, zeros), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out, results["diffusers"][0], atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(out - predict(tiny_params["unet"], zeros)))) > 1e-2


@pytest.mark.parametrize("length, keys, chunk", [(100, 100, 32), (7, 77, 16)])
def test_kernels_match_dense_softmax_attention(length, keys, chunk):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(kq, (3, length, 8))
    k = 3.0 * jax.random.normal(kk, (3, keys, 8))  # large scores: the softmax must be stabilised
    v = jax.random.normal(kv, (3, keys, 8))
    d_out = jax.random.normal(kd, q.shape)
    kernels = {  # name -> (function, relative tolerance)
        "dense": (lambda q, k, v: attention._dense(q, k, v, 0.5), None),
        "flash": (lambda q, k, v: attention.flash_attention(q, k, v, 0.5, chunk, None), 1e-5),
        "chunked": (lambda q, k, v: attention.chunked_attention(q, k, v, 0.5, chunk), 1e-5),
        "flash_bf16": (lambda q, k, v: attention.flash_attention(q, k, v, 0.5, chunk, jnp.bfloat16), 3e-2),
    }

    @jax.jit
    def outputs_and_grads(q, k, v):
        results = {}
        for name, (fn, _) in kernels.items():
            out, vjp = jax.vjp(fn, q, k, v)
            results[name] = (out,) + vjp(d_out)
        return results

    results = outputs_and_grads(q, k, v)
    for name, (_, tol) in kernels.items():
        if tol is not None:
            for got, want in zip(results[name], results["dense"]):
                assert _rel(got, want) <= tol, name


def test_unknown_implementation_is_refused(tiny_sd):
    with pytest.raises(ValueError, match="unknown attention implementation 'fast'"):
        dataclasses.replace(tiny_sd, attention="fast")
    with pytest.raises(ValueError, match="chunk must be positive"):
        attention.interceptor("flash", 0)
