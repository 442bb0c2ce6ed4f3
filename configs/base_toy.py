"""Train the toy world's base model: a small SD-family text-to-image model on synthetic faces.

Run (writes hdb_jax/toy/weights/base/ with its model card and sample grid):
  python -m hdb_jax.train --config configs/base_toy.py
  python -m hdb_jax.train --config configs/base_toy.py:reduced --config.workdir=/tmp/toy --config.out_dir=
Knobs after ':': ``reduced`` (a few steps of a smaller run, for tests). Rerunning the same command
resumes from the latest checkpoint in ``workdir``.
"""

import ml_collections

from hdb_jax.jobs import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    reduced = config_lib.knobs(arg, reduced=False).reduced
    c = ml_collections.ConfigDict()
    c.job = "base_toy"
    c.seed = 0
    c.workdir = "runs/base_toy"
    c.out_dir = "hdb_jax/toy/weights/base"  # where the trained model is written; empty: nowhere
    c.export_dtype = "float16"

    c.model = ml_collections.ConfigDict()
    c.model.resolution = 32
    c.model.unet_channels = (32, 64) if reduced else (64, 128, 128)
    c.model.vae_channels = (32, 64)
    c.model.text_width = 32 if reduced else 64
    c.model.text_layers = 2 if reduced else 4

    c.data = ml_collections.ConfigDict()
    c.data.train_ids = (0, 1_000_000)  # every batch draws fresh identities from this range
    c.data.styles = ("photo", "cartoon", "sketch")
    c.data.style_weights = (0.5, 0.25, 0.25)
    c.data.caption_drop = 0.3  # each caption modifier is dropped with this probability
    c.data.uncond_prob = 0.1  # empty captions, for classifier-free guidance
    c.data.seed = 0  # the synthetic world
    c.data.stream_seed = 0  # which faces each step draws
    c.data.heldout_start = 5_000_000  # identities no toy-world model trains on
    c.data.heldout_identities = 8 if reduced else 64

    c.vae_steps = 6 if reduced else 2000
    c.unet_steps = 10 if reduced else 40_000
    c.batch_size = 8 if reduced else 32
    c.kl_weight = 1e-4
    c.latent_std_target = 1.0
    c.ema_decay = 0.0 if reduced else 0.999
    # What ships: "trained" (the UNet and text encoder as trained) or "ema". At 2000 UNet steps
    # the 0.999 EMA still averages in early, blurry weights: its "a face" samples had precision
    # 0.80, recall 0.17 and 34% non-faces (the card of the trained weights has their numbers).
    c.shipped_weights = "trained"
    c.optim_vae = config_lib.optim(
        2e-3, weight_decay=0.0, warmup_steps=2 if reduced else 100, schedule="cosine", final_lr_fraction=0.05
    )
    # Constant after warmup: the run can be extended without a schedule restart.
    c.optim_unet = config_lib.optim(5e-4, weight_decay=1e-2, warmup_steps=2 if reduced else 500)
    c.stop_after = 0  # >0: save and stop after this many steps in one invocation (time-sliced jobs)
    c.log_every = 2 if reduced else 50
    c.checkpoint_every = 5 if reduced else 500
    c.validate_every = 0 if reduced else 2000  # a sample grid in TensorBoard (0: none)
    c.validate_seeds = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.face_seeds = 0 if reduced else 256  # "a face" samples for precision / recall / non-face (0: skip)
    c.eval.modifier_seeds = 32  # samples per prompt modifier
    c.grid_seeds = 6
    c.sample_steps = 25
    c.guidance_scale = 3.0
    return c
