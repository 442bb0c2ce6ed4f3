"""Loading Stable Diffusion from a diffusers-format directory (or hub id) without torch.

A diffusers-format model is a directory with ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/`` and ``scheduler/`` subfolders, each with its config and (for the networks)
PyTorch-layout weights in safetensors, as SD 1.5 is distributed. We read the tensors with
``safetensors`` into numpy, rename and transpose them with diffusers' / transformers' own key
helpers against the model's abstract parameters (``jax.eval_shape`` of its init: no random
init, no torch), and check that every parameter is present with the right shape.

Flax msgpack weights (``diffusion_flax_model.msgpack`` / ``flax_model.msgpack``) are read too.
PyTorch pickles (``.bin``) are refused with a message: reading them needs torch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util
from safetensors import safe_open

from hdb_jax.sd import attention as attention_lib
from hdb_jax.sd import hf
from hdb_jax.sd.model import COMPONENTS, StableDiffusion

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_flax_model.msgpack"),
    "vae": ("diffusion_pytorch_model", "diffusion_flax_model.msgpack"),
    "text_encoder": ("model", "flax_model.msgpack"),
}
_CONFIG_FILES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
# Buffers some PyTorch checkpoints carry that the Flax models compute instead.
_IGNORED_KEYS = re.compile(r".*(position_ids|num_batches_tracked)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """A model directory, file or checkpoint is missing or not what was expected."""


# -------------------------------------------------------------------- locating files
def resolve(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory for ``source``: an existing path, or a hub id fetched when online.

    Raises:
      ModelLoadError: the directory does not exist (and ``source`` is no hub id), or the hub
        could not be reached.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(source)
    if path.exists():
        raise ModelLoadError(f"model path {path} is a file; expected a diffusers-format directory")
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model directory {path} does not exist (expected a diffusers-format directory with "
            f"subfolders {', '.join(SUBFOLDERS)}, or a hub id such as 'org/name')"
        )
    try:
        from huggingface_hub import snapshot_download  # a transformers dependency
    except ImportError as err:  # pragma: no cover - always installed with transformers
        raise ModelLoadError(f"'{text}' is not a local directory and huggingface_hub is missing") from err
    patterns = ["*.json", "*.txt", "*.safetensors", "*.msgpack"]
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
    except Exception as err:  # network errors, unknown repo, offline mode
        raise ModelLoadError(
            f"'{text}' is not a local directory and could not be fetched from the hub: {err}"
        ) from err


def _subfolder(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise ModelLoadError(
            f"{root}: missing subfolder '{name}/' (diffusers format expects {', '.join(SUBFOLDERS)})"
        )
    if not any(folder.iterdir()):
        raise ModelLoadError(f"{folder}: subfolder is empty")
    return folder


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path.parent}: missing file '{path.name}'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from err


def _weights_files(folder: Path, component: str, variant: str | None) -> list[Path]:
    stem, flax_name = _WEIGHT_STEMS[component]
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    single = folder / f"{stem}{suffix}"
    if single.is_file():
        return [single]
    index = folder / f"{stem}{suffix}.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index}: names shard '{f.name}' which does not exist")
        return files
    if (folder / flax_name).is_file():
        return [folder / flax_name]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
    if pickles:
        raise ModelLoadError(
            f"{folder}: found only PyTorch pickle weights ({', '.join(pickles)}); hdb_jax reads "
            f"'{single.name}' (or sharded safetensors, or '{flax_name}') without torch. Convert "
            "the checkpoint to safetensors first."
        )
    raise ModelLoadError(f"{folder}: no weights file; expected '{single.name}' or '{flax_name}'")


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    """Every tensor of the (possibly sharded) safetensors ``files`` as numpy arrays."""
    state: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(os.fspath(file), framework="numpy") as handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        except TypeError:
            # numpy cannot hold bfloat16; read through JAX and keep it as ml_dtypes' bfloat16.
            with safe_open(os.fspath(file), framework="flax") as handle:
                for key in handle.keys():
                    state[key] = np.asarray(handle.get_tensor(key))
        except Exception as err:
            raise ModelLoadError(f"{file}: not a readable safetensors file ({err})") from err
    return state


# -------------------------------------------------------------------- conversion
def convert_tensors(
    state: Mapping[str, np.ndarray],
    abstract: Mapping[str, Any],
    rename: Callable[[str, np.ndarray, Mapping], tuple[tuple[str, ...], np.ndarray]],
    *,
    what: str,
    source: str,
    skip: Callable[[str], bool] = lambda name: bool(_IGNORED_KEYS.match(name)),
) -> dict:
    """PyTorch-layout tensors -> a Flax parameter tree, every parameter checked against ``abstract``.

    Args:
      state: PyTorch state-dict names -> numpy arrays.
      abstract: the target's abstract Flax parameters (``jax.eval_shape`` of its init).
      rename: ``(name, tensor, expected_flat) -> (flax key tuple, tensor in Flax layout)``.
      what: the target's name in error messages (e.g. ``the unet config``).
      source: the file the tensors came from, for error messages.
      skip: names to ignore (buffers the Flax models compute themselves).

    Returns:
      A nested dict of numpy arrays in Flax layout.

    Raises:
      ModelLoadError: missing, unexpected or mis-shaped parameters (e.g. weights of another
        base model), listing a few of each.
    """
    expected = traverse_util.flatten_dict(abstract)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched = [], []
    for name, tensor in state.items():
        if skip(name):
            continue
        key, value = rename(name, tensor, expected)
        if key not in expected:
            unexpected.append(name)
        elif tuple(value.shape) != tuple(expected[key].shape):
            mismatched.append(f"{name} {tuple(value.shape)} != {tuple(expected[key].shape)}")
        else:
            out[key] = np.asarray(value)
    missing = ["/".join(k) for k in expected if k not in out]
    if unexpected or mismatched or missing:
        parts = [
            f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", mismatched),
            )
            if items
        ]
        raise ModelLoadError(
            f"{source}: weights do not fit {what}: {'; '.join(parts)}. Is this checkpoint for another base model?"
        )
    return traverse_util.unflatten_dict(out)


def convert_state_dict(
    component: str, state: Mapping[str, np.ndarray], abstract: Mapping[str, Any], source: str
) -> dict:
    """A component's PyTorch-layout tensors -> its Flax tree (see :func:`convert_tensors`).

    ``component`` (``unet``, ``vae`` or ``text_encoder``) chooses diffusers' or transformers'
    renaming rules.
    """
    if component == "text_encoder":

        def rename(name, tensor, expected):
            return hf.transformers_rename_and_reshape(tuple(name.split(".")), tensor, expected, "text_model")
    else:

        def rename(name, tensor, expected):
            return hf.diffusers_rename_and_reshape(
                tuple(hf.diffusers_rename_key(name).split(".")), tensor, expected
            )

    return convert_tensors(state, abstract, rename, what=f"the {component} config", source=source)


def _load_component(folder: Path, component: str, abstract, variant: str | None):
    files = _weights_files(folder, component, variant)
    if files[0].suffix == ".msgpack":
        try:
            tree = serialization.msgpack_restore(files[0].read_bytes())
        except Exception as err:
            raise ModelLoadError(f"{files[0]}: not a readable Flax msgpack file ({err})") from err
        flat = traverse_util.flatten_dict(tree)
        state = {".".join(k): np.asarray(v) for k, v in flat.items()}
        expected = traverse_util.flatten_dict(abstract)
        bad = sorted(set(map(".".join, expected)) ^ set(state))
        if bad:
            raise ModelLoadError(f"{files[0]}: parameters do not fit the {component} config (e.g. {bad[:3]})")
        return tree
    return convert_state_dict(component, read_safetensors(files), abstract, os.fspath(files[0]))


# -------------------------------------------------------------------- public API
def load_configs(
    source: str | os.PathLike, *, dtype=jnp.float32, revision: str | None = None
) -> StableDiffusion:
    """The model bundle (modules, tokenizer, scheduler) of a diffusers-format model, no weights."""
    root = resolve(source, revision)
    configs = {}
    for name, filename in _CONFIG_FILES.items():
        configs[name] = _read_json(_subfolder(root, name) / filename)
    tok_dir = _subfolder(root, "tokenizer")
    for required in ("vocab.json", "merges.txt"):
        if not (tok_dir / required).is_file():
            raise ModelLoadError(f"{tok_dir}: missing tokenizer file '{required}'")
    tokenizer = hf.CLIPTokenizer.from_pretrained(os.fspath(tok_dir))
    return StableDiffusion.from_configs(configs, tokenizer, name=os.fspath(source), dtype=dtype)


def load_pretrained(
    source: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    variant: str | None = None,
    revision: str | None = None,
    components: tuple[str, ...] = COMPONENTS,
    attention: str = attention_lib.DEFAULT_IMPLEMENTATION,
    attention_chunk: int = attention_lib.DEFAULT_CHUNK,
) -> tuple[StableDiffusion, dict]:
    """Loads a diffusers-format Stable Diffusion (local directory or hub id), torch-free.

    Args:
      source: a directory, or a hub id (downloaded only if not a local path).
      dtype: computation dtype of the modules.
      param_dtype: dtype the weights are cast to.
      variant: a weights variant such as ``fp16`` (``*.fp16.safetensors``).
      revision: hub revision.
      components: which networks to load weights for (configs are always read).
      attention: the UNet attention implementation (see :mod:`hdb_jax.sd.attention`).
      attention_chunk: queries per chunk for the chunked implementations.

    Returns:
      ``(sd, params)`` with ``params = {component: tree of jax arrays}``.

    Raises:
      ModelLoadError: naming the directory, subfolder or file at fault.
    """
    root = resolve(source, revision)
    sd = load_configs(root, dtype=dtype)
    sd = StableDiffusion.from_configs(
        sd.configs,
        sd.tokenizer,
        name=os.fspath(source),
        dtype=dtype,
        attention=attention,
        attention_chunk=attention_chunk,
    )
    abstract = sd.abstract_params()
    params = {}
    for component in components:
        tree = _load_component(_subfolder(root, component), component, abstract[component], variant)
        params[component] = jax.tree_util.tree_map(lambda x: jnp.asarray(x, param_dtype), tree)
    return sd, params


def save_pretrained(
    directory: str | os.PathLike, sd: StableDiffusion, params: Mapping[str, Any], *, dtype=jnp.float32
) -> Path:
    """Writes a diffusers-format directory (Flax msgpack weights) that :func:`load_pretrained` reads.

    The layout is diffusers' own for Flax weights: ``model_index.json``, ``unet/`` and ``vae/``
    with ``config.json`` + ``diffusion_flax_model.msgpack``, ``text_encoder/`` with
    ``config.json`` + ``flax_model.msgpack``, ``tokenizer/`` and ``scheduler/``.

    Args:
      directory: the output directory (created; existing files are replaced).
      sd: the model bundle (configs and tokenizer are written from it).
      params: ``{"unet", "vae", "text_encoder"}`` parameter trees.
      dtype: dtype the weights are stored in (e.g. ``jnp.float16`` to halve the size; the
        loader casts back to its ``param_dtype``).

    Returns:
      The directory.
    """
    root = Path(directory)
    if sd.tokenizer is None:
        raise ValueError(f"{sd.name}: a model without a tokenizer cannot be saved in diffusers format")
    weight_names = {c: stems[1] for c, stems in _WEIGHT_STEMS.items()}
    for component in COMPONENTS:
        folder = root / component
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _CONFIG_FILES[component]).write_text(
            json.dumps(sd.configs[component], indent=2, sort_keys=True)
        )
        tree = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), params[component])
        (folder / weight_names[component]).write_bytes(serialization.msgpack_serialize(tree))
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / _CONFIG_FILES["scheduler"]).write_text(
        json.dumps(sd.configs["scheduler"], indent=2, sort_keys=True)
    )
    sd.tokenizer.save_pretrained(os.fspath(root / "tokenizer"))
    index = {"_class_name": "FlaxStableDiffusionPipeline", "_diffusers_version": hf.DIFFUSERS_VERSION}
    index.update(
        {
            name: ["diffusers" if name in ("unet", "vae") else "transformers", cls]
            for name, cls in (
                ("unet", "FlaxUNet2DConditionModel"),
                ("vae", "FlaxAutoencoderKL"),
                ("text_encoder", "FlaxCLIPTextModel"),
                ("tokenizer", "CLIPTokenizer"),
            )
        }
    )
    index["scheduler"] = ["diffusers", "FlaxDDPMScheduler"]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
