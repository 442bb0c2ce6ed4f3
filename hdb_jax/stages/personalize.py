"""The personalisation runtime: a loaded base model and hypernetwork with their compiled programs.

:class:`Personalizer` predicts LiDB weights from a photo, relaxes them (:mod:`hdb_jax.blocks.relax`) and
finetunes them as one compiled program per (photos, steps), for the command line
(:mod:`hdb_jax.jobs.personalize`), the main job, the sweep and notebooks. :func:`default_config` is the
settings they share (``configs/personalize.py``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hdb_jax import adapters as A
from hdb_jax.blocks import build, relax
from hdb_jax.common import executables, images
from hdb_jax.data import folder
from hdb_jax.formats import lora as export
from hdb_jax.formats import personal
from hdb_jax.hypernet import bundle as bundle_lib
from hdb_jax.hypernet.encoder import resize_images
from hdb_jax.sd import model
from hdb_jax.sd.fingerprint import params_fingerprint


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
    c.bundle = os.fspath(hypernet_dir())  # a hypernetwork bundle (written by stage 2)
    c.prompt = "a sks face"
    c.compile_cache = os.path.expanduser("~/.cache/hdb_jax/jax_compile")  # empty: no persistent cache
    c.min_image_size = 32  # shortest accepted side of the photo, pixels
    c.max_image_pixels = 64_000_000  # larger photos are refused before decoding
    c.relax = ml_collections.ConfigDict()
    c.relax.variant = variant
    c.relax.rank = 4
    c.relax.alpha = 0.0  # 0: alpha = rank (LoRA scale 1)
    c.relax.steps = 25 if variant == "svd" else 40
    # The paper's rate. From the toy hypernetwork's prediction (identity 0.252 on the main job's 8
    # held-out identities) every rate we tried loses identity as it finetunes, the lowest least:
    #   lr      hypernet+finetune @10 / @40     finetune from zero @10 / @40
    #   1e-2    0.146 / 0.111                   0.079 / 0.093
    #   3e-3    0.186 / 0.123                   0.090 / 0.103
    #   1e-3    0.202 / 0.130                   0.120 / 0.063
    # (configs/demo.py with --config.personalize.relax.learning_rate=<lr> and the four finetune rows;
    # one row's mean moves ~0.04 with sampling noise alone). 1e-2 learns a face faster from zero over
    # 300 steps (0.28 against 0.16 at 1e-3, two-identity probe), not in the paper's 40.
    c.relax.learning_rate = 1e-3
    c.relax.weight_decay = 0.0
    c.relax.grad_clip = 1.0
    c.relax.batch_size = 4  # augmented views of the photo per step
    c.relax.flip = False  # a mirrored face is another face (the toy faces' hair parts the other way)
    c.relax.shift = 2  # random translation, pixels
    c.relax.photos_per_program = 8  # a folder of photos is personalised this many per compiled program
    c.relax.map_batch = 1  # photos vmapped together inside a program (1: each exactly as a single run)
    return c


class SettingsError(ValueError):
    """A personalisation setting out of its range; the message names the field."""


def check_settings(config: ml_collections.ConfigDict) -> None:
    """Refuses out-of-range settings before anything is loaded or compiled (:class:`SettingsError`)."""
    r = config.relax
    problems = []
    if r.variant not in relax.VARIANTS:
        problems.append(f"config.relax.variant={r.variant!r}: choose from {relax.VARIANTS}")
    for name, low in (
        ("rank", 1),
        ("steps", 0),
        ("batch_size", 1),
        ("photos_per_program", 1),
        ("map_batch", 1),
    ):
        value = r[name]
        if int(value) != value or value < low:
            problems.append(f"config.relax.{name}={value!r}: expected an integer >= {low}")
    if not (np.isfinite(r.learning_rate) and r.learning_rate > 0):
        problems.append(f"config.relax.learning_rate={r.learning_rate!r}: expected a positive number")
    if r.alpha < 0 or r.grad_clip < 0 or r.shift < 0:
        problems.append("config.relax.alpha, grad_clip and shift must be >= 0")
    if config.model.resolution < 0:
        problems.append(
            f"config.model.resolution={config.model.resolution}: expected >= 0 (0: the model's own)"
        )
    if problems:
        raise SettingsError("; ".join(problems))


CACHE_MAX_BYTES = 16 << 30  # the persistent compilation cache's bound (least recently used go first)
EXECUTABLES = "executables"  # the compile cache's folder of stored programs (ExecutableStore)


def enable_compile_cache(directory: str | os.PathLike | None) -> None:
    """Turns on JAX's persistent compilation cache in ``directory`` (every program is cached)."""
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if jax.config.jax_compilation_cache_max_size == -1:
        # A bound turns on JAX's file lock around entries: several personalisations started at
        # once on one cache (a batch job) cannot write one file together or read it half-written.
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)


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
    store: executables.ExecutableStore | None = None  # compiled programs on disk (no tracing when warm)
    _predict: dict = dataclasses.field(default_factory=dict)  # iterations -> compiled prediction
    _run: dict = dataclasses.field(default_factory=dict)  # (photos, steps) -> compiled finetune program

    @classmethod
    def load(cls, config: ml_collections.ConfigDict, *, sd=None, params=None) -> "Personalizer":
        """Loads the base model (unless given) and the bundle in ``config.bundle``; checks they fit."""
        check_settings(config)
        if sd is None:
            bundle_lib.read_meta(config.bundle)  # a missing bundle fails before the model loads
            sd, params = build.base_model(config.model)
        fingerprint = params_fingerprint(params)
        bundle = bundle_lib.load(config.bundle, jax.eval_shape(lambda: params), base_fingerprint=fingerprint)
        r = config.relax
        optimizer = build.optimizer(
            dict(learning_rate=r.learning_rate, weight_decay=r.weight_decay, grad_clip=r.grad_clip)
        )
        ids = np.asarray(sd.tokenize([config.prompt]))[0]
        store = (
            executables.ExecutableStore(Path(config.compile_cache) / EXECUTABLES)
            if config.compile_cache
            else None
        )
        return cls(sd, params, bundle, config, fingerprint, optimizer, ids, store)

    # ---------------------------------------------------------------- compiled programs
    @property
    def resolution(self) -> int:
        return (
            self.config.model.resolution if self.config.model.resolution > 0 else self.sd.default_resolution
        )

    def _predict_fn(self, net_params, images, iterations: int | None):
        net = self.bundle.net
        return net.apply({"params": net_params}, resize_images(images, net.image_size), iterations)

    def _compile(self, name: str, key: Mapping[str, Any], lower) -> jax.stages.Compiled:
        """``lower().compile()``, or the executable stored under ``key`` (see :attr:`store`)."""
        if self.store is None:
            return lower().compile()
        return self.store.get(name, key, lower)

    def _model_key(self) -> dict[str, Any]:
        """What, besides argument shapes, decides the base model's part of a program."""
        sd = self.sd
        return {
            "configs": sd.configs,
            "attention": [sd.attention, sd.attention_chunk],
            "remat": sd.remat,
            "resolution": self.resolution,
            "prng": str(jax.config.jax_default_prng_impl),
        }

    def _compiled_predict(self, iterations: int | None):
        """The compiled ``(hypernetwork params, images [1, H, W, 3]) -> trainable tree``. The params
        are an argument: closed over, they would be compiled in as constants (2.5 GB for ViT-H/14)."""
        if iterations not in self._predict:
            image = jax.ShapeDtypeStruct((1, self.resolution, self.resolution, 3), jnp.float32)
            abstract_params = jax.eval_shape(lambda: self.bundle.params)
            key = {
                "net": repr(self.bundle.net),
                "bundle": self.bundle.meta,
                "params": executables.abstract(abstract_params),
                "image": list(image.shape),
                "iterations": iterations,
            }
            self._predict[iterations] = self._compile(
                "predict",
                key,
                lambda: jax.jit(self._predict_fn, static_argnums=2).lower(abstract_params, image, iterations),
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
        """The N-photo, K-step program (AOT-compiled once per (N, K); stored on disk too)."""
        if (n, steps) not in self._run:
            key = {
                "model": self._model_key(),
                "relax": self.config.relax.to_dict(),
                "lidb": repr(self.bundle.adapters),
                "params": executables.abstract(jax.eval_shape(lambda: self.params)),
                "basis": executables.abstract(jax.eval_shape(lambda: self.bundle.basis)),
                "prompt_tokens": len(self.input_ids),
                "photos": n,
                "steps": steps,
            }
            self._run[(n, steps)] = self._compile("finetune", key, lambda: self._lower_run(n, steps))
        return self._run[(n, steps)]

    def _lower_run(self, n: int, steps: int) -> jax.stages.Lowered:
        r = self.config.relax
        rx, state, applied, k_run = self._start(zero_prediction(self.bundle.adapters), jax.random.PRNGKey(0))
        program = relax.make_batched_finetune(
            self.sd,
            rx.adapters,
            self.bundle.adapters,
            self.optimizer,
            batch_size=r.batch_size,
            flip=r.flip,
            shift=r.shift,
            map_batch=r.map_batch,
        )
        spec = lambda t: jax.tree_util.tree_map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct((n, *jnp.shape(x)), jnp.result_type(x)), t
        )
        plain = lambda t: jax.tree_util.tree_map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), t
        )
        res = self.resolution
        return program.lower(
            spec(state),
            spec(applied),
            plain(self.params),
            plain(self.bundle.basis),
            jax.ShapeDtypeStruct((n, res, res, 3), jnp.float32),
            plain(jnp.asarray(self.input_ids)),
            spec(k_run),
            steps,
        )

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
        predicted = self._compiled_predict(iterations)(self.bundle.params, pixels)
        return jax.tree_util.tree_map(lambda x: x[0], predicted)

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
          the base weights (:func:`hdb_jax.blocks.relax.fold`), and the per-step losses.
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
        :func:`hdb_jax.blocks.relax.make_batched_finetune`), so identity i gets exactly what
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
