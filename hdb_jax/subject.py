"""Personalise one subject: DreamBooth-style adapter training, resumable, with export.

The job behind ``python -m hdb_jax.train --config configs/subject.py:tiny,adapter=lidb``:

1. load the subject images (a folder of photos, or renders of one synthetic identity) and,
   optionally, class images for the prior-preservation loss -- all validated before any compile;
2. build or load the base model, attach the adapter (LoRA, LiDB, Kronecker or residual) to the
   configured layers, and restore the latest checkpoint if the run directory has one;
3. run the jitted, donated ``train_step(state, frozen, batch, rng)`` with checkpoints at an
   interval, on SIGTERM, and at the end; log to TensorBoard and a progress bar;
4. export the personal weights file, a standard LoRA file where the kind allows, and a sample grid.

Batches are a pure function of ``(seed, step)``, so an interrupted run that resumes from a
checkpoint sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdb_jax import adapters as A
from hdb_jax import checkpoint, diffusion, metrics
from hdb_jax.adapters import basis as basis_io
from hdb_jax.adapters import table
from hdb_jax.sd import loading, model

COMPONENTS_WITH_ADAPTERS = ("unet", "text_encoder")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


# -------------------------------------------------------------------- building blocks
def build_model(config: ml_collections.ConfigDict, key: jax.Array):
    """``(sd, params)`` for ``config.model.source``: ``tiny`` (random init) or a directory/hub id."""
    if config.model.source == "tiny":
        sd = model.tiny(resolution=config.model.resolution)
        return sd, sd.random_params(key)
    return loading.load_pretrained(config.model.source)


def build_adapters(config: ml_collections.ConfigDict, abstract: Mapping[str, Any]) -> dict[str, A.Adapter]:
    """One adapter per component that has target patterns, all of ``config.adapter.kind``."""
    kind_name = config.adapter.kind
    if kind_name not in A.KINDS:
        raise ValueError(f"config.adapter.kind={kind_name!r}: choose from {sorted(A.KINDS)}")
    kind = A.kind_from_config(kind_name, **config.adapter[kind_name].to_dict())
    patterns = {"unet": config.adapter.unet_patterns, "text_encoder": config.adapter.text_patterns}
    return {
        component: A.Adapter.create(kind, abstract[component], list(patterns[component]), component)
        for component in COMPONENTS_WITH_ADAPTERS
        if patterns[component]
    }


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and an optional linear warmup."""
    lr = config.optim.learning_rate
    if config.optim.get("warmup_steps", 0):
        lr = optax.linear_schedule(0.0, lr, config.optim.warmup_steps)
    return optax.chain(
        optax.clip_by_global_norm(config.optim.grad_clip),
        optax.adamw(lr, weight_decay=config.optim.weight_decay),
    )


def make_train_step(sd: model.StableDiffusion, adapters: Mapping[str, A.Adapter], optimizer) -> Callable:
    """The jitted ``train_step(state, frozen, batch, rng) -> (state, metrics)``.

    ``state = {"step", "trainable": {component: tree}, "opt_state"}`` is donated;
    ``frozen = {"params": base params, "basis": {component: tree}}`` is not.
    ``batch = {"images" [B,H,W,3], "input_ids" [B,L], "weights" [B]}``: the loss is
    ``Σ_i weights_i · loss_i``, which expresses the plain mean (weights 1/B) and DreamBooth's
    prior preservation (1/B_instance for instance rows, λ/B_prior for class rows) alike.
    Gradients are taken with respect to the adapter trees only; the step is folded into ``rng``.
    """
    sched_state = sd.noise_scheduler.create_state()

    def loss_fn(trainable, frozen, batch, key):
        with A.attach_all(adapters, trainable, frozen["basis"]):
            per_sample = diffusion.denoising_loss(
                sd, sched_state, frozen["params"], batch["images"], batch["input_ids"], key, per_sample=True
            )
        return jnp.sum(batch["weights"] * per_sample)

    def train_step(state, frozen, batch, rng):
        key = jax.random.fold_in(rng, state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["trainable"], frozen, batch, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, out

    return jax.jit(train_step, donate_argnums=(0,))


def make_eval_loss(sd: model.StableDiffusion, adapters: Mapping[str, A.Adapter], num_keys: int = 4) -> Callable:
    """Jitted ``eval_loss(trainable, frozen, images, input_ids, rng) -> scalar``.

    The denoising loss averaged over ``num_keys`` fixed noise/timestep draws: a deterministic
    progress measure on a fixed batch (the training loss is noisy by construction).
    """
    sched_state = sd.noise_scheduler.create_state()

    def eval_loss(trainable, frozen, images, input_ids, rng):
        def one(key):
            with A.attach_all(adapters, trainable, frozen["basis"]):
                return diffusion.denoising_loss(sd, sched_state, frozen["params"], images, input_ids, key)

        return jnp.mean(jax.lax.map(one, jax.random.split(rng, num_keys)))

    return jax.jit(eval_loss)


# -------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class SubjectData:
    """Decoded images and prompts; batches are a pure function of ``(seed, step)``."""

    images: np.ndarray  # [N, H, W, 3] float32 in [-1, 1]
    input_ids: np.ndarray  # [L] the instance prompt's tokens
    class_images: np.ndarray | None  # [M, H, W, 3] or None
    class_ids: np.ndarray | None  # [L]
    prior_weight: float
    flip: bool

    def batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """The batch for ``step``: instance rows, then (with prior preservation) as many class rows."""
        rng = np.random.default_rng([seed, 17, step])
        rows, ids, weights = [self._draw(rng, self.images, batch_size)], [self.input_ids] * batch_size, [1.0 / batch_size] * batch_size
        if self.class_images is not None:
            rows.append(self._draw(rng, self.class_images, batch_size))
            ids += [self.class_ids] * batch_size
            weights += [self.prior_weight / batch_size] * batch_size
        return {
            "images": np.concatenate(rows),
            "input_ids": np.stack(ids).astype(np.int32),
            "weights": np.asarray(weights, np.float32),
        }

    def _draw(self, rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
        index = rng.permutation(len(pool))[:count] if len(pool) >= count else rng.integers(0, len(pool), count)
        images = pool[index]
        if self.flip:
            flips = rng.random(count) < 0.5
            images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
        return images


def _load_images(spec: ml_collections.ConfigDict, resolution: int, what: str) -> np.ndarray:
    """Decoded images [N, H, W, 3] in [-1, 1] from a data spec (``synthetic`` or ``folder``)."""
    if spec.source == "synthetic":
        from hdb_jax.data.synthetic import SyntheticFaces

        faces = SyntheticFaces(list(spec.identities), spec.images_per_identity, resolution=resolution, seed=spec.seed)
        pixels = np.stack([faces[i]["image"] for i in range(len(faces))])
    elif spec.source == "folder":
        from hdb_jax.data.folder import ImageFolder

        folder = ImageFolder(spec.folder, resolution=resolution, min_size=spec.min_size)
        pixels = np.stack([folder[i]["image"] for i in range(len(folder))])
    else:
        raise ValueError(f"config.data.{what}.source={spec.source!r}: choose 'synthetic' or 'folder'")
    return pixels.astype(np.float32) / 127.5 - 1.0


def load_subject_data(config: ml_collections.ConfigDict, sd: model.StableDiffusion) -> SubjectData:
    """Loads and validates the subject (and class) images and tokenizes the prompts."""
    resolution = config.model.resolution
    images = _load_images(config.data.instance, resolution, "instance")
    class_images = class_ids = None
    if config.data.prior_weight > 0:
        class_images = _load_images(config.data.prior, resolution, "prior")
        class_ids = sd.tokenize([config.data.class_prompt])[0]
    return SubjectData(
        images=images,
        input_ids=sd.tokenize([config.data.prompt])[0],
        class_images=class_images,
        class_ids=class_ids,
        prior_weight=float(config.data.prior_weight),
        flip=bool(config.data.flip),
    )


# -------------------------------------------------------------------- the job
def lidb_basis(config, adapters, key, workdir: str) -> tuple[dict, str | None]:
    """Frozen trees per component; LiDB bases are loaded from (or generated once into) a file.

    The file is ``config.adapter.basis_file``, or ``<workdir>/lidb_basis.safetensors``.
    """
    if config.adapter.kind != "lidb":
        return {c: a.basis(key) for c, a in adapters.items()}, None
    path = config.adapter.basis_file or os.path.join(workdir, "lidb_basis.safetensors")
    return basis_io.load_or_create(path, adapters, key, a=config.adapter.lidb.a, b=config.adapter.lidb.b)


def train_subject(config: ml_collections.ConfigDict) -> dict:
    """Runs (or resumes) the subject job described by ``config``.

    Returns:
      ``{"state", "losses" (step -> loss on log steps), "workdir", "stopped_early", ...}``.
    """
    workdir = os.path.abspath(config.workdir)
    key = jax.random.PRNGKey(config.seed)
    k_model, k_init, k_basis, k_train = jax.random.split(key, 4)

    t0 = time.perf_counter()
    sd, params = build_model(config, k_model)
    data = load_subject_data(config, sd)  # bad images fail here, before any compile
    adapters = build_adapters(config, params)
    frozen_trees, basis_hash = lidb_basis(config, adapters, k_basis, workdir)
    trainable = {c: a.init(k_init) for c, a in adapters.items()}
    optimizer = make_optimizer(config)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}
    frozen = {"params": params, "basis": frozen_trees}
    n_params = sum(a.num_params() for a in adapters.values())
    print(f"model {sd.name} ready in {time.perf_counter() - t0:.1f}s; {config.adapter.kind} on "
          + ", ".join(f"{c} ({len(a.targets)} layers)" for c, a in adapters.items()) + f": {n_params:,} scalars")
    if config.get("print_tables", False):
        print("adapter parameters of this model:")
        print(table.format_rows(table.standard_rows(jax.eval_shape(lambda: params), A.LiDB(**_lidb_shape(config)))))
        print("adapter parameters of SD 1.5 (from shapes; methods.md defaults):")
        print(table.format_rows(table.standard_rows(model.sd15_shapes().abstract_params())))

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint_every)
    start = 0
    if ckpt.latest_step is not None:
        start, state = ckpt.restore(state)
        print(f"resumed from {ckpt.directory} at step {start}")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    train_step = make_train_step(sd, adapters, optimizer)
    batch = jax.tree_util.tree_map(jnp.asarray, data.batch(config.seed, start, config.data.batch_size))
    t0 = time.perf_counter()
    compiled = train_step.lower(state, frozen, batch, k_train).compile()
    print(f"compiled train step in {time.perf_counter() - t0:.1f}s")

    eval_loss = make_eval_loss(sd, adapters)
    eval_images = jnp.asarray(data.images[: config.data.batch_size])
    eval_ids = jnp.asarray(np.stack([data.input_ids] * len(eval_images)))
    eval_key = jax.random.PRNGKey(config.seed + 1)
    evals = {"start": float(eval_loss(state["trainable"], frozen, eval_images, eval_ids, eval_key))}
    writer = metrics.EventWriter(os.path.join(workdir, "tb"))
    losses: dict[int, float] = {}
    last_saved = ckpt.latest_step
    stopped_early = False
    bar = metrics.progress(config.steps, initial=start)
    t_log, step_log = time.perf_counter(), start
    step = start
    try:
        while step < config.steps:
            batch = data.batch(config.seed, step, config.data.batch_size)
            state, out = compiled(state, frozen, batch, k_train)
            step += 1
            bar.update(1)
            save_now = ckpt.due(step, config.steps)
            if step % config.log_every == 0 or save_now or step == config.steps:
                loss = float(out["loss"])
                if not np.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss} at step {step}; last good checkpoint: "
                        + (f"step {last_saved} in {ckpt.directory}" if last_saved is not None else "none")
                    )
                rate = (step - step_log) / max(time.perf_counter() - t_log, 1e-9)
                t_log, step_log = time.perf_counter(), step
                losses[step] = loss
                writer.scalars(step, {"loss": loss, "grad_norm": out["grad_norm"], "steps_per_sec": rate})
                bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{rate:.2f}")
            stop = ckpt.should_stop(step)
            if save_now or stop:
                ckpt.save(step, state, config.to_dict())
                last_saved = step
            if stop and step < config.steps:
                stopped_early = True
                print(f"\nstopped at step {step} (checkpoint saved); rerun the same command to resume")
                break
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    evals["end"] = float(eval_loss(state["trainable"], frozen, eval_images, eval_ids, eval_key))
    print(f"fixed-batch denoising loss: {evals['start']:.5f} at step {start} -> {evals['end']:.5f} at step {step}")
    result = {"state": state, "losses": losses, "workdir": workdir, "stopped_early": stopped_early, "eval": evals,
              "num_params": n_params, "basis_hash": basis_hash, "sd": sd, "params": params,
              "adapters": adapters, "frozen": frozen_trees}
    with open(os.path.join(workdir, "losses.json"), "w") as f:
        json.dump({"train": {str(k): v for k, v in losses.items()}, "eval_start_step": start, "eval_end_step": step,
                   "eval": evals}, f, indent=1)
    return result


def _lidb_shape(config) -> dict:
    return {k: config.adapter.lidb[k] for k in ("a", "b", "rank")}


def export_subject(config: ml_collections.ConfigDict, result: Mapping[str, Any]) -> dict[str, str]:
    """Writes ``personal.safetensors``, ``lora.safetensors`` (if the kind allows) and a sample grid.

    Returns:
      ``{artefact: path}`` of what was written.
    """
    from hdb_jax import export

    workdir, adapters = result["workdir"], result["adapters"]
    trainable = jax.device_get(result["state"]["trainable"])
    written = {}
    written["personal"] = os.fspath(export.save_personal(
        os.path.join(workdir, "personal.safetensors"), adapters, trainable,
        base_fingerprint=model.params_fingerprint(result["params"]), basis_hash=result["basis_hash"],
        extra={"steps": int(result["state"]["step"]), "prompt": config.data.prompt, "model": result["sd"].name},
    ))
    if config.export.lora:
        try:
            export.export_lora(os.path.join(workdir, "lora.safetensors"), adapters, trainable, jax.device_get(result["frozen"]))
            written["lora"] = os.path.join(workdir, "lora.safetensors")
        except export.NotExportableError as err:
            print(f"no standard LoRA file: {err}")
    if config.export.sample_prompts:
        from hdb_jax import sample

        sd, params = result["sd"], result["params"]
        merged = sample.merged_params(params, adapters, trainable, jax.device_get(result["frozen"]))
        prompts = [p for p in config.export.sample_prompts for _ in config.export.sample_seeds]
        seeds = [s for _ in config.export.sample_prompts for s in config.export.sample_seeds]
        kwargs = dict(num_steps=config.export.sample_steps, guidance_scale=config.export.guidance_scale)
        personal = sample.sample(sd, merged, prompts, seeds, **kwargs)
        base = sample.sample(sd, params, prompts, seeds, **kwargs)
        labels = [f"{tag}: {p} (seed {s})" for tag in ("personal", "base") for p, s in zip(prompts, seeds)]
        written["grid"] = os.fspath(sample.save_grid(np.concatenate([personal, base]), os.path.join(workdir, "samples.png"),
                                                     cols=len(prompts), labels=labels))
    for name, path in written.items():
        print(f"wrote {name}: {path} ({os.path.getsize(path):,} bytes)")
    return written


def run(config: ml_collections.ConfigDict) -> dict:
    """The ``subject`` job: train (or resume), then export unless the run was interrupted."""
    result = train_subject(config)
    if not result["stopped_early"]:
        result["written"] = export_subject(config, result)
    return result
