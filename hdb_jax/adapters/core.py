"""An adapter on one model component: its targets, its parameter trees, and how it runs.

An :class:`Adapter` is static (hashable) data: a kind (``LoRA``, ``LiDB``, ``Kron``,
``Residual``) and the tuple of target layers. Its arrays live in two plain pytrees keyed by
module path, ``{path: {factor: array}}``: the *trainable* tree and the *frozen* tree (LiDB's
bases; empty dicts for the other kinds). Nothing here mutates a parameter dict.

Two ways to run a model with an adapter:

* ``merge``: new base parameters with ``W + ΔW`` (for sampling and export);
* ``attach``: a context manager that intercepts the target layers' ``__call__`` (via
  ``flax.linen.intercept_methods``) and adds ``x · ΔW`` in activation space. With
  ``per_sample=True`` every trainable leaf carries a leading batch axis, so each sample in the
  batch runs with its own adapter weights while the base weights are shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Any, Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from hdb_jax.adapters.kinds import KINDS, Kron, LiDB, LoRA, Residual
from hdb_jax.adapters.targets import Target, find_targets

Kind = LoRA | LiDB | Kron | Residual
Tree = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A kind of adapter attached to a set of layers of one component.

    Attributes:
      kind: the hyperparameters and maths (see :mod:`hdb_jax.adapters.kinds`).
      targets: the adapted layers, sorted by path.
      component: which model component the paths belong to (``unet`` or ``text_encoder``).
    """

    kind: Kind
    targets: tuple[Target, ...]
    component: str = "unet"

    @classmethod
    def create(
        cls, kind: Kind, params: Mapping[str, Any], patterns: Iterable[str], component: str
    ) -> "Adapter":
        """Finds the targets of ``patterns`` in a component's (abstract) parameter tree."""
        targets = find_targets(params, patterns, where=component)
        adapter = cls(kind, targets, component)
        for target in targets:  # shape errors (e.g. Kronecker divisibility) surface now
            kind.num_params(target)
        return adapter

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(t.path for t in self.targets)

    def _keys(self, key: jax.Array) -> Iterator[tuple[Target, jax.Array]]:
        # Keyed by path, so adding or removing a target leaves the others' draws unchanged.
        for target in self.targets:
            yield target, jax.random.fold_in(key, zlib.crc32(target.path.encode()) & 0x7FFFFFFF)

    def init(self, key: jax.Array) -> Tree:
        """The trainable tree ``{path: {factor: array}}`` at its initial value."""
        return {t.path: self.kind.init(k, t) for t, k in self._keys(key)}

    def basis(self, key: jax.Array) -> Tree:
        """The frozen tree (LiDB's orthonormal bases; ``{}`` per layer for other kinds)."""
        return {t.path: self.kind.basis(k, t) for t, k in self._keys(key)}

    def abstract_basis(self) -> Tree:
        """The frozen tree's shapes (``jax.ShapeDtypeStruct`` leaves), for shape-only compiles."""
        return {t.path: self.kind.basis_shapes(t) for t in self.targets}

    def num_params(self) -> int:
        """Trainable scalars over all targets."""
        return sum(self.kind.num_params(t) for t in self.targets)

    def deltas(self, trainable: Tree, frozen: Tree | None = None) -> dict[str, jax.Array]:
        """Dense updates ``{path: ΔW [in, out]}``."""
        return {t.path: self.delta(t, trainable, frozen) for t in self.targets}

    def merge(
        self, params: Mapping[str, Any], trainable: Tree, frozen: Tree | None = None, scale: float = 1.0
    ) -> dict:
        """New component parameters with ``kernel + scale · ΔW``; ``params`` is left untouched."""
        flat = dict(traverse_util.flatten_dict(params))
        for target in self.targets:
            key = target.kernel_path
            if key not in flat:
                raise KeyError(f"{self.component}: adapter target '{target.path}' has no kernel")
            kernel = flat[key]
            delta = self.delta(target, trainable, frozen)
            flat[key] = kernel + (scale * delta).reshape(kernel.shape).astype(kernel.dtype)
        return traverse_util.unflatten_dict(flat)

    def delta(self, target: Target, trainable: Tree, frozen: Tree | None = None) -> jax.Array:
        """ΔW [in, out] of one target."""
        frozen = frozen or {}
        return self.kind.delta(trainable[target.path], frozen.get(target.path, {}), target)

    @contextlib.contextmanager
    def attach(
        self,
        trainable: Tree,
        frozen: Tree | None = None,
        *,
        per_sample: bool = False,
        scale: float | jax.Array = 1.0,
    ):
        """Adds ``scale · x · ΔW`` to every target layer's output while the context is open.

        Args:
          trainable: the trainable tree; with ``per_sample`` every leaf is ``[B, ...]`` and the
            target layers' inputs must have the same leading batch size ``B``.
          frozen: the frozen tree (shared by all samples).
          per_sample: whether each sample has its own trainable factors.
          scale: multiplies the update (e.g. 0 for an exact base-model pass).

        Raises:
          RuntimeError: on exit, if a target layer was never called (paths do not match the model
            that ran) -- silently unused adapters would train nothing.
        """
        frozen = frozen or {}
        by_path = {t.path: t for t in self.targets}
        called: set[str] = set()
        kind = self.kind

        def update(p, f, x):
            return kind.apply(p, f, x)

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
                return next_fun(*args, **kwargs)
            path = ".".join(module.scope.path) if module.scope is not None else None
            if path not in by_path:
                return next_fun(*args, **kwargs)
            y = next_fun(*args, **kwargs)
            x = args[0] if args else kwargs["inputs"]
            p, f = trainable[path], frozen.get(path, {})
            if per_sample:
                upd = jax.vmap(update, in_axes=(0, None, 0))(p, f, x)
            else:
                upd = update(p, f, x)
            called.add(path)
            return y + (scale * upd).astype(y.dtype)

        with nn.intercept_methods(interceptor):
            yield
        missing = set(by_path) - called
        if called and missing:
            raise RuntimeError(
                f"{self.component}: {len(missing)} adapter targets were never called, "
                f"e.g. {sorted(missing)[:3]}"
            )
        if not called:
            raise RuntimeError(
                f"{self.component}: no adapter target was called inside attach(); was the "
                f"{self.component} applied inside the 'with' block? (Under jit, enter attach() "
                "inside the jitted function: a cached trace never reaches the interceptor.)"
            )


@contextlib.contextmanager
def attach_all(
    adapters: Mapping[str, Adapter],
    trainable: Mapping[str, Tree],
    frozen: Mapping[str, Tree],
    *,
    per_sample: bool = False,
):
    """Attaches every component's adapter at once (trees keyed by component name)."""
    with contextlib.ExitStack() as stack:
        for component, adapter in adapters.items():
            stack.enter_context(
                adapter.attach(trainable[component], frozen.get(component), per_sample=per_sample)
            )
        yield


def merge_all(
    params: Mapping[str, Any],
    adapters: Mapping[str, Adapter],
    trainable: Mapping[str, Tree],
    frozen: Mapping[str, Tree] | None = None,
    scale: float = 1.0,
) -> dict:
    """Base parameters with every component's adapter merged in (``W + scale · ΔW``).

    Args:
      params: ``{"unet", "vae", "text_encoder"}`` base parameters (left untouched).
      adapters: ``{component: Adapter}``.
      trainable: ``{component: trainable tree}``.
      frozen: ``{component: frozen tree}`` (LiDB bases); missing components mean none.
      scale: multiplies every update.

    Returns:
      A new parameter dict; components without an adapter are shared with ``params``.
    """
    frozen = frozen or {}
    out = dict(params)
    for component, adapter in adapters.items():
        if component not in params:
            raise KeyError(f"adapter for unknown component '{component}'; have {sorted(params)}")
        if adapter.component != component:
            raise ValueError(f"adapter keyed '{component}' targets '{adapter.component}'")
        out[component] = adapter.merge(params[component], trainable[component], frozen.get(component), scale)
    return out


def broadcast_batch(tree: Tree, batch: int) -> Tree:
    """A per-sample tree of ``batch`` copies of ``tree`` (leading axis added)."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), tree)


def kind_from_config(name: str, **hparams) -> Kind:
    """Builds a kind by name (``lora``, ``lidb``, ``kron``, ``residual``) and hyperparameters."""
    if name not in KINDS:
        raise ValueError(f"unknown adapter kind {name!r}; choose from {sorted(KINDS)}")
    cls = KINDS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(hparams) - fields
    if unknown:
        raise ValueError(f"adapter kind {name!r} has no hyperparameters {sorted(unknown)}")
    return cls(**hparams)
