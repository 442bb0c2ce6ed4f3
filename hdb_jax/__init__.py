"""hdb_jax: HyperDreamBooth, DiffuseKronA and Personalized Residuals on Flax Stable Diffusion.

Layers, bottom up; each is a folder, and a module imports only from its own folder and the ones
listed before it:

* ``common`` (images, safetensors files, checkpoints, metric writers, meshes), ``sd`` (the only
  seam to the pinned diffusers / transformers Flax classes: model bundle, torch-free loading, tiny
  models), ``adapters`` (pure adapter trees), ``eval`` (intervals, precision / recall, reports,
  real-photo metrics);
* ``formats`` (personal weights, diffusers LoRA, webui files) and ``blocks`` (``build``: base
  model, adapters, frozen trees, optimiser; ``loop``: the one training loop; ``diffusion``,
  ``sample``, ``lag``, ``relax``, ``tuning``);
* ``toy`` (the toy world: renderer, base model architecture, scorers, the scoring protocol,
  shipped weights), ``data`` (identity sources, the pre-optimised weights dataset), ``hypernet``
  (the network, its objective, data, evaluation and bundle);
* ``stages``, peers that never import each other, each ``train(config, sd, params)``:
  ``subject``, ``preopt``, ``hypernet``, ``personalize`` (the ``Personalizer`` runtime);
* ``jobs``: the command lines and what composes stages (``train`` dispatches ``config.job``;
  the main job ``demo``, ``sweep``, ``probe``, the toy world's trainers). ``hdb_jax.train``,
  ``hdb_jax.personalize``, ``hdb_jax.sample`` and ``hdb_jax.export_base`` are the short names of
  their command lines.

Vocabulary used everywhere:

* ``params``: the base model's weights ``{"unet", "vae", "text_encoder"}`` (never trained by an
  adapter stage, never donated, never checkpointed);
* ``trainable``: what a stage optimises (adapter trees ``{component: {module path: {factor}}}``,
  a whole UNet for DreamBooth, one embedding row for Textual Inversion, hypernetwork params);
* ``frozen``: ``{"params": base weights, "basis": {component: frozen adapter trees}}`` (LiDB's
  bases; empty dicts for the other kinds), plus ``"hyper"`` (the frozen image encoder) in the
  hypernetwork's step;
* ``state``: ``{"step", "trainable", "opt_state"}``, donated to the jitted step and checkpointed,
  in every job (a job adds fields of its own beside them: the toy base model's ``ema`` and
  ``scaling_factor``); :func:`hdb_jax.blocks.loop.train` runs it in a run directory
  (``checkpoints/``, ``tb/``) after one restore (:class:`hdb_jax.blocks.loop.RunDir`).
"""

__version__ = "0.2.0"
