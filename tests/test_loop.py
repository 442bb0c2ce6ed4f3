"""The shared training loop: resume, stop_after, non-finite stops, validation, metrics."""

import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import checkpoint, loop, metrics


def _step(state, batch):
    new = {"step": state["step"] + 1, "w": state["w"] + batch["x"]}
    return new, {"loss": jnp.sum(new["w"]), "vector": new["w"]}


def _batch(step):
    return {"x": jnp.full((2,), float(step))}  # a pure function of the step


def _state():
    return {"step": jnp.zeros((), jnp.int32), "w": jnp.zeros((2,))}


def test_interrupted_run_resumes_to_the_same_state(tmp_path):
    straight = loop.train(_state(), _step, _batch, steps=7, log_every=2)
    with checkpoint.Checkpointer(tmp_path, every=3) as ckpt:
        first = loop.train(_state(), _step, _batch, steps=7, checkpointer=ckpt, stop_after=4, log_every=2)
    assert first.stopped_early and first.step == 4 and first.steps_run == 4
    with checkpoint.Checkpointer(tmp_path, every=3) as ckpt:
        assert ckpt.all_steps() == [3, 4]  # the interval save and the stop save
        second = loop.train(_state(), _step, _batch, steps=7, checkpointer=ckpt, log_every=2)
        assert ckpt.latest_step == 7  # the last step is always saved
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

    with checkpoint.Checkpointer(tmp_path, every=2) as ckpt:
        with pytest.raises(
            loop.NonFiniteLossError,
            match=rf"loss is nan at step 6; last good checkpoint: step 4 in {tmp_path}",
        ):
            loop.train(_state(), step, _batch, steps=10, checkpointer=ckpt, log_every=3)


def test_validation_and_metrics_reach_tensorboard(tmp_path):
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    calls = []

    def validate(state, step):
        calls.append(step)
        return {"scalars": {"score": float(step)}, "images": {"grid": np.full((4, 8, 3), step, np.uint8)}}

    with metrics.Writer(tmp_path) as writer:
        result = loop.train(
            _state(),
            _step,
            _batch,
            steps=6,
            writer=writer,
            log_every=2,
            validate=validate,
            validate_every=4,
            prefix="phase/",
        )
    assert calls == [4, 6] and result.validation == {4: {"score": 4.0}, 6: {"score": 6.0}}
    acc = loader.EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("phase/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("phase/steps_per_s")] == [2, 4, 6]
    assert [e.step for e in acc.Images("phase/val/grid")] == [4, 6]
