"""Sweeps over the paper's open questions on the toy world, with plots (see hdb_jax/jobs/sweep.py).

Run:
  python -m hdb_jax.train --config configs/sweep.py:relax
  python -m hdb_jax.train --config configs/sweep.py:iterations
  python -m hdb_jax.train --config configs/sweep.py:ood
  python -m hdb_jax.train --config configs/sweep.py:identities --config.hypernet.data.preopt_dir=runs/demo/preopt
  python -m hdb_jax.train --config configs/sweep.py:relax,identities=4 --config.workdir=/tmp/sweep  # a subset
Knobs after ':': the sweep's name, ``identities=N`` (held-out identities evaluated), ``reduced`` (tests).
A rerun computes only the points whose result file is missing.
"""

import ml_collections

from hdb_jax.jobs import config_lib
from hdb_jax.stages.personalize import default_config

SWEEPS = ("relax", "iterations", "ood", "identities")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    k = config_lib.knobs(arg, sweep=SWEEPS, identities=16, reduced=False)
    c = ml_collections.ConfigDict()
    c.job = "sweep"
    c.sweep = k.sweep
    c.workdir = "runs/sweep"
    c.data_seed = 0
    c.personalize = default_config()
    c.personalize.compile_cache = ""
    c.hypernet = config_lib.load("hypernet.py", "toy", relative_to=__file__)
    c.hypernet.data.heldout = ()
    c.points = ml_collections.ConfigDict()
    c.points.variants = ("fresh", "svd")
    c.points.ranks = (1, 2, 4, 8)
    c.points.steps = (0, 5, 10, 20, 40)
    c.points.iterations = (1, 2, 4, 8)
    c.points.references = ("photo", "cartoon", "sketch", "pose", "light", "hat", "glasses")
    c.points.identities = (50, 150, 500, 1500)
    c.x_label = {
        "relax": "finetune steps K",
        "iterations": "refinement steps s (test time)",
        "ood": "reference",
        "identities": "pre-optimised training identities",
    }[k.sweep]
    c.eval = ml_collections.ConfigDict()
    c.eval.identities = tuple(range(3_000_100, 3_000_100 + (1 if k.reduced else k.identities)))
    c.eval.prompts = (
        "a sks face",
        "a cartoon of a sks face",
        "a sks face wearing a hat",
        "a sks face on a red background",
    )
    c.eval.seeds = 1 if k.reduced else 2
    c.eval.sample_steps = 2 if k.reduced else 20
    c.eval.guidance_scale = 3.0
    c.eval.replicates = 100 if k.reduced else 1000
    if k.reduced:
        c.points.variants, c.points.ranks, c.points.steps = ("fresh",), (2,), (0, 2)
        c.points.iterations, c.points.references, c.points.identities = (1, 2), ("photo", "cartoon"), (2, 3)
        c.eval.prompts = c.eval.prompts[:2]
        c.hypernet.steps, c.hypernet.batch_size = 2, 2
    return c
