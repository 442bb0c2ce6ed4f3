"""Rank-relaxed fast finetuning: stage 3 of HyperDreamBooth.

The hypernetwork predicts LiDB weights (rank ``r_lidb``, usually 1) for one face. This module
turns that prediction into a rank-``r`` LoRA and finetunes it for a few steps on the single
reference image with the plain denoising loss and the prompt "a [V] face". Two variants:

* ``fresh`` (the paper): the predicted ΔW is merged into the base weights, which stay frozen, and
  a new LoRA (down random, up zero) trains on top, so step 0 is exactly the prediction;
* ``svd``: the base weights stay as they are and one rank-``r`` LoRA holds the prediction in its
  leading slots (the SVD of each predicted ΔW) and a zero LoRA in the rest.

Either way :func:`fold` gives the result as one LoRA per component relative to the base
weights, which is what gets exported. The finetuning loop is one jitted step or one compiled
``lax.scan`` over the same step body (:func:`make_finetune`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hdb_jax import adapters as A
from hdb_jax.blocks import diffusion
from hdb_jax.sd.model import StableDiffusion

Tree = dict[str, dict[str, jax.Array]]
Trees = dict[str, Tree]  # {component: tree}
VARIANTS = ("fresh", "svd")


@dataclasses.dataclass(frozen=True)
class Relaxed:
    """The starting point of the rank-relaxed finetuning.

    Attributes:
      variant: ``fresh`` or ``svd``.
      frozen_params: ``{"unet", "text_encoder", "vae"}`` the LoRA trains on top of (the base
        params with the prediction merged in for ``fresh``; the base params for ``svd``).
      adapters: ``{component: Adapter}`` of kind ``LoRA`` on the LiDB adapters' targets.
      trainable: the initial LoRA trees ``{component: {path: {"down", "up"}}}``.
      lidb_adapters, basis, predicted: the LiDB prediction it starts from (what :func:`fold`
        adds back for ``fresh``).
    """

    variant: str
    frozen_params: dict
    adapters: dict[str, A.Adapter]
    trainable: Trees
    lidb_adapters: dict[str, A.Adapter]
    basis: Mapping[str, Tree]
    predicted: Mapping[str, Tree]

    @property
    def frozen(self) -> dict:
        """The ``frozen`` argument of the finetuning step (LoRA has empty frozen trees)."""
        return {"params": self.frozen_params, "basis": {c: {} for c in self.adapters}}


class Finetune(NamedTuple):
    """The compiled finetuning functions of :func:`make_finetune`."""

    step: Callable  # (state, frozen, image, input_ids, rng) -> (state, metrics)
    run: Callable  # (state, frozen, image, input_ids, rng, steps) -> (state, losses [steps])


def _svd_factors(down: jax.Array, up: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The thin SVD ``U [in, k], σ [k], Vᵀ [k, out]`` of ``down [in, k] · up [k, out]``."""
    q_down, r_down = jnp.linalg.qr(down)
    q_up, r_up = jnp.linalg.qr(up.T)
    p, sigma, wt = jnp.linalg.svd(r_down @ r_up.T)
    return q_down @ p, sigma, wt @ q_up.T


def _lora_holding(kind: A.LoRA, init: dict, down: jax.Array, up: jax.Array) -> dict:
    """LoRA factors with ``scale · down' · up' = down · up`` in the leading slots.

    Each singular value's square root goes into both factors, divided by ``√scale``. Slots with a
    zero singular value (and the slots past the prediction's rank) keep the LoRA init: a random
    down column and a zero up row, so they can still learn.
    """
    u, sigma, vt = _svd_factors(down, up)
    k = sigma.shape[0]
    live = sigma > sigma[0] * k * jnp.finfo(sigma.dtype).eps
    root = jnp.sqrt(jnp.where(live, sigma, 0.0) / kind.scale)
    lead_down = jnp.where(live[None, :], u * root[None, :], init["down"][:, :k])
    lead_up = vt * root[:, None]
    return {
        "down": init["down"].at[:, :k].set(lead_down),
        "up": init["up"].at[:k].set(lead_up),
    }


def _check(variant: str, rank: int, lidb_adapters: Mapping[str, A.Adapter], predicted: Mapping[str, Tree]):
    """Raises ValueError for the inputs :func:`relax` cannot turn into an exact starting point."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    for component, adapter in lidb_adapters.items():
        kind = adapter.kind
        if not isinstance(kind, A.LiDB):
            raise ValueError(f"{component}: expected a LiDB adapter, got {type(kind).__name__}")
        want = {"a_train": (kind.a, kind.rank), "b_train": (kind.rank, kind.b)}
        for path in adapter.paths:
            got = {name: tuple(x.shape) for name, x in predicted[component][path].items()}
            if got != want:
                raise ValueError(
                    f"{component} '{path}': predicted factor shapes {got}, expected {want} "
                    "(one identity, no batch axis)"
                )
        if variant == "svd" and rank < kind.rank:
            raise ValueError(
                f"{component}: relaxed rank {rank} is smaller than the LiDB prediction's rank "
                f"{kind.rank}; the svd variant needs rank >= {kind.rank}"
            )


def relax(
    variant: str,
    base_params: Mapping[str, Any],
    lidb_adapters: Mapping[str, A.Adapter],
    basis: Mapping[str, Tree],
    predicted: Mapping[str, Tree],
    *,
    rank: int = 4,
    alpha: float | None = None,
    key: jax.Array,
) -> Relaxed:
    """Builds the frozen params and the initial rank-``rank`` LoRA from a LiDB prediction.

    Args:
      variant: ``fresh`` (merge the prediction, train a new LoRA) or ``svd`` (one LoRA that
        starts at the prediction).
      base_params: ``{"unet", "text_encoder", "vae"}`` of the base model; None skips the merge
        (``frozen_params`` is then None: the batched program adds predictions in activation space).
      lidb_adapters: ``{component: Adapter}`` of kind ``LiDB``.
      basis: their frozen bases ``{component: {path: {"a_aux", "b_aux"}}}``.
      predicted: one identity's LiDB weights ``{component: {path: {"a_train", "b_train"}}}``.
      rank: the relaxed LoRA rank.
      alpha: LoRA alpha (``None``: scale 1).
      key: PRNG key of the LoRA init.

    Returns:
      A :class:`Relaxed` whose model at step 0 equals the base model with the prediction merged.

    Raises:
      ValueError: an unknown variant, a non-LiDB adapter, predicted factors of the wrong shape
        (e.g. a batch axis), or (``svd``) ``rank`` below the LiDB rank.
    """
    _check(variant, rank, lidb_adapters, predicted)
    kind = A.LoRA(rank=rank, alpha=alpha)
    adapters = {c: A.Adapter(kind, a.targets, c) for c, a in lidb_adapters.items()}
    keys = jax.random.split(key, len(adapters))
    trainable = {c: a.init(k) for (c, a), k in zip(adapters.items(), keys)}

    if variant == "fresh":
        frozen_params = None if base_params is None else dict(base_params)
        for c, lidb in lidb_adapters.items():
            if frozen_params is not None:
                frozen_params[c] = lidb.merge(base_params[c], predicted[c], basis[c])
        return Relaxed(variant, frozen_params, adapters, trainable, dict(lidb_adapters), basis, predicted)

    for c, lidb in lidb_adapters.items():
        for path in lidb.paths:
            down, up = lidb.kind.factors(predicted[c][path], basis[c][path])
            trainable[c][path] = _lora_holding(kind, trainable[c][path], down, up)
    return Relaxed(
        variant,
        None if base_params is None else dict(base_params),
        adapters,
        trainable,
        dict(lidb_adapters),
        basis,
        predicted,
    )


def init_state(relaxed: Relaxed, optimizer: optax.GradientTransformation) -> dict:
    """The finetuning state ``{"step", "trainable", "opt_state"}`` (a copy: the step donates it)."""
    trainable = jax.tree_util.tree_map(jnp.copy, relaxed.trainable)
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}


def augment(
    image: jax.Array, key: jax.Array, batch_size: int, *, flip: bool = True, shift: int = 0
) -> jax.Array:
    """A batch of random views of one image.

    Args:
      image: [H, W, C].
      key: PRNG key.
      batch_size: views to draw.
      flip: flip each view horizontally with probability 1/2.
      shift: translate each view by an integer offset in ``[-shift, shift]`` per axis, filling
        the uncovered border with the edge pixels.

    Returns:
      [batch_size, H, W, C].
    """
    k_flip, k_shift = jax.random.split(key)
    images = jnp.broadcast_to(image, (batch_size, *image.shape))
    if flip:
        flips = jax.random.bernoulli(k_flip, 0.5, (batch_size,))
        images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    if shift > 0:
        height, width, channels = image.shape
        padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
        offsets = jax.random.randint(k_shift, (batch_size, 2), -shift, shift + 1)

        def crop(view, offset):
            start = (shift - offset[0], shift - offset[1], 0)
            return jax.lax.dynamic_slice(view, start, (height, width, channels))

        images = jax.vmap(crop)(padded, offsets)
    return images


def make_finetune(
    sd: StableDiffusion,
    adapters: Mapping[str, A.Adapter],
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    flip: bool = True,
    shift: int = 0,
) -> Finetune:
    """The single-image finetuning step and the whole loop as one program.

    Every step draws ``k_aug, k_loss = split(fold_in(rng, state["step"]))``: ``k_aug`` makes a
    batch of ``batch_size`` views of the image (:func:`augment`), ``k_loss`` the VAE sample, the
    noise and the timesteps of the denoising loss. Gradients are taken w.r.t. the LoRA trees only.

    Args:
      sd: the model bundle.
      adapters: ``{component: Adapter}`` of the LoRA (``Relaxed.adapters``).
      optimizer: the optax optimizer of the LoRA trees.
      batch_size: views of the reference image per step.
      flip: random horizontal flips.
      shift: maximal random translation in pixels (0: none).

    Returns:
      ``Finetune(step, run)``: ``step(state, frozen, image [H,W,3], input_ids [L], rng)`` returns
      ``(state, {"loss", "grad_norm"})``; ``run(..., steps)`` scans ``steps`` such steps and
      returns ``(state, losses [steps])``. Both are jitted and donate ``state``; ``frozen`` is
      ``Relaxed.frozen``.
    """
    sched_state = sd.noise_scheduler.create_state()

    def loss_fn(trainable, frozen, images, input_ids, key):
        with A.attach_all(adapters, trainable, frozen["basis"]):
            return diffusion.denoising_loss(sd, sched_state, frozen["params"], images, input_ids, key)

    def body(state, frozen, image, input_ids, rng):
        k_aug, k_loss = jax.random.split(jax.random.fold_in(rng, state["step"]))
        images = augment(image, k_aug, batch_size, flip=flip, shift=shift)
        ids = jnp.broadcast_to(input_ids, (batch_size, *input_ids.shape))
        loss, grads = jax.value_and_grad(loss_fn)(state["trainable"], frozen, images, ids, k_loss)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        new_state = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def run(state, frozen, image, input_ids, rng, steps):
        def scan_step(carry, _):
            carry, metrics = body(carry, frozen, image, input_ids, rng)
            return carry, metrics["loss"]

        return jax.lax.scan(scan_step, state, None, length=steps)

    return Finetune(
        step=jax.jit(body, donate_argnums=(0,)),
        run=jax.jit(run, static_argnums=(5,), donate_argnums=(0,)),
    )


def make_batched_finetune(
    sd: StableDiffusion,
    adapters: Mapping[str, A.Adapter],
    lidb_adapters: Mapping[str, A.Adapter],
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    flip: bool = True,
    shift: int = 0,
    map_batch: int = 1,
) -> Callable:
    """N photos' finetunes as one compiled program: a ``lax.map`` of the single-photo scan.

    The base weights are shared, not copied per identity: each identity's LiDB prediction is
    added in activation space (``fresh``: what :func:`relax` merges into the weights; ``svd``
    passes zeros, its prediction lives in the LoRA's initial value) and its LoRA on top, so
    memory grows with the LoRA trees only. Per identity the randomness and the step body are
    those of :func:`make_finetune` with the same key. ``map_batch`` identities are vmapped
    together (``lax.map(..., batch_size=)``): 1 keeps every identity's arithmetic exactly that
    of a single-photo run; more use an accelerator better at the price of float32 reordering.

    Returns:
      jitted ``run(states [N], params, basis, predicted [N], images [N, H, W, 3], input_ids [L],
      rngs [N], steps) -> (states, losses [N, steps])``; ``states`` is donated.
    """
    sched_state = sd.noise_scheduler.create_state()
    empty = {c: {} for c in adapters}

    def loss_fn(trainable, predicted, params, basis, images, input_ids, key):
        with A.attach_all(lidb_adapters, predicted, basis), A.attach_all(adapters, trainable, empty):
            return diffusion.denoising_loss(sd, sched_state, params, images, input_ids, key)

    def body(state, predicted, params, basis, image, input_ids, rng):
        k_aug, k_loss = jax.random.split(jax.random.fold_in(rng, state["step"]))
        views = augment(image, k_aug, batch_size, flip=flip, shift=shift)
        ids = jnp.broadcast_to(input_ids, (batch_size, *input_ids.shape))
        loss, grads = jax.value_and_grad(loss_fn)(
            state["trainable"], predicted, params, basis, views, ids, k_loss
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, loss

    def run_one(state, predicted, params, basis, image, input_ids, rng, steps):
        return jax.lax.scan(
            lambda carry, _: body(carry, predicted, params, basis, image, input_ids, rng),
            state,
            None,
            length=steps,
        )

    def run(states, predicted, params, basis, images, input_ids, rngs, steps):
        one = lambda xs: run_one(xs[0], xs[1], params, basis, xs[2], input_ids, xs[3], steps)  # noqa: E731
        return jax.lax.map(one, (states, predicted, images, rngs), batch_size=map_batch)

    return jax.jit(run, static_argnums=(7,), donate_argnums=(0,))


def fold(relaxed: Relaxed, trainable: Mapping[str, Tree]) -> tuple[dict[str, A.Adapter], Trees]:
    """The personal model as one LoRA per component, relative to the base params.

    ``svd``: the finetuned LoRA itself (it already trains on the base params). ``fresh``: the
    frozen params are base + ΔW_pred, so the result is a LoRA of rank ``r + r_lidb`` with
    ``alpha=None`` (scale 1) whose factors concatenate the trained LoRA, with its scale ``s``
    folded in as ``√s`` on each factor, and the prediction's LoRA form ``A_aux·A_train`` (down)
    and ``B_train·B_aux`` (up): ``ΔW = s·down·up + A_aux·A_train·B_train·B_aux`` exactly.

    Args:
      relaxed: what :func:`relax` returned (it carries the prediction and its bases).
      trainable: the finetuned LoRA trees (``state["trainable"]``).

    Returns:
      ``({component: Adapter of kind LoRA}, {component: {path: {"down", "up"}}})``, ready for
      ``Adapter.merge`` or ``export.export_lora``.
    """
    if relaxed.variant == "svd":
        return dict(relaxed.adapters), {c: dict(t) for c, t in trainable.items()}
    adapters, trees = {}, {}
    for c, lora in relaxed.adapters.items():
        lidb = relaxed.lidb_adapters[c]
        kind = A.LoRA(rank=lora.kind.rank + lidb.kind.rank, alpha=None)
        root = lora.kind.scale**0.5
        trees[c] = {}
        for path in lora.paths:
            down, up = lidb.kind.factors(relaxed.predicted[c][path], relaxed.basis[c][path])
            p = trainable[c][path]
            trees[c][path] = {
                "down": jnp.concatenate([root * p["down"], down], axis=1),
                "up": jnp.concatenate([root * p["up"], up], axis=0),
            }
        adapters[c] = A.Adapter(kind, lora.targets, c)
    return adapters, trees
