"""Pure-functional adapters (LoRA, LiDB, Kronecker, low-rank residuals) over Flax SD components."""

from hdb_jax.adapters.core import Adapter, attach_all, broadcast_batch, kind_from_config, merge_all
from hdb_jax.adapters.kinds import KINDS, Kron, LiDB, LoRA, Residual, semi_orthogonal
from hdb_jax.adapters.targets import PATTERNS, Target, TargetError, find_targets

__all__ = [
    "Adapter",
    "KINDS",
    "Kron",
    "LiDB",
    "LoRA",
    "PATTERNS",
    "Residual",
    "Target",
    "TargetError",
    "attach_all",
    "broadcast_batch",
    "find_targets",
    "kind_from_config",
    "merge_all",
    "semi_orthogonal",
]
