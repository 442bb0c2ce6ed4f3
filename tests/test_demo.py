"""The embedded default job at a reduced size, through the real entry point."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from hdb_jax import demo, personal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reduced_demo_writes_the_four_ablation_rows(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hdb_jax.train",
            "--config",
            "configs/demo.py:reduced",
            f"--config.workdir={workdir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    assert [r["row"] for r in report["rows"]] == list(demo.ROWS)
    for row in report["rows"]:
        assert np.isfinite(row["heldout_loss"]) and -1.0 <= row["identity_score"] <= 1.0
    assert (
        report["reference_scores"]["same_identity_render"] > 0.8
    )  # the score's scale: real renders of one face
    # Stages ran in order and left their outputs: weights dataset, hypernetwork bundle, personal files.
    assert (workdir / "preopt" / "index.jsonl").read_text().count("\n") == 8
    assert (workdir / "hypernet" / "hypernet" / "hypernet.safetensors").is_file()
    ident = report["identities"][0]
    loaded = personal.load_personal(
        workdir / "personal" / str(ident) / "personal.safetensors", base_fingerprint=None
    )
    assert loaded.metadata["extra"]["identity"] == ident
    # Grid: one row per identity; reference + 2 seeds x 4 rows = 9 columns of 32 px.
    grid = np.asarray(Image.open(report["grid"]))
    assert grid.shape == (32 * len(report["identities"]), 32 * 9, 3)
    assert "hypernet+finetune" in proc.stdout  # the printed table
