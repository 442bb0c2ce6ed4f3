"""The real entry point on the tiny demo config: training moves only the adapters, traced once."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import train


@pytest.fixture(scope="module")
def demo_config():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import demo  # configs/demo.py

    config = demo.get_config("adapter=lidb")
    config.steps = 3
    config.log_every = 1
    return config, demo


def test_demo_job_trains_adapters(demo_config, capsys):
    config, _ = demo_config
    result = train.run(config)
    out = capsys.readouterr().out
    assert len(result["losses"]) == 3 and all(np.isfinite(result["losses"]))
    # LiDB a=16 b=8 r=1 on 32 UNet + 8 text attention matrices: 40 x 24 trainable scalars.
    assert result["num_params"] == 40 * 24
    state = result["state"]
    assert int(state["step"]) == 3
    # B_train starts at zero; after three AdamW steps every layer's B_train has moved.
    for component in ("unet", "text_encoder"):
        for factors in state["trainable"][component].values():
            assert float(jnp.abs(factors["b_train"]).max()) > 0
    assert "LiDB a=100 b=50 r=1: UNet + text attention       176      26,400       105,600" in out


def test_train_step_traces_once_and_keeps_base_frozen(demo_config, tiny_sd, tiny_params):
    config, _ = demo_config
    adapters = train.build_adapters(config, tiny_params)
    trainable = {c: a.init(jax.random.PRNGKey(0)) for c, a in adapters.items()}
    basis = {c: a.basis(jax.random.PRNGKey(1)) for c, a in adapters.items()}
    optimizer = train.make_optimizer(config)
    step = train.make_train_step(tiny_sd, adapters, optimizer)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}
    frozen = {"params": tiny_params, "basis": basis}
    images = jax.random.uniform(jax.random.PRNGKey(2), (2, 32, 32, 3), minval=-1, maxval=1)
    batch = {"images": images, "input_ids": jnp.asarray(tiny_sd.tokenize(["a sks face"] * 2))}
    before = jax.tree_util.tree_map(np.asarray, tiny_params)
    for _ in range(3):
        state, metrics = step(state, frozen, batch, jax.random.PRNGKey(3))
    assert step._cache_size() == 1  # one trace for three steps
    assert int(state["step"]) == 3
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(tiny_params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_unknown_config_key_is_named():
    proc = subprocess.run(
        [sys.executable, "-m", "hdb_jax.train", "--config", "configs/demo.py", "--config.optim.lerning_rate=1"],
        capture_output=True, text=True, cwd=os.path.join(os.path.dirname(__file__), ".."),
    )
    assert proc.returncode != 0
    assert "lerning_rate" in proc.stderr


def test_unknown_adapter_kind_is_refused(demo_config):
    _, demo = demo_config
    config = demo.get_config("adapter=dora")
    with pytest.raises(ValueError, match="config.adapter.kind='dora'"):
        train.build_adapters(config, {"unet": {}, "text_encoder": {}})
