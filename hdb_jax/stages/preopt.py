"""Stage 1 of HyperDreamBooth: pre-optimise LiDB weights for many identities at once.

Each chunk trains K identities together: one shared, frozen base model, and K sets of LiDB
factors applied per sample in activation space (no per-identity copy of any UNet weight). The
chunk axis is sharded over the mesh's data axes, so K grows with the device count. AdamW is
elementwise and gradients are clipped per identity, so identities never interact.

Targets must be a function of the identity alone (methods.md, "Lessons"):

* every identity starts from the *same* initial factors (one draw of ``k_init``), so the sign and
  scale symmetries of ``A·B`` are broken the same way for everyone;
* row k's randomness (which view, the VAE sample, noise and timestep) comes from
  ``fold_in(fold_in(k_train, identity), step)``, never from its position in the chunk; a
  duplicated identity, wherever it sits, gets the same weights.

The output is the weights dataset of :mod:`hdb_jax.data.weights` (chunk files plus
``index.jsonl``); a rerun skips every identity already in the index, so an interrupted run loses
and repeats nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdb_jax import adapters as A
from hdb_jax.blocks import build, diffusion, loop
from hdb_jax.common import images, metrics, sharding
from hdb_jax.data import identities as identities_lib
from hdb_jax.data import weights as weights_lib


def row_keys(rng: jax.Array, identity_ids: jax.Array, step: jax.Array) -> jax.Array:
    """``[K]`` keys: row k's depends on its identity and the step only."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, i), step))(identity_ids)


def make_step(sd, adapters: Mapping[str, A.Adapter], optimizer, samples_per_step: int = 1) -> Callable:
    """``step(state, frozen, chunk, rng) -> (state, {"loss", "losses" [K]})`` (not yet jitted).

    ``state["trainable"]`` leaves are ``[K, ...]``; ``chunk = {"views" [K, V, H, W, 3] in [-1, 1],
    "input_ids" [K, L], "identities" [K]}``. Each step every row draws ``samples_per_step`` of its
    V views (with replacement), each with its own VAE sample, noise and timestep; a row's loss is
    their mean. More samples per step lower the gradient noise that makes two runs of one identity
    disagree (the target-quality probe measures it).
    """
    sched_state = sd.noise_scheduler.create_state()
    s = int(samples_per_step)
    if s < 1:
        raise ValueError(f"samples_per_step={samples_per_step}: need >= 1")

    def step(state, frozen, chunk, rng):
        keys = row_keys(rng, chunk["identities"], state["step"])  # [K]
        k_view, k_loss = jax.vmap(jax.random.split)(keys).transpose(1, 0, *range(2, keys.ndim + 1))
        k, num_views = chunk["views"].shape[:2]
        which = jax.vmap(lambda key: jax.random.randint(key, (s,), 0, num_views))(k_view)  # [K, S]
        pixels = jnp.take_along_axis(chunk["views"], which[:, :, None, None, None], axis=1)  # [K, S, H, W, 3]
        pixels = pixels.reshape(k * s, *pixels.shape[2:])  # [K·S, H, W, 3], row-major per identity
        if s == 1:
            sample_keys = k_loss  # [K] (the one-sample recipe's draws are unchanged)
        else:
            sample_keys = jax.vmap(lambda key: jax.random.split(key, s))(k_loss)  # [K, S]
            sample_keys = sample_keys.reshape(k * s, *sample_keys.shape[2:])
        ids = jnp.repeat(chunk["input_ids"], s, axis=0)  # [K·S, L]

        def losses(trainable):
            per_row = (
                jax.tree_util.tree_map(lambda x: jnp.repeat(x, s, axis=0), trainable) if s > 1 else trainable
            )
            with A.attach_all(adapters, per_row, frozen["basis"], per_sample=True):
                per = diffusion.denoising_loss(
                    sd,
                    sched_state,
                    frozen["params"],
                    pixels,
                    ids,
                    sample_keys,
                    per_sample=True,
                    per_sample_keys=True,
                )
            return per.reshape(k, s).mean(axis=1)  # [K]

        (_, per_identity), grads = jax.value_and_grad(
            lambda t: (jnp.sum(per := losses(t)), per), has_aux=True
        )(state["trainable"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        new = {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}
        return new, {"loss": jnp.mean(per_identity), "losses": per_identity}

    return step


def freeze_factors(optimizer, trainable_example: Mapping[str, Any], frozen_factors) -> Any:
    """``optimizer`` on every factor except those named in ``frozen_factors`` (held at their init).

    ``frozen_factors`` names LiDB factors (e.g. ``("a_train",)``: only ``b_train`` learns, so
    ``ΔW = A_aux·A_0·B_train·B_aux`` is linear in what trains and every identity shares ``A_0``).
    """
    frozen_factors = tuple(frozen_factors)
    if not frozen_factors:
        return optimizer
    names = {n for c in trainable_example.values() for layer in c.values() for n in layer}
    unknown = sorted(set(frozen_factors) - names)
    if unknown:
        raise ValueError(f"config.frozen_factors={list(frozen_factors)}: {unknown} not among {sorted(names)}")
    labels = {
        c: {
            p: {n: ("frozen" if n in frozen_factors else "train") for n in layer} for p, layer in tree.items()
        }
        for c, tree in trainable_example.items()
    }
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


def make_eval(sd, adapters: Mapping[str, A.Adapter], draws: int = 2) -> Callable:
    """``evaluate(trainable, frozen, chunk, key) -> [K]``: each identity's fixed-draw loss on all its views."""
    sched_state = sd.noise_scheduler.create_state()

    def evaluate(trainable, frozen, chunk, key):
        k, v = chunk["views"].shape[:2]
        pixels = chunk["views"].reshape(k * v, *chunk["views"].shape[2:])  # [K·V, H, W, 3]
        ids = jnp.repeat(chunk["input_ids"], v, axis=0)
        per_row = jax.tree_util.tree_map(lambda x: jnp.repeat(x, v, axis=0), trainable)
        with A.attach_all(adapters, per_row, frozen["basis"], per_sample=True):
            loss = diffusion.fixed_draw_loss(
                sd, sched_state, frozen["params"], pixels, ids, key, draws=draws, per_sample=True
            )
        return loss.reshape(k, v).mean(axis=1)

    return evaluate


def _chunk_arrays(
    source, group: list, prompt_ids: np.ndarray, views_per_identity: int
) -> dict[str, np.ndarray]:
    """The chunk's views ``[K, V, H, W, 3]`` (an identity with fewer photos repeats them), prompts and ids."""
    views = np.stack([images.to_unit_range(source.views(i, range(views_per_identity))) for i in group])
    return {
        "views": views,
        "input_ids": np.stack([prompt_ids] * len(group)),
        "identities": np.asarray([identities_lib.number(i) for i in group], np.int32),
    }


@dataclasses.dataclass
class PreoptResult:
    """What :func:`train` returns; the weights themselves are in the dataset at ``workdir``."""

    trained: list  # the identities this call pre-optimised (not those already in the dataset)
    workdir: str  # the weights dataset (:mod:`hdb_jax.data.weights`)
    basis_hash: str  # the LiDB basis file every identity was trained against


def train(config: ml_collections.ConfigDict, sd, params: Mapping[str, Any], source=None) -> PreoptResult:
    """Pre-optimises every identity of ``source`` (default: ``config.data``) not yet in the dataset.

    Args:
      config: see ``configs/preopt.py``.
      sd, params: the base model.
      source: an identity source (:mod:`hdb_jax.data.identities`); None builds it from the config.

    Returns:
      A :class:`PreoptResult`.
    """
    out_dir = os.path.abspath(config.workdir)
    os.makedirs(out_dir, exist_ok=True)
    source = source or identities_lib.from_config(config.data, build.resolution(config.model, sd))
    done = weights_lib.done_identities(out_dir)
    todo = [i for i in source.identities if i not in done]
    print(f"{len(done)} identities already done, {len(todo)} to pre-optimise in {out_dir}", flush=True)
    mesh = sharding.make_mesh(config.mesh.to_dict())  # config errors surface before any heavy work
    chunk = config.chunk_size
    if chunk % mesh.size:
        raise ValueError(f"config.chunk_size={chunk} must be a multiple of the mesh's {mesh.size} devices")
    k_init, k_basis, k_train, k_eval = jax.random.split(jax.random.PRNGKey(config.seed), 4)
    # Another noise seed draws other views, noise and timesteps from the same shared init and basis:
    # two runs of one identity that differ only there measure how consistent the targets are.
    k_train = jax.random.fold_in(k_train, config.noise_seed) if config.noise_seed else k_train
    adapters_ = build.adapters(config.adapter, params)
    basis, basis_hash = build.frozen_trees(config.adapter, adapters_, k_basis, out_dir)
    if not todo:
        return PreoptResult([], out_dir, basis_hash)
    shared_init = {c: a.init(k_init) for c, a in adapters_.items()}  # one draw for every identity
    optimizer = freeze_factors(
        build.optimizer(config.optim, config.steps, per_row=True), shared_init, config.frozen_factors
    )
    rules = [tuple(r) for r in config.sharding_rules]
    frozen = {"params": params, "basis": basis}
    frozen = jax.device_put(frozen, sharding.tree_shardings(frozen, mesh, rules))
    prompt_ids = np.asarray(sd.tokenize([config.data.prompt]))[0]
    views = int(getattr(source, "views_per_identity", 0) or config.data.images_per_identity)
    if config.data.source != "synthetic" or isinstance(source, identities_lib.ArrayIdentities):
        views = min(views, int(config.data.images_per_identity))

    def init_state():
        trainable = A.broadcast_batch(shared_init, chunk)
        return {
            "step": jnp.zeros((), jnp.int32),
            "trainable": trainable,
            "opt_state": optimizer.init(trainable),
        }

    abstract = jax.eval_shape(init_state)
    per_identity = sharding.batch_sharding(mesh)
    replicated = sharding.NamedSharding(mesh, sharding.P())
    state_sh = jax.tree_util.tree_map(lambda x: per_identity if x.ndim else replicated, abstract)
    init = jax.jit(init_state, out_shardings=state_sh)
    step = jax.jit(
        make_step(sd, adapters_, optimizer, config.samples_per_step),
        donate_argnums=(0,),
        in_shardings=(state_sh, None, per_identity, None),
        out_shardings=(state_sh, None),
    )
    evaluate = jax.jit(make_eval(sd, adapters_), out_shardings=per_identity)
    settings = {
        "prompt": config.data.prompt,
        "learning_rate": config.optim.learning_rate,
        "steps": config.steps,
        "views": views,
        "init": "shared",
        "init_std": float(config.adapter.lidb.init_std),
        "samples_per_step": int(config.samples_per_step),
        "frozen_factors": list(config.frozen_factors),
        "schedule": config.optim.schedule,
        "noise_seed": int(config.noise_seed),
    }
    trained, compiled = [], None
    bar = metrics.progress(len(todo), desc="identities")
    with metrics.Writer(os.path.join(out_dir, "tb")) as writer:
        for start in range(0, len(todo), chunk):
            group = todo[start : start + chunk]
            padded = group + [group[-1]] * (chunk - len(group))  # the last chunk repeats its last identity
            host = _chunk_arrays(source, padded, prompt_ids, views)
            arrays = sharding.global_batch(lambda r: {k: v[r] for k, v in host.items()}, chunk, mesh)
            state = init()
            if compiled is None:  # every chunk has the same shapes (the last one is padded)
                compiled = loop.compile_step(
                    step, state, frozen, arrays, k_train, name="pre-optimisation step"
                )
            before = np.asarray(jax.device_get(evaluate(state["trainable"], frozen, arrays, k_eval)))
            t0 = time.perf_counter()
            result = loop.train(  # the chunk's data is bound into the step: no batches
                state,
                functools.partial(_apply, compiled, frozen=frozen, chunk=arrays, rng=k_train),
                None,
                config,
                start=0,
                log_every=max(1, config.steps // 4),
                stop_after=0,
                progress=False,
                name=f"preopt chunk {start // chunk}",
            )
            final = np.asarray(jax.device_get(evaluate(result.state["trainable"], frozen, arrays, k_eval)))
            trees = jax.tree_util.tree_map(
                lambda v: np.asarray(jax.device_get(v))[: len(group)], result.state["trainable"]
            )
            if jax.process_index() == 0:
                rows = [
                    {
                        "identity": i,
                        "source": source.source_name(i),
                        "loss_before": float(before[k]),
                        "final_loss": float(final[k]),
                        "steps": config.steps,
                    }
                    for k, i in enumerate(group)
                ]
                weights_lib.write_chunk(
                    out_dir, trees, rows, basis_hash=basis_hash, steps=config.steps, meta=settings
                )
            n = len(trained) + len(done)
            writer.scalars(
                n + len(group),
                {
                    "chunk/loss_before": before[: len(group)].mean(),
                    "chunk/final_loss": final[: len(group)].mean(),
                    "chunk/seconds": time.perf_counter() - t0,
                },
            )
            trained += group
            bar.update(len(group))
            bar.set_postfix(
                chunk_s=f"{time.perf_counter() - t0:.1f}", loss=f"{final[: len(group)].mean():.4f}"
            )
    bar.close()
    return PreoptResult(trained, out_dir, basis_hash)


def _apply(step, state, batch, *, frozen, chunk, rng):
    del batch  # the chunk's views are on device; each step picks its own
    return step(state, frozen, chunk, rng)
