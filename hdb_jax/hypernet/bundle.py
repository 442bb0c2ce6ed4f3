"""A trained hypernetwork as one self-contained directory, for personalisation.

``save`` writes, at the end of hypernetwork training:

* ``hypernet.safetensors``: every parameter (encoder and decoder), keys ``/``-joined paths, with
  metadata ``format`` and ``meta`` (JSON): the architecture (encoder name, iterations, decoder
  mode/width/blocks/heads), the LiDB hyperparameters and target patterns, the token layout (one
  ``component/module_path`` per token), the base model's fingerprint and the LiDB basis hash;
* ``lidb_basis.safetensors``: the frozen LiDB bases the predictions are expressed in.

``load`` rebuilds the adapters on a base model's *abstract* parameters and checks the layout,
base model and basis before any weights are read, so a bundle for another adapter layout or
base model fails at once with both sides named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax.adapters import basis as basis_io
from hdb_jax.adapters.core import Adapter
from hdb_jax.adapters.kinds import LiDB
from hdb_jax.common import tensorfile
from hdb_jax.hypernet import decoder as dec
from hdb_jax.hypernet.model import HyperNetwork, abstract_params, build_hypernet

FORMAT = "hdb_jax.hypernet"
WEIGHTS, BASIS = "hypernet.safetensors", "lidb_basis.safetensors"
ARCH_FIELDS = ("encoder", "iterations", "mode", "num_blocks", "num_heads", "width", "train_encoder", "offset")


def bundle_dir(workdir: str | os.PathLike) -> Path:
    """Where hypernetwork training (``configs/hypernet.py``) writes its bundle: ``<workdir>/hypernet``."""
    return Path(workdir) / "hypernet"


def is_bundle(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a bundle's weights file (a finished stage 2)."""
    return (Path(directory) / WEIGHTS).is_file()


class BundleError(ValueError):
    """A hypernetwork bundle is missing, corrupt, or made for another base model or layout."""


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A loaded hypernetwork: module, parameters and the LiDB adapters its tokens mean."""

    net: HyperNetwork
    params: dict
    adapters: dict[str, Adapter]
    basis: dict
    basis_hash: str
    meta: dict


def _layout(adapters: Mapping[str, Adapter]) -> list[str]:
    return [f"{c}/{p}" for c, p in dec.token_layout(adapters)]


def save(
    directory: str | os.PathLike,
    net: HyperNetwork,
    params: Mapping[str, Any],
    *,
    patterns: Mapping[str, Any],
    arch: Mapping[str, Any],
    base_fingerprint: str,
    basis_file: str | os.PathLike,
    basis_hash: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes the bundle directory.

    Args:
      directory: output directory (created).
      net: the hypernetwork module.
      params: ``{"encoder", "decoder"}`` parameters.
      patterns: ``{component: [regex, ...]}`` the adapters were built from.
      arch: the hypernetwork hyperparameters (:data:`ARCH_FIELDS`).
      base_fingerprint: ``params_fingerprint`` of the base model it was trained on.
      basis_file: the LiDB basis file used in training (copied into the bundle).
      basis_hash: its content hash.
      extra: JSON-able extras (training steps, losses).

    Returns:
      The directory.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    kind = net.kind
    meta = {
        "arch": {k: arch.get(k, False) if k == "offset" else arch[k] for k in ARCH_FIELDS},
        "lidb": dataclasses.asdict(kind),
        "patterns": {c: list(p) for c, p in patterns.items() if p},
        "layout": _layout(net.adapters),
        "base_fingerprint": base_fingerprint,
        "basis_hash": basis_hash,
        "extra": dict(extra or {}),
    }
    flat = {k: np.asarray(v, np.float32) for k, v in tensorfile.flatten(jax.device_get(params)).items()}
    tensorfile.write(out / WEIGHTS, flat, {"format": FORMAT, "meta": json.dumps(meta, default=str)})
    if Path(basis_file).resolve() != (out / BASIS).resolve():
        shutil.copyfile(basis_file, out / BASIS)
    return out


def read_meta(directory: str | os.PathLike) -> dict:
    """The bundle's metadata, without reading any weights."""
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise BundleError(
            f"{directory}: no hypernetwork weights '{WEIGHTS}' (expected a directory written at the end "
            "of hypernetwork training, e.g. <workdir>/hypernet)"
        )
    return json.loads(tensorfile.read_metadata(path, format=FORMAT, error=BundleError)["meta"])


def load(
    directory: str | os.PathLike, abstract_sd: Mapping[str, Any], *, base_fingerprint: str | None = None
) -> Bundle:
    """Loads a bundle for a base model given by its abstract (or real) parameters.

    Args:
      directory: the bundle directory.
      abstract_sd: ``{"unet", "text_encoder", ...}`` parameter shapes of the base model.
      base_fingerprint: the base model's fingerprint; checked against the bundle's when given.

    Returns:
      The :class:`Bundle`.

    Raises:
      BundleError: missing or corrupt files, another base model, another adapter layout, or a
        basis that does not match the recorded hash.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if base_fingerprint is not None and meta["base_fingerprint"] != base_fingerprint:
        raise BundleError(
            f"{directory}: trained on base model {meta['base_fingerprint']}, but the loaded base model is "
            f"{base_fingerprint}; use the base model the hypernetwork was trained with"
        )
    kind = LiDB(**meta["lidb"])
    try:
        adapters = {
            c: Adapter.create(kind, abstract_sd[c], p, c) for c, p in sorted(meta["patterns"].items())
        }
    except Exception as err:  # TargetError, KeyError, shape errors
        raise BundleError(
            f"{directory}: its adapter patterns {meta['patterns']} do not fit this base model ({err})"
        ) from err
    layout = _layout(adapters)
    if layout != meta["layout"]:
        diff = next(
            (i for i, (a, b) in enumerate(zip(layout, meta["layout"])) if a != b),
            min(len(layout), len(meta["layout"])),
        )
        raise BundleError(
            f"{directory}: the hypernetwork predicts {len(meta['layout'])} weight tokens but this base model has "
            f"{len(layout)} adapted layers (first difference at token {diff}: bundle "
            f"{meta['layout'][diff] if diff < len(meta['layout']) else None!r} vs model "
            f"{layout[diff] if diff < len(layout) else None!r}); another adapter layout"
        )
    if not (directory / BASIS).is_file():
        raise BundleError(f"{directory}: missing the LiDB basis file '{BASIS}'")
    try:
        basis, found_hash = basis_io.load_or_create(directory / BASIS, adapters, key=None)
    except basis_io.BasisError as err:
        raise BundleError(str(err)) from err
    if found_hash != meta["basis_hash"]:
        raise BundleError(
            f"{directory}/{BASIS}: basis hash {found_hash}, but the hypernetwork was trained with {meta['basis_hash']}"
        )
    wrong = [
        f"{c}/{t.path}"
        for c, a in adapters.items()
        for t in a.targets
        if basis[c][t.path]["a_aux"].shape != (t.in_dim, kind.a)
        or basis[c][t.path]["b_aux"].shape != (kind.b, t.out_dim)
    ]
    if wrong:
        raise BundleError(
            f"{directory}/{BASIS}: bases do not fit this base model's layers (e.g. {wrong[:3]}); another base model"
        )
    arch = meta["arch"]
    net, _ = build_hypernet(
        arch["encoder"],
        adapters,
        kind,
        iterations=arch["iterations"],
        mode=arch["mode"],
        width=arch["width"] or None,
        num_blocks=arch["num_blocks"],
        num_heads=arch["num_heads"],
        train_encoder=arch["train_encoder"],
        offset=bool(arch.get("offset", False)),  # bundles before the offset existed have none
    )
    expected = tensorfile.flatten(abstract_params(net))
    stored, _ = tensorfile.read(directory / WEIGHTS, format=FORMAT, error=BundleError)
    bad = sorted(set(expected) ^ set(stored))
    bad += sorted(k for k in expected if k in stored and stored[k].shape != expected[k].shape)
    if bad:
        raise BundleError(
            f"{directory / WEIGHTS}: parameters do not fit the recorded architecture (e.g. {bad[:3]})"
        )
    params = tensorfile.unflatten({k: jnp.asarray(v) for k, v in stored.items()})
    return Bundle(net, params, adapters, basis, found_hash, meta)
