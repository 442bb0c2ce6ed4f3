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

from hdb_jax import config_lib

# methods.md: LiDB pre-optimisation lr 1e-3 (~300 steps); Kron 5e-4 (500-1000 steps);
# residuals 1e-3 (150 steps, batch 4); LoRA-DreamBooth 1e-4. The tiny model trains at 10x.
LEARNING_RATES = {"lidb": 1e-3, "lora": 1e-4, "kron": 5e-4, "residual": 1e-3}
SD15_STEPS = {"lidb": 300, "lora": 1000, "kron": 1000, "residual": 150}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    k = config_lib.knobs(arg, size=config_lib.SIZES, adapter=config_lib.ADAPTER_KINDS)
    sd15, kind = k.size == "sd15", k.adapter

    c = ml_collections.ConfigDict()
    c.job = "subject"
    c.seed = 0
    c.workdir = f"runs/subject_{kind}"
    c.print_tables = False
    c.model = config_lib.model(k.size)
    c.adapter = config_lib.adapter(kind, k.size)
    c.update(config_lib.loop(SD15_STEPS[kind] if sd15 else 40, log_every=10 if sd15 else 5,
                             checkpoint_every=100 if sd15 else 20))
    c.optim = config_lib.optim(LEARNING_RATES[kind] if sd15 else 10 * LEARNING_RATES[kind])

    c.data = ml_collections.ConfigDict()
    c.data.prompt = "a photo of sks face" if sd15 else "a sks face"
    c.data.class_prompt = "a photo of a face" if sd15 else "a face"
    c.data.batch_size = 4 if kind == "residual" or not sd15 else 1
    c.data.flip = True
    c.data.prior_weight = 0.0  # > 0 enables prior preservation on data.prior images
    c.data.instance = config_lib.synthetic_identities((7,), images_per_identity=4)
    c.data.prior = config_lib.synthetic_identities(range(1000, 1008), images_per_identity=1)

    c.export = ml_collections.ConfigDict()
    c.export.lora = True  # also write a standard (diffusers/PEFT) LoRA file where the kind allows
    c.export.sample_prompts = ("a photo of sks face",) if sd15 else ("a sks face", "a face")
    c.export.sample_seeds = (0, 1)
    c.export.sample_steps = 25 if sd15 else 10
    c.export.guidance_scale = 7.5 if sd15 else 3.0
    return c
