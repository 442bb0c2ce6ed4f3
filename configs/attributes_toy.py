"""Train the toy attribute classifier (the toy world's subject- and prompt-fidelity metrics).

Run:
  python -m hdb_jax.train --config configs/attributes_toy.py
  python -m hdb_jax.train --config configs/attributes_toy.py:reduced --config.workdir=/tmp/attr \\
      --config.out_dir=/tmp/attr/out
Knobs: ``reduced`` (a few steps, for tests). Rerunning resumes from the latest checkpoint; the
finished run writes ``config.json`` + ``params.safetensors`` to ``out_dir`` (by default the
folder shipped with the package).
"""

import ml_collections

from hdb_jax.jobs import config_lib
from hdb_jax.toy.attributes import SHIPPED_DIR


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    reduced = config_lib.knobs(arg, reduced=False).reduced
    c = ml_collections.ConfigDict()
    c.job = "attributes"
    c.seed = 0
    c.workdir = "runs/attributes_toy"
    c.out_dir = str(SHIPPED_DIR)
    c.steps = 6 if reduced else 2000
    c.batch_size = 16 if reduced else 64
    c.log_every = 2 if reduced else 50
    c.checkpoint_every = 3 if reduced else 500
    c.stop_after = 0
    c.model = ml_collections.ConfigDict(
        dict(
            widths=(8, 16) if reduced else (32, 64, 128),
            hidden=32 if reduced else 256,
            resolution=32,
            groups=4 if reduced else 8,
        )
    )
    c.data = ml_collections.ConfigDict()
    c.data.seed = 0  # the synthetic world
    c.data.train_ids = (0, 1_000_000)
    c.data.heldout_ids = (1_000_000, 2_000_000)  # never trained on
    c.data.styles = ("photo", "cartoon", "sketch")
    c.data.style_weights = (0.5, 0.25, 0.25)
    c.data.negative_fraction = 0.25
    c.optim = config_lib.optim(2e-3, weight_decay=1e-4, warmup_steps=1 if reduced else 100, schedule="cosine")
    return c
