"""The main job's methods: each row of the paper's Table 1 turns one reference photo into a
personal model, timed, with its step count and the size of what it would ship.

=========================  ==================================================================
row                        personal model
=========================  ==================================================================
``base``                   none (the base model)
``hypernet``               H(x): the hypernetwork's LiDB prediction, merged
``hypernet_k1``            H(x) with one refinement step instead of the trained s
``hypernet+finetune``      H(x) relaxed to a rank-r LoRA and finetuned K steps (the paper)
``finetune_from_zero``     the same finetune from a zero prediction (no hypernetwork)
``...@10``                 the pair above at K = 10
``oracle``                 stage-1 pre-optimisation run on the reference itself
``lora_dreambooth``        a LoRA trained DreamBooth-style on the reference (subject job)
``dreambooth``             the whole UNet trained on the reference, with prior preservation
``textual_inversion``      one token embedding trained on the reference
``residuals``              Personalized Residuals (low-rank residuals on every ``proj_out``)
``residuals+lag``          the same residuals sampled with localized attention guidance (LAG)
=========================  ==================================================================

The slow baselines run the subject job (:mod:`hdb_jax.stages.subject`) per identity; the oracle runs
stage 1 (:mod:`hdb_jax.stages.preopt`) on all references at once. This module is part of the demo job.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from hdb_jax import adapters as A
from hdb_jax.blocks import sample
from hdb_jax.data import identities as identities_lib
from hdb_jax.data import weights as weights_lib
from hdb_jax.formats import personal
from hdb_jax.hypernet import bundle as hypernet_bundle
from hdb_jax.sd.fingerprint import params_fingerprint
from hdb_jax.stages import preopt, subject
from hdb_jax.stages.personalize import Personalizer, zero_prediction

FAST_ROWS = (
    "base",
    "hypernet",
    "hypernet+finetune",
    "finetune_from_zero",
    "hypernet+finetune@10",
    "finetune_from_zero@10",
    "hypernet_k1",
    "oracle",
)
SLOW_ROWS = ("lora_dreambooth", "dreambooth", "textual_inversion", "residuals", "residuals+lag")
# Rows that sample the model of another row (trained once) in another way.
TRAINED_AS = {"residuals+lag": "residuals"}
ROWS = FAST_ROWS + SLOW_ROWS


@dataclasses.dataclass
class Personal:
    """One method's personal model of one identity."""

    params: Mapping[str, Any]  # the merged parameters to sample from
    seconds: float  # wall time of the personalisation (compile excluded)
    steps: int  # optimisation steps it took
    bytes: int  # size of the personal file it ships
    lag: Any = None  # (LagSpec, trainable, frozen): sample ``params`` (the base) with LAG


def _file_bytes(path) -> int:
    return os.path.getsize(path)


def _lidb_file(p: Personalizer, tree, path, extra) -> int:
    """Bytes of ``tree`` (LiDB factors) as a personal weights file."""
    personal.save_personal(
        path,
        p.bundle.adapters,
        jax.device_get(tree),
        base_fingerprint=p.fingerprint,
        basis_hash=p.bundle.basis_hash,
        extra=extra,
    )
    return _file_bytes(path)


def fast(
    row: str,
    p: Personalizer,
    reference: np.ndarray,
    key: jax.Array,
    out_dir: str,
    k_short: int,
    identity: int | None = None,
) -> Personal:
    """A hypernetwork / finetune row for one reference (uint8 [H, W, 3]); files record ``identity``."""
    os.makedirs(out_dir, exist_ok=True)
    if row == "base":
        return Personal(p.params, 0.0, 0, 0)
    t = time.perf_counter()
    if row in ("hypernet", "hypernet_k1"):
        predicted = jax.block_until_ready(
            p.predict(reference, iterations=1 if row == "hypernet_k1" else None)
        )
        seconds = time.perf_counter() - t
        merged = A.merge_all(p.params, p.bundle.adapters, predicted, p.bundle.basis)
        return Personal(
            merged,
            seconds,
            0,
            _lidb_file(
                p,
                predicted,
                os.path.join(out_dir, "personal.safetensors"),
                {"identity": identity, "row": row},
            ),
        )
    name, _, suffix = row.partition("@")
    steps = int(suffix) if suffix else p.config.relax.steps
    if row.startswith("hypernet+finetune"):
        start = p.predict(reference)
    elif row.startswith("finetune_from_zero"):
        start = zero_prediction(p.bundle.adapters)
    else:
        raise ValueError(f"unknown fast row {row!r}")
    adapters, tree, _ = p.finetune_from(start, reference, key, steps=steps)
    jax.block_until_ready(tree)
    seconds = time.perf_counter() - t
    files = p.export(out_dir, adapters, tree, extra={"identity": identity, "row": row, "steps": steps})
    return Personal(A.merge_all(p.params, adapters, tree), seconds, steps, _file_bytes(files["personal"]))


def oracle(
    config: ml_collections.ConfigDict,
    sd,
    params,
    references: Mapping[int, np.ndarray],
    workdir: str,
    bundle,
    fingerprint: str | None = None,
) -> dict[int, Personal]:
    """Stage 1 on each reference itself (one view), all identities in chunks; LiDB in the bundle's basis.

    ``fingerprint``: ``params_fingerprint(params)`` when the caller has it (else computed once here).
    """
    cfg = config.copy_and_resolve_references()
    cfg.workdir = os.path.join(workdir, "oracle")
    cfg.adapter.basis_file = os.path.join(os.fspath(config.bundle_dir), hypernet_bundle.BASIS)
    t = time.perf_counter()
    preopt.train(
        cfg, sd, params, source=identities_lib.ArrayIdentities({i: r[None] for i, r in references.items()})
    )
    seconds = (time.perf_counter() - t) / max(len(references), 1)
    rows, trees = weights_lib.load(cfg.workdir, bundle.adapters, bundle.basis_hash)
    out, fingerprint = {}, fingerprint or params_fingerprint(params)
    for k, row in enumerate(rows):
        tree = jax.tree_util.tree_map(lambda x: x[k], trees)
        path = os.path.join(workdir, "oracle", f"{row['identity']}.safetensors")
        personal.save_personal(
            path,
            bundle.adapters,
            tree,
            base_fingerprint=fingerprint,
            basis_hash=bundle.basis_hash,
        )
        merged = A.merge_all(params, bundle.adapters, tree, bundle.basis)
        out[int(row["identity"])] = Personal(merged, seconds, int(row["steps"]), _file_bytes(path))
    return out


def slow(
    row: str,
    config: ml_collections.ConfigDict,
    sd,
    params,
    identity: int,
    workdir: str,
    fingerprint: str | None = None,
) -> Personal:
    """A subject-job baseline for one synthetic identity (its reference render only).

    ``fingerprint``: ``params_fingerprint(params)`` when the caller has it.

    A row of :data:`TRAINED_AS` reuses the other row's run directory (the subject job resumes at
    its last step, so nothing is trained twice) and reports that run's training time.
    """
    name = TRAINED_AS.get(row, row)
    cfg = config.copy_and_resolve_references()
    cfg.workdir = os.path.join(workdir, name, str(identity))
    cfg.data.instance.identities = (int(identity),)
    timing = os.path.join(cfg.workdir, "timing.json")
    t = time.perf_counter()
    result = subject.train(cfg, sd, params)
    seconds = time.perf_counter() - t
    if os.path.isfile(timing):
        with open(timing) as f:
            seconds = float(json.load(f)["seconds"])
    else:
        with open(timing, "w") as f:
            json.dump({"seconds": seconds}, f)
    trainable = jax.device_get(result.state["trainable"])
    frozen = jax.device_get(result.frozen)
    adapters = getattr(result.tuning, "adapters", None)
    if name in ("lora_dreambooth", "residuals"):
        path = os.path.join(cfg.workdir, "personal.safetensors")
        personal.save_personal(
            path, adapters, trainable, base_fingerprint=fingerprint or params_fingerprint(params)
        )
        size = _file_bytes(path)
    elif row == "textual_inversion":
        size = int(np.asarray(trainable["embedding"], np.float32).nbytes)
    else:  # the UNet it ships, in float16 as the toy model itself is stored
        size = sum(int(x.size) * 2 for x in jax.tree_util.tree_leaves(trainable))
    if row == "residuals+lag":
        spec = sample.LagSpec(adapters["unet"], sample.lag_token_ids(sd, lag_words(cfg)))
        return Personal(params, seconds, int(cfg.steps), size, (spec, trainable["unet"], frozen["unet"]))
    merged = result.tuning.merged(params, trainable, frozen)
    return Personal(merged, seconds, int(cfg.steps), size)


def lag_words(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """V* and the class word of the subject prompt (``"a sks face"`` -> ``("sks", "face")``)."""
    words = config.data.prompt.split()
    return words[-2], words[-1]
