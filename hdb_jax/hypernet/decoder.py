"""The hypernetwork's weight decoder, and the map between weight tokens and LiDB trees.

One *weight token* per adapted matrix: LiDB's trainable factors of that layer flattened,
``concat(a_train.ravel(), b_train.ravel())``, width ``W = (a + b) · r`` (150 for SD 1.5 LiDB).
Token order: components sorted by name (``text_encoder`` before ``unet``), then each adapter's
targets in their (sorted) order. :func:`tokens_to_tree` and :func:`tree_to_tokens` are pure,
mutually inverse, and keep any leading axes (a batch axis gives the per-sample trees that
``Adapter.attach(..., per_sample=True)`` consumes).

:class:`WeightDecoder` predicts one refinement step ``Δ_k(features, θ̂_{k-1})`` with a pre-LN
transformer over the weight tokens and iterates it (θ̂_0 = 0, θ̂_k = θ̂_{k-1} + Δ_k):

* ``mode="cross"`` (default): each block is self-attention over the weight tokens,
  cross-attention to the projected image features, and an MLP;
* ``mode="concat"`` (the paper's form): projected image features and weight tokens are
  concatenated and each block is self-attention over both plus an MLP.

Iteration is a Python loop calling the same submodules, so every step shares one set of
parameters. We prefer it to ``nn.scan`` because ``s`` is small (4): the unrolled graph is tiny
next to the UNet the loss runs, a loop needs no carry/broadcast plumbing, ``s`` can change per
call (train with 4, try 1 at test time), and a single step (:meth:`WeightDecoder.refine`) is the
very code the loop runs, which makes "s steps == s manual steps" checkable bit for bit.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdb_jax.adapters.core import Adapter
from hdb_jax.adapters.kinds import LiDB

MODES = ("cross", "concat")


# -------------------------------------------------------------------- tokens <-> trees
def token_layout(adapters: Mapping[str, Adapter]) -> tuple[tuple[str, str], ...]:
    """``(component, path)`` of every weight token, in token order."""
    return tuple((c, t.path) for c in sorted(adapters) for t in adapters[c].targets)


def token_width(kind: LiDB) -> int:
    """Scalars per weight token: ``(a + b) · r``."""
    return (kind.a + kind.b) * kind.rank


def token_factors(tokens, kind: LiDB):
    """Weight tokens ``[..., W]`` (jax or numpy) -> ``(A_train [..., a, r], B_train [..., r, b])``."""
    a, b, r = kind.a, kind.b, kind.rank
    lead = tokens.shape[:-1]
    return tokens[..., : a * r].reshape(lead + (a, r)), tokens[..., a * r :].reshape(lead + (r, b))


def _check_kind(adapters: Mapping[str, Adapter], kind: LiDB) -> None:
    for component, adapter in adapters.items():
        own = adapter.kind
        if not isinstance(own, LiDB) or (own.a, own.b, own.rank) != (kind.a, kind.b, kind.rank):
            raise ValueError(
                f"{component}: the hypernetwork predicts LiDB a={kind.a} b={kind.b} r={kind.rank} "
                f"weights but the adapter is {own!r}"
            )


def tokens_to_tree(tokens: jax.Array, adapters: Mapping[str, Adapter], kind: LiDB) -> dict:
    """Weight tokens -> LiDB trainable trees per component.

    Args:
      tokens: ``[..., n, W]`` with ``n`` = total targets and ``W = (a + b) · r``.
      adapters: ``{component: Adapter}`` (LiDB adapters of ``kind``'s sizes).
      kind: the LiDB hyperparameters.

    Returns:
      ``{component: {path: {"a_train": [..., a, r], "b_train": [..., r, b]}}}``.
    """
    _check_kind(adapters, kind)
    layout = token_layout(adapters)
    if tokens.shape[-2:] != (len(layout), token_width(kind)):
        raise ValueError(
            f"expected tokens [..., {len(layout)}, {token_width(kind)}], got {tuple(tokens.shape)}"
        )
    a_all, b_all = token_factors(tokens, kind)  # [..., n, a, r], [..., n, r, b]
    tree: dict[str, dict] = {c: {} for c in sorted(adapters)}
    for i, (component, path) in enumerate(layout):
        tree[component][path] = {"a_train": a_all[..., i, :, :], "b_train": b_all[..., i, :, :]}
    return tree


def tree_to_tokens(
    tree: Mapping[str, Mapping[str, Mapping[str, jax.Array]]], adapters: Mapping[str, Adapter]
) -> jax.Array:
    """LiDB trainable trees per component -> weight tokens ``[..., n, W]`` (inverse of the above).

    Args:
      tree: ``{component: {path: {"a_train": [..., a, r], "b_train": [..., r, b]}}}``.
      adapters: ``{component: Adapter}`` defining which paths and in which order.

    Returns:
      ``[..., n, (a + b) · r]``.
    """
    rows = []
    for component, path in token_layout(adapters):
        layer = tree[component][path]
        a_train, b_train = layer["a_train"], layer["b_train"]
        lead = a_train.shape[:-2]
        rows.append(jnp.concatenate([a_train.reshape(lead + (-1,)), b_train.reshape(lead + (-1,))], -1))
    return jnp.stack(rows, axis=-2)


def default_width(token_w: int, num_heads: int) -> int:
    """Model width ``2 · W`` rounded up to a multiple of ``num_heads``."""
    return -(-2 * token_w // num_heads) * num_heads


# -------------------------------------------------------------------- the network
class Block(nn.Module):
    """A pre-LN transformer block: self-attention, optional cross-attention, MLP.

    Attributes:
      width: model width.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / model width.
      cross: whether to attend to a context.
      dtype: computation dtype.
    """

    width: int
    num_heads: int
    mlp_ratio: int = 4
    cross: bool = True
    dtype: Any = jnp.float32

    def _attention(self, name: str) -> nn.MultiHeadDotProductAttention:
        return nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            qkv_features=self.width,
            out_features=self.width,
            dtype=self.dtype,
            deterministic=True,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """``x`` [B, T, width]; ``context`` [B, N, width] (cross blocks only) -> [B, T, width]."""
        h = nn.LayerNorm(dtype=self.dtype, name="norm_self")(x)
        x = x + self._attention("self_attn")(h)
        if self.cross:
            h = nn.LayerNorm(dtype=self.dtype, name="norm_cross")(x)
            c = nn.LayerNorm(dtype=self.dtype, name="norm_context")(context)
            x = x + self._attention("cross_attn")(h, c)
        h = nn.LayerNorm(dtype=self.dtype, name="norm_mlp")(x)
        h = nn.Dense(self.mlp_ratio * self.width, dtype=self.dtype, name="fc1")(h)  # [B, T, 4·width]
        h = nn.Dense(self.width, dtype=self.dtype, name="fc2")(nn.gelu(h, approximate=False))
        return x + h


class WeightDecoder(nn.Module):
    """Iterative transformer decoder from image features to weight tokens.

    Attributes:
      num_tokens: ``n``, adapted matrices (one token each).
      token_width: ``W = (a + b) · r``.
      width: model width (a multiple of ``num_heads``).
      num_blocks: transformer blocks.
      num_heads: attention heads.
      mode: ``cross`` or ``concat`` (see the module docstring).
      mlp_ratio: MLP hidden width / model width.
      zero_init_head: initialise the output projection to zero (every prediction starts at 0);
        otherwise its kernel is N(0, head_std²) and its bias zero.
      head_std: standard deviation of the output kernel's initialisation.
      offset: start the iteration at a learned per-token offset θ̂_0 (parameter ``offset``
        ``[n, W]``, zero-initialised; training sets it to the targets' mean, so step 0 predicts the
        mean identity and the weight loss has no saddle at the start) instead of θ̂_0 = 0.
      dtype: computation dtype.
    """

    num_tokens: int
    token_width: int
    width: int
    num_blocks: int = 4
    num_heads: int = 2
    mode: str = "cross"
    mlp_ratio: int = 4
    zero_init_head: bool = False
    head_std: float = 1e-3
    offset: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown decoder mode {self.mode!r}; choose from {MODES}")
        if self.width % self.num_heads:
            raise ValueError(f"decoder width {self.width} is not a multiple of {self.num_heads} heads")
        self.layer_embedding = self.param(
            "layer_embedding", nn.initializers.normal(0.02), (self.num_tokens, self.width)
        )
        self.estimate_in = nn.Dense(self.width, dtype=self.dtype)
        self.feature_norm = nn.LayerNorm(dtype=self.dtype)
        self.feature_proj = nn.Dense(self.width, dtype=self.dtype)
        cross = self.mode == "cross"
        self.blocks = [
            Block(self.width, self.num_heads, self.mlp_ratio, cross=cross, dtype=self.dtype)
            for _ in range(self.num_blocks)
        ]
        self.head_norm = nn.LayerNorm(dtype=self.dtype)
        kernel_init = nn.initializers.zeros if self.zero_init_head else nn.initializers.normal(self.head_std)
        self.head = nn.Dense(self.token_width, kernel_init=kernel_init, dtype=self.dtype)
        if self.offset:
            self.start = self.param("offset", nn.initializers.zeros, (self.num_tokens, self.token_width))

    def project(self, features: jax.Array) -> jax.Array:
        """Image features ``[B, N, D]`` -> context ``[B, N, width]`` (once per forward)."""
        return self.feature_proj(self.feature_norm(features))

    def refine(self, context: jax.Array, estimate: jax.Array) -> jax.Array:
        """One refinement step.

        Args:
          context: projected image features ``[B, N, width]`` (from :meth:`project`).
          estimate: the current estimate ``θ̂_{k-1}`` as tokens ``[B, n, W]``.

        Returns:
          The update ``Δ_k`` ``[B, n, W]`` (float32).
        """
        x = self.layer_embedding[None].astype(self.dtype) + self.estimate_in(estimate)  # [B, n, width]
        if self.mode == "cross":
            for block in self.blocks:
                x = block(x, context)
        else:
            h = jnp.concatenate([context.astype(x.dtype), x], axis=1)  # [B, N + n, width]
            for block in self.blocks:
                h = block(h)
            x = h[:, context.shape[1] :]  # [B, n, width]
        return self.head(self.head_norm(x)).astype(jnp.float32)  # [B, n, W]

    def __call__(self, features: jax.Array, iterations: int = 4) -> jax.Array:
        """θ̂_s from image features ``[B, N, D]``: weight tokens ``[B, n, W]`` (float32).

        θ̂_0 is 0, or the ``offset`` parameter when the decoder has one.
        """
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        context = self.project(features)  # [B, N, width]
        estimate = jnp.zeros((features.shape[0], self.num_tokens, self.token_width), jnp.float32)
        if self.offset:
            estimate = estimate + self.start[None].astype(jnp.float32)  # θ̂_0 = the offset
        for _ in range(iterations):
            estimate = estimate + self.refine(context, estimate)
        return estimate
