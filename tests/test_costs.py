"""Per-device program costs (collective bytes from HLO text) and the mesh plan built on them."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hdb_jax.common import costs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A hand-written optimised module: one of each collective kind, one inside a loop of known trip
# count and one inside a loop whose count XLA did not record.
HLO = """HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%body.1 (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar.2 = f32[4]{0} all-reduce(f32[4]{0} %x), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
}

%body.7 (p: (s32[], f32[2])) -> (s32[], f32[2]) {
  %cp = f32[2]{0} collective-permute(f32[2]{0} %y), channel_id=9, source_target_pairs={{0,1},{1,0}}
}

ENTRY %main.9 (p0: f32[8,16]) -> f32[64,16] {
  %all-reduce.1 = f32[8,16]{1,0} all-reduce(f32[8,16]{1,0} %p0), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %all-gather.3 = f32[64,16]{1,0} all-gather(f32[16,16]{1,0} %q), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}
  %reduce-scatter.4 = bf16[2,16]{1,0} reduce-scatter(bf16[16,16]{1,0} %r), channel_id=4, replica_groups={}, dimensions={0}, to_apply=%add
  %tuple-ar = (f32[3]{0}, s32[5]{0}) all-reduce(f32[3]{0} %u, s32[5]{0} %v), channel_id=5, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ag.6 = f32[64,32]{1,0} all-gather(%param.1), channel_id=6, replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}
  %ar.7 = f32[32,16]{1,0} all-reduce(%f), channel_id=7, replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2] {'axis_1','axis_2'}, to_apply=%add
  %while.5 = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"3"}}
  %while.8 = (s32[], f32[2]) while((s32[], f32[2]) %t2), condition=%cond.2, body=%body.7
  ROOT %out = f32[64,16]{1,0} copy(f32[64,16]{1,0} %all-gather.3)
}
"""


def test_collectives_of_a_hand_written_module():
    found = costs.collectives(HLO, devices=8)
    got = sorted((c.op, c.result_bytes, c.group, c.runs, c.trip_unknown) for c in found)
    assert got == sorted(
        [
            ("all-reduce", 16, 2, 3, False),  # in the loop of 3 trips, groups of 2
            ("collective-permute", 8, 8, 1, True),  # in a loop of unknown count: counted once, flagged
            ("all-reduce", 8 * 16 * 4, 8, 1, False),
            ("all-gather", 64 * 16 * 4, 4, 1, False),  # iota groups [2,4]: groups of 4
            ("reduce-scatter", 2 * 16 * 2, 8, 1, False),  # bf16; empty groups: all 8 devices
            ("all-reduce", 3 * 4 + 5 * 4, 8, 1, False),  # a combined (tuple) all-reduce
            ("all-gather", 64 * 32 * 4, 4, 1, False),  # named mesh axes: the group is axis_0 (4)
            ("all-reduce", 32 * 16 * 4, 8, 1, False),  # axis_1 x axis_2 = 4 x 2
        ]
    )
    wire = {(c.op, c.result_bytes): c.wire_bytes for c in found}
    assert wire[("all-reduce", 512)] == 2 * 7 / 8 * 512  # ring: 2 (g-1)/g of the message
    assert wire[("all-gather", 4096)] == 3 / 4 * 4096
    assert wire[("reduce-scatter", 64)] == 7 * 64  # the input is 8 x 64 bytes
    assert wire[("all-reduce", 16)] == 3 * (2 * 1 / 2 * 16)  # three trips
    assert wire[("collective-permute", 8)] == 8


def test_shape_bytes():
    assert costs.shape_bytes("f32[2,3]{1,0}") == [24]
    assert costs.shape_bytes("(bf16[4]{0}, pred[], s64[2,2])") == [8, 1, 32]


def _mesh_plan():
    spec = importlib.util.spec_from_file_location(
        "mesh_plan", os.path.join(ROOT, "benchmarks", "mesh_plan.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projection_and_choice_by_hand():
    plan = _mesh_plan()
    target = plan.TARGETS["tpu-v5e-32"]
    one_second = {
        "flops": target["peak_flops"] * plan.MFU,  # 1 s of arithmetic
        "wire_bytes": 2 * target["link_bytes_per_s"] * plan.LINK_EFFICIENCY,  # 2 s on the links
        "memory": {"peak": plan.USABLE_HBM * target["hbm_bytes"]},  # exactly the usable memory fits
    }
    p = plan.project(one_second, target)
    assert p["compute_s"] == pytest.approx(1.0) and p["comm_s"] == pytest.approx(2.0)
    assert p["step_s"] == pytest.approx(3.0) and p["fits"]
    one_second["memory"]["peak"] += 1
    assert not plan.project(one_second, target)["fits"]
    plans = {
        "fast_but_big": {"projection": {"step_s": 1.0, "fits": False}},
        "slow": {"projection": {"step_s": 3.0, "fits": True}},
        "medium": {"projection": {"step_s": 2.0, "fits": True}},
    }
    assert plan.choose(plans) == "medium"
    assert plan.choose({"big": plans["fast_but_big"]}) is None


def test_a_compiled_data_parallel_gradient_all_reduces_its_weight():
    """A replicated weight's gradient over a batch split 8 ways: every device must send at least
    the ring all-reduce's 2 (8-1)/8 of its bytes, and holds the whole weight as an argument."""
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    w = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    grad = jax.jit(
        jax.grad(lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2)), out_shardings=NamedSharding(mesh, P())
    )
    got = costs.program_costs(grad.lower(w, x).compile(), devices=8)
    weight = 64 * 32 * 4
    assert 2 * 7 / 8 * weight <= got["wire_bytes"] <= 3 * weight, got
    assert got["memory"]["argument"] == weight + 2 * 64 * 4  # w whole, x's 2 rows of 64
    assert got["flops"] >= 2 * 2 * 64 * 32  # at least the forward matmul of 2 rows


@pytest.mark.slow
def test_reduced_mesh_plan_shards_what_each_plan_says(tmp_path):
    """Tiny shapes on 8 devices (about 3 minutes: marked slow): FSDP holds an eighth of the
    sharded weights per device and gathers them; data parallel all-reduces every trainable gradient."""
    out = tmp_path / "plan.json"
    result = _mesh_plan().main(["--reduced", "--plans", "dp,fsdp", "--out", str(out)])
    assert json.loads(out.read_text())["devices"]["8"]["default"] == result["devices"]["8"]["default"]
    plans = result["devices"]["8"]["plans"]
    dp, fsdp = plans["dp"], plans["fsdp"]
    assert dp["mesh"] == {"data": 8, "fsdp": 1} and fsdp["mesh"] == {"data": 1, "fsdp": 8}
    assert fsdp["memory"]["argument"] < dp["memory"]["argument"] / 2
    grad_bytes = 4 * dp["trainable_params"]
    assert dp["collectives"]["all-reduce"]["wire_bytes"] >= 2 * 7 / 8 * grad_bytes
    assert "all-gather" not in dp["collectives"]  # nothing is sharded but the batch
    assert fsdp["collectives"]["all-gather"]["count"] > 0
    for p in (dp, fsdp):
        m = p["memory"]
        assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
        assert p["flops"] > 0 and p["projection"]["step_s"] > 0
