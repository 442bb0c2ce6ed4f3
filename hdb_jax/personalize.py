"""Personalise a base model from one photo: hypernetwork prediction + rank-relaxed fast finetuning.

``python -m hdb_jax.personalize --config configs/personalize.py --image face.png --out runs/me``

1. the image is validated (readable, not too small or too large) before anything is loaded;
2. the base model (diffusers format, e.g. the shipped toy model or SD 1.5) and the hypernetwork
   bundle (``<hypernet workdir>/hypernet``, see :mod:`hdb_jax.hypernet.bundle`) are loaded; a
   bundle for another base model or adapter layout is refused before any compilation;
3. the hypernetwork predicts LiDB weights from the image; :mod:`hdb_jax.relax` turns them into a
   rank-r LoRA that is finetuned for K steps as one compiled program;
4. ``personal.safetensors`` (our format: the folded LoRA, tied to the base model's fingerprint)
   and ``lora/pytorch_lora_weights.safetensors`` (diffusers/PEFT layout) are written, with
   ``timings.json``.

A timing table (load, compile, hypernetwork, finetune, export) is printed. Compiled programs go
to JAX's persistent compilation cache (``config.compile_cache``), so a second run on the same
machine skips most of the compile time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdb_jax import adapters as A
from hdb_jax import build, export, images, personal, relax
from hdb_jax.data import folder
from hdb_jax.hypernet import bundle as bundle_lib
from hdb_jax.hypernet.encoder import resize_images
from hdb_jax.sd import loading, model
from hdb_jax.sd.fingerprint import params_fingerprint

STAGES = ("load", "compile", "hypernet", "finetune", "export")


def enable_compile_cache(directory: str | os.PathLike | None) -> None:
    """Turns on JAX's persistent compilation cache in ``directory`` (every program is cached)."""
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def validate_image(path: str | os.PathLike, resolution: int, config: ml_collections.ConfigDict) -> np.ndarray:
    """The reference photo as uint8 ``[resolution, resolution, 3]``; BadImageError names the file and why."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference image {path} does not exist")
    return folder.load_image(path, resolution, min_size=config.min_image_size, max_pixels=config.max_image_pixels)


def zero_prediction(adapters: Mapping[str, A.Adapter]) -> dict:
    """A LiDB trainable tree of zeros: with it, ``fresh`` relaxation is a LoRA trained from zero."""
    tree = {c: a.init(jax.random.PRNGKey(0)) for c, a in adapters.items()}
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


@dataclasses.dataclass
class Personalizer:
    """A loaded base model and hypernetwork with their compiled programs, reusable across photos."""

    sd: model.StableDiffusion
    params: dict
    bundle: bundle_lib.Bundle
    config: ml_collections.ConfigDict
    fingerprint: str
    optimizer: optax.GradientTransformation
    finetune: relax.Finetune
    input_ids: np.ndarray
    _predict: dict = dataclasses.field(default_factory=dict)  # iterations -> compiled prediction
    _run: dict = dataclasses.field(default_factory=dict)  # finetune steps -> compiled K-step program

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, *, sd=None, params=None) -> "Personalizer":
        """Loads the base model (unless given) and the bundle in ``config.hypernet``; checks they fit."""
        if sd is None:
            bundle_lib.read_meta(config.hypernet)  # a missing bundle fails before the model loads
            sd, params = build.base_model(config.model)
        fingerprint = params_fingerprint(params)
        bundle = bundle_lib.load(config.hypernet, jax.eval_shape(lambda: params), base_fingerprint=fingerprint)
        r = config.relax
        optimizer = build.optimizer(dict(learning_rate=r.learning_rate, weight_decay=r.weight_decay, grad_clip=r.grad_clip))
        adapters = {c: A.Adapter(A.LoRA(rank=r.rank, alpha=r.alpha or None), a.targets, c) for c, a in bundle.adapters.items()}
        finetune = relax.make_finetune(sd, adapters, optimizer, batch_size=r.batch_size, flip=r.flip, shift=r.shift)
        ids = np.asarray(sd.tokenize([config.prompt]))[0]
        return cls(sd, params, bundle, config, fingerprint, optimizer, finetune, ids)

    # ---------------------------------------------------------------- compiled programs
    @property
    def resolution(self) -> int:
        return self.config.model.resolution if self.config.model.resolution > 0 else self.sd.default_resolution

    def _predict_fn(self, images, iterations: int | None):
        net = self.bundle.net
        return net.apply({"params": self.bundle.params}, resize_images(images, net.image_size), iterations)

    def _compiled_predict(self, iterations: int | None):
        if iterations not in self._predict:
            image = jax.ShapeDtypeStruct((1, self.resolution, self.resolution, 3), jnp.float32)
            self._predict[iterations] = jax.jit(self._predict_fn, static_argnums=1).lower(image, iterations).compile()
        return self._predict[iterations]

    def _compiled_run(self, steps: int):
        if steps not in self._run:
            relaxed = self.relax(zero_prediction(self.bundle.adapters), jax.random.PRNGKey(0))
            state = relax.init_state(relaxed, self.optimizer)
            spec = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), t)  # noqa: E731
            res = self.resolution
            self._run[steps] = self.finetune.run.lower(
                spec(state), spec(relaxed.frozen), jax.ShapeDtypeStruct((res, res, 3), jnp.float32),
                spec(jnp.asarray(self.input_ids)), spec(jax.random.PRNGKey(0)), steps).compile()
        return self._run[steps]

    def compile(self, steps: int | None = None) -> float:
        """Compiles (or fetches from the persistent cache) prediction and the K-step finetune; seconds."""
        t0 = time.perf_counter()
        self._compiled_predict(None)
        self._compiled_run(steps or self.config.relax.steps)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- stages
    def predict(self, image: np.ndarray, iterations: int | None = None) -> dict:
        """uint8 ``[H, W, 3]`` -> the predicted LiDB trainable tree (one identity, no batch axis).

        ``iterations`` overrides the bundle's refinement steps (1: no iterative prediction).
        """
        pixels = jnp.asarray(images.to_unit_range(image[None]))
        return jax.tree_util.tree_map(lambda x: x[0], self._compiled_predict(iterations)(pixels))

    def relax(self, predicted: Mapping[str, Any], key: jax.Array) -> relax.Relaxed:
        b, r = self.bundle, self.config.relax
        return relax.relax(r.variant, self.params, b.adapters, b.basis, predicted, rank=r.rank, alpha=r.alpha or None, key=key)

    def finetune_from(self, predicted: Mapping[str, Any], image: np.ndarray, key: jax.Array,
                      steps: int | None = None) -> tuple[dict, dict, np.ndarray]:
        """Relaxes ``predicted`` and runs the compiled K-step finetune on ``image``.

        Args:
          predicted: a LiDB prediction (or :func:`zero_prediction`: a LoRA trained from zero).
          image: the reference photo, uint8 ``[H, W, 3]``.
          key: PRNG key (LoRA init, augmentations, noise).
          steps: K (default ``config.relax.steps``); each K is compiled once.

        Returns:
          ``(adapters, tree, losses)``: the personal model as one LoRA per component relative to
          the base weights (:func:`hdb_jax.relax.fold`), and the per-step losses.
        """
        run = self._compiled_run(steps or self.config.relax.steps)
        k_init, k_run = jax.random.split(key)
        relaxed = self.relax(predicted, k_init)
        state = relax.init_state(relaxed, self.optimizer)
        pixels = jnp.asarray(images.to_unit_range(image))
        state, losses = run(state, relaxed.frozen, pixels, jnp.asarray(self.input_ids), k_run)
        adapters, tree = relax.fold(relaxed, state["trainable"])
        return adapters, tree, np.asarray(losses)

    def export(self, out: str | os.PathLike, adapters: Mapping[str, A.Adapter], tree: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Writes ``personal.safetensors`` and the diffusers/PEFT ``lora/`` folder; returns their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tree = jax.device_get(tree)
        written = personal.save_personal(out / "personal.safetensors", adapters, tree, base_fingerprint=self.fingerprint,
                                         extra=extra)
        lora = export.export_lora(out / "lora", adapters, tree)
        return {"personal": os.fspath(written), "lora": os.fspath(lora.path)}


def personalize(config: ml_collections.ConfigDict, image_path: str, out: str) -> dict:
    """Runs the whole pipeline for one photo; returns timings, losses and the written files."""
    enable_compile_cache(config.compile_cache)
    timings = {}
    t0 = time.perf_counter()
    configs_only = loading.load_configs(config.model.source)  # no weights: the image is checked first
    resolution = config.model.resolution if config.model.resolution > 0 else configs_only.default_resolution
    image = validate_image(image_path, resolution, config)
    p = Personalizer.load(config)
    timings["load"] = time.perf_counter() - t0
    timings["compile"] = p.compile()
    t = time.perf_counter()
    predicted = jax.block_until_ready(p.predict(image))
    timings["hypernet"] = time.perf_counter() - t
    t = time.perf_counter()
    adapters, tree, losses = p.finetune_from(predicted, image, jax.random.PRNGKey(config.seed))
    jax.block_until_ready(tree)
    timings["finetune"] = time.perf_counter() - t
    t = time.perf_counter()
    r = config.relax
    files = p.export(out, adapters, tree, extra={"image": os.path.abspath(image_path), "variant": r.variant, "rank": r.rank,
                                                 "steps": r.steps, "learning_rate": r.learning_rate, "prompt": config.prompt,
                                                 "hypernet_basis_hash": p.bundle.basis_hash})
    timings["export"] = time.perf_counter() - t
    report = {"timings_s": {k: round(v, 3) for k, v in timings.items()}, "losses": [float(x) for x in losses],
              "files": files, "compile_cache": config.compile_cache or None, "device": jax.devices()[0].platform}
    Path(out, "timings.json").write_text(json.dumps(report, indent=1))
    print(timing_table(timings))
    return report


def timing_table(timings: Mapping[str, float]) -> str:
    """A fixed-width table of stage times and their total."""
    rows = [f"{'stage':<10}{'seconds':>10}"] + [f"{k:<10}{timings[k]:>10.2f}" for k in STAGES if k in timings]
    rows.append(f"{'total':<10}{sum(timings.values()):>10.2f}")
    return "\n".join(rows)


def main(argv=None) -> None:
    from absl import app, flags, logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", "configs/personalize.py", "configs/personalize.py[:knobs]",
                                                  lock_config=True)
    flags.DEFINE_string("image", None, "the reference photo (jpg, png, webp, bmp)")
    flags.DEFINE_string("out", None, "output directory for personal.safetensors, lora/ and timings.json")
    flags.mark_flags_as_required(["image", "out"])

    def _main(_):
        logging.set_verbosity(logging.WARNING)
        try:
            personalize(config_flag.value, flags.FLAGS.image, flags.FLAGS.out)
        except (folder.BadImageError, FileNotFoundError, bundle_lib.BundleError, loading.ModelLoadError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
