"""The pretraining stages as jobs: ``preopt`` (stage 1) and ``hypernet`` (stage 2).

Each builds the base model its config names and hands it to the stage's ``train``; on several
hosts the distributed runtime is started first. ``python -m hdb_jax.train --config
configs/preopt.py`` and ``--config configs/hypernet.py`` run these.
"""

from __future__ import annotations

import ml_collections

from hdb_jax.blocks import build
from hdb_jax.common import sharding
from hdb_jax.sd import model
from hdb_jax.sd import tiny as tiny_lib
from hdb_jax.stages import hypernet, preopt


def run_preopt(config: ml_collections.ConfigDict) -> preopt.PreoptResult:
    """Pre-optimises the identities the config names (resuming finished chunks)."""
    sharding.maybe_initialize_distributed(config.distributed)
    sd, params = build.base_model(config.model)
    return preopt.train(config, sd, params)


def run_hypernet(config: ml_collections.ConfigDict) -> hypernet.HypernetResult | dict:
    """Trains (or resumes, or dry-runs) the hypernetwork as ``config`` says.

    A dry run builds the sharded step on abstract shapes only (no weights are read) and returns
    its summary, shardings and compiled program: how a mesh plan is checked before a pod runs it.
    """
    sharding.maybe_initialize_distributed(config.distributed)
    if config.dry_run:
        sd = (
            tiny_lib.tiny(resolution=int(config.model.resolution or 32))
            if config.model.source == "tiny"
            else model.sd15_shapes()
        )
        s = hypernet.setup(config, sd, sd.abstract_params(build.resolution(config.model, sd)))
        specs = sharding.describe(s.state_sh["trainable"])
        for path in list(specs)[:6]:
            print(f"  trainable/{path}: {specs[path]}")
        return {
            "summary": s.summary,
            "state_shardings": s.state_sh,
            "frozen_shardings": s.frozen_sh,
            "compiled": s.compiled,
        }
    sd, params = build.base_model(config.model)
    return hypernet.train(config, sd, params)
