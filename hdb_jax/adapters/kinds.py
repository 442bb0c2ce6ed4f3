"""The four adapter kinds as pure maths on one target layer.

Each kind is a frozen dataclass of hyperparameters with four pure functions of one layer:

* ``init(key, target) -> dict``: trainable factors;
* ``basis(key, target) -> dict``: frozen factors (only LiDB has any);
* ``delta(p, f, target) -> [in, out]``: the dense update ΔW in Flax kernel orientation;
* ``apply(p, f, x) -> [..., out]``: ``x · ΔW`` computed without forming ΔW.

Shapes are for one sample; per-sample factors (a leading batch axis) are handled by ``vmap`` in
:mod:`hdb_jax.adapters.runtime`. Flax kernels are ``[in, out]`` (``y = x · W``); PyTorch's are
``[out, in]``, the transpose.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax.adapters.targets import Target


@dataclasses.dataclass(frozen=True)
class LoRA:
    """ΔW = (alpha / rank) · down[in, r] · up[r, out]; down ~ N(0, 1/r²), up = 0."""

    rank: int = 4
    alpha: float | None = None  # None: alpha = rank, i.e. scale 1
    name: ClassVar[str] = "lora"

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def layer_rank(self, target: Target) -> int:
        return self.rank

    def init(self, key: jax.Array, target: Target) -> dict:
        rank = self.layer_rank(target)
        down = jax.random.normal(key, (target.in_dim, rank), jnp.float32) / rank
        return {"down": down, "up": jnp.zeros((rank, target.out_dim), jnp.float32)}

    def basis(self, key: jax.Array, target: Target) -> dict:
        return {}

    def basis_shapes(self, target: Target) -> dict:
        return {}

    def delta(self, p: dict, f: dict, target: Target) -> jax.Array:
        return self.scale * (p["down"] @ p["up"])  # [in, out]

    def apply(self, p: dict, f: dict, x: jax.Array) -> jax.Array:
        return self.scale * ((x @ p["down"]) @ p["up"])  # [..., out]

    def num_params(self, target: Target) -> int:
        return self.layer_rank(target) * (target.in_dim + target.out_dim)


@dataclasses.dataclass(frozen=True)
class Residual(LoRA):
    """Personalized Residuals: a low-rank residual with rank = round(ratio · out channels).

    The rank is per layer (16/32/64 for SD's 320/640/1280 channels at ratio 0.05). ``rank`` is
    only used when ``ratio`` is None.
    """

    ratio: float | None = 0.05
    name: ClassVar[str] = "residual"

    def layer_rank(self, target: Target) -> int:
        if self.ratio is None:
            return self.rank
        return max(1, int(round(self.ratio * target.out_dim)))


@dataclasses.dataclass(frozen=True)
class LiDB:
    """Lightweight DreamBooth: ΔW = A_aux[in, a] · A_train[a, r] · B_train[r, b] · B_aux[b, out].

    A_aux and B_aux are frozen random orthonormal bases (see :mod:`hdb_jax.adapters.basis`);
    only A_train (small normal) and B_train (zero) train: (a + b) · r scalars per layer.
    """

    a: int = 100
    b: int = 50
    rank: int = 1
    init_std: float = 1e-3
    name: ClassVar[str] = "lidb"

    def init(self, key: jax.Array, target: Target) -> dict:
        a_train = self.init_std * jax.random.normal(key, (self.a, self.rank), jnp.float32)
        return {"a_train": a_train, "b_train": jnp.zeros((self.rank, self.b), jnp.float32)}

    def basis(self, key: jax.Array, target: Target) -> dict:
        ka, kb = jax.random.split(key)
        return {
            "a_aux": semi_orthogonal(ka, target.in_dim, self.a),  # columns orthonormal
            "b_aux": semi_orthogonal(kb, self.b, target.out_dim),  # rows orthonormal
        }

    def basis_shapes(self, target: Target) -> dict:
        """The shapes :meth:`basis` returns, without drawing it (its QR runs on the host)."""
        return {
            "a_aux": jax.ShapeDtypeStruct((target.in_dim, self.a), jnp.float32),
            "b_aux": jax.ShapeDtypeStruct((self.b, target.out_dim), jnp.float32),
        }

    def factors(self, p: dict, f: dict) -> tuple[jax.Array, jax.Array]:
        """The equivalent LoRA factors: down [in, r] and up [r, out]."""
        return f["a_aux"] @ p["a_train"], p["b_train"] @ f["b_aux"]

    def delta(self, p: dict, f: dict, target: Target) -> jax.Array:
        down, up = self.factors(p, f)
        return down @ up

    def apply(self, p: dict, f: dict, x: jax.Array) -> jax.Array:
        # Folding the bases first costs in·a·r once instead of tokens·in·a.
        down, up = self.factors(p, f)
        return (x @ down) @ up

    def num_params(self, target: Target) -> int:
        return (self.a + self.b) * self.rank


@dataclasses.dataclass(frozen=True)
class Kron:
    """DiffuseKronA: ΔW_torch[out, in] = A[a1, a2] ⊗ B[out/a1, in/a2]; Flax kernel is its transpose.

    Applied as ``Y = A · X · Bᵀ`` with ``X = x.reshape(a2, in/a2)`` and ``y = Y.reshape(out)``.
    Init: B = 0 (the model starts unchanged) and A ~ N(0, (1/a1)²): standard deviation 1/a1, as
    the official DiffuseKronA code draws it (``normal_(std=1/a1)`` in ``diffusekrona/krona.py``);
    the paper's "N(0, 1/a1)" is read the same way.
    """

    a1: int = 4
    a2: int = 64
    scale: float = 1.0
    name: ClassVar[str] = "kron"

    def _check(self, target: Target) -> tuple[int, int]:
        if target.out_dim % self.a1 or target.in_dim % self.a2:
            raise ValueError(
                f"kron ({self.a1}, {self.a2}) does not divide layer '{target.path}' "
                f"[in={target.in_dim}, out={target.out_dim}]: need out % a1 == 0 and in % a2 == 0"
            )
        return target.out_dim // self.a1, target.in_dim // self.a2

    def init(self, key: jax.Array, target: Target) -> dict:
        rows, cols = self._check(target)
        a = jax.random.normal(key, (self.a1, self.a2), jnp.float32) / self.a1
        return {"a": a, "b": jnp.zeros((rows, cols), jnp.float32)}

    def basis(self, key: jax.Array, target: Target) -> dict:
        return {}

    def basis_shapes(self, target: Target) -> dict:
        return {}

    def delta(self, p: dict, f: dict, target: Target) -> jax.Array:
        return self.scale * jnp.kron(p["a"], p["b"]).T  # [in, out]

    def apply(self, p: dict, f: dict, x: jax.Array) -> jax.Array:
        a, b = p["a"], p["b"]  # [a1, a2], [out/a1, in/a2]
        xs = x.reshape(*x.shape[:-1], a.shape[1], b.shape[1])  # [..., a2, in/a2]
        y = jnp.einsum("ij,...jk,lk->...il", a, xs, b)  # [..., a1, out/a1]
        return self.scale * y.reshape(*x.shape[:-1], a.shape[0] * b.shape[0])

    def num_params(self, target: Target) -> int:
        rows, cols = self._check(target)
        return self.a1 * self.a2 + rows * cols


KINDS = {cls.name: cls for cls in (LoRA, LiDB, Kron, Residual)}


def semi_orthogonal(key: jax.Array, rows: int, cols: int) -> jax.Array:
    """A random [rows, cols] matrix with orthonormal columns (rows >= cols) or rows (rows < cols).

    QR of a Gaussian matrix in float64 on the host, signs fixed by diag(R), so the result is a
    deterministic function of ``key`` (computed once and stored; see ``basis.py``).
    """
    tall = rows >= cols
    shape = (rows, cols) if tall else (cols, rows)
    gauss = np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)
    q, r = np.linalg.qr(gauss)
    q = q * np.sign(np.diag(r))[None, :]
    return jnp.asarray((q if tall else q.T).astype(np.float32))
