"""Folders holding one small trained Flax network: ``config.json`` plus ``params.safetensors``.

The toy world's evaluators (identity encoder, attribute classifier) are stored this way;
``config.json`` carries the architecture (``meta["architecture"]``: constructor keyword
arguments) and whatever the training recorded (recipe, held-out figures).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax.common import tensorfile

CONFIG_NAME, PARAMS_NAME = "config.json", "params.safetensors"


def save(directory: str | os.PathLike, params: Any, meta: dict, *, format: str) -> pathlib.Path:
    """Writes ``config.json`` (``meta``; needs ``meta["architecture"]``) and ``params.safetensors``.

    Args:
      directory: output folder (created if missing).
      params: the network's variables (saved float32, keys '/'-joined tree paths).
      meta: JSON-able description: architecture kwargs, recipe, evaluation.
      format: the ``format`` metadata of the parameter file.

    Returns:
      The directory.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v, np.float32) for k, v in tensorfile.flatten(jax.device_get(params)).items()}
    tensorfile.write(directory / PARAMS_NAME, flat, {"format": format})
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load(
    directory: pathlib.Path,
    build: Callable[..., Any],
    example: Callable[[Any], jax.ShapeDtypeStruct],
    *,
    error: type[Exception],
    what: str,
    hint: str,
) -> tuple[Any, Any, dict]:
    """Reads a folder written by :func:`save` and checks the parameters fit the architecture.

    Args:
      directory: the folder.
      build: ``**architecture -> module``.
      example: ``module -> an input`` the module's ``init`` accepts (for the expected shapes).
      error: the exception raised; messages name the folder.
      what: what the network is, for messages.
      hint: the command that trains it, for the "missing" message.

    Returns:
      ``(module, variables, meta)``.
    """
    if not (directory / CONFIG_NAME).is_file() or not (directory / PARAMS_NAME).is_file():
        raise error(
            f"{directory}: no {what} weights (needs {CONFIG_NAME} and {PARAMS_NAME}); train them with: {hint}"
        )
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
        arch = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["architecture"].items()}
        module = build(**arch)
        flat, _ = tensorfile.read(directory / PARAMS_NAME, error=error)
    except Exception as err:  # JSON, safetensors and constructor errors alike
        raise error(f"{directory}: unreadable {what} weights ({err})") from err
    expected = tensorfile.flatten(jax.eval_shape(module.init, jax.random.PRNGKey(0), example(module)))
    if {k: v.shape for k, v in expected.items()} != {k: v.shape for k, v in flat.items()}:
        raise error(f"{directory}: {PARAMS_NAME} does not fit the architecture {arch}")
    return module, tensorfile.unflatten({k: jnp.asarray(v) for k, v in flat.items()}), meta
