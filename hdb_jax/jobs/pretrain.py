"""The pretraining stages as jobs: ``preopt`` (stage 1) and ``hypernet`` (stage 2).

Each builds the base model its config names and hands it to the stage's ``train``; on several
hosts the distributed runtime is started first. ``python -m hdb_jax.train --config
configs/preopt.py`` and ``--config configs/hypernet.py`` run these.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from hdb_jax.blocks import build
from hdb_jax.common import costs, sharding
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
        sd = dataclasses.replace(sd, **build.model_settings(config.model))
        s = hypernet.setup(config, sd, sd.abstract_params(build.resolution(config.model, sd)))
        specs = sharding.describe(s.state_sh["trainable"])
        for path in list(specs)[:6]:
            print(f"  trainable/{path}: {specs[path]}")
        per_device = costs.program_costs(s.compiled, s.mesh.size)
        gib = 2.0**30
        print(
            f"per device: peak {per_device['memory']['peak'] / gib:.2f} GiB, "
            f"{per_device['flops'] / 1e12:.3f} TFLOP, collectives send {per_device['wire_bytes'] / gib:.3f} GiB"
            " per step (see benchmarks/mesh_plan.py)"
        )
        return {
            "summary": s.summary,
            "costs": per_device,
            "state_shardings": s.state_sh,
            "frozen_shardings": s.frozen_sh,
            "compiled": s.compiled,
        }
    sd, params = build.base_model(config.model)
    return hypernet.train(config, sd, params)
