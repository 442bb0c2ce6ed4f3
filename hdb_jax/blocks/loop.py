"""The one resumable training loop every job runs.

``train(state, step_fn, batch_fn, config, start=..., run=...)`` owns what each job used to write by
hand; ``config`` is the job's section (``steps``, ``log_every``, ``stop_after``, ``validate_every``)
and ``run`` its :class:`RunDir` (:func:`open_run`: checkpoints and TensorBoard under one workdir):

* resume: :meth:`RunDir.restore` puts the latest checkpoint into the state's layout (shardings
  included) and prints "resumed from ... at step s"; the loop continues from that step;
* batches: ``batch_fn(step)`` (a pure function of the step) runs in a background thread one or
  two steps ahead (:func:`hdb_jax.common.prefetch.prefetch`);
* logging: metrics are fetched to the host only on log steps; a non-finite loss stops the run
  with :class:`NonFiniteLossError` naming the step and the last good checkpoint; scalars (with
  ``steps_per_s``) go to the :class:`~hdb_jax.common.metrics.Writer` and the progress bar;
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

import contextlib
import dataclasses
import itertools
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from hdb_jax.common import checkpoint, metrics, prefetch

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


def _as_example(x: Any) -> Any:
    """An array on this process's default device, committed or not, as its shape and dtype.

    A state restored from a checkpoint is committed to its device, a fresh one is not; lowered
    as they are, the two give programs that differ only in sharding annotations, and a resumed run
    missed the persistent compilation cache the first run had filled (toy base recipe: the UNet
    step compiled twice). The compiled program accepts both.
    """
    if isinstance(x, jax.Array) and x.sharding.device_set == {jax.local_devices()[0]}:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.weak_type)
    return x


def compile_step(jitted: Any, *example_args: Any, name: str = "train step") -> Any:
    """``jitted`` compiled ahead of time for ``example_args`` (arrays or ``jax.ShapeDtypeStruct``s).

    Prints one line, ``compiled <name> in <s>s (<memory>)``: the compile time and what XLA says
    the program holds (arguments, outputs, temporaries), so that a step that will not fit shows
    before the first step runs. The compiled program accepts only arguments of these shapes,
    dtypes and shardings, and keeps ``jitted``'s donation.
    """
    t0 = time.perf_counter()
    compiled = jitted.lower(*jax.tree_util.tree_map(_as_example, example_args)).compile()
    seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    parts = []
    for label, field in (
        ("arguments", "argument_size_in_bytes"),
        ("outputs", "output_size_in_bytes"),
        ("temp", "temp_size_in_bytes"),
    ):
        size = getattr(memory, field, None) if memory is not None else None
        if size is not None:
            parts.append(f"{label} {size / 2**20:.1f} MiB")
    print(f"compiled {name} in {seconds:.1f}s" + (f" ({', '.join(parts)})" if parts else ""), flush=True)
    return compiled


@dataclasses.dataclass
class RunDir:
    """A training run's directory: ``checkpoints/`` (Orbax, with the run config beside each step)
    and ``tb/`` (TensorBoard). Open one with :func:`open_run`; every job's loop writes through it."""

    path: str
    checkpointer: checkpoint.Checkpointer
    writer: metrics.Writer
    config: dict  # JSON-able run config saved beside each checkpoint

    def restore(self, state: Any, *, name: str = "train") -> tuple[int, Any]:
        """``(start step, state)``: the latest checkpoint restored into ``state``'s layout, or step 0."""
        return restore(self.checkpointer, state, name=name)


@contextlib.contextmanager
def open_run(workdir: str | os.PathLike, config: Mapping[str, Any]) -> Iterator[RunDir]:
    """The run directory ``workdir`` of a job whose config has ``checkpoint_every``.

    The checkpointer (and its SIGTERM handler) exists from here on, so open the run before the
    compile: a stop asked for meanwhile is kept.
    """
    path = os.path.abspath(os.fspath(workdir))
    os.makedirs(path, exist_ok=True)
    plain = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    with (
        checkpoint.Checkpointer(os.path.join(path, "checkpoints"), every=config["checkpoint_every"]) as ckpt,
        metrics.Writer(os.path.join(path, "tb")) as writer,
    ):
        yield RunDir(path, ckpt, writer, plain)


def train(
    state: Any,
    step_fn: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]],
    batch_fn: Callable[[int], Any],
    config: Mapping[str, Any],
    *,
    start: int,
    run: RunDir | None = None,
    steps: int | None = None,
    stop_after: int | None = None,
    log_every: int | None = None,
    validate: Validate | None = None,
    name: str = "train",
    prefix: str = "",
    loss_key: str = "loss",
    progress: bool = True,
) -> LoopResult:
    """Runs ``state`` from step ``start`` to ``config.steps``.

    There is one resume protocol: the caller restores (:meth:`RunDir.restore`, which prints where
    it resumed from) before it builds anything that depends on the restored state, and passes the
    step it got as ``start``.

    Args:
      state: the state at step ``start`` (its structure and shardings are the checkpoint layout).
      step_fn: ``(state, batch) -> (state, metrics)``; usually a jitted step with the frozen trees
        and rng bound (``functools.partial``); ``metrics[loss_key]`` is checked for finiteness.
      batch_fn: ``step -> batch`` for the batch consumed by step ``step + 1`` (0-based); ``None``
        for a step that carries its data in the frozen arguments.
      config: the job's section with ``steps`` (the step to reach: the loop's last step, always
        checkpointed), ``log_every`` (fetch, check and write metrics every this many steps and at
        the end), and optionally ``stop_after`` (> 0: save and stop after this many steps in this
        invocation) and ``validate_every`` (run ``validate`` every this many steps; 0: only after
        the last step).
      start: the step ``state`` is at (0, or what :meth:`RunDir.restore` returned).
      run: where to save checkpoints and write metrics; None: neither.
      steps, stop_after, log_every: override the config's (a phase of a longer run, a budget).
      validate: ``(state, step) -> {"scalars": {...}, "images": {...}}`` (either key optional).
      name: the progress bar's label and the stop message's.
      prefix: prepended to every metric tag (``"vae/"``).
      loss_key: the metric checked for non-finite values.
      progress: show a progress bar.

    Returns:
      A :class:`LoopResult`.

    Raises:
      NonFiniteLossError: ``metrics[loss_key]`` was NaN or infinite on a log step.
    """
    steps = int(config["steps"] if steps is None else steps)
    log_every = int(config.get("log_every", 10) if log_every is None else log_every)
    stop_after = int((config.get("stop_after", 0) or 0) if stop_after is None else stop_after)
    validate_every = int(config.get("validate_every", 0) or 0)
    checkpointer = run.checkpointer if run is not None else None
    writer = run.writer if run is not None else None
    saved_config = run.config if run is not None else {}
    history: dict[int, dict[str, float]] = {}
    validation: dict[int, dict[str, float]] = {}
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

    batches = (
        prefetch.prefetch(batch_fn, range(start, steps))
        if batch_fn is not None
        else (None for _ in itertools.count())
    )
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
            if checkpointer is not None and checkpointer.save(
                s, state, saved_config, force=stop or s == steps
            ):
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
