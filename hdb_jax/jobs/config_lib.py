"""What the experiment configs in ``configs/`` are made of: typed knobs and shared sections.

A config file is ``get_config(arg)`` returning an ``ml_collections.ConfigDict``; ``arg`` is the
text after ``:`` in ``--config configs/x.py:tiny,adapter=lora,steps=20``. :func:`knobs` parses it
against typed defaults; the section builders below give every stage the same ``model``,
``adapter``, ``optim``, ``loop``, ``mesh`` and ``distributed`` sections, so configs compose them
instead of copying a sibling's config and deleting what does not apply. :func:`load` reads one
config file from another (the demo builds on the stage configs) without touching ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import ml_collections

from hdb_jax.adapters.targets import PATTERNS

ADAPTER_KINDS = ("lidb", "lora", "kron", "residual")
SIZES = ("tiny", "toy", "sd15")  # random tiny model (tests), the shipped toy base model, SD 1.5


def _cast(name: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"knob {name}={text!r}: expected a boolean")
    if isinstance(default, tuple):  # choices, the first one the default
        if text not in default:
            raise ValueError(f"knob {name}={text!r}: choose from {list(default)}")
        return text
    try:
        return type(default)(text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"knob {name}={text!r}: expected {type(default).__name__}") from err


def knobs(arg: str | None, **defaults: Any) -> ml_collections.FrozenConfigDict:
    """Parses ``"tiny,adapter=lora,steps=20"`` against typed defaults.

    Each default's type says how its knob is read: a bool is a flag (``reduced`` or
    ``reduced=false``); a tuple lists the allowed strings, the first being the default, and a bare
    word equal to one of them selects it (``tiny`` means ``size=tiny``); an int, float or str is
    cast. Unknown knobs, duplicate knobs and values that do not cast are errors naming the knob.

    Returns:
      A frozen dict of every knob's value.
    """
    values = {k: (v[0] if isinstance(v, tuple) else v) for k, v in defaults.items()}
    seen: set[str] = set()
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            name, text = item.split("=", 1)
        else:
            owners = [k for k, v in defaults.items() if isinstance(v, tuple) and item in v]
            if owners:
                name, text = owners[0], item
            elif isinstance(defaults.get(item), bool):
                name, text = item, "true"
            else:
                name, text = item, None
        if name not in defaults:
            raise ValueError(f"unknown config knobs [{item!r}]; known: {sorted(defaults)}")
        if text is None:
            raise ValueError(f"knob {name!r} needs a value ({name}=...)")
        if name in seen:
            raise ValueError(f"knob {name!r} given twice in {arg!r}")
        seen.add(name)
        values[name] = _cast(name, text, defaults[name])
    return ml_collections.FrozenConfigDict(values)


def load(
    path: str | os.PathLike, arg: str | None = None, *, relative_to: str | None = None
) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file ``path`` (relative to ``relative_to``'s folder if given)."""
    if relative_to is not None and not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location(f"hdb_jax_config_{os.path.basename(path)[:-3]}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path} cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# -------------------------------------------------------------------- shared sections
def model(
    size: str = "tiny", *, source: str | None = None, resolution: int | None = None
) -> ml_collections.ConfigDict:
    """``model``: ``source`` (``tiny``, a diffusers-format directory or hub id), ``resolution``,
    ``attention`` (the UNet's attention implementation, ``auto``: by platform) and ``remat`` (what
    the UNet's backward pass recomputes: ``none``, ``blocks``, ``layers`` or ``full``).

    ``toy`` is the toy base model shipped in the package; ``sd15`` leaves the source to the user.
    A loaded model's resolution is 0, "the model's own" (:func:`hdb_jax.blocks.build.resolution`):
    the toy model's 32 px or SD 1.5's 512 px, whichever ``source`` turns out to be. The tiny random
    model is built at its ``resolution`` (32).
    """
    if size not in SIZES:
        raise ValueError(f"model size {size!r}: choose from {SIZES}")
    if source is None:
        if size == "toy":
            from hdb_jax.toy import base_model_dir

            source = os.fspath(base_model_dir())
        else:
            source = "tiny" if size == "tiny" else ""
    return ml_collections.ConfigDict(
        dict(
            source=source,
            resolution=resolution or (32 if size == "tiny" else 0),
            attention="auto",
            remat="none",
        )
    )


def adapter(kind: str = "lidb", size: str = "tiny") -> ml_collections.ConfigDict:
    """``adapter``: the kind, its target patterns, the LiDB basis file and every kind's hyperparameters.

    methods.md: LiDB a=100, b=50, r=1 at SD 1.5 (a=16, b=8 on the tiny model); DiffuseKronA on
    the UNet only; Personalized Residuals on every ``proj_out``.
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter={kind!r}: choose from {ADAPTER_KINDS}")
    sd15 = size == "sd15"
    c = ml_collections.ConfigDict()
    c.kind = kind
    c.unet_patterns = (PATTERNS["unet_proj_out"],) if kind == "residual" else (PATTERNS["unet_attention"],)
    c.text_patterns = () if kind in ("kron", "residual") else (PATTERNS["text_attention"],)
    c.basis_file = ""  # LiDB: a shared basis file; empty: <workdir>/lidb_basis.safetensors
    # LiDB bases: a=100, b=50 of SD 1.5's 320-1280 wide layers; a=16, b=8 on the tiny random model.
    # The toy model's layers are 64-128 wide: in its 32-of-64/128 and 16-of-64/128 subspaces no
    # recipe carried identity, so its bases are as wide as its widest layers (a=b=128; on 64-wide
    # layers the basis is a [64, 128] frame). Its a_train starts at N(0, 1) like LoRA's down
    # factor: with a 1e-3 start Adam's first steps set the factor's direction from noise.
    lidb = {"sd15": (100, 50, 1e-3), "toy": (128, 128, 1.0), "tiny": (16, 8, 1e-3)}[size]
    c.lidb = ml_collections.ConfigDict(dict(a=lidb[0], b=lidb[1], rank=1, init_std=lidb[2]))
    c.lora = ml_collections.ConfigDict(dict(rank=4, alpha=4.0))
    # DiffuseKronA's official SD recipe (scripts/finetune_sd.sh): a1=64 (divides out), a2=8 (divides in).
    c.kron = ml_collections.ConfigDict(dict(a1=64, a2=8, scale=1.0) if sd15 else dict(a1=4, a2=8, scale=1.0))
    c.residual = ml_collections.ConfigDict(dict(ratio=0.05 if sd15 else 0.25, rank=4))
    return c


def optim(
    learning_rate: float,
    *,
    weight_decay: float = 1e-2,
    grad_clip: float = 1.0,
    warmup_steps: int = 0,
    schedule: str = "constant",
    final_lr_fraction: float = 0.0,
) -> ml_collections.ConfigDict:
    """``optim``: AdamW with clipping (see :func:`hdb_jax.blocks.build.optimizer`)."""
    return ml_collections.ConfigDict(
        dict(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            warmup_steps=warmup_steps,
            schedule=schedule,
            final_lr_fraction=final_lr_fraction,
        )
    )


def loop(
    steps: int,
    *,
    log_every: int = 10,
    checkpoint_every: int = 100,
    stop_after: int = 0,
    validate_every: int = 0,
) -> dict[str, int]:
    """The training-loop fields every job config carries at its top level."""
    return dict(
        steps=steps,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        stop_after=stop_after,
        validate_every=validate_every,
    )


def mesh(data: int = -1, fsdp: int = 1) -> ml_collections.ConfigDict:
    """``mesh``: axis sizes (-1: every remaining device)."""
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def distributed() -> ml_collections.ConfigDict:
    """``distributed``: ``jax.distributed`` settings (auto-detected on TPU pods and SLURM)."""
    return ml_collections.ConfigDict(
        dict(auto=True, coordinator_address="", num_processes=-1, process_id=-1, local_device_ids=())
    )


def synthetic_identities(
    identities, *, images_per_identity: int = 4, seed: int = 0
) -> ml_collections.ConfigDict:
    """A data spec of synthetic identities (renders ``0 .. images_per_identity - 1`` of each)."""
    return ml_collections.ConfigDict(
        dict(
            source="synthetic",
            identities=tuple(identities),
            images_per_identity=images_per_identity,
            seed=seed,
            folder="",
            min_size=64,
        )
    )
