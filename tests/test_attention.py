"""Our attention implementations against diffusers' own, inside the tiny UNet with adapters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import adapters as A
from hdb_jax.sd import attention, hf
from hdb_jax.sd import tiny as tiny_lib

EXACT = ("xla", "chunked", "flash")
CHUNK = 48  # 256 latent tokens: five full chunks and a padded one


def _rel(a, b):
    """Worst absolute difference relative to the largest reference entry (in float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def lora(tiny_params):
    """A LoRA on every attention q/k/v/out, with both factors non-zero."""
    adapter = A.Adapter.create(A.LoRA(rank=2), tiny_params["unet"], [A.PATTERNS["unet_attention"]], "unet")
    leaves, treedef = jax.tree_util.tree_flatten(adapter.init(jax.random.PRNGKey(0)))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    trained = treedef.unflatten([0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return adapter, trained


def _unet_loss(sd, params, adapter, latents, timesteps, context, probe, interceptor):
    """(sum(UNet(adapted) * probe), UNet output) with attention computed by ``interceptor``."""

    def loss(trained, index):
        with adapter.attach(trained), nn.intercept_methods(lambda *a: interceptor(index, *a)):
            out = sd.predict(params, latents, timesteps, context)
        return jnp.sum(out * probe), out

    return loss


@pytest.fixture(scope="module")
def results(tiny_sd, tiny_params, unet_inputs, lora):
    """impl -> (UNet output, gradients of a fixed projection of it w.r.t. the LoRA factors).

    All float32 implementations share one compiled program: each attention layer picks its
    implementation with ``lax.switch`` on a traced index (one UNet compile instead of four).
    ``"float64"`` is diffusers' code run in double precision on the same inputs: the truth the
    float32 errors are measured against.
    """
    adapter, trained = lora
    latents, timesteps, context = unet_inputs
    probe = jax.random.normal(jax.random.PRNGKey(2), latents.shape)
    sd = dataclasses.replace(tiny_sd, attention="diffusers")  # the switch below decides
    impls = ("diffusers",) + EXACT
    branches = [attention.AttentionInterceptor(impl, CHUNK) for impl in impls]

    def switching(index, next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, hf.FlaxAttention):
            return next_fun(*args, **kwargs)
        return jax.lax.switch(index, [lambda b=b: b(next_fun, args, kwargs, context) for b in branches])

    step = jax.jit(
        jax.value_and_grad(
            _unet_loss(sd, tiny_params["unet"], adapter, latents, timesteps, context, probe, switching),
            has_aux=True,
        )
    )
    out = {impl: (o, g) for i, impl in enumerate(impls) for (_, o), g in [step(trained, i)]}
    with jax.enable_x64(True):
        f64 = lambda tree: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)  # noqa: E731
        sd64 = dataclasses.replace(tiny_lib.tiny(dtype=jnp.float64), attention="diffusers")
        plain = lambda index, next_fun, args, kwargs, context: next_fun(*args, **kwargs)  # noqa: E731
        loss64 = _unet_loss(
            sd64, f64(tiny_params["unet"]), adapter, *f64((latents, timesteps, context, probe)), plain
        )
        (_, o64), g64 = jax.jit(jax.value_and_grad(loss64, has_aux=True))(f64(trained), 0)
        out["float64"] = jax.tree_util.tree_map(np.asarray, (o64, g64))
    return out


def _errors(results, impl):
    """(worst absolute output error, worst per-leaf relative gradient error) of ``impl`` vs float64."""
    (out, grads), (out64, grads64) = results[impl], results["float64"]
    flat, flat64 = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads64)
    assert len(flat) == len(flat64) == 2 * 32  # down/up of 32 attention matrices
    rel = max(_rel(g, r) for g, r in zip(flat, flat64))
    return float(np.max(np.abs(np.asarray(out, np.float64) - out64))), rel


@pytest.mark.parametrize("impl", EXACT)
def test_output_and_adapter_gradients_match_diffusers(impl, results):
    # The bound is float32's own error, measured here rather than tuned on one CPU: diffusers'
    # float32 code is compared with the same maths in float64, and ours may be off from float64 by
    # at most 4x as much (a different summation order, or FlashAttention's online softmax, moves
    # the rounding but not its scale; any real mistake is orders of magnitude larger). Reduction
    # order, and with it the size of float32 error, differs between CPUs and XLA versions.
    out_err, grad_err = _errors(results, impl)
    ref_out_err, ref_grad_err = _errors(results, "diffusers")
    u = float(np.finfo(np.float32).eps) / 2  # unit roundoff: the floor of any float32 result
    scale = float(np.abs(results["float64"][0]).max())
    assert float(np.abs(results["float64"][0]).mean()) > 1e-2  # not vacuous
    assert 0 < ref_grad_err < 1e-3 and ref_out_err < 1e-3 * scale  # float32 is float32, not garbage
    assert out_err <= 4 * max(ref_out_err, u * scale), (out_err, ref_out_err)
    assert grad_err <= 4 * max(ref_grad_err, u), (grad_err, ref_grad_err)


def test_default_model_applies_adapters_like_merged_weights(tiny_sd, tiny_params, unet_inputs, lora, results):
    adapter, trained = lora
    latents, timesteps, context = unet_inputs
    assert tiny_sd.attention == attention.DEFAULT_IMPLEMENTATION == "auto"
    assert attention.resolve("auto") == "flash"  # the tests run on CPU

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
    kernels = {  # name -> (function, bound on its relative error against float64)
        "dense": lambda q, k, v: attention._dense(q, k, v, 0.5),
        "flash": lambda q, k, v: attention.flash_attention(q, k, v, 0.5, chunk, None),
        "chunked": lambda q, k, v: attention.chunked_attention(q, k, v, 0.5, chunk),
        "flash_bf16": lambda q, k, v: attention.flash_attention(q, k, v, 0.5, chunk, jnp.bfloat16),
    }

    def outputs_and_grads(fn, q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out,) + vjp(d_out.astype(out.dtype))

    results = jax.jit(lambda q, k, v: {name: outputs_and_grads(fn, q, k, v) for name, fn in kernels.items()})(
        q, k, v
    )
    with jax.enable_x64(True):
        f64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        truth = [np.asarray(x) for x in jax.jit(lambda *a: outputs_and_grads(kernels["dense"], *a))(*f64)]
    errors = {name: max(_rel(g, t) for g, t in zip(got, truth)) for name, got in results.items()}
    # Float32 kernels: within 4x of the dense float32 kernel's own error (see the UNet test above).
    # bfloat16 matmul inputs: 8 bf16 units of roundoff (2^-8 each).
    u = float(np.finfo(np.float32).eps) / 2
    for name in ("flash", "chunked"):
        assert errors[name] <= 4 * max(errors["dense"], u), (name, errors)
    assert errors["flash_bf16"] <= 8 * 2.0**-8, errors
    assert errors["dense"] < 1e-4  # the float32 reference is itself sane


def test_unknown_implementation_is_refused(tiny_sd):
    with pytest.raises(ValueError, match="unknown attention implementation 'fast'"):
        dataclasses.replace(tiny_sd, attention="fast")
    with pytest.raises(ValueError, match="chunk must be positive"):
        attention.interceptor("flash", 0)


def test_auto_is_cudnn_on_gpu_and_our_kernel_elsewhere():
    assert attention.resolve("auto", "cpu") == attention.resolve("auto", "tpu") == "flash"
    assert attention.resolve("auto", "gpu") == "xla"  # cuDNN's fused kernel behind jax.nn
    assert attention.resolve("chunked", "gpu") == "chunked"  # a named implementation is kept
    assert attention.resolve("diffusers", "cpu") == "diffusers"
