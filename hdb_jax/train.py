"""``python -m hdb_jax.train --config configs/<exp>.py[:knobs] --config.x=y``.

The entry point parses flags and calls an importable job function chosen by ``config.job``;
tests and notebooks call the same functions.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdb_jax import adapters as A
from hdb_jax import diffusion
from hdb_jax.adapters import table
from hdb_jax.data.synthetic import SyntheticFaces
from hdb_jax.sd import loading, model

COMPONENTS_WITH_ADAPTERS = ("unet", "text_encoder")


def build_model(config: ml_collections.ConfigDict, key: jax.Array):
    """``(sd, params)`` for ``config.model.source``: ``tiny`` (random init) or a directory/hub id."""
    if config.model.source == "tiny":
        sd = model.tiny(resolution=config.model.resolution)
        return sd, sd.init_params(key)
    return loading.load_pretrained(config.model.source)


def build_adapters(config: ml_collections.ConfigDict, abstract: Mapping[str, Any]) -> dict[str, A.Adapter]:
    """One adapter per component that has target patterns, all of ``config.adapter.kind``."""
    kind_name = config.adapter.kind
    if kind_name not in A.KINDS:
        raise ValueError(f"config.adapter.kind={kind_name!r}: choose from {sorted(A.KINDS)}")
    kind = A.kind_from_config(kind_name, **config.adapter[kind_name].to_dict())
    patterns = {"unet": config.adapter.unet_patterns, "text_encoder": config.adapter.text_patterns}
    return {
        component: A.Adapter.create(kind, abstract[component], list(patterns[component]), component)
        for component in COMPONENTS_WITH_ADAPTERS
        if patterns[component]
    }


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with global-norm clipping."""
    return optax.chain(
        optax.clip_by_global_norm(config.optim.grad_clip),
        optax.adamw(config.optim.learning_rate, weight_decay=config.optim.weight_decay),
    )


def make_train_step(sd: model.StableDiffusion, adapters: Mapping[str, A.Adapter], optimizer) -> Callable:
    """The jitted ``train_step(state, frozen, batch, rng) -> (state, metrics)``.

    ``state = {"step", "trainable": {component: tree}, "opt_state"}`` is donated;
    ``frozen = {"params": base params, "basis": {component: tree}}`` is not. Gradients are taken
    with respect to the adapter trees only. The step number is folded into ``rng``.
    """
    sched_state = sd.noise_scheduler.create_state()

    def loss_fn(trainable, frozen, batch, key):
        with A.attach_all(adapters, trainable, frozen["basis"]):
            return diffusion.denoising_loss(
                sd, sched_state, frozen["params"], batch["images"], batch["input_ids"], key
            )

    def train_step(state, frozen, batch, rng):
        key = jax.random.fold_in(rng, state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["trainable"], frozen, batch, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, metrics

    return jax.jit(train_step, donate_argnums=(0,))


def adapter_demo(config: ml_collections.ConfigDict) -> dict:
    """Trains adapters on renders of one synthetic identity; prints losses and parameter tables.

    Returns:
      ``{"losses": [...], "num_params": int}``.
    """
    key = jax.random.PRNGKey(config.seed)
    k_model, k_init, k_basis, k_train = jax.random.split(key, 4)
    t0 = time.perf_counter()
    sd, params = build_model(config, k_model)
    adapters = build_adapters(config, params)
    trainable = {c: a.init(k_init) for c, a in adapters.items()}
    basis = {c: a.basis(jax.random.fold_in(k_basis, config.adapter.basis_seed)) for c, a in adapters.items()}
    optimizer = make_optimizer(config)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}
    frozen = {"params": params, "basis": basis}

    source = SyntheticFaces([config.data.identity], config.data.images, resolution=config.model.resolution)
    images = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float32) / 127.5 - 1.0
    ids = sd.tokenize([config.data.prompt] * len(source))
    batch = {"images": jnp.asarray(images[: config.data.batch_size]), "input_ids": jnp.asarray(ids[: config.data.batch_size])}
    n_params = sum(a.num_params() for a in adapters.values())
    print(f"model {sd.name}: built in {time.perf_counter() - t0:.1f}s; adapter {config.adapter.kind}: "
          + ", ".join(f"{c} {len(a.targets)} layers" for c, a in adapters.items())
          + f", {n_params:,} trainable scalars")

    train_step = make_train_step(sd, adapters, optimizer)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, frozen, batch, k_train).compile()
    print(f"compiled train step in {time.perf_counter() - t0:.1f}s")
    losses = []
    t0 = time.perf_counter()
    for step in range(config.steps):
        state, metrics = compiled(state, frozen, batch, k_train)
        if (step + 1) % config.log_every == 0 or step == 0 or step + 1 == config.steps:
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss} at step {step + 1}")
            losses.append(loss)
            print(f"step {step + 1:4d}  loss {loss:.4f}  grad_norm {float(metrics['grad_norm']):.3e}")
    print(f"{config.steps} steps in {time.perf_counter() - t0:.1f}s")
    print("\nadapter parameters of this model:")
    print(table.format_rows(table.standard_rows(jax.eval_shape(lambda: params), A.LiDB(**_lidb_hp(config)))))
    print("\nadapter parameters of SD 1.5 (from shapes, methods.md defaults):")
    print(table.format_rows(table.standard_rows(model.sd15_shapes().abstract_params())))
    return {"losses": losses, "num_params": n_params, "state": state}


def _lidb_hp(config) -> dict:
    return {k: v for k, v in config.adapter.lidb.to_dict().items() if k in ("a", "b", "rank")}


JOBS: dict[str, Callable[[ml_collections.ConfigDict], Any]] = {"adapter_demo": adapter_demo}


def run(config: ml_collections.ConfigDict):
    """Runs the job ``config.job`` names."""
    if config.job not in JOBS:
        raise ValueError(f"config.job={config.job!r}: choose from {sorted(JOBS)}")
    return JOBS[config.job](config)


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "configs/<exp>.py[:knobs]", lock_config=True)
    flags.mark_flag_as_required("config")

    def _main(_):
        run(config_flag.value)

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
