"""Stage 2: train the HyperDreamBooth hypernetwork (image -> LiDB weights), sharded.

Run:
  python -m hdb_jax.train --config configs/hypernet.py:tiny
  python -m hdb_jax.train --config configs/hypernet.py:tiny --config.data.preopt_dir=runs/preopt
  python -m hdb_jax.train --config configs/hypernet.py:sd15 --config.model.source=/models/sd15 \\
      --config.hypernet.encoder_path=/models/clip-vit-h-14 --config.data.preopt_dir=/data/preopt \\
      --config.mesh.data=-1 --config.mesh.fsdp=4
  python -m hdb_jax.train --config configs/hypernet.py:sd15 --config.dry_run=True   # shapes only
Knobs: ``tiny`` (default) or ``sd15``. See launch/ for TPU pods, GPU hosts and SLURM.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from subject import get_config as subject_config, parse_knobs  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    knobs = parse_knobs(arg, {"tiny", "sd15"})
    sd15 = "sd15" in knobs
    c = subject_config("sd15,adapter=lidb" if sd15 else "tiny,adapter=lidb")
    c.job = "hypernet"
    c.workdir = "runs/hypernet"
    c.dry_run = False
    c.steps = 50_000 if sd15 else 40
    c.batch_size = 64 if sd15 else 8  # global; a multiple of the device count
    c.log_every = 50 if sd15 else 5
    c.checkpoint_every = 1000 if sd15 else 20

    c.hypernet = ml_collections.ConfigDict()
    c.hypernet.encoder = "sd15" if sd15 else "tiny"  # CLIP ViT-H/14 vision tower, or a tiny one
    c.hypernet.encoder_path = ""  # local CLIP vision directory with weights (sd15)
    c.hypernet.train_encoder = False
    c.hypernet.iterations = 4
    c.hypernet.mode = "cross"  # or "concat" (the paper's concatenation)
    c.hypernet.num_blocks = 4
    c.hypernet.num_heads = 2
    c.hypernet.width = 0  # 0: 2 x token width

    c.loss = ml_collections.ConfigDict(dict(alpha=1.0, beta=0.02))  # beta only acts with preopt targets

    c.optim.learning_rate = 1e-4 if sd15 else 1e-3
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0
    c.optim.warmup_steps = 1000 if sd15 else 4

    del c.data["instance"], c.data["prior"], c.data["class_prompt"], c.data["prior_weight"], c.data["flip"], c.data["batch_size"]
    c.data.prompt = "a sks face"
    c.data.preopt_dir = ""  # stage-1 weights dataset; empty: no targets (beta term off)
    c.data.identities = tuple(range(100, 116))  # used when preopt_dir is empty
    c.data.heldout = tuple(range(900, 904))
    c.data.images_per_identity = 4
    c.data.seed = 0
    del c["export"], c["print_tables"]

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.sharding_rules = ((r".*kernel", "fsdp"), (r".*embedding", "fsdp"))
    c.distributed = ml_collections.ConfigDict(dict(auto=True, coordinator_address="", num_processes=-1, process_id=-1,
                                                   local_device_ids=()))
    return c
