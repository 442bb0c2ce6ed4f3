"""Real-model subject metrics of the DreamBooth protocol: CLIP-I, CLIP-T and DINO.

Each is a raw cosine (not CLIPScore's ``100 * max(cos, 0)``) per generated image (for the caller to
bootstrap), averaged over the subject's reference images:

* **CLIP-I**: CLIP image embeddings (``get_image_features``) of generated vs reference images;
* **CLIP-T**: CLIP image embedding vs the CLIP text embedding (``get_text_features``) of the prompt
  without the subject token ("a sks face wearing a hat" is scored against "a face wearing a hat");
* **DINO**: DINO ViT-S/16 embeddings (CLS token of the last hidden state), generated vs reference.

Models come from local transformers-format directories only, through :mod:`hdb_jax.sd.hf`'s Flax
classes (safetensors and Flax msgpack weights need no torch; PyTorch pickles do). Preprocessing runs in
JAX inside the jitted forward pass and mirrors the transformers image processors, which resize with PIL
in two separable passes (width, then height) rounded to 8 bits each; sizes, kernel and statistics come
from ``preprocessor_config.json``. Without one CLIP resizes the short side to its input size and DINO
follows DreamBooth's evaluation (short side to ``256/224`` of it, center crop, ImageNet statistics).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax.eval.preprocessing import (  # noqa: F401 (part of this module's API)
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
)
from hdb_jax.sd import hf, loading
from hdb_jax.sd.loading import ModelLoadError

_UNUSED = re.compile(r"^pooler\.|.*(position_ids|num_batches_tracked)$")  # buffers; some ViTs' pooler


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


# -------------------------------------------------------------------- preprocessing
# -------------------------------------------------------------------- scores and prompts
def replace_token(prompt: str, token: str = "sks", replacement: str = "") -> str:
    """The prompt with every whole-word ``token`` replaced (by default removed), spacing tidied.

    Args:
        prompt: e.g. ``"a sks face wearing a hat"``.
        token: the rare subject token (literal text, may be several words).
        replacement: what replaces it, e.g. a class word; ``""`` removes it.

    Returns:
        e.g. ``"a face wearing a hat"``; a prompt without the token comes back unchanged.
    """
    text = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", replacement, prompt)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" ([,.;:!?])", r"\1", text)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _batched(fn: Callable, params, arrays: tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
    """``fn(params, *chunks)`` over fixed-size chunks (the last one zero-padded: one compile)."""
    total = len(arrays[0])
    size = min(total, batch_size)
    padded = -(-total // size) * size
    arrays = [np.concatenate([a, np.zeros((padded - total,) + a.shape[1:], a.dtype)]) for a in arrays]
    outputs = [np.asarray(fn(params, *(a[i : i + size] for a in arrays))) for i in range(0, padded, size)]
    return np.concatenate(outputs)[:total]


# -------------------------------------------------------------------- loading
def _load(
    path,
    model_class,
    model_type: str,
    example: str,
    fallback: Callable[[int], Preprocessing],
    convention: dict,
    required: tuple[str, ...] = (),
    **kwargs,
):
    """``(directory, Flax model, params, preprocessing)``; first checks the directory and the ``required``
    files, raising ModelLoadError naming the path at fault."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(
            f"model directory {root} does not exist (expected a local transformers-format "
            f"directory, e.g. a download of {example}; nothing is downloaded)"
        )
    config, processor = _read_json(root / "config.json"), root / "preprocessor_config.json"
    if config.get("model_type") != model_type:
        raise ModelLoadError(
            f"{root / 'config.json'}: model_type {config.get('model_type')!r}, expected {model_type!r}"
        )
    default = fallback(config.get("vision_config", config).get("image_size", 224))
    try:
        preprocessing = (
            Preprocessing.from_config(_read_json(processor), default, **convention)
            if processor.is_file()
            else default
        )
    except (ValueError, KeyError) as err:
        raise ModelLoadError(f"{processor}: {err}") from err
    missing = [name for name in required if not (root / name).is_file()]
    if missing:
        raise ModelLoadError(f"{root}: missing {', '.join(missing)}")
    return (root, *_read_weights(model_class, root, **kwargs), preprocessing)


def _read_weights(model_class, root: Path, **kwargs) -> tuple[object, dict]:
    """``(Flax model, float32 params)`` without a random init: PyTorch-layout safetensors renamed against
    the abstract parameters (no torch), else Flax msgpack, else (torch needed) PyTorch pickles."""
    names = {p.name for p in root.iterdir()}
    safetensors = "model.safetensors" in names
    flax = bool(names & {"flax_model.msgpack", "flax_model.msgpack.index.json"})
    if not safetensors and not flax:
        if not names & {"pytorch_model.bin", "pytorch_model.bin.index.json"}:
            raise ModelLoadError(f"{root}: no model.safetensors, flax_model.msgpack or pytorch_model.bin")
        if not _torch_available():
            raise ModelLoadError(
                f"{root}: only PyTorch pickle weights (pytorch_model.bin); reading them "
                "needs torch. Install torch or convert the checkpoint to model.safetensors"
            )
    try:
        if safetensors:
            config = model_class.config_class.from_pretrained(root, local_files_only=True)
            model = model_class(config, _do_init=False, **kwargs)
        elif flax:
            model, params = model_class.from_pretrained(root, local_files_only=True, _do_init=False, **kwargs)
        else:  # transformers converts pickles through torch, from a randomly initialised model
            model = model_class.from_pretrained(root, local_files_only=True, from_pt=True, **kwargs)
            params = model.params
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{root}: could not load the model ({err})") from err
    if safetensors:

        def rename(name, tensor, expected):
            key = tuple(name.split("."))
            return hf.transformers_rename_and_reshape(key, tensor, expected, model.base_model_prefix)

        file = root / "model.safetensors"
        params = loading.convert_tensors(
            loading.read_safetensors([file]),
            model.params_shape_tree,
            rename,
            what=f"the {model_class.__name__} config",
            source=os.fspath(file),
            skip=lambda name: bool(_UNUSED.match(name)),
        )
    return model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise ModelLoadError(f"{file.parent}: missing '{file.name}' (not a transformers-format directory)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{file}: not valid JSON ({err})") from err


# -------------------------------------------------------------------- scorers
class _ImageScorer:
    """Preprocessing, input-size check and the batched, jitted image forward pass of a scorer."""

    def __init__(
        self,
        model,
        params,
        preprocessing: Preprocessing,
        image_size: int,
        embed: Callable,
        batch_size: int,
        name: str,
    ):
        self.model, self.params, self.preprocessing = model, params, preprocessing
        self.image_size, self.batch_size, self.name = image_size, batch_size, name
        # (params, uint8 [B, H, W, 3]) -> [B, D]; compiled once per batch shape.
        self._embed = jax.jit(lambda p, images: embed(p, preprocessing(images)))

    def embeddings(self, images: np.ndarray) -> np.ndarray:
        """The embeddings the metric compares (unnormalised).

        Args:
            images: uint8 ``[N, H, W, 3]``.

        Returns:
            float32 ``[N, D]``: CLIP's projected image features, or DINO's CLS token.
        """
        return _batched(self._embed, self.params, (self._checked(images),), self.batch_size)

    def mean_cosine(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        """Per generated image, the mean cosine of its embedding to the references' (CLIP-I, DINO).

        Args:
            images: generated, uint8 ``[N, H, W, 3]``.
            references: the subject's images, uint8 ``[R, H', W', 3]``.

        Returns:
            float64 ``[N]``.
        """
        cosines = _unit(self.embeddings(images)) @ _unit(self.embeddings(references)).T  # [N, R]
        return cosines.mean(axis=1)

    def _checked(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or not len(images):
            raise ValueError(f"expected uint8 images [N>0, H, W, 3], got {images.dtype} {images.shape}")
        out = self.preprocessing.crop or self.preprocessing.resized_size(*images.shape[1:3])
        if tuple(out) != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.name}: preprocessing makes {out} inputs from {images.shape[1:3]} "
                f"images; the model takes {self.image_size}x{self.image_size}"
            )
        return images


class ClipScorer(_ImageScorer):
    """CLIP-I and CLIP-T with a CLIP model (e.g. ``openai/clip-vit-base-patch32``)."""

    def __init__(
        self, model, params, tokenizer, preprocessing: Preprocessing, *, batch_size: int = 32, name: str = ""
    ):
        super().__init__(
            model,
            params,
            preprocessing,
            model.config.vision_config.image_size,
            lambda p, pixels: model.get_image_features(pixels, params=p),
            batch_size,
            name,
        )
        self.tokenizer = tokenizer
        self.max_length = model.config.text_config.max_position_embeddings
        # (params, int32 ids [B, L], mask [B, L]) -> [B, P]
        self._text = jax.jit(lambda p, ids, mask: model.get_text_features(ids, mask, params=p))

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, preprocessing: Preprocessing | None = None, batch_size: int = 32
    ) -> ClipScorer:
        """Loads a local transformers-format CLIP directory; ModelLoadError names a missing path.

        Args:
            path: the directory.
            preprocessing: overrides the one read from ``preprocessor_config.json``.
            batch_size: images or prompts per forward pass.

        Returns:
            The scorer.
        """
        convention = {"int_size_is_shortest_edge": True, "crops_by_default": True}
        tokenizer_files = ("vocab.json", "merges.txt")
        root, model, params, read = _load(
            path,
            hf.FlaxCLIPModel,
            "clip",
            "openai/clip-vit-base-patch32",
            Preprocessing.clip_default,
            convention,
            tokenizer_files,
        )
        tokenizer = hf.CLIPTokenizer.from_pretrained(os.fspath(root), local_files_only=True)
        return cls(
            model, params, tokenizer, preprocessing or read, batch_size=batch_size, name=os.fspath(root)
        )

    image_embeddings = _ImageScorer.embeddings  # get_image_features, [N, P]
    clip_i = _ImageScorer.mean_cosine  # CLIP-I, [N]

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """CLIP text features (``get_text_features``, unnormalised) of prompts used as given.

        Args:
            prompts: M strings (padded and truncated to the model's context length).

        Returns:
            float32 ``[M, P]``.
        """
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="np",
        )
        ids, mask = (tokens[key].astype(np.int32) for key in ("input_ids", "attention_mask"))  # [M, L]
        return _batched(self._text, self.params, (ids, mask), self.batch_size)

    def clip_t(
        self, images: np.ndarray, prompts: str | Sequence[str], token: str = "sks", replacement: str = ""
    ) -> np.ndarray:
        """CLIP-T: cosine of each image to its prompt, with the subject token replaced.

        Args:
            images: generated, uint8 ``[N, H, W, 3]``.
            prompts: one prompt per image (N), or one for all.
            token: the rare subject token to take out of the prompts.
            replacement: what replaces it (``""``: removed; or a class word such as ``"person"``).

        Returns:
            float64 ``[N]``.
        """
        images = self._checked(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        texts = self.text_embeddings([replace_token(p, token, replacement) for p in prompts])
        return np.sum(_unit(self.image_embeddings(images)) * _unit(texts), axis=-1)  # [N]


class DinoScorer(_ImageScorer):
    """The DINO metric with a ViT (e.g. ``facebook/dino-vits16``), loaded without a pooler."""

    def __init__(self, model, params, preprocessing: Preprocessing, *, batch_size: int = 32, name: str = ""):
        super().__init__(
            model,
            params,
            preprocessing,
            model.config.image_size,
            lambda p, pixels: model(pixels, params=p).last_hidden_state[:, 0],
            batch_size,
            name,
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, preprocessing: Preprocessing | None = None, batch_size: int = 32
    ) -> DinoScorer:
        """Loads a local transformers-format ViT directory; ModelLoadError names a missing path.

        Args:
            path: the directory.
            preprocessing: overrides the one read from ``preprocessor_config.json``
                (``Preprocessing.dino_protocol()`` forces DreamBooth's transform).
            batch_size: images per forward pass.

        Returns:
            The scorer.
        """
        convention = {"int_size_is_shortest_edge": False, "crops_by_default": False}
        root, model, params, read = _load(
            path,
            hf.FlaxViTModel,
            "vit",
            "facebook/dino-vits16",
            Preprocessing.dino_protocol,
            convention,
            add_pooling_layer=False,
        )
        return cls(model, params, preprocessing or read, batch_size=batch_size, name=os.fspath(root))

    dino = _ImageScorer.mean_cosine  # DINO, [N]
