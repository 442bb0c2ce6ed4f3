"""The pre-optimised weights dataset: stage 1 writes it, the hypernetwork trainer reads it.

A dataset is a folder of chunk files plus an index:

* ``chunk_NNNNN.safetensors``: the LiDB trainable factors of a chunk of identities trained
  together, one tensor per ``{component}/{module_path}/{factor}`` with a leading identity axis
  ``[K, ...]``; metadata ``format`` (:data:`FORMAT`), ``format_version``, ``basis_hash``, ``steps``
  and ``meta`` (JSON: the pre-optimisation settings). Version 1 chunks (no ``format`` key) are
  read too.
* ``index.jsonl``: one JSON line per identity, ``{"identity", "chunk", "row", "source",
  "loss_before", "final_loss", "steps", ...}``.

A chunk file is written atomically before its index lines, so an interrupted run leaves either
a complete chunk with its lines, or an unindexed file that is never read; chunk names are never
reused (a rerun continues the numbering), so no earlier file is overwritten.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import numpy as np

from hdb_jax.common import tensorfile

FORMAT = "hdb_jax.preopt_chunk"
VERSION = 2
INDEX = "index.jsonl"
Trees = dict[str, dict[str, dict[str, np.ndarray]]]  # {component: {path: {factor: array}}}


class WeightsDatasetError(ValueError):
    """A pre-optimised weights dataset is missing, inconsistent or of another adapter layout."""


def read_index(directory: str | os.PathLike) -> list[dict]:
    """The index rows, in the order they were written (empty if there is no index yet)."""
    path = os.path.join(os.fspath(directory), INDEX)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def done_identities(directory: str | os.PathLike) -> set:
    """Identities (synthetic ids, folder names, example indices) that already have weights."""
    return {row["identity"] for row in read_index(directory)}


def settings(directory: str | os.PathLike) -> dict:
    """The pre-optimisation settings recorded in the dataset's chunks (``meta``), and its size.

    Returns:
      ``{"identities": N, "chunks": C, "settings": {...}}``; ``settings`` is the first chunk's
      ``meta`` when every chunk records the same, else ``{"mixed": [each distinct meta]}``.

    Raises:
      WeightsDatasetError: no identities.
    """
    directory = os.fspath(directory)
    rows = read_index(directory)
    if not rows:
        raise WeightsDatasetError(f"{directory}: no pre-optimised identities ({INDEX} missing or empty)")
    chunks = sorted({r["chunk"] for r in rows})
    metas = []
    for name in chunks:
        meta = json.loads(tensorfile.read_metadata(os.path.join(directory, name)).get("meta", "{}"))
        if meta not in metas:
            metas.append(meta)
    return {
        "identities": len(rows),
        "chunks": len(chunks),
        "settings": metas[0] if len(metas) == 1 else {"mixed": metas},
    }


def next_chunk_name(directory: str | os.PathLike) -> str:
    """A chunk file name no earlier run used."""
    numbers = [
        int(f[6:11]) for f in os.listdir(directory) if f.startswith("chunk_") and f.endswith(".safetensors")
    ]
    return f"chunk_{max(numbers, default=-1) + 1:05d}.safetensors"


def _names(trees: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    return {
        f"{c}/{p}/{f}": v
        for c, tree in trees.items()
        for p, factors in tree.items()
        for f, v in factors.items()
    }


def write_chunk(
    directory: str | os.PathLike,
    trees: Trees,
    rows: Iterable[Mapping[str, Any]],
    *,
    basis_hash: str | None,
    steps: int,
    meta: Mapping[str, Any] | None = None,
) -> str:
    """Writes one chunk and appends its index rows; returns the chunk's file name.

    Args:
      directory: the dataset folder (created).
      trees: batched LiDB trainable trees ``{component: {path: {factor: [K, ...]}}}``; row k
        belongs to ``rows[k]``.
      rows: one dict per identity with at least ``identity``; ``chunk`` and ``row`` are added.
      basis_hash: the LiDB basis the weights are expressed in.
      steps: optimisation steps per identity.
      meta: JSON-able settings recorded in the chunk (prompt, learning rate, ...).
    """
    os.makedirs(directory, exist_ok=True)
    rows = [dict(r) for r in rows]
    tensors = {k: np.asarray(v) for k, v in _names(trees).items()}
    sizes = {v.shape[0] for v in tensors.values()}
    if sizes != {len(rows)}:
        raise ValueError(f"chunk of {len(rows)} identities, but the trees' leading axes are {sorted(sizes)}")
    name = next_chunk_name(directory)
    tensorfile.write(
        os.path.join(directory, name),
        tensors,
        {
            "format": FORMAT,
            "format_version": VERSION,
            "basis_hash": basis_hash or "",
            "steps": steps,
            "meta": json.dumps(dict(meta or {}), sort_keys=True, default=str),
        },
    )
    with open(os.path.join(directory, INDEX), "a") as f:
        for k, row in enumerate(rows):
            f.write(json.dumps({**row, "chunk": name, "row": k}) + "\n")
    return name


def _read_chunk(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    tensors, meta = tensorfile.read(path, error=WeightsDatasetError, what="pre-optimised weights chunk")
    if meta.get("format", FORMAT) != FORMAT:  # version 1 chunks carry no format key
        raise WeightsDatasetError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    version = int(meta.get("format_version", 1))
    if version > VERSION:
        raise WeightsDatasetError(f"{path}: format version {version} (this hdb_jax reads 1..{VERSION})")
    return tensors, meta


def load(
    directory: str | os.PathLike, adapters: Mapping[str, Any] | None = None, basis_hash: str | None = None
) -> tuple[list[dict], Trees]:
    """Every identity's weights, stacked in index order.

    Args:
      directory: the dataset folder.
      adapters: ``{component: Adapter}``; when given, every component and layer must be present.
      basis_hash: when given, every chunk must have been trained against this LiDB basis.

    Returns:
      ``(rows, trees)`` with ``trees = {component: {path: {factor: [N, ...]}}}``, row i of every
      leaf belonging to ``rows[i]``.

    Raises:
      WeightsDatasetError: no identities, an unreadable chunk, another basis or layout.
    """
    directory = os.fspath(directory)
    rows = read_index(directory)
    if not rows:
        raise WeightsDatasetError(f"{directory}: no pre-optimised identities ({INDEX} missing or empty)")
    chunks: dict[str, dict[str, np.ndarray]] = {}
    stacked: dict[str, list[np.ndarray]] = {}
    for row in rows:
        if row["chunk"] not in chunks:
            tensors, meta = _read_chunk(os.path.join(directory, row["chunk"]))
            if basis_hash is not None and meta.get("basis_hash") not in (basis_hash, ""):
                raise WeightsDatasetError(
                    f"{directory}/{row['chunk']}: trained against LiDB basis {meta.get('basis_hash')}, "
                    f"not {basis_hash}"
                )
            chunks[row["chunk"]] = tensors
        for name, array in chunks[row["chunk"]].items():
            stacked.setdefault(name, []).append(array[row["row"]])
    trees: Trees = {}
    for name, arrays in stacked.items():
        component, rest = name.split("/", 1)
        path, factor = rest.rsplit("/", 1)
        trees.setdefault(component, {}).setdefault(path, {})[factor] = np.stack(arrays)
    if adapters is not None:
        missing = [
            f"{c}/{t.path}" for c, a in adapters.items() for t in a.targets if t.path not in trees.get(c, {})
        ]
        if missing:
            raise WeightsDatasetError(
                f"{directory}: no weights for {len(missing)} adapted layers (e.g. {missing[:2]}); "
                "pre-optimised with another adapter layout?"
            )
    return rows, trees
