"""The prepared GPU benchmark, checked on CPU: its reduced run, its JSON, and gpu.sh's dry run.

``benchmarks/gpu_personalize.py --reduced`` runs the SD 1.5 personalisation benchmark's code on the
tiny model and encoder at 32 px: the Personalizer's prediction, relaxation and compiled finetune for
1 and 4 identities. Nothing is asserted on time beyond "measured"; we check the layout the GPU run
will be read by, that the batch-4 program personalises four different identities, that ``--collect``
assembles ``gpu.json`` from the parts, and that ``gpu.sh --dry_run`` runs and writes nothing.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_personalize.py")
STEPS = 3


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench") / "gpu_personalize.json"
    cmd = [sys.executable, SCRIPT, "--reduced", "--steps", str(STEPS), "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, out


@pytest.mark.slow
def test_reduced_run_reports_every_batch(reduced):
    result, stdout, _ = reduced
    assert "s/identity" in stdout and "ident/s" in stdout  # the table was printed
    assert result["reduced"] and result["complete"] and result["shapes"] == "tiny"
    assert (result["resolution"], result["dtype"], result["steps"]) == (32, "float32", STEPS)
    assert result["backend"] == "cpu" and result["attention"] == "flash"  # auto, resolved on CPU
    assert result["versions"]["jax"] and result["versions"]["flax"]
    assert _positive(result["setup_s"]) and _positive(result["compile_predict_s"])
    params = result["parameters"]
    assert set(params) == {"unet", "vae", "text_encoder", "hypernet"}
    assert all(v > 0 for v in params.values())
    assert result["weight_tokens"] > 0

    assert set(result["batches"]) == {"1", "4"}
    for n, record in result["batches"].items():
        n = int(n)
        assert record["identities"] == n and record["map_batch"] == n  # batch 4 vmaps all four
        assert _positive(record["compile_s"])
        assert len(record["calls"]) == 2  # the first call, then a steady one
        for call in record["calls"]:
            assert call["identities"] == n and call["loss_shape"] == [n, STEPS]
            assert call["finite"]
            assert all(_positive(call[k]) for k in ("predict_s", "relax_s", "finetune_s", "total_s"))
            assert call["total_s"] == pytest.approx(call["predict_s"] + call["finetune_s"])
            assert len(call["prediction_norms"]) == n and all(map(_positive, call["prediction_norms"]))
            assert all(map(_positive, call["loss_first"] + call["loss_last"]))
        steady = record["calls"][1]["total_s"]
        assert record["steady_total_s"] == pytest.approx(steady)
        assert record["seconds_per_identity"] == pytest.approx(steady / n)
        assert record["identities_per_s"] == pytest.approx(n / steady)
        assert result["summary"][f"batch{n}"]["identities_per_s"] == pytest.approx(n / steady)

    # Four photos, four identities: the hypernetwork predicted four different weight sets, and the
    # same four again on the second call (the compiled prediction is deterministic).
    calls = result["batches"]["4"]["calls"]
    norms = calls[0]["prediction_norms"]
    assert len({round(v, 9) for v in norms}) == 4
    assert calls[1]["prediction_norms"] == pytest.approx(norms, rel=1e-6)
    assert calls[1]["loss_last"] == pytest.approx(calls[0]["loss_last"], rel=1e-5)  # same keys


@pytest.mark.slow
def test_collect_assembles_gpu_json(reduced, tmp_path):
    result, _, out = reduced
    (tmp_path / "gpu_personalize.json").write_text(out.read_text())
    (tmp_path / "nvidia_smi.csv").write_text("name, memory.total [MiB]\nNVIDIA H200, 143771 MiB\n")
    (tmp_path / "exit_codes.txt").write_text("gpu_personalize=0\ngpu_finetune_step=124\n")
    rows = [{"config": "sd15", "label": "torch", "median_ms": 123.0, "ratio": None}]
    (tmp_path / "gpu_finetune_step.json").write_text(json.dumps({"rows": rows}))
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--collect", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    assert "NVIDIA H200, 143771 MiB" in gpu["machine"]["nvidia_smi"]
    assert gpu["machine"]["versions"]["jax"]
    assert gpu["exit_codes"] == {"gpu_personalize": "0", "gpu_finetune_step": "124"}
    assert gpu["gpu_personalize"] == result and gpu["gpu_finetune_step"]["rows"] == rows
    assert "s/identity" in proc.stdout and "finetune step sd15 torch: median 123.0 ms" in proc.stdout


def test_collect_with_missing_parts_still_writes(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--collect", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    assert gpu["gpu_personalize"] is None and gpu["gpu_finetune_step"] is None
    assert gpu["exit_codes"] == {} and gpu["machine"]["nvidia_smi"] == ""


def test_gpu_sh_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON="python3")
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry_run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 5, proc.stdout
    install, smi, step, personalize, collect = commands
    # Our pinned packages into /tmp/site: the packed tree if .whl/ holds one, else the wheels, offline.
    packed = "tarfile" in install and install.endswith(".whl/site.tar.xz /tmp/site")
    wheels = "pip install" in install and "--no-index" in install and install.endswith("/tmp/site .whl/*.whl")
    assert packed or wheels, install
    assert smi.startswith("nvidia-smi --query-gpu=name,memory.total")
    assert (
        "benchmarks/gpu_personalize.py" in personalize and f"--out {out}/gpu_personalize.json" in personalize
    )
    assert "--steps 40 --batches 1,4" in personalize and personalize.startswith("timeout ")
    assert "benchmarks/finetune_step.py --device cuda --dtype bfloat16 --configs sd15" in step
    assert f"--json {out}/gpu_finetune_step.json" in step
    assert f"--collect {out}" in collect
    assert not out.exists()  # nothing was run or written
