"""Orbax checkpoints for training runs: named items, Orbax's save policies, resume.

A run directory holds ``checkpoints/<step>/{state,config}``: ``state`` is the trainable pytree
(adapter or network parameters, optimizer state, step counter), ``config`` the run's config as
JSON. Frozen base weights are never saved. Restoring goes into the abstract target (shapes,
dtypes and, for sharded runs, shardings), so a resumed state lands where the step expects it.

When to save is Orbax's decision (``save_decision_policy``): every ``every`` steps, at the last
step, and when JAX's preemption service reports a preemption (multi-process runs on TPU pods and
clusters, where every process then saves the same step). What Orbax lacks is kept here: on a
single process a SIGTERM (what SLURM and Kubernetes send before killing a job) only sets a flag
that :meth:`Checkpointer.should_stop` reports at the next step boundary, so the loop can save and
exit cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as policies


class Checkpointer:
    """A run's checkpoints: Orbax's manager, its save policy, and a SIGTERM flag.

    Args:
      directory: where step folders go (created if missing).
      every: save every this many steps (0: only at ``last_step`` and on preemption).
      last_step: the run's final step, always saved.
      max_to_keep: how many recent checkpoints to keep.
      handle_sigterm: install a SIGTERM handler that requests a save-and-stop (main thread only).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int,
        last_step: int | None = None,
        max_to_keep: int = 3,
        handle_sigterm: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        decide = [policies.PreemptionCheckpointingPolicy()]
        if every > 0:
            decide.append(policies.FixedIntervalPolicy(int(every)))
        if last_step is not None:
            decide.append(policies.SpecificStepsPolicy(frozenset({int(last_step)})))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, save_decision_policy=policies.AnySavePolicy(decide)
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._stop = threading.Event()
        self._previous_handler = None
        if handle_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    # ---------------------------------------------------------------- preemption
    def _on_sigterm(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self._stop.set()

    def request_stop(self) -> None:
        """Asks the loop to save and stop at the next step boundary (what SIGTERM does)."""
        self._stop.set()

    def should_stop(self, step: int) -> bool:
        """True once a stop was requested here, or JAX's preemption service reached ``step``."""
        return self._stop.is_set() or self._manager.reached_preemption(step)

    # ---------------------------------------------------------------- save / restore
    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, config: Mapping[str, Any], *, force: bool = False) -> bool:
        """Saves ``state`` and ``config`` at ``step`` if the policy (or ``force``) says so.

        Returns:
          Whether a checkpoint was written (asynchronously; :meth:`close` waits for it).
        """
        if step == self.latest_step:
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(json.dumps(config, default=str))),
        )
        return bool(self._manager.save(step, args=args, force=force))

    def restore(self, abstract_state: Any | None, step: int | None = None) -> tuple[int, Any]:
        """Restores the state saved at ``step`` (default: latest) into ``abstract_state``'s layout.

        Args:
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with shardings where relevant) or
            arrays with the target structure; None restores the saved tree as it was written
            (for inspection).

        Returns:
          ``(step, state)``.

        Raises:
          FileNotFoundError: there is no checkpoint.
          ValueError: the saved tree does not fit ``abstract_state`` (another adapter layout).
        """
        step = self.latest_step if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        if abstract_state is None:
            # Inspection: every leaf on this process's first device, whatever mesh wrote it.
            meta = self._manager.item_metadata(step)["state"]
            if meta is None:
                raise FileNotFoundError(f"{self.directory}/{step}: no state metadata")
            single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_state = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=single), getattr(meta, "tree", meta)
            )
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{self.directory}/{step}: the checkpoint does not fit this run's state "
                f"(another adapter kind or target list?): {err}"
            ) from err
        return step, restored["state"]

    def saved_config(self, step: int | None = None) -> dict:
        step = self.latest_step if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored["config"])

    def close(self) -> None:
        """Waits for pending (async) saves and restores the previous SIGTERM handler."""
        self._manager.wait_until_finished()
        self._manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
