"""The shared training loop: resume, stop_after, non-finite stops, validation, metrics."""

import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax.blocks import loop


def _step(state, batch):
    new = {"step": state["step"] + 1, "w": state["w"] + batch["x"]}
    return new, {"loss": jnp.sum(new["w"]), "vector": new["w"]}


def _batch(step):
    return {"x": jnp.full((2,), float(step))}  # a pure function of the step


def _state():
    return {"step": jnp.zeros((), jnp.int32), "w": jnp.zeros((2,))}


def _resumed(run, state, config, **kw):
    """The one resume protocol: restore through the run directory, then train from that step."""
    start, state = run.restore(state)
    return loop.train(state, _step, _batch, config, start=start, run=run, **kw)


def test_interrupted_run_resumes_to_the_same_state(tmp_path):
    config = {"steps": 7, "log_every": 2, "checkpoint_every": 3}
    straight = loop.train(_state(), _step, _batch, config, start=0)
    with loop.open_run(tmp_path, config) as run:
        first = _resumed(run, _state(), {**config, "stop_after": 4})
    assert first.stopped_early and first.step == 4 and first.steps_run == 4
    with loop.open_run(tmp_path, config) as run:
        assert run.checkpointer.all_steps() == [3, 4]  # the interval save and the stop save
        assert run.checkpointer.directory == str(tmp_path / "checkpoints")
        second = _resumed(run, _state(), config)
        assert run.checkpointer.latest_step == 7  # the last step is always saved
    assert (second.start, second.step, second.stopped_early) == (4, 7, False)
    np.testing.assert_array_equal(np.asarray(second.state["w"]), np.asarray(straight.state["w"]))
    assert sorted(second.history) == [6, 7]
    # Only scalars are logged; array metrics stay off the writer and the history.
    assert set(second.history[7]) == {"loss", "steps_per_s"} and second.history[7]["loss"] == 2 * sum(
        range(7)
    )


def test_non_finite_loss_names_step_and_last_good_checkpoint(tmp_path):
    def step(state, batch):
        new, out = _step(state, batch)
        return new, {"loss": jnp.where(new["step"] >= 5, jnp.nan, out["loss"])}

    config = {"steps": 10, "log_every": 3, "checkpoint_every": 2}
    with loop.open_run(tmp_path, config) as run:
        with pytest.raises(
            loop.NonFiniteLossError,
            match=rf"loss is nan at step 6; last good checkpoint: step 4 in {tmp_path / 'checkpoints'}",
        ):
            loop.train(_state(), step, _batch, config, start=0, run=run)


def test_validation_and_metrics_reach_tensorboard(tmp_path):
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    calls = []

    def validate(state, step):
        calls.append(step)
        return {"scalars": {"score": float(step)}, "images": {"grid": np.full((4, 8, 3), step, np.uint8)}}

    config = {"steps": 6, "log_every": 2, "validate_every": 4, "checkpoint_every": 0}
    with loop.open_run(tmp_path, config) as run:
        result = loop.train(
            _state(), _step, _batch, config, start=0, run=run, validate=validate, prefix="phase/"
        )
    assert calls == [4, 6] and result.validation == {4: {"score": 4.0}, 6: {"score": 6.0}}
    acc = loader.EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("phase/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("phase/steps_per_s")] == [2, 4, 6]
    assert [e.step for e in acc.Images("phase/val/grid")] == [4, 6]


def test_a_restored_state_compiles_to_the_program_of_a_fresh_one(tmp_path):
    """A checkpoint restores committed arrays; the step compiled for them is the fresh run's program
    (one persistent-cache entry for a run and its resumption), and it runs on both."""
    import jax

    fresh = _state()
    config = {"steps": 2, "log_every": 1, "checkpoint_every": 1}
    with loop.open_run(str(tmp_path / "run"), config) as run:
        loop.train(_state(), _step, _batch, config, start=0, run=run)
    with loop.open_run(str(tmp_path / "run"), config) as run:
        start, restored = run.restore(_state())
    assert start == 2 and restored["w"].committed and not fresh["w"].committed
    jitted = jax.jit(_step)
    lowered = [jitted.lower(s, _batch(0)).as_text() for s in (fresh, restored)]
    assert lowered[0] != lowered[1]  # as they are, the two lower to different programs
    compiled = [loop.compile_step(jitted, s, _batch(0)) for s in (fresh, restored)]
    assert compiled[0].as_text() == compiled[1].as_text()
    for c in compiled:
        np.testing.assert_array_equal(c(restored, _batch(2))[0]["w"], restored["w"] + 2.0)
        np.testing.assert_array_equal(c(fresh, _batch(2))[0]["w"], [2.0, 2.0])
