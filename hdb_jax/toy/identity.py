"""A toy identity encoder: embeds *who* a synthetic face is, not *how* it was drawn.

The paper scores identity preservation with a face-recognition network (cosine similarity of
embeddings). In the synthetic-faces world (:mod:`hdb_jax.data.synthetic`) a small CNN plays that
role. It is trained with a supervised contrastive loss: each batch holds several renders of each
of a few identities (fresh pose, expression, lighting, background, photo or cartoon style), and
renders of one identity must embed closer to each other than to any other render. An auxiliary
head regresses the generator's per-identity attributes (colours, hair style, accessories,
geometry) from the pooled features.

The trained encoder ships in ``hdb_jax/toy/weights/identity`` (``config.json`` +
``params.safetensors``); :func:`load` reads it into an :class:`IdentityScorer` and
:func:`identity_similarity` scores images against a reference with it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file
from safetensors.numpy import save as safetensors_bytes

from hdb_jax import checkpoint, metrics
from hdb_jax.data import synthetic

SHIPPED_DIR = pathlib.Path(__file__).parent / "weights" / "identity"
CONFIG_NAME, PARAMS_NAME = "config.json", "params.safetensors"


class IdentityWeightsError(OSError):
    """Identity encoder weights are missing, unreadable or do not fit their architecture."""


class IdentityEncoder(nn.Module):
    """A small CNN: images [B, H, W, 3] in [-1, 1] -> L2-normalised embeddings [B, embed_dim].

    Attributes:
      widths: channels per stage (two 3x3 convs each); every stage after the first halves the size.
      embed_dim: embedding size.
      resolution: working size; other input sizes are resized (antialiased) to it first.
      groups: GroupNorm groups (at most the stage width).
    """

    widths: Sequence[int] = (16, 32, 64, 128)
    embed_dim: int = 64
    resolution: int = 32
    groups: int = 8

    @nn.compact
    def __call__(self, images: jax.Array, with_features: bool = False):
        x = jnp.asarray(images, jnp.float32)
        size = (self.resolution, self.resolution)
        if x.shape[1:3] != size:
            x = jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "linear", antialias=True)
        for i, width in enumerate(self.widths):
            for j, stride in enumerate((1 if i == 0 else 2, 1)):
                x = nn.Conv(width, (3, 3), strides=stride, name=f"conv{i}_{j}")(x)
                x = nn.relu(nn.GroupNorm(min(self.groups, width), name=f"norm{i}_{j}")(x))
        pooled = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        features = nn.relu(nn.Dense(2 * self.widths[-1], name="hidden")(pooled))
        embedding = nn.Dense(self.embed_dim, name="project")(features)
        embedding = embedding / jnp.linalg.norm(embedding, axis=-1, keepdims=True).clip(1e-6)
        return (embedding, features) if with_features else embedding


@dataclasses.dataclass
class IdentityScorer:
    """An encoder with its parameters; ``embed`` runs jitted (one compile per input shape)."""

    module: IdentityEncoder
    params: Any
    meta: dict = dataclasses.field(default_factory=dict)
    _apply: Callable = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self._apply = jax.jit(self.module.apply)

    def embed(self, images: Any) -> jax.Array:
        """Embeds images: uint8 [B, H, W, 3] or float in [-1, 1] (a single [H, W, 3] too) -> [B, D]."""
        x = jnp.asarray(images)
        x = x[None] if x.ndim == 3 else x
        x = x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        return self._apply(self.params, x)

    def similarity(self, images: Any, reference: Any) -> jax.Array:
        """Cosine similarities [B] of ``images`` to a reference.

        Args:
          images: [B, H, W, 3] uint8 or float images.
          reference: one image ([H, W, 3] or [1, H, W, 3]), one per image ([B, H, W, 3]), or
            embeddings ([D] or [B, D]; normalised here).

        Returns:
          float32 [B] in [-1, 1].
        """
        ref = jnp.asarray(reference)
        if ref.ndim <= 2:
            ref = ref.astype(jnp.float32) / jnp.linalg.norm(ref, axis=-1, keepdims=True).clip(1e-6)
        else:
            ref = self.embed(ref)
        return jnp.sum(self.embed(images) * ref, axis=-1)


def render(identities: Sequence[int], indices: Sequence[int], styles: Sequence[str], seed: int,
           resolution: int) -> np.ndarray:
    """Renders image ``indices[i]`` of identity ``identities[i]`` in ``styles[i]``: uint8 [N, R, R, 3]."""
    return np.stack([
        synthetic.render_face(synthetic.identity(int(i), seed),
                              synthetic.variation(int(i), int(j), seed, style=str(s)), resolution)
        for i, j, s in zip(identities, indices, styles)])


def attribute_vector(ident: synthetic.FaceIdentity) -> np.ndarray:
    """The generator's attributes of one identity as a float32 vector (colours, one-hots, geometry)."""
    colors = [ident.skin, ident.hair_color, ident.eye_color, ident.shirt_color,
              np.multiply(ident.hat_color, ident.hat), np.multiply(ident.glasses_color, ident.glasses)]
    scalars = [ident.glasses, ident.hat, ident.earrings, ident.face_ratio, ident.hair_part,
               ident.eye_spacing, ident.eye_height, ident.nose_length, ident.mouth_width]
    return np.concatenate([*colors, np.eye(3)[ident.hair_style], scalars]).astype(np.float32)


def supcon_loss(embeddings: jax.Array, labels: jax.Array, temperature: float) -> jax.Array:
    """Supervised contrastive loss (NT-Xent with every same-label render as a positive).

    Args:
      embeddings: L2-normalised [N, D].
      labels: int [N]; every label must occur at least twice.
      temperature: softmax temperature of the cosine similarities.

    Returns:
      The mean over anchors of the negative mean log-probability of their positives.
    """
    self_mask = jnp.eye(labels.shape[0], dtype=bool)
    logits = jnp.where(self_mask, -1e9, embeddings @ embeddings.T / temperature)
    log_prob = jax.nn.log_softmax(logits, axis=-1)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    return -jnp.mean(jnp.sum(jnp.where(positives, log_prob, 0.0), -1) / positives.sum(-1))


def evaluate_retrieval(params_or_encoder: Any, identities: Sequence[int], seed: int = 0, *,
                       queries_per_identity: int = 3, styles: Sequence[str] = ("photo", "cartoon"),
                       module: IdentityEncoder | None = None) -> dict:
    """Nearest-identity retrieval: a photo gallery (image 0 per identity) against other renders.

    Args:
      params_or_encoder: an :class:`IdentityScorer`, or encoder parameters for ``module``.
      identities: identity ids (use ids the encoder never saw in training).
      seed: the synthetic world's seed.
      queries_per_identity: queries are images 1..k of each identity (random backgrounds),
        query j drawn in ``styles[j % len(styles)]``.
      styles: query styles.
      module: the architecture when parameters are given (default :class:`IdentityEncoder`).

    Returns:
      ``top1`` (fraction of queries whose most similar gallery image is their identity),
      ``chance`` (1 / #identities), ``mean_positive`` / ``mean_negative`` (query-gallery cosine
      to the own / other identities) and the counts.
    """
    scorer = (params_or_encoder if isinstance(params_or_encoder, IdentityScorer)
              else IdentityScorer(module or IdentityEncoder(), params_or_encoder))
    ids, k = [int(i) for i in identities], queries_per_identity
    resolution = scorer.module.resolution
    gallery = scorer.embed(render(ids, [0] * len(ids), ["photo"] * len(ids), seed, resolution))
    q_index = np.tile(np.arange(1, k + 1), len(ids))
    queries = render(np.repeat(ids, k), q_index, [styles[j % len(styles)] for j in q_index], seed, resolution)
    sims = np.asarray(scorer.embed(queries) @ gallery.T)  # [Q, G]
    own = np.repeat(np.arange(len(ids)), k)
    positive = sims[np.arange(len(own)), own]
    return {"top1": float(np.mean(sims.argmax(1) == own)), "chance": 1.0 / len(ids),
            "mean_positive": float(positive.mean()),
            "mean_negative": float((sims.sum(1) - positive).sum() / (sims.size - len(own))),
            "num_identities": len(ids), "num_queries": len(own)}


def save(directory: str | os.PathLike, params: Any, meta: dict) -> pathlib.Path:
    """Writes ``config.json`` (``meta``; needs ``meta["architecture"]``) and ``params.safetensors``.

    Args:
      directory: output folder (created if missing).
      params: encoder parameters (saved float32, keys '/'-joined tree paths).
      meta: JSON-able description: architecture kwargs, recipe, evaluation.

    Returns:
      The directory.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_dict(jax.device_get(params), sep="/").items()}
    (directory / PARAMS_NAME).write_bytes(safetensors_bytes(flat))
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load(directory: str | os.PathLike | None = None) -> IdentityScorer:
    """Reads an encoder written by :func:`save`.

    Args:
      directory: the folder; None means the encoder shipped with the package (:data:`SHIPPED_DIR`).

    Returns:
      An :class:`IdentityScorer` whose ``meta`` is the folder's ``config.json``.

    Raises:
      IdentityWeightsError: the directory lacks the files, they are unreadable, or the
        parameters do not fit the architecture in ``config.json``; the message names the path.
    """
    directory = pathlib.Path(directory) if directory is not None else SHIPPED_DIR
    if not (directory / CONFIG_NAME).is_file() or not (directory / PARAMS_NAME).is_file():
        raise IdentityWeightsError(
            f"{directory}: no identity encoder weights (needs {CONFIG_NAME} and {PARAMS_NAME}); "
            "train them with: python -m hdb_jax.train --config configs/identity_toy.py")
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
        arch = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["architecture"].items()}
        module = IdentityEncoder(**arch)
        flat = load_file(os.fspath(directory / PARAMS_NAME))
    except Exception as err:  # JSON, safetensors and constructor errors alike
        raise IdentityWeightsError(f"{directory}: unreadable identity encoder weights ({err})") from err
    dummy = jnp.zeros((1, module.resolution, module.resolution, 3))
    expected = flatten_dict(jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy), sep="/")
    if {k: v.shape for k, v in expected.items()} != {k: v.shape for k, v in flat.items()}:
        raise IdentityWeightsError(f"{directory}: {PARAMS_NAME} does not fit the architecture {arch}")
    return IdentityScorer(module, unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/"), meta)


@functools.lru_cache(maxsize=1)
def _shipped() -> IdentityScorer:
    return load()


def identity_similarity(images: Any, reference: Any, scorer: IdentityScorer | None = None) -> jax.Array:
    """Cosine identity similarity [B] of ``images`` to ``reference`` (see :meth:`IdentityScorer.similarity`).

    Args:
      images: [B, H, W, 3] uint8 or float in [-1, 1].
      reference: an image, [B] images, or an embedding.
      scorer: the encoder to use; None loads the shipped one (once).

    Returns:
      float32 [B] cosine similarities.
    """
    return (scorer if scorer is not None else _shipped()).similarity(images, reference)


def _training_batch(config: ml_collections.ConfigDict, rng: np.random.Generator,
                    attr_mean: np.ndarray, attr_std: np.ndarray) -> dict:
    d = config.data
    chosen = rng.choice(d.train_identities, d.identities_per_batch, replace=False)
    ids = np.repeat(chosen, d.views_per_identity)
    indices = rng.integers(0, 2**31 - 1, ids.size)  # fresh pose, lighting and background
    images = render(ids, indices, rng.choice(d.styles, ids.size), d.seed, config.model.resolution)
    attrs = np.stack([attribute_vector(synthetic.identity(int(i), d.seed)) for i in ids])
    return {"images": images.astype(np.float32) / 127.5 - 1.0, "labels": ids.astype(np.int32),
            "attributes": (attrs - attr_mean) / attr_std}


def train(config: ml_collections.ConfigDict) -> dict:
    """Trains (or resumes) the identity encoder, evaluates held-out retrieval, writes ``out_dir``.

    Args:
      config: see ``configs/identity_toy.py``.

    Returns:
      ``losses`` (step -> training loss on log steps), ``eval_loss`` (fixed-batch loss at the
      start and end of this call), ``retrieval`` (see :func:`evaluate_retrieval`), ``top1``,
      ``train_seconds`` (this call's loop), ``start_step``, ``step``, ``params`` (encoder) and
      ``out_dir`` (None when stopped early by SIGTERM).
    """
    workdir = os.path.abspath(config.workdir)
    encoder = IdentityEncoder(tuple(config.model.widths), config.model.embed_dim, config.model.resolution,
                              config.model.groups)
    attr_table = np.stack([attribute_vector(synthetic.identity(i, config.data.seed))
                           for i in range(min(config.data.train_identities, 4096))])
    attr_mean, attr_std = attr_table.mean(0), attr_table.std(0) + 1e-3
    head = nn.Dense(attr_table.shape[1])
    k_enc, k_head = jax.random.split(jax.random.PRNGKey(config.seed))
    dummy = jnp.zeros((1, config.model.resolution, config.model.resolution, 3))
    enc_params = encoder.init(k_enc, dummy)
    params = {"encoder": enc_params,
              "head": head.init(k_head, encoder.apply(enc_params, dummy, with_features=True)[1])}
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.optim.learning_rate, config.optim.warmup_steps,
                                                  max(config.steps, config.optim.warmup_steps + 1))
    optimizer = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                            optax.adamw(schedule, weight_decay=config.optim.weight_decay))
    state = {"params": params, "opt_state": optimizer.init(params)}

    def loss_fn(params, batch):
        emb, features = encoder.apply(params["encoder"], batch["images"], with_features=True)
        contrastive = supcon_loss(emb, batch["labels"], config.loss.temperature)
        attributes = jnp.mean((head.apply(params["head"], features) - batch["attributes"]) ** 2)
        return contrastive + config.loss.attribute_weight * attributes

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint_every)
    start = 0
    if ckpt.latest_step is not None:
        start, state = ckpt.restore(state)
    fixed = _training_batch(config, np.random.default_rng([config.seed, 4]), attr_mean, attr_std)
    eval_loss = jax.jit(lambda p: loss_fn(p, fixed))
    evals = {"start": float(eval_loss(state["params"]))}
    losses: dict[int, float] = {}
    bar = metrics.progress(config.steps, initial=start, desc="identity")
    t0, step, stop = time.perf_counter(), start, False
    try:
        while step < config.steps and not stop:
            rng = np.random.default_rng([config.seed, 3, step])
            state, loss = train_step(state, _training_batch(config, rng, attr_mean, attr_std))
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                losses[step] = float(loss)
                if not np.isfinite(losses[step]):
                    raise FloatingPointError(
                        f"loss {losses[step]} at step {step}; last checkpoint: {ckpt.latest_step}")
                bar.set_postfix(loss=f"{losses[step]:.4f}")
            stop = ckpt.should_stop(step)
            if ckpt.due(step, config.steps) or stop:
                ckpt.save(step, state, config.to_dict())
    finally:
        bar.close()
        ckpt.close()
    train_seconds = time.perf_counter() - t0
    evals["end"] = float(eval_loss(state["params"]))
    result = {"losses": losses, "eval_loss": evals, "train_seconds": train_seconds, "start_step": start,
              "step": step, "params": state["params"]["encoder"], "out_dir": None}
    if step < config.steps:
        print(f"stopped at step {step} (checkpoint saved); rerun the same command to resume")
        return result

    scorer = IdentityScorer(encoder, state["params"]["encoder"])
    heldout = range(config.eval.heldout_start, config.eval.heldout_start + config.eval.heldout_count)
    retrieval = evaluate_retrieval(scorer, heldout, config.data.seed, styles=tuple(config.data.styles),
                                   queries_per_identity=config.eval.queries_per_identity)
    print(f"held-out retrieval top-1 {retrieval['top1']:.3f} (chance {retrieval['chance']:.3f})")
    meta = {"architecture": {"widths": list(encoder.widths), "embed_dim": encoder.embed_dim,
                             "resolution": encoder.resolution, "groups": encoder.groups},
            "recipe": {k: config[k].to_dict() for k in ("data", "loss", "optim")} | {"steps": config.steps},
            "final_loss": losses.get(step), "eval_loss": evals, "train_seconds": train_seconds,
            "retrieval": retrieval, "heldout_identities": [heldout.start, heldout.stop]}
    result.update(retrieval=retrieval, top1=retrieval["top1"], meta=meta,
                  out_dir=os.fspath(save(config.out_dir, scorer.params, meta)))
    return result
