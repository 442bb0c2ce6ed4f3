"""Personalise one subject with an adapter (LiDB, LoRA, Kronecker or residual).

Run:
  python -m hdb_jax.train --config configs/subject.py:tiny,adapter=lidb
  python -m hdb_jax.train --config configs/subject.py:sd15,adapter=kron \
      --config.model.source=/models/stable-diffusion-v1-5 \
      --config.data.instance.source=folder --config.data.instance.folder=/photos/me \
      --config.workdir=runs/me_kron
Knobs after ':' (comma-separated): ``tiny`` (default) or ``sd15``; ``adapter=lidb|lora|kron|residual``.
Rerunning the same command resumes from the run's latest checkpoint.
"""

import ml_collections

from hdb_jax.adapters import PATTERNS

KNOBS = {"tiny", "sd15", "adapter"}
KINDS = ("lidb", "lora", "kron", "residual")


def parse_knobs(arg: str | None, allowed=KNOBS) -> dict:
    """``"tiny,adapter=lora"`` -> ``{"tiny": "1", "adapter": "lora"}``; unknown knobs are errors."""
    knobs = dict(kv.split("=", 1) if "=" in kv else (kv, "1") for kv in (arg or "").split(",") if kv)
    unknown = set(knobs) - set(allowed)
    if unknown:
        raise ValueError(f"unknown config knobs {sorted(unknown)}; known: {sorted(allowed)}")
    return knobs


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    knobs = parse_knobs(arg)
    sd15 = "sd15" in knobs
    kind = knobs.get("adapter", "lidb")
    if kind not in KINDS:
        raise ValueError(f"adapter={kind!r}: choose from {KINDS}")

    c = ml_collections.ConfigDict()
    c.job = "subject"
    c.seed = 0
    c.workdir = f"runs/subject_{kind}"
    c.print_tables = False

    c.model = ml_collections.ConfigDict()
    c.model.source = "" if sd15 else "tiny"  # sd15: a diffusers-format directory or hub id
    c.model.resolution = 512 if sd15 else 32

    c.adapter = ml_collections.ConfigDict()
    c.adapter.kind = kind
    c.adapter.unet_patterns = (PATTERNS["unet_attention"],)
    c.adapter.text_patterns = (PATTERNS["text_attention"],)
    c.adapter.basis_file = ""  # LiDB: a shared basis file; empty -> <workdir>/lidb_basis.safetensors
    c.adapter.lidb = ml_collections.ConfigDict(dict(a=100, b=50, rank=1, init_std=1e-3) if sd15 else dict(a=16, b=8, rank=1, init_std=1e-3))
    c.adapter.lora = ml_collections.ConfigDict(dict(rank=4, alpha=4.0))
    c.adapter.kron = ml_collections.ConfigDict(dict(a1=4, a2=64, scale=1.0) if sd15 else dict(a1=4, a2=8, scale=1.0))
    c.adapter.residual = ml_collections.ConfigDict(dict(ratio=0.05 if sd15 else 0.25, rank=4))
    if kind == "kron":
        c.adapter.text_patterns = ()  # DiffuseKronA: text encoder frozen
    if kind == "residual":
        c.adapter.unet_patterns = (PATTERNS["unet_proj_out"],)
        c.adapter.text_patterns = ()

    # methods.md: LiDB pre-optimisation lr 1e-3 (~300 steps); Kron 5e-4 (500-1000 steps);
    # residuals 1e-3 (150 steps, batch 4); LoRA-DreamBooth 1e-4.
    lr = {"lidb": 1e-3, "lora": 1e-4, "kron": 5e-4, "residual": 1e-3}[kind]
    steps = {"lidb": 300, "lora": 1000, "kron": 1000, "residual": 150}[kind]
    c.steps = steps if sd15 else 40
    c.log_every = 10 if sd15 else 5
    c.checkpoint_every = 100 if sd15 else 20

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = lr if sd15 else 10 * lr
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0
    c.optim.warmup_steps = 0

    c.data = ml_collections.ConfigDict()
    c.data.prompt = "a sks face" if not sd15 else "a photo of sks face"
    c.data.class_prompt = "a face" if not sd15 else "a photo of a face"
    c.data.batch_size = 4 if kind == "residual" or not sd15 else 1
    c.data.flip = True
    c.data.prior_weight = 0.0  # > 0 enables prior preservation on data.prior images
    c.data.instance = ml_collections.ConfigDict(
        dict(source="synthetic", identities=(7,), images_per_identity=4, seed=0, folder="", min_size=64)
    )
    c.data.prior = ml_collections.ConfigDict(
        dict(source="synthetic", identities=tuple(range(1000, 1008)), images_per_identity=1, seed=0, folder="", min_size=64)
    )

    c.export = ml_collections.ConfigDict()
    c.export.lora = True  # also write a standard (diffusers/PEFT) LoRA file where the kind allows
    c.export.sample_prompts = ("a sks face", "a face") if not sd15 else ("a photo of sks face",)
    c.export.sample_seeds = (0, 1)
    c.export.sample_steps = 10 if not sd15 else 25
    c.export.guidance_scale = 3.0 if not sd15 else 7.5
    return c
