"""Stage 2: train the HyperDreamBooth hypernetwork (image -> LiDB weights), sharded.

Run:
  python -m hdb_jax.train --config configs/hypernet.py:tiny
  python -m hdb_jax.train --config configs/hypernet.py:tiny --config.data.preopt_dir=runs/preopt
  python -m hdb_jax.train --config configs/hypernet.py:sd15 --config.model.source=/models/sd15 \\
      --config.net.encoder_path=/models/clip-vit-h-14 --config.data.preopt_dir=/data/preopt \\
      --config.mesh.data=-1 --config.mesh.fsdp=4
  python -m hdb_jax.train --config configs/hypernet.py:sd15 --config.dry_run=True   # shapes only
Knobs: ``tiny`` (default: the random tiny model), ``toy`` (the shipped toy base model: the recipe of
the shipped hypernetwork bundle, trained on stage 1's ``configs/preopt.py:toy`` targets) or ``sd15``. See launch/ for TPU pods, GPU hosts and SLURM.
"""

import ml_collections

from hdb_jax.jobs import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    k = config_lib.knobs(arg, size=config_lib.SIZES)
    sd15, toy = k.size == "sd15", k.size == "toy"
    c = ml_collections.ConfigDict()
    c.job = "hypernet"
    c.seed = 0
    c.workdir = "runs/hypernet"
    c.dry_run = False
    c.model = config_lib.model(k.size)
    c.adapter = config_lib.adapter("lidb", k.size)
    c.update(
        config_lib.loop(
            50_000 if sd15 else 1300 if toy else 40,
            log_every=50 if sd15 or toy else 5,
            checkpoint_every=1000 if sd15 else 250 if toy else 20,
        )
    )
    c.batch_size = 64 if sd15 else 16 if toy else 8  # global; a multiple of the device count
    c.validate_every = 500 if toy else 0  # held-out references and their predicted samples in TensorBoard
    c.validate_sample_steps = 20  # sampler steps of those samples

    c.net = ml_collections.ConfigDict()
    c.net.encoder = "sd15" if sd15 else "toy_identity" if toy else "tiny"  # CLIP ViT-H/14, the toy identity
    # encoder (frozen, trained to tell faces apart: the toy world's pretrained ViT), or a tiny random CLIP
    c.net.encoder_path = ""  # local CLIP vision directory (sd15) or identity encoder folder (toy_identity)
    c.net.train_encoder = False
    # toy: 1 iteration learned faster than 4 and runs 3.5x faster (methods.md, "Lessons").
    c.net.iterations = 1 if toy else 4
    c.net.mode = "cross"  # or "concat" (the paper's concatenation)
    c.net.num_blocks = 4
    c.net.num_heads = 2
    c.net.width = 256 if toy else 0  # 0: 2 x token width (toy tokens are 256 wide)
    # Start from a learned per-token offset set to the targets' mean (no saddle at step 0).
    c.net.offset = toy

    # beta weighs the squared-norm weight distance (sum over layers); it acts only with targets.
    # regress_only_steps: the first steps fit the targets only (no UNet is run), then both terms
    # train together. toy: the shipped bundle fitted its 152 targets for 800 steps (held-out
    # denoising loss then 0.0589, worse than the base model's 0.0554), then trained 500 more with
    # the denoising term on and half of every batch fresh identities (0.0550): see its card, which
    # lists the two phases (one resumed run) and their commands.
    # space: where the weight distance is measured, "dw" (dense updates, factorisation-invariant) or
    # "factor" (the LiDB factors; needs stage-1 targets that share one init, see methods.md).
    c.loss = ml_collections.ConfigDict(
        dict(alpha=1.0, beta=0.02, regress_only_steps=800 if toy else 0, space="factor" if toy else "dw")
    )
    c.optim = config_lib.optim(
        1e-4 if sd15 else 3e-3 if toy else 1e-3,
        warmup_steps=1000 if sd15 else 100 if toy else 4,
        schedule="cosine",
    )

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.prompt = "a photo of sks face" if sd15 else "a sks face"
    c.data.preopt_dir = ""  # stage-1 weights dataset; empty: no targets (beta term off)
    c.data.max_identities = 0  # > 0: train on the dataset's first N identities only
    c.data.identities = tuple(range(100, 116))  # used when preopt_dir is empty
    c.data.images_per_identity = 8 if toy else 4
    c.data.denoise_on = "same"  # the UNet denoises the image the hypernetwork saw (paper) or "other" views
    c.data.seed = 0
    # Rows of every batch that are fresh synthetic identities (no stage-1 target): only the
    # denoising term (alpha) trains on them, on another view than the one the hypernetwork saw.
    c.data.fresh_per_batch = 8 if toy else 0
    c.data.heldout = tuple(range(3_100_000, 3_100_032)) if toy else tuple(range(900, 904))  # never trained on
    c.data.heldout_views = 3  # the held-out loss is measured on views 1..3, the hypernetwork sees view 0
    c.data.heldout_preopt_dir = ""  # targets of held-out identities: R^2 on them
    c.data.target_probe = ""  # probe.json of configs/probe.py on stage 1's recipe: recorded in the card
    c.data.r2_subset = 256  # training identities the training R^2 is measured on

    c.mesh = config_lib.mesh()
    c.sharding_rules = ((r".*kernel", "fsdp"), (r".*embedding", "fsdp"))
    c.distributed = config_lib.distributed()
    return c
