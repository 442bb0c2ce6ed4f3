"""The factories every stage builds from: base model, adapters, frozen trees, optimizer.

Stages (subject, pre-optimisation, hypernetwork, personalisation) take the pieces they need as
arguments; these functions turn config sections into those pieces, so a job that runs several
stages (the demo) builds the base model once and hands it to each.

Config sections (see :mod:`hdb_jax.jobs.config_lib` for their defaults):

* ``model``: ``source`` (``tiny``, or a diffusers-format directory / hub id), ``resolution``,
  ``attention`` and ``remat`` (how the UNet computes; :mod:`hdb_jax.sd.attention`,
  :mod:`hdb_jax.sd.remat`);
* ``adapter``: ``kind`` (``lidb``, ``lora``, ``kron``, ``residual``), ``unet_patterns``,
  ``text_patterns``, ``basis_file`` and one sub-section of hyperparameters per kind;
* ``optim``: ``learning_rate``, ``weight_decay``, ``grad_clip``, ``warmup_steps``, ``schedule``
  (``constant`` or ``cosine``) and ``final_lr_fraction``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from hdb_jax import adapters as A
from hdb_jax.adapters import basis as basis_io
from hdb_jax.sd import attention as attention_lib
from hdb_jax.sd import loading, model
from hdb_jax.sd import remat as remat_lib
from hdb_jax.sd import tiny as tiny_lib

TINY = "tiny"  # model.source of the tiny random model: model.tiny() with random_params(PRNGKey(TINY_SEED))
TINY_SEED = 0
COMPONENTS_WITH_ADAPTERS = ("unet", "text_encoder")
SCHEDULES = ("constant", "cosine")
BASIS_NAME = "lidb_basis.safetensors"


def model_settings(model_config: Mapping[str, Any]) -> dict[str, str]:
    """``{"attention", "remat"}`` of ``model_config``: how the UNet computes, checked.

    Both keys are optional (hand-written model sections may leave them out; the defaults apply).
    Hand the result to ``dataclasses.replace(sd, **settings)``.
    """
    how = {
        "attention": model_config.get("attention", attention_lib.DEFAULT_IMPLEMENTATION),
        "remat": model_config.get("remat", remat_lib.DEFAULT),
    }
    try:
        attention_lib.interceptor(how["attention"])
        remat_lib.validate(how["remat"])
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from None
    return how


def base_model(model_config: Mapping[str, Any]) -> tuple[model.StableDiffusion, dict]:
    """``(sd, params)`` of ``model_config.source``.

    ``tiny`` always means the same model: the tiny architecture at ``model_config.resolution``
    with ``random_params(PRNGKey(0))``, so weights trained on it in one command load in another.
    Anything else is a diffusers-format directory (or hub id) read by
    :func:`hdb_jax.sd.loading.load_pretrained`.
    """
    source = model_config["source"]
    if not source:
        raise ValueError(
            "config.model.source is empty: give a diffusers-format directory, a hub id or 'tiny'"
        )
    how = model_settings(model_config)  # checked before any weight is read
    if source == TINY:
        sd = tiny_lib.tiny(resolution=int(model_config.get("resolution") or 32))
        params = sd.random_params(jax.random.PRNGKey(TINY_SEED))
    else:
        sd, params = loading.load_pretrained(source)
    return dataclasses.replace(sd, **how), params


def resolution(model_config: Mapping[str, Any], sd: model.StableDiffusion) -> int:
    """The image side a stage trains at: ``model_config.resolution``, or (0) the model's own.

    0 is what the composed configs say for a loaded model (the toy model: 32 px, SD 1.5: 512 px),
    so a stage handed another base model trains at that model's size without a second statement.
    """
    res = int(model_config.get("resolution") or 0) or sd.default_resolution
    if res % sd.vae_scale_factor:
        raise ValueError(
            f"config.model.resolution={res} is not a multiple of the VAE factor {sd.vae_scale_factor}"
        )
    return res


def adapters(adapter_config: Mapping[str, Any], abstract: Mapping[str, Any]) -> dict[str, A.Adapter]:
    """One adapter per component with target patterns, all of ``adapter_config.kind``.

    Args:
      adapter_config: the ``adapter`` config section.
      abstract: the base model's (abstract or real) parameters ``{"unet", "text_encoder", ...}``.
    """
    kind_name = adapter_config["kind"]
    if kind_name not in A.KINDS:
        raise ValueError(f"config.adapter.kind={kind_name!r}: choose from {sorted(A.KINDS)}")
    hparams = adapter_config[kind_name]
    kind = A.kind_from_config(
        kind_name, **(hparams.to_dict() if hasattr(hparams, "to_dict") else dict(hparams))
    )
    patterns = {"unet": adapter_config["unet_patterns"], "text_encoder": adapter_config["text_patterns"]}
    return {
        component: A.Adapter.create(kind, abstract[component], list(patterns[component]), component)
        for component in COMPONENTS_WITH_ADAPTERS
        if patterns[component]
    }


def basis_path(adapter_config: Mapping[str, Any], workdir: str | os.PathLike) -> str:
    """The LiDB basis file: ``adapter_config.basis_file``, or ``<workdir>/lidb_basis.safetensors``."""
    return os.fspath(adapter_config.get("basis_file") or os.path.join(os.fspath(workdir), BASIS_NAME))


def frozen_trees(
    adapter_config: Mapping[str, Any],
    adapters_: Mapping[str, A.Adapter],
    key: jax.Array,
    workdir: str | os.PathLike,
) -> tuple[dict, str | None]:
    """The adapters' frozen trees per component, and the LiDB basis hash (None for other kinds).

    LiDB bases are read from :func:`basis_path` or generated once into it, so every stage that
    shares the file uses bit-identical bases; the other kinds have empty frozen trees.
    """
    if adapter_config["kind"] != "lidb":
        return {c: a.basis(key) for c, a in adapters_.items()}, None
    lidb = adapter_config["lidb"]
    return basis_io.load_or_create(
        basis_path(adapter_config, workdir), adapters_, key, a=lidb["a"], b=lidb["b"]
    )


def schedule(optim: Mapping[str, Any], steps: int | None = None) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then constant or cosine decay to ``final_lr_fraction``."""
    lr, warmup = float(optim["learning_rate"]), int(optim.get("warmup_steps", 0) or 0)
    kind = optim.get("schedule", "constant")
    if kind not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={kind!r}: choose from {SCHEDULES}")
    if kind == "cosine":
        if not steps:
            raise ValueError("a cosine schedule needs the number of steps")
        end = lr * float(optim.get("final_lr_fraction", 0.0))
    else:
        steps, end = warmup + 1, lr
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(int(steps), warmup + 1), end_value=end)


def clip_per_row(max_norm: float) -> optax.GradientTransformation:
    """Clips each row's gradient (leading axis: one identity each) to ``max_norm`` on its own."""

    def update(updates, state, params=None):
        del params
        sq = sum(
            jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree_util.tree_leaves(updates)
        )
        scale = jnp.minimum(1.0, max_norm / (jnp.sqrt(sq) + 1e-12))  # [K]
        return jax.tree_util.tree_map(
            lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), updates
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(
    optim: Mapping[str, Any], steps: int | None = None, *, per_row: bool = False
) -> optax.GradientTransformation:
    """AdamW with gradient clipping and :func:`schedule`.

    Args:
      optim: the ``optim`` config section.
      steps: total steps (needed by the cosine schedule).
      per_row: clip every row of a leading axis separately (batched pre-optimisation: rows are
        independent identities) instead of the global norm.
    """
    clip = clip_per_row(optim["grad_clip"]) if per_row else optax.clip_by_global_norm(optim["grad_clip"])
    return optax.chain(clip, optax.adamw(schedule(optim, steps), weight_decay=optim.get("weight_decay", 0.0)))
