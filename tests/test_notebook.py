"""notebooks/sample.ipynb personalises a face with the shipped hypernetwork and samples it, top to bottom."""

import os
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from hdb_jax.toy import hypernet_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
    not (hypernet_dir() / "hypernet.safetensors").is_file(), reason="no shipped hypernetwork bundle"
)
def test_notebook_personalises_and_samples(tmp_path):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "sample.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(re.search(r"^\s*(def|class) ", c.source, re.M) for c in code)  # cells only use the library
    # Faster sampling and finetune than the notebook's defaults; everything else runs as a user would run it.
    settings = next(c for c in code if "STEPS, GUIDANCE" in c.source)
    settings.source = settings.source.replace("STEPS, GUIDANCE = 20, 3.0", "STEPS, GUIDANCE = 4, 3.0")
    settings.source += "\nconfig.relax.steps = 4\nconfig.compile_cache = ''\n"
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    grid = np.asarray(Image.open(tmp_path / "runs" / "notebook" / "grid.png"))
    # Rows: 3 models x 4 prompts; columns: the reference, then 3 seeds of 32 px.
    assert grid.shape == (3 * 4 * 32, 4 * 32, 3)
    printed = "".join(
        o.get("text", "") for c in code for o in c.get("outputs", []) if o.output_type == "stream"
    )
    scores = dict(re.findall(r"(\S+): identity similarity (-?[0-9.]+)", printed))
    assert set(scores) == {"base", "hypernet", "hypernet+finetune"}
    rows = grid.reshape(3, 4, 32, 4, 32, 3)[:, :, :, 1:].astype(np.float32)  # samples only
    assert np.abs(rows[0] - rows[2]).mean() > 1.0  # the personal model draws something else than the base
