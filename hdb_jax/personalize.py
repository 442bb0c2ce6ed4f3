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


def default_config(variant: str = "fresh") -> ml_collections.ConfigDict:
    """The personalisation settings: the shipped toy base model and hypernetwork, the paper's finetune.

    ``configs/personalize.py`` is this config; notebooks call it directly.

    Args:
      variant: ``fresh`` (the paper: merge the prediction, train a new rank-4 LoRA 40 steps) or
        ``svd`` (one LoRA starting at the prediction, 25 steps).
    """
    from hdb_jax.toy import base_model_dir, hypernet_dir

    if variant not in relax.VARIANTS:
        raise ValueError(f"variant={variant!r}: choose from {relax.VARIANTS}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        dict(source=os.fspath(base_model_dir()), resolution=0)
    )  # 0: the model's own
    c.hypernet = os.fspath(hypernet_dir())  # a bundle written by hypernetwork training
    c.prompt = "a sks face"
    c.compile_cache = os.path.expanduser("~/.cache/hdb_jax/jax_compile")  # empty: no persistent cache
    c.min_image_size = 32  # shortest accepted side of the photo, pixels
    c.max_image_pixels = 64_000_000  # larger photos are refused before decoding
    c.relax = ml_collections.ConfigDict()
    c.relax.variant = variant
    c.relax.rank = 4
    c.relax.alpha = 0.0  # 0: alpha = rank (LoRA scale 1)
    c.relax.steps = 25 if variant == "svd" else 40
    # The paper's rate is 1e-3 (SD 1.5). On the toy base a rank-4 LoRA learns a face much faster at
    # 1e-2: identity score 0.28 after 300 steps from zero, against 0.16 at 1e-3 (two-identity probe).
    c.relax.learning_rate = 1e-2
    c.relax.weight_decay = 0.0
    c.relax.grad_clip = 1.0
    c.relax.batch_size = 4  # augmented views of the photo per step
    c.relax.flip = False  # a mirrored face is another face (the toy faces' hair parts the other way)
    c.relax.shift = 2  # random translation, pixels
    c.relax.photos_per_program = 8  # a folder of photos is personalised this many per compiled program
    c.relax.map_batch = 1  # photos vmapped together inside a program (1: each exactly as a single run)
    return c


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
    return folder.load_image(
        path, resolution, min_size=config.min_image_size, max_pixels=config.max_image_pixels
    )


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
    input_ids: np.ndarray
    _predict: dict = dataclasses.field(default_factory=dict)  # iterations -> compiled prediction
    _run: dict = dataclasses.field(default_factory=dict)  # (photos, steps) -> compiled finetune program

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, *, sd=None, params=None) -> "Personalizer":
        """Loads the base model (unless given) and the bundle in ``config.hypernet``; checks they fit."""
        if sd is None:
            bundle_lib.read_meta(config.hypernet)  # a missing bundle fails before the model loads
            sd, params = build.base_model(config.model)
        fingerprint = params_fingerprint(params)
        bundle = bundle_lib.load(
            config.hypernet, jax.eval_shape(lambda: params), base_fingerprint=fingerprint
        )
        r = config.relax
        optimizer = build.optimizer(
            dict(learning_rate=r.learning_rate, weight_decay=r.weight_decay, grad_clip=r.grad_clip)
        )
        ids = np.asarray(sd.tokenize([config.prompt]))[0]
        return cls(sd, params, bundle, config, fingerprint, optimizer, ids)

    # ---------------------------------------------------------------- compiled programs
    @property
    def resolution(self) -> int:
        return (
            self.config.model.resolution if self.config.model.resolution > 0 else self.sd.default_resolution
        )

    def _predict_fn(self, images, iterations: int | None):
        net = self.bundle.net
        return net.apply({"params": self.bundle.params}, resize_images(images, net.image_size), iterations)

    def _compiled_predict(self, iterations: int | None):
        if iterations not in self._predict:
            image = jax.ShapeDtypeStruct((1, self.resolution, self.resolution, 3), jnp.float32)
            self._predict[iterations] = (
                jax.jit(self._predict_fn, static_argnums=1).lower(image, iterations).compile()
            )
        return self._predict[iterations]

    def _start(self, predicted: Mapping[str, Any], key: jax.Array):
        """``(relaxed, state, applied prediction, run key)`` of one identity (see :meth:`finetune_many`)."""
        b, r = self.bundle, self.config.relax
        k_init, k_run = jax.random.split(key)
        rx = relax.relax(
            r.variant, None, b.adapters, b.basis, predicted, rank=r.rank, alpha=r.alpha or None, key=k_init
        )
        applied = predicted if r.variant == "fresh" else jax.tree_util.tree_map(jnp.zeros_like, predicted)
        return rx, relax.init_state(rx, self.optimizer), applied, k_run

    def _compiled_run(self, n: int, steps: int):
        """The N-photo, K-step program (AOT-compiled once per (N, K); cached on disk too)."""
        if (n, steps) not in self._run:
            r = self.config.relax
            rx, state, applied, k_run = self._start(
                zero_prediction(self.bundle.adapters), jax.random.PRNGKey(0)
            )
            program = relax.make_batched_finetune(
                self.sd,
                rx.adapters,
                self.bundle.adapters,
                self.optimizer,
                batch_size=r.batch_size,
                flip=r.flip,
                shift=r.shift,
                map_batch=r.get("map_batch", 1),
            )
            spec = lambda t: jax.tree_util.tree_map(  # noqa: E731
                lambda x: jax.ShapeDtypeStruct((n, *jnp.shape(x)), jnp.result_type(x)), t
            )
            plain = lambda t: jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), t
            )  # noqa: E731
            res = self.resolution
            self._run[(n, steps)] = program.lower(
                spec(state),
                spec(applied),
                plain(self.params),
                plain(self.bundle.basis),
                jax.ShapeDtypeStruct((n, res, res, 3), jnp.float32),
                plain(jnp.asarray(self.input_ids)),
                spec(k_run),
                steps,
            ).compile()
        return self._run[(n, steps)]

    def compile(self, steps: int | None = None, iterations: int | None = None) -> float:
        """Compiles (or fetches from the persistent cache) prediction and the K-step finetune; seconds."""
        t0 = time.perf_counter()
        self._compiled_predict(iterations)
        self._compiled_run(1, steps or self.config.relax.steps)
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
        return relax.relax(
            r.variant,
            self.params,
            b.adapters,
            b.basis,
            predicted,
            rank=r.rank,
            alpha=r.alpha or None,
            key=key,
        )

    def finetune_from(
        self, predicted: Mapping[str, Any], image: np.ndarray, key: jax.Array, steps: int | None = None
    ) -> tuple[dict, dict, np.ndarray]:
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
        return self.finetune_many([predicted], np.asarray(image)[None], jnp.stack([key]), steps)[0]

    def finetune_many(
        self,
        predicted: list[Mapping[str, Any]],
        references: np.ndarray,
        keys: jax.Array,
        steps: int | None = None,
    ) -> list[tuple[dict, dict, np.ndarray]]:
        """:meth:`finetune_from` for N photos at once, as one compiled program (compiled once per N, K).

        The base weights are shared (each prediction is applied in activation space, see
        :func:`hdb_jax.relax.make_batched_finetune`), so identity i gets exactly what
        ``finetune_from(predicted[i], references[i], keys[i])`` gives.

        Args:
          predicted: N LiDB predictions (or zero predictions).
          references: uint8 ``[N, H, W, 3]``.
          keys: ``[N]`` PRNG keys.

        Returns:
          N ``(adapters, tree, losses)``.
        """
        steps = steps or self.config.relax.steps
        started = [self._start(p, k) for p, k in zip(predicted, keys)]
        stack = lambda trees: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)  # noqa: E731
        run = self._compiled_run(len(started), steps)
        pixels = jnp.asarray(images.to_unit_range(np.asarray(references)))
        states, losses = run(
            stack([s[1] for s in started]),
            stack([s[2] for s in started]),
            self.params,
            self.bundle.basis,
            pixels,
            jnp.asarray(self.input_ids),
            jnp.stack([s[3] for s in started]),
        )
        out = []
        for i, (rx, *_) in enumerate(started):
            adapters, tree = relax.fold(rx, jax.tree_util.tree_map(lambda x: x[i], states["trainable"]))
            out.append((adapters, tree, np.asarray(losses[i])))
        return out

    def export(
        self,
        out: str | os.PathLike,
        adapters: Mapping[str, A.Adapter],
        tree: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        """Writes ``personal.safetensors`` and the diffusers/PEFT ``lora/`` folder; returns their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tree = jax.device_get(tree)
        written = personal.save_personal(
            out / "personal.safetensors", adapters, tree, base_fingerprint=self.fingerprint, extra=extra
        )
        lora = export.export_lora(out / "lora", adapters, tree)
        return {"personal": os.fspath(written), "lora": os.fspath(lora.path)}


def personalize(config: ml_collections.ConfigDict, image_path: str, out: str) -> dict:
    """Runs the whole pipeline for one photo, or for every photo of a folder; returns timings and files.

    A folder is personalised in programs of ``config.relax.photos_per_program`` photos (one compile
    per batch shape) and each photo's files go to ``out/<file stem>/``; the report adds
    ``identities_per_s`` (hypernetwork + finetune time only).
    """
    enable_compile_cache(config.compile_cache)
    timings = {}
    t0 = time.perf_counter()
    configs_only = loading.load_configs(config.model.source)  # no weights: the images are checked first
    resolution = config.model.resolution if config.model.resolution > 0 else configs_only.default_resolution
    if os.path.isdir(image_path):
        photos = folder.ImageFolder(image_path, resolution=resolution, min_size=config.min_image_size)
        named = [
            (Path(photos.paths[i]).stem, photos[i]["image"], photos.paths[i]) for i in range(len(photos))
        ]
    else:
        named = [("", validate_image(image_path, resolution, config), image_path)]
    p = Personalizer.load(config)
    timings["load"] = time.perf_counter() - t0
    chunk = max(1, min(len(named), int(config.relax.get("photos_per_program", 8))))
    timings["compile"] = (
        p.compile() if chunk == 1 else p.compile() + _time(lambda: p._compiled_run(chunk, config.relax.steps))
    )
    r = config.relax
    timings["hypernet"] = timings["finetune"] = timings["export"] = 0.0
    files, losses = {}, {}
    for start in range(0, len(named), chunk):
        group = named[start : start + chunk]
        group = group + [group[-1]] * (chunk - len(group))  # pad the last program to its compiled size
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
        "device": jax.devices()[0].platform,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "timings.json").write_text(json.dumps(report, indent=1))
    print(timing_table(timings))
    if len(named) > 1:
        print(f"{len(named)} identities, {report['identities_per_s']} identities/s (hypernet + finetune)")
    return report


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
    from absl import app, flags, logging
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
        try:
            personalize(config_flag.value, flags.FLAGS.image, flags.FLAGS.out)
        except (
            folder.BadImageError,
            folder.NoImagesError,
            FileNotFoundError,
            bundle_lib.BundleError,
            loading.ModelLoadError,
        ) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
