"""Train the toy identity encoder on synthetic faces (the toy world's face-recognition metric).

Run:
  python -m hdb_jax.train --config configs/identity_toy.py
  python -m hdb_jax.train --config configs/identity_toy.py:reduced \\
      --config.workdir=/tmp/id --config.out_dir=/tmp/id/out
Knobs after ':' (comma-separated): ``reduced`` (a few steps on tiny batches, for tests).
Rerunning the same command resumes from the run's latest checkpoint; the finished run writes the
encoder (``config.json`` + ``params.safetensors``) to ``out_dir``, by default the directory shipped
with the package.
"""

import ml_collections

from hdb_jax.jobs import config_lib
from hdb_jax.toy.identity import SHIPPED_DIR


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    reduced = config_lib.knobs(arg, reduced=False).reduced

    c = ml_collections.ConfigDict()
    c.job = "identity"
    c.seed = 0
    c.workdir = "runs/identity_toy"
    c.out_dir = str(SHIPPED_DIR)
    c.steps = 8 if reduced else 1000
    c.log_every = 2 if reduced else 25
    c.checkpoint_every = 4 if reduced else 250
    c.stop_after = 0

    c.model = ml_collections.ConfigDict()
    c.model.widths = (8, 16) if reduced else (16, 32, 64, 128)
    c.model.embed_dim = 16 if reduced else 64
    c.model.resolution = 32
    c.model.groups = 4 if reduced else 8

    c.data = ml_collections.ConfigDict()
    c.data.seed = 0  # the synthetic world's seed: the same faces the base model trains on
    c.data.train_identities = 64 if reduced else 20_000  # ids 0 .. train_identities - 1
    c.data.identities_per_batch = 8 if reduced else 32
    c.data.views_per_identity = 2  # renders per identity and batch (fresh variation indices)
    c.data.styles = ("photo", "cartoon")

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.1
    c.loss.attribute_weight = 0.5  # auxiliary regression of the generator's identity attributes

    c.optim = config_lib.optim(3e-3, weight_decay=1e-4, warmup_steps=1 if reduced else 50, schedule="cosine")

    c.eval = ml_collections.ConfigDict()
    c.eval.heldout_start = 1_000_000  # disjoint from the training ids
    c.eval.heldout_count = 8 if reduced else 100
    c.eval.queries_per_identity = 3
    return c
