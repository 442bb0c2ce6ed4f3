"""Meshes, sharding rules and multi-process batches, all driven by config.

A run's config names the mesh axes and their sizes (``{"data": -1, "fsdp": 1}``: -1 takes the
devices left over) and a list of rules ``(regex over the parameter path, spec)``. A spec is a
tuple of mesh-axis names (or None) per array dimension, or the string ``"fsdp"``: shard the
largest dimension divisible by the ``fsdp`` axis size over it (replicate if none divides). The
first matching rule wins; unmatched leaves are replicated. Data parallel vs FSDP is therefore a
config change (``mesh.fsdp=2``), never a code branch.

Batches are sharded over every mesh axis along their leading dimension; :func:`global_batch` asks
each process to load only the rows its devices hold and assembles the global array without any
host sending data to another.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


def maybe_initialize_distributed(config: Mapping[str, Any] | None = None) -> None:
    """Starts JAX's multi-process runtime when the config or the environment asks for it.

    ``config`` may give ``coordinator_address``, ``num_processes``, ``process_id``; otherwise
    JAX's own detection applies (TPU pods, SLURM, Open MPI). ``HDB_DISTRIBUTED=0`` or an empty
    config with no cluster environment leaves a single-process run alone.
    """
    config = dict(config or {})
    if os.environ.get("HDB_DISTRIBUTED") == "0":
        return
    explicit = {
        k: config[k]
        for k in ("coordinator_address", "num_processes", "process_id")
        if config.get(k) not in (None, "", -1)
    }
    cluster = any(
        v in os.environ
        for v in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")
    )
    if explicit or (config.get("auto", False) and cluster):
        if "local_device_ids" in config and config["local_device_ids"]:
            explicit["local_device_ids"] = list(config["local_device_ids"])
        jax.distributed.initialize(**explicit)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A device mesh with the named axes; one size may be -1 (all remaining devices).

    Raises:
      ValueError: sizes that do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = list(axes), [int(s) for s in axes.values()]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(axes)}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    need = int(np.prod(sizes))
    if need > len(devices) or (need < len(devices) and jax.process_count() > 1):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {need} devices, have {len(devices)}")
    devices = devices[:need]  # single process: a smaller mesh uses the first devices
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # fake CPU devices or shapes the topology helper does not handle
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, tuple(names))


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh, axis: str = "fsdp") -> P:
    size = mesh.shape.get(axis, 1)
    if size == 1:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % size == 0:
            spec = [None] * len(shape)
            spec[dim] = axis
            return P(*spec)
    return P()


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> P:
    """The PartitionSpec of one leaf under ``rules`` (first match wins; default replicated)."""
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            if spec == "fsdp":
                return _fsdp_spec(shape, mesh)
            spec = tuple(spec or ())
            if len(spec) > len(shape):
                raise ValueError(f"rule {pattern!r} gives {spec} for '{path}' of rank {len(shape)}")
            for dim, axis in enumerate(spec):
                names = axis if isinstance(axis, tuple) else (axis,)
                size = int(np.prod([mesh.shape[a] for a in names if a is not None]))
                if axis is not None and shape[dim] % size:
                    raise ValueError(
                        f"rule {pattern!r}: dim {dim} of '{path}' {shape} not divisible by {axis}={size}"
                    )
            return P(*spec)
    return P()


def path_str(path) -> str:
    """``a/b/0/c`` from a ``jax.tree_util`` key path."""
    parts = []
    for key in path:
        parts.append(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))))
    return "/".join(parts)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(path_str(path), tuple(np.shape(leaf)), mesh, rules)),
        tree,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over every mesh axis."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def local_rows(global_size: int, mesh: Mesh) -> np.ndarray:
    """Global batch rows whose data this process's devices hold (sorted, usually contiguous)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_size,))
    rows = set()
    for (rows_slice,) in index_map.values():
        rows.update(range(*rows_slice.indices(global_size)))
    return np.array(sorted(rows), dtype=np.int64)


def global_batch(
    load_rows: Callable[[np.ndarray], Mapping[str, np.ndarray]], global_size: int, mesh: Mesh
) -> dict[str, jax.Array]:
    """Assembles a global batch sharded by :func:`batch_sharding`; each process loads only its rows.

    Args:
      load_rows: ``rows [k] -> {name: [k, ...]}``, the data of global batch rows ``rows``.
      global_size: the global batch size.
      mesh: the mesh.

    Returns:
      ``{name: global jax.Array [global_size, ...]}``. Row i is the same data whatever the number
      of processes or the device order, so results do not depend on the cluster's shape.
    """
    if global_size % mesh.size:
        raise ValueError(f"global batch {global_size} is not divisible by the mesh's {mesh.size} devices")
    sharding = batch_sharding(mesh)
    rows = local_rows(global_size, mesh)
    local = {k: np.asarray(v) for k, v in load_rows(rows).items()}
    position = {int(r): i for i, r in enumerate(rows)}
    index_map = sharding.addressable_devices_indices_map((global_size,))
    out = {}
    for name, values in local.items():
        shards = []
        for device, (rows_slice,) in index_map.items():
            take = [position[r] for r in range(*rows_slice.indices(global_size))]
            shards.append(jax.device_put(values[take], device))
        out[name] = jax.make_array_from_single_device_arrays(
            (global_size,) + values.shape[1:], sharding, shards
        )
    return out


def describe(tree: Any) -> dict[str, str]:
    """``{path: str(PartitionSpec)}`` of a tree of NamedShardings or of sharded arrays."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    return {path_str(p): str(getattr(s, "sharding", s).spec) for p, s in flat}
