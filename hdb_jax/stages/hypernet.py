"""Stage 2 of HyperDreamBooth: train the hypernetwork, sharded over a mesh, on one or many hosts.

The loss and the pure steps are in :mod:`hdb_jax.hypernet.objective`; this module builds
the mesh, the data and the loop around them.

Distribution is configuration: the mesh axes (``data``, ``fsdp``) and the sharding rules come
from the config; the state is created directly in its shardings from ``jax.eval_shape``; the
step is ``jax.jit`` with explicit in/out shardings and a donated state, compiled ahead of time
(compile time and memory analysis logged); each process loads only its slice of every global
batch. ``config.dry_run`` builds mesh, shardings and the compiled step on shape-only inputs --
no weights, no data -- prints them and stops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hdb_jax import adapters as A
from hdb_jax.blocks import build, loop
from hdb_jax.common import sharding, tensorfile
from hdb_jax.data import identities as identities_lib
from hdb_jax.hypernet import bundle, card
from hdb_jax.hypernet import data as hdata
from hdb_jax.hypernet import decoder as dec
from hdb_jax.hypernet import evaluate as hevaluate
from hdb_jax.hypernet.evaluate import HELDOUT_CHECK, evaluate_heldout  # noqa: F401  (public API)
from hdb_jax.hypernet.model import HyperNetwork, Initializer, abstract_params, build_hypernet, split_params
from hdb_jax.hypernet.objective import (  # noqa: F401  (the stage's public API)
    factor_distance,
    make_eval,
    make_step,
    r_squared,
    weight_distance,
    weight_products,
)
from hdb_jax.sd.fingerprint import params_fingerprint


# -------------------------------------------------------------------- losses
def _hypernet(config, adapters):
    h = config.net
    return build_hypernet(
        h.encoder,
        adapters,
        A.LiDB(**config.adapter.lidb.to_dict()),
        iterations=h.iterations,
        mode=h.mode,
        num_blocks=h.num_blocks,
        num_heads=h.num_heads,
        train_encoder=h.train_encoder,
        encoder_path=h.encoder_path or None,
        width=h.width or None,
        offset=h.offset,
    )


def sharded_step(config, sd, net, adapters, optimizer, mesh, abstract_state, abstract_frozen, *, wrap=None):
    """The jitted step with explicit shardings from ``config.sharding_rules`` on ``mesh``.

    ``wrap`` is applied before ``jax.jit`` (tests pin traces with ``chex.assert_max_traces``).

    Returns:
      ``(step, state_shardings, frozen_shardings, batch_sharding)``; the state is donated.
    """
    rules = [tuple(r) for r in config.sharding_rules]
    state_sh = sharding.tree_shardings(abstract_state, mesh, rules)
    frozen_sh = sharding.tree_shardings(abstract_frozen, mesh, rules)
    data_sh = sharding.batch_sharding(mesh)
    step_fn = make_step(
        sd,
        net,
        adapters,
        optimizer,
        config.loss.alpha,
        config.loss.beta,
        config.loss.regress_only_steps,
        config.loss.space,
    )
    step = jax.jit(
        wrap(step_fn) if wrap is not None else step_fn,
        donate_argnums=(0,),
        in_shardings=(state_sh, frozen_sh, data_sh, None),
        out_shardings=(state_sh, None),
    )
    return step, state_sh, frozen_sh, data_sh


def _with_shardings(tree, shardings):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


@dataclasses.dataclass
class Setup:
    """Everything built before the first step: the mesh, the networks and the compiled step."""

    mesh: Any
    net: HyperNetwork
    adapters: dict
    optimizer: Any
    compiled: Callable
    state_sh: Any
    frozen_sh: Any
    init_all: Callable  # (key, encoder weights or None) -> (state, frozen hypernetwork params)
    init: Initializer  # its ``load_encoder()`` reads the pretrained encoder (None: random)
    summary: dict
    resolution: int  # the image side (:func:`hdb_jax.blocks.build.resolution`)


def setup(config: ml_collections.ConfigDict, sd, abstract_sd: Mapping[str, Any]) -> Setup:
    """Builds mesh, hypernetwork, optimizer and shardings and AOT-compiles the step (shapes only)."""
    mesh = sharding.make_mesh(config.mesh.to_dict())
    if config.batch_size % mesh.size:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be a multiple of the mesh's {mesh.size} devices"
        )
    adapters_ = build.adapters(config.adapter, abstract_sd)
    net, init = _hypernet(config, adapters_)
    optimizer = build.optimizer(config.optim, config.steps)

    def init_all(k, encoder):
        """``(state, frozen hypernetwork params)``; ``encoder``: pretrained weights or None."""
        trainable, frozen_h = split_params(net, init(k, encoder_params=encoder))
        return {
            "step": jnp.zeros((), jnp.int32),
            "trainable": trainable,
            "opt_state": optimizer.init(trainable),
        }, frozen_h

    abstract_encoder = abstract_params(net)["encoder"]  # shapes only: no weights are read here
    abstract_state, abstract_hyper = jax.eval_shape(init_all, jax.random.PRNGKey(0), abstract_encoder)
    abstract_frozen = {
        "params": abstract_sd,
        "basis": {c: a.abstract_basis() for c, a in adapters_.items()},
        "hyper": abstract_hyper,
    }
    step, state_sh, frozen_sh, data_sh = sharded_step(
        config, sd, net, adapters_, optimizer, mesh, abstract_state, abstract_frozen
    )
    n_tok, width = len(dec.token_layout(adapters_)), dec.token_width(net.kind)
    b, res = config.batch_size, build.resolution(config.model, sd)
    image = jax.ShapeDtypeStruct((b, res, res, 3), jnp.float32)
    abstract_batch = {
        "images": image,
        "targets": image,
        "input_ids": jax.ShapeDtypeStruct((b, sd.max_text_length), jnp.int32),
        "target_tokens": jax.ShapeDtypeStruct((b, n_tok, width), jnp.float32),
        "has_target": jax.ShapeDtypeStruct((b,), jnp.float32),
    }
    t0 = time.perf_counter()
    key = jax.random.PRNGKey(0)
    compiled = step.lower(
        _with_shardings(abstract_state, state_sh),
        _with_shardings(abstract_frozen, frozen_sh),
        _with_shardings(abstract_batch, {k: data_sh for k in abstract_batch}),
        jax.ShapeDtypeStruct(key.shape, key.dtype),
    ).compile()
    memory = compiled.memory_analysis()
    summary = {
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "processes": jax.process_count(),
        "compile_s": round(time.perf_counter() - t0, 2),
        "tokens": n_tok,
        "token_width": width,
        "trainable_params": int(sum(x.size for x in jax.tree_util.tree_leaves(abstract_state["trainable"]))),
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
    }
    if jax.process_index() == 0:
        print("hypernet step: " + json.dumps(summary), flush=True)
    return Setup(mesh, net, adapters_, optimizer, compiled, state_sh, frozen_sh, init_all, init, summary, res)


# -------------------------------------------------------------------- training
def _apply(compiled, state, batch, *, frozen, rng):
    return compiled(state, frozen, batch, rng)


@dataclasses.dataclass
class HypernetResult:
    """What :func:`train` returns. A run stopped early (``stop_after``, a signal) has no held-out
    figures and no bundle yet; rerunning the same command resumes it."""

    state: dict  # {"step", "trainable", "opt_state"}, sharded as the run left it
    history: dict  # step -> logged scalars
    summary: dict  # the mesh, parameter counts and compiled memory, as printed at the start
    workdir: str
    basis_hash: str  # the LiDB basis file the targets were pre-optimised against
    loop: loop.LoopResult
    r2_train: float | None = None  # R² of predicted vs pre-optimised tokens on training identities
    heldout: dict | None = None  # held-out identities' figures (:func:`evaluate_heldout`)
    bundle: str | None = None  # the bundle directory written (process 0 only)


def train(config: ml_collections.ConfigDict, sd, params: Mapping[str, Any]) -> HypernetResult:
    """Trains (or resumes) the hypernetwork on the base model ``(sd, params)``; writes its bundle."""
    workdir = os.path.abspath(config.workdir)
    k_hyper, k_basis, k_train = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    s = setup(config, sd, jax.eval_shape(lambda: params))
    basis, basis_hash = build.frozen_trees(config.adapter, s.adapters, k_basis, workdir)
    n_tok, width = len(dec.token_layout(s.adapters)), dec.token_width(s.net.kind)
    if config.data.preopt_dir:
        identities, tokens = hdata.targets(config.data.preopt_dir, s.adapters, basis_hash)
        if config.data.max_identities:  # the first N of the dataset (scaling studies)
            identities, tokens = (
                identities[: config.data.max_identities],
                tokens[: config.data.max_identities],
            )
    else:
        identities, tokens = (
            list(identities_lib.from_config(config.data, s.resolution).identities),
            None,
        )
    source = identities_lib.from_config(config.data, s.resolution, identities)
    data = hdata.Data(
        source,
        identities,
        tokens,
        np.asarray(sd.tokenize([config.data.prompt]))[0],
        config.batch_size,
        config.data.seed,
        (n_tok, width),
        config.data.denoise_on,
        fresh=config.data.fresh_per_batch,
        fresh_source=(
            identities_lib.from_config(config.data, s.resolution, [])
            if config.data.fresh_per_batch and config.data.source == "synthetic"
            else None
        ),
    )
    # The pretrained encoder goes in as an argument: closed over, it would be compiled in as constants.
    state, hyper_frozen = jax.jit(s.init_all, out_shardings=(s.state_sh, s.frozen_sh["hyper"]))(
        k_hyper, s.init.load_encoder()
    )
    if config.net.offset and tokens is not None:  # θ̂_0 = the targets' mean: step 0 predicts the mean
        mean = jax.device_put(
            np.asarray(tokens, np.float32).mean(axis=0), s.state_sh["trainable"]["decoder"]["offset"]
        )
        decoder = {**state["trainable"]["decoder"], "offset": mean}
        state = {**state, "trainable": {**state["trainable"], "decoder": decoder}}
    frozen = jax.device_put({"params": params, "basis": basis, "hyper": hyper_frozen}, s.frozen_sh)
    with loop.open_run(workdir, config) as run:
        writer = run.writer
        start, state = run.restore(state, name="hypernet")  # restored into the state's shardings
        if start:
            print(f"hypernet: on mesh {dict(s.mesh.shape)}")
        validate = hevaluate.validation(config, sd, s, params, frozen) if config.validate_every else None
        result = loop.train(
            state,
            lambda st, b: _apply(s.compiled, st, b, frozen=frozen, rng=k_train),
            lambda step: sharding.global_batch(lambda rows: data.load(step, rows), config.batch_size, s.mesh),
            config,
            start=start,
            run=run,
            validate=validate,
            name="hypernet",
        )
        out = HypernetResult(
            state=result.state,
            history=result.history,
            summary=s.summary,
            workdir=workdir,
            basis_hash=basis_hash,
            loop=result,
        )
        if result.stopped_early:
            return out
        hyper_params = {**jax.device_get(frozen["hyper"]), **jax.device_get(result.state["trainable"])}
        if tokens is not None:
            subset = np.arange(min(len(identities), config.data.r2_subset))
            refs = hdata.reference_views(source, [identities[i] for i in subset])
            out.r2_train = r_squared(
                hdata.predict_tokens(s.net, hyper_params, refs), tokens[subset], s.net.kind
            )
        host_params = jax.device_get(frozen["params"])
        out.heldout = hevaluate.evaluate_heldout(
            config, sd, s.net, s.adapters, host_params, jax.device_get(frozen["basis"]), hyper_params
        )
        writer.scalars(
            result.step, {f"heldout/{k}": v for k, v in out.heldout.items() if isinstance(v, float)}
        )
        if out.r2_train is not None:
            writer.scalars(result.step, {"train/r2": out.r2_train})
    check = hevaluate.heldout_check(config, s, hyper_params) if jax.process_index() == 0 else None
    extra = {
        "steps": result.step,
        "final_loss": result.last(),
        "identities": len(identities),
        "preopt_dirs": [os.path.abspath(p) for p in str(config.data.preopt_dir).split(",") if p],
        "loss": config.loss.to_dict(),
        "targets": hevaluate.target_record(config),
        "r2_train": out.r2_train,
        "r2_subset": int(min(len(identities), config.data.r2_subset)),
        "heldout": out.heldout,
        "train_s": round(result.seconds, 1),
    }
    if check is not None:
        extra["heldout_check"] = check["record"]
    phases = hevaluate.record_phase(config, workdir, start, result.step) if jax.process_index() == 0 else []
    if len(phases) > 1:  # a run resumed with other loss settings: the card lists each phase
        extra["phases"] = phases
    if jax.process_index() == 0:
        if out.heldout:
            print("held-out: " + json.dumps(out.heldout))
            with open(os.path.join(workdir, "heldout.json"), "w") as f:
                json.dump({**out.heldout, "r2_train": out.r2_train}, f, indent=1)
        out.bundle = os.fspath(
            bundle.save(
                bundle.bundle_dir(workdir),
                s.net,
                hyper_params,
                patterns={"unet": config.adapter.unet_patterns, "text_encoder": config.adapter.text_patterns},
                arch=config.net.to_dict(),
                base_fingerprint=params_fingerprint(host_params),
                basis_file=build.basis_path(config.adapter, workdir),
                basis_hash=basis_hash,
                extra=extra,
            )
        )
        if check is not None:  # a few held-out targets travel with the bundle: its R² can be re-measured
            tensorfile.write(Path(out.bundle) / hevaluate.HELDOUT_CHECK, check["tensors"], check["metadata"])
        (Path(out.bundle) / "MODEL_CARD.md").write_text(
            card.model_card(config, extra, hevaluate.display_path(config.model.source))
        )
    return out
