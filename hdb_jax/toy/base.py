"""The toy base model: a small SD-family text-to-image model trained from scratch on synthetic faces.

The job behind ``python -m hdb_jax.train --config configs/base_toy.py``. Two phases share one
step counter, one Orbax checkpoint and one progress bar:

1. ``vae_steps`` steps train the VAE as an autoencoder (L1 + L2 reconstruction + a small KL
   term). At the switch the latent scale is measured and stored as the VAE's
   ``scaling_factor`` (so scaled latents have unit variance, as SD's 0.18215 does for its VAE);
2. ``unet_steps`` steps train the UNet and the text encoder with the denoising loss on the frozen
   VAE's latents, keeping an exponential moving average (EMA) of their weights.

Captions come from the generator's attributes (style, accessories, background colour); each part
is dropped at random and a fraction of captions is empty, so short prompts such as "a face" and
classifier-free guidance both work. Batches are a pure function of ``(seed, step)``; a killed run
resumes from its latest checkpoint by rerunning the same command. At the end the EMA weights are
written as a diffusers-format directory with a sample grid and a model card.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdb_jax import build, checkpoint, diffusion, images, loop, metrics
from hdb_jax.data import synthetic
from hdb_jax.sd import loading, model
from hdb_jax.sd import tiny as tiny_lib

# Rows of the model card's sample grid: prompts whose modifiers should visibly change the image.
GRID_PROMPTS = (
    "a face",
    "a photo of a face on a red background",
    "a photo of a face on a blue background",
    "a photo of a face with glasses",
    "a photo of a face wearing a hat",
    "a cartoon of a face",
    "a sketch of a face",
)


CALIBRATION_STEP = 2**31  # the batch the latent scale is measured on: a step no run reaches


# -------------------------------------------------------------------- model and data
def build_model(
    config: ml_collections.ConfigDict, scaling_factor: float | None = None
) -> model.StableDiffusion:
    """The toy architecture of ``config.model``; ``scaling_factor`` overrides the VAE's."""
    m = config.model
    sd = tiny_lib.tiny(
        resolution=m.resolution,
        unet_channels=tuple(m.unet_channels),
        vae_channels=tuple(m.vae_channels),
        text_width=m.text_width,
        text_layers=m.text_layers,
    )
    if scaling_factor is None:
        return sd
    configs = {k: dict(v) for k, v in sd.configs.items()}
    configs["vae"]["scaling_factor"] = float(scaling_factor)
    return model.StableDiffusion.from_configs(configs, sd.tokenizer, name="toy")


def toy_caption(
    ident: synthetic.FaceIdentity, var: synthetic.Variation, rng: np.random.Generator, drop: float
) -> str:
    """A caption of the image with each modifier (style, accessories, background) kept w.p. 1 - drop."""
    keep = lambda: rng.random() >= drop  # noqa: E731
    words = [f"{'an' if var.style[0] in 'aeiou' else 'a'} {var.style} of a face" if keep() else "a face"]
    extras = [w for w, has in (("glasses", ident.glasses), ("earrings", ident.earrings)) if has and keep()]
    if extras:
        words.append("with " + " and ".join(extras))
    if ident.hat and keep():
        words.append("wearing a hat")
    if var.style != "sketch" and keep():
        words.append(f"on {'an' if var.background[0] in 'aeiou' else 'a'} {var.background} background")
    return " ".join(words)


@dataclasses.dataclass(frozen=True)
class FreshFaces:
    """An endless stream of synthetic faces: every batch draws identities it has never drawn.

    Batch ``step`` is a pure function of ``(stream_seed, step)``: identity ids uniform in
    ``[id_range[0], id_range[1])`` (a range of a million ids or more, so repeats are rare), image
    indices (pose, lighting, background) uniform in ``[0, 2**30)``, styles drawn with
    ``style_weights``, captions from the generator's attributes with each modifier dropped w.p.
    ``caption_drop`` and an empty caption w.p. ``uncond_prob``.
    """

    id_range: tuple[int, int]
    resolution: int
    styles: tuple[str, ...]
    style_weights: tuple[float, ...]
    world_seed: int  # the synthetic world's seed: which face an identity id is
    stream_seed: int  # which faces a step draws
    caption_drop: float
    uncond_prob: float

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "FreshFaces":
        d = config.data
        return cls(
            tuple(d.train_ids),
            config.model.resolution,
            tuple(d.styles),
            tuple(d.style_weights),
            d.seed,
            d.stream_seed,
            d.caption_drop,
            d.uncond_prob,
        )

    def draw(
        self, step: int, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray, list[str], np.random.Generator]:
        """Identity ids [B], image indices [B] and styles of batch ``step``, plus its caption rng."""
        rng = np.random.default_rng([self.stream_seed, 11, step])
        ids = rng.integers(self.id_range[0], self.id_range[1], batch_size)
        indices = rng.integers(0, 2**30, batch_size)
        weights = np.asarray(self.style_weights, np.float64)
        styles = [self.styles[k] for k in rng.choice(len(self.styles), batch_size, p=weights / weights.sum())]
        return ids, indices, styles, rng

    def batch(self, step: int, batch_size: int, tokenize) -> dict[str, np.ndarray]:
        """``{"images": float32 [B, H, W, 3] in [-1, 1], "input_ids": int32 [B, L]}`` of batch ``step``."""
        ids, indices, styles, rng = self.draw(step, batch_size)
        pixels = synthetic.render_batch(ids, indices, styles, self.world_seed, self.resolution)
        captions = []
        for i, j, style in zip(ids, indices, styles):
            ident, var = (
                synthetic.identity(int(i), self.world_seed),
                synthetic.variation(int(i), int(j), self.world_seed, style),
            )
            captions.append(
                "" if rng.random() < self.uncond_prob else toy_caption(ident, var, rng, self.caption_drop)
            )
        return {"images": images.to_unit_range(pixels), "input_ids": np.asarray(tokenize(captions), np.int32)}


# -------------------------------------------------------------------- losses and steps
def vae_loss(sd: model.StableDiffusion, vae_params, images: jax.Array, key: jax.Array, kl_weight: float):
    """L1 + L2 reconstruction of NHWC images in [-1, 1] plus ``kl_weight`` · KL to N(0, I)."""
    pixels = jnp.transpose(images, (0, 3, 1, 2))
    dist = sd.vae.apply({"params": vae_params}, pixels, method=sd.vae.encode).latent_dist
    z = dist.sample(key)  # [B, h, w, C]
    recon = sd.vae.apply({"params": vae_params}, z, method=sd.vae.decode).sample  # [B, 3, H, W]
    err = recon - pixels
    kl = 0.5 * jnp.mean(jnp.square(dist.mean) + dist.var - 1.0 - dist.logvar)
    recon_loss = jnp.mean(jnp.abs(err)) + jnp.mean(jnp.square(err))
    return recon_loss + kl_weight * kl, {"recon": jnp.mean(jnp.square(err)), "kl": kl}


def make_vae_step(sd: model.StableDiffusion, optimizer, kl_weight: float):
    """Jitted ``step(state, images, rng) -> (state, metrics)`` over ``state["vae"]``; donated."""

    def step(state, images, rng):
        key = jax.random.fold_in(rng, state["step"])
        (loss, aux), grads = jax.value_and_grad(vae_loss, argnums=1, has_aux=True)(
            sd, state["vae"], images, key, kl_weight
        )
        updates, opt = optimizer.update(grads, state["vae_opt"], state["vae"])
        new = {
            **state,
            "step": state["step"] + 1,
            "vae": optax.apply_updates(state["vae"], updates),
            "vae_opt": opt,
        }
        return new, {"loss": loss, **aux}

    return jax.jit(step, donate_argnums=(0,))


def make_unet_step(sd: model.StableDiffusion, optimizer, ema_decay: float):
    """Jitted ``step(state, batch, rng) -> (state, metrics)`` over UNet + text encoder; donated."""
    sched = sd.noise_scheduler.create_state()

    def loss_fn(trainable, vae, batch, key):
        return diffusion.denoising_loss(
            sd, sched, {**trainable, "vae": vae}, batch["images"], batch["input_ids"], key
        )

    def step(state, batch, rng):
        key = jax.random.fold_in(rng, state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["denoiser"], state["vae"], batch, key)
        updates, opt = optimizer.update(grads, state["denoiser_opt"], state["denoiser"])
        denoiser = optax.apply_updates(state["denoiser"], updates)
        ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state["ema"], denoiser)
        new = {**state, "step": state["step"] + 1, "denoiser": denoiser, "denoiser_opt": opt, "ema": ema}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0,))


# -------------------------------------------------------------------- the job
def _latent_scale(sd: model.StableDiffusion, vae_params, images: np.ndarray) -> float:
    """1 / std of the VAE's latent means of ``images`` (float NHWC in [-1, 1])."""
    pixels = jnp.transpose(jnp.asarray(images), (0, 3, 1, 2))
    mean = sd.vae.apply({"params": vae_params}, pixels, method=sd.vae.encode).latent_dist.mean
    return float(1.0 / jnp.std(mean))


def _init_state(sd, key, vae_opt, unet_opt) -> dict:
    params = sd.random_params(key)
    denoiser = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    return {
        "step": jnp.zeros((), jnp.int32),
        "vae": params["vae"],
        "vae_opt": vae_opt.init(params["vae"]),
        "denoiser": denoiser,
        "denoiser_opt": unet_opt.init(denoiser),
        "ema": jax.tree_util.tree_map(jnp.copy, denoiser),
        "scaling_factor": jnp.asarray(sd.scaling_factor, jnp.float32),
    }


def _grid_prompts_and_seeds(seeds: int) -> tuple[list[str], list[int]]:
    return [p for p in GRID_PROMPTS for _ in range(seeds)], list(range(seeds)) * len(GRID_PROMPTS)


def sample_grid(
    config: ml_collections.ConfigDict, sd: model.StableDiffusion, params, seeds: int
) -> np.ndarray:
    """uint8 samples of every :data:`GRID_PROMPTS` row x ``seeds`` seeds, prompt-major."""
    from hdb_jax import sample

    prompts, seed_list = _grid_prompts_and_seeds(seeds)
    return sample.sample(
        sd,
        params,
        prompts,
        seed_list,
        num_steps=config.sample_steps,
        guidance_scale=config.guidance_scale,
        batch_size=seeds,
        progress=False,
    )


def train(config: ml_collections.ConfigDict) -> dict:
    """Trains (or resumes) the toy base model; returns losses, timings and the final state.

    Phase 1 (VAE) and phase 2 (UNet + text encoder) are two runs of the shared loop over one
    step counter and one checkpoint directory; the latent scale is measured at the switch.
    """
    c = config
    total = c.vae_steps + c.unet_steps
    sd = build_model(c)
    vae_opt, unet_opt = build.optimizer(c.optim_vae, c.vae_steps), build.optimizer(c.optim_unet, c.unet_steps)
    k_init, k_train = jax.random.split(jax.random.PRNGKey(c.seed))
    data = FreshFaces.from_config(c)
    workdir = Path(c.workdir).absolute()
    state = _init_state(sd, k_init, vae_opt, unet_opt)
    history: dict[str, dict[int, float]] = {"vae": {}, "unet": {}}
    runs = []
    with (
        checkpoint.Checkpointer(workdir / "checkpoints", every=c.checkpoint_every) as ckpt,
        metrics.Writer(workdir / "tb") as writer,
    ):
        start, state = loop.restore(ckpt, state, name="toy base")
        batch_fn = lambda step: data.batch(step, c.batch_size, sd.tokenize)  # noqa: E731
        common = dict(checkpointer=ckpt, writer=writer, config=c.to_dict(), log_every=c.log_every)
        budget = c.stop_after
        if start < c.vae_steps:
            vae_step = make_vae_step(sd, vae_opt, c.kl_weight)
            run = loop.train(
                state,
                lambda st, b: vae_step(st, b["images"], k_train),
                batch_fn,
                steps=c.vae_steps,
                stop_after=budget,
                name="toy base (VAE)",
                prefix="vae/",
                start=start,
                **common,
            )
            runs.append(run)
            history["vae"] = {s: h["loss"] for s, h in run.history.items()}
            state = run.state
            budget = max(budget - run.steps_run, 0) if budget else 0
            if run.stopped_early or (c.stop_after and not budget):
                return _result(c, sd, state, history, runs, run.step, done=False, workdir=workdir)
        if start <= c.vae_steps:  # the switch: measure the latent scale once, keep it in the state
            calibration = data.batch(CALIBRATION_STEP, 256, sd.tokenize)["images"]
            state["scaling_factor"] = jnp.asarray(
                c.latent_std_target * _latent_scale(sd, state["vae"], calibration), jnp.float32
            )
        sd = build_model(c, float(state["scaling_factor"]))
        unet_step = make_unet_step(sd, unet_opt, c.ema_decay)
        grid_seeds = c.get("validate_seeds", 2)

        def validate(st, step):
            grid = sample_grid(
                c, sd, final_params(jax.device_get(st), c.get("shipped_weights", "trained")), grid_seeds
            )
            return {"images": {"samples": images.grid(grid, cols=grid_seeds * 7)}}

        run = loop.train(
            state,
            lambda st, b: unet_step(st, b, k_train),
            batch_fn,
            steps=total,
            stop_after=budget,
            validate=validate if c.get("validate_every", 0) else None,
            validate_every=c.get("validate_every", 0),
            name="toy base (UNet)",
            prefix="unet/",
            start=max(start, c.vae_steps),
            **common,
        )
        runs.append(run)
        history["unet"] = {s: h["loss"] for s, h in run.history.items()}
    return _result(
        c,
        sd,
        run.state,
        history,
        runs,
        run.step,
        done=not run.stopped_early and run.step >= total,
        workdir=workdir,
    )


def _result(config, sd, state, history, runs, step, *, done: bool, workdir) -> dict:
    result = {
        "state": state,
        "history": history,
        "steps_run": sum(r.steps_run for r in runs),
        "step": step,
        "sd": sd,
        "train_s": sum(r.seconds for r in runs),
        "workdir": os.fspath(workdir),
    }
    if done:
        result.update(finish(config, sd, state, result))
    return result


def final_params(state: Mapping[str, Any], which: str = "trained") -> dict:
    """The shipped parameters: the trained VAE with the UNet and text encoder as trained, or their EMA."""
    if which not in ("trained", "ema"):
        raise ValueError(f"config.shipped_weights={which!r}: choose 'trained' or 'ema'")
    return {"vae": state["vae"], **(state["ema"] if which == "ema" else state["denoiser"])}


def heldout_set(
    config: ml_collections.ConfigDict, sd: model.StableDiffusion
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out identities' images (float NHWC in [-1, 1]) and their full captions (token ids)."""
    d = config.data
    ids = list(range(d.heldout_start, d.heldout_start + d.heldout_identities))
    styles = [d.styles[k % len(d.styles)] for k in range(len(ids))]
    pixels = synthetic.render_batch(ids, [0] * len(ids), styles, d.seed, config.model.resolution)
    captions = [
        toy_caption(
            synthetic.identity(i, d.seed), synthetic.variation(i, 0, d.seed, s), np.random.default_rng(0), 0.0
        )
        for i, s in zip(ids, styles)
    ]
    return images.to_unit_range(pixels), np.asarray(sd.tokenize(captions), np.int32)


def finish(
    config: ml_collections.ConfigDict, sd: model.StableDiffusion, state, result: Mapping[str, Any]
) -> dict:
    """Held-out loss, the toy evaluation, export of the shipped weights, sample grid and model card."""
    from hdb_jax.toy import base_card

    # Every figure is measured on the weights as shipped (rounded to the export dtype), so anyone
    # can reproduce it from the files.
    dtype = jnp.float16 if config.export_dtype == "float16" else jnp.float32
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, dtype).astype(jnp.float32),
        final_params(jax.device_get(state), config.get("shipped_weights", "trained")),
    )
    pixels, ids = heldout_set(config, sd)
    heldout = float(
        diffusion.make_heldout_loss(sd, 8)(
            params, jnp.asarray(pixels), jnp.asarray(ids), jax.random.PRNGKey(config.seed + 1)
        )
    )
    recon = images.to_uint8(
        sd.decode_latents(params["vae"], sd.encode_images(params["vae"], jnp.asarray(pixels[:8])))
    )
    info = {
        "heldout_loss": heldout,
        "vae_final_loss": _last(result["history"]["vae"]),
        "unet_final_loss": _last(result["history"]["unet"]),
        "scaling_factor": float(state["scaling_factor"]),
        "train_s": round(result["train_s"], 1),
        "steps_run": result["steps_run"],
        "step": result["step"],
        "vae_heldout_psnr": round(_psnr(images.to_uint8(pixels[:8]), recon), 2),
    }
    if config.eval.face_seeds:
        from hdb_jax import sample
        from hdb_jax.eval import toy as toy_eval

        def draw(prompts, seeds):
            return sample.sample(
                sd,
                params,
                prompts,
                seeds,
                num_steps=config.sample_steps,
                guidance_scale=config.guidance_scale,
                batch_size=32,
                progress=False,
            )

        info.update(
            toy_eval.evaluate_base(
                toy_eval.ToyEvaluator.load(),
                draw,
                face_seeds=config.eval.face_seeds,
                modifier_seeds=config.eval.modifier_seeds,
            )
        )
    print("toy base model: " + json.dumps({k: v for k, v in info.items() if not isinstance(v, dict)}))
    if jax.process_index() != 0 or not config.out_dir:
        return info
    out = Path(config.out_dir)
    loading.save_pretrained(out, sd, params, dtype=dtype)
    images.save_grid(
        sample_grid(config, sd, params, config.grid_seeds), out / "samples.png", cols=config.grid_seeds
    )
    (out / "training.json").write_text(
        json.dumps({**info, "history": result["history"], "config": config.to_dict()}, indent=1, default=str)
    )
    (out / "MODEL_CARD.md").write_text(base_card.model_card(config, info, GRID_PROMPTS))
    return {**info, "out_dir": os.fspath(out)}


def _last(history: Mapping[int, float]) -> float | None:
    return history[max(history)] if history else None


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)))
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def run(config: ml_collections.ConfigDict) -> dict:
    """``python -m hdb_jax.train`` entry point (``config.job = "base_toy"``)."""
    return train(config)
