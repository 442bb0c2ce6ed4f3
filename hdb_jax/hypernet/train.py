"""Stage 2 of HyperDreamBooth: train the hypernetwork, sharded over a mesh, on one or many hosts.

Loss (methods.md): ``α · ‖ε̂(θ̂) − ε‖² + β · ‖θ̂ − θ‖²`` where θ̂ = H(x) are the LiDB weights
the hypernetwork predicts from the sample's face image, applied per sample in activation space
while the UNet denoises that same image under the prompt "a [V] face", and θ are the weights
pre-optimised for that identity (stage 1; β = 0 for identities without them).

Distribution is configuration: the mesh axes (``data``, ``fsdp``) and the sharding rules come
from the config; the state is created directly in its shardings from ``jax.eval_shape``; the
step is ``jax.jit`` with explicit in/out shardings and a donated state, compiled ahead of time
(compile time and memory analysis logged); each process loads only its slice of every global
batch. ``config.dry_run`` builds mesh, shardings and the compiled step on shape-only inputs --
no weights, no data -- prints them and stops.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdb_jax import adapters as A
from hdb_jax import checkpoint, diffusion, metrics, sharding
from hdb_jax.hypernet import bundle
from hdb_jax.hypernet import decoder as dec
from hdb_jax.hypernet import encoder as enc
from hdb_jax.hypernet.model import HyperNetwork, abstract_params, build_hypernet, split_params
from hdb_jax.sd import model
from hdb_jax.subject import build_adapters, build_model, lidb_basis


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW, cosine decay after linear warmup, global-norm clipping (methods.md)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.optim.learning_rate, config.optim.warmup_steps, max(config.steps, config.optim.warmup_steps + 1)
    )
    return optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), optax.adamw(schedule, weight_decay=config.optim.weight_decay))


def make_step(sd, net: HyperNetwork, adapters, optimizer, alpha: float, beta: float):
    """``step(state, frozen, batch, rng) -> (state, metrics)`` (pure; jitted by the caller).

    ``frozen = {"sd": base params, "basis": LiDB bases, "hyper": frozen hypernet params}``;
    ``batch = {"images" [B,H,W,3], "input_ids" [B,L], "target_tokens" [B,n,W], "has_target" [B]}``.
    """
    sched_state = sd.noise_scheduler.create_state()
    size = net.image_size

    def loss_fn(trainable, frozen, batch, key):
        tokens = net.apply({"params": {**frozen["hyper"], **trainable}}, enc.resize_images(batch["images"], size),
                           method=HyperNetwork.predict_tokens)  # [B, n, W]
        tree = dec.tokens_to_tree(tokens, adapters, net.kind)
        with A.attach_all(adapters, tree, frozen["basis"], per_sample=True):
            denoise = diffusion.denoising_loss(sd, sched_state, frozen["sd"], batch["images"], batch["input_ids"], key)
        per_sample = jnp.mean(jnp.square(tokens - batch["target_tokens"]), axis=(1, 2))
        weights = batch["has_target"]
        regress = jnp.sum(weights * per_sample) / jnp.maximum(jnp.sum(weights), 1.0)
        return alpha * denoise + beta * regress, {"denoise": denoise, "regress": regress}

    def step(state, frozen, batch, rng):
        key = jax.random.fold_in(rng, state["step"])
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"], frozen, batch, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, out

    return step


def make_eval(sd, net: HyperNetwork, adapters, num_keys: int = 4):
    """``eval(trainable, frozen, images, ids, rng) -> (loss with predicted, loss with zero weights)``."""
    sched_state = sd.noise_scheduler.create_state()

    def evaluate(trainable, frozen, images, ids, rng):
        tokens = net.apply({"params": {**frozen["hyper"], **trainable}}, enc.resize_images(images, net.image_size),
                           method=HyperNetwork.predict_tokens)

        def loss(tok, key):
            with A.attach_all(adapters, dec.tokens_to_tree(tok, adapters, net.kind), frozen["basis"], per_sample=True):
                return diffusion.denoising_loss(sd, sched_state, frozen["sd"], images, ids, key)

        keys = jax.random.split(rng, num_keys)
        predicted = jnp.mean(jax.lax.map(lambda k: loss(tokens, k), keys))
        zero = jnp.mean(jax.lax.map(lambda k: loss(jnp.zeros_like(tokens), k), keys))
        return predicted, zero

    return evaluate


def _hypernet(config, adapters):
    lidb = A.LiDB(**config.adapter.lidb.to_dict())
    h = config.hypernet
    return build_hypernet(
        h.encoder, adapters, lidb, iterations=h.iterations, mode=h.mode, num_blocks=h.num_blocks, num_heads=h.num_heads,
        train_encoder=h.train_encoder, encoder_path=h.encoder_path or None, width=h.width or None,
    )


class Data:
    """Global batches as a pure function of (seed, step); each process renders only its rows."""

    def __init__(self, config, sd, adapters, identities: list[int], targets: np.ndarray | None):
        from hdb_jax.data.synthetic import SyntheticFaces

        self.config, self.identities, self.targets = config, identities, targets
        self.faces = SyntheticFaces(identities, config.data.images_per_identity, resolution=config.model.resolution, seed=config.data.seed)
        self.ids = np.asarray(sd.tokenize([config.data.prompt]))[0]
        self.tokens = len(dec.token_layout(adapters))
        self.width = dec.token_width(A.LiDB(**config.adapter.lidb.to_dict()))

    def rows(self, step: int) -> np.ndarray:
        """Indices into ``identities`` of the global batch at ``step`` (epoch-wise permutation)."""
        n, b = len(self.identities), self.config.batch_size
        flat = step * b + np.arange(b)
        epochs = flat // n
        perms = {e: np.random.default_rng([self.config.seed, 5, int(e)]).permutation(n) for e in np.unique(epochs)}
        return np.array([perms[e][i % n] for e, i in zip(epochs, flat)])

    def load(self, step: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``positions`` of the global batch of ``step`` (what one process holds)."""
        rng = np.random.default_rng([self.config.seed, 9, step])
        variants = rng.integers(0, self.config.data.images_per_identity, self.config.batch_size)[positions]
        rows = self.rows(step)[positions]
        per = self.config.data.images_per_identity
        images = np.stack([self.faces[int(r) * per + int(v)]["image"] for r, v in zip(rows, variants)])
        if self.targets is None:
            targets, has = np.zeros((len(rows), self.tokens, self.width), np.float32), np.zeros(len(rows), np.float32)
        else:
            targets, has = self.targets[rows], np.ones(len(rows), np.float32)
        return {"images": images.astype(np.float32) / 127.5 - 1.0, "input_ids": np.stack([self.ids] * len(rows)),
                "target_tokens": targets.astype(np.float32), "has_target": has}


def _targets(config, adapters) -> tuple[list[int], np.ndarray | None]:
    """Training identities and their pre-optimised weight tokens (or None: β = 0)."""
    if not config.data.preopt_dir:
        return [int(i) for i in config.data.identities], None
    from hdb_jax import preopt

    rows, weights = preopt.load_weights(config.data.preopt_dir)
    if not rows:
        raise ValueError(f"config.data.preopt_dir={config.data.preopt_dir}: no pre-optimised identities (index.jsonl empty)")
    tree = {}
    for name, array in weights.items():
        component, rest = name.split("/", 1)
        path, factor = rest.rsplit("/", 1)
        tree.setdefault(component, {}).setdefault(path, {})[factor] = array
    missing = [c for c in adapters if c not in tree]
    if missing:
        raise ValueError(f"{config.data.preopt_dir}: weights have no {missing} adapters; another adapter layout?")
    return [r["identity"] for r in rows], np.asarray(dec.tree_to_tokens(tree, adapters))


def run(config: ml_collections.ConfigDict) -> dict:
    """Trains (or resumes, or dry-runs) the hypernetwork as ``config`` says."""
    sharding.maybe_initialize_distributed(config.get("distributed"))
    mesh = sharding.make_mesh(config.mesh.to_dict())
    if config.batch_size % mesh.size:
        raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of the mesh's {mesh.size} devices")
    key = jax.random.PRNGKey(config.seed)
    k_model, k_hyper, k_basis, k_train = jax.random.split(key, 4)

    if config.dry_run:
        sd = model.sd15_shapes() if config.model.source != "tiny" else model.tiny(resolution=config.model.resolution)
        sd_params = sd.abstract_params(config.model.resolution)
    else:
        sd, sd_params = build_model(config, k_model)
    adapters = build_adapters(config, jax.eval_shape(lambda: sd_params))
    net, init = _hypernet(config, adapters)
    optimizer = make_optimizer(config)

    def init_all(k):
        trainable, frozen_h = split_params(net, init(k))
        return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}, frozen_h

    abstract_state, abstract_hyper = jax.eval_shape(init_all, k_hyper)
    basis_hash = None
    if config.dry_run:
        basis = _abstract_basis(adapters, net.kind)
    else:
        basis, basis_hash = lidb_basis(config, adapters, k_basis, config.workdir)
    frozen = {"sd": sd_params, "basis": basis}
    abstract_frozen = {**jax.eval_shape(lambda: frozen), "hyper": abstract_hyper}
    step, state_sh, frozen_sh, data_sh = sharded_step(config, sd, net, adapters, optimizer, mesh, abstract_state, abstract_frozen)

    n_tok, width = len(dec.token_layout(adapters)), dec.token_width(net.kind)
    b, res = config.batch_size, config.model.resolution
    abstract_batch = {"images": jax.ShapeDtypeStruct((b, res, res, 3), jnp.float32),
                      "input_ids": jax.ShapeDtypeStruct((b, sd.max_text_length), jnp.int32),
                      "target_tokens": jax.ShapeDtypeStruct((b, n_tok, width), jnp.float32),
                      "has_target": jax.ShapeDtypeStruct((b,), jnp.float32)}
    t0 = time.perf_counter()
    compiled = step.lower(
        _with_shardings(abstract_state, state_sh), _with_shardings(abstract_frozen, frozen_sh),
        _with_shardings(abstract_batch, {k: data_sh for k in abstract_batch}), jax.ShapeDtypeStruct(k_train.shape, k_train.dtype),
    ).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    summary = {"mesh": dict(mesh.shape), "devices": mesh.size, "processes": jax.process_count(), "compile_s": round(compile_s, 2),
               "tokens": n_tok, "token_width": width, "trainable_params": int(sum(x.size for x in jax.tree_util.tree_leaves(abstract_state["trainable"]))),
               "temp_bytes": getattr(memory, "temp_size_in_bytes", None), "argument_bytes": getattr(memory, "argument_size_in_bytes", None)}
    if jax.process_index() == 0:
        print("hypernet step: " + json.dumps(summary))
    if config.dry_run:
        specs = sharding.describe(state_sh["trainable"])
        for path in list(specs)[:6]:
            print(f"  trainable/{path}: {specs[path]}")
        return {"summary": summary, "state_shardings": state_sh, "frozen_shardings": frozen_sh, "compiled": compiled}
    return _train(config, sd, net, adapters, mesh, compiled, state_sh, frozen, frozen_sh, init_all, k_hyper, k_train, summary, basis_hash)


def sharded_step(config, sd, net, adapters, optimizer, mesh, abstract_state, abstract_frozen):
    """The jitted step with explicit shardings from ``config.sharding_rules`` on ``mesh``.

    Returns:
      ``(step, state_shardings, frozen_shardings, batch_sharding)``; the state is donated.
    """
    rules = [tuple(r) for r in config.sharding_rules]
    state_sh = sharding.tree_shardings(abstract_state, mesh, rules)
    frozen_sh = sharding.tree_shardings(abstract_frozen, mesh, rules)
    data_sh = sharding.batch_sharding(mesh)
    step_fn = make_step(sd, net, adapters, optimizer, config.loss.alpha, config.loss.beta)
    step = jax.jit(step_fn, donate_argnums=(0,), in_shardings=(state_sh, frozen_sh, data_sh, None), out_shardings=(state_sh, None))
    return step, state_sh, frozen_sh, data_sh


def _with_shardings(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _abstract_basis(adapters, kind: A.LiDB) -> dict:
    """Shapes of the LiDB bases (no QR is run): a_aux [in, a], b_aux [b, out]."""
    return {c: {t.path: {"a_aux": jax.ShapeDtypeStruct((t.in_dim, kind.a), jnp.float32),
                         "b_aux": jax.ShapeDtypeStruct((kind.b, t.out_dim), jnp.float32)} for t in a.targets}
            for c, a in adapters.items()}


def _train(config, sd, net, adapters, mesh, compiled, state_sh, frozen, frozen_sh, init_all, k_hyper, k_train, summary, basis_hash):
    identities, targets = _targets(config, adapters)
    data = Data(config, sd, adapters, identities, targets)
    state, hyper_frozen = jax.jit(init_all, out_shardings=(state_sh, frozen_sh["hyper"]))(k_hyper)
    frozen = jax.device_put({**frozen, "hyper": hyper_frozen}, frozen_sh)
    workdir = os.path.abspath(config.workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint_every)
    start = 0
    if ckpt.latest_step is not None:
        start, state = ckpt.restore(_with_shardings(state, state_sh))
        print(f"resumed from {ckpt.directory} at step {start} on mesh {dict(mesh.shape)}")
    writer = metrics.EventWriter(os.path.join(workdir, "tb"))
    bar = metrics.progress(config.steps, initial=start, desc="hypernet")
    history = {}
    s = start
    try:
        while s < config.steps:
            batch = sharding.global_batch(functools.partial(data.load, s), config.batch_size, mesh)
            state, out = compiled(state, frozen, batch, k_train)
            s += 1
            bar.update(1)
            due = ckpt.due(s, config.steps)
            if s % config.log_every == 0 or due:
                host = {k: float(v) for k, v in jax.device_get(out).items()}
                if not np.isfinite(host["loss"]):
                    raise FloatingPointError(f"loss {host['loss']} at step {s}; last checkpoint: {ckpt.latest_step}")
                history[s] = host
                writer.scalars(s, host)
                bar.set_postfix(loss=f"{host['loss']:.4f}")
            stop = ckpt.should_stop(s)
            if due or stop:
                ckpt.save(s, state, config.to_dict())
            if stop and s < config.steps:
                print(f"\nstopped at step {s} (checkpoint saved); rerun the same command to resume")
                break
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    result = {"state": state, "history": history, "summary": summary, "workdir": workdir, "basis_hash": basis_hash}
    if s >= config.steps:
        params = {**jax.device_get(frozen["hyper"]), **jax.device_get(state["trainable"])}
        result["bundle"] = os.path.join(workdir, "hypernet")
        if jax.process_index() == 0:
            bundle.save(result["bundle"], net, params, patterns={"unet": config.adapter.unet_patterns, "text_encoder": config.adapter.text_patterns},
                        arch=config.hypernet.to_dict(), base_fingerprint=model.params_fingerprint(jax.device_get(frozen["sd"])),
                        basis_file=config.adapter.basis_file or os.path.join(workdir, "lidb_basis.safetensors"), basis_hash=basis_hash,
                        extra={"steps": s, "final_loss": history[max(history)]["loss"] if history else None})
    if config.data.heldout:
        result["heldout"] = heldout_losses(config, sd, net, adapters, state, frozen)
        if jax.process_index() == 0:
            print("held-out denoising loss: " + json.dumps(result["heldout"]))
            with open(os.path.join(workdir, "heldout.json"), "w") as f:
                json.dump(result["heldout"], f, indent=1)
    return result


def heldout_losses(config, sd, net, adapters, state, frozen) -> dict[str, float]:
    """Denoising loss on held-out identities with predicted weights vs with zero weights."""
    from hdb_jax.data.synthetic import SyntheticFaces

    faces = SyntheticFaces(list(config.data.heldout), 1, resolution=config.model.resolution, seed=config.data.seed)
    images = jnp.asarray(np.stack([faces[i]["image"] for i in range(len(faces))]).astype(np.float32) / 127.5 - 1.0)
    ids = jnp.asarray(np.stack([np.asarray(sd.tokenize([config.data.prompt]))[0]] * len(faces)))
    trainable = jax.device_get(state["trainable"])
    predicted, zero = jax.jit(make_eval(sd, net, adapters))(trainable, jax.device_get(frozen), images, ids, jax.random.PRNGKey(config.seed + 7))
    return {"predicted": float(predicted), "zero": float(zero)}
