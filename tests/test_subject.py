"""The subject job through the real CLI: every adapter kind trains, checkpoints and resumes."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import cli_env

from hdb_jax.common import checkpoint

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _cli(workdir, model_dir, kind, steps, *extra, wait=True):
    args = [
        sys.executable,
        "-m",
        "hdb_jax.train",
        f"--config=configs/subject.py:tiny,adapter={kind}",
        f"--config.workdir={workdir}",
        f"--config.model.source={model_dir}",
        f"--config.steps={steps}",
        "--config.checkpoint_every=3",
        "--config.log_every=1",
        "--config.export.lora=False",
        "--config.export.sample_prompts=()",
        *extra,
    ]
    env = cli_env(PYTHONUNBUFFERED="1")
    if not wait:
        return subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _final_trainable(workdir):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=0, handle_sigterm=False)
    try:
        step, state = ckpt.restore(None)
    finally:
        ckpt.close()
    return step, state["trainable"]


@pytest.mark.parametrize("kind", ["lora", "kron", "residual"])
def test_cli_trains_checkpoints_and_resumes(kind, tmp_path, tiny_model_dir):
    workdir = tmp_path / kind
    out = _cli(workdir, tiny_model_dir, kind, 6)
    report = json.loads((workdir / "losses.json").read_text())
    # The fixed-batch denoising loss (4 fixed noise draws) went down over the run.
    assert report["eval"]["end"] < report["eval"]["start"], report
    ckpt_dir = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [3, 6]
    assert (workdir / "config.json").exists() and list((workdir / "tb").glob("events.out.tfevents.*"))
    assert "resumed" not in out

    out = _cli(workdir, tiny_model_dir, kind, 8)
    assert f"resumed from {ckpt_dir} at step 6" in out
    step, trainable = _final_trainable(workdir)
    assert step == 8 and set(trainable) == ({"unet"} if kind != "lora" else {"unet", "text_encoder"})


def test_kill_and_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    steps = 12
    _cli(tmp_path / "straight", tiny_model_dir, "lidb", steps)

    proc = _cli(tmp_path / "interrupted", tiny_model_dir, "lidb", steps, wait=False)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("compiled train step"):
            proc.send_signal(signal.SIGTERM)  # what a preempting scheduler sends
    assert proc.wait() == 0, "".join(lines)
    text = "".join(lines)
    assert "stopped at step" in text, text  # really interrupted, with a checkpoint
    stopped = int(text.split("stopped at step ")[1].split()[0])
    assert 0 < stopped < steps

    # The interrupted run exported nothing; the resumed one exports everything.
    assert not (tmp_path / "interrupted" / "personal.safetensors").exists()
    out = _cli(
        tmp_path / "interrupted",
        tiny_model_dir,
        "lidb",
        steps,
        "--config.export.lora=True",
        "--config.export.sample_prompts=('a sks face',)",
        "--config.export.sample_steps=2",
    )
    assert f"at step {stopped}" in out
    step_a, a = _final_trainable(tmp_path / "straight")
    step_b, b = _final_trainable(tmp_path / "interrupted")
    assert step_a == step_b == steps
    flat_a = {k: v for k, v in _flatten(a)}
    flat_b = {k: v for k, v in _flatten(b)}
    assert flat_a.keys() == flat_b.keys() and len(flat_a) == 2 * 40  # a_train, b_train x 40 layers
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)

    # Exports of the resumed run: personal weights (the checkpoint's values), LoRA file, grid.
    from PIL import Image

    from hdb_jax.formats import personal

    loaded = personal.load_personal(tmp_path / "interrupted" / "personal.safetensors", base_fingerprint=None)
    assert loaded.metadata["basis_hash"] and loaded.metadata["extra"]["steps"] == steps
    for component, tree in loaded.trainable.items():
        for path, factors in tree.items():
            for name, value in factors.items():
                np.testing.assert_array_equal(value, flat_b[f"{component}/{path}/{name}"])
    assert (tmp_path / "interrupted" / "lora.safetensors").stat().st_size > 0
    grid = Image.open(tmp_path / "interrupted" / "samples.png")
    assert grid.width >= 32 and grid.height >= 64  # personal row above base row


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", np.asarray(value)
