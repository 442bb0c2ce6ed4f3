"""The one resumable training loop every job runs.

``train(state, step_fn, batch_fn, steps=..., ...)`` owns what each job used to write by hand:

* resume: with a :class:`~hdb_jax.checkpoint.Checkpointer`, the latest checkpoint is restored
  into the state's layout (shardings included) and a "resumed from ... at step s" line is printed;
* batches: ``batch_fn(step)`` (a pure function of the step) runs in a background thread one or
  two steps ahead (:func:`hdb_jax.data.prefetch.prefetch`);
* logging: metrics are fetched to the host only on log steps; a non-finite loss stops the run
  with :class:`NonFiniteLossError` naming the step and the last good checkpoint; scalars (with
  ``steps_per_s``) go to the :class:`~hdb_jax.metrics.Writer` and the progress bar;
* saving: Orbax's policy decides on interval and preemption saves; the loop's last step is always
  saved; SIGTERM (single process) and ``stop_after`` (time-sliced jobs: this many steps per
  invocation) save and stop early;
* validation: ``validate(state, step)`` every ``validate_every`` steps and at the end, returning
  scalars and images (e.g. a sample grid) for the writer.

The state is whatever pytree ``step_fn(state, batch) -> (state, metrics)`` carries; the loop only
counts steps. Rerunning the same command continues an interrupted run exactly: batches depend on
the step only and the state comes back bit for bit.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from hdb_jax import checkpoint, metrics
from hdb_jax.data import prefetch

Validate = Callable[[Any, int], Mapping[str, Mapping[str, Any]]]  # -> {"scalars": {...}, "images": {...}}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class LoopResult:
    """What :func:`train` did.

    Attributes:
      state: the state after the last step run (or as restored, if nothing was left to do).
      start: the step this invocation started from (0, or the restored checkpoint's).
      step: the step reached.
      history: ``{step: {metric: float}}`` of the scalar metrics on log steps (and the last step).
      validation: ``{step: {metric: float}}`` of the validation scalars.
      stopped_early: stopped by SIGTERM, a preemption or ``stop_after`` before ``steps``.
      seconds: wall time of the steps run here.
    """

    state: Any
    start: int
    step: int
    history: dict[int, dict[str, float]]
    validation: dict[int, dict[str, float]]
    stopped_early: bool
    seconds: float

    @property
    def steps_run(self) -> int:
        return self.step - self.start

    @property
    def steps_per_s(self) -> float | None:
        return self.steps_run / self.seconds if self.seconds > 0 and self.steps_run else None

    def last(self, name: str = "loss") -> float | None:
        """The metric at the last log step, or None."""
        return self.history[max(self.history)].get(name) if self.history else None


def restore(ckpt: checkpoint.Checkpointer | None, state: Any, *, name: str = "train") -> tuple[int, Any]:
    """``(start step, state)``: the latest checkpoint restored into ``state``'s layout, or step 0."""
    if ckpt is None or ckpt.latest_step is None:
        return 0, state
    start, state = ckpt.restore(state)
    if jax.process_index() == 0:
        print(f"{name}: resumed from {ckpt.directory} at step {start}")
    return start, state


def train(
    state: Any,
    step_fn: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]],
    batch_fn: Callable[[int], Any],
    *,
    steps: int,
    checkpointer: checkpoint.Checkpointer | None = None,
    writer: metrics.Writer | None = None,
    config: Mapping[str, Any] | None = None,
    log_every: int = 10,
    stop_after: int = 0,
    validate: Validate | None = None,
    validate_every: int = 0,
    name: str = "train",
    prefix: str = "",
    loss_key: str = "loss",
    progress: bool = True,
    start: int | None = None,
) -> LoopResult:
    """Runs (or resumes) ``state`` to ``steps`` steps.

    Args:
      state: the initial state (its structure and shardings are the restore target).
      step_fn: ``(state, batch) -> (state, metrics)``; usually a jitted step with the frozen trees
        and rng bound (``functools.partial``); ``metrics[loss_key]`` is checked for finiteness.
      batch_fn: ``step -> batch`` for the batch consumed by step ``step + 1`` (0-based).
      steps: the step to reach (the loop's last step; always checkpointed).
      checkpointer: where to resume from and save to; None: no checkpoints.
      writer: the metric writer; None: none.
      config: JSON-able run config saved beside each checkpoint.
      log_every: fetch, check and write metrics every this many steps (and at the end).
      stop_after: > 0: save and stop after this many steps in this invocation.
      validate: ``(state, step) -> {"scalars": {...}, "images": {...}}`` (either key optional).
      validate_every: run ``validate`` every this many steps (0: only after the last step).
      name: the progress bar's label and the resume message's.
      prefix: prepended to every metric tag (``"vae/"``).
      loss_key: the metric checked for non-finite values.
      progress: show a progress bar.
      start: the step ``state`` is at when the caller restored it already (:func:`restore`);
        None: the loop restores from ``checkpointer`` itself.

    Returns:
      A :class:`LoopResult`.

    Raises:
      NonFiniteLossError: ``metrics[loss_key]`` was NaN or infinite on a log step.
    """
    if start is None:
        start, state = restore(checkpointer, state, name=name)
    history: dict[int, dict[str, float]] = {}
    validation: dict[int, dict[str, float]] = {}
    config = dict(config or {})
    bar = metrics.progress(steps, initial=min(start, steps), desc=name) if progress else None
    last_good = checkpointer.latest_step if checkpointer is not None else None
    s, stopped, t_start = start, False, time.perf_counter()
    t_log, s_log = t_start, start

    def run_validation(at: int) -> None:
        out = validate(state, at) if validate is not None else {}
        scalars = {k: float(np.asarray(v)) for k, v in (out.get("scalars") or {}).items()}
        if scalars:
            validation[at] = scalars
        if writer is not None:
            writer.scalars(at, {f"{prefix}val/{k}": v for k, v in scalars.items()})
            writer.images(at, {f"{prefix}val/{k}": v for k, v in (out.get("images") or {}).items()})

    batches = prefetch.prefetch(batch_fn, range(start, steps))
    try:
        while s < steps:
            state, out = step_fn(state, next(batches))
            s += 1
            if bar is not None:
                bar.update(1)
            if s % log_every == 0 or s == steps:
                fetched = {k: np.asarray(v) for k, v in jax.device_get(dict(out)).items()}
                host = {k: float(v) for k, v in fetched.items() if v.ndim == 0}  # arrays stay off the writer
                if loss_key in host and not np.isfinite(host[loss_key]):
                    where = (
                        f"step {last_good} in {checkpointer.directory}" if last_good is not None else "none"
                    )
                    raise NonFiniteLossError(
                        f"{name}: {loss_key} is {host[loss_key]} at step {s}; last good checkpoint: {where}"
                    )
                now = time.perf_counter()
                host["steps_per_s"] = (s - s_log) / max(now - t_log, 1e-9)
                t_log, s_log = now, s
                history[s] = host
                if writer is not None:
                    writer.scalars(s, {f"{prefix}{k}": v for k, v in host.items()})
                if bar is not None:
                    bar.set_postfix({k: f"{host[k]:.4g}" for k in (loss_key, "steps_per_s") if k in host})
            if validate is not None and validate_every > 0 and s % validate_every == 0 and s < steps:
                run_validation(s)
            stop = (checkpointer is not None and checkpointer.should_stop(s)) or (
                stop_after > 0 and s - start >= stop_after
            )
            if checkpointer is not None and checkpointer.save(s, state, config, force=stop or s == steps):
                last_good = s
            if stop and s < steps:
                stopped = True
                if jax.process_index() == 0:
                    print(
                        f"\n{name}: stopped at step {s} (checkpoint saved); rerun the same command to resume"
                    )
                break
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    if validate is not None and not stopped and (s > start or not validation):
        run_validation(s)
    if writer is not None:
        writer.flush()
    return LoopResult(state, start, s, history, validation, stopped, seconds)
