"""Standard LoRA export for PyTorch diffusers (the diffusers/PEFT layout).

:func:`export_lora` writes the layout ``StableDiffusionPipeline.load_lora_weights`` reads, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]`` (PyTorch orientation; 1x1 convolutions get ``[r, in, 1, 1]`` and
``[out, r, 1, 1]``). Scales are folded into the factors, and the file's ``lora_adapter_metadata``
(the ``LoraConfig`` diffusers builds) sets ``lora_alpha = r`` per module, so PEFT's scale is exactly
1 even when ranks differ between layers (diffusers would otherwise use the most common rank as
every layer's alpha). Our own personal weights format is :mod:`hdb_jax.formats.personal`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from hdb_jax.adapters.core import Adapter
from hdb_jax.adapters.kinds import Kron, LiDB, LoRA
from hdb_jax.adapters.targets import Target
from hdb_jax.common import tensorfile

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers looks for in a folder
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the serialized LoraConfig
# Flax module names "<name>_<i>" that are "<name>.<i>" (a ModuleList entry) in PyTorch diffusers.
_LISTS = "down_blocks|up_blocks|attentions|resnets|transformer_blocks|to_out|net|downsamplers|upsamplers"
_INDEXED = re.compile(rf"(?<![^.])({_LISTS})_(\d+)(?![^.])")  # a whole path segment
_log = logging.getLogger(__name__)


class NotExportableError(ValueError):
    """An adapter cannot be written as a standard LoRA without changing what it computes."""


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
    path: str | os.PathLike,
    adapters: Mapping[str, Adapter],
    trainable: Mapping[str, Mapping],
    frozen: Mapping[str, Mapping] | None = None,
    *,
    unet_prefix: str = "unet",
    text_prefix: str = "text_encoder",
    kron_svd_rank: int | None = None,
    dtype: str = "float32",
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
    tensorfile.check_dtype(dtype)
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
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(lora_a.astype(tensorfile.STORAGE[dtype]))
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(lora_b.astype(tensorfile.STORAGE[dtype]))
            ranks[name] = local[module] = int(lora_a.shape[0])
            if error is not None:
                rel_errors[name] = error
        if not local:
            continue
        # PEFT scales a layer by alpha / r; alpha = r for every layer ("^": anchored patterns).
        common = collections.Counter(local.values()).most_common(1)[0][0]
        odd = {f"^{m}": r for m, r in local.items() if r != common}
        config.update(
            {
                f"{prefix}.r": common,
                f"{prefix}.lora_alpha": common,
                f"{prefix}.rank_pattern": odd,
                f"{prefix}.alpha_pattern": dict(odd),
                f"{prefix}.target_modules": sorted(local),
            }
        )
    if not tensors:
        raise ValueError("nothing to export: no adapter targets")
    metadata = {
        "format": "pt",
        LORA_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True),
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
    tensorfile.write(path, tensors, metadata)
    return export
