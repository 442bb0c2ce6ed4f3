"""The training step and the entry point's config handling."""

import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from hdb_jax.blocks import build
from hdb_jax.stages import subject

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_train_step_traces_once_and_keeps_base_frozen(tiny_sd, tiny_params):
    config = load_config("subject", "tiny,adapter=lidb")
    adapters = build.adapters(config.adapter, tiny_params)
    trainable = {c: a.init(jax.random.PRNGKey(0)) for c, a in adapters.items()}
    basis = {c: a.basis(jax.random.PRNGKey(1)) for c, a in adapters.items()}
    optimizer = build.optimizer(config.optim, config.steps)
    step = subject.make_train_step(
        tiny_sd, adapters, optimizer, wrap=functools.partial(chex.assert_max_traces, n=1)
    )
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}
    frozen = {"params": tiny_params, "basis": basis}
    images = jax.random.uniform(jax.random.PRNGKey(2), (2, 32, 32, 3), minval=-1, maxval=1)
    batch = {
        "images": images,
        "input_ids": jnp.asarray(tiny_sd.tokenize(["a sks face"] * 2)),
        "weights": jnp.full((2,), 0.5),
    }
    before = jax.tree_util.tree_map(np.asarray, tiny_params)
    for _ in range(3):
        state, metrics = step(state, frozen, batch, jax.random.PRNGKey(3))
    # chex.assert_max_traces(n=1) raised on a second trace: three steps, one trace.
    assert int(state["step"]) == 3 and np.isfinite(float(metrics["loss"]))
    # B_train starts at zero; after three AdamW steps every layer's B_train has moved.
    for tree in state["trainable"].values():
        for factors in tree.values():
            assert float(jnp.abs(factors["b_train"]).max()) > 0
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(tiny_params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_prior_preservation_batch_weights():
    rng = np.random.default_rng(0)
    data = subject.SubjectData(
        images=rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32),
        input_ids=np.arange(5),
        class_images=rng.uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32),
        class_ids=np.arange(5, 10),
        prior_weight=0.5,
        flip=True,
    )
    batch = data.batch(seed=0, step=4, batch_size=4)
    assert batch["images"].shape == (8, 8, 8, 3)
    np.testing.assert_allclose(batch["weights"], [0.25] * 4 + [0.125] * 4)
    np.testing.assert_array_equal(batch["input_ids"][:4], np.tile(np.arange(5), (4, 1)))
    np.testing.assert_array_equal(batch["input_ids"][4:], np.tile(np.arange(5, 10), (4, 1)))
    # A pure function of (seed, step): the basis of exact resume.
    again = data.batch(seed=0, step=4, batch_size=4)
    np.testing.assert_array_equal(batch["images"], again["images"])
    assert not np.array_equal(batch["images"], data.batch(seed=0, step=5, batch_size=4)["images"])


@pytest.mark.parametrize(
    "args, named",
    [
        (["--config", "configs/subject.py:tiny", "--config.optim.lerning_rate=1"], "lerning_rate"),
        (["--config", "configs/subject.py:tinny"], "tinny"),
        (["--config", "configs/no_such_experiment.py"], "no_such_experiment.py"),
    ],
)
def test_unknown_config_key_is_named(args, named):
    proc = subprocess.run(
        [sys.executable, "-m", "hdb_jax.train", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "HDB_DEBUG"},
    )
    # One ``error:`` line naming the key, knob or file, exit code 2, no traceback (hdb_jax.jobs.cli).
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and named in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_unknown_knob_and_kind_are_refused():
    with pytest.raises(ValueError, match=r"unknown config knobs \['tinny'\]"):
        load_config("subject", "tinny")
    with pytest.raises(ValueError, match="adapter='dora'"):
        load_config("subject", "adapter=dora")


def _imported(stderr: str) -> set[str]:
    """Module names in ``python -X importtime`` output."""
    return {ln.rsplit("|", 1)[-1].strip() for ln in stderr.splitlines() if ln.startswith("import time:")}


def test_command_lines_start_without_pytorch():
    """diffusers imports torch whenever it is installed; our command lines skip it (seconds per start)."""
    pytest.importorskip("torch")
    # hdb_jax.personalize and hdb_jax.sample start the same way (their entry modules call skip_torch).
    cmd = [sys.executable, "-X", "importtime", "-m", "hdb_jax.train", "--config", "configs/subject.py:tinny"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]  # the bad knob: after every import
    imported = _imported(proc.stderr)
    assert "diffusers" in imported and "torch.nn" not in imported  # (the refused "torch" is listed)
    # The same imports outside a command line load torch: the check sees what it looks for.
    plain = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import hdb_jax.jobs.cli"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert plain.returncode == 0 and "torch.nn" in _imported(plain.stderr)
