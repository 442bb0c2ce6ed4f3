"""LiDB's frozen orthonormal bases: generated once per base model, stored, hashed.

Regenerating the bases from a seed on another device or library version can give different
bits (QR is not bit-reproducible across platforms), and weights trained against one basis are
meaningless against another. So the bases are generated once, written to a safetensors file
together with a content hash, and every personal weights file records the hash it was trained
against.

File layout: one tensor per factor, named ``{path}/a_aux`` and ``{path}/b_aux``; metadata
``format=hdb_jax.lidb_basis``, ``hash``, ``a``, ``b``, ``component``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from hdb_jax.common import tensorfile

FORMAT = "hdb_jax.lidb_basis"
Tree = Mapping[str, Mapping[str, np.ndarray]]


class BasisError(ValueError):
    """A basis file is missing, malformed or does not match its recorded hash."""


def _flatten(tree: Tree) -> dict[str, np.ndarray]:
    return {
        f"{path}/{name}": np.ascontiguousarray(np.asarray(array))
        for path, factors in tree.items()
        for name, array in factors.items()
    }


def basis_hash(tree: Tree) -> str:
    """:func:`hdb_jax.common.tensorfile.content_hash` of the bases as they are stored."""
    return tensorfile.content_hash(_flatten(tree))


def save_basis(filename: str | os.PathLike, tree: Tree, **metadata) -> str:
    """Writes the bases and returns their hash.

    Args:
      filename: the ``.safetensors`` file to write.
      tree: ``{path: {"a_aux": [in, a], "b_aux": [b, out]}}``.
      **metadata: extra string-able fields (``a``, ``b``, ``component``, base model id).

    Returns:
      The content hash, also stored in the file's metadata.
    """
    digest = basis_hash(tree)
    meta = {k: str(v) for k, v in metadata.items()}
    meta.update(format=FORMAT, hash=digest)
    tensorfile.write(filename, _flatten(tree), meta)
    return digest


def load_basis(filename: str | os.PathLike) -> tuple[dict, dict]:
    """Reads bases written by :func:`save_basis`, bit-identical, and verifies their hash.

    Returns:
      ``(tree, metadata)``; ``metadata["hash"]`` is the verified content hash.

    Raises:
      BasisError: missing file, another format, or contents that do not match the hash.
    """
    filename = os.fspath(filename)
    flat, meta = tensorfile.read(filename, format=FORMAT, error=BasisError, what="LiDB basis file")
    tree = tensorfile.split_last(flat)
    actual = basis_hash(tree)
    if actual != meta.get("hash"):
        raise BasisError(
            f"{filename}: contents hash to {actual} but the file records {meta.get('hash')}; "
            "the file is corrupt or was edited"
        )
    return tree, meta


def describe(meta: Mapping[str, str]) -> str:
    """One line for logs."""
    return json.dumps({k: meta[k] for k in sorted(meta)})


def load_or_create(
    filename: str | os.PathLike, adapters: Mapping[str, Any], key, **metadata
) -> tuple[dict, str]:
    """The LiDB bases of every component, read from ``filename`` or generated once into it.

    One file holds every component, keyed ``{component}.{module_path}/{factor}``. Generating
    uses each adapter's ``basis(key)``; an existing file wins, so every run that shares the file
    (pre-optimisation, hypernetwork, personalisation) uses bit-identical bases.

    Args:
      filename: the basis file.
      adapters: ``{component: Adapter}`` (LiDB kinds).
      key: PRNG key used only when the file does not exist yet.
      **metadata: extra fields stored when the file is created (``a``, ``b``, base model id).

    Returns:
      ``({component: {path: {"a_aux", "b_aux"}}}``, content hash).

    Raises:
      BasisError: the file exists but lacks a layer of ``adapters`` or fails its hash check.
    """
    import jax.numpy as jnp

    filename = os.fspath(filename)
    if os.path.exists(filename):
        stored, meta = load_basis(filename)
        trees = {}
        for component, adapter in adapters.items():
            trees[component] = {}
            for target in adapter.targets:
                name = f"{component}.{target.path}"
                if name not in stored:
                    raise BasisError(f"{filename}: no basis for {component} layer '{target.path}'")
                trees[component][target.path] = {k: jnp.asarray(v) for k, v in stored[name].items()}
        return trees, meta["hash"]
    trees = {c: a.basis(key) for c, a in adapters.items()}
    flat = {f"{c}.{p}": f for c, tree in trees.items() for p, f in tree.items()}
    os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
    return trees, save_basis(filename, flat, **metadata)
