"""The main job: HyperDreamBooth's Table 1 and ablation on the toy world (what ``make demo`` runs).

Run:
  python -m hdb_jax.train --config configs/demo.py        # make demo: HyperDreamBooth's rows, 8 identities
  python -m hdb_jax.train --config configs/demo.py:full --config.workdir=runs/demo_full  # every row, 16
  python -m hdb_jax.train --config configs/demo.py:retrain               # stages 1-2 from scratch first
  python -m hdb_jax.train --config configs/demo.py:reduced --config.workdir=/tmp/demo    # smoke size
Knobs after ':': ``full`` (every row and baseline on 16 held-out identities: the README's table),
``reduced`` (tiny everything, every row, for tests), ``retrain``. The default runs the HyperDreamBooth
rows (base, hypernet, hypernet + finetune and finetune from zero at K=10 and 40, oracle) on 8
held-out identities and LoRA-DreamBooth on 2 (<= 10 minutes on 2 CPU cores). A rerun reuses the
scores already in ``workdir/scores``.
"""

import ml_collections

from hdb_jax.jobs import config_lib
from hdb_jax.jobs.demo_methods import ROWS

HYPERDREAMBOOTH_ROWS = (
    "base",
    "hypernet",
    "hypernet+finetune",
    "finetune_from_zero",
    "hypernet+finetune@10",
    "finetune_from_zero@10",
    "oracle",
    "lora_dreambooth",
)

PROMPTS = (
    "a sks face",
    "a cartoon of a sks face",
    "a sks face wearing a hat",
    "a sks face on a red background",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    k = config_lib.knobs(arg, reduced=False, retrain=False, full=False)
    reduced, full = k.reduced, k.full
    c = ml_collections.ConfigDict()
    c.job = "demo"
    c.seed = 0
    c.data_seed = 0
    c.workdir = "runs/demo"
    workdir = c.get_ref("workdir")  # derived paths follow --config.workdir
    # The base model, stated once: every section below holds this same object, so
    # --config.model.source=... (and resolution 0: the model's own) reaches every stage.
    c.model = config_lib.model("toy")
    c.retrain = k.retrain or reduced  # reduced: stages 1-2 at smoke size (no shipped bundle is used)

    c.preopt = config_lib.load("preopt.py", "toy", relative_to=__file__)
    c.preopt.model = c.model
    c.preopt.workdir = workdir + "/preopt"
    c.preopt.adapter.basis_file = workdir + "/lidb_basis.safetensors"
    c.hypernet = config_lib.load("hypernet.py", "toy", relative_to=__file__)
    c.hypernet.model = c.model
    c.hypernet.workdir = workdir + "/hypernet"
    c.hypernet.adapter.basis_file = workdir + "/lidb_basis.safetensors"
    c.hypernet.data.preopt_dir = workdir + "/preopt"
    if reduced:
        c.preopt.data.identities, c.preopt.steps, c.preopt.chunk_size = tuple(range(10_000, 10_004)), 3, 4
        c.hypernet.steps, c.hypernet.batch_size, c.hypernet.data.heldout = 3, 4, (3_100_000,)
        c.hypernet.data.fresh_per_batch = 2  # half of every batch, as in the toy recipe

    c.personalize = config_lib.load("personalize.py", relative_to=__file__)
    c.personalize.model = c.model
    # "" (default): decided when the job runs, by c.retrain: the bundle stage 2 writes in
    # c.hypernet.workdir, or the shipped toy hypernetwork. A path: that bundle, whatever retrain says.
    c.personalize.bundle = ""
    c.personalize.compile_cache = workdir + "/jax_cache"
    if reduced:
        # One view per finetune step: the @10 rows run 10 steps whatever the size, and each step's
        # cost grows with its batch.
        c.personalize.relax.steps, c.personalize.relax.batch_size = 2, 1

    c.eval = ml_collections.ConfigDict()
    # Held-out identities (never seen by any toy model) x 4 prompts x 2 seeds.
    c.eval.identities = tuple(range(3_000_000, 3_000_000 + (1 if reduced else 16 if full else 8)))
    c.eval.rows = ROWS if reduced or full else HYPERDREAMBOOTH_ROWS
    c.eval.prompts = PROMPTS
    c.eval.token = "sks"
    c.eval.seeds = 1 if reduced else 2  # per prompt
    c.eval.prior_prompt = "a face"  # sampled from each personal model: is the prior kept?
    c.eval.prior_seeds = 4  # >= k + 1 samples (k-NN realism, k = 3)
    c.eval.real_renders = 64 if reduced else 512  # the real manifold of the prior-realism metric
    # 10 sampler steps score as 20 do (8 held-out identities: base 0.085 vs 0.080 identity, hypernet
    # 0.255 vs 0.252, prompt fidelity 0.67 / 0.50 vs 0.67 / 0.52) in 60% of the time.
    c.eval.sample_steps = 2 if reduced else 10
    c.eval.guidance_scale = 3.0
    c.eval.k_short = 10  # the @10 rows' finetune steps
    # The slow baselines run on the first N identities.
    c.eval.baseline_identities = 1 if reduced else 16 if full else 2
    c.eval.grid_identities = 1 if reduced else 2
    c.eval.replicates = 200 if reduced else 2000

    # The oracle: stage 1 run on the reference itself (one view), in the bundle's LiDB basis.
    c.oracle = config_lib.load("preopt.py", "toy", relative_to=__file__)
    c.oracle.model = c.model
    c.oracle.bundle_dir = ""  # the bundle the hypernetwork rows use (its LiDB basis)
    c.oracle.chunk_size = 4 if reduced else len(c.eval.identities)  # every evaluation identity: one chunk
    if reduced:  # stage 1's program exactly (the same steps: one learning-rate schedule), compiled once
        c.oracle.steps = c.preopt.steps

    c.baselines = ml_collections.ConfigDict()
    for row, arg in (
        ("lora_dreambooth", "toy,adapter=lora"),
        ("dreambooth", "toy,method=dreambooth"),
        ("textual_inversion", "toy,method=textual_inversion"),
        ("residuals", "toy,adapter=residual"),  # also sampled with LAG: row residuals+lag
    ):
        b = config_lib.load("subject.py", arg, relative_to=__file__)
        b.model = c.model
        b.data.instance.images_per_identity = 1  # the reference only, like every other row
        b.data.flip = False  # a mirrored face is another face here (the hair parts the other way)
        b.export.sample_prompts = ()
        # 300 steps each (their own papers run ~1000 on SD 1.5): in the toy personalisation probe
        # full DreamBooth reached identity score 0.47 after 300 steps at 1e-4, LoRA 0.28 at 1e-2.
        b.steps = 2 if reduced else 300
        c.baselines[row] = b
    c.baselines.lora_dreambooth.optim.learning_rate = 1e-2
    c.baselines.dreambooth.optim.learning_rate = 1e-4
    c.baselines.residuals.steps = 2 if reduced else 150  # the Personalized Residuals recipe
    c.baselines.dreambooth.data.prior_weight = 1.0
    c.baselines.dreambooth.data.prior.source = "generated"
    c.baselines.dreambooth.data.prior.sample_steps = 2 if reduced else 20
    return c
