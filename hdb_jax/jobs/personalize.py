"""Personalise a base model from one photo: hypernetwork prediction + rank-relaxed fast finetuning.

``python -m hdb_jax.personalize --config configs/personalize.py --image face.png --out runs/me``

1. the image is validated (readable, not too small or too large) before anything is loaded;
2. the base model (diffusers format, e.g. the shipped toy model or SD 1.5) and the hypernetwork
   bundle (``<hypernet workdir>/hypernet``, see :mod:`hdb_jax.hypernet.bundle`) are loaded; a
   bundle for another base model or adapter layout is refused before any compilation;
3. the hypernetwork predicts LiDB weights from the image; :mod:`hdb_jax.blocks.relax` turns them into a
   rank-r LoRA that is finetuned for K steps as one compiled program;
4. ``personal.safetensors`` (our format: the folded LoRA, tied to the base model's fingerprint)
   and ``lora/pytorch_lora_weights.safetensors`` (diffusers/PEFT layout) are written, with
   ``timings.json``.

A timing table (load, compile, hypernetwork, finetune, export) is printed. The prediction and
finetune programs are stored as executables in ``config.compile_cache/executables``
(:mod:`hdb_jax.common.executables`): a second run with the same code, settings and shapes loads
them without tracing; every other program goes to JAX's persistent compilation cache there.
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

from hdb_jax.data import folder
from hdb_jax.sd import loading
from hdb_jax.stages.personalize import (  # noqa: F401  (the runtime's names, importable from here as before)
    Personalizer,
    check_settings,
    default_config,
    enable_compile_cache,
    validate_image,
    zero_prediction,
)

STAGES = ("load", "compile", "hypernet", "finetune", "export")


def personalize(config: ml_collections.ConfigDict, image_path: str, out: str) -> dict:
    """Runs the whole pipeline for one photo, or for every photo of a folder; returns timings and files.

    A folder is personalised in programs of ``config.relax.photos_per_program`` photos (one compile
    per batch shape) and each photo's files go to ``out/<file stem>/``; the report adds
    ``identities_per_s`` (hypernetwork + finetune time only).
    """
    check_settings(config)  # before any file is read
    enable_compile_cache(config.compile_cache)
    timings = {}
    t0 = time.perf_counter()
    say = _Progress(t0)
    configs_only = loading.load_configs(config.model.source)  # no weights: the images are checked first
    resolution = config.model.resolution if config.model.resolution > 0 else configs_only.default_resolution
    if os.path.isdir(image_path):
        photos = folder.ImageFolder(image_path, resolution=resolution, min_size=config.min_image_size)
        named = [
            (Path(photos.paths[i]).stem, photos[i]["image"], photos.paths[i]) for i in range(len(photos))
        ]
    else:
        named = [("", validate_image(image_path, resolution, config), image_path)]
    say(f"loading the base model ({config.model.source}) and the hypernetwork bundle ({config.bundle})")
    p = Personalizer.load(config)
    timings["load"] = time.perf_counter() - t0
    chunk = max(1, min(len(named), int(config.relax.photos_per_program)))
    say(
        "compiling the hypernetwork and the finetune (minutes on a cold CPU; "
        f"cached in {config.compile_cache} for the next run)"
        if config.compile_cache
        else "compiling the hypernetwork and the finetune (no persistent cache: --config.compile_cache)"
    )
    timings["compile"] = (
        p.compile() if chunk == 1 else p.compile() + _time(lambda: p._compiled_run(chunk, config.relax.steps))
    )
    r = config.relax
    timings["hypernet"] = timings["finetune"] = timings["export"] = 0.0
    files, losses = {}, {}
    for start in range(0, len(named), chunk):
        group = named[start : start + chunk]
        group = group + [group[-1]] * (chunk - len(group))  # pad the last program to its compiled size
        say(
            f"predicting and finetuning ({r.steps} steps, rank {r.rank}) photos {start + 1}-{start + len(group)} of {len(named)}"
        )
        t = time.perf_counter()
        predicted = [jax.block_until_ready(p.predict(image)) for _, image, _ in group]
        timings["hypernet"] += time.perf_counter() - t
        t = time.perf_counter()
        keys = jnp.stack(
            [
                jax.random.fold_in(jax.random.PRNGKey(config.seed), start + i)
                if len(named) > 1
                else jax.random.PRNGKey(config.seed)
                for i in range(len(group))
            ]
        )
        results = p.finetune_many(predicted, np.stack([image for _, image, _ in group]), keys)
        jax.block_until_ready(results[-1][1])
        timings["finetune"] += time.perf_counter() - t
        t = time.perf_counter()
        for (stem, _, path), (adapters, tree, loss) in list(zip(group, results))[: len(named) - start]:
            extra = {
                "image": os.path.abspath(path),
                "variant": r.variant,
                "rank": r.rank,
                "steps": r.steps,
                "learning_rate": r.learning_rate,
                "prompt": config.prompt,
                "hypernet_basis_hash": p.bundle.basis_hash,
            }
            files[stem or "photo"] = p.export(Path(out) / stem if stem else out, adapters, tree, extra=extra)
            losses[stem or "photo"] = [float(x) for x in loss]
        timings["export"] += time.perf_counter() - t
    report = {
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "identities": len(named),
        "identities_per_s": round(len(named) / max(timings["hypernet"] + timings["finetune"], 1e-9), 3),
        "losses": losses["photo"] if len(named) == 1 and "photo" in losses else losses,
        "files": files["photo"] if len(named) == 1 and "photo" in files else files,
        "compile_cache": config.compile_cache or None,
        # Programs loaded from the cache's stored executables (nothing traced) / traced and compiled.
        "programs": {"loaded": p.store.hits, "compiled": p.store.misses} if p.store else None,
        "device": jax.devices()[0].platform,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "timings.json").write_text(json.dumps(report, indent=1))
    print(timing_table(timings))
    if len(named) > 1:
        print(f"{len(named)} identities, {report['identities_per_s']} identities/s (hypernet + finetune)")
    say(f"wrote {os.path.abspath(out)}: " + _layout(report["files"]))
    return report


class _Progress:
    """One line per phase on stdout, with the seconds since the run started."""

    def __init__(self, t0: float):
        self.t0 = t0

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {message}", flush=True)


def _layout(files: Mapping[str, Any]) -> str:
    """The written files: one photo's ``{personal, lora}``, or one subfolder per photo of a folder."""
    if "personal" in files:
        return f"personal.safetensors, lora/ ({files['lora']}), timings.json"
    return f"timings.json and one subfolder per photo ({', '.join(sorted(files))}) with personal.safetensors and lora/"


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timing_table(timings: Mapping[str, float]) -> str:
    """A fixed-width table of stage times and their total."""
    rows = [f"{'stage':<10}{'seconds':>10}"] + [f"{k:<10}{timings[k]:>10.2f}" for k in STAGES if k in timings]
    rows.append(f"{'total':<10}{sum(timings.values()):>10.2f}")
    return "\n".join(rows)


def main(argv=None) -> None:
    from absl import flags, logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", "configs/personalize.py", "configs/personalize.py[:knobs]", lock_config=True
    )
    flags.DEFINE_string(
        "image", None, "the reference photo (jpg, png, webp, bmp, gif), or a folder of photos"
    )
    flags.DEFINE_string("out", None, "output directory for personal.safetensors, lora/ and timings.json")
    flags.mark_flags_as_required(["image", "out"])

    def _main(_):
        logging.set_verbosity(logging.WARNING)
        personalize(config_flag.value, flags.FLAGS.image, flags.FLAGS.out)

    from hdb_jax.jobs import cli

    cli.run(_main, argv, configs=[config_flag])


if __name__ == "__main__":
    main()
