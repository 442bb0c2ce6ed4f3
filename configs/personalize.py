"""Personalise from one photo: hypernetwork prediction, rank-relaxed fast finetuning, export.

Run:
  python -m hdb_jax.personalize --config configs/personalize.py --image face.png --out runs/me \\
      --config.bundle=runs/demo/hypernet/hypernet   # a bundle of configs/demo.py:retrain
  python -m hdb_jax.personalize --config configs/personalize.py:svd --image face.png --out runs/me_svd \\
      --config.model.source=/models/stable-diffusion-v1-5 --config.bundle=/ckpt/hypernet
Knobs after ':': ``svd`` (the SVD-merge variant; default ``fresh``, the paper's).
The defaults (``hdb_jax.stages.personalize.default_config``) are the toy model and hypernetwork shipped in
hdb_jax/toy/weights/.
"""

import ml_collections

from hdb_jax.jobs import config_lib
from hdb_jax.stages.personalize import default_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_lib.knobs(arg, variant=("fresh", "svd")).variant
    return default_config(variant)
