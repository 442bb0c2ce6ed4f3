"""The model card of a hypernetwork bundle, written from the training config and measured figures.

Every number comes from :func:`hdb_jax.stages.hypernet.train`'s own measurements (the bundle's
``extra``); nothing is typed by hand.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _r2_line(extra: Mapping[str, Any]) -> str:
    held = extra.get("heldout") or {}
    parts = [f"training identities (first {extra.get('r2_subset', 'n/a')}): {_fmt(extra.get('r2_train'), 3)}"]
    if "r2" in held:
        parts.append(f"held-out identities ({held.get('r2_identities')}): {_fmt(held['r2'], 3)}")
    check = extra.get("heldout_check")
    if check:
        parts.append(
            f"the first {check['identities']} held-out identities, whose targets ship as "
            f"`{check['file']}`: {_fmt(check['r2'], 3)}"
        )
    return "- R² of the predicted weight updates against the pre-optimised ones (1: exact, 0: the mean): " + (
        "; ".join(parts) + "."
    )


def _target_lines(targets: Mapping[str, Any] | None) -> list[str]:
    """The targets' stage-1 recipe and the target-quality probe's figures (what R² can reach)."""
    if not targets:
        return []
    lines = ["", "## Targets (stage 1)"]
    for ds in targets.get("datasets", []):
        st = ds.get("settings", {})
        keys = (
            "learning_rate",
            "schedule",
            "steps",
            "views",
            "samples_per_step",
            "init_std",
            "frozen_factors",
        )
        lines.append(
            f"- {ds['identities']} identities in {ds['chunks']} chunks; "
            + ", ".join(f"{k} {st[k]}" for k in keys if k in st)
            + "."
        )
    probe = targets.get("probe")
    if probe:
        oracle = probe.get("oracle_identity", {})
        ci = oracle.get("ci95", [None, None])
        lines.append(
            f"- Target-quality probe (`{probe.get('file')}`, {len(probe.get('identities', []))} identities x 2 "
            f"noise seeds): two runs of one identity agree to cosine {_fmt(probe.get('cos_within'), 3)} "
            f"(different identities {_fmt(probe.get('cos_between'), 3)}; after removing the mean target "
            f"{_fmt(probe.get('cos_within_centred'), 3)}, which bounds the R² any predictor can reach on "
            f"such targets); the targets themselves merged give identity score {_fmt(oracle.get('mean'), 3)} "
            f"[{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]."
        )
    return lines


def model_card(config: ml_collections.ConfigDict, extra: Mapping[str, Any], base_model: str) -> str:
    """Markdown card for the bundle trained with ``config``; ``extra`` is what the bundle records."""
    h, loss, o, d = config.net, config.loss, config.optim, config.data
    held = extra.get("heldout") or {}
    lidb = config.adapter.lidb
    lines = [
        "# Hypernetwork bundle",
        "",
        f"A HyperDreamBooth hypernetwork for the base model `{base_model}`: one reference image in, LiDB",
        f"weights (a={lidb.a}, b={lidb.b}, rank {lidb.rank}) for every adapted layer out. Load it with",
        "`hdb_jax.stages.personalize.Personalizer.load` (it refuses another base model or adapter layout).",
        "",
        "## Recipe",
        f"- Encoder: `{h.encoder}` ({'trained' if h.train_encoder else 'frozen'}); decoder {h.num_blocks} "
        f"blocks, {h.num_heads} heads, {h.iterations} refinement iterations, mode `{h.mode}`.",
        f"- Data: {extra.get('identities')} identities with pre-optimised targets from "
        f"`{d.preopt_dir or 'none'}`; the hypernetwork sees one view, the UNet denoises "
        f"{'the same view' if d.get('denoise_on', 'same') == 'same' else 'another view'}; prompt `{d.prompt}`.",
        f"- Prediction: {'a learned per-token offset (the mean target at step 0) plus' if h.get('offset') else 'zero plus'}"
        f" {h.iterations} refinement step(s) of the decoder."
        + (
            f" {d.fresh_per_batch} of every {config.batch_size} rows are fresh synthetic identities with no target"
            " (the denoising term only)."
            if d.get("fresh_per_batch", 0)
            else ""
        ),
        f"- Loss: {loss.alpha} x denoising + {loss.beta} x "
        + (
            "squared distance of the LiDB factors (summed over layers; targets share one init)"
            if loss.get("space", "dw") == "factor"
            else "squared distance of the weight updates (summed over layers; invariant to the factorisation)"
        )
        + (
            f"; the first {loss.regress_only_steps} steps fit the weights only (no UNet run)."
            if loss.get("regress_only_steps", 0)
            else "."
        ),
        f"- {extra.get('steps')} steps, batch {config.batch_size}, AdamW lr {o.learning_rate} "
        f"(warmup {o.warmup_steps}, {o.schedule}), weight decay {o.weight_decay}, seed {config.seed}.",
    ]
    phases = extra.get("phases")
    if phases:
        lines.append(
            "- Phases (one resumable run, the loss weights changed at a resume): "
            + "; ".join(
                f"steps {p.get('from_step', '?')}-{p['to_step']}: alpha {p['alpha']}, beta {p['beta']}"
                + (f", {p['fresh_per_batch']} fresh identities per batch" if p.get("fresh_per_batch") else "")
                + (f", lr schedule over {p['schedule_steps']} steps" if p.get("schedule_steps") else "")
                for p in phases
            )
            + "."
        )
    lines += _target_lines(extra.get("targets"))
    lines += [
        "",
        "## Measured (by the training job; the bundle's metadata, `bundle.read_meta`, has every figure)",
        f"- Training time: {_fmt(extra.get('train_s'))} s in the last invocation; final loss "
        f"{_fmt(extra.get('final_loss'))}.",
        _r2_line(extra),
    ]
    if "predicted" in held:
        lines.append(
            f"- Held-out identities ({held.get('identities')}, never trained on), denoising loss on "
            f"{held.get('views')} other views each: {_fmt(held['predicted'])} with the predicted weights, "
            f"{_fmt(held['zero'])} with none (the base model)."
        )
    lines += [
        "",
        "## Reproduce",
        "```bash",
        "B=--config.adapter.basis_file=runs/lidb_basis.safetensors  # one LiDB basis for all three",
        "python -m hdb_jax.train --config configs/preopt.py:toy,heldout --config.workdir=runs/preopt_heldout $B",
        "python -m hdb_jax.train --config configs/preopt.py:toy --config.workdir=runs/preopt $B"
        "  # stop it (Ctrl-C) after N identities",
        "python -m hdb_jax.train --config configs/probe.py  # the targets' quality (cos within / between, oracle)",
    ]
    for p in extra.get("phases") or [
        {
            "to_step": extra.get("steps"),
            "alpha": loss.alpha,
            "regress_only_steps": loss.get("regress_only_steps", 0),
            "fresh_per_batch": d.get("fresh_per_batch", 0),
        }
    ]:
        lines += [
            "python -m hdb_jax.train --config configs/hypernet.py:toy --config.data.preopt_dir=runs/preopt $B \\",
            f"    --config.data.heldout_preopt_dir=runs/preopt_heldout --config.steps={p['to_step']} "
            f"--config.loss.alpha={p['alpha']} --config.loss.regress_only_steps={p['regress_only_steps']} "
            f"--config.data.fresh_per_batch={p['fresh_per_batch']}",
        ]
    lines += [
        "```",
        "",
    ]
    return "\n".join(lines)
