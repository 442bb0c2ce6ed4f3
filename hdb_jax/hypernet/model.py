"""HyperDreamBooth's hypernetwork: one face image -> per-sample LiDB weights.

``H(x)``: a CLIP vision tower encodes the image once (:mod:`hdb_jax.hypernet.encoder`), and a
transformer decoder over one token per adapted matrix refines an estimate of the LiDB trainable
factors ``s`` times from zero (:mod:`hdb_jax.hypernet.decoder`). The output is the trainable
tree ``Adapter`` consumes, per component and with a leading batch axis:
``{component: {path: {"a_train": [B, a, r], "b_train": [B, r, b]}}}``, ready for
``attach_all(adapters, tree, frozen, per_sample=True)``.

Parameters are one dict with two separate subtrees, ``{"encoder": ..., "decoder": ...}``. The
encoder is frozen by default: its features pass through ``stop_gradient``, and
:func:`split_params` hands the optimizer ``{"decoder": ...}`` only. ``train_encoder=True``
makes both train.

Typical use::

    net, init = build_hypernet("sd15", adapters, LiDB(), encoder_path="/models/vit-h-14")
    params = init(jax.random.PRNGKey(0))
    trainable, frozen = split_params(net, params)
    tree = net.apply({"params": {**frozen, **trainable}}, images)  # images [B, 224, 224, 3]
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdb_jax.adapters.core import Adapter
from hdb_jax.adapters.kinds import LiDB
from hdb_jax.hypernet import decoder as dec
from hdb_jax.hypernet import encoder as enc
from hdb_jax.hypernet import toy_encoder


class HyperNetwork(nn.Module):
    """Image encoder + iterative weight decoder, returning per-sample LiDB trees.

    Attributes:
      encoder: the :class:`~hdb_jax.hypernet.encoder.ImageEncoder` (params under ``encoder``).
      decoder: the :class:`~hdb_jax.hypernet.decoder.WeightDecoder` (params under ``decoder``).
      layout: ``((component, Adapter), ...)`` sorted by component: what the tokens mean.
      kind: the LiDB hyperparameters every adapter uses.
      iterations: refinement steps ``s`` (θ̂_0 = 0; 4 in training).
      train_encoder: whether gradients reach the encoder (False: ``stop_gradient`` on features).
    """

    encoder: Any  # enc.ImageEncoder (CLIP) or toy_encoder.IdentityImageEncoder: images -> [B, N, D]
    decoder: dec.WeightDecoder
    layout: tuple[tuple[str, Adapter], ...]
    kind: LiDB
    iterations: int = 4
    train_encoder: bool = False

    @property
    def adapters(self) -> dict[str, Adapter]:
        return dict(self.layout)

    @property
    def image_size(self) -> int:
        return int(self.encoder.image_size)

    def encode(self, images: jax.Array) -> jax.Array:
        """NHWC images ``[B, S, S, 3]`` in [-1, 1] -> features ``[B, N, D]``."""
        features = self.encoder(images)
        return features if self.train_encoder else jax.lax.stop_gradient(features)

    def decode(self, features: jax.Array, iterations: int | None = None) -> jax.Array:
        """Features ``[B, N, D]`` -> weight tokens θ̂_s ``[B, n, W]``.

        With a frozen encoder, training may cache features and call this directly.
        """
        return self.decoder(features, self.iterations if iterations is None else iterations)

    def refine(self, features: jax.Array, estimate: jax.Array) -> jax.Array:
        """One step: the update ``Δ(features, θ̂)`` ``[B, n, W]`` for an estimate ``[B, n, W]``."""
        return self.decoder.refine(self.decoder.project(features), estimate)

    def predict_tokens(self, images: jax.Array, iterations: int | None = None) -> jax.Array:
        """Images -> weight tokens ``[B, n, W]`` (the image is encoded once)."""
        return self.decode(self.encode(images), iterations)

    def __call__(self, images: jax.Array, iterations: int | None = None) -> dict:
        """Images ``[B, S, S, 3]`` in [-1, 1] -> ``{component: {path: {"a_train", "b_train"}}}``.

        Leaves are ``[B, a, r]`` and ``[B, r, b]``; override ``s`` with ``iterations``.
        """
        return dec.tokens_to_tree(self.predict_tokens(images, iterations), self.adapters, self.kind)


def build_hypernet(
    config_name: str,
    adapters: Mapping[str, Adapter],
    lidb: LiDB,
    *,
    iterations: int = 4,
    mode: str = "cross",
    width: int | None = None,
    num_blocks: int = 4,
    num_heads: int = 2,
    train_encoder: bool = False,
    zero_init_head: bool = False,
    head_std: float = 1e-3,
    offset: bool = False,
    encoder_path: str | os.PathLike | None = None,
    dtype: Any = jnp.float32,
) -> tuple[HyperNetwork, Initializer]:
    """Builds the hypernetwork and its parameter initialiser.

    Args:
      config_name: the encoder: ``tiny`` (a random tiny CLIP vision tower, tests), ``sd15`` (CLIP
        ViT-H/14 vision tower) or ``toy_identity`` (the toy world's trained identity encoder,
        :mod:`hdb_jax.hypernet.toy_encoder`; ``encoder_path`` defaults to the shipped one).
      adapters: ``{component: Adapter}`` of LiDB adapters (e.g. UNet + text-encoder attention).
      lidb: the LiDB hyperparameters (token width ``(a + b) · r``).
      iterations: refinement steps ``s``.
      mode: decoder blocks, ``cross`` (cross-attention to features) or ``concat`` (paper).
      width: decoder width; None: ``2 · W`` rounded up to a multiple of ``num_heads``.
      num_blocks: decoder blocks.
      num_heads: decoder attention heads.
      train_encoder: let the encoder train too.
      zero_init_head: zero output projection (every prediction starts at exactly 0).
      head_std: std of the output kernel otherwise.
      offset: the decoder starts from a learned per-token offset (see ``WeightDecoder.offset``).
      encoder_path: a local CLIP vision directory whose weights ``init`` loads (see
        :func:`~hdb_jax.hypernet.encoder.load_encoder_params`); None: random encoder.
      dtype: computation dtype (parameters stay float32).

    Returns:
      ``(module, init)`` with ``init(key) -> {"encoder": ..., "decoder": ...}`` (an
      :class:`Initializer`: inside ``jax.jit`` pass ``init.load_encoder()`` as an argument).
    """
    if not adapters:
        raise ValueError("the hypernetwork needs at least one adapter")
    dec._check_kind(adapters, lidb)  # pylint: disable=protected-access
    if config_name == toy_encoder.NAME:
        image_encoder, trained = toy_encoder.build(encoder_path)
        load_encoder = lambda: trained  # noqa: E731
    else:
        config = enc.encoder_config(config_name)
        image_encoder = enc.ImageEncoder(config, dtype=dtype)
        load_encoder = (
            (lambda: enc.load_encoder_params(encoder_path, config)[1]) if encoder_path is not None else None
        )
    token_w = dec.token_width(lidb)
    decoder = dec.WeightDecoder(
        num_tokens=len(dec.token_layout(adapters)),
        token_width=token_w,
        width=width or dec.default_width(token_w, num_heads),
        num_blocks=num_blocks,
        num_heads=num_heads,
        mode=mode,
        zero_init_head=zero_init_head,
        head_std=head_std,
        offset=offset,
        dtype=dtype,
    )
    module = HyperNetwork(
        encoder=image_encoder,
        decoder=decoder,
        layout=tuple((c, adapters[c]) for c in sorted(adapters)),
        kind=lidb,
        iterations=iterations,
        train_encoder=train_encoder,
    )

    return module, Initializer(module, load_encoder)


@dataclasses.dataclass(frozen=True)
class Initializer:
    """``init(key, encoder_params=None)``: the hypernetwork's parameters ``{"encoder", "decoder"}``.

    ``load_encoder()`` reads the pretrained encoder weights (host arrays; None: the encoder is
    random). A call without ``encoder_params`` loads them itself, which is right eagerly but not
    under ``jax.jit``: there they would become constants of the program (2.5 GB for ViT-H/14, and
    minutes of XLA:CPU compile). A jitted initialiser takes them as an argument instead.
    """

    module: HyperNetwork
    loader: Callable[[], dict] | None = None

    def load_encoder(self) -> dict | None:
        return self.loader() if self.loader is not None else None

    def __call__(self, key: jax.Array, encoder_params: dict | None = None) -> dict:
        if encoder_params is None:
            encoder_params = self.load_encoder()
        return init_params(self.module, key, encoder_params=encoder_params)


def _init_fns(module: HyperNetwork) -> tuple[Callable, Callable]:
    size = module.image_size
    encoder = module.encoder.clone(parent=None)
    decoder = module.decoder.clone(parent=None)
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    shape = jax.eval_shape(
        lambda k: encoder.apply(encoder.init(k, images), images), jax.random.PRNGKey(0)
    ).shape
    features = jnp.zeros(shape, jnp.float32)  # [1, N, D]
    return (
        lambda k: encoder.init(k, images)["params"],
        lambda k: decoder.init(k, features, 1)["params"],
    )


def init_params(module: HyperNetwork, key: jax.Array, encoder_params: dict | None = None) -> dict:
    """Random parameters ``{"encoder", "decoder"}``; ``encoder_params`` replaces the encoder's.

    The two subtrees are initialised separately (the same trees ``module.init`` would make), so
    a loaded encoder costs no random initialisation.
    """
    init_encoder, init_decoder = _init_fns(module)
    k_enc, k_dec = jax.random.split(key)
    encoder = encoder_params if encoder_params is not None else jax.jit(init_encoder)(k_enc)
    return {"encoder": encoder, "decoder": jax.jit(init_decoder)(k_dec)}


def abstract_params(module: HyperNetwork) -> dict:
    """Parameter shapes (``jax.ShapeDtypeStruct``) ``{"encoder", "decoder"}``, nothing allocated."""
    init_encoder, init_decoder = _init_fns(module)
    key = jax.random.PRNGKey(0)
    return {"encoder": jax.eval_shape(init_encoder, key), "decoder": jax.eval_shape(init_decoder, key)}


def split_params(module: HyperNetwork, params: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(trainable, frozen)``: what the optimizer sees and what it must not.

    ``{"decoder"}`` / ``{"encoder"}`` with a frozen encoder, everything / ``{}`` otherwise.
    Apply with ``{"params": {**frozen, **trainable}}``.
    """
    if module.train_encoder:
        return dict(params), {}
    return {"decoder": params["decoder"]}, {"encoder": params["encoder"]}
