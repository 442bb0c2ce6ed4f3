"""The target-quality probe: is a stage-1 recipe's output a function of the identity?

``python -m hdb_jax.train --config configs/probe.py`` runs stage 1 (:mod:`hdb_jax.stages.preopt`) with
one recipe (the config's ``preopt`` section) on a few identities, once per noise seed, all from
the same shared init and LiDB basis, and measures what a hypernetwork trained on such targets can
hope for:

* ``cos_within``: cosine of the dense updates ΔW (every adapted layer, concatenated) of two runs
  of one identity that differ only in their noise seed (views, VAE samples, noise, timesteps);
  1 means the target is a function of the identity, 0 means it is noise;
* ``cos_between``: the same cosine between different identities (same noise seed);
* ``cos_within_centred``: ``cos_within`` after removing the mean update over the probe's
  identities (what a hypernetwork must predict beyond the mean);
* ``oracle_identity``: the identity score (:class:`hdb_jax.toy.evaluator.ToyEvaluator`) of samples
  from each target merged into the base model, against the identity's reference render, with a
  95% bootstrap interval over identities x prompts x sample seeds (noise seeds averaged);
* ``loss_drop``: the relative drop of each identity's own fixed-draw loss (stage 1's record);
* ``dw_rel_norm``: ‖ΔW‖ / ‖W‖ per adapted layer (median and max);
* ``seconds_per_identity``: stage-1 wall time per identity run (compile included, stated apart).

Everything goes to ``<workdir>/probe.json``; a rerun reuses the pre-optimised runs already on disk.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping

import jax
import ml_collections
import numpy as np

from hdb_jax import adapters as A
from hdb_jax.blocks import build
from hdb_jax.data import identities as identities_lib
from hdb_jax.data import weights as weights_lib
from hdb_jax.eval import stats
from hdb_jax.stages import preopt
from hdb_jax.toy import evaluator as toy
from hdb_jax.toy import protocol as eval_protocol


def flat_deltas(adapters: Mapping[str, A.Adapter], trees, basis) -> np.ndarray:
    """``[N, D]``: every identity's dense ΔW, all adapted layers concatenated (float64)."""
    n = len(jax.tree_util.tree_leaves(trees)[0])
    rows = []
    for k in range(n):
        tree = jax.tree_util.tree_map(lambda x: x[k], trees)
        parts = [
            np.asarray(d, np.float64).ravel()
            for c in sorted(adapters)
            for d in adapters[c].deltas(tree[c], basis.get(c)).values()
        ]
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors (0 if either is zero)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def consistency(runs: np.ndarray) -> dict:
    """``runs [S, N, D]`` (S >= 2 noise seeds, N identities) -> cosines within and between identities.

    ``within``: mean over identities and seed pairs of the cosine of one identity's two runs;
    ``between``: mean over seeds and identity pairs of the cosine of two identities' runs.
    """
    s, n = runs.shape[:2]
    if s < 2:
        raise ValueError(f"consistency needs >= 2 noise seeds, got {s}")
    within_per_identity = [
        float(np.mean([cosine(runs[p, i], runs[q, i]) for p in range(s) for q in range(p + 1, s)]))
        for i in range(n)
    ]
    pairs = [cosine(runs[t, i], runs[t, j]) for t in range(s) for i in range(n) for j in range(i + 1, n)]
    centred = runs - runs.mean(axis=1, keepdims=True)  # each seed's mean over identities removed
    return {
        "within": float(np.mean(within_per_identity)),
        "within_per_identity": within_per_identity,
        "between": float(np.mean(pairs)) if pairs else float("nan"),
        # What a hypernetwork has to predict beyond the mean target (n >= 3 for it to mean much).
        "within_centred": float(
            np.mean(
                [
                    cosine(centred[p, i], centred[q, i])
                    for p in range(s)
                    for q in range(p + 1, s)
                    for i in range(n)
                ]
            )
        ),
    }


def relative_norms(adapters: Mapping[str, A.Adapter], params, tree, basis) -> np.ndarray:
    """``‖ΔW‖ / ‖W‖`` of every adapted layer of one identity's tree."""
    out = []
    for c in sorted(adapters):
        from flax import traverse_util

        flat = traverse_util.flatten_dict(params[c])
        for target in adapters[c].targets:
            kernel = np.asarray(flat[target.kernel_path], np.float64)
            delta = np.asarray(adapters[c].delta(target, tree[c], basis.get(c)), np.float64)
            out.append(np.linalg.norm(delta) / max(np.linalg.norm(kernel), 1e-12))
    return np.asarray(out)


def run_seeds(config, sd, params) -> list[dict]:
    """Stage 1 once per noise seed into ``<workdir>/seed_<s>`` (one basis file); timings per seed."""
    out = []
    for s in config.noise_seeds:
        cfg = config.preopt.copy_and_resolve_references()
        cfg.workdir = os.path.join(config.workdir, f"seed_{s}")
        cfg.noise_seed = int(s)
        cfg.adapter.basis_file = os.path.join(config.workdir, build.BASIS_NAME)
        t = time.perf_counter()
        result = preopt.train(cfg, sd, params)
        out.append({"noise_seed": int(s), "seconds": time.perf_counter() - t, "trained": len(result.trained)})
    return out


def oracle_scores(config, sd, params, adapters, basis, trees_per_seed, references, evaluator) -> np.ndarray:
    """Identity scores ``[N, S·P, K]``: identities x (noise seeds x prompts) x sample seeds."""
    e = config.eval
    protocol = eval_protocol.Protocol.from_config(e)  # the main job's sampling, no prior samples
    n = len(references)
    scores = np.zeros((n, len(trees_per_seed), len(e.prompts), e.seeds))
    for t, trees in enumerate(trees_per_seed):
        for i in range(n):
            tree = jax.tree_util.tree_map(lambda x: x[i], trees)
            merged = A.merge_all(params, adapters, tree, basis)
            drawn = protocol.draw(sd, merged)
            scores[i, t] = evaluator.identity_scores(drawn, references[i]).reshape(len(e.prompts), e.seeds)
    return scores.reshape(n, -1, e.seeds)


def run(config: ml_collections.ConfigDict) -> dict:
    """The probe job (``config.job = "probe"``): writes and returns ``<workdir>/probe.json``."""
    t0 = time.perf_counter()
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sd, params = build.base_model(config.preopt.model)
    timings = run_seeds(config, sd, params)
    adapters = build.adapters(config.preopt.adapter, params)
    basis, basis_hash = build.frozen_trees(
        config.preopt.adapter, adapters, jax.random.PRNGKey(0), os.fspath(workdir)
    )
    loaded = [weights_lib.load(workdir / f"seed_{s}", adapters, basis_hash) for s in config.noise_seeds]
    ids = [int(r["identity"]) for r in loaded[0][0]]
    for s, (rows, _) in zip(config.noise_seeds, loaded):
        if [int(r["identity"]) for r in rows] != ids:
            raise ValueError(f"{workdir}/seed_{s}: identities {[r['identity'] for r in rows]} != {ids}")
    runs = np.stack([flat_deltas(adapters, trees, basis) for _, trees in loaded])  # [S, N, D]
    cons = consistency(runs)
    drops = np.array([[1 - r["final_loss"] / r["loss_before"] for r in rows] for rows, _ in loaded])  # [S, N]
    norms = np.concatenate(
        [
            relative_norms(adapters, params, jax.tree_util.tree_map(lambda x: x[i], trees), basis)
            for _, trees in loaded
            for i in range(len(ids))
        ]
    )
    source = identities_lib.SyntheticIdentities(tuple(ids), 1, sd.default_resolution, config.preopt.data.seed)
    references = [source.views(i, [0])[0] for i in ids]
    evaluator = toy.ToyEvaluator.load()
    t = time.perf_counter()
    scores = oracle_scores(
        config, sd, params, adapters, basis, [tr for _, tr in loaded], references, evaluator
    )
    p = config.preopt
    report = {
        "recipe": {
            "adapter": p.adapter.kind,
            "lidb": dict(p.adapter.lidb),
            "learning_rate": p.optim.learning_rate,
            "schedule": p.optim.schedule,
            "weight_decay": p.optim.weight_decay,
            "steps": p.steps,
            "views": p.data.images_per_identity,
            "samples_per_step": p.samples_per_step,
            "frozen_factors": list(p.frozen_factors),
        },
        "identities": ids,
        "noise_seeds": [int(s) for s in config.noise_seeds],
        "oracle_identity": stats.bootstrap(scores, replicates=config.eval.replicates),
        "oracle_identity_per_identity": [float(x) for x in scores.mean(axis=(1, 2))],
        "cos_within": cons["within"],
        "cos_within_per_identity": cons["within_per_identity"],
        "cos_between": cons["between"],
        "cos_within_centred": cons["within_centred"],
        "loss_drop": {"mean": float(drops.mean()), "per_identity": [float(x) for x in drops.mean(axis=0)]},
        "dw_rel_norm": {"median": float(np.median(norms)), "max": float(np.max(norms))},
        # Runs this invocation trained (a rerun that reuses them records none).
        "seconds_per_identity": (
            sum(x["seconds"] for x in timings) / max(1, sum(x["trained"] for x in timings))
            if any(x["trained"] for x in timings)
            else None
        ),
        "stage1_runs": timings,
        "sampling_seconds": time.perf_counter() - t,
        "total_seconds": time.perf_counter() - t0,
    }
    (workdir / "probe.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("oracle_identity", "cos_within", "cos_between", "loss_drop")}))
    return report
