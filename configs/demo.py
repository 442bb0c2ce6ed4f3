"""Embedded default job: personalise a synthetic identity on the tiny model with LiDB adapters.

Builds the tiny SD-family model (random weights), attaches LiDB to the UNet and text-encoder
attention, trains on a few renders of one synthetic identity with the DreamBooth loss, and prints
the losses and the adapter parameter table of this model and of SD 1.5 (from shapes).

Run:
  python -m hdb_jax.train --config configs/demo.py
  python -m hdb_jax.train --config configs/demo.py:adapter=lora --config.steps=50
Knobs (comma-separated after ':'): ``adapter=lidb|lora|kron|residual``.
"""

import ml_collections

from hdb_jax.adapters import PATTERNS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    knobs = dict(kv.split("=", 1) if "=" in kv else (kv, "1") for kv in (arg or "").split(",") if kv)
    unknown = set(knobs) - {"adapter"}
    if unknown:
        raise ValueError(f"configs/demo.py: unknown knobs {sorted(unknown)}; known: adapter")
    c = ml_collections.ConfigDict()
    c.job = "adapter_demo"
    c.seed = 0
    c.steps = 30
    c.log_every = 5

    c.model = ml_collections.ConfigDict()
    c.model.source = "tiny"  # 'tiny' (random init) or a diffusers-format directory / hub id
    c.model.resolution = 32

    c.adapter = ml_collections.ConfigDict()
    c.adapter.kind = knobs.get("adapter", "lidb")
    c.adapter.unet_patterns = [PATTERNS["unet_attention"]]
    c.adapter.text_patterns = [PATTERNS["text_attention"]]  # [] to leave the text encoder alone
    c.adapter.basis_seed = 0
    # Per-kind hyperparameters (tiny-model widths; methods.md gives the SD 1.5 values).
    c.adapter.lidb = ml_collections.ConfigDict(dict(a=16, b=8, rank=1, init_std=1e-3))
    c.adapter.lora = ml_collections.ConfigDict(dict(rank=4, alpha=4.0))
    c.adapter.kron = ml_collections.ConfigDict(dict(a1=4, a2=8))
    c.adapter.residual = ml_collections.ConfigDict(dict(ratio=0.25))
    if c.adapter.kind == "residual":
        c.adapter.unet_patterns = [PATTERNS["unet_proj_out"]]
        c.adapter.text_patterns = []
    if c.adapter.kind == "kron":
        c.adapter.text_patterns = []  # DiffuseKronA leaves the text encoder frozen

    c.data = ml_collections.ConfigDict()
    c.data.identity = 7
    c.data.images = 4
    c.data.batch_size = 4
    c.data.prompt = "a sks face"

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0
    return c
