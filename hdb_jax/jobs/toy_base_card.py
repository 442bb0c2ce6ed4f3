"""The toy base model's card: recipe, commands, time, losses and the toy evaluation, all from the run."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a (not trained in this invocation)" if value is None else f"{value:.{digits}f}"


def _modifier_table(info: Mapping[str, Any]) -> list[str]:
    if "modifiers" not in info:
        return ["(not evaluated: config.eval.face_seeds = 0)"]
    lines = ["| modifier | samples showing it | renders showing it |", "|---|---|---|"]
    for key, rate in info["modifiers"].items():
        lines.append(f"| {key} | {rate:.2f} | {info['render_rates'].get(key, float('nan')):.2f} |")
    return lines


def model_card(
    config: ml_collections.ConfigDict, info: Mapping[str, Any], grid_prompts: Sequence[str]
) -> str:
    """The card of the model ``config`` describes, with the figures ``info`` holds (none typed in)."""
    m, d = config.model, config.data
    side = m.resolution // 2 ** (len(m.vae_channels) - 1)
    evaluated = "precision" in info
    lines = [
        f"# Toy base model (synthetic faces, {m.resolution} px)",
        "",
        "A small Stable-Diffusion-family text-to-image model (VAE, UNet with cross-attention, CLIP text",
        "encoder, DDPM noise schedule of SD 1.5) trained from scratch on the procedural faces of",
        "`hdb_jax.toy.synthetic`. It stands in for SD 1.5 where no pretrained weights can be had, so that",
        "personalisation can be measured: it is not a general image model.",
        "",
        "Load it like any diffusers-format model: `hdb_jax.sd.loading.load_pretrained(hdb_jax.toy.base_model_dir())`.",
        "",
        "## Recipe",
        f"- Architecture: UNet channels {list(m.unet_channels)}, VAE channels {list(m.vae_channels)} (latents "
        f"{side}x{side}x4), text encoder width {m.text_width} x {m.text_layers} layers, our own BPE vocabulary.",
        f"- Data: fresh identities in every batch (ids drawn from [{d.train_ids[0]:,}, {d.train_ids[1]:,}), a new pose,"
        f" light and background each time), styles {list(d.styles)} with weights {list(d.style_weights)}; captions from"
        f" the generator's attributes, each modifier dropped w.p. {d.caption_drop}, empty caption w.p. {d.uncond_prob}."
        f" Held-out identities start at {d.heldout_start:,}.",
        f"- Phase 1: VAE autoencoder, {config.vae_steps} steps, batch {config.batch_size}, AdamW lr "
        f"{config.optim_vae.learning_rate} ({config.optim_vae.schedule}), L1 + L2 + {config.kl_weight} x KL; the latent"
        " scale is measured at the switch.",
        f"- Phase 2: UNet + text encoder, {config.unet_steps} steps, batch {config.batch_size}, AdamW lr "
        f"{config.optim_unet.learning_rate} (warmup {config.optim_unet.warmup_steps}, {config.optim_unet.schedule}), "
        f"EMA {config.ema_decay} kept; epsilon prediction. Shipped: the "
        f"{'EMA' if config.shipped_weights == 'ema' else 'trained (not the EMA)'} UNet and text encoder.",
        f"- Seed {config.seed}. Weights stored as {config.export_dtype}.",
        "",
        "## Measured (computed by the recipe's own evaluation; `training.json` has every figure)",
        f"- Steps: {info['step']} in all; this invocation ran {info['steps_run']} in {info['train_s']} s on 2 CPU cores.",
        f"- Final training loss (last logged step): VAE {_fmt(info['vae_final_loss'])}, denoiser "
        f"{_fmt(info['unet_final_loss'])}.",
        f"- Held-out denoising loss ({d.heldout_identities} unseen identities, full captions, pixels in [-1, 1], 8 fixed"
        f" draws): {info['heldout_loss']:.4f}.",
        f"- VAE reconstruction PSNR on held-out faces: {info['vae_heldout_psnr']} dB; latent scaling factor "
        f"{info['scaling_factor']:.4f}.",
    ]
    if evaluated:
        lines += [
            f'- "a face", {info["face_seeds"]} seeds, against {info["real"]} real renders of unseen identities'
            f" (k-NN, k={info['k']}, in the toy attribute classifier's feature space): precision"
            f" {info['precision']:.3f}, recall {info['recall']:.3f}; non-face samples {info['non_face_fraction']:.3f}.",
            f"- Prompt modifiers ({info['modifier_seeds']} seeds each; the attribute classifier decides):",
            "",
            *_modifier_table(info),
        ]
    lines += [
        "",
        "## Samples",
        "",
        "![samples](samples.png)",
        "",
        f"`samples.png`: rows are the prompts below, columns seeds 0-{config.grid_seeds - 1} (DDIM {config.sample_steps}"
        f" steps, guidance {config.guidance_scale}).",
        "",
        *[f'{i + 1}. "{p}"' for i, p in enumerate(grid_prompts)],
        "",
        "## Reproduce",
        "```",
        "python -m hdb_jax.train --config configs/base_toy.py",
        "```",
        "Rerunning the command after an interruption resumes from the latest checkpoint in `runs/base_toy/`;",
        "`--config.stop_after=N` time-slices it. The learning rate is constant after warmup, so",
        "`--config.unet_steps` can be raised and the run continued without a schedule restart.",
        "",
    ]
    return "\n".join(lines)
