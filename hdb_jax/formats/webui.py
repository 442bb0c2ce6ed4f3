"""Adapters as the single safetensors file AUTOMATIC1111, ComfyUI and kohya's sd-scripts load.

The "webui" (kohya) layout names every adapted layer after its PyTorch diffusers module, with
``lora_unet_`` or ``lora_te_`` in front and every dot replaced by an underscore:
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` becomes
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` and the text encoder's
``text_model.encoder.layers.0.self_attn.q_proj`` becomes
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``. Tensor names are
``<name>.<tensor>``; the name itself never holds a dot (A1111 splits keys at the first one).

**LoRA** (LoRA, Residual and LiDB adapters; LiDB's frozen bases are folded into the factors)::

    <name>.lora_down.weight   [r, in]     ([r, in, 1, 1] for a 1x1 convolution)
    <name>.lora_up.weight     [out, r]    ([out, r, 1, 1])
    <name>.alpha              scalar

Loaders add ``(alpha / r) · up · down`` to the layer's PyTorch weight ``[out, in]``, with ``r`` the
first dimension of ``lora_down`` (A1111 ``network_lora``, ComfyUI ``weight_adapter/lora``, diffusers
``_convert_non_diffusers_lora_to_diffusers`` + PEFT ``lora_alpha / r``). We store ``alpha = r`` for
every layer, so that factor is exactly 1, and fold our own scale (``LoRA.alpha / rank``) into
``lora_up``: the loaded ΔW equals ours for any mix of per-layer ranks (Personalized Residuals).

**LoKr** (Kronecker adapters, LyCORIS "full matrix" mode, no further decomposition)::

    <name>.lokr_w1   [a1, a2]                  our A
    <name>.lokr_w2   [out/a1, in/a2]           scale · our B  ([out/a1, in/a2, 1, 1] for a 1x1 conv)
    <name>.alpha     scalar 1.0

Loaders add ``kron(w1, w2).reshape(weight.shape)`` (w1 unsqueezed to 4-d first when w2 is 4-d),
which is our ``ΔW_torch[out, in] = scale · A ⊗ B`` exactly. When both w1 and w2 are stored whole,
ComfyUI (``weight_adapter/lokr.py``: ``alpha / dim`` only when a ``_b`` factor gives ``dim``) and
A1111 (``network_lokr``: no ``dim``, so ``calc_scale`` returns 1) apply no alpha scaling, and LyCORIS
(``LokrModule``: ``alpha = lora_dim`` when ``use_w1 and use_w2``) forces scale 1 too; the ``alpha``
tensor is written only because LyCORIS's own loader reads it. LyCORIS's re-instantiation
(``make_module_from_state_dict``) assumes its own factorisation of the layer sizes and may reject
our ``(a1, a2)`` split; the merge-by-kron path that ComfyUI and A1111 use takes any split.

**Metadata** (strings): kohya's ``ss_network_module`` (``networks.lora``, or ``lycoris.kohya``
with ``ss_network_args`` ``{"algo": "lokr", ...}`` when any layer is LoKr), ``ss_network_dim`` and
``ss_network_alpha`` (the common LoRA rank, equal to alpha; ``Dynamic`` when ranks differ, as
kohya's ``resize_lora`` writes; ``1`` for LoKr-only files), ``ss_base_model_version`` (``sd_v1``),
``ss_v2``, ``ss_output_name``, and with a trigger phrase ``ss_tag_frequency``
(``{output_name: {trigger: 1}}``, the training tags A1111 shows) and ``modelspec.trigger_phrase``;
ModelSpec's ``modelspec.sai_model_spec``, ``architecture`` (``stable-diffusion-v1/lora``),
``implementation`` (``diffusers``) and ``title``; our provenance ``hdb_jax.format`` (``webui``),
``hdb_jax.version``, ``hdb_jax.adapters`` (JSON ``{component: {"kind", "hparams"}}``),
``hdb_jax.trigger`` and ``hdb_jax.base_fingerprint`` when given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import hdb_jax
from hdb_jax.adapters import Adapter, Kron, Target
from hdb_jax.common import tensorfile
from hdb_jax.formats.lora import _lora_factors, torch_module_path

FORMAT = "webui"
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512"}


@dataclasses.dataclass(frozen=True)
class WebuiExport:
    """What :func:`export_kohya` wrote.

    Attributes:
      path: the safetensors file.
      modules: ``{kohya name: "lora" | "lokr"}`` for every exported layer.
      ranks: ``{kohya name: r}`` of the LoRA layers (LoKr layers have no rank).
      metadata: the string metadata stored in the file.
    """

    path: Path
    modules: dict[str, str]
    ranks: dict[str, int]
    metadata: dict[str, str]


def kohya_name(component: str, flax_path: str) -> str:
    """The kohya / A1111 layer name, e.g. ``lora_unet_down_blocks_0_attentions_0_..._attn1_to_q``.

    Args:
      component: ``unet`` or ``text_encoder``.
      flax_path: the target's module path in our Flax parameter tree.

    Returns:
      ``PREFIXES[component]`` + the PyTorch diffusers module name with dots replaced by underscores.

    Raises:
      ValueError: a component these files cannot hold.
    """
    if component not in PREFIXES:
        raise ValueError(f"cannot export component {component!r}: webui files hold {sorted(PREFIXES)}")
    return PREFIXES[component] + torch_module_path(component, flax_path).replace(".", "_")


def _lokr_factors(adapter: Adapter, target: Target, p: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """``(w1 [a1, a2], w2 [out/a1, in/a2])`` in float64 with ``kron(w1, w2) == ΔW_torch``."""
    kind = adapter.kind
    kind.num_params(target)  # divisibility check with the layer named
    w1, w2 = np.asarray(p["a"], np.float64), kind.scale * np.asarray(p["b"], np.float64)
    expected = ((kind.a1, kind.a2), (target.out_dim // kind.a1, target.in_dim // kind.a2))
    if (w1.shape, w2.shape) != expected:
        raise ValueError(
            f"{adapter.component}/{target.path}: Kronecker factors {w1.shape}, {w2.shape} "
            f"do not fit the layer (expected {expected[0]}, {expected[1]})"
        )
    return w1, w2


def _network_fields(ranks: Mapping[str, int], lokr: bool) -> dict[str, str]:
    """kohya's ``ss_network_*`` entries for the written layers."""
    distinct = sorted(set(ranks.values()))
    dim = str(distinct[0]) if len(distinct) == 1 else "Dynamic" if distinct else "1"
    fields = {
        "ss_network_module": "lycoris.kohya" if lokr else "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": dim,
    }  # alpha == r on every LoRA layer
    if lokr:
        fields["ss_network_args"] = json.dumps({"algo": "lokr", "full_matrix": "True"})
    return fields


def export_kohya(
    path: str | os.PathLike,
    adapters: Mapping[str, Adapter],
    trainable: Mapping[str, Mapping],
    frozen: Mapping[str, Mapping] | None = None,
    *,
    dtype: str = "float32",
    trigger: str | None = None,
    output_name: str | None = None,
    base_model_version: str = "sd_v1",
    base_fingerprint: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> WebuiExport:
    """Writes adapters as one kohya/A1111/ComfyUI file whose ΔW equals ours on every layer.

    LoRA, Residual and LiDB adapters become kohya LoRA layers (``lora_down``/``lora_up``/``alpha``);
    Kronecker adapters become LyCORIS LoKr layers (``lokr_w1``/``lokr_w2``), both exact (see the
    module docstring for names, orientations and scale conventions).

    Args:
      path: the ``.safetensors`` file to write (replaced atomically if it exists).
      adapters: ``{component: Adapter}`` for ``unet`` and/or ``text_encoder``.
      trainable: ``{component: {module_path: {factor: array}}}`` of one sample (no batch axis).
      frozen: ``{component: frozen tree}`` (LiDB's bases); may be None for other kinds.
      dtype: storage dtype of every tensor, ``float32`` or ``float16``.
      trigger: the identity's trigger phrase (e.g. ``sks face``), recorded in the metadata.
      output_name: ``ss_output_name`` / ``modelspec.title`` (default: the file name's stem).
      base_model_version: kohya's ``ss_base_model_version`` (``sd_v1`` or ``sd_v2``).
      base_fingerprint: ``params_fingerprint`` of the base model, recorded as provenance.
      metadata: extra string metadata; may not replace an entry this function writes.

    Returns:
      A :class:`WebuiExport` with the file, its layer names, LoRA ranks and metadata.

    Raises:
      ValueError: an unknown dtype, component or base model version, a path not ending in
        ``.safetensors``, missing factors or bases, colliding metadata, or nothing to export.
    """
    tensorfile.check_dtype(dtype)
    if base_model_version not in _ARCHITECTURES:
        raise ValueError(f"base_model_version {base_model_version!r} is not one of {sorted(_ARCHITECTURES)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: webui LoRA files are single '.safetensors' files")
    store = lambda x: np.array(x, tensorfile.STORAGE[dtype], order="C")  # keeps 0-d alphas 0-d
    frozen, tensors, modules, ranks = frozen or {}, {}, {}, {}
    for component, adapter in adapters.items():
        if component != adapter.component or component not in trainable:
            raise ValueError(f"adapter {component!r} ({adapter.component}) has no trainable tree")
        for target in adapter.targets:
            name = kohya_name(component, target.path)
            if target.path not in trainable[component]:
                raise ValueError(f"{component}/{target.path}: no trainable factors")
            p, f = trainable[component][target.path], frozen.get(component, {}).get(target.path, {})
            if isinstance(adapter.kind, Kron):
                w1, w2 = _lokr_factors(adapter, target, p)
                tensors[f"{name}.lokr_w1"] = store(w1)
                tensors[f"{name}.lokr_w2"] = store(w2[:, :, None, None] if target.conv else w2)
                tensors[f"{name}.alpha"] = store(1.0)  # full matrices: every loader uses scale 1
                modules[name] = "lokr"
                continue
            down, up, _ = _lora_factors(adapter, target, p, f, None)  # [r, in], [out, r], scale in up
            if target.conv:  # a 1x1 Conv2d LoRA is two 1x1 convolutions
                down, up = down[:, :, None, None], up[:, :, None, None]
            rank = int(down.shape[0])
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = store(down), store(up)
            tensors[f"{name}.alpha"] = store(float(rank))  # alpha / r == 1: the scale lives in lora_up
            modules[name], ranks[name] = "lora", rank
    if not modules:
        raise ValueError("nothing to export: no adapter targets")
    output_name = output_name or path.stem
    written = {
        **_network_fields(ranks, "lokr" in modules.values()),
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version == "sd_v2"),
        "ss_output_name": output_name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "diffusers",
        "modelspec.architecture": f"{_ARCHITECTURES[base_model_version]}/lora",
        "modelspec.title": output_name,
        "hdb_jax.format": FORMAT,
        "hdb_jax.version": hdb_jax.__version__,
        "hdb_jax.dtype": dtype,
        "hdb_jax.adapters": json.dumps(
            {c: {"kind": a.kind.name, "hparams": dataclasses.asdict(a.kind)} for c, a in adapters.items()},
            sort_keys=True,
        ),
    }
    if trigger:
        written.update(
            {
                "ss_tag_frequency": json.dumps({output_name: {trigger: 1}}),
                "modelspec.trigger_phrase": trigger,
                "hdb_jax.trigger": trigger,
            }
        )
    if base_fingerprint:
        written["hdb_jax.base_fingerprint"] = base_fingerprint
    extra = dict(metadata or {})
    clashes = sorted(set(extra) & set(written))
    if clashes:
        raise ValueError(f"metadata may not replace the entries export_kohya writes: {clashes}")
    if any(not isinstance(v, str) for v in extra.values()):
        raise ValueError("safetensors metadata values must be strings")
    written.update(extra)
    tensorfile.write(path, tensors, written)
    return WebuiExport(path, modules, ranks, written)
