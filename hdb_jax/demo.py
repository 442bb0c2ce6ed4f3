"""The embedded default job: HyperDreamBooth end to end in the toy world, with the paper's ablation.

``python -m hdb_jax.train --config configs/demo.py`` on the shipped toy base model:

1. pre-optimise LiDB weights for ``preopt.data.identities`` synthetic identities (stage 1);
2. train the hypernetwork on them (stage 2), which writes its bundle;
3. personalise each held-out identity from one render (its reference) in four ways -- the
   paper's ablation rows: ``base`` (no personalisation), ``hypernet`` (prediction only),
   ``hypernet+finetune`` (prediction + rank-relaxed fast finetune) and ``finetune_from_zero``
   (the same finetune from a zero prediction);
4. score each: the held-out denoising loss on the identity's *other* renders with "a sks face",
   and the identity similarity (:mod:`hdb_jax.toy.identity`) of sampled images to the reference;
5. write ``report.json``, each identity's personal weights (``personal/<identity>/``, with the
   ``lora/`` export) and ``grid.png``: one row per identity, the reference, then
   ``samples_per_row`` seeds of each row of the ablation, in the order above.

Stages 1-2 resume like their own jobs (rerun the command); a finished stage is skipped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hdb_jax import adapters as A
from hdb_jax import build, diffusion, images, metrics, preopt, sample
from hdb_jax.data import synthetic
from hdb_jax.hypernet import bundle as bundle_lib
from hdb_jax.hypernet import train as hypernet_train
from hdb_jax.personalize import Personalizer, enable_compile_cache, zero_prediction
from hdb_jax.toy import identity as identity_lib

ROWS = ("base", "hypernet", "hypernet+finetune", "finetune_from_zero")


def _render(identity_id: int, index: int, resolution: int, seed: int) -> np.ndarray:
    ident = synthetic.identity(identity_id, seed)
    return synthetic.render_face(ident, synthetic.variation(identity_id, index, seed, style="photo"), resolution)


def run_stages(config: ml_collections.ConfigDict, sd, params) -> dict[str, float]:
    """Stages 1 and 2 on the base model ``(sd, params)`` (skipped when their outputs exist); wall times."""
    times = {}
    t = time.perf_counter()
    preopt.train(config.preopt, sd, params)
    times["preopt"] = time.perf_counter() - t
    bundle_dir = Path(config.hypernet.workdir) / "hypernet"
    t = time.perf_counter()
    if not (bundle_dir / bundle_lib.WEIGHTS).is_file():
        hypernet_train.train(config.hypernet, sd, params)
    times["hypernet"] = time.perf_counter() - t
    return times


def evaluate(config: ml_collections.ConfigDict, p: Personalizer, scorer) -> tuple[dict, np.ndarray]:
    """Personalises every held-out identity four ways; returns per-row metrics and the grid images."""
    e = config.eval
    res = p.sd.default_resolution
    loss_fn = diffusion.make_heldout_loss(p.sd, e.noise_draws)
    prompt_ids = np.asarray(p.sd.tokenize([config.personalize.prompt] * e.heldout_views))
    seeds = list(range(e.samples_per_identity))
    per_row: dict[str, dict[str, list]] = {r: {"heldout_loss": [], "identity_score": [], "seconds": []} for r in ROWS}
    grid = []
    bar = metrics.progress(len(e.identities), desc="personalise + score")
    for n, identity_id in enumerate(e.identities):
        reference = _render(identity_id, 0, res, config.data_seed)
        views = np.stack([_render(identity_id, i, res, config.data_seed) for i in range(1, e.heldout_views + 1)])
        pixels = jnp.asarray(images.to_unit_range(views))
        key = jax.random.PRNGKey(config.seed + n)
        t = time.perf_counter()
        predicted = jax.block_until_ready(p.predict(reference))
        t_predict = time.perf_counter() - t
        models = {"base": (p.params, 0.0)}
        models["hypernet"] = (A.merge_all(p.params, p.bundle.adapters, predicted, p.bundle.basis), t_predict)
        for row, start in (("hypernet+finetune", predicted), ("finetune_from_zero", zero_prediction(p.bundle.adapters))):
            t = time.perf_counter()
            adapters, tree, _ = p.finetune_from(start, reference, key)
            jax.block_until_ready(tree)
            seconds = time.perf_counter() - t + (t_predict if row == "hypernet+finetune" else 0.0)
            models[row] = (A.merge_all(p.params, adapters, tree), seconds)
            if row == "hypernet+finetune":
                p.export(Path(config.workdir) / "personal" / str(identity_id), adapters, tree,
                         extra={"identity": identity_id, "source": "synthetic render 0"})
        row_images = [reference]
        for row in ROWS:
            params, seconds = models[row]
            loss = float(loss_fn(params, pixels, prompt_ids, jax.random.PRNGKey(config.seed + 1000 + n)))
            drawn = sample.sample(p.sd, params, [config.personalize.prompt] * len(seeds), seeds, num_steps=e.sample_steps,
                                  guidance_scale=e.guidance_scale, batch_size=len(seeds), progress=False)
            score = float(np.mean(scorer.similarity(drawn, reference)))
            per_row[row]["heldout_loss"].append(loss)
            per_row[row]["identity_score"].append(score)
            per_row[row]["seconds"].append(seconds)
            row_images.extend(drawn[: e.samples_per_row])
        grid.append(np.stack(row_images))
        bar.update(1)
    bar.close()
    return per_row, np.concatenate(grid)


def run(config: ml_collections.ConfigDict) -> dict:
    """The demo job (``config.job = "demo"``): stages 1-3 and the report."""
    t0 = time.perf_counter()
    enable_compile_cache(config.personalize.compile_cache)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    scorer = identity_lib.load(config.eval.identity_encoder or None)
    sd, params = build.base_model(config.personalize.model)  # the one load of the base model
    times = run_stages(config, sd, params)
    p = Personalizer.load(config.personalize, sd=sd, params=params)
    t = time.perf_counter()
    compile_s = p.compile()
    per_row, grid = evaluate(config, p, scorer)
    times["personalize_and_score"] = time.perf_counter() - t
    reference_scores = _reference_scores(config, scorer, sd.default_resolution)
    rows = [{"row": r, "heldout_loss": float(np.mean(v["heldout_loss"])), "identity_score": float(np.mean(v["identity_score"])),
             "seconds_per_identity": float(np.mean(v["seconds"])), "per_identity": {k: [round(x, 4) for x in v[k]]
                                                                                     for k in ("heldout_loss", "identity_score")}}
            for r, v in per_row.items()]
    cols = 1 + len(ROWS) * config.eval.samples_per_row
    grid_path = images.save_grid(grid, workdir / "grid.png", cols=cols)
    hyper_heldout = Path(config.hypernet.workdir) / "heldout.json"
    report = {
        "rows": rows,
        "identities": list(config.eval.identities),
        "reference_scores": reference_scores,
        "hypernet_heldout": json.loads(hyper_heldout.read_text()) if hyper_heldout.is_file() else None,
        "finetune": {k: config.personalize.relax[k] for k in ("variant", "rank", "steps", "learning_rate", "batch_size")},
        "compile_s": round(compile_s, 2),
        "times_s": {k: round(v, 1) for k, v in {**times, "total": time.perf_counter() - t0}.items()},
        "grid": os.fspath(grid_path),
        "grid_layout": f"rows: identities {list(config.eval.identities)}; columns: reference, then {config.eval.samples_per_row} "
                       f"seeds of each of {list(ROWS)}",
        "base_model": config.personalize.model.source,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=1))
    print(format_report(report))
    return report


def _reference_scores(config, scorer, resolution: int) -> dict[str, float]:
    """What the identity score means here: same identity (other renders) vs other identities."""
    ids = list(config.eval.identities)
    refs = np.stack([_render(i, 0, resolution, config.data_seed) for i in ids])
    others = np.stack([_render(i, 1, resolution, config.data_seed) for i in ids])
    sims = scorer.embed(others) @ scorer.embed(refs).T  # [n, n]
    n = len(ids)
    off = (sims.sum() - np.trace(sims)) / max(n * (n - 1), 1)
    return {"same_identity_render": float(np.mean(np.diag(sims))), "other_identity_render": float(off) if n > 1 else None}


def format_report(report: Mapping[str, Any]) -> str:
    lines = [f"{'row':<20}{'held-out loss':>14}{'identity score':>16}{'s / identity':>14}"]
    for r in report["rows"]:
        lines.append(f"{r['row']:<20}{r['heldout_loss']:>14.4f}{r['identity_score']:>16.4f}{r['seconds_per_identity']:>14.2f}")
    ref = report["reference_scores"]
    lines.append(f"identity score of real renders: same identity {ref['same_identity_render']:.4f}, "
                 f"other identities {ref['other_identity_render']}")
    lines.append(f"grid: {report['grid']}")
    return "\n".join(lines)
