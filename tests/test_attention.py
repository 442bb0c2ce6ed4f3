"""Our attention implementations against diffusers' own, inside the tiny UNet with adapters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import adapters as A
from hdb_jax.sd import attention

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
def run_with(tiny_sd, tiny_params, unet_inputs, lora):
    """impl -> (UNet output, gradients of a fixed projection of it w.r.t. the LoRA factors)."""
    adapter, trained = lora
    latents, timesteps, context = unet_inputs
    probe = jax.random.normal(jax.random.PRNGKey(2), latents.shape)
    cache = {}

    def run(impl):
        if impl not in cache:
            sd = dataclasses.replace(tiny_sd, attention=impl, attention_chunk=CHUNK)

            def loss(tr):
                with adapter.attach(tr):
                    out = sd.predict(tiny_params["unet"], latents, timesteps, context)
                return jnp.sum(out * probe), out

            (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trained)
            cache[impl] = (out, grads)
        return cache[impl]

    return run


@pytest.mark.parametrize("impl", EXACT)
def test_output_and_adapter_gradients_match_diffusers(impl, run_with):
    out, grads = run_with(impl)
    ref_out, ref_grads = run_with("diffusers")
    assert float(jnp.max(jnp.abs(out - ref_out))) <= 1e-5
    assert float(jnp.abs(ref_out).mean()) > 1e-2  # not vacuous
    flat, ref_flat = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)
    assert len(flat) == len(ref_flat) == 2 * 32  # down/up of 32 attention matrices
    worst = max(_rel(g, r) for g, r in zip(flat, ref_flat))
    assert worst <= 1e-5, worst


def test_adapters_still_apply_and_match_merged_weights(tiny_sd, tiny_params, unet_inputs, lora, run_with):
    adapter, trained = lora
    latents, timesteps, context = unet_inputs
    out, _ = run_with("flash")
    merged = adapter.merge(tiny_params["unet"], trained)
    out_merged = jax.jit(lambda p: tiny_sd.predict(p, latents, timesteps, context))(merged)
    out_base = jax.jit(lambda p: tiny_sd.predict(p, latents, timesteps, context))(tiny_params["unet"])
    assert tiny_sd.attention == attention.DEFAULT_IMPLEMENTATION == "flash"
    np.testing.assert_allclose(out, out_merged, atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(out - out_base))) > 1e-2


def test_bf16_matmuls_stay_close(run_with):
    out, grads = run_with("flash_bf16")
    ref_out, ref_grads = run_with("diffusers")
    assert _rel(out, ref_out) <= 2e-2
    assert max(_rel(g, r) for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads))) <= 5e-2


@pytest.mark.parametrize("length, keys, chunk", [(100, 100, 32), (64, 77, 64), (7, 5, 16)])
def test_kernels_match_dense_softmax_attention(length, keys, chunk):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(kq, (3, length, 8))
    k = 3.0 * jax.random.normal(kk, (3, keys, 8))  # large scores: the softmax must be stabilised
    v = jax.random.normal(kv, (3, keys, 8))
    d_out = jax.random.normal(kd, q.shape)
    dense = lambda q, k, v: attention._dense(q, k, v, 0.5)  # noqa: E731
    kernels = {
        "flash": lambda q, k, v: attention.flash_attention(q, k, v, 0.5, chunk, None),
        "chunked": lambda q, k, v: attention.chunked_attention(q, k, v, 0.5, chunk),
    }
    ref, ref_vjp = jax.vjp(dense, q, k, v)
    for name, fn in kernels.items():
        out, vjp = jax.vjp(jax.jit(fn), q, k, v)
        np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=name)
        for got, want in zip(vjp(d_out), ref_vjp(d_out)):
            assert _rel(got, want) <= 1e-5, name


def test_unknown_implementation_is_refused(tiny_sd):
    with pytest.raises(ValueError, match="unknown attention implementation 'fast'"):
        dataclasses.replace(tiny_sd, attention="fast")
    with pytest.raises(ValueError, match="chunk must be positive"):
        attention.interceptor("flash", 0)
