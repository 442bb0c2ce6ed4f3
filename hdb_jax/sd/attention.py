"""Faster attention for diffusers' Flax ``FlaxAttention``, installed as a method interceptor.

diffusers' Flax attention materialises the whole ``[B·heads, T, S]`` score matrix and lets
autodiff save the softmax for the backward pass. On CPU that is the dominant cost of an adapter
training step: at 32x32 latents one self-attention layer writes several 64 MB arrays per step,
and every freshly allocated page of them costs a page fault. The implementations here replace
only the attention maths; the q/k/v/out projections still go through the module's own Dense
submodules (``module.query`` = ``...attn1.to_q`` etc.), so adapters that intercept those layers
(:meth:`hdb_jax.adapters.Adapter.attach`) apply unchanged.

Implementations, chosen by name (see :data:`IMPLEMENTATIONS`):

* ``diffusers``: the library's own code, untouched.
* ``xla``: ``jax.nn.dot_product_attention`` with ``implementation=None`` (cuDNN flash
  attention on GPUs that support it, XLA elsewhere).
* ``chunked``: queries in chunks of ``chunk`` under ``lax.map``, each chunk rematerialised
  (``jax.checkpoint``) in the backward pass, so only a ``[B·heads, chunk, S]`` block is live.
* ``flash`` (``auto``'s choice on CPU): chunked like ``chunked`` but with a hand-written VJP (FlashAttention's):
  the forward keeps only the output and the row log-sum-exp; the backward recomputes each
  chunk's probabilities once and forms ``dS = P ∘ (dP − rowsum(dO ∘ O))`` directly, which needs
  fewer passes over the score block than autodiff through softmax. Blocks are laid out for
  XLA:CPU's fast dot kernels (see :func:`flash_attention`). On one core of the benchmark
  machine one 1024-token, 8-wide self-attention layer (batch 4, 4 heads) takes 47 ms forward +
  backward, as PyTorch's SDPA flash kernel does (47 ms); ``chunked`` takes 95 ms. The default
  chunk (128) is the faster one on two cores; on one core 64 is ~5% faster.
* ``flash_bf16``: ``flash`` with bfloat16 matmul inputs and float32 softmax statistics. Not
  numerically equivalent (~1e-2 relative); an option for accelerators only: on CPU it measured
  ~30% slower than ``flash`` (the dots here are too thin for AMX to pay off).
* ``auto`` (default): chosen by the platform the program is traced for: ``xla`` on GPU (where
  ``jax.nn.dot_product_attention`` reaches cuDNN's fused flash attention), ``flash`` on CPU and
  TPU (on TPU XLA's attention keeps the whole score matrix: the hypernetwork step at 512 px and 2
  images per device needs 25.7 GiB per chip with it and 13.7 GiB with ``flash``, so only
  ``flash`` fits a v5e's 16 GiB; ``benchmarks/mesh_plan.py``). Name an implementation in the
  model's config (``config.model.attention``) to override it.

All are the same function as diffusers' (heads split from the channel axis as
``[..., heads, dim_head]``, scale ``dim_head ** -0.5``, softmax over keys).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hdb_jax.sd import hf

IMPLEMENTATIONS = ("auto", "diffusers", "xla", "chunked", "flash", "flash_bf16")
DEFAULT_IMPLEMENTATION = "auto"
DEFAULT_CHUNK = 128


def resolve(implementation: str, platform: str | None = None) -> str:
    """The implementation ``implementation`` means on ``platform`` (default: JAX's default backend).

    ``auto`` is ``xla`` on GPU, where ``jax.nn.dot_product_attention`` reaches cuDNN's fused
    kernel, and ``flash`` elsewhere: on CPU our kernel is the fastest, on TPU the one that never
    holds the score matrix (see the module docstring); every other name means itself.
    """
    if implementation != "auto":
        return implementation
    return "xla" if (platform or jax.default_backend()) in ("gpu", "cuda", "rocm") else "flash"


# -------------------------------------------------------------------- chunking helpers
def _pad_to_chunks(x: jax.Array, chunk: int) -> tuple[jax.Array, int]:
    """Pads axis 1 of ``x`` to a multiple of ``chunk``; returns the padded array and padding."""
    pad = -x.shape[1] % chunk
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x, pad


def _split(x: jax.Array, chunk: int) -> jax.Array:
    """``[N, T, ...] -> [T / chunk, N, chunk, ...]`` (T a multiple of ``chunk``)."""
    n, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(n, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _merge(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_split`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _chunk_size(length: int, chunk: int) -> int:
    return max(1, min(chunk, length))


# -------------------------------------------------------------------- attention kernels
# q: [N, T, d], k and v: [N, S, d] with N = batch · heads; all return [N, T, d].
def _dense(q, k, v, scale):
    scores = jnp.einsum("ntd,nsd->nts", q, k) * scale
    return jnp.einsum("nts,nsd->ntd", jax.nn.softmax(scores, axis=-1), v)


def chunked_attention(q, k, v, scale: float, chunk: int = DEFAULT_CHUNK):
    """Softmax attention over query chunks, each recomputed in the backward pass."""
    c = _chunk_size(q.shape[1], chunk)
    qp, pad = _pad_to_chunks(q, c)
    one = jax.checkpoint(functools.partial(_dense, k=k, v=v, scale=scale), prevent_cse=False)
    out = _merge(jax.lax.map(one, _split(qp, c)))
    return out[:, : q.shape[1]] if pad else out


def _matmul(spec: str, a, b, dtype):
    """``einsum`` with inputs cast to ``dtype`` (None: as given) and a float32 result."""
    if dtype is None:
        return jnp.einsum(spec, a, b)
    a, b = a.astype(dtype), b.astype(dtype)
    if jax.default_backend() == "cpu":
        # XLA:CPU's fallback dot (DotThunk) has no bf16 x bf16 -> f32 kernel; its YNNPACK dots
        # accumulate in float32 and round the result.
        return jnp.einsum(spec, a, b).astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def flash_attention(q, k, v, scale: float, chunk: int = DEFAULT_CHUNK, dtype=None):
    """Softmax attention with a FlashAttention-style VJP over query chunks.

    Every matmul is laid out so that no operand is contracted over its leading (non-minor)
    axis: XLA:CPU hands such "transposed-LHS" products to Eigen, which packs them 3-5x slower
    than YNNPACK runs the others at these shapes. So the backward pass works on transposed
    score blocks ``[N, S, chunk]`` and gets ``dQ`` as ``(Kᵀ · dSᵀ)ᵀ`` from a pre-transposed K.

    Args:
      q: queries [N, T, d].
      k: keys [N, S, d].
      v: values [N, S, d].
      scale: multiplies the scores (``d ** -0.5`` in diffusers).
      chunk: queries per chunk.
      dtype: matmul input dtype (e.g. ``jnp.bfloat16``); None keeps the inputs' dtype.

    Returns:
      [N, T, d].
    """
    return _flash_forward(q, k, v, scale, chunk, dtype)[0]


def _flash_forward(q, k, v, scale, chunk, dtype):
    c = _chunk_size(q.shape[1], chunk)
    qp, pad = _pad_to_chunks(q * scale, c)  # scaling q, not the scores, saves a pass over them
    # [V | 1]ᵀ: the P·V product then also returns the softmax denominator as its last row.
    v_ones_t = jnp.swapaxes(jnp.concatenate([v, jnp.ones(v.shape[:2] + (1,), v.dtype)], -1), 1, 2)

    def one(qc):
        scores_t = _matmul("nsd,ntd->nst", k, qc, dtype)  # [N, S, c]
        peak = jnp.max(scores_t, axis=1, keepdims=True)  # [N, 1, c]
        out_t = _matmul("nds,nst->ndt", v_ones_t, jnp.exp(scores_t - peak), dtype)  # [N, d+1, c]
        out, total = out_t[:, :-1], out_t[:, -1]
        return out / total[:, None], peak[:, 0] + jnp.log(total)

    out_t, lse = jax.lax.map(one, _split(qp, c))  # [T/c, N, d, c], [T/c, N, c]
    out, lse = _merge(jnp.swapaxes(out_t, 2, 3)).astype(q.dtype), _merge(lse)
    if pad:
        out, lse = out[:, : q.shape[1]], lse[:, : q.shape[1]]
    return out, lse


def _flash_fwd(q, k, v, scale, chunk, dtype):
    out, lse = _flash_forward(q, k, v, scale, chunk, dtype)
    return out, (q, k, v, out, lse)


def _flash_bwd(scale, chunk, dtype, residuals, d_out):
    q, k, v, out, lse = residuals
    c = _chunk_size(q.shape[1], chunk)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [N, T]
    k_t = jnp.swapaxes(k, 1, 2) * scale  # [N, d, S], materialised once outside the loop
    chunks = [_pad_to_chunks(x, c)[0] for x in (q * scale, d_out, lse, delta)]
    pad = -q.shape[1] % c

    def body(carry, xs):
        dk, dv = carry
        qc, doc, lse_c, delta_c = xs  # [N, c, d], [N, c, d], [N, c], [N, c]
        probs_t = jnp.exp(_matmul("nsd,ntd->nst", k, qc, dtype) - lse_c[:, None, :])
        dv = dv + _matmul("nst,ntd->nsd", probs_t, doc, dtype)
        d_probs_t = _matmul("nsd,ntd->nst", v, doc, dtype)
        d_scores_t = probs_t * (d_probs_t - delta_c[:, None, :])
        dk = dk + _matmul("nst,ntd->nsd", d_scores_t, qc, dtype)  # qc carries the scale
        dq_t = _matmul("nds,nst->ndt", k_t, d_scores_t, dtype)  # [N, d, c]
        return (dk, dv), dq_t

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq_t = jax.lax.scan(body, zeros, tuple(_split(x, c) for x in chunks))
    dq = _merge(jnp.swapaxes(dq_t, 2, 3))
    if pad:
        dq = dq[:, : q.shape[1]]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


flash_attention.defvjp(_flash_fwd, _flash_bwd)


# -------------------------------------------------------------------- the interceptor
def _call_arguments(args, kwargs) -> tuple[jax.Array, jax.Array | None, bool]:
    """``(hidden_states, context, deterministic)`` of a ``FlaxAttention.__call__``."""
    names = ("hidden_states", "context", "deterministic")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound["hidden_states"], bound.get("context"), bound.get("deterministic", True)


@dataclasses.dataclass(frozen=True)
class AttentionInterceptor:
    """Replaces ``FlaxAttention.__call__``'s attention maths; use with ``nn.intercept_methods``.

    Attributes:
      implementation: one of :data:`IMPLEMENTATIONS`.
      chunk: queries per chunk (``chunked``, ``flash``, ``flash_bf16``).
    """

    implementation: str = DEFAULT_IMPLEMENTATION
    chunk: int = DEFAULT_CHUNK

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown attention implementation {self.implementation!r}; "
                f"choose from {', '.join(IMPLEMENTATIONS)}"
            )
        if self.chunk < 1:
            raise ValueError(f"attention chunk must be positive, got {self.chunk}")

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
        """Attention of ``q [B, T, H, d]`` over ``k, v [B, S, H, d]``; returns ``[B, T, H, d]``."""
        implementation = resolve(self.implementation)
        if implementation == "xla":
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=None)
        b, t, h, d = q.shape
        to_rows = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(b * h, x.shape[1], d)  # noqa: E731
        qr, kr, vr = to_rows(q), to_rows(k), to_rows(v)
        if implementation == "chunked":
            out = chunked_attention(qr, kr, vr, scale, self.chunk)
        else:
            dtype = jnp.bfloat16 if implementation == "flash_bf16" else None
            out = flash_attention(qr, kr, vr, scale, self.chunk, dtype)
        return jnp.transpose(out.reshape(b, h, t, d), (0, 2, 1, 3))

    def __call__(self, next_fun: Callable, args, kwargs, context) -> Any:
        module = context.module
        if (
            self.implementation == "diffusers"
            or context.method_name != "__call__"
            or not isinstance(module, hf.FlaxAttention)
        ):
            return next_fun(*args, **kwargs)
        hidden, cross, deterministic = _call_arguments(args, kwargs)
        cross = hidden if cross is None else cross
        # The module's own Dense layers, so that adapter interceptors on them still apply.
        q, k, v = module.query(hidden), module.key(cross), module.value(cross)
        heads, dim_head = module.heads, module.dim_head
        split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, dim_head)  # noqa: E731
        out = self.attend(split(q), split(k), split(v), dim_head**-0.5)
        out = out.reshape(out.shape[0], out.shape[1], heads * dim_head).astype(q.dtype)
        return module.dropout_layer(module.proj_attn(out), deterministic=deterministic)


def interceptor(
    implementation: str = DEFAULT_IMPLEMENTATION, chunk: int = DEFAULT_CHUNK
) -> AttentionInterceptor:
    """The method interceptor for ``implementation`` (validated)."""
    return AttentionInterceptor(implementation, chunk)
