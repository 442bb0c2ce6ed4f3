"""The paper's open questions, answered on the toy world: named sweeps, resumable, with plots.

``python -m hdb_jax.train --config configs/sweep.py:<name>`` runs one sweep. Every point is one
setting evaluated on the same held-out identities (identity and prompt fidelity with 95%
bootstrap intervals, :mod:`hdb_jax.eval`); each point's result is a JSON file in
``<workdir>/<name>/points/``, so a rerun computes only the points that are missing. The sweep
writes ``sweep.json`` (every point), one PNG plot per metric (the swept value on the x axis, one
series per other setting, 95% error bars) and ``summary.md``.

Sweeps:

* ``relax``: rank-relaxed finetuning, ``variant`` (fresh / svd) x rank r x steps K;
* ``iterations``: the hypernetwork's refinement steps s at test time (the shipped bundle was
  trained with s = 4; other training-time s need ``retrain``);
* ``ood``: out-of-distribution references (cartoon, sketch, strong pose, strong light, a hat or
  glasses the identity does not have), hypernetwork alone and with the K=40 finetune;
* ``identities``: how many pre-optimised identities the hypernetwork needs: a hypernetwork is
  trained per point on the first N identities of ``preopt_dir`` (hours at full size).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from hdb_jax import adapters as A
from hdb_jax.blocks import build
from hdb_jax.eval import stats
from hdb_jax.hypernet import bundle as bundle_lib
from hdb_jax.stages.personalize import Personalizer
from hdb_jax.toy import evaluator as toy
from hdb_jax.toy import protocol as eval_protocol
from hdb_jax.toy import synthetic

METRICS = ("identity", "prompt_fidelity")


def reference(identity: int, kind: str, resolution: int, seed: int = 0) -> np.ndarray:
    """View 0 of ``identity`` drawn as ``kind``: photo, cartoon, sketch, pose, light, hat, glasses."""
    ident = synthetic.identity(identity, seed)
    style = kind if kind in synthetic.STYLES else "photo"
    var = synthetic.variation(identity, 0, seed, style=style)
    if kind == "pose":
        var = dataclasses.replace(var, yaw=1.0, rotation=0.25, tx=0.12)
    elif kind == "light":
        var = dataclasses.replace(var, light_strength=0.9, gain=0.7)
    elif kind in ("hat", "glasses"):  # an occluder the identity itself does not wear
        ident = dataclasses.replace(ident, **{kind: not getattr(ident, kind)})
    return synthetic.render_face(ident, var, resolution)


def score_point(
    config, sd, params, evaluator: toy.ToyEvaluator, make: Callable[[int, np.ndarray], dict]
) -> dict:
    """Personalises every evaluation identity with ``make(identity, reference) -> params`` and scores it."""
    e = config.eval
    protocol = eval_protocol.Protocol.from_config(e)  # the main job's protocol, without prior samples
    per_id: dict[int, dict[str, np.ndarray]] = {}
    seconds = []
    for identity in e.identities:
        ident_ref = reference(int(identity), "photo", sd.default_resolution, config.data_seed)
        t = time.perf_counter()
        personal = make(int(identity), ident_ref)
        seconds.append(time.perf_counter() - t)
        scores = protocol.score(evaluator, protocol.draw(sd, personal), ident_ref)
        per_id[int(identity)] = {m: scores[m] for m in METRICS}
    out = {
        m: stats.bootstrap(np.stack([v[m] for v in per_id.values()]), replicates=e.replicates)
        for m in METRICS
    }
    out["seconds_per_identity"] = float(np.mean(seconds))
    return out


def points(config) -> list[dict[str, Any]]:
    """The settings of sweep ``config.sweep`` (each a flat dict; ``x`` is the plotted one)."""
    s = config.points
    if config.sweep == "relax":
        return [{"variant": v, "rank": r, "x": k} for v in s.variants for r in s.ranks for k in s.steps]
    if config.sweep == "iterations":
        return [{"series": "hypernet", "x": n} for n in s.iterations]
    if config.sweep == "ood":
        return [{"series": f, "x": kind} for f in ("hypernet", "hypernet+finetune") for kind in s.references]
    if config.sweep == "identities":
        return [{"series": "hypernet", "x": n} for n in s.identities]
    raise ValueError(f"config.sweep={config.sweep!r}: choose relax, iterations, ood or identities")


def _maker(config, point: dict, p: Personalizer, workdir: Path) -> Callable[[int, np.ndarray], dict]:
    """``(identity, photo reference) -> personal params`` for one point."""
    res = p.sd.default_resolution
    if config.sweep == "relax":
        r = config.personalize.relax
        r.variant, r.rank = point["variant"], point["rank"]
        q = Personalizer.load(config.personalize, sd=p.sd, params=p.params)

        def make(identity, ref):
            if point["x"] == 0:
                return A.merge_all(q.params, q.bundle.adapters, q.predict(ref), q.bundle.basis)
            adapters, tree, _ = q.finetune_from(
                q.predict(ref), ref, jax.random.PRNGKey(identity), steps=point["x"]
            )
            return A.merge_all(q.params, adapters, tree)

        return make
    if config.sweep == "iterations":
        return lambda identity, ref: A.merge_all(
            p.params, p.bundle.adapters, p.predict(ref, iterations=point["x"]), p.bundle.basis
        )
    if config.sweep == "ood":

        def make(identity, _):
            ref = reference(identity, point["x"], res, config.data_seed)
            predicted = p.predict(ref)
            if point["series"] == "hypernet":
                return A.merge_all(p.params, p.bundle.adapters, predicted, p.bundle.basis)
            adapters, tree, _ = p.finetune_from(predicted, ref, jax.random.PRNGKey(identity))
            return A.merge_all(p.params, adapters, tree)

        return make
    # identities: a hypernetwork trained on the first N pre-optimised identities
    from hdb_jax.stages import hypernet as hypernet_train

    hyper = config.hypernet.copy_and_resolve_references()
    hyper.workdir = os.fspath(workdir / f"hypernet_{point['x']}")
    hyper.data.max_identities = int(point["x"])
    bundle_dir = bundle_lib.bundle_dir(hyper.workdir)
    if not bundle_lib.is_bundle(bundle_dir):
        hypernet_train.train(hyper, p.sd, p.params)
    cfg = config.personalize.copy_and_resolve_references()
    cfg.bundle = os.fspath(bundle_dir)
    q = Personalizer.load(cfg, sd=p.sd, params=p.params)
    return lambda identity, ref: A.merge_all(q.params, q.bundle.adapters, q.predict(ref), q.bundle.basis)


def _name(point: dict) -> str:
    return "_".join(f"{k}={v}" for k, v in sorted(point.items()))


def plot(results: list[dict], metric: str, path: Path, title: str) -> list[str]:
    """One series per setting other than ``x``, 95% error bars; returns the series names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = {}
    for r in results:
        key = ", ".join(f"{k}={v}" for k, v in sorted(r["point"].items()) if k not in ("x", "series")) or r[
            "point"
        ].get("series", metric)
        if "series" in r["point"] and len(r["point"]) > 2:
            key = f"{r['point']['series']}, {key}"
        series.setdefault(key, []).append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, rows in series.items():
        xs = [str(r["point"]["x"]) for r in rows]
        means = np.array([r[metric]["mean"] for r in rows])
        err = np.array([[m - r[metric]["ci95"][0], r[metric]["ci95"][1] - m] for m, r in zip(means, rows)]).T
        ax.errorbar(xs, means, yerr=err, marker="o", capsize=3, label=key)
    ax.set_xlabel(results[0]["x_label"])
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return list(series)


def run(config: ml_collections.ConfigDict) -> dict:
    """The ``sweep`` job: every missing point, then ``sweep.json``, plots and ``summary.md``."""
    workdir = Path(config.workdir) / config.sweep
    (workdir / "points").mkdir(parents=True, exist_ok=True)
    sd, params = build.base_model(config.personalize.model)
    evaluator = toy.ToyEvaluator.load()
    p = Personalizer.load(config.personalize, sd=sd, params=params)
    results, computed = [], 0
    for point in points(config):
        path = workdir / "points" / f"{_name(point)}.json"
        if not path.is_file():
            print(f"sweep {config.sweep}: {point}", flush=True)
            config_copy = config.copy_and_resolve_references()
            result = score_point(config_copy, sd, params, evaluator, _maker(config_copy, point, p, workdir))
            path.write_text(json.dumps({"point": point, "x_label": config.x_label, **result}, indent=1))
            computed += 1
        results.append(json.loads(path.read_text()))
    plots = {
        m: plot(results, m, workdir / f"{m}.png", f"{config.sweep}: {m.replace('_', ' ')}") for m in METRICS
    }
    summary = {
        "sweep": config.sweep,
        "identities": [int(i) for i in config.eval.identities],
        "points": results,
        "series": plots,
        "computed_now": computed,
    }
    (workdir / "sweep.json").write_text(json.dumps(summary, indent=1))
    lines = [
        f"# Sweep `{config.sweep}`",
        "",
        f"{len(config.eval.identities)} held-out identities, prompts "
        f"{list(config.eval.prompts)}, {config.eval.seeds} seeds each; 95% bootstrap intervals.",
        "",
        "| point | identity | prompt fidelity | s / identity |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {_name(r['point'])} | {stats.fmt(r['identity'])} | {stats.fmt(r['prompt_fidelity'])} | "
            f"{r['seconds_per_identity']:.1f} |"
        )
    lines += ["", *(f"![{m}]({m}.png)" for m in METRICS), ""]
    (workdir / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return summary
