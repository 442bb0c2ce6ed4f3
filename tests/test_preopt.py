"""Batched LiDB pre-optimisation: per-identity independence, progress, and exact-once resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
from conftest import load_config

from hdb_jax.blocks import build
from hdb_jax.data import weights

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_clipping_is_per_identity():
    grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}  # identity norms 5 and 0.5
    clipped, _ = build.clip_per_row(1.0).update(grads, None)
    np.testing.assert_allclose(clipped["w"], [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)


def _cmd(workdir, model_dir):
    return [
        sys.executable,
        "-m",
        "hdb_jax.train",
        "--config=configs/preopt.py:tiny",
        f"--config.workdir={workdir}",
        f"--config.model.source={model_dir}",
        "--config.data.identities=(3,5,8,13)",
        "--config.chunk_size=2",
        "--config.mesh.data=2",
        "--config.steps=8",
    ]


def test_preopt_kill_resume_every_identity_once(tmp_path, tiny_model_dir):
    workdir = tmp_path / "preopt"
    index = workdir / "index.jsonl"
    proc = subprocess.Popen(
        _cmd(workdir, tiny_model_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if index.exists() and index.read_text().count("\n") >= 2:
            proc.send_signal(signal.SIGKILL)  # a hard kill between (or inside) chunks
            break
        time.sleep(0.2)
    proc.wait()
    first = [json.loads(line) for line in index.read_text().splitlines()]
    assert 2 <= len(first) < 4, "the run should have been killed part-way"

    out = subprocess.run(_cmd(workdir, tiny_model_dir), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{len(first)} identities already done, {4 - len(first)} to pre-optimise" in out.stdout
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    assert sorted(r["identity"] for r in rows) == [3, 5, 8, 13]  # each exactly once
    for row in rows:  # the fixed-draw denoising loss went down for every identity
        assert row["final_loss"] < row["loss_before"], row
    assert not list(workdir.glob("*.tmp"))

    loaded_rows, trees = weights.load(workdir)
    assert [r["identity"] for r in loaded_rows] == [r["identity"] for r in rows]
    b_train = [f["b_train"] for tree in trees.values() for f in tree.values()]
    assert b_train and all(v.shape[0] == 4 and np.abs(v).max() > 0 for v in b_train)
    # Each chunk keeps its own file, and every identity's row holds its own weights.
    assert len({r["chunk"] for r in rows}) == 2 and len({(r["chunk"], r["row"]) for r in rows}) == 4
    stacked = np.concatenate([v.reshape(4, -1) for v in b_train], axis=1)
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(stacked[i] - stacked[j]).max() > 1e-6, (i, j)

    again = subprocess.run(_cmd(workdir, tiny_model_dir), cwd=ROOT, capture_output=True, text=True)
    assert "4 identities already done, 0 to pre-optimise" in again.stdout

    # Stage 2 on these weights: the hypernetwork's predictions beat zero weights on held-out faces.
    hyper = subprocess.run(
        [
            sys.executable,
            "-m",
            "hdb_jax.train",
            "--config=configs/hypernet.py:tiny",
            f"--config.workdir={tmp_path / 'hyper'}",
            f"--config.model.source={tiny_model_dir}",
            f"--config.data.preopt_dir={workdir}",
            "--config.steps=16",
            "--config.batch_size=8",
            "--config.mesh.data=1",  # one device: sharding is test_hypernet_sharding's
            "--config.data.heldout=(901,902,903,904)",
            "--config.adapter.basis_file=" + str(workdir / "lidb_basis.safetensors"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert hyper.returncode == 0, hyper.stderr[-3000:]
    heldout = json.loads((tmp_path / "hyper" / "heldout.json").read_text())
    assert heldout["predicted"] < heldout["zero"], heldout


def test_duplicated_identity_gets_the_same_targets_anywhere(tmp_path):
    from hdb_jax.blocks import build
    from hdb_jax.stages import preopt as preopt_lib

    config = load_config("preopt", "tiny")
    config.workdir, config.chunk_size, config.steps = str(tmp_path / "dup"), 2, 5
    config.data.identities = (11, 7, 7, 12)  # identity 7 at row 1 of chunk 0 and row 0 of chunk 1
    config.mesh.data = 1
    sd, params = build.base_model(config.model)
    preopt_lib.train(config, sd, params)
    rows, trees = weights.load(config.workdir)
    assert [(r["identity"], r["chunk"], r["row"]) for r in rows][1:3] == [
        (7, "chunk_00000.safetensors", 1),
        (7, "chunk_00001.safetensors", 0),
    ]
    for component, tree in trees.items():
        for path, factors in tree.items():
            for name, x in factors.items():
                np.testing.assert_allclose(
                    x[1], x[2], atol=1e-6, rtol=0, err_msg=f"{component}/{path}/{name}"
                )
    moved = max(float(np.abs(f["b_train"][1]).max()) for t in trees.values() for f in t.values())
    others = max(
        float(np.abs(f["b_train"][0] - f["b_train"][1]).max()) for t in trees.values() for f in t.values()
    )
    assert moved > 1e-3 and others > 1e-4  # the targets moved, and another identity's differ


def test_frozen_factor_and_several_samples_per_step_keep_targets_a_function_of_the_identity(tmp_path):
    """``a_train`` held at the shared init, two samples per step, and another noise seed."""
    from hdb_jax.blocks import build
    from hdb_jax.stages import preopt as preopt_lib

    def run(name, identities, noise_seed):
        config = load_config("preopt", "tiny")
        config.workdir, config.chunk_size, config.steps = str(tmp_path / name), 2, 4
        config.data.identities, config.mesh.data = identities, 1
        config.samples_per_step, config.frozen_factors, config.noise_seed = 2, ("a_train",), noise_seed
        config.adapter.basis_file = str(tmp_path / "basis.safetensors")
        sd, params = build.base_model(config.model)
        preopt_lib.train(config, sd, params)
        return weights.load(config.workdir)[1]

    trees = run("a", (11, 7, 7, 12), 0)
    again = run("b", (7,), 1)  # identity 7 again, other views / noise / timesteps
    for component, tree in trees.items():
        for path, f in tree.items():
            a, b = f["a_train"], f["b_train"]
            # a_train never moved: every identity holds the shared init, bit for bit.
            assert np.array_equal(a, np.broadcast_to(a[0], a.shape)), f"{component}/{path}"
            assert np.array_equal(again[component][path]["a_train"][0], a[0])
            np.testing.assert_allclose(b[1], b[2], atol=1e-6, rtol=0)  # the duplicate, wherever it sits
    b_all = lambda t: np.concatenate(
        [f["b_train"].reshape(len(f["b_train"]), -1) for c in t.values() for f in c.values()], 1
    )  # noqa: E731
    first, second = b_all(trees), b_all(again)
    assert np.abs(first).max() > 1e-3
    assert np.abs(first[1] - second[0]).max() > 1e-4  # the noise seed changed the draws


def test_frozen_factors_names_must_exist():
    import pytest

    from hdb_jax.stages import preopt as preopt_lib

    tree = {"unet": {"x": {"a_train": jnp.zeros(2), "b_train": jnp.zeros(2)}}}
    with pytest.raises(ValueError, match=r"\['down'\] not among \['a_train', 'b_train'\]"):
        preopt_lib.freeze_factors(build.optimizer(load_config("preopt", "tiny").optim), tree, ("down",))
