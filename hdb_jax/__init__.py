"""hdb_jax: HyperDreamBooth, DiffuseKronA and Personalized Residuals on Flax Stable Diffusion.

The library is organised as a few deep modules:

* ``hdb_jax.sd``: the only seam to the pinned diffusers / transformers Flax classes (model
  construction, torch-free loading of diffusers-format checkpoints, tiny models for tests).
* ``hdb_jax.adapters``: pure-functional adapter parameter trees (LoRA, LiDB, Kronecker,
  low-rank residuals), applied in activation space or merged into the base weights.
* ``hdb_jax.train``: the ``python -m hdb_jax.train --config ...`` entry point.
"""

__version__ = "0.1.0"
