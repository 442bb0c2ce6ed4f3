"""What stage 2 measures and records besides its loss: held-out identities, the bundle's shipped
check, the targets' provenance, and the in-run validation grid.

Every figure of a bundle's card comes from here or from the training loop (see
:mod:`hdb_jax.hypernet.card`); ``s`` is the :class:`hdb_jax.stages.hypernet.Setup` of the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax import adapters as A
from hdb_jax.blocks import build
from hdb_jax.common import images
from hdb_jax.data import identities as identities_lib
from hdb_jax.data import weights as weights_lib
from hdb_jax.hypernet import data as hdata
from hdb_jax.hypernet import decoder as dec
from hdb_jax.hypernet.objective import make_eval, r_squared


def evaluate_heldout(config, sd, net, adapters_, params, basis, hyper_params) -> dict:
    """Held-out identities: denoising loss on their *other* views with predicted vs zero weights,
    and (with ``data.heldout_preopt_dir``) R² of the predictions against their own targets."""
    out: dict[str, Any] = {}
    ids = list(config.data.heldout)  # synthetic ids, or sub-folder names of the identities folder
    if not ids:
        return out
    views = config.data.heldout_views
    res = build.resolution(config.model, sd)
    refs, others = hdata.heldout_views(identities_lib.from_config(config.data, res, ids), ids, views)
    prompt = np.asarray(sd.tokenize([config.data.prompt]))[0]
    frozen = {
        "params": params,
        "basis": basis,
        "hyper": {},
    }  # evaluation: every hypernet parameter is one tree
    evaluate = jax.jit(make_eval(sd, net, adapters_))
    predicted, zero = evaluate(
        hyper_params,
        frozen,
        jnp.asarray(refs),
        jnp.asarray(others),
        jnp.asarray(np.stack([prompt] * (len(ids) * views))),
        jax.random.PRNGKey(config.seed + 7),
    )
    out.update(predicted=float(predicted), zero=float(zero), identities=len(ids), views=views)
    if config.data.heldout_preopt_dir:
        held_ids, held_tokens = hdata.targets(config.data.heldout_preopt_dir, adapters_, None)
        held = identities_lib.from_config(config.data, res, held_ids)
        held_refs = hdata.reference_views(held, held_ids)
        pred = hdata.predict_tokens(net, hyper_params, held_refs)
        out["r2"] = r_squared(pred, held_tokens, net.kind)
        out["r2_identities"] = len(held_ids)
    return out


def validation(config, sd, s, params, frozen):
    """In-run validation: held-out references (top row) and "a sks face" sampled with the prediction."""
    from hdb_jax.blocks import sample

    ids = list(config.data.heldout)[:4]
    if not ids:
        return None
    refs, _ = hdata.heldout_views(identities_lib.from_config(config.data, s.resolution, ids), ids, 1)
    basis = jax.device_get(frozen["basis"])

    def validate(state, step):
        hyper = {**jax.device_get(frozen["hyper"]), **jax.device_get(state["trainable"])}
        tokens = hdata.predict_tokens(s.net, hyper, refs, batch=len(ids))
        drawn = []
        for tok in tokens:
            merged = A.merge_all(
                params, s.adapters, dec.tokens_to_tree(jnp.asarray(tok), s.adapters, s.net.kind), basis
            )
            drawn.append(
                sample.sample(
                    sd,
                    merged,
                    [config.data.prompt],
                    [0],
                    num_steps=config.validate_sample_steps,
                    guidance_scale=3.0,
                    batch_size=1,
                    progress=False,
                )[0]
            )
        grid = images.grid(np.concatenate([images.to_uint8(refs), np.stack(drawn)]), cols=len(ids))
        return {"images": {"heldout_predictions": grid}}

    return validate


HELDOUT_CHECK = "heldout_targets.safetensors"


def display_path(source: str) -> str:
    """A model path as a card shows it: relative to the repository when it is inside it."""
    root = Path(__file__).resolve().parents[2]
    path = Path(source).resolve() if os.path.exists(source) else None
    return os.fspath(path.relative_to(root)) if path is not None and path.is_relative_to(root) else source


def heldout_check(config, s, hyper_params, count: int = 8) -> dict | None:
    """The first ``count`` held-out identities' targets and the bundle's R² on them."""
    if not config.data.heldout_preopt_dir:
        return None
    ids, tokens = hdata.targets(config.data.heldout_preopt_dir, s.adapters, None)
    ids, tokens = ids[:count], np.asarray(tokens[:count], np.float32)
    held = identities_lib.from_config(config.data, s.resolution, ids)
    refs = hdata.reference_views(held, ids)
    r2 = r_squared(hdata.predict_tokens(s.net, hyper_params, refs), tokens, s.net.kind)
    return {
        "tensors": {"tokens": tokens},
        "metadata": {"identities": json.dumps([int(i) for i in ids])},
        "record": {"file": HELDOUT_CHECK, "identities": len(ids), "r2": r2},
    }


def target_record(config) -> dict | None:
    """What the targets are: stage 1's recorded settings per dataset and the target-quality probe's figures."""
    if not config.data.preopt_dir:
        return None
    record: dict[str, Any] = {
        "datasets": [weights_lib.settings(p) for p in str(config.data.preopt_dir).split(",") if p]
    }
    if config.data.target_probe:  # a probe.json of hdb_jax.jobs.probe on the same stage-1 recipe
        probe = json.loads(Path(config.data.target_probe).read_text())
        keys = (
            "identities",
            "cos_within",
            "cos_between",
            "cos_within_centred",
            "oracle_identity",
            "loss_drop",
        )
        record["probe"] = {k: probe[k] for k in keys if k in probe}
        record["probe"]["file"] = display_path(os.fspath(config.data.target_probe))
    return record


PHASES = "phases.json"


def record_phase(config, workdir: str, start: int, end: int) -> list[dict]:
    """Appends this invocation's steps and loss settings to ``<workdir>/phases.json``; returns all phases.

    A run resumed with other settings (e.g. the weight term alone, then the denoising term on
    fresh identities) is one bundle trained in phases; its card lists them.
    """
    path = Path(workdir) / PHASES
    phases = json.loads(path.read_text()) if path.is_file() else []
    if end > start or not phases:
        phases = [p for p in phases if p["to_step"] <= start] + [
            {
                "from_step": int(start),
                "to_step": int(end),
                "alpha": float(config.loss.alpha),
                "beta": float(config.loss.beta),
                "regress_only_steps": int(config.loss.regress_only_steps),
                "fresh_per_batch": int(config.data.fresh_per_batch),
                "schedule_steps": int(config.steps),
            }
        ]
        path.write_text(json.dumps(phases, indent=1))
    return phases
