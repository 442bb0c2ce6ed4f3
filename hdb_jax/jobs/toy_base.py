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

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hdb_jax.blocks import build, diffusion, loop
from hdb_jax.common import images
from hdb_jax.sd import loading, model
from hdb_jax.toy import synthetic
from hdb_jax.toy.base_model import FreshFaces, build_model, make_unet_step, make_vae_step, toy_caption

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


# -------------------------------------------------------------------- the job
def _latent_scale(sd: model.StableDiffusion, vae_params, images: np.ndarray) -> float:
    """1 / std of the VAE's latent means of ``images`` (float NHWC in [-1, 1])."""
    pixels = jnp.transpose(jnp.asarray(images), (0, 3, 1, 2))
    mean = sd.vae.apply({"params": vae_params}, pixels, method=sd.vae.encode).latent_dist.mean
    return float(1.0 / jnp.std(mean))


def _init_state(sd, key, vae_opt, unet_opt) -> dict:
    params = sd.random_params(key)
    denoiser = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
    # The shared state vocabulary, with the two phases' trees side by side, plus the EMA of the
    # denoiser and the latent scale measured at the phase switch.
    return {
        "step": jnp.zeros((), jnp.int32),
        "trainable": {"vae": params["vae"], "denoiser": denoiser},
        "opt_state": {"vae": vae_opt.init(params["vae"]), "denoiser": unet_opt.init(denoiser)},
        "ema": jax.tree_util.tree_map(jnp.copy, denoiser),
        "scaling_factor": jnp.asarray(sd.scaling_factor, jnp.float32),
    }


def _grid_prompts_and_seeds(seeds: int) -> tuple[list[str], list[int]]:
    return [p for p in GRID_PROMPTS for _ in range(seeds)], list(range(seeds)) * len(GRID_PROMPTS)


def sample_grid(
    config: ml_collections.ConfigDict, sd: model.StableDiffusion, params, seeds: int
) -> np.ndarray:
    """uint8 samples of every :data:`GRID_PROMPTS` row x ``seeds`` seeds, prompt-major."""
    from hdb_jax.blocks import sample

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
    with loop.open_run(workdir, c) as run_dir:
        start, state = run_dir.restore(state, name="toy base")
        batch_fn = lambda step: data.batch(step, c.batch_size, sd.tokenize)  # noqa: E731
        budget = c.stop_after
        if start < c.vae_steps:
            vae_step = make_vae_step(sd, vae_opt, c.kl_weight)
            vae_step = loop.compile_step(vae_step, state, batch_fn(start)["images"], k_train, name="VAE step")
            run = loop.train(
                state,
                lambda st, b: vae_step(st, b["images"], k_train),
                batch_fn,
                c,
                start=start,
                run=run_dir,
                steps=c.vae_steps,
                stop_after=budget,
                name="toy base (VAE)",
                prefix="vae/",
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
                c.latent_std_target * _latent_scale(sd, state["trainable"]["vae"], calibration), jnp.float32
            )
        sd = build_model(c, float(state["scaling_factor"]))
        unet_step = make_unet_step(sd, unet_opt, c.ema_decay)
        unet_step = loop.compile_step(
            unet_step, state, batch_fn(max(start, c.vae_steps)), k_train, name="UNet step"
        )
        grid_seeds = c.validate_seeds

        def validate(st, step):
            grid = sample_grid(c, sd, final_params(jax.device_get(st), c.shipped_weights), grid_seeds)
            return {"images": {"samples": images.grid(grid, cols=grid_seeds * 7)}}

        run = loop.train(
            state,
            lambda st, b: unet_step(st, b, k_train),
            batch_fn,
            c,
            start=max(start, c.vae_steps),
            run=run_dir,
            steps=total,
            stop_after=budget,
            validate=validate if c.validate_every else None,
            name="toy base (UNet)",
            prefix="unet/",
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
    trained = state["trainable"]
    return {"vae": trained["vae"], **(state["ema"] if which == "ema" else trained["denoiser"])}


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
    from hdb_jax.jobs import toy_base_card as base_card

    # Every figure is measured on the weights as shipped (rounded to the export dtype), so anyone
    # can reproduce it from the files.
    dtype = jnp.float16 if config.export_dtype == "float16" else jnp.float32
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, dtype).astype(jnp.float32),
        final_params(jax.device_get(state), config.shipped_weights),
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
        from hdb_jax.blocks import sample
        from hdb_jax.toy import evaluator as toy_eval

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
