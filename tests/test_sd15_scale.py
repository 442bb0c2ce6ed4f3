"""The SD 1.5 scale benchmark, run end to end on the tiny shapes (``--reduced``).

``benchmarks/sd15_scale.py --reduced`` goes through the same code as the SD 1.5 run: a PyTorch-written
model and CLIP vision directory, then load, subject training, pre-optimisation, hypernetwork training,
personalisation and the PyTorch diffusers LoRA check, each in its own process. Nothing is asserted on
time; we check that every stage ran and reported its figures, and that PyTorch diffusers, loading our
exported LoRA, computes what our merged model computes.
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "sd15_scale.py")
STAGES = ("load", "subject", "preopt", "hypernet", "personalize", "torch_lora")


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_reduced_benchmark_reports_every_stage(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, SCRIPT, "--reduced", "--work", str(tmp_path / "work"), "--out", str(out)]
    cmd += ["--finetune-steps", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "peak RSS MiB" in proc.stdout  # the table was printed

    result = json.loads(out.read_text())
    assert result["reduced"] and result["shapes"] == "tiny" and result["failed"] is None
    assert tuple(result["order"]) == STAGES
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["jax"] and machine["cpu"] and machine["date"]
    stages = result["stages"]
    for name in STAGES:
        record = stages[name]
        assert record["rc"] == 0, name
        assert _finite_positive(record["seconds"]), (name, record["seconds"])
        assert _finite_positive(record["peak_rss_mib"]), (name, record["peak_rss_mib"])
    for name in ("subject", "preopt", "hypernet", "personalize"):
        assert _finite_positive(stages[name]["compile_s"]), name
        assert _finite_positive(stages[name]["step_s"]), name
    assert _finite_positive(stages["load"]["load_s"])

    c = stages["torch_lora"]["comparison"]
    assert _finite_positive(c["output_scale"])
    assert c["max_abs_diff"] <= 1e-3 * c["output_scale"], c
    assert c["within_tolerance"]
    assert c["lora_layers"] == c["our_layers"] > 0  # every adapted layer got its LoRA in PyTorch
    # Not vacuous: the LoRA moves PyTorch's output by more than the difference we accept.
    assert c["lora_effect"] > c["max_abs_diff"]
    assert os.path.isfile(c["lora_file"]) and c["lora_file"].endswith(".safetensors")
    assert c["text_max_abs_diff"] <= 1e-3 * c["text_scale"], c

    # --resume after a finished run: no stage runs again, every record is the one written.
    again = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == len(STAGES), again.stdout
    resumed = json.loads(out.read_text())["stages"]
    assert all(resumed[n]["seconds"] == stages[n]["seconds"] for n in STAGES)


def test_reduced_run_never_overwrites_the_committed_results(tmp_path):
    committed = os.path.join(ROOT, "benchmarks", "results", "sd15_scale.json")
    cmd = [sys.executable, SCRIPT, "--reduced", "--work", str(tmp_path), "--out", committed]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "never writes the committed" in proc.stderr
    assert not os.listdir(tmp_path)  # refused before anything was written
