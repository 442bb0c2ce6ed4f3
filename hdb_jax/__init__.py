"""hdb_jax: HyperDreamBooth, DiffuseKronA and Personalized Residuals on Flax Stable Diffusion.

Layers, bottom up (a module imports only from the layers below it):

* foundation: ``hdb_jax.sd`` (the only seam to the pinned diffusers / transformers Flax classes:
  model bundle, torch-free loading, tiny models), ``hdb_jax.adapters`` (pure adapter trees),
  ``data``, ``images``, ``tensorfile``, ``metrics``, ``checkpoint``, ``sharding``, ``config_lib``;
* building blocks: ``build`` (base model, adapters, frozen trees, optimizer), ``loop`` (the one
  training loop), ``diffusion`` (the denoising loss and its fixed-draw evaluation), ``sample``,
  ``lag``, ``relax``, ``personal``, ``export`` / ``export_webui``, ``tuning``, ``hypernet.model`` /
  ``bundle``, ``data.weights`` (the pre-optimised weights dataset), ``eval``, ``toy`` evaluators;
* stages, peers that never import each other: ``subject``, ``preopt``, ``hypernet.train``,
  ``personalize`` and the toy world's training jobs (``toy.base``, ``toy.identity_train``,
  ``toy.attributes_train``);
* jobs that compose stages: ``demo`` (with ``demo_methods``) and ``sweep``; ``train`` is the
  ``python -m hdb_jax.train`` entry point.

Vocabulary used everywhere:

* ``params``: the base model's weights ``{"unet", "vae", "text_encoder"}`` (never trained by an
  adapter stage, never donated, never checkpointed);
* ``trainable``: what a stage optimises (adapter trees ``{component: {module path: {factor}}}``,
  a whole UNet for DreamBooth, one embedding row for Textual Inversion, hypernetwork params);
* ``frozen``: ``{"params": base weights, "basis": {component: frozen adapter trees}}`` (LiDB's
  bases; empty dicts for the other kinds), plus ``"hyper"`` (the frozen image encoder) in the
  hypernetwork's step;
* ``state``: ``{"step", "trainable", "opt_state"}``, donated to the jitted step and checkpointed.
"""

__version__ = "0.2.0"
