"""Personal weights files (our format) and a standard LoRA export for PyTorch diffusers.

**Personal weights** (:func:`save_personal` / :func:`load_personal`): one safetensors file with
only the trainable factors (float32, or float16 on request). Format version 2 stores each component
in a layout recorded in the metadata: ``stacked`` when all its targets have the same factor shapes
(always for LiDB), one tensor ``{component}/{factor}`` ``[n_layers, ...]`` with rows in target-list
order; otherwise ``per_layer``, one tensor ``{component}/{module_path}/{factor}`` per factor. String
metadata: ``format`` (``hdb_jax.personal``), ``format_version``, ``dtype``; ``layout`` (JSON
``{component: "stacked" | "per_layer"}``); ``adapters`` (JSON ``{component: {"kind", "hparams"}}``);
``targets_zlib`` (base64 of zlib-compressed JSON ``{component: [[module_path, in_dim, out_dim,
is_conv], ...]}``); ``base_fingerprint`` (``hdb_jax.sd.model.params_fingerprint``); ``basis_hash``
(LiDB only); ``content_hash`` (:func:`content_hash` of the stored tensors, to detect corruption);
optional ``extra`` (JSON: training config, steps). SD 1.5 LiDB (176 layers, 105.6 KB of float32
factors) makes a ~107 KB file. Version 1 files (every component ``per_layer``, plain-JSON
``targets``) still load. Loading rebuilds the adapters from metadata alone and refuses files of
another base model or LiDB basis.

**LoRA export** (:func:`export_lora`): the diffusers/PEFT layout that
``StableDiffusionPipeline.load_lora_weights`` reads, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]`` (PyTorch orientation; 1x1 convolutions get ``[r, in, 1, 1]`` and
``[out, r, 1, 1]``). Scales are folded into the factors, and the file's ``lora_adapter_metadata``
(the ``LoraConfig`` diffusers builds) sets ``lora_alpha = r`` per module, so PEFT's scale is exactly
1 even when ranks differ between layers (diffusers would otherwise use the most common rank as
every layer's alpha).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hdb_jax.adapters.core import Adapter, kind_from_config
from hdb_jax.adapters.kinds import Kron, LiDB, LoRA
from hdb_jax.adapters.targets import Target

FORMAT = "hdb_jax.personal"
VERSION = 2  # the version written; 1..VERSION are read
STACKED, PER_LAYER = "stacked", "per_layer"  # tensor layouts of a component
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers looks for in a folder
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the serialized LoraConfig
_STORAGE = {"float32": np.float32, "float16": np.float16}
# Flax module names "<name>_<i>" that are "<name>.<i>" (a ModuleList entry) in PyTorch diffusers.
_LISTS = "down_blocks|up_blocks|attentions|resnets|transformer_blocks|to_out|net|downsamplers|upsamplers"
_INDEXED = re.compile(rf"(?<![^.])({_LISTS})_(\d+)(?![^.])")  # a whole path segment
_log = logging.getLogger(__name__)


class PersonalWeightsError(ValueError):
    """A personal weights file is missing, unreadable, corrupt or not in our format."""


class IncompatibleWeightsError(PersonalWeightsError):
    """A personal weights file was made for another base model or another LiDB basis."""


class NotExportableError(ValueError):
    """An adapter cannot be written as a standard LoRA without changing what it computes."""


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


@dataclasses.dataclass(frozen=True)
class LoraExport:
    """What :func:`export_lora` wrote.

    Attributes:
      path: the safetensors file.
      ranks: ``{prefixed PyTorch module name: rank}``.
      rel_errors: ``{prefixed module name: ||ΔW - ΔW_k||_F / ||ΔW||_F}`` for Kronecker layers
        written as their rank-k SVD truncation (empty for exact exports).
    """

    path: Path
    ranks: dict[str, int]
    rel_errors: dict[str, float]

    @property
    def max_rel_error(self) -> float:
        """The worst layer's relative Frobenius error (0 for exact exports)."""
        return max(self.rel_errors.values(), default=0.0)


# -------------------------------------------------------------------- shared helpers
@functools.lru_cache(maxsize=None)
def _factor_shapes(kind, in_dim: int, out_dim: int, conv: bool) -> dict[str, tuple[int, ...]]:
    init = lambda key: kind.init(key, Target("-", in_dim, out_dim, conv))  # noqa: E731
    tree = jax.eval_shape(init, jax.random.PRNGKey(0))
    return {name: tuple(leaf.shape) for name, leaf in tree.items()}


def _common_shapes(adapter: Adapter) -> dict[str, tuple[int, ...]] | None:
    """The factor shapes all targets share (always for LiDB): ``stacked`` storage; None if they differ."""
    shapes = {tuple(_factor_shapes(adapter.kind, t.in_dim, t.out_dim, t.conv).items())
              for t in adapter.targets}
    return dict(shapes.pop()) if len(shapes) == 1 else None


def expected_shapes(adapters: Mapping[str, Adapter], layout: Mapping[str, str] | None = None
                    ) -> dict[str, tuple[int, ...]]:
    """Stored tensor names and shapes: ``{component}/{module_path}/{factor}`` for ``per_layer``
    components (all when ``layout`` is None), ``{component}/{factor}`` ``[n_layers, ...]`` for
    ``stacked`` ones (ValueError if their layers' factor shapes differ)."""
    expected = {}
    for c, a in adapters.items():
        if (layout or {}).get(c) != STACKED:
            expected.update({f"{c}/{t.path}/{f}": s for t in a.targets
                             for f, s in _factor_shapes(a.kind, t.in_dim, t.out_dim, t.conv).items()})
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


def content_hash(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex, 16 chars) over names, dtypes, shapes and raw bytes, in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _atomic_save(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    """Writes through a temporary file in the same folder, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_dtype(dtype: str, error=ValueError, where: str = "") -> None:
    if dtype not in _STORAGE:
        raise error(f"{where}storage dtype {dtype!r} is not one of {sorted(_STORAGE)}")


def _jsonable(value):  # numpy / JAX values in ``extra`` become lists; anything else its string
    arrays = (np.generic, np.ndarray, jax.Array)
    return np.asarray(value).tolist() if isinstance(value, arrays) else str(value)


# -------------------------------------------------------------------- personal weights
def save_personal(
    path: str | os.PathLike, adapters: Mapping[str, Adapter], trainable: Mapping[str, Mapping], *,
    base_fingerprint: str, basis_hash: str | None = None, extra: Mapping[str, Any] | None = None,
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
    _check_dtype(dtype)
    if not base_fingerprint:
        raise ValueError("save_personal needs the base model's fingerprint (base_fingerprint=...)")
    lidb = sorted(c for c, a in adapters.items() if isinstance(a.kind, LiDB))
    if lidb and not basis_hash:
        raise ValueError(f"LiDB adapters ({', '.join(lidb)}) need the basis hash (basis_hash=...)")
    for component, adapter in adapters.items():
        if component != adapter.component or component not in trainable:
            raise ValueError(f"adapter {component!r} ({adapter.component}) has no trainable tree")
    flat = {f"{c}/{module}/{factor}": np.asarray(array)
            for c in adapters for module, layer in trainable[c].items() for factor, array in layer.items()}
    problems = _mismatches(expected_shapes(adapters), flat)
    if problems:
        raise ValueError(f"trainable factors do not fit the adapters ({len(problems)} problems, e.g. "
                         f"{problems[:3]}); save one sample: per-sample trees carry a batch axis")
    common = {c: _common_shapes(a) for c, a in adapters.items()}
    layout = {c: PER_LAYER if shapes is None else STACKED for c, shapes in common.items()}
    tensors = {n: x for n, x in flat.items() if layout[n.partition("/")[0]] == PER_LAYER}
    for c, a in adapters.items():  # stacked: rows in target-list order
        tensors.update({f"{c}/{f}": np.stack([flat[f"{c}/{t.path}/{f}"] for t in a.targets])
                        for f in common[c] or ()})
    tensors = {name: np.ascontiguousarray(a.astype(_STORAGE[dtype])) for name, a in tensors.items()}
    kinds = {c: {"kind": a.kind.name, "hparams": dataclasses.asdict(a.kind)} for c, a in adapters.items()}
    targets = {c: [[t.path, t.in_dim, t.out_dim, t.conv] for t in a.targets] for c, a in adapters.items()}
    packed = zlib.compress(json.dumps(targets, separators=(",", ":")).encode(), 9)  # SD 1.5: 13 -> 0.7 KB
    metadata = {
        "format": FORMAT, "format_version": str(VERSION), "dtype": dtype,
        "content_hash": content_hash(tensors),
        "base_fingerprint": base_fingerprint, "adapters": json.dumps(kinds, sort_keys=True),
        "layout": json.dumps(layout, sort_keys=True), "targets_zlib": base64.b64encode(packed).decode(),
    }
    if basis_hash:
        metadata["basis_hash"] = basis_hash
    if extra is not None:
        metadata["extra"] = json.dumps(extra, sort_keys=True, default=_jsonable)
    path = Path(path)
    _atomic_save(tensors, path, metadata)
    return path


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
        layers = {c: tuple(Target(str(p), int(i), int(o), bool(v)) for p, i, o, v in ts)
                  for c, ts in targets.items()}
        adapters = {c: Adapter(kind_from_config(k["kind"], **k["hparams"]), layers[c], c)
                    for c, k in kinds.items()}
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
    if not path.is_file():
        raise PersonalWeightsError(f"personal weights file not found: {path}")
    try:
        with safe_open(os.fspath(path), framework="numpy") as handle:
            meta = dict(handle.metadata() or {})
            ours = meta.get("format") == FORMAT
            flat = {name: handle.get_tensor(name) for name in handle.keys()} if ours else {}
    except Exception as err:  # safetensors raises its own error types
        raise PersonalWeightsError(f"{path}: not a readable safetensors file ({err})") from err
    if not ours:
        raise PersonalWeightsError(
            f"{path}: format {meta.get('format')!r}, expected {FORMAT!r} (not a personal weights file; "
            "LoRA exports and model checkpoints cannot be loaded here)"
        )
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
    _check_dtype(dtype, PersonalWeightsError, f"{path}: ")
    actual = content_hash(flat)
    if actual != meta.get("content_hash"):
        raise PersonalWeightsError(f"{path}: tensors hash to {actual} but the file records "
                                   f"{meta.get('content_hash')}; the file is corrupt or was edited")
    try:
        problems = _mismatches(expected_shapes(adapters, layout), flat, _STORAGE[dtype])
    except ValueError as err:
        raise PersonalWeightsError(f"{path}: {err}") from err
    if problems:
        raise PersonalWeightsError(f"{path}: tensors do not match the recorded targets "
                                   f"({len(problems)} problems, e.g. {problems[:3]})")
    trainable: dict[str, dict[str, dict[str, np.ndarray]]] = {c: {} for c in adapters}
    for c, a in adapters.items():
        stacked = layout[c] == STACKED
        for i, t in enumerate(a.targets):  # stacked rows follow the target list
            trainable[c][t.path] = {  # copies, widened to float32
                f: np.array(flat[f"{c}/{f}"][i] if stacked else flat[f"{c}/{t.path}/{f}"], np.float32)
                for f in _factor_shapes(a.kind, t.in_dim, t.out_dim, t.conv)}
    metadata = {
        "format": FORMAT, "format_version": int(meta["format_version"]), "dtype": dtype,
        "base_fingerprint": found, "basis_hash": meta.get("basis_hash"), "content_hash": actual,
        "adapters": _parse_json(meta, "adapters", path), "targets": targets, "layout": layout,
        "extra": _parse_json(meta, "extra", path) if "extra" in meta else None,
    }
    return Personal(adapters, trainable, metadata)


# -------------------------------------------------------------------- LoRA export
def torch_module_path(component: str, flax_path: str) -> str:
    """PyTorch module name of a Flax module path (``down_blocks_0`` -> ``down_blocks.0``, ...)."""
    # transformers' Flax CLIP already names its layers "layers.0", as PyTorch does.
    return flax_path if component == "text_encoder" else _INDEXED.sub(r"\1.\2", flax_path)


def _kron_truncation(kind: Kron, p: Mapping, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-k factors of ``ΔW = scale · A ⊗ B`` [out, in] from the SVDs of A and B.

    The singular triplets of ``A ⊗ B`` are the Kronecker products of those of A and B, so the
    truncation is exact to float64 without forming the dense matrix.
    """
    a, b = np.asarray(p["a"], np.float64), np.asarray(p["b"], np.float64)
    ua, sa, vat = np.linalg.svd(a, full_matrices=False)
    ub, sb, vbt = np.linalg.svd(b, full_matrices=False)
    sigma = np.outer(sa, sb).ravel()  # index i * len(sb) + j
    keep = np.argsort(-sigma, kind="stable")[: min(rank, sigma.size)]
    i, j = np.divmod(keep, sb.size)
    u = np.einsum("pk,qk->pqk", ua[:, i], ub[:, j]).reshape(-1, keep.size)  # [out, k]
    v = np.einsum("pk,qk->pqk", vat.T[:, i], vbt.T[:, j]).reshape(-1, keep.size)  # [in, k]
    root, dropped = np.sqrt(sigma[keep]), np.delete(sigma, keep)
    total = float(np.sum(sigma**2))
    error = float(np.sqrt(np.sum(dropped**2) / total)) if total > 0 else 0.0
    return root[:, None] * v.T, u * (kind.scale * root)[None, :], error


def _lora_factors(adapter: Adapter, target: Target, p: Mapping, f: Mapping, kron_svd_rank: int | None):
    """``(lora_A [r, in], lora_B [out, r], relative error or None)`` in float64."""
    kind = adapter.kind
    if isinstance(kind, LiDB):
        if not f:
            raise ValueError(f"{adapter.component}/{target.path}: LiDB export needs the bases (frozen=...)")
        down = np.asarray(f["a_aux"], np.float64) @ np.asarray(p["a_train"], np.float64)
        up = np.asarray(p["b_train"], np.float64) @ np.asarray(f["b_aux"], np.float64)
        return down.T, up.T, None
    if isinstance(kind, LoRA):  # also Residual: the same maths with per-layer ranks
        down, up = np.asarray(p["down"], np.float64), np.asarray(p["up"], np.float64)
        return down.T, kind.scale * up.T, None
    if isinstance(kind, Kron):
        if kron_svd_rank is None:
            raise NotExportableError(
                f"{adapter.component}: a Kronecker adapter (a1={kind.a1}, a2={kind.a2}) is not exportable "
                "as LoRA exactly: ΔW = A ⊗ B has rank rank(A)·rank(B), far above any useful LoRA rank. "
                "Pass kron_svd_rank=k to write its best rank-k approximation and get its relative error."
            )
        return _kron_truncation(kind, p, kron_svd_rank)
    raise NotExportableError(f"{adapter.component}: kind {type(kind).__name__} is not exportable as LoRA")


def export_lora(
    path: str | os.PathLike, adapters: Mapping[str, Adapter], trainable: Mapping[str, Mapping],
    frozen: Mapping[str, Mapping] | None = None, *, unet_prefix: str = "unet",
    text_prefix: str = "text_encoder", kron_svd_rank: int | None = None, dtype: str = "float32",
) -> LoraExport:
    """Writes adapters as a diffusers/PEFT LoRA file whose ΔW equals ours.

    LoRA and Residual factors are written directly (scale folded into ``lora_B``); LiDB bases
    are folded in (``down = A_aux·A_train``, ``up = B_train·B_aux``: an exact rank-r LoRA).
    Kronecker adapters are refused unless ``kron_svd_rank`` asks for an SVD truncation.

    Args:
      path: a ``.safetensors`` file, or a folder (created) that gets ``pytorch_lora_weights.safetensors``.
      adapters: ``{component: Adapter}`` for ``unet`` and/or ``text_encoder``.
      trainable: ``{component: {module_path: {factor: array}}}`` of one sample.
      frozen: ``{component: frozen tree}`` (LiDB's bases); may be None for other kinds.
      unet_prefix: key prefix of UNet layers (diffusers: ``unet``).
      text_prefix: key prefix of text encoder layers (diffusers: ``text_encoder``).
      kron_svd_rank: write Kronecker adapters as their best rank-k approximation.
      dtype: ``float32`` or ``float16``.

    Returns:
      A :class:`LoraExport` with the file, per-module ranks and (Kronecker) relative errors.

    Raises:
      NotExportableError: a Kronecker adapter without ``kron_svd_rank``, or an unknown kind.
      ValueError: an unknown component or missing factors.
    """
    _check_dtype(dtype)
    if kron_svd_rank is not None and kron_svd_rank < 1:
        raise ValueError(f"kron_svd_rank must be >= 1, got {kron_svd_rank}")
    prefixes = {"unet": unet_prefix, "text_encoder": text_prefix}
    if unet_prefix == text_prefix:
        raise ValueError(f"unet_prefix and text_prefix must differ (both {unet_prefix!r})")
    frozen, tensors, ranks, rel_errors, config = frozen or {}, {}, {}, {}, {}
    for component, adapter in adapters.items():
        if component not in prefixes:
            raise ValueError(f"cannot export component {component!r}: LoRA files hold {sorted(prefixes)}")
        prefix, local = prefixes[component], {}
        for target in adapter.targets:
            p, f = trainable[component][target.path], frozen.get(component, {}).get(target.path, {})
            lora_a, lora_b, error = _lora_factors(adapter, target, p, f, kron_svd_rank)
            if target.conv:  # PEFT's LoRA on a 1x1 Conv2d is two 1x1 convolutions
                lora_a, lora_b = lora_a[:, :, None, None], lora_b[:, :, None, None]
            module = torch_module_path(component, target.path)
            name = f"{prefix}.{module}"  # PEFT keys: {prefix}.{module}.lora_{A,B}.weight
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(lora_a.astype(_STORAGE[dtype]))
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(lora_b.astype(_STORAGE[dtype]))
            ranks[name] = local[module] = int(lora_a.shape[0])
            if error is not None:
                rel_errors[name] = error
        if not local:
            continue
        # PEFT scales a layer by alpha / r; alpha = r for every layer ("^": anchored patterns).
        common = collections.Counter(local.values()).most_common(1)[0][0]
        odd = {f"^{m}": r for m, r in local.items() if r != common}
        config.update({f"{prefix}.r": common, f"{prefix}.lora_alpha": common, f"{prefix}.rank_pattern": odd,
                       f"{prefix}.alpha_pattern": dict(odd), f"{prefix}.target_modules": sorted(local)})
    if not tensors:
        raise ValueError("nothing to export: no adapter targets")
    metadata = {
        "format": "pt", LORA_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True),
        "hdb_jax.adapters": json.dumps({c: a.kind.name for c, a in adapters.items()}, sort_keys=True),
    }
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_WEIGHT_NAME
    export = LoraExport(path, ranks, rel_errors)
    if rel_errors:
        metadata["hdb_jax.kron_svd_rank"] = str(kron_svd_rank)
        metadata["hdb_jax.kron_svd_max_rel_error"] = repr(export.max_rel_error)
        _log.info("Kronecker -> rank-%d LoRA: max relative error %.3g", kron_svd_rank, export.max_rel_error)
    _atomic_save(tensors, path, metadata)
    return export
