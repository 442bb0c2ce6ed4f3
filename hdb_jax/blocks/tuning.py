"""What a subject run trains: adapters (LoRA, LiDB, Kronecker, residuals), the whole UNet
(DreamBooth) or one token embedding (Textual Inversion), behind one interface.

A :class:`Tuning` owns the trainable tree's initial value and how it enters the model:

* :meth:`Tuning.applied` is a context manager around the forward pass that yields the
  parameters to run with (adapters: the base parameters, their updates added in activation
  space while the context is open; DreamBooth: the base parameters with the trained UNet (and
  text encoder) in place; Textual Inversion: the base parameters with the token's embedding row
  replaced);
* :meth:`Tuning.merged` returns plain parameters for sampling and export.

Gradients are taken with respect to the trainable tree only, so Textual Inversion changes one
row and nothing else, and DreamBooth's optimizer state covers the UNet only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp

from hdb_jax import adapters as A

METHODS = ("adapter", "dreambooth", "textual_inversion")
EMBEDDING_PATH = ("text_model", "embeddings", "token_embedding", "embedding")


def _get(tree: Mapping[str, Any], path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Mapping[str, Any], path: tuple[str, ...], value) -> dict:
    """A copy of ``tree`` with ``path`` replaced (only the dicts on the path are copied)."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
    return out


@dataclasses.dataclass(frozen=True)
class AdapterTuning:
    """Adapters on the base model, added in activation space (``attach_all``)."""

    adapters: dict[str, A.Adapter]
    name: str = "adapter"

    def init(self, key: jax.Array, params: Mapping[str, Any]) -> dict:
        del params
        return {c: a.init(key) for c, a in self.adapters.items()}

    @contextlib.contextmanager
    def applied(self, params, trainable, frozen) -> Iterator[Mapping[str, Any]]:
        with A.attach_all(self.adapters, trainable, frozen):
            yield params

    def merged(self, params, trainable, frozen) -> dict:
        return A.merge_all(params, self.adapters, trainable, frozen)

    def num_params(self, trainable=None) -> int:
        return sum(a.num_params() for a in self.adapters.values())


@dataclasses.dataclass(frozen=True)
class DreamBoothTuning:
    """DreamBooth: the UNet's own weights train (and the text encoder's, with ``text_encoder``)."""

    components: tuple[str, ...] = ("unet",)
    name: str = "dreambooth"

    def init(self, key: jax.Array, params: Mapping[str, Any]) -> dict:
        del key
        return {c: jax.tree_util.tree_map(jnp.array, params[c]) for c in self.components}  # copies: donated

    @contextlib.contextmanager
    def applied(self, params, trainable, frozen) -> Iterator[Mapping[str, Any]]:
        yield self.merged(params, trainable, frozen)

    def merged(self, params, trainable, frozen) -> dict:
        return {**params, **trainable}

    def num_params(self, trainable) -> int:
        return int(sum(x.size for x in jax.tree_util.tree_leaves(trainable)))


@dataclasses.dataclass(frozen=True)
class TextualInversionTuning:
    """Textual Inversion: one token's input embedding trains; every weight of the model stays.

    The token is an existing rare token of the vocabulary (``sks``); its row starts as the
    embedding of ``init_token`` (the class word).
    """

    token_id: int
    init_id: int
    name: str = "textual_inversion"

    def init(self, key: jax.Array, params: Mapping[str, Any]) -> dict:
        del key
        table = _get(params["text_encoder"], EMBEDDING_PATH)  # [V, D]
        return {"embedding": jnp.array(table[self.init_id])}  # [D]

    @contextlib.contextmanager
    def applied(self, params, trainable, frozen) -> Iterator[Mapping[str, Any]]:
        yield self.merged(params, trainable, frozen)

    def merged(self, params, trainable, frozen) -> dict:
        table = _get(params["text_encoder"], EMBEDDING_PATH)
        table = table.at[self.token_id].set(trainable["embedding"].astype(table.dtype))
        return {**params, "text_encoder": _set(params["text_encoder"], EMBEDDING_PATH, table)}

    def num_params(self, trainable) -> int:
        return int(trainable["embedding"].size)


def token_id(tokenizer, word: str) -> int:
    """The id of ``word`` as one token (ValueError if the tokenizer splits it)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"'{word}' is {len(ids)} tokens for this tokenizer; Textual Inversion needs a single-token word"
        )
    return int(ids[0])
