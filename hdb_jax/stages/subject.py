"""Personalise one subject: DreamBooth-style training of adapters, a whole UNet or one token, resumable.

The stage of the ``subject`` job (:mod:`hdb_jax.jobs.subject` builds the base model and exports):

1. load the subject images (a folder of photos, or renders of one synthetic identity) and,
   optionally, class images for the prior-preservation loss -- all validated before any compile;
2. attach the adapter (LoRA, LiDB, Kronecker or residual) to the configured layers of the given
   base model, and restore the latest checkpoint if the run directory has one;
3. run the jitted, donated ``train_step(state, frozen, batch, rng)`` in the shared loop
   (:mod:`hdb_jax.blocks.loop`): checkpoints, SIGTERM saves, TensorBoard scalars and a validation grid.

Batches are a pure function of ``(seed, step)``, so an interrupted run that resumes from a
checkpoint sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdb_jax import adapters as A
from hdb_jax.adapters import table
from hdb_jax.blocks import build, diffusion, loop
from hdb_jax.blocks import tuning as tuning_lib
from hdb_jax.common import images
from hdb_jax.sd import model
from hdb_jax.sd.fingerprint import params_fingerprint


# -------------------------------------------------------------------- steps
def make_train_step(
    sd: model.StableDiffusion, tuning, optimizer, *, wrap: Callable | None = None
) -> Callable:
    """The jitted ``train_step(state, frozen, batch, rng) -> (state, metrics)``.

    ``tuning`` is a :mod:`hdb_jax.blocks.tuning` method (adapters, DreamBooth, Textual Inversion), or a
    ``{component: Adapter}`` dict (adapters). ``state = {"step", "trainable", "opt_state"}`` is
    donated; ``frozen = {"params": base params, "basis": {component: tree}}`` is not.
    ``batch = {"images" [B,H,W,3], "input_ids" [B,L], "weights" [B]}``: the loss is
    ``Σ_i weights_i · loss_i``, which expresses the plain mean (weights 1/B) and DreamBooth's
    prior preservation (1/B_instance for instance rows, λ/B_prior for class rows) alike.
    Gradients are taken with respect to the trainable tree only; the step is folded into ``rng``.
    ``wrap`` is applied before ``jax.jit`` (tests pin traces with ``chex.assert_max_traces``).
    """
    sched_state = sd.noise_scheduler.create_state()
    tuning = tuning_lib.AdapterTuning(dict(tuning)) if isinstance(tuning, Mapping) else tuning

    def loss_fn(trainable, frozen, batch, key):
        with tuning.applied(frozen["params"], trainable, frozen["basis"]) as params:
            per_sample = diffusion.denoising_loss(
                sd, sched_state, params, batch["images"], batch["input_ids"], key, per_sample=True
            )
        return jnp.sum(batch["weights"] * per_sample)

    def train_step(state, frozen, batch, rng):
        key = jax.random.fold_in(rng, state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["trainable"], frozen, batch, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, out

    return jax.jit(wrap(train_step) if wrap is not None else train_step, donate_argnums=(0,))


def make_eval_loss(sd: model.StableDiffusion, tuning, draws: int = 4) -> Callable:
    """Jitted ``eval_loss(trainable, frozen, images, input_ids, key) -> scalar``.

    :func:`hdb_jax.blocks.diffusion.fixed_draw_loss` with the tuning applied: a deterministic progress
    measure on a fixed batch.
    """
    sched_state = sd.noise_scheduler.create_state()

    def eval_loss(trainable, frozen, images_, input_ids, key):
        with tuning.applied(frozen["params"], trainable, frozen["basis"]) as params:
            return diffusion.fixed_draw_loss(sd, sched_state, params, images_, input_ids, key, draws=draws)

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
        rows, ids = [self._draw(rng, self.images, batch_size)], [self.input_ids] * batch_size
        weights = [1.0 / batch_size] * batch_size
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
        index = (
            rng.permutation(len(pool))[:count] if len(pool) >= count else rng.integers(0, len(pool), count)
        )
        drawn = pool[index]
        if self.flip:
            flips = rng.random(count) < 0.5
            drawn = np.where(flips[:, None, None, None], drawn[:, :, ::-1], drawn)
        return drawn


def load_images(spec: ml_collections.ConfigDict, resolution: int, what: str) -> np.ndarray:
    """Decoded images [N, H, W, 3] in [-1, 1] from a data spec (``synthetic`` or ``folder``)."""
    if spec.source == "synthetic":
        from hdb_jax.toy import synthetic

        ids = [int(i) for i in spec.identities for _ in range(spec.images_per_identity)]
        index = [j for _ in spec.identities for j in range(spec.images_per_identity)]
        pixels = synthetic.render_batch(ids, index, ["photo"] * len(ids), spec.seed, resolution)
    elif spec.source == "folder":
        from hdb_jax.data.folder import ImageFolder

        folder = ImageFolder(spec.folder, resolution=resolution, min_size=spec.min_size)
        pixels = np.stack([folder[i]["image"] for i in range(len(folder))])
    else:
        raise ValueError(f"config.data.{what}.source={spec.source!r}: choose 'synthetic' or 'folder'")
    return images.to_unit_range(pixels)


def generated_class_images(
    spec, sd: model.StableDiffusion, params, class_prompt: str, workdir: str
) -> np.ndarray:
    """DreamBooth's class images: ``spec.count`` samples of the class prompt by the base model itself.

    They are generated once into ``<workdir>/class_images/`` (PNG files and ``manifest.json``
    recording the base model's fingerprint, the prompt, seeds and sampler settings) and read back
    on every later run (a resumed run never samples again); a manifest that does not match the
    current settings is regenerated.

    Returns:
      uint8 ``[count, H, W, 3]``.
    """
    from PIL import Image

    from hdb_jax.blocks import sample

    folder = os.path.join(workdir, "class_images")
    seeds = list(range(spec.seed, spec.seed + spec.count))
    manifest = {
        "base_fingerprint": params_fingerprint(params),
        "prompt": class_prompt,
        "seeds": seeds,
        "steps": spec.sample_steps,
        "guidance_scale": spec.guidance_scale,
    }
    path = os.path.join(folder, "manifest.json")
    names = [f"class_{s:05d}.png" for s in seeds]
    if (
        os.path.isfile(path)
        and json.load(open(path)) == manifest
        and all(os.path.isfile(os.path.join(folder, n)) for n in names)
    ):
        return np.stack([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")) for n in names])
    print(
        f"generating {spec.count} class images of '{class_prompt}' with the base model into {folder}",
        flush=True,
    )
    drawn = sample.sample(
        sd,
        params,
        [class_prompt] * len(seeds),
        seeds,
        num_steps=spec.sample_steps,
        guidance_scale=spec.guidance_scale,
        batch_size=min(8, len(seeds)),
        progress=False,
    )
    images.save_images(drawn, folder, names)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    return drawn


def load_subject_data(
    config: ml_collections.ConfigDict, sd: model.StableDiffusion, params=None, workdir: str | None = None
) -> SubjectData:
    """Loads and validates the subject (and class) images and tokenizes the prompts.

    Class images come from ``config.data.prior`` (``synthetic``, ``folder``, or ``generated``:
    sampled by the base model, which needs ``params`` and ``workdir``).
    """
    resolution = build.resolution(config.model, sd)
    instance = load_images(config.data.instance, resolution, "instance")
    class_images = class_ids = None
    if config.data.prior_weight > 0:
        if config.data.prior.source == "generated":
            if params is None or workdir is None:
                raise ValueError("generated class images need the base model's params and the run's workdir")
            drawn = generated_class_images(config.data.prior, sd, params, config.data.class_prompt, workdir)
            class_images = images.to_unit_range(drawn)
        else:
            class_images = load_images(config.data.prior, resolution, "prior")
        class_ids = sd.tokenize([config.data.class_prompt])[0]
    return SubjectData(
        images=instance,
        input_ids=sd.tokenize([config.data.prompt])[0],
        class_images=class_images,
        class_ids=class_ids,
        prior_weight=float(config.data.prior_weight),
        flip=bool(config.data.flip),
    )


# -------------------------------------------------------------------- the stage
def _apply(compiled, state, batch, *, frozen, rng):
    """A step with the frozen trees and the run's key bound: ``(state, batch) -> (state, metrics)``."""
    return compiled(state, frozen, batch, rng)


def build_tuning(
    config: ml_collections.ConfigDict, sd: model.StableDiffusion, params, key: jax.Array, workdir: str
):
    """``(tuning, frozen trees, basis hash)`` of ``config.method`` (``adapter`` uses ``config.adapter``)."""
    method = config.method
    if method == "adapter":
        adapters_ = build.adapters(config.adapter, params)
        frozen_trees, basis_hash = build.frozen_trees(config.adapter, adapters_, key, workdir)
        return tuning_lib.AdapterTuning(adapters_), frozen_trees, basis_hash
    if method == "dreambooth":
        extra = ("text_encoder",) if config.dreambooth.train_text_encoder else ()
        return tuning_lib.DreamBoothTuning(("unet",) + extra), {}, None
    if method == "textual_inversion":
        ti = config.textual_inversion
        ids = tuning_lib.token_id(sd.tokenizer, ti.token), tuning_lib.token_id(sd.tokenizer, ti.init_token)
        return tuning_lib.TextualInversionTuning(*ids), {}, None
    raise ValueError(f"config.method={method!r}: choose from {tuning_lib.METHODS}")


def sample_grid(config, sd, params, tuning, trainable, frozen) -> np.ndarray:
    """Personal samples (top row) above the base model's (bottom row), same prompts and seeds."""
    from hdb_jax.blocks import sample

    e = config.export
    prompts = [p for p in e.sample_prompts for _ in e.sample_seeds]
    seeds = [s for _ in e.sample_prompts for s in e.sample_seeds]
    kwargs = dict(
        num_steps=e.sample_steps, guidance_scale=e.guidance_scale, batch_size=len(prompts), progress=False
    )
    personal = sample.sample(sd, tuning.merged(params, trainable, frozen), prompts, seeds, **kwargs)
    base = sample.sample(sd, params, prompts, seeds, **kwargs)
    return np.concatenate([personal, base])


@dataclasses.dataclass
class SubjectResult:
    """What :func:`train` returns: the trained state and everything a job needs to export it."""

    state: dict  # {"step", "trainable", "opt_state"} at the last step run
    losses: dict  # step -> training loss, on log steps
    workdir: str
    stopped_early: bool  # stopped by ``stop_after`` or a signal: resumable, nothing exported
    eval: dict  # the fixed-batch denoising loss: {"start", "end"}
    num_params: int  # trainable parameters
    basis_hash: str | None  # LiDB's basis file hash (None for the other tunings)
    sd: model.StableDiffusion
    params: Mapping[str, Any]  # the base weights
    tuning: Any  # the :mod:`hdb_jax.blocks.tuning` method
    frozen: dict  # frozen adapter trees (LiDB's bases)
    loop: loop.LoopResult
    written: dict = dataclasses.field(default_factory=dict)  # artefact -> path, set by the job's export


def train(
    config: ml_collections.ConfigDict, sd: model.StableDiffusion, params: Mapping[str, Any]
) -> SubjectResult:
    """Runs (or resumes) the subject training described by ``config`` on the given base model.

    Returns:
      ``{"state", "losses" (step -> loss on log steps), "workdir", "stopped_early", "eval", ...}``.
    """
    workdir = os.path.abspath(config.workdir)
    k_init, k_basis, k_train = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    data = load_subject_data(config, sd, params, workdir)  # bad images fail here, before any compile
    tuning, frozen_trees, basis_hash = build_tuning(config, sd, params, k_basis, workdir)
    trainable = tuning.init(k_init, params)
    optimizer = build.optimizer(config.optim, config.steps)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}
    frozen = {"params": params, "basis": frozen_trees}
    n_params = tuning.num_params(trainable)
    if isinstance(tuning, tuning_lib.AdapterTuning):
        where = f"{config.adapter.kind} on " + ", ".join(
            f"{c} ({len(a.targets)} layers)" for c, a in tuning.adapters.items()
        )
    else:
        where = tuning.name
    print(f"model {sd.name}; {where}: {n_params:,} trainable scalars")
    if config.print_tables:
        lidb = A.LiDB(**{k: config.adapter.lidb[k] for k in ("a", "b", "rank")})
        print("adapter parameters of this model:")
        print(table.format_rows(table.standard_rows(jax.eval_shape(lambda: params), lidb)))
        print("adapter parameters of SD 1.5 (from shapes; methods.md defaults):")
        print(table.format_rows(table.standard_rows(model.sd15_shapes().abstract_params())))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    with loop.open_run(workdir, config) as run:  # before the compile: a stop asked meanwhile is kept
        writer = run.writer
        bs = config.data.batch_size
        train_step = make_train_step(sd, tuning, optimizer)
        first = jax.tree_util.tree_map(jnp.asarray, data.batch(config.seed, 0, bs))
        compiled = loop.compile_step(train_step, state, frozen, first, k_train)

        eval_loss = make_eval_loss(sd, tuning)
        eval_images = jnp.asarray(data.images[:bs])
        eval_ids = jnp.asarray(np.stack([data.input_ids] * len(eval_images)))
        eval_key = jax.random.PRNGKey(config.seed + 1)

        def validate(st, step):
            out = {
                "scalars": {
                    "fixed_batch_loss": eval_loss(st["trainable"], frozen, eval_images, eval_ids, eval_key)
                }
            }
            if config.export.sample_prompts:
                trained = jax.device_get(st["trainable"])
                grid = sample_grid(config, sd, params, tuning, trained, jax.device_get(frozen_trees))
                out["images"] = {"samples": images.grid(grid, cols=len(grid) // 2)}
            return out

        start, state = run.restore(state, name="subject")
        evals = {"start": float(eval_loss(state["trainable"], frozen, eval_images, eval_ids, eval_key))}
        step_fn = functools.partial(_apply, compiled, frozen=frozen, rng=k_train)
        result = loop.train(
            state,
            step_fn,
            lambda s: data.batch(config.seed, s, bs),
            config,
            start=start,
            run=run,
            validate=validate,
            name="subject",
        )
        state = result.state
        evals["end"] = float(eval_loss(state["trainable"], frozen, eval_images, eval_ids, eval_key))
        writer.hparams(
            {
                "method": tuning.name,
                "adapter": config.adapter.kind,
                "steps": config.steps,
                "learning_rate": config.optim.learning_rate,
            },
            {"final/fixed_batch_loss": evals["end"]},
        )
    print(
        f"fixed-batch denoising loss: {evals['start']:.5f} at step {result.start} -> {evals['end']:.5f} "
        f"at step {result.step}"
    )
    losses = {s: h["loss"] for s, h in result.history.items()}
    with open(os.path.join(workdir, "losses.json"), "w") as f:
        json.dump(
            {
                "train": {str(k): v for k, v in losses.items()},
                "eval_start_step": result.start,
                "eval_end_step": result.step,
                "eval": evals,
            },
            f,
            indent=1,
        )
    return SubjectResult(
        state=state,
        losses=losses,
        workdir=workdir,
        stopped_early=result.stopped_early,
        eval=evals,
        num_params=n_params,
        basis_hash=basis_hash,
        sd=sd,
        params=params,
        tuning=tuning,
        frozen=frozen_trees,
        loop=result,
    )
