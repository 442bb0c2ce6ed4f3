"""Stage 1 of HyperDreamBooth: pre-optimise LiDB weights for many identities at once.

Each step trains a chunk of K identities together: one shared, frozen base model, and K sets of
LiDB factors applied per sample in activation space (no per-identity copy of any UNet weight).
The chunk axis is sharded over the mesh's data axes, so K grows with the device count. AdamW is
elementwise, and gradient clipping is done per identity, so identities never interact.

Output, the *weights dataset* the hypernetwork trainer reads:
``<out>/chunk_00000.safetensors`` (tensors ``{component}/{path}/{factor}`` with a leading
identity axis) and ``<out>/index.jsonl`` (one line per identity: id, chunk, row, source, final
loss, steps). A chunk file is written atomically before its index lines; a rerun skips every
identity already in the index, so an interrupted run loses and repeats nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from hdb_jax import adapters as A
from hdb_jax import diffusion, metrics, sharding
from hdb_jax.subject import build_adapters, build_model, lidb_basis

INDEX = "index.jsonl"


def clip_per_identity(max_norm: float) -> optax.GradientTransformation:
    """Clips each identity's gradient (leading axis) to ``max_norm`` on its own."""

    def update(updates, state, params=None):
        del params
        sq = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree_util.tree_leaves(updates))
        scale = jnp.minimum(1.0, max_norm / (jnp.sqrt(sq) + 1e-12))  # [K]
        return jax.tree_util.tree_map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.chain(
        clip_per_identity(config.optim.grad_clip),
        optax.adamw(config.optim.learning_rate, weight_decay=config.optim.weight_decay),
    )


def make_step(sd, adapters: Mapping[str, A.Adapter], optimizer) -> Callable:
    """``step(state, frozen, batch, rng) -> (state, per_identity_loss [K])`` (not yet jitted).

    ``state["trainable"]`` leaves are ``[K, ...]``; ``batch = {"images" [K,H,W,3], "input_ids"
    [K,L]}``: row k trains identity k only.
    """
    sched_state = sd.noise_scheduler.create_state()

    def losses(trainable, frozen, batch, key):
        with A.attach_all(adapters, trainable, frozen["basis"], per_sample=True):
            return diffusion.denoising_loss(
                sd, sched_state, frozen["params"], batch["images"], batch["input_ids"], key, per_sample=True
            )

    def evaluate(trainable, frozen, batch, rng):
        """Per-identity loss averaged over 4 fixed noise draws: a deterministic progress measure."""
        keys = jax.random.split(rng, 4)
        return jnp.mean(jax.lax.map(lambda k: losses(trainable, frozen, batch, k), keys), axis=0)

    def step(state, frozen, batch, rng):
        key = jax.random.fold_in(rng, state["step"])
        (_, per_identity), grads = jax.value_and_grad(
            lambda t: (jnp.sum(l := losses(t, frozen, batch, key)), l), has_aux=True
        )(state["trainable"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, per_identity

    return step, evaluate


def _identity_images(config, identities: list[int]) -> np.ndarray:
    """[K, V, H, W, 3] float32 renders (V variants per identity) of synthetic identities."""
    from hdb_jax.data.synthetic import SyntheticFaces

    if config.data.source != "synthetic":
        raise ValueError(f"config.data.source={config.data.source!r}: pre-optimisation reads 'synthetic' here")
    faces = SyntheticFaces(identities, config.data.images_per_identity, resolution=config.model.resolution, seed=config.data.seed)
    pixels = np.stack([faces[i]["image"] for i in range(len(faces))]).astype(np.float32) / 127.5 - 1.0
    return pixels.reshape(len(identities), config.data.images_per_identity, *pixels.shape[1:])


def read_index(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, INDEX)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_weights(out_dir: str) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The whole weights dataset: index rows and ``{component/path/factor: [N, ...]}`` in index order."""
    rows = read_index(out_dir)
    chunks: dict[str, dict[str, np.ndarray]] = {}
    stacked: dict[str, list[np.ndarray]] = {}
    for row in rows:
        if row["chunk"] not in chunks:
            chunks[row["chunk"]] = load_file(os.path.join(out_dir, row["chunk"]))
        for name, array in chunks[row["chunk"]].items():
            stacked.setdefault(name, []).append(array[row["row"]])
    return rows, {name: np.stack(arrays) for name, arrays in stacked.items()}


def run(config: ml_collections.ConfigDict) -> dict:
    """Pre-optimises every identity of ``config.data.identities`` not yet in the index."""
    sharding.maybe_initialize_distributed(config.get("distributed"))
    out_dir = os.path.abspath(config.workdir)
    os.makedirs(out_dir, exist_ok=True)
    done = {row["identity"] for row in read_index(out_dir)}
    todo = [int(i) for i in config.data.identities if int(i) not in done]
    print(f"{len(done)} identities already done, {len(todo)} to pre-optimise in {out_dir}")
    if not todo:
        return {"trained": [], "workdir": out_dir}

    mesh = sharding.make_mesh(config.mesh.to_dict())  # config errors surface before any heavy work
    chunk = config.chunk_size
    if chunk % mesh.size:
        raise ValueError(f"config.chunk_size={chunk} must be a multiple of the mesh's {mesh.size} devices")
    key = jax.random.PRNGKey(config.seed)
    k_model, k_init, k_basis, k_train = jax.random.split(key, 4)
    sd, params = build_model(config, k_model)
    adapters = build_adapters(config, params)
    basis, basis_hash = lidb_basis(config, adapters, k_basis, out_dir)
    optimizer = make_optimizer(config)
    rules = [tuple(r) for r in config.sharding_rules]
    frozen = jax.device_put({"params": params, "basis": basis}, sharding.tree_shardings({"params": params, "basis": basis}, mesh, rules))
    ids = np.asarray(sd.tokenize([config.data.prompt]))[0]

    def init_state(identity_ids: jax.Array):
        keys = jax.vmap(lambda i: jax.random.fold_in(k_init, i))(identity_ids)
        trainable = jax.vmap(lambda k: {c: a.init(k) for c, a in adapters.items()})(keys)
        return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}

    abstract = jax.eval_shape(init_state, jnp.zeros((chunk,), jnp.int32))
    per_identity = sharding.NamedSharding(mesh, sharding.P(tuple(mesh.axis_names)))
    state_shardings = jax.tree_util.tree_map(lambda x: per_identity if x.ndim else sharding.NamedSharding(mesh, sharding.P()), abstract)
    init = jax.jit(init_state, out_shardings=state_shardings)
    step_fn, eval_fn = make_step(sd, adapters, optimizer)
    data_sharding = sharding.batch_sharding(mesh)
    step = jax.jit(step_fn, donate_argnums=(0,), in_shardings=(state_shardings, None, data_sharding, None),
                   out_shardings=(state_shardings, per_identity))
    evaluate = jax.jit(eval_fn, out_shardings=per_identity)
    eval_key = jax.random.PRNGKey(config.seed + 1)

    trained = []
    # Never reuse a chunk name: files of an earlier (possibly interrupted) run keep theirs.
    numbers = [int(f[6:11]) for f in os.listdir(out_dir) if f.startswith("chunk_") and f.endswith(".safetensors")]
    next_chunk = max(numbers, default=-1) + 1
    bar = metrics.progress(len(todo), desc="identities")
    for start in range(0, len(todo), chunk):
        group = todo[start:start + chunk]
        padded = group + [group[-1]] * (chunk - len(group))  # the last chunk repeats its last identity
        images = _identity_images(config, padded)  # [K, V, H, W, 3]
        state = init(jnp.asarray(padded, jnp.int32))
        first = sharding.global_batch(lambda r: {"images": images[r, 0], "input_ids": np.stack([ids] * len(r))}, chunk, mesh)
        before = np.asarray(jax.device_get(evaluate(state["trainable"], frozen, first, eval_key)))
        t0 = time.perf_counter()
        for s in range(config.steps):
            variant = np.random.default_rng([config.seed, start, s]).integers(0, images.shape[1], len(padded))
            batch = sharding.global_batch(
                lambda r: {"images": images[r, variant[r]], "input_ids": np.stack([ids] * len(r))}, chunk, mesh)
            state, losses = step(state, frozen, batch, k_train)
        final = np.asarray(jax.device_get(evaluate(state["trainable"], frozen, first, eval_key)))
        name = f"chunk_{next_chunk:05d}.safetensors"
        next_chunk += 1
        tensors = {
            f"{c}/{p}/{f}": np.asarray(jax.device_get(v))[: len(group)]
            for c, tree in state["trainable"].items() for p, fs in tree.items() for f, v in fs.items()
        }
        if jax.process_index() == 0:
            tmp = os.path.join(out_dir, name + ".tmp")
            save_file(tensors, tmp, metadata={"basis_hash": basis_hash or "", "steps": str(config.steps)})
            os.replace(tmp, os.path.join(out_dir, name))
            with open(os.path.join(out_dir, INDEX), "a") as f:
                for row, identity in enumerate(group):
                    f.write(json.dumps({"identity": identity, "chunk": name, "row": row, "source": f"synthetic:{identity}",
                                        "loss_before": float(before[row]), "final_loss": float(final[row]),
                                        "steps": config.steps}) + "\n")
        trained += group
        bar.update(len(group))
        bar.set_postfix(chunk_s=f"{time.perf_counter() - t0:.1f}", loss=f"{final[: len(group)].mean():.4f}")
    bar.close()
    return {"trained": trained, "workdir": out_dir, "basis_hash": basis_hash}
