"""Content fingerprints of parameter trees: what ties personal weights to their base model."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import jax
import numpy as np


def params_fingerprint(params: Mapping[str, Any]) -> str:
    """A short content hash of a parameter tree, used to tie personal weights to a base model.

    Hashes every leaf's path, shape and dtype plus a fixed strided sample of its values (up to
    256 per leaf), so it is cheap even for SD 1.5 yet changes with any realistic re-training.
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        array = np.asarray(leaf)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str((array.shape, str(array.dtype))).encode())
        flat = array.reshape(-1)
        stride = max(1, flat.size // 256)
        digest.update(np.ascontiguousarray(flat[::stride][:256]).astype(np.float32).tobytes())
    return digest.hexdigest()[:16]
