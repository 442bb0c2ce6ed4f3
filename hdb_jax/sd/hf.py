"""The one place where hdb_jax imports diffusers and transformers.

diffusers 0.39.0 and transformers 4.57.6 are the last releases that still ship the Flax
Stable Diffusion and CLIP/ViT classes. Every other module of hdb_jax reaches those classes
through this file, so that swapping them for our own implementations later stays local. The
PyTorch classes (torch is optional) are imported only when :func:`pytorch_classes` is called.

Importing this module also silences *only* the deprecation notices those two libraries log for
their Flax classes (matched by message, on their own loggers); every other warning still shows.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import types

# transformers imports TensorFlow (seconds, and its own thread pools) whenever it is installed,
# e.g. with the optional TFDS extra; hdb_jax never uses transformers' TF classes.
os.environ.setdefault("USE_TF", "0")

# Messages the pinned libraries log every time a Flax class is built or loaded.
_DEPRECATION_PREFIXES = (
    "Flax classes are deprecated and will be removed in Diffusers",
    "TensorFlow and JAX classes are deprecated and will be removed in Transformers",
)


class _FlaxDeprecationFilter(logging.Filter):
    """Drops the pinned libraries' Flax deprecation notices and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(_DEPRECATION_PREFIXES)


_FILTER = _FlaxDeprecationFilter()

# The libraries' own logging set-up is light; filter their default handlers before the heavy
# imports below, which already log the notice once.
from diffusers.utils import logging as _diffusers_logging  # noqa: E402
from transformers.utils import logging as _transformers_logging  # noqa: E402

for _library_logging in (_diffusers_logging, _transformers_logging):
    for _handler in _library_logging.get_logger().handlers:
        _handler.addFilter(_FILTER)

# pylint: disable=wrong-import-position
from diffusers import (  # noqa: E402
    FlaxAutoencoderKL,
    FlaxDDIMScheduler,
    FlaxDDPMScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxUNet2DConditionModel,
)
from diffusers import __version__ as DIFFUSERS_VERSION  # noqa: E402
from diffusers.models import modeling_flax_pytorch_utils as _diffusers_pt_utils  # noqa: E402
from diffusers.models.attention_flax import FlaxAttention, FlaxGEGLU  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    FlaxCLIPModel,
    FlaxCLIPTextModel,
    FlaxCLIPVisionModel,
    FlaxViTModel,
    ViTConfig,
)
from transformers import modeling_flax_pytorch_utils as _transformers_pt_utils  # noqa: E402
from transformers.models.clip.modeling_flax_clip import (  # noqa: E402
    FlaxCLIPTextModule,
    FlaxCLIPVisionModule,
)
from transformers.models.clip.tokenization_clip import bytes_to_unicode  # noqa: E402
from transformers.models.vit.modeling_flax_vit import FlaxViTModule  # noqa: E402


def _install_filter() -> None:
    """Attaches the filter to every logger the two libraries have created so far.

    Logger-level filters also cover handlers a user attaches to the root logger.
    """
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        if name.split(".")[0] in ("diffusers", "transformers") and _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


_install_filter()

# PyTorch -> Flax key renaming helpers of the two libraries (pure numpy; no torch needed).
diffusers_rename_key = _diffusers_pt_utils.rename_key
diffusers_rename_and_reshape = _diffusers_pt_utils.rename_key_and_reshape_tensor
transformers_rename_and_reshape = _transformers_pt_utils.rename_key_and_reshape_tensor


def pytorch_classes() -> types.SimpleNamespace:
    """The PyTorch side of the two libraries, imported on the first call rather than with this module.

    torch is optional for hdb_jax (only the PyTorch export of a base model and the reference tests
    need it), so none of this is imported at start-up. The libraries' Flax -> PyTorch converters
    rename Flax keys to PyTorch module paths and transpose kernels; they only *log* weights they
    could not place, so callers must check the result themselves.

    Returns:
      A namespace with ``torch``, ``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
      ``diffusers_flax_to_pytorch`` and ``transformers_flax_to_pytorch`` (each
      ``(pt_model, flax_tree) -> pt_model``).

    Raises:
      ModuleNotFoundError: torch is not installed (diffusers would hand out placeholder classes
        that fail later, at first use).
    """
    if importlib.util.find_spec("torch") is None:
        raise ModuleNotFoundError("torch is not installed", name="torch")
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models import modeling_pytorch_flax_utils as diffusers_to_pt
    from transformers import CLIPTextModel

    _install_filter()  # loggers the PyTorch modules created
    return types.SimpleNamespace(
        torch=torch,
        UNet2DConditionModel=UNet2DConditionModel,
        AutoencoderKL=AutoencoderKL,
        CLIPTextModel=CLIPTextModel,
        diffusers_flax_to_pytorch=diffusers_to_pt.load_flax_weights_in_pytorch_model,
        transformers_flax_to_pytorch=_transformers_pt_utils.load_flax_weights_in_pytorch_model,
    )


__all__ = [
    "DIFFUSERS_VERSION",
    "bytes_to_unicode",
    "CLIPTextConfig",
    "CLIPTokenizer",
    "CLIPVisionConfig",
    "FlaxAutoencoderKL",
    "FlaxCLIPModel",
    "FlaxCLIPTextModel",
    "FlaxCLIPTextModule",
    "FlaxCLIPVisionModel",
    "FlaxCLIPVisionModule",
    "FlaxDDIMScheduler",
    "FlaxDDPMScheduler",
    "FlaxDPMSolverMultistepScheduler",
    "FlaxAttention",
    "FlaxGEGLU",
    "FlaxUNet2DConditionModel",
    "FlaxViTModel",
    "FlaxViTModule",
    "ViTConfig",
    "diffusers_rename_and_reshape",
    "diffusers_rename_key",
    "pytorch_classes",
    "transformers_rename_and_reshape",
]
