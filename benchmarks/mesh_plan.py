"""The hypernetwork's mesh plan, on paper: its training step at SD 1.5 + ViT-H/14 shapes compiled
ahead of time for 8 and 32 devices, as data parallel, FSDP and both, and projected onto hardware.

Each plan is the stage's own dry run (``hdb_jax.stages.hypernet.setup`` on shapes only: SD 1.5's
UNet, VAE and text encoder at 512 px, the ViT-H/14 encoder, 176 weight tokens, global batch 64)
compiled for fake CPU devices. From the compiled per-device program we read
(:func:`hdb_jax.common.costs.program_costs`): memory (arguments, outputs, temporaries), FLOPs, and
the bytes its collectives send per device. Two targets, from published figures:

* ``tpu-v5e-32`` (the 32-device plans): 197 TFLOP/s bf16 and 16 GB HBM per chip, 1,600 Gbit/s
  ICI per chip, taken as 100 GB/s sent per device (half of it each way);
* ``8xH100-SXM`` (the 8-device plans): 989 TFLOP/s dense bf16 and 80 GB HBM per GPU, NVLink
  900 GB/s per GPU, taken as 450 GB/s sent per device.

A plan's projected step = FLOPs / (peak x MFU) + wire bytes / (link x efficiency), with MFU 0.4
and link efficiency 0.7 (assumptions, in the JSON; no overlap of compute and communication, so
the figure is pessimistic). The default mesh is the fastest plan whose peak memory fits 90% of
the HBM. ``--from <json>`` re-projects a saved run (after editing the assumptions here) without
compiling again.

Limits, stated rather than hidden: the program is compiled in float32 (the training default;
bfloat16 activations would roughly halve the temporaries, so memory here is an upper bound), by
XLA:CPU (whose buffer assignment and fusion differ from XLA:TPU/GPU). Attention decides both
figures, so the recorded plan takes each from the run it is right in: FLOPs from a run with
``--attention xla`` (loop-free: ``cost_analysis`` counts every FLOP; our ``flash`` kernel's chunk
loop would be counted once), memory from a run with ``--attention flash`` (the score matrix is
never kept, as with cuDNN's fused kernel on GPU and with ``auto``'s choice on TPU), merged with
``--from xla.json --memory-from flash.json``. Both runs' JSONs are kept beside it. The XLA:CPU
backend compiles at LLVM level 0: buffer assignment, FLOPs and collectives are decided before
LLVM runs.

Run (from the repository root):
  python benchmarks/mesh_plan.py --out xla.json                      # FLOPs (attention xla)
  python benchmarks/mesh_plan.py --attention flash --out flash.json   # memory
  python benchmarks/mesh_plan.py --from xla.json --memory-from flash.json   # -> results/mesh_plan.json
  python benchmarks/mesh_plan.py --reduced  # the tiny model and encoder, 8 devices (the test's)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "mesh_plan.json")
MFU = 0.4
LINK_EFFICIENCY = 0.7
USABLE_HBM = 0.9  # of each device's memory, for the program (XLA_PYTHON_CLIENT_MEM_FRACTION=0.9)
GIB = 2**30
TARGETS = {
    "tpu-v5e-32": dict(devices=32, peak_flops=197e12, hbm_bytes=16 * GIB, link_bytes_per_s=100e9),
    "8xH100-SXM": dict(devices=8, peak_flops=989e12, hbm_bytes=80 * GIB, link_bytes_per_s=450e9),
}
PLANS = {  # devices -> (name, mesh axes)
    8: (
        ("dp", {"data": 8, "fsdp": 1}),
        ("fsdp", {"data": 1, "fsdp": 8}),
        ("dp2_fsdp4", {"data": 2, "fsdp": 4}),
    ),
    32: (
        ("dp", {"data": 32, "fsdp": 1}),
        ("fsdp", {"data": 1, "fsdp": 32}),
        ("dp4_fsdp8", {"data": 4, "fsdp": 8}),
    ),
}


def project(costs: dict, target: dict) -> dict:
    """Seconds per step and whether it fits, for one plan's per-device costs on ``target``."""
    compute_s = costs["flops"] / (target["peak_flops"] * MFU)
    comm_s = costs["wire_bytes"] / (target["link_bytes_per_s"] * LINK_EFFICIENCY)
    return {
        "compute_s": compute_s,
        "comm_s": comm_s,
        "step_s": compute_s + comm_s,
        "fits": costs["memory"]["peak"] <= USABLE_HBM * target["hbm_bytes"],
    }


def choose(plans: dict[str, dict]) -> str | None:
    """The fastest plan that fits in memory (None when none does)."""
    fitting = {name: p for name, p in plans.items() if p["projection"]["fits"]}
    if not fitting:
        return None
    return min(fitting, key=lambda name: fitting[name]["projection"]["step_s"])


def _config(reduced: bool, axes: dict, batch: int, attention: str = "xla"):
    sys.path.insert(0, ROOT)
    from hdb_jax.jobs import config_lib

    config = config_lib.load(os.path.join(ROOT, "configs", "hypernet.py"), "tiny" if reduced else "sd15")
    config.dry_run = True
    config.mesh.data, config.mesh.fsdp = axes["data"], axes["fsdp"]
    config.batch_size = batch
    config.model.attention = attention
    return config


def compile_plan(reduced: bool, axes: dict, batch: int, attention: str = "xla") -> dict:
    """One plan: the dry run's compiled step and its per-device costs."""
    import dataclasses

    from hdb_jax.blocks import build
    from hdb_jax.common import costs
    from hdb_jax.sd import model
    from hdb_jax.sd import tiny as tiny_lib
    from hdb_jax.stages import hypernet

    config = _config(reduced, axes, batch, attention)
    sd = tiny_lib.tiny() if reduced else model.sd15_shapes()
    sd = dataclasses.replace(sd, **build.model_settings(config.model))
    t0 = time.perf_counter()
    s = hypernet.setup(config, sd, sd.abstract_params(build.resolution(config.model, sd)))
    out = costs.program_costs(s.compiled, s.mesh.size)
    out.update(
        mesh=dict(s.mesh.shape),
        per_device_batch=batch // s.mesh.size,
        trainable_params=s.summary["trainable_params"],
        compile_s=round(time.perf_counter() - t0, 1),
    )
    return out


def _machine() -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sd15_scale import machine

    return machine()


def run(
    reduced: bool,
    device_counts: tuple[int, ...],
    batch: int,
    only: tuple[str, ...] = (),
    attention: str = "xla",
) -> dict:

    result = {
        "what": "hypernetwork training step, per device, compiled ahead of time on fake CPU devices",
        "shapes": "tiny model + tiny encoder" if reduced else "SD 1.5 (512 px) + ViT-H/14, 176 weight tokens",
        "global_batch": batch,
        "attention": attention,
        "assumptions": _assumptions(),
        "targets": TARGETS,
        "machine": _machine(),
        "date": datetime.date.today().isoformat(),
        "devices": {},
    }
    for n in device_counts:
        target_name = next(k for k, t in TARGETS.items() if t["devices"] == n)
        plans = {}
        for name, axes in PLANS[n]:
            if only and name not in only:
                continue
            plan = compile_plan(reduced, axes, batch, attention)
            plan["projection"] = project(plan, TARGETS[target_name])
            plans[name] = plan
            print(_row(n, name, plan), flush=True)
        result["devices"][str(n)] = {"target": target_name, "plans": plans, "default": choose(plans)}
    return result


def _assumptions() -> dict:
    return {
        "mfu": MFU,
        "link_efficiency": LINK_EFFICIENCY,
        "usable_hbm": USABLE_HBM,
        "dtype": "float32 as compiled",
    }


def reproject(result: dict, memory_from: dict | None = None) -> dict:
    """``result`` (a saved run) with projections and defaults redone under today's assumptions;
    with ``memory_from`` (a run of the same plans with another attention), its memory figures."""
    result = dict(result, assumptions=_assumptions(), targets=TARGETS)
    if memory_from is not None:
        result["memory_attention"] = memory_from["attention"]
    for n, entry in result["devices"].items():
        for name, plan in entry["plans"].items():
            if memory_from is not None:
                plan["memory"] = memory_from["devices"][n]["plans"][name]["memory"]
            plan["projection"] = project(plan, TARGETS[entry["target"]])
            print(_row(int(n), name, plan))
        entry["default"] = choose(entry["plans"])
    return result


def _row(n: int, name: str, p: dict) -> str:
    gib = 2.0**30
    pr = p["projection"]
    return (
        f"{n:>3} {name:<10} peak {p['memory']['peak'] / gib:7.2f} GiB  args {p['memory']['argument'] / gib:6.2f}"
        f"  TFLOP {p['flops'] / 1e12:8.2f}  wire {p['wire_bytes'] / gib:6.2f} GiB"
        f"  step {pr['step_s'] * 1e3:8.1f} ms (compute {pr['compute_s'] * 1e3:.1f}, comm {pr['comm_s'] * 1e3:.1f})"
        f"  {'fits' if pr['fits'] else 'DOES NOT FIT'}  (compiled in {p['compile_s']} s)"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="tiny shapes on 8 devices")
    parser.add_argument("--batch", type=int, default=0, help="global batch (default 64; reduced 8)")
    parser.add_argument("--plans", default="", help="comma-separated plan names (default: all)")
    parser.add_argument("--out", default="", help=f"JSON path (default {os.path.relpath(COMMITTED, ROOT)})")
    parser.add_argument("--from", dest="saved", default="", help="re-project this saved JSON (no compiling)")
    parser.add_argument("--memory-from", default="", help="with --from: take memory from this saved JSON")
    parser.add_argument("--attention", default="xla", help="the UNet's attention (xla: loop-free FLOPs)")
    args = parser.parse_args(argv)
    counts = (8,) if args.reduced else (8, 32)
    batch = args.batch or (8 if args.reduced else 64)
    if args.saved:
        with open(args.saved) as f:
            saved = json.load(f)
        memory = None
        if args.memory_from:
            with open(args.memory_from) as f:
                memory = json.load(f)
        result = reproject(saved, memory)
    else:
        plans = tuple(p for p in args.plans.split(",") if p)
        result = run(args.reduced, counts, batch, plans, args.attention)
    for n, entry in result["devices"].items():
        print(f"default mesh on {entry['target']} ({n} devices): {entry['default']}")
    out = args.out or (None if args.reduced else COMMITTED)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    # Fake devices for the largest plan, and a fast LLVM backend: set before JAX starts.
    flags = os.environ.get("XLA_FLAGS", "")
    if "device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=32"
    os.environ["XLA_FLAGS"] = flags + " --xla_backend_optimization_level=0"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
