"""What the hypernetwork trains on: identities, their views, and their pre-optimised weights.

Batches are a pure function of ``(seed, step)``: an epoch-wise permutation of the training
identities, and per row two view indices -- the image the hypernetwork sees and the image the
UNet denoises (the same one, as in the paper, or another view of the identity). Each process
renders or reads only the rows its devices hold (:func:`hdb_jax.common.sharding.global_batch`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from hdb_jax.common import images
from hdb_jax.data import weights as weights_lib
from hdb_jax.hypernet import decoder as dec

DENOISE_ON = ("same", "other")
FRESH_BASE = 20_000_000  # synthetic ids of fresh identities: FRESH_BASE + step · fresh + j (never reused)


def targets(
    preopt_dir: str, adapters: Mapping[str, Any], basis_hash: str | None
) -> tuple[list[int], np.ndarray]:
    """Identities of a pre-optimised weights dataset and their weight tokens ``[N, n, W]``.

    ``preopt_dir`` may name several datasets separated by commas (e.g. stage 1 run as several
    processes on disjoint identity ranges); they are read in order and must share the basis.
    """
    identities, tokens = [], []
    for directory in [d for d in preopt_dir.split(",") if d]:
        rows, trees = weights_lib.load(directory, adapters, basis_hash)
        identities += [r["identity"] for r in rows]
        tokens.append(np.asarray(dec.tree_to_tokens(trees, adapters)))
    return identities, np.concatenate(tokens)


@dataclasses.dataclass
class Data:
    """Global hypernetwork batches over ``identities`` (rows of ``tokens`` when given)."""

    source: Any  # an identity source (hdb_jax.data.identities)
    identities: Sequence[int]
    tokens: np.ndarray | None  # [N, n, W] pre-optimised targets, or None (no weight term)
    prompt_ids: np.ndarray  # [L]
    batch_size: int
    seed: int
    token_shape: tuple[int, int]  # (n, W)
    denoise_on: str = "same"
    fresh: int = 0  # the last ``fresh`` rows of every batch are new synthetic identities (no target)
    fresh_source: Any = None  # renders any synthetic identity (needed when fresh > 0)

    def __post_init__(self):
        if not 0 <= self.fresh <= self.batch_size:
            raise ValueError(f"config.data.fresh_per_batch={self.fresh}: need 0..{self.batch_size}")
        if self.fresh and self.fresh_source is None:
            raise ValueError("config.data.fresh_per_batch > 0 needs a synthetic identity source")
        if self.denoise_on not in DENOISE_ON:
            raise ValueError(f"config.data.denoise_on={self.denoise_on!r}: choose from {DENOISE_ON}")
        if self.denoise_on == "other" and self.source.views_per_identity < 2:
            raise ValueError("config.data.denoise_on='other' needs at least 2 views per identity")

    def rows(self, step: int) -> np.ndarray:
        """Indices into ``identities`` of the global batch's dataset rows at ``step`` (epoch-wise permutation).

        The batch's last :attr:`fresh` rows are fresh identities and not counted here.
        """
        n, b = len(self.identities), self.batch_size - self.fresh
        flat = step * b + np.arange(b)
        epochs = flat // n
        perms = {e: np.random.default_rng([self.seed, 5, int(e)]).permutation(n) for e in np.unique(epochs)}
        return np.array([perms[e][i % n] for e, i in zip(epochs, flat)])

    def view_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(seen [B], denoised [B])`` view indices of the global batch at ``step``."""
        views = self.source.views_per_identity
        rng = np.random.default_rng([self.seed, 9, step])
        seen = rng.integers(0, views, self.batch_size)
        if self.denoise_on == "same":
            return seen, seen
        return seen, (seen + rng.integers(1, views, self.batch_size)) % views

    def load(self, step: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``positions`` of the global batch of ``step`` (what one process holds)."""
        positions = np.asarray(positions)
        dataset_rows = self.rows(step)
        kept = self.batch_size - self.fresh
        seen, denoised = (v[positions] for v in self.view_indices(step))
        # (source, identity, dataset row or -1) of every position: dataset rows first, fresh ones last.
        who = [
            (self.source, self.identities[int(dataset_rows[p])], int(dataset_rows[p]))
            if p < kept
            else (self.fresh_source, FRESH_BASE + step * self.fresh + int(p - kept), -1)
            for p in positions
        ]
        pix = lambda which: np.stack([src.views(i, [int(v)])[0] for (src, i, _), v in zip(who, which)])  # noqa: E731
        first = images.to_unit_range(pix(seen))
        second = first if self.denoise_on == "same" else images.to_unit_range(pix(denoised))
        tokens = np.zeros((len(positions), *self.token_shape), np.float32)
        has = np.zeros(len(positions), np.float32)
        if self.tokens is not None:
            for k, (_, _, r) in enumerate(who):
                if r >= 0:
                    tokens[k], has[k] = self.tokens[r], 1.0
        return {
            "images": first,
            "targets": second,
            "input_ids": np.stack([self.prompt_ids] * len(positions)),
            "target_tokens": tokens,
            "has_target": has,
        }


def reference_views(source, identities: Sequence[Any]) -> np.ndarray:
    """View 0 of each identity, what the hypernetwork sees: float ``[I, H, W, 3]`` in [-1, 1]."""
    return np.stack([images.to_unit_range(source.views(i, [0])[0]) for i in identities])


def heldout_views(source, identities: Sequence[int], views: int) -> tuple[np.ndarray, np.ndarray]:
    """``(refs [I, H, W, 3], others [I, V, H, W, 3])``: view 0 as the reference, views 1..V to score."""
    refs = reference_views(source, identities)
    others = np.stack([images.to_unit_range(source.views(i, list(range(1, views + 1)))) for i in identities])
    return refs, others


def predict_tokens(net, params: Mapping[str, Any], refs: np.ndarray, batch: int = 16) -> np.ndarray:
    """Predicted weight tokens ``[I, n, W]`` for reference images ``[I, H, W, 3]`` (in batches)."""
    from hdb_jax.hypernet.encoder import resize_images
    from hdb_jax.hypernet.model import HyperNetwork

    fn = jax.jit(
        lambda p, x: net.apply(
            {"params": p}, resize_images(x, net.image_size), method=HyperNetwork.predict_tokens
        )
    )
    out = []
    for start in range(0, len(refs), batch):
        chunk = refs[start : start + batch]
        padded = (
            np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
            if len(chunk) < batch
            else chunk
        )
        out.append(np.asarray(fn(params, padded))[: len(chunk)])
    return np.concatenate(out)
