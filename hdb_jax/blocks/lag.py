"""Localized attention-guided (LAG) sampling of Personalized Residuals (arXiv 2405.12978).

Personalized Residuals train a low-rank residual on the output projection (``proj_out``) of
every transformer block. LAG applies that residual only where the subject is: at every
denoising step and in every block, the block's cross-attention probabilities (averaged over
heads) of the subject tokens (the rare token V* and the class word) are summed into a map over
the block's spatial positions, binarised at its median (half the positions are "subject"), and

    proj_out'(x) = proj_out(x) + M ⊙ residual(x)

on the conditional branch; the unconditional branch runs the base weights (M = 0). Everything
happens inside the one UNet evaluation the sampler makes anyway: no extra forward pass.

Implementation: two method interceptors active around the UNet call. The first replaces the
attention maths of every ``attn2`` (cross-attention, 77 keys: cheap) with a dense softmax whose
probabilities it records per block; every other attention keeps the fast path. The second adds
the masked residual at each ``proj_out`` (a Residual adapter's targets), reading the map its own
block recorded earlier in the same forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdb_jax import adapters as A
from hdb_jax.sd import attention as attention_lib
from hdb_jax.sd import hf


def block_of(path: str) -> str:
    """The transformer block (``...attentions_<i>``) a module path lies in."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("attentions_"):
            return ".".join(parts[: i + 1])
    raise ValueError(f"'{path}' is not inside a transformer block")


def subject_mask(scores: jax.Array) -> jax.Array:
    """``[B, T]`` subject scores -> a 0/1 mask: 1 above the per-sample median (half the positions)."""
    return (scores > jnp.median(scores, axis=-1, keepdims=True)).astype(scores.dtype)


@dataclasses.dataclass
class Recording:
    """What one forward pass under :func:`lag` recorded: per block, scores and masks ``[B, T]``."""

    scores: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    masks: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def lag(
    adapter: A.Adapter,
    trainable: Mapping[str, Any],
    frozen: Mapping[str, Any] | None,
    token_weights: jax.Array,
    branch: jax.Array,
    *,
    mask_override: float | None = None,
) -> Iterator[Recording]:
    """Runs the UNet with LAG-masked residuals while the context is open.

    Args:
      adapter: the Residual (or any) adapter on ``proj_out`` layers.
      trainable, frozen: its trees (one personal model, shared by the batch).
      token_weights: ``[B, L]``: 1 at each row's V* and class token positions, 0 elsewhere.
      branch: ``[B]``: 1 for conditional rows (masked residual), 0 for unconditional rows (base).
      mask_override: None for LAG; 1.0 or 0.0 applies the residual everywhere or nowhere, on every
        row (what merged-weights and base sampling compute; for tests).

    Yields:
      The :class:`Recording` filled in by the forward pass.
    """
    rec = Recording()
    targets = {t.path: t for t in adapter.targets}
    frozen = frozen or {}

    def attention(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, hf.FlaxAttention):
            return next_fun(*args, **kwargs)
        path = ".".join(module.scope.path)
        if not path.endswith("attn2"):
            return next_fun(*args, **kwargs)
        hidden, cross, deterministic = attention_lib._call_arguments(args, kwargs)  # noqa: SLF001
        q, k, v = module.query(hidden), module.key(cross), module.value(cross)  # adapters on them still apply
        b, t, s, h, d = q.shape[0], q.shape[1], k.shape[1], module.heads, module.dim_head
        split = lambda x, n: jnp.transpose(x.reshape(b, n, h, d), (0, 2, 1, 3))  # noqa: E731  [B, H, n, d]
        logits = jnp.einsum("bhtd,bhsd->bhts", split(q, t), split(k, s)).astype(jnp.float32) * d**-0.5
        probs = jax.nn.softmax(logits, axis=-1)  # [B, H, T, S]
        out = jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), split(v, s))
        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(b, t, h * d).astype(q.dtype)
        score = jnp.einsum("bts,bs->bt", probs.mean(axis=1), token_weights.astype(jnp.float32))  # [B, T]
        rec.scores[block_of(path)] = score
        rec.masks[block_of(path)] = subject_mask(score) * branch.astype(jnp.float32)[:, None]
        return module.dropout_layer(module.proj_attn(out), deterministic=deterministic)

    def residual(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
            return next_fun(*args, **kwargs)
        path = ".".join(module.scope.path) if module.scope is not None else None
        if path not in targets:
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        y = next_fun(*args, **kwargs)
        update = adapter.kind.apply(trainable[path], frozen.get(path, {}), x)  # [B, ..., C]
        if mask_override is not None:
            mask = jnp.full(x.shape[:-1] + (1,), mask_override, y.dtype)
        else:
            block = block_of(path)
            if block not in rec.masks:
                raise RuntimeError(
                    f"LAG: no cross-attention map recorded for block '{block}' before its proj_out"
                )
            mask = rec.masks[block].reshape(x.shape[:-1] + (1,)).astype(y.dtype)
        return y + mask * update.astype(y.dtype)

    with nn.intercept_methods(residual), nn.intercept_methods(attention):
        yield rec


def token_weights(input_ids: jax.Array, token_ids) -> jax.Array:
    """``[B, L]`` float: 1 where ``input_ids`` is one of ``token_ids`` (V* and the class word)."""
    ids = jnp.asarray(input_ids)
    return jnp.isin(ids, jnp.asarray(list(token_ids))).astype(jnp.float32)
