"""Personalise from one photo: hypernetwork prediction, rank-relaxed fast finetuning, export.

Run:
  python -m hdb_jax.personalize --config configs/personalize.py --image face.png --out runs/me \\
      --config.hypernet=runs/demo/hypernet/hypernet
  python -m hdb_jax.personalize --config configs/personalize.py:svd --image face.png --out runs/me_svd \\
      --config.model.source=/models/stable-diffusion-v1-5 --config.hypernet=/ckpt/hypernet
Knobs after ':': ``svd`` (the SVD-merge variant; default ``fresh``, the paper's).
The default base model is the toy model shipped in hdb_jax/toy/weights/base.
"""

import os

import ml_collections

from hdb_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    svd = config_lib.knobs(arg, variant=("fresh", "svd")).variant == "svd"
    from hdb_jax.toy import base_model_dir

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.source = os.fspath(base_model_dir())  # diffusers-format directory or hub id
    c.model.resolution = 0  # 0: the model's own
    c.hypernet = "runs/demo/hypernet/hypernet"  # a bundle written by hypernetwork training
    c.prompt = "a sks face"
    c.compile_cache = os.path.expanduser("~/.cache/hdb_jax/jax_compile")  # empty: no persistent cache
    c.min_image_size = 32  # shortest accepted side of the photo, pixels
    c.max_image_pixels = 64_000_000  # larger photos are refused before decoding

    c.relax = ml_collections.ConfigDict()
    c.relax.variant = "svd" if svd else "fresh"
    c.relax.rank = 4
    c.relax.alpha = 0.0  # 0: alpha = rank (LoRA scale 1)
    c.relax.steps = 25 if svd else 40
    c.relax.learning_rate = 1e-3
    c.relax.weight_decay = 0.0
    c.relax.grad_clip = 1.0
    c.relax.batch_size = 4  # augmented views of the photo per step
    c.relax.flip = False  # a mirrored face is another face (the toy faces' hair parts the other way)
    c.relax.shift = 2  # random translation, pixels
    c.relax.photos_per_program = 8  # a folder of photos is personalised this many per compiled program
    c.relax.map_batch = 1  # photos vmapped together inside a program (1: each exactly as a single run)
    return c
