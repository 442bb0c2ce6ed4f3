"""The hypernetwork step on different meshes, processes and restores gives the same numbers."""

import functools
import os
import re
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli_env, load_config
from jax.sharding import PartitionSpec as P

from hdb_jax.blocks import build
from hdb_jax.common import checkpoint, sharding
from hdb_jax.hypernet.model import split_params
from hdb_jax.stages import hypernet as ht

ROOT = os.path.join(os.path.dirname(__file__), "..")

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@pytest.fixture(scope="module")
def parts(tiny_sd, tiny_params):
    config = load_config("hypernet", "tiny")
    config.batch_size = 8
    adapters = build.adapters(config.adapter, tiny_params)
    net, init = ht._hypernet(config, adapters)
    optimizer = build.optimizer(config.optim, config.steps)
    trainable, frozen_h = split_params(net, init(jax.random.PRNGKey(0)))
    basis = {c: a.basis(jax.random.PRNGKey(1)) for c, a in adapters.items()}
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}
    frozen = {"params": tiny_params, "basis": basis, "hyper": frozen_h}
    rng = np.random.default_rng(0)
    n_tok = len(ht.dec.token_layout(adapters))
    batch = {
        "images": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
        "targets": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
        "input_ids": np.stack([tiny_sd.tokenize(["a sks face"])[0]] * 8),
        "target_tokens": rng.normal(0, 0.01, (8, n_tok, 24)).astype(np.float32),
        "has_target": np.array([1, 1, 1, 1, 0, 0, 1, 1], np.float32),
    }
    return config, tiny_sd, net, adapters, optimizer, state, frozen, batch


def _run_on(mesh_axes, parts, steps=2):
    config, sd, net, adapters, optimizer, state, frozen, batch = parts
    mesh = sharding.make_mesh(mesh_axes)
    chex.clear_trace_counter()  # each mesh compiles its own program, once
    abstract_state = jax.eval_shape(lambda: state)
    step, state_sh, frozen_sh, data_sh = ht.sharded_step(
        config,
        sd,
        net,
        adapters,
        optimizer,
        mesh,
        abstract_state,
        jax.eval_shape(lambda: frozen),
        wrap=functools.partial(chex.assert_max_traces, n=1),  # one trace for every step
    )
    s = jax.device_put(jax.tree_util.tree_map(jnp.copy, state), state_sh)
    f = jax.device_put(frozen, frozen_sh)
    b = sharding.global_batch(lambda rows: {k: v[rows] for k, v in batch.items()}, 8, mesh)
    losses = []
    for _ in range(steps):
        s, out = step(s, f, b, jax.random.PRNGKey(3))
        losses.append(float(out["loss"]))
    return losses, jax.device_get(s["trainable"]), s, f, b


def test_same_numbers_on_every_mesh(parts):
    ref_losses, ref_params, *_ = _run_on({"data": 1}, parts)
    for axes in ({"data": 8}, {"data": 4, "fsdp": 2}):
        losses, params, state, frozen, batch = _run_on(axes, parts)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert batch["images"].sharding.spec == P(tuple(axes))
        if "fsdp" in axes:
            specs = sharding.describe(state["trainable"])
            specs.update({"sd/" + k: v for k, v in sharding.describe(frozen["params"]).items()})
            # FSDP splits each kernel's largest divisible dimension; biases stay replicated.
            assert specs["decoder/blocks_0/cross_attn/query/kernel"] == str(P("fsdp", None, None))
            assert specs["decoder/blocks_0/cross_attn/query/bias"] == str(P())
            unet_q = "sd/unet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel"
            assert specs[unet_q] == str(P("fsdp", None))
            assert state["trainable"]["decoder"]["blocks_0"]["cross_attn"]["query"][
                "kernel"
            ].sharding.spec == P("fsdp", None, None)


def test_weight_regression_only_skips_the_unet(parts):
    config, sd, net, adapters, optimizer, state, frozen, batch = parts
    key = jax.random.PRNGKey(3)

    def jaxpr(alpha):
        step = ht.make_step(sd, net, adapters, optimizer, alpha, config.loss.beta)
        return str(jax.make_jaxpr(step)(state, frozen, batch, key))

    # The UNet and VAE are not traced at all: only the image encoder's patch embedding convolves.
    convs = jaxpr(0.0).count("conv_general_dilated")
    assert jaxpr(1.0).count("conv_general_dilated") > convs + 10 and convs <= 2
    regress_only = jax.jit(ht.make_step(sd, net, adapters, optimizer, 0.0, config.loss.beta))
    out0 = regress_only(jax.tree_util.tree_map(jnp.copy, state), frozen, batch, key)[1]
    assert float(out0["denoise"]) == 0.0
    np.testing.assert_allclose(float(out0["loss"]), config.loss.beta * float(out0["regress"]), rtol=1e-6)
    # A warm-up of 2 regression-only steps: one program, the UNet runs from step 2 on. Its first
    # step is the alpha = 0 step: the regression term does not depend on alpha.
    warm = jax.jit(ht.make_step(sd, net, adapters, optimizer, 1.0, config.loss.beta, regress_only_steps=2))
    s = jax.tree_util.tree_map(jnp.copy, state)
    denoise = []
    for _ in range(3):
        s, out = warm(s, frozen, batch, key)
        denoise.append(float(out["denoise"]))
        if len(denoise) == 1:
            np.testing.assert_allclose(float(out["loss"]), float(out0["loss"]), rtol=1e-6)
            np.testing.assert_allclose(float(out["regress"]), float(out0["regress"]), rtol=1e-6)
    assert denoise[:2] == [0.0, 0.0] and denoise[2] > 0.0


def test_restore_on_a_different_mesh(parts, tmp_path):
    _, _, _, _, _, state, _, _ = parts
    rules = ((r".*kernel", "fsdp"),)
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 4})
    saved = jax.device_put(state, sharding.tree_shardings(state, mesh8, rules))
    with checkpoint.Checkpointer(tmp_path, every=1, handle_sigterm=False) as ckpt:
        ckpt.save(5, saved, {"mesh": "2x4"})
    mesh4 = sharding.make_mesh({"data": 2, "fsdp": 2})  # four devices
    target_sh = sharding.tree_shardings(state, mesh4, rules)
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, target_sh
    )
    with checkpoint.Checkpointer(tmp_path, every=1, handle_sigterm=False) as ckpt:
        step, restored = ckpt.restore(target)
    assert step == 5
    for a, b, sh in zip(
        jax.tree_util.tree_leaves(restored),
        jax.tree_util.tree_leaves(state),
        jax.tree_util.tree_leaves(target_sh),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == sh and len(a.sharding.device_set) in (1, 4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, extra=()):
    return [
        sys.executable,
        "-m",
        "hdb_jax.train",
        "--config=configs/hypernet.py:tiny",
        f"--config.workdir={workdir}",
        "--config.steps=3",
        "--config.checkpoint_every=3",
        "--config.batch_size=8",
        "--config.data.heldout=()",
        "--config.mesh.data=-1",
        *extra,
    ]


def test_two_processes_match_one(tmp_path):
    env8 = cli_env(8, HDB_DISTRIBUTED="0", PYTHON=sys.executable)
    single = subprocess.run(_cmd(tmp_path / "one"), cwd=ROOT, env=env8, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    env4 = cli_env(4)
    procs = [
        subprocess.Popen(
            _cmd(
                tmp_path / "two",
                [
                    f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                    "--config.distributed.num_processes=2",
                    f"--config.distributed.process_id={i}",
                ],
            ),
            cwd=ROOT,
            env=env4,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert '"processes": 2' in outs[0] and '"devices": 8' in outs[0]

    def final(workdir):
        with checkpoint.Checkpointer(workdir / "checkpoints", every=0, handle_sigterm=False) as ckpt:
            return ckpt.restore(None)

    (s1, a), (s2, b) = final(tmp_path / "one"), final(tmp_path / "two")
    assert s1 == s2 == 3
    for x, y in zip(jax.tree_util.tree_leaves(a["trainable"]), jax.tree_util.tree_leaves(b["trainable"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_global_batch_rows_do_not_depend_on_device_order():
    data = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    loaded = []

    def load(rows):
        loaded.append(rows)
        return {k: v[rows] for k, v in data.items()}

    for devices in (jax.devices(), jax.devices()[::-1]):
        mesh = sharding.make_mesh({"data": 2, "fsdp": 4}, devices=devices)
        out = sharding.global_batch(load, 16, mesh)
        np.testing.assert_array_equal(np.asarray(out["x"]), data["x"])
        assert out["x"].sharding.spec == P(("data", "fsdp"))
    # One process holds every device here, so it loads every row, each once.
    assert all(sorted(r.tolist()) == list(range(16)) for r in loaded)


def test_launch_script_dry_run_builds_mesh_and_compiles(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        CONFIG="configs/hypernet.py:tiny",
        HDB_DISTRIBUTED="0",
        PYTHON=sys.executable,
    )
    proc = subprocess.run(
        ["bash", "launch/gpu_host.sh", str(tmp_path / "dry"), "--dry_run", "--config.mesh.fsdp=2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"mesh": {"data": 4, "fsdp": 2}' in proc.stdout and '"devices": 8' in proc.stdout
    assert "trainable/decoder/blocks_0/cross_attn/key/kernel: P('fsdp', None, None)" in proc.stdout
    assert re.search(r"per device: peak \d+\.\d+ GiB, .* collectives send \d+\.\d+ GiB", proc.stdout)
    assert not (tmp_path / "dry").exists()  # shapes only: nothing trained or written
