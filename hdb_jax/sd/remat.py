"""Rematerialisation of the UNet: what the backward pass keeps and what it recomputes.

Autodiff through the UNet keeps every intermediate activation of the forward pass until the
backward pass reads it; at 512 px that is most of a training step's memory. A remat policy trades
that memory for a second forward pass. The policy is a model setting
(``StableDiffusion.remat``, ``config.model.remat``), one of :data:`POLICIES`:

* ``none``: keep everything (fastest; the default).
* ``blocks``: each of the UNet's top-level modules (``conv_in``, the time embedding, every down
  block, the mid block, every up block, the output head) is its own checkpoint region: the
  backward pass keeps only what enters and leaves each block and recomputes a block's insides
  for that block's backward, so that, where the compiler keeps the regions apart, about one
  block's activations are live at once.
* ``layers``: the same one level down (each ResNet, transformer, down/upsampler inside the
  blocks): less recomputation, more kept.
* ``full``: one region around the whole UNet: nothing of it is kept between the forward and
  the backward pass, but its recomputation runs as one piece, so its activations are live
  together again during the backward (it pays only where the UNet is one part of a larger
  program whose other activations it would otherwise sit beside).

How: ``blocks`` and ``layers`` intercept the ``__call__`` of every module at their depth below the
UNet and run it through Flax's lifted ``nn.checkpoint`` (a Flax module cannot be called inside a
plain ``jax.checkpoint``); ``full`` wraps the UNet call in ``jax.checkpoint``. The maths is
unchanged (gradients equal to float32 rounding). The memory each policy buys at SD 1.5 shapes
is measured by ``benchmarks/remat_memory.py``: on XLA:CPU none, because that compiler drops the
optimisation barriers between a recomputation and the forward pass and merges the two
(``remat_memory.py --chain``); what XLA:GPU and XLA:TPU make of it is still to be measured.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import flax.linen as nn
import jax

from hdb_jax.sd import hf

POLICIES = ("none", "blocks", "layers", "full")
DEFAULT = "none"
_DEPTH = {"blocks": 1, "layers": 2}  # modules this deep below the UNet become regions
_PASS = threading.local()  # set while a region calls its module: that call is not wrapped again


def validate(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown UNet remat policy {policy!r}; choose from {', '.join(POLICIES)}")
    return policy


def _depth_below_unet(module: nn.Module) -> int | None:
    """1 for the UNet's own submodules, 2 for theirs, ...; None outside a UNet."""
    depth, parent = 0, module
    while isinstance(parent, nn.Module):
        if isinstance(parent, hf.FlaxUNet2DConditionModel):
            return depth
        parent, depth = parent.parent, depth + 1
    return None


def _is_static(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _regions(depth: int) -> Callable:
    def intercept(next_fun, args, kwargs, context):
        if getattr(_PASS, "on", False) and context.method_name == "__call__":
            _PASS.on = False  # the region's own call of its module: run it as is
            return next_fun(*args, **kwargs)
        if context.method_name != "__call__" or _depth_below_unet(context.module) != depth:
            return next_fun(*args, **kwargs)
        static = {k: v for k, v in kwargs.items() if _is_static(v)}  # e.g. deterministic=True
        names = [k for k in kwargs if k not in static]

        def region(module, args, arrays):
            _PASS.on = True
            return type(module).__call__(module, *args, **static, **dict(zip(names, arrays)))

        return nn.checkpoint(region, prevent_cse=True)(context.module, args, [kwargs[k] for k in names])

    return intercept


def apply(policy: str, unet_call: Callable[..., Any]) -> Callable[..., Any]:
    """``unet_call`` (a pure function of arrays that applies the UNet) under ``policy``."""
    validate(policy)
    if policy == "none":
        return unet_call
    if policy == "full":
        return jax.checkpoint(unet_call)
    regions = _regions(_DEPTH[policy])

    @functools.wraps(unet_call)
    def with_regions(*args):
        with nn.intercept_methods(regions):
            return unet_call(*args)

    return with_regions
