"""A reduced sweep writes its points, resumes without recomputing them, and plots one series per setting."""

import json

import numpy as np
from conftest import load_config
from PIL import Image
from test_personalize import write_bundle

from hdb_jax.blocks import build
from hdb_jax.jobs import sweep


def test_two_point_sweep_resumes_and_plots(tmp_path):
    config = load_config("sweep", "relax,reduced")
    config.workdir = str(tmp_path)
    _, params = build.base_model(config.personalize.model)
    config.personalize.bundle = str(write_bundle(tmp_path / "bundle", params))
    config.personalize.relax.batch_size = 2
    first = sweep.run(config)
    assert first["computed_now"] == 2 and [p["point"]["x"] for p in first["points"]] == [0, 2]
    files = sorted((tmp_path / "relax" / "points").glob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    second = sweep.run(config)
    assert (
        second["computed_now"] == 0 and [f.stat().st_mtime_ns for f in files] == stamps
    )  # nothing recomputed
    saved = json.loads((tmp_path / "relax" / "sweep.json").read_text())
    assert saved["series"]["identity"] == ["rank=2, variant=fresh"]  # one series per setting besides x
    for metric in sweep.METRICS:
        png = np.asarray(Image.open(tmp_path / "relax" / f"{metric}.png"))
        assert png.ndim == 3 and png.shape[0] > 100
    point = saved["points"][1]
    assert (
        -1 <= point["identity"]["ci95"][0] <= point["identity"]["mean"] <= point["identity"]["ci95"][1] <= 1
    )
    assert "| point | identity |" in (tmp_path / "relax" / "summary.md").read_text()
