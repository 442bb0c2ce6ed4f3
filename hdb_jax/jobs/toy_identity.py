"""Training the toy identity encoder (``python -m hdb_jax.train --config configs/identity_toy.py``).

A supervised contrastive loss (:func:`supcon_loss`) over batches holding several renders of
each of a few identities, plus an auxiliary regression of the generator's identity attributes,
in the shared training loop; the finished run evaluates held-out retrieval and writes the
encoder with :func:`hdb_jax.toy.identity.save`.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdb_jax.blocks import build, loop
from hdb_jax.common import images
from hdb_jax.toy import synthetic
from hdb_jax.toy.identity import IdentityEncoder, IdentityScorer, attribute_vector, evaluate_retrieval, save


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


def _training_batch(
    config: ml_collections.ConfigDict, rng: np.random.Generator, attr_mean: np.ndarray, attr_std: np.ndarray
) -> dict:
    d = config.data
    chosen = rng.choice(d.train_identities, d.identities_per_batch, replace=False)
    ids = np.repeat(chosen, d.views_per_identity)
    indices = rng.integers(0, 2**31 - 1, ids.size)  # fresh pose, lighting and background
    pixels = synthetic.render_batch(
        ids, indices, rng.choice(d.styles, ids.size), d.seed, config.model.resolution
    )
    attrs = np.stack([attribute_vector(synthetic.identity(int(i), d.seed)) for i in ids])
    return {
        "images": images.to_unit_range(pixels),
        "labels": ids.astype(np.int32),
        "attributes": (attrs - attr_mean) / attr_std,
    }


def run(config: ml_collections.ConfigDict) -> dict:
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
    encoder = IdentityEncoder(
        tuple(config.model.widths), config.model.embed_dim, config.model.resolution, config.model.groups
    )
    attr_table = np.stack(
        [
            attribute_vector(synthetic.identity(i, config.data.seed))
            for i in range(min(config.data.train_identities, 4096))
        ]
    )
    attr_mean, attr_std = attr_table.mean(0), attr_table.std(0) + 1e-3
    head = nn.Dense(attr_table.shape[1])
    k_enc, k_head = jax.random.split(jax.random.PRNGKey(config.seed))
    dummy = jnp.zeros((1, config.model.resolution, config.model.resolution, 3))
    enc_params = encoder.init(k_enc, dummy)
    params = {
        "encoder": enc_params,
        "head": head.init(k_head, encoder.apply(enc_params, dummy, with_features=True)[1]),
    }
    optimizer = build.optimizer(config.optim, config.steps)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": params, "opt_state": optimizer.init(params)}

    def loss_fn(params, batch):
        emb, features = encoder.apply(params["encoder"], batch["images"], with_features=True)
        contrastive = supcon_loss(emb, batch["labels"], config.loss.temperature)
        attributes = jnp.mean((head.apply(params["head"], features) - batch["attributes"]) ** 2)
        return contrastive + config.loss.attribute_weight * attributes

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["trainable"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        return {
            "step": state["step"] + 1,
            "trainable": optax.apply_updates(state["trainable"], updates),
            "opt_state": opt_state,
        }, {"loss": loss}

    def batch_fn(step):
        return _training_batch(config, np.random.default_rng([config.seed, 3, step]), attr_mean, attr_std)

    fixed = _training_batch(config, np.random.default_rng([config.seed, 4]), attr_mean, attr_std)
    eval_loss = jax.jit(lambda p: loss_fn(p, fixed))
    with loop.open_run(workdir, config) as run_dir:
        start, state = run_dir.restore(state, name="identity")
        train_step = loop.compile_step(train_step, state, batch_fn(start), name="identity step")
        evals = {"start": float(eval_loss(state["trainable"]))}
        result = loop.train(state, train_step, batch_fn, config, start=start, run=run_dir, name="identity")
    state = result.state
    evals["end"] = float(eval_loss(state["trainable"]))
    out = {
        "losses": {s: h["loss"] for s, h in result.history.items()},
        "eval_loss": evals,
        "train_seconds": result.seconds,
        "start_step": result.start,
        "step": result.step,
        "params": state["trainable"]["encoder"],
        "out_dir": None,
    }
    if result.stopped_early:
        return out

    scorer = IdentityScorer(encoder, state["trainable"]["encoder"])
    heldout = range(config.eval.heldout_start, config.eval.heldout_start + config.eval.heldout_count)
    retrieval = evaluate_retrieval(
        scorer,
        heldout,
        config.data.seed,
        styles=tuple(config.data.styles),
        queries_per_identity=config.eval.queries_per_identity,
    )
    print(f"held-out retrieval top-1 {retrieval['top1']:.3f} (chance {retrieval['chance']:.3f})")
    meta = {
        "architecture": {
            "widths": list(encoder.widths),
            "embed_dim": encoder.embed_dim,
            "resolution": encoder.resolution,
            "groups": encoder.groups,
        },
        "recipe": {k: config[k].to_dict() for k in ("data", "loss", "optim")} | {"steps": config.steps},
        "final_loss": out["losses"].get(result.step),
        "eval_loss": evals,
        "train_seconds": result.seconds,
        "retrieval": retrieval,
        "heldout_identities": [heldout.start, heldout.stop],
    }
    out.update(
        retrieval=retrieval,
        top1=retrieval["top1"],
        meta=meta,
        out_dir=os.fspath(save(config.out_dir, scorer.params, meta)),
    )
    return out
