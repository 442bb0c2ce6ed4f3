"""Which linear layers an adapter attaches to, found by regex over module paths.

A module path is the dotted path of a Flax module inside its model's parameter tree, for example
``down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_q`` (UNet) or
``text_model.encoder.layers.3.self_attn.q_proj`` (CLIP text encoder). Adapter trees are keyed
by these strings. A target is a Dense layer (kernel ``[in, out]``) or a 1x1 convolution (kernel
``[1, 1, in, out]``); both are the linear map ``y = x · W`` over the last axis.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

from flax import traverse_util

# The defaults of methods.md, as full-match regexes over module paths.
PATTERNS = {
    # UNet self- and cross-attention q/k/v/out (SD 1.5: 16 blocks x 2 x 4 = 128 matrices).
    "unet_attention": r".*\.attn[12]\.(to_q|to_k|to_v|to_out_0)",
    # CLIP text encoder attention q/k/v/out (SD 1.5: 12 layers x 4 = 48 matrices).
    "text_attention": r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    # CLIP text encoder MLP (SD 1.5: 12 layers x 2 = 24 matrices).
    "text_mlp": r".*\.mlp\.(fc1|fc2)",
    # Output projection of every UNet transformer block (Personalized Residuals).
    "unet_proj_out": r".*\.attentions_\d+\.proj_out",
}


class TargetError(ValueError):
    """An adapter target pattern is wrong for the model it is applied to."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted linear layer.

    Attributes:
      path: dotted module path inside the component's parameter tree.
      in_dim: input features.
      out_dim: output features.
      conv: True for a 1x1 convolution (kernel ``[1, 1, in, out]``), False for Dense.
    """

    path: str
    in_dim: int
    out_dim: int
    conv: bool = False

    @property
    def kernel_path(self) -> tuple[str, ...]:
        return tuple(self.path.split(".")) + ("kernel",)


def find_targets(
    params: Mapping[str, Any],
    patterns: Iterable[str],
    *,
    where: str = "model",
) -> tuple[Target, ...]:
    """Lists the linear layers whose module path fully matches any of ``patterns``.

    Args:
      params: a component's parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      patterns: regexes matched with ``re.fullmatch`` against dotted module paths.
      where: the component's name, for error messages.

    Returns:
      Targets in a stable (sorted by path) order.

    Raises:
      TargetError: a pattern matches no layer, or matches a layer that is not a linear map.
    """
    patterns = list(patterns)
    if not patterns:
        raise TargetError(f"{where}: no target patterns given")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise TargetError(f"{where}: invalid target pattern {pattern!r}: {err}") from err
    kernels = {
        ".".join(key[:-1]): leaf
        for key, leaf in traverse_util.flatten_dict(params).items()
        if key[-1] == "kernel"
    }
    found: dict[str, Target] = {}
    for pattern, regex in zip(patterns, compiled):
        hits = [path for path in kernels if regex.fullmatch(path)]
        if not hits:
            examples = ", ".join(sorted(kernels)[:3])
            raise TargetError(
                f"{where}: target pattern '{pattern}' matches no layer "
                f"({len(kernels)} layers, e.g. {examples})"
            )
        for path in hits:
            shape = tuple(kernels[path].shape)
            if len(shape) == 2:
                found[path] = Target(path, shape[0], shape[1], conv=False)
            elif len(shape) == 4 and shape[:2] == (1, 1):
                found[path] = Target(path, shape[2], shape[3], conv=True)
            else:
                raise TargetError(
                    f"{where}: pattern '{pattern}' matched '{path}' whose kernel {shape} is not a "
                    "Dense or 1x1 convolution kernel"
                )
    return tuple(found[path] for path in sorted(found))
