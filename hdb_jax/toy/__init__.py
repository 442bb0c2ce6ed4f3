"""The toy world: a small base model and identity encoder trained on synthetic faces, shipped with the package.

Without network access there is no pretrained Stable Diffusion, so personalisation is checked in a
small world: an SD-family model trained from scratch on procedural faces (:mod:`hdb_jax.jobs.toy_base`)
and an identity encoder that scores generated faces (:mod:`hdb_jax.toy.identity`). Both ship in
``hdb_jax/toy/weights/`` with a model card; the base model is a diffusers-format directory read by
the same loader as SD 1.5.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


def base_model_dir() -> Path:
    """The shipped toy base model (a diffusers-format directory)."""
    return WEIGHTS_DIR / "base"


def hypernet_dir() -> Path:
    """The shipped hypernetwork bundle for the toy base model (see its MODEL_CARD.md)."""
    return WEIGHTS_DIR / "hypernet"
