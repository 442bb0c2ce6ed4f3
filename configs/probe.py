"""The target-quality probe: stage 1's recipe on a few identities, twice, and what its targets carry.

Run:
  python -m hdb_jax.train --config configs/probe.py                    # the shipped stage-1 recipe
  python -m hdb_jax.train --config configs/probe.py:identities=4 --config.workdir=runs/probe/x \\
      --config.preopt.optim.learning_rate=1e-2 --config.preopt.samples_per_step=4
Knobs: ``identities`` (how many; held-out ones, 3_000_000 + i), ``reduced`` (smoke size for tests).
Writes ``<workdir>/probe.json`` (see :mod:`hdb_jax.jobs.probe`). Every ``--config.preopt.*`` field of
``configs/preopt.py:toy`` is a recipe knob.
"""

import ml_collections

from hdb_jax.jobs import config_lib

PROMPTS = (
    "a sks face",
    "a cartoon of a sks face",
    "a sks face wearing a hat",
    "a sks face on a red background",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    k = config_lib.knobs(arg, identities=4, reduced=False)
    c = ml_collections.ConfigDict()
    c.job = "probe"
    c.workdir = "runs/probe"
    c.noise_seeds = (0, 1)
    c.preopt = config_lib.load("preopt.py", "toy", relative_to=__file__)
    n = 2 if k.reduced else k.identities
    c.preopt.data.identities = tuple(range(3_000_000, 3_000_000 + n))
    c.preopt.chunk_size = n  # every identity in one program
    if k.reduced:
        c.preopt.steps = 3
    c.eval = ml_collections.ConfigDict()
    c.eval.prompts = PROMPTS[:1] if k.reduced else PROMPTS
    c.eval.seeds = 1 if k.reduced else 2
    c.eval.sample_steps = 2 if k.reduced else 20
    c.eval.guidance_scale = 3.0
    c.eval.replicates = 200 if k.reduced else 2000
    return c
