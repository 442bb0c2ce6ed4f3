"""Our safetensors files: one writer, one reader, one content hash, one tree flattening.

Personal weights, LiDB bases, hypernetwork bundles, pre-optimised weight chunks and the toy
identity encoder are all safetensors files whose string metadata says what they are
(``format``). This module is the only place that opens or writes them:

* :func:`write` saves atomically (a temporary file in the same folder, then a rename, so readers
  never see half a file) with the usual permissions (umask applied, not ``mkstemp``'s 0600);
* :func:`read` returns ``(tensors, metadata)`` and, given ``format=``, refuses another kind of
  file, naming the path and both formats; any unreadable file raises the caller's error type;
* :func:`content_hash` is the one content hash (names, dtypes, shapes, raw bytes);
* :func:`flatten` / :func:`unflatten` map nested dicts to ``/``-joined names and back.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


class TensorFileError(ValueError):
    """A tensor file is missing, unreadable, or of another format."""


def content_hash(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex, 16 chars) over names, dtypes, shapes and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.asarray(tensors[name], order="C")
        digest.update(f"{name}{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def flatten(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (leaves unchanged: arrays, or shapes of an abstract tree)."""
    flat: dict[str, np.ndarray] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(f"{prefix}{sep}{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node

    walk("", tree)
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = "/", depth: int | None = None) -> dict:
    """Inverse of :func:`flatten`; with ``depth`` only the first ``depth`` separators split.

    ``depth`` lets the last level keep separators of its own: ``unflatten({"unet/a/b": x}, depth=1)``
    is ``{"unet": {"a/b": x}}``.
    """
    tree: dict = {}
    for name, value in flat.items():
        parts = name.split(sep) if depth is None else name.split(sep, depth)
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def split_last(flat: Mapping[str, Any], sep: str = "/") -> dict[str, dict[str, Any]]:
    """``{"path/with/seps/factor": x}`` -> ``{"path/with/seps": {"factor": x}}``."""
    tree: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        head, _, last = name.rpartition(sep)
        tree.setdefault(head, {})[last] = value
    return tree


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> Path:
    """Saves ``tensors`` with string ``metadata`` atomically; returns the path.

    The file gets the permissions any new file gets under the process umask (0644 usually).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        arrays = {
            k: np.asarray(v, order="C") for k, v in tensors.items()
        }  # (ascontiguousarray makes 0-d 1-d)
        save_file(arrays, tmp, metadata={k: str(v) for k, v in metadata.items()})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(
    path: str | os.PathLike, *, format: str | None = None, error=TensorFileError, what: str = "file"
) -> dict[str, str]:
    """The file's string metadata only (no tensor is read); see :func:`read`."""
    return _open(path, format, error, tensors=False, what=what)[1]


def read(
    path: str | os.PathLike, *, format: str | None = None, error=TensorFileError, what: str = "file"
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads every tensor and the metadata of one of our files.

    Args:
      path: the ``.safetensors`` file.
      format: the ``format`` metadata the file must have (None: any).
      error: the exception type raised (a subclass of ValueError or OSError the caller owns).
      what: how the file is named in a "not found" message (``personal weights file``, ...).

    Returns:
      ``(tensors, metadata)``.

    Raises:
      ``error``: the file is missing, unreadable, or has another ``format``.
    """
    return _open(path, format, error, tensors=True, what=what)


def _open(path, format, error, *, tensors: bool, what: str = "file"):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{what} not found: {path}")
    try:
        with safe_open(path, framework="numpy") as handle:
            meta = dict(handle.metadata() or {})
            if format is not None and meta.get("format") != format:
                raise error(f"{path}: format {meta.get('format')!r}, expected {format!r}")
            flat = {name: handle.get_tensor(name) for name in handle.keys()} if tensors else {}
    except error:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise error(f"{path}: not a readable safetensors file ({err})") from err
    return flat, meta


STORAGE = {"float32": np.float32, "float16": np.float16}  # the storage dtypes our files offer


def check_dtype(dtype: str, error=ValueError, where: str = "") -> None:
    """Raises ``error`` unless ``dtype`` is one of :data:`STORAGE`."""
    if dtype not in STORAGE:
        raise error(f"{where}storage dtype {dtype!r} is not one of {sorted(STORAGE)}")
