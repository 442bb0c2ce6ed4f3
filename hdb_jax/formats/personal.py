"""Personal weights files: one identity's adapter factors, tied to a base model and basis.

:func:`save_personal` / :func:`load_personal`: one safetensors file with only the trainable
factors (float32, or float16 on request). Format version 2 stores each component in a layout
recorded in the metadata: ``stacked`` when all its targets have the same factor shapes (always
for LiDB), one tensor ``{component}/{factor}`` ``[n_layers, ...]`` with rows in target-list order;
otherwise ``per_layer``, one tensor ``{component}/{module_path}/{factor}`` per factor. String
metadata: ``format`` (``hdb_jax.personal``), ``format_version``, ``dtype``; ``layout`` (JSON
``{component: "stacked" | "per_layer"}``); ``adapters`` (JSON ``{component: {"kind", "hparams"}}``);
``targets_zlib`` (base64 of zlib-compressed JSON ``{component: [[module_path, in_dim, out_dim,
is_conv], ...]}``); ``base_fingerprint`` (:func:`hdb_jax.sd.fingerprint.params_fingerprint`);
``basis_hash`` (LiDB only); ``content_hash`` (:func:`hdb_jax.common.tensorfile.content_hash` of the
stored tensors, to detect corruption); optional ``extra`` (JSON: training config, steps). SD 1.5
LiDB (176 layers, 105.6 KB of float32 factors) makes a ~107 KB file. Version 1 files (every
component ``per_layer``, plain-JSON ``targets``) still load. Loading rebuilds the adapters from
metadata alone and refuses files of another base model or LiDB basis.

:func:`load_for_model` is what samplers and notebooks call: it checks a file against the base
model in use and its LiDB basis file and returns ``(adapters, trainable, frozen)`` ready for
:func:`hdb_jax.adapters.merge_all`.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from hdb_jax.adapters.core import Adapter, kind_from_config
from hdb_jax.adapters.kinds import LiDB
from hdb_jax.adapters.targets import Target
from hdb_jax.common import tensorfile

FORMAT = "hdb_jax.personal"
VERSION = 2  # the version written; 1..VERSION are read
STACKED, PER_LAYER = "stacked", "per_layer"  # tensor layouts of a component


class PersonalWeightsError(ValueError):
    """A personal weights file is missing, unreadable, corrupt or not in our format."""


class IncompatibleWeightsError(PersonalWeightsError):
    """A personal weights file was made for another base model or another LiDB basis."""


@dataclasses.dataclass(frozen=True)
class Personal:
    """The contents of a personal weights file.

    Attributes:
      adapters: ``{component: Adapter}`` rebuilt from the metadata.
      trainable: ``{component: {module_path: {factor: float32 numpy array}}}``.
      metadata: the parsed metadata (``format``, ``format_version``, ``dtype``, ``base_fingerprint``,
        ``basis_hash``, ``content_hash``, ``adapters``, ``targets`` (decoded), ``layout``, ``extra``).
    """

    adapters: dict[str, Adapter]
    trainable: dict[str, dict[str, dict[str, np.ndarray]]]
    metadata: dict[str, Any]


# -------------------------------------------------------------------- shapes
@functools.lru_cache(maxsize=None)
def _factor_shapes(kind, in_dim: int, out_dim: int, conv: bool) -> dict[str, tuple[int, ...]]:
    init = lambda key: kind.init(key, Target("-", in_dim, out_dim, conv))  # noqa: E731
    tree = jax.eval_shape(init, jax.random.PRNGKey(0))
    return {name: tuple(leaf.shape) for name, leaf in tree.items()}


def _common_shapes(adapter: Adapter) -> dict[str, tuple[int, ...]] | None:
    """The factor shapes all targets share (always for LiDB): ``stacked`` storage; None if they differ."""
    shapes = {
        tuple(_factor_shapes(adapter.kind, t.in_dim, t.out_dim, t.conv).items()) for t in adapter.targets
    }
    return dict(shapes.pop()) if len(shapes) == 1 else None


def expected_shapes(
    adapters: Mapping[str, Adapter], layout: Mapping[str, str] | None = None
) -> dict[str, tuple[int, ...]]:
    """Stored tensor names and shapes: ``{component}/{module_path}/{factor}`` for ``per_layer``
    components (all when ``layout`` is None), ``{component}/{factor}`` ``[n_layers, ...]`` for
    ``stacked`` ones (ValueError if their layers' factor shapes differ)."""
    expected = {}
    for c, a in adapters.items():
        if (layout or {}).get(c) != STACKED:
            expected.update(
                {
                    f"{c}/{t.path}/{f}": s
                    for t in a.targets
                    for f, s in _factor_shapes(a.kind, t.in_dim, t.out_dim, t.conv).items()
                }
            )
        elif (common := _common_shapes(a)) is not None:
            expected.update({f"{c}/{f}": (len(a.targets), *s) for f, s in common.items()})
        else:
            raise ValueError(f"{c}: layers without one common factor shape cannot be stacked")
    return expected


def _mismatches(expected: Mapping[str, tuple], found: Mapping[str, np.ndarray], dtype=None) -> list[str]:
    problems = [f"missing {n}" for n in sorted(set(expected) - set(found))]
    problems += [f"unexpected {n}" for n in sorted(set(found) - set(expected))]
    for name in sorted(set(found) & set(expected)):
        array = found[name]
        if array.shape != expected[name] or (dtype is not None and array.dtype != dtype):
            problems.append(f"{name} {array.shape} {array.dtype} != {expected[name]}")
    return problems


def _jsonable(value):  # numpy / JAX values in ``extra`` become lists; anything else its string
    arrays = (np.generic, np.ndarray, jax.Array)
    return np.asarray(value).tolist() if isinstance(value, arrays) else str(value)


# -------------------------------------------------------------------- save / load
def save_personal(
    path: str | os.PathLike,
    adapters: Mapping[str, Adapter],
    trainable: Mapping[str, Mapping],
    *,
    base_fingerprint: str,
    basis_hash: str | None = None,
    extra: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> Path:
    """Writes one identity's trainable factors with everything needed to use them again.

    Args:
      path: the ``.safetensors`` file to write (replaced atomically if it exists).
      adapters: ``{component: Adapter}``.
      trainable: ``{component: {module_path: {factor: array}}}`` of one sample (no batch axis).
      base_fingerprint: ``params_fingerprint`` of the base model the factors were trained on.
      basis_hash: content hash of the LiDB bases (required when any adapter is LiDB).
      extra: JSON-able extras (training config, steps); numpy values become lists.
      dtype: storage dtype, ``float32`` or ``float16``.

    Returns:
      The written path.

    Raises:
      ValueError: missing hashes, unknown dtype, or factors that do not fit the adapters.
    """
    tensorfile.check_dtype(dtype)
    if not base_fingerprint:
        raise ValueError("save_personal needs the base model's fingerprint (base_fingerprint=...)")
    lidb = sorted(c for c, a in adapters.items() if isinstance(a.kind, LiDB))
    if lidb and not basis_hash:
        raise ValueError(f"LiDB adapters ({', '.join(lidb)}) need the basis hash (basis_hash=...)")
    for component, adapter in adapters.items():
        if component != adapter.component or component not in trainable:
            raise ValueError(f"adapter {component!r} ({adapter.component}) has no trainable tree")
    flat = {
        f"{c}/{module}/{factor}": np.asarray(array)
        for c in adapters
        for module, layer in trainable[c].items()
        for factor, array in layer.items()
    }
    problems = _mismatches(expected_shapes(adapters), flat)
    if problems:
        raise ValueError(
            f"trainable factors do not fit the adapters ({len(problems)} problems, e.g. "
            f"{problems[:3]}); save one sample: per-sample trees carry a batch axis"
        )
    common = {c: _common_shapes(a) for c, a in adapters.items()}
    layout = {c: PER_LAYER if shapes is None else STACKED for c, shapes in common.items()}
    tensors = {n: x for n, x in flat.items() if layout[n.partition("/")[0]] == PER_LAYER}
    for c, a in adapters.items():  # stacked: rows in target-list order
        tensors.update(
            {f"{c}/{f}": np.stack([flat[f"{c}/{t.path}/{f}"] for t in a.targets]) for f in common[c] or ()}
        )
    tensors = {name: np.ascontiguousarray(a.astype(tensorfile.STORAGE[dtype])) for name, a in tensors.items()}
    kinds = {c: {"kind": a.kind.name, "hparams": dataclasses.asdict(a.kind)} for c, a in adapters.items()}
    targets = {c: [[t.path, t.in_dim, t.out_dim, t.conv] for t in a.targets] for c, a in adapters.items()}
    packed = zlib.compress(json.dumps(targets, separators=(",", ":")).encode(), 9)  # SD 1.5: 13 -> 0.7 KB
    metadata = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "dtype": dtype,
        "content_hash": tensorfile.content_hash(tensors),
        "base_fingerprint": base_fingerprint,
        "adapters": json.dumps(kinds, sort_keys=True),
        "layout": json.dumps(layout, sort_keys=True),
        "targets_zlib": base64.b64encode(packed).decode(),
    }
    if basis_hash:
        metadata["basis_hash"] = basis_hash
    if extra is not None:
        metadata["extra"] = json.dumps(extra, sort_keys=True, default=_jsonable)
    path = Path(path)
    return tensorfile.write(path, tensors, metadata)


def _parse_json(meta: Mapping[str, str], key: str, path: Path, packed: bool = False):
    try:  # packed: base64 of zlib-compressed JSON
        text = zlib.decompress(base64.b64decode(meta[key], validate=True)) if packed else meta[key]
        return json.loads(text)
    except (KeyError, ValueError, zlib.error) as err:  # JSON and base64 errors are ValueErrors
        raise PersonalWeightsError(f"{path}: metadata '{key}' is missing or unreadable ({err!r})") from err


def _header(meta: Mapping[str, str], path: Path) -> tuple[dict[str, Adapter], dict, dict[str, str]]:
    """``(adapters, targets, layout)`` from a version 1 or 2 file's metadata."""
    v1, kinds = meta["format_version"] == "1", _parse_json(meta, "adapters", path)
    targets = _parse_json(meta, "targets" if v1 else "targets_zlib", path, packed=not v1)
    layout = {c: PER_LAYER for c in kinds} if v1 else _parse_json(meta, "layout", path)
    try:
        layers = {
            c: tuple(Target(str(p), int(i), int(o), bool(v)) for p, i, o, v in ts)
            for c, ts in targets.items()
        }
        adapters = {
            c: Adapter(kind_from_config(k["kind"], **k["hparams"]), layers[c], c) for c, k in kinds.items()
        }
        for adapter in adapters.values():
            adapter.num_params()  # shape errors (e.g. Kronecker divisibility) surface here
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PersonalWeightsError(f"{path}: adapter metadata cannot be rebuilt ({err!r})") from err
    valid = isinstance(layout, dict) and set(layout) == set(adapters)
    if not valid or not set(layout.values()) <= {STACKED, PER_LAYER}:
        raise PersonalWeightsError(f"{path}: bad layout {layout!r} for the components {sorted(adapters)}")
    return adapters, targets, layout


def load_personal(
    path: str | os.PathLike, *, base_fingerprint: str | None, basis_hash: str | None = None
) -> Personal:
    """Reads a file written by :func:`save_personal`, refusing mismatched base models and bases.

    Args:
      path: the personal weights file.
      base_fingerprint: ``params_fingerprint`` of the base model in use; None skips the check
        (inspection only: the factors are meaningless on another base model).
      basis_hash: content hash of the LiDB bases in use; None skips the check.

    Returns:
      A :class:`Personal` with float32 numpy factors (float16 files are widened).

    Raises:
      IncompatibleWeightsError: the file was made for another base model or LiDB basis; the
        message names the file and both hashes.
      PersonalWeightsError: the file is missing, unreadable, corrupt or in another format.
    """
    path = Path(path)
    meta = tensorfile.read_metadata(path, error=PersonalWeightsError, what="personal weights file")
    if meta.get("format") != FORMAT:
        raise PersonalWeightsError(
            f"{path}: format {meta.get('format')!r}, expected {FORMAT!r} (not a personal weights file; "
            "LoRA exports and model checkpoints cannot be loaded here)"
        )
    flat, _ = tensorfile.read(path, error=PersonalWeightsError, what="personal weights file")
    if meta.get("format_version") not in [str(v) for v in range(1, VERSION + 1)]:
        version = meta.get("format_version")
        raise PersonalWeightsError(f"{path}: format version {version!r} (this hdb_jax reads 1..{VERSION})")
    found = meta.get("base_fingerprint")
    if base_fingerprint is not None and found != base_fingerprint:
        raise IncompatibleWeightsError(
            f"{path}: made for another base model (expected base fingerprint {base_fingerprint}, "
            f"found {found}); personal weights only work on the base model they were trained on"
        )
    adapters, targets, layout = _header(meta, path)
    lidb = sorted(c for c, a in adapters.items() if isinstance(a.kind, LiDB))
    if lidb and not meta.get("basis_hash"):
        raise PersonalWeightsError(f"{path}: LiDB adapters ({', '.join(lidb)}) but no basis hash recorded")
    if lidb and basis_hash is not None and meta["basis_hash"] != basis_hash:
        raise IncompatibleWeightsError(
            f"{path}: made for another LiDB basis (expected basis hash {basis_hash}, found "
            f"{meta['basis_hash']}); LiDB factors only work with the bases they were trained against"
        )
    dtype = meta.get("dtype")
    tensorfile.check_dtype(dtype, PersonalWeightsError, f"{path}: ")
    actual = tensorfile.content_hash(flat)
    if actual != meta.get("content_hash"):
        raise PersonalWeightsError(
            f"{path}: tensors hash to {actual} but the file records "
            f"{meta.get('content_hash')}; the file is corrupt or was edited"
        )
    try:
        problems = _mismatches(expected_shapes(adapters, layout), flat, tensorfile.STORAGE[dtype])
    except ValueError as err:
        raise PersonalWeightsError(f"{path}: {err}") from err
    if problems:
        raise PersonalWeightsError(
            f"{path}: tensors do not match the recorded targets "
            f"({len(problems)} problems, e.g. {problems[:3]})"
        )
    trainable: dict[str, dict[str, dict[str, np.ndarray]]] = {c: {} for c in adapters}
    for c, a in adapters.items():
        stacked = layout[c] == STACKED
        for i, t in enumerate(a.targets):  # stacked rows follow the target list
            trainable[c][t.path] = {  # copies, widened to float32
                f: np.array(flat[f"{c}/{f}"][i] if stacked else flat[f"{c}/{t.path}/{f}"], np.float32)
                for f in _factor_shapes(a.kind, t.in_dim, t.out_dim, t.conv)
            }
    metadata = {
        "format": FORMAT,
        "format_version": int(meta["format_version"]),
        "dtype": dtype,
        "base_fingerprint": found,
        "basis_hash": meta.get("basis_hash"),
        "content_hash": actual,
        "adapters": _parse_json(meta, "adapters", path),
        "targets": targets,
        "layout": layout,
        "extra": _parse_json(meta, "extra", path) if "extra" in meta else None,
    }
    return Personal(adapters, trainable, metadata)


def load_for_model(
    path: str | os.PathLike, params: Mapping[str, Any], basis_file: str | os.PathLike | None = None
) -> tuple[dict, dict, dict]:
    """Reads a personal weights file for the base model ``params``.

    Args:
      path: a file written by :func:`save_personal`.
      params: the base parameters in use; their fingerprint must match the file's.
      basis_file: the LiDB basis file (:mod:`hdb_jax.adapters.basis`); required for LiDB adapters.

    Returns:
      ``(adapters, trainable, frozen)`` keyed by component, ready for
      :func:`hdb_jax.adapters.merge_all`.

    Raises:
      IncompatibleWeightsError: the file belongs to another base model or basis.
      PersonalWeightsError: LiDB weights without a basis file, or a basis lacking one of their layers.
    """
    from hdb_jax.adapters import basis as basis_io
    from hdb_jax.sd.fingerprint import params_fingerprint

    bases, digest = {}, None
    if basis_file:
        bases, meta = basis_io.load_basis(basis_file)
        digest = meta["hash"]
    personal = load_personal(path, base_fingerprint=params_fingerprint(params), basis_hash=digest)
    frozen = {}
    for component, adapter in personal.adapters.items():
        if not isinstance(adapter.kind, LiDB):
            continue
        if not basis_file:
            raise PersonalWeightsError(
                f"{path}: LiDB weights need the basis they were trained with (--basis FILE)"
            )
        names = {t.path: f"{component}.{t.path}" for t in adapter.targets}  # the trainer's keys
        missing = [n for n in names.values() if n not in bases]
        if missing:
            raise PersonalWeightsError(
                f"{basis_file}: no basis for {len(missing)} layers, e.g. {missing[:2]}"
            )
        frozen[component] = {p: bases[n] for p, n in names.items()}
    return personal.adapters, personal.trainable, frozen
