"""The ``subject`` job: build the base model, train one subject (:mod:`hdb_jax.stages.subject`), export.

``python -m hdb_jax.train --config configs/subject.py:tiny,adapter=lidb``. What it writes depends on
the tuning method: personal weights and LoRA files for adapters, a whole model directory for
DreamBooth, a learned embedding for Textual Inversion, and a grid of personal vs base samples.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np

from hdb_jax.blocks import build
from hdb_jax.blocks import tuning as tuning_lib
from hdb_jax.common import images
from hdb_jax.sd.fingerprint import params_fingerprint
from hdb_jax.stages import subject


def export(config: ml_collections.ConfigDict, result: subject.SubjectResult) -> dict[str, str]:
    """Writes what the method produces, and ``samples.png`` (personal vs base):

    * adapters: ``personal.safetensors`` (our format) and ``lora.safetensors`` (diffusers/PEFT)
      where the kind allows, plus ``lora_webui.safetensors`` (kohya / LoKr) when asked;
    * DreamBooth: ``model/``, the whole fine-tuned model as a diffusers-format directory;
    * Textual Inversion: ``learned_embeds.safetensors`` in diffusers' layout (``{token: [1, D]}``).

    Returns:
      ``{artefact: path}`` of what was written.
    """
    from hdb_jax.formats import lora as lora_export
    from hdb_jax.formats import personal

    workdir, tuning = result.workdir, result.tuning
    trainable = jax.device_get(result.state["trainable"])
    frozen = jax.device_get(result.frozen)
    written = {}
    if isinstance(tuning, tuning_lib.AdapterTuning):
        fingerprint = params_fingerprint(result.params)  # once: it reads a sample of every base weight
        written["personal"] = os.fspath(
            personal.save_personal(
                os.path.join(workdir, "personal.safetensors"),
                tuning.adapters,
                trainable,
                base_fingerprint=fingerprint,
                basis_hash=result.basis_hash,
                extra={
                    "steps": int(result.state["step"]),
                    "prompt": config.data.prompt,
                    "model": result.sd.name,
                },
            )
        )
        if config.export.lora:
            try:
                lora_export.export_lora(
                    os.path.join(workdir, "lora.safetensors"), tuning.adapters, trainable, frozen
                )
                written["lora"] = os.path.join(workdir, "lora.safetensors")
            except lora_export.NotExportableError as err:
                print(f"no standard LoRA file: {err}")
        if config.export.webui:
            from hdb_jax.formats import webui as export_webui

            out = export_webui.export_kohya(
                os.path.join(workdir, "lora_webui.safetensors"),
                tuning.adapters,
                trainable,
                frozen,
                trigger=config.data.prompt,
                base_fingerprint=fingerprint,
            )
            written["webui"] = os.fspath(out.path)
    elif isinstance(tuning, tuning_lib.DreamBoothTuning):
        from hdb_jax.sd import loading

        model_dir = os.path.join(workdir, "model")
        loading.save_pretrained(model_dir, result.sd, tuning.merged(result.params, trainable, frozen))
        written["model"] = model_dir
    else:
        from hdb_jax.common import tensorfile

        path = os.path.join(workdir, "learned_embeds.safetensors")
        token = config.textual_inversion.export_token
        tensorfile.write(
            path,
            {token: np.asarray(trainable["embedding"], np.float32)[None]},
            {"format": "pt", "hdb_jax.token": config.textual_inversion.token},
        )
        written["learned_embeds"] = path
    if config.export.sample_prompts:
        e = config.export
        grid = subject.sample_grid(config, result.sd, result.params, tuning, trainable, frozen)
        prompts = [p for p in e.sample_prompts for _ in e.sample_seeds]
        seeds = [s for _ in e.sample_prompts for s in e.sample_seeds]
        labels = [f"{tag}: {p} (seed {s})" for tag in ("personal", "base") for p, s in zip(prompts, seeds)]
        written["grid"] = os.fspath(
            images.save_grid(grid, os.path.join(workdir, "samples.png"), cols=len(prompts), labels=labels)
        )
    for name, path in written.items():
        size = (
            os.path.getsize(path)
            if os.path.isfile(path)
            else sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
        )
        print(f"wrote {name}: {path} ({size:,} bytes)")
    return written


def run(config: ml_collections.ConfigDict) -> subject.SubjectResult:
    """The ``subject`` job: build the base model, train (or resume), then export unless interrupted."""
    t0 = time.perf_counter()
    sd, params = build.base_model(config.model)
    print(f"model {sd.name} ready in {time.perf_counter() - t0:.1f}s")
    result = subject.train(config, sd, params)
    if not result.stopped_early:
        result.written = export(config, result)
    return result
