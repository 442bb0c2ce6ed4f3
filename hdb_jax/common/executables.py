"""Compiled programs kept on disk, found again without tracing.

JAX's persistent compilation cache skips XLA's compile, but its key is the lowered program: every
start still traces and lowers the Python function, which for a UNet's forward and backward is
seconds to tens of seconds on a CPU. A :class:`ExecutableStore` keys a compiled executable by what
determines it instead (the library's source, JAX and the devices, the XLA flags, and whatever the
caller names: configs, model architecture files, argument shapes), so a warm start deserialises
the executable and traces nothing.

The key must name everything the program depends on: a store that is asked for a program under a
key that misses one of its inputs returns a stale program. Values passed as *arguments* (weights,
images, keys) are not part of a program and do not belong in the key; their shapes and dtypes do.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable

import jax

FORMAT = 1  # bumped when the file layout changes
SUFFIX = ".jaxexe"
KEEP = 8  # stored executables kept per program name, most recently used first
_PACKAGE = Path(__file__).resolve().parents[1]  # hdb_jax/


def source_digest(root: os.PathLike | str = _PACKAGE) -> str:
    """sha256 over every ``.py`` file under ``root`` (path and bytes): any edit of the library
    changes it, so no program compiled from other code is ever reused."""
    h = hashlib.sha256()
    for path in sorted(Path(root).rglob("*.py")):
        h.update(os.fspath(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def abstract(tree: Any) -> list[str]:
    """A tree's structure, shapes and dtypes (shardings too, for arrays that have one) as text."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out = [str(treedef)]
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        out.append(f"{tuple(x.shape)}:{jax.numpy.dtype(x.dtype).name}:{sharding or ''}")
    return out


LIBRARIES = ("jax", "jaxlib", "flax", "optax", "diffusers", "transformers")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment() -> dict[str, Any]:
    """What outside the caller's key decides a compiled program: JAX, the devices, XLA's flags."""
    devices = jax.devices()
    return {
        "format": FORMAT,
        # The libraries whose code is traced into our programs (the UNet is diffusers' module).
        "versions": {name: _version(name) for name in LIBRARIES},
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "processes": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
        "most_optimizations_off": bool(jax.config.read("jax_disable_most_optimizations")),
    }


class ExecutableStore:
    """``directory/<name>-<digest>.jaxexe``: one serialised executable per key.

    ``get(name, key, lower)`` returns the stored executable for ``(name, key)`` or compiles
    ``lower()`` (a :class:`jax.stages.Lowered`) and stores it. Per name the :data:`KEEP` most
    recently used files stay (an upgrade of the library leaves no trail of dead programs).
    Loading, as any unpickling, runs what the file says: point a store only at a directory you trust.
    """

    def __init__(self, directory: os.PathLike | str):
        self.directory = Path(directory)
        self._source = source_digest()
        self.hits = 0  # executables loaded from disk (no tracing)
        self.misses = 0  # executables traced, compiled and written

    def digest(self, name: str, key: Any) -> str:
        blob = json.dumps(
            {"name": name, "key": key, "source": self._source, "env": environment()},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def path(self, name: str, key: Any) -> Path:
        return self.directory / f"{name}-{self.digest(name, key)}{SUFFIX}"

    def get(self, name: str, key: Any, lower: Callable[[], jax.stages.Lowered]) -> jax.stages.Compiled:
        from jax.experimental import serialize_executable as se

        path = self.path(name, key)
        if path.is_file():
            try:
                with open(path, "rb") as f:
                    payload, in_tree, out_tree, device_ids = pickle.load(f)
                by_id = {d.id: d for d in jax.local_devices()}
                compiled = se.deserialize_and_load(
                    payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids]
                )
                self.hits += 1
                os.utime(path)  # recently used: kept by _prune
                return compiled
            except Exception as e:  # noqa: BLE001 -- a bad entry is recompiled, never fatal
                warnings.warn(f"{path}: stored executable unreadable ({e!r}); compiling again", stacklevel=2)
        compiled = lower().compile()
        self.misses += 1
        try:
            devices = [d.id for d in compiled.runtime_executable().local_devices()]
            blob = pickle.dumps((*se.serialize(compiled), devices))
        except (ValueError, NotImplementedError, TypeError, pickle.PicklingError) as e:
            warnings.warn(f"{name}: executable not serialisable here ({e}); not stored", stacklevel=2)
            return compiled
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # atomic: a concurrent reader sees no file or the whole file
        self._prune(name)
        return compiled

    def _prune(self, name: str) -> None:
        """Removes all but the :data:`KEEP` most recently used executables of ``name``."""
        files = sorted(
            self.directory.glob(f"{name}-*{SUFFIX}"), key=lambda f: f.stat().st_mtime, reverse=True
        )
        for old in files[KEEP:]:
            old.unlink(missing_ok=True)
