"""Personalise one subject with an adapter (LiDB, LoRA, Kronecker or residual).

Run:
  python -m hdb_jax.train --config configs/subject.py:tiny,adapter=lidb
  python -m hdb_jax.train --config configs/subject.py:sd15,adapter=kron \
      --config.model.source=/models/stable-diffusion-v1-5 \
      --config.data.instance.source=folder --config.data.instance.folder=/photos/me \
      --config.workdir=runs/me_kron
  python -m hdb_jax.train --config configs/subject.py:tiny,method=dreambooth --config.data.prior_weight=1
  python -m hdb_jax.train --config configs/subject.py:tiny,method=textual_inversion
Knobs after ':' (comma-separated): ``tiny`` (default) or ``sd15``; ``adapter=lidb|lora|kron|residual``;
``method=adapter|dreambooth|textual_inversion`` (the baselines: the whole UNet, or one token embedding).
Rerunning the same command resumes from the run's latest checkpoint.
"""

import ml_collections

from hdb_jax.jobs import config_lib

# methods.md: LiDB pre-optimisation lr 1e-3 (~300 steps); DiffuseKronA's official SD recipe lr 1e-3,
# 500 steps, batch 4; residuals 1e-3 (150 steps, batch 4); LoRA-DreamBooth 1e-4. The tiny model at 10x.
LEARNING_RATES = {"lidb": 1e-3, "lora": 1e-4, "kron": 1e-3, "residual": 1e-3}
SD15_STEPS = {"lidb": 300, "lora": 1000, "kron": 500, "residual": 150}
# DreamBooth: 5e-6 for ~1000 steps (diffusers' example); Textual Inversion: 5e-3 for ~5000 steps.
METHOD_LR = {"dreambooth": 5e-6, "textual_inversion": 5e-3}
METHOD_STEPS = {"dreambooth": 1000, "textual_inversion": 5000}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    k = config_lib.knobs(
        arg,
        size=config_lib.SIZES,
        adapter=config_lib.ADAPTER_KINDS,
        method=("adapter", "dreambooth", "textual_inversion"),
    )
    sd15, kind, method = k.size == "sd15", k.adapter, k.method

    c = ml_collections.ConfigDict()
    c.job = "subject"
    c.seed = 0
    c.method = method
    c.workdir = f"runs/subject_{kind if method == 'adapter' else method}"
    c.print_tables = False
    c.model = config_lib.model(k.size)
    c.adapter = config_lib.adapter(kind, k.size)
    c.dreambooth = ml_collections.ConfigDict(dict(train_text_encoder=False))
    # Textual Inversion trains the input embedding of the (single-token) rare word, starting from
    # the class word's; the export names it export_token (what load_textual_inversion registers).
    c.textual_inversion = ml_collections.ConfigDict(
        dict(token="sks", init_token="face", export_token="<sks>")
    )
    steps = SD15_STEPS[kind] if method == "adapter" else METHOD_STEPS[method]
    lr = LEARNING_RATES[kind] if method == "adapter" else METHOD_LR[method]
    c.update(
        config_lib.loop(
            steps if sd15 else 40, log_every=10 if sd15 else 5, checkpoint_every=100 if sd15 else 20
        )
    )
    c.optim = config_lib.optim(lr if sd15 else 10 * lr)

    c.data = ml_collections.ConfigDict()
    c.data.prompt = "a photo of sks face" if sd15 else "a sks face"
    c.data.class_prompt = "a photo of a face" if sd15 else "a face"
    c.data.batch_size = 4 if kind in ("residual", "kron") or not sd15 else 1
    c.data.flip = True
    c.data.prior_weight = 0.0  # > 0 enables prior preservation on data.prior images
    c.data.instance = config_lib.synthetic_identities((7,), images_per_identity=4)
    c.data.prior = config_lib.synthetic_identities(range(1000, 1008), images_per_identity=1)
    # source="generated": DreamBooth's class images, sampled once by the base model and cached.
    c.data.prior.count = 8
    c.data.prior.sample_steps = 25 if sd15 else 20
    c.data.prior.guidance_scale = 7.5 if sd15 else 3.0

    c.export = ml_collections.ConfigDict()
    c.export.lora = True  # also write a standard (diffusers/PEFT) LoRA file where the kind allows
    c.export.webui = False  # also write a kohya / LyCORIS file (AUTOMATIC1111, ComfyUI)
    c.export.sample_prompts = ("a photo of sks face",) if sd15 else ("a sks face", "a face")
    c.export.sample_seeds = (0, 1)
    c.export.sample_steps = 25 if sd15 else 10
    c.export.guidance_scale = 7.5 if sd15 else 3.0
    return c
