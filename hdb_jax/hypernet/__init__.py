"""HyperDreamBooth's hypernetwork: CLIP image encoder + iterative weight-token decoder."""

from hdb_jax.hypernet.decoder import (
    Block,
    WeightDecoder,
    default_width,
    token_layout,
    token_width,
    tokens_to_tree,
    tree_to_tokens,
)
from hdb_jax.hypernet.encoder import (
    CLIP_MEAN,
    CLIP_STD,
    ENCODER_CONFIGS,
    ImageEncoder,
    abstract_encoder_params,
    encoder_config,
    load_encoder_params,
    num_tokens,
    resize_images,
)
from hdb_jax.hypernet.model import (
    HyperNetwork,
    abstract_params,
    build_hypernet,
    init_params,
    split_params,
)

__all__ = [
    "Block",
    "CLIP_MEAN",
    "CLIP_STD",
    "ENCODER_CONFIGS",
    "HyperNetwork",
    "ImageEncoder",
    "WeightDecoder",
    "abstract_encoder_params",
    "abstract_params",
    "build_hypernet",
    "default_width",
    "encoder_config",
    "init_params",
    "load_encoder_params",
    "num_tokens",
    "resize_images",
    "split_params",
    "token_layout",
    "token_width",
    "tokens_to_tree",
    "tree_to_tokens",
]
