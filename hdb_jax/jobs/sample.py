"""Sampling from the command line: every prompt with every seed, as PNGs and one grid.

Command line::

    python -m hdb_jax.sample --model tiny --prompt "a photo of sks face" --seeds 0,1,2 \
        --scheduler ddim --steps 25 --guidance 7.5 --out runs/samples [--weights PATH [--basis FILE]]

It writes ``p{prompt index}_s{seed}.png`` for every prompt x seed and ``grid.png`` (one row per
prompt, one column per seed).
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from hdb_jax.blocks.sample import SCHEDULERS, LagSpec, lag_token_ids, sample
from hdb_jax.common.images import save_grid, save_images
from hdb_jax.sd.model import StableDiffusion


def _seeds(text: str) -> str:
    if not all(s.strip().lstrip("-").isdigit() for s in text.split(",") if s.strip()):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return text


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hdb_jax.sample", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' or a diffusers-format directory / hub id")
    p.add_argument("--prompt", action="append", required=True, help="repeatable; each prompt x each seed")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seeds", default="0", type=_seeds, help="comma-separated integers")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--weights", default=None, help="personal weights written by hdb_jax.formats.lora")
    p.add_argument("--basis", default=None, help="LiDB basis file the --weights were trained with")
    p.add_argument(
        "--lag",
        default="",
        help="V* and class word, e.g. 'sks,face': sample Personalized Residual --weights with "
        "localized attention guidance",
    )
    p.add_argument("--out", default="runs/samples")
    return p.parse_args(argv)


def load_model(source: str) -> tuple[StableDiffusion, dict]:
    """``tiny`` (the tiny random model, :func:`hdb_jax.blocks.build.base_model`) or a diffusers-format directory."""
    from hdb_jax.blocks import build

    return build.base_model({"source": source, "resolution": 32})


def main(argv=None) -> list[Path]:
    """Entry point: samples every prompt with every seed, writes PNGs and ``grid.png``."""
    args = _parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise SystemExit("--seeds is empty")
    if args.lag and not args.weights:
        raise SystemExit("--lag samples personal residuals: give their --weights file")
    sd, params = load_model(args.model)
    lag = None
    if args.weights:
        from hdb_jax import adapters
        from hdb_jax.formats import personal

        try:
            loaded = personal.load_for_model(args.weights, params, args.basis)
        except personal.PersonalWeightsError as err:
            raise SystemExit(f"error: {err}") from err
        if args.lag:
            ads, trees, frozen = loaded
            if set(ads) != {"unet"} or not isinstance(ads["unet"].kind, adapters.Residual):
                kinds = {c: type(a.kind).__name__ for c, a in ads.items()}
                raise SystemExit(
                    f"error: --lag needs Personalized Residuals on the UNet; {args.weights} holds {kinds}"
                )
            try:
                tokens = lag_token_ids(sd, [w.strip() for w in args.lag.split(",") if w.strip()])
            except ValueError as err:
                raise SystemExit(f"error: --lag: {err}") from err
            lag = (LagSpec(ads["unet"], tokens), trees["unet"], frozen.get("unet", {}))
        else:
            params = adapters.merge_all(params, *loaded)
    pairs = list(itertools.product(range(len(args.prompt)), seeds))  # prompt-major
    images = sample(
        sd,
        params,
        [args.prompt[i] for i, _ in pairs],
        [s for _, s in pairs],
        negative_prompt=args.negative_prompt,
        scheduler=args.scheduler,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        batch_size=args.batch_size,
        resolution=args.resolution,
        lag=lag,
    )
    out = Path(args.out)
    paths = save_images(images, out, [f"p{i}_s{s}" for i, s in pairs])
    paths.append(save_grid(images, out / "grid.png", cols=len(seeds)))
    print(f"wrote {len(images)} images and {paths[-1]}")
    return paths
