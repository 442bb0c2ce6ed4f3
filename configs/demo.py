"""Embedded default job: HyperDreamBooth end to end on the shipped toy base model.

Pre-optimise LiDB weights for synthetic identities -> train the hypernetwork -> personalise
held-out identities from one render each (hypernetwork + rank-relaxed fast finetune) -> sample ->
``report.json`` with the paper's four ablation rows (base, hypernet, hypernet+finetune,
finetune from zero) and ``grid.png``. A few minutes on 2 CPU cores.

Run:
  python -m hdb_jax.train --config configs/demo.py
  python -m hdb_jax.train --config configs/demo.py:reduced --config.workdir=/tmp/demo   # a smoke-sized run
  python -m hdb_jax.train --config configs/demo.py --config.personalize.relax.variant=svd
Knobs after ':': ``reduced``. Subject-only personalisation is configs/subject.py.
"""

import os

import ml_collections

from hdb_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    reduced = config_lib.knobs(arg, reduced=False).reduced
    from hdb_jax.toy import base_model_dir

    c = ml_collections.ConfigDict()
    c.job = "demo"
    c.seed = 0
    c.data_seed = 0
    c.workdir = "runs/demo"
    base = os.fspath(base_model_dir())
    workdir = c.get_ref("workdir")  # derived paths follow --config.workdir
    train_ids = tuple(range(10_000, 10_000 + (8 if reduced else 48)))  # never seen by the base model

    c.preopt = config_lib.load("preopt.py", "tiny", relative_to=__file__)
    c.preopt.model.source = base
    c.preopt.workdir = workdir + "/preopt"
    c.preopt.adapter.basis_file = workdir + "/lidb_basis.safetensors"
    c.preopt.data.identities = train_ids
    c.preopt.steps = 3 if reduced else 60
    c.preopt.optim.learning_rate = 1e-2

    c.hypernet = config_lib.load("hypernet.py", "tiny", relative_to=__file__)
    c.hypernet.model.source = base
    c.hypernet.workdir = workdir + "/hypernet"
    c.hypernet.adapter.basis_file = workdir + "/lidb_basis.safetensors"
    c.hypernet.data.preopt_dir = workdir + "/preopt"
    c.hypernet.data.heldout = tuple(range(3_000_000, 3_000_004))
    c.hypernet.steps = 4 if reduced else 300
    c.hypernet.batch_size = 8
    c.hypernet.checkpoint_every = 100
    c.hypernet.hypernet.train_encoder = True  # the tiny encoder is random: let it learn faces
    c.hypernet.optim.learning_rate = 1e-3
    c.hypernet.optim.warmup_steps = 20

    c.personalize = config_lib.load("personalize.py", relative_to=__file__)
    c.personalize.model.source = base
    c.personalize.hypernet = workdir + "/hypernet/hypernet"
    c.personalize.compile_cache = workdir + "/jax_cache"
    if reduced:
        c.personalize.relax.steps = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.identities = tuple(range(3_000_000, 3_000_000 + (1 if reduced else 4)))  # held out everywhere
    c.eval.heldout_views = 2 if reduced else 4  # other renders of the identity, for the denoising loss
    c.eval.noise_draws = 2 if reduced else 8
    c.eval.samples_per_identity = 2 if reduced else 6  # seeds sampled with "a sks face" per row
    c.eval.samples_per_row = 2
    c.eval.sample_steps = 3 if reduced else 25
    c.eval.guidance_scale = 3.0
    c.eval.identity_encoder = ""  # empty: the shipped toy identity encoder
    return c
