"""The main job at a reduced size, through the real entry point (retrains stages 1-2 at smoke size)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
from conftest import cli_env
from PIL import Image

from hdb_jax.eval import report as report_lib
from hdb_jax.formats import personal
from hdb_jax.jobs import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reduced_demo_writes_every_row_and_column(tmp_path):
    workdir = tmp_path / "demo"
    # One CPU device, as a user runs it (the suite's 8 fake devices would not divide its chunks).
    env = cli_env(devices=1)
    cmd = [sys.executable, "-m", "hdb_jax.train", "--config", "configs/demo.py:reduced"]
    cmd.append(f"--config.workdir={workdir}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    assert [r["row"] for r in report["rows"]] == list(demo.ROWS)
    n_ids, n_slow = len(report["identities"]), len(report["baseline_identities"])
    for row in report["rows"]:
        for metric in report_lib.METRICS:
            m = row[metric]
            assert np.isfinite(m["mean"]) and m["ci95"][0] <= m["mean"] <= m["ci95"][1], (row["row"], metric)
        assert row["identities"] == (n_slow if row["row"] in demo.demo_methods.SLOW_ROWS else n_ids)
        assert -1.0 <= row["identity"]["mean"] <= 1.0
        assert 0.0 <= row["prior_realism"]["mean"] <= 1.0
    by_row = {r["row"]: r for r in report["rows"]}
    assert by_row["base"]["steps"] == 0 and by_row["hypernet"]["steps"] == 0
    assert by_row["hypernet+finetune"]["steps"] == report["finetune"]["steps"]
    assert by_row["hypernet+finetune@10"]["steps"] == 10
    # The three bars compare the rows they name, with the numbers in the rows.
    bar = report["bars"]["hypernet_vs_base"]
    assert bar["hypernet"] == by_row["hypernet"]["identity"]["mean"]
    assert bar["base"] == by_row["base"]["identity"]["mean"]
    assert bar["higher"] == (bar["hypernet"] > bar["base"])
    assert set(report["bars"]) == {
        "hypernet_vs_base",
        "hypernet+finetune_vs_zero@10",
        "hypernet+finetune_vs_zero@40",
        "hypernet+finetune_vs_lora_dreambooth",
    }
    vs_lora = report["bars"]["hypernet+finetune_vs_lora_dreambooth"]
    assert vs_lora["identities"] == report["baseline_identities"]
    assert vs_lora["fewer_steps"] == by_row["lora_dreambooth"]["steps"] / by_row["hypernet+finetune"]["steps"]
    # Stages ran in order and left their outputs: weights dataset, hypernetwork bundle, personal files.
    assert (workdir / "preopt" / "index.jsonl").read_text().count("\n") == 4
    assert (workdir / "hypernet" / "hypernet" / "hypernet.safetensors").is_file()
    ident = report["identities"][0]
    path = workdir / "personal" / "hypernet+finetune" / str(ident) / "personal.safetensors"
    loaded = personal.load_personal(path, base_fingerprint=None)
    assert loaded.metadata["extra"] == {
        "identity": ident,
        "row": "hypernet+finetune",
        "steps": report["finetune"]["steps"],
    }
    # Grid: per grid identity one row per prompt; the reference, then one sample of every row.
    grid = np.asarray(Image.open(report["grid"]))
    assert grid.shape == (32 * len(report["prompts"]), 32 * (1 + len(demo.ROWS)), 3)
    table = (workdir / "report.md").read_text()
    assert all(f"| {r} |" in table for r in demo.ROWS)
    # A rerun reads every score from the cache: nothing is personalised again.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r": identity \d+ \(", proc.stdout) is None, proc.stdout[-2000:]
    assert json.loads((workdir / "report.json").read_text())["rows"] == report["rows"]


def test_the_evaluated_bundle_follows_retrain_at_run_time():
    from conftest import load_config

    from hdb_jax.toy import hypernet_dir

    config = load_config("demo")
    assert demo.bundle_path(config) == os.fspath(hypernet_dir())  # the shipped hypernetwork
    config.retrain = True  # what --config.retrain=True does: the bundle stage 2 writes is evaluated
    config.workdir = "/tmp/elsewhere"
    assert demo.bundle_path(config) == "/tmp/elsewhere/hypernet/hypernet"
    config.personalize.bundle = "/ckpt/mine"  # an explicit bundle wins
    assert demo.bundle_path(config) == "/ckpt/mine"
