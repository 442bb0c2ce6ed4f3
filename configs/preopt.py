"""Stage 1: pre-optimise LiDB weights for many identities (the hypernetwork's targets).

Run:
  python -m hdb_jax.train --config configs/preopt.py:tiny
  python -m hdb_jax.train --config configs/preopt.py:sd15 --config.model.source=/models/sd15 \\
      --config.workdir=/data/preopt --config.mesh.data=-1
Knobs: ``tiny`` (default) or ``sd15``. Rerunning skips identities already in <workdir>/index.jsonl.
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
    c.job = "preopt"
    c.workdir = "runs/preopt"
    c.steps = 300 if sd15 else 30  # per identity (methods.md: ~300 at lr 1e-3)
    c.optim.learning_rate = 1e-3 if sd15 else 1e-2
    c.chunk_size = 8  # identities trained together; a multiple of the device count
    c.data.source = "synthetic"
    c.data.identities = tuple(range(8))
    c.data.images_per_identity = 4
    c.data.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1})
    # Frozen base weights: FSDP-shard the big kernels when the mesh has an fsdp axis.
    c.sharding_rules = ((r"params/.*kernel", "fsdp"),)
    c.distributed = ml_collections.ConfigDict(dict(auto=True, coordinator_address="", num_processes=-1, process_id=-1))
    for key in ("instance", "prior", "class_prompt", "prior_weight", "flip", "batch_size"):
        del c.data[key]  # subject-only fields
    for key in ("export", "print_tables", "checkpoint_every", "log_every"):
        del c[key]
    return c
