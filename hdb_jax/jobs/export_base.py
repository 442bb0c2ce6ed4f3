"""A base model with Flax weights as a directory PyTorch diffusers loads (safetensors weights).

The shipped toy base model (:func:`hdb_jax.toy.base_model_dir`) is a diffusers-format directory
whose networks hold Flax msgpack weights, which PyTorch diffusers cannot ``from_pretrained``.
:func:`export_pytorch` writes a copy with PyTorch weights, so that the LoRA files
``hdb_jax.jobs.personalize`` exports for that model can be tried in PyTorch::

    pipe = StableDiffusionPipeline.from_pretrained("runs/toy_base_pt")
    pipe.load_lora_weights("runs/me/lora")

Weights go through the libraries' own Flax -> PyTorch converters
(:func:`hdb_jax.sd.hf.pytorch_classes`), with two additions:

* diffusers' converter does not know the Flax names of the VAE's mid-block attention
  (``query``, ``key``, ``value``, ``proj_attn``; PyTorch calls them ``to_q``, ``to_k``, ``to_v``,
  ``to_out.0``): it logs them as unused and leaves PyTorch's random init in their place. We
  rename them before converting.
* Neither converter fails on weights it could not place; it only logs them. Every floating-point
  PyTorch tensor is set to NaN before converting, and a tensor still NaN afterwards, or a Flax
  tensor left over, is an error naming the file.

Layout written (the one ``StableDiffusionPipeline.save_pretrained`` writes)::

    model_index.json                     PyTorch class names, no safety checker
    unet/config.json, diffusion_pytorch_model.safetensors
    vae/config.json, diffusion_pytorch_model.safetensors
    text_encoder/config.json, model.safetensors
    tokenizer/                           copied
    scheduler/scheduler_config.json      copied, PyTorch class name

hdb_jax's own loader (:func:`hdb_jax.sd.loading.load_pretrained`) reads the result too.

Command line::

    python -m hdb_jax.export_base --out runs/toy_base_pt [--model DIR] [--dtype float16] [--overwrite]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from flax import serialization, traverse_util

from hdb_jax.sd import hf

# component: (its Flax weights file, library, PyTorch class)
NETWORKS = {
    "unet": ("diffusion_flax_model.msgpack", "diffusers", "UNet2DConditionModel"),
    "vae": ("diffusion_flax_model.msgpack", "diffusers", "AutoencoderKL"),
    "text_encoder": ("flax_model.msgpack", "transformers", "CLIPTextModel"),
}
DTYPES = ("float32", "float16")
_EXPECTED = "subfolders unet/, vae/, text_encoder/ (with Flax weights), tokenizer/ and scheduler/"
_WRITTEN = (*NETWORKS, "tokenizer", "scheduler", "model_index.json")
# diffusers' FlaxAttentionBlock (VAE mid block) -> the PyTorch Attention's names, before converting.
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


class ExportError(ValueError):
    """The source is no exportable model, the output directory is taken, or torch is missing."""


# -------------------------------------------------------------------- checks (before any work)
def check_source(source: str | os.PathLike) -> Path:
    """The source directory, once every file the export reads is known to be there.

    Raises:
      ExportError: naming the directory and what is missing (or that it holds PyTorch weights already).
    """
    root = Path(source).expanduser()
    if not root.is_dir():
        state = "is a file" if root.exists() else "does not exist"
        raise ExportError(
            f"model directory {root} {state}; expected a diffusers-format directory with {_EXPECTED}"
        )
    for component, (flax_name, _, _) in NETWORKS.items():
        folder = root / component
        if not (folder / "config.json").is_file():
            raise ExportError(
                f"{root} is not a diffusers-format model: no {component}/config.json (expected {_EXPECTED})"
            )
        if not (folder / flax_name).is_file():
            present = sorted(p.name for p in folder.glob("*.safetensors"))
            if present:
                raise ExportError(
                    f"{folder} already holds PyTorch weights ({', '.join(present)}); PyTorch diffusers "
                    "loads that model as it is"
                )
            raise ExportError(f"{folder}: no Flax weights file '{flax_name}' to convert")
    for required in ("tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        if not (root / required).is_file():
            raise ExportError(f"{root} is not a diffusers-format model: no {required} (expected {_EXPECTED})")
    return root


def check_out(out: str | os.PathLike, source: Path, overwrite: bool) -> Path:
    """The output directory, refused if it is the source, a file, or not empty without ``overwrite``."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ExportError(f"output {path} is a file, not a directory")
    if path.exists() and path.resolve() == source.resolve():
        raise ExportError(f"output {path} is the source model itself; choose another directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportError(
            f"output directory {path} is not empty; pass --overwrite to replace its model files"
        )
    return path


# -------------------------------------------------------------------- conversion
def pytorch_name(name: Any) -> Any:
    """A diffusers/transformers class name without its ``Flax`` prefix (other values unchanged)."""
    return name[len("Flax") :] if isinstance(name, str) and name.startswith("Flax") else name


def pytorch_model_index(index: Mapping[str, Any] | None, scheduler_class: str) -> dict:
    """``model_index.json`` for the exported copy: PyTorch classes for every entry, no safety checker."""
    out = dict(index or {})
    out["_class_name"] = pytorch_name(out.get("_class_name", "StableDiffusionPipeline"))
    out["_diffusers_version"] = hf.DIFFUSERS_VERSION
    for key, value in out.items():
        if isinstance(value, list) and len(value) == 2:
            out[key] = [value[0], pytorch_name(value[1])]
    for component, (_, library, cls) in NETWORKS.items():
        out[component] = [library, cls]
    out.setdefault("tokenizer", ["transformers", "CLIPTokenizer"])
    out["scheduler"] = ["diffusers", scheduler_class]
    if out["_class_name"] == "StableDiffusionPipeline":
        out.setdefault("safety_checker", [None, None])
        out.setdefault("feature_extractor", [None, None])
        out.setdefault("requires_safety_checker", False)
    return dict(sorted(out.items()))


def _rename_vae_attention(tree: Mapping[str, Any]) -> dict:
    """The VAE tree with every attention block's Flax names replaced by the PyTorch ones."""
    renamed = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            value = _rename_vae_attention(value)
            if set(_VAE_ATTENTION) <= set(value):
                value = {_VAE_ATTENTION.get(k, k): v for k, v in value.items()}
        renamed[key] = value
    return renamed


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet(converter: Callable):
    """Collects what ``converter`` logs instead of printing it (we check its result ourselves)."""
    logger = logging.getLogger(converter.__module__)
    handler, propagate = _Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _read_flax(file: Path) -> dict:
    try:
        tree = serialization.msgpack_restore(file.read_bytes())
    except Exception as err:
        raise ExportError(f"{file}: not a readable Flax msgpack file ({err})") from err
    # float32 copies: the PyTorch models are float32, and torch wants writable arrays.
    return traverse_util.unflatten_dict(
        {k: np.array(v, dtype=np.float32) for k, v in traverse_util.flatten_dict(tree).items()}
    )


def convert_network(component: str, folder: Path, pt) -> Any:
    """One network of ``folder`` as a PyTorch model (eval mode, float32), every weight checked.

    Args:
      component: ``unet``, ``vae`` or ``text_encoder``.
      folder: the component's folder (``config.json`` and Flax weights).
      pt: :func:`hdb_jax.sd.hf.pytorch_classes`.

    Raises:
      ExportError: the weights do not fit the config, or the converter left any unplaced.
    """
    flax_name, library, cls_name = NETWORKS[component]
    file = folder / flax_name
    config = json.loads((folder / "config.json").read_text())
    tree = _read_flax(file)
    cls = getattr(pt, cls_name)
    if library == "transformers":
        model = cls(hf.CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
        convert = pt.transformers_flax_to_pytorch
    else:
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        convert = pt.diffusers_flax_to_pytorch
        if component == "vae":
            tree = _rename_vae_attention(tree)
    model.eval()
    torch = pt.torch
    with torch.no_grad():
        poisoned = [n for n, t in model.state_dict().items() if t.is_floating_point()]
        before = model.state_dict()  # tensors sharing storage with the model's
        for name in poisoned:
            before[name].fill_(float("nan"))
        with _quiet(convert) as logged, warnings.catch_warnings():
            # The converters hand torch read-only views of transposed kernels; they are copied.
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            try:
                convert(model, tree)
            except ValueError as err:  # a shape that does not fit the config
                raise ExportError(f"{file}: {err}") from err
        state = model.state_dict()
        unset = [n for n in poisoned if torch.isnan(state[n]).any()]
    unused = len(traverse_util.flatten_dict(tree)) - (len(poisoned) - len(unset))
    if unset or unused:
        detail = f"; {logged[0][:300]}" if logged else ""
        raise ExportError(
            f"{file}: {len(unset)} weights of the PyTorch {cls_name} were left unset (e.g. "
            f"{', '.join(unset[:3]) or '-'}) and {max(unused, 0)} Flax weights were not used{detail}"
        )
    return model


def export_pytorch(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    report: Callable[[str], None] = lambda message: None,
) -> Path:
    """Writes ``source`` (Flax weights) as a directory PyTorch diffusers loads; returns ``out``.

    Args:
      source: a diffusers-format directory whose networks hold Flax msgpack weights.
      out: the output directory (created). Its model files (``unet/`` ... ``model_index.json``)
        are replaced only with ``overwrite``; other files in it are left alone.
      dtype: ``float32`` or ``float16`` safetensors.
      overwrite: allow a non-empty ``out``.
      report: called with one line per step (the command line prints them).

    Raises:
      ExportError: before any work, when ``source`` is not such a directory, ``out`` is taken or
        torch is missing; afterwards, when weights do not convert cleanly (nothing is written then).
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    root = check_source(source)
    path = check_out(out, root, overwrite)
    try:
        pt = hf.pytorch_classes()
    except ModuleNotFoundError as err:
        name = err.name or "torch"
        raise ExportError(
            f"exporting PyTorch weights needs {name}, which is not installed: pip install {name}"
        ) from err
    path.mkdir(parents=True, exist_ok=True)
    # Everything is written next to `out` first, so that a failure leaves no half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        for component in NETWORKS:
            model = convert_network(component, root / component, pt)
            if dtype == "float16":
                model = model.to(pt.torch.float16)
            model.save_pretrained(staging / component, safe_serialization=True)
            report(f"{component}: {sum(p.numel() for p in model.parameters()):,} parameters, {dtype}")
            del model
        shutil.copytree(root / "tokenizer", staging / "tokenizer")
        scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        scheduler["_class_name"] = pytorch_name(scheduler.get("_class_name", "DDPMScheduler"))
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index_file = root / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else None
        index = pytorch_model_index(index, scheduler["_class_name"])
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name in _WRITTEN:
            target = path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(staging / name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# -------------------------------------------------------------------- command line
def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hdb_jax.export_base", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default=None, help="diffusers-format directory with Flax weights (default: the toy base)"
    )
    p.add_argument("--out", required=True, help="output directory for PyTorch diffusers")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the safetensors weights")
    p.add_argument("--overwrite", action="store_true", help="replace the model files of a non-empty --out")
    p.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    """Entry point: exports ``--model`` to ``--out``; a user error is one ``error:`` line, exit code 2."""
    args = _parse_args(argv)
    if args.model is None:
        from hdb_jax import toy

        args.model = toy.base_model_dir()
    try:
        out = export_pytorch(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite, report=print)
    except ExportError as err:
        from hdb_jax.jobs import cli

        if args.debug or cli.debugging(argv):
            raise
        cli.fail(err)
        raise  # unreachable: fail exits
    print(f"wrote {out}: StableDiffusionPipeline.from_pretrained({os.fspath(out)!r}) loads it")
    return out


if __name__ == "__main__":
    main()
