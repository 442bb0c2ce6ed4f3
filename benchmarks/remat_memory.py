"""What each UNet remat policy buys: the compiled memory of the 512-px LiDB training step.

The subject stage's own step (``hdb_jax.stages.subject.make_train_step``: LiDB a=100, b=50, r=1 on
SD 1.5's attention layers, Adam) is compiled ahead of time on shapes only -- SD 1.5's UNet, VAE
and text encoder at 512 px, batch 1 and 4 -- once per policy of :mod:`hdb_jax.sd.remat`. We record
what XLA says the program holds (arguments, outputs, temporaries; peak = arguments + outputs -
aliased + temporaries) and its FLOPs, whose growth is the recomputation's price. Attention is the
platform's default (``auto``: our ``flash`` on CPU, whose score matrix is never kept, as with a
fused kernel on an accelerator); ``cost_analysis`` counts its chunk loop once, so on CPU the FLOPs
are comparable between policies, not absolute. On CPU the backend compiles at LLVM level 0
(buffer assignment is decided before LLVM runs). On a GPU the same command measures what XLA:GPU's
memory-aware scheduler makes of the regions: ``python benchmarks/remat_memory.py --batches 4
--policies none,blocks --out remat_gpu.json``.

Run (from the repository root):
  python benchmarks/remat_memory.py             # -> benchmarks/results/remat_memory.json and a table
  python benchmarks/remat_memory.py --reduced   # the tiny model at 32 px (seconds)
  python benchmarks/remat_memory.py --chain     # does this compiler keep remat at all? (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "remat_memory.json")


def compile_step(reduced: bool, batch: int, policy: str) -> dict:
    """Compiles the LiDB subject step for ``batch`` images under ``policy``; its per-device costs."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp

    from hdb_jax.blocks import build
    from hdb_jax.blocks import tuning as tuning_lib
    from hdb_jax.common import costs
    from hdb_jax.jobs import config_lib
    from hdb_jax.sd import model
    from hdb_jax.sd import tiny as tiny_lib
    from hdb_jax.stages import subject

    size = "tiny" if reduced else "sd15"
    sd = tiny_lib.tiny() if reduced else model.sd15_shapes()
    sd = dataclasses.replace(sd, remat=policy)  # attention "auto": flash on CPU, the fused kernel elsewhere
    res = sd.default_resolution
    params = sd.abstract_params(res)
    adapters = build.adapters(config_lib.adapter("lidb", size), params)
    tuning = tuning_lib.AdapterTuning(adapters)
    optimizer = build.optimizer(config_lib.optim(1e-3))
    key = jax.random.PRNGKey(0)
    trainable = jax.eval_shape(tuning.init, key, params)
    state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "trainable": trainable,
        "opt_state": jax.eval_shape(optimizer.init, trainable),
    }
    frozen = {"params": params, "basis": {c: a.abstract_basis() for c, a in adapters.items()}}
    batch_shapes = {
        "images": jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((batch, sd.max_text_length), jnp.int32),
        "weights": jax.ShapeDtypeStruct((batch,), jnp.float32),
    }
    step = subject.make_train_step(sd, tuning, optimizer)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch_shapes, jax.ShapeDtypeStruct(key.shape, key.dtype)).compile()
    out = costs.program_costs(compiled, devices=1)
    out = {"memory": out["memory"], "flops": out["flops"]}
    out["compile_s"] = round(time.perf_counter() - t0, 1)
    out["resolution"] = res
    return out


def _machine() -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sd15_scale import machine

    return machine()


def run(reduced: bool, batches: tuple[int, ...], policies: tuple[str, ...]) -> dict:
    import jax

    result = {
        "what": "LiDB subject training step (a=100, b=50, r=1; Adam), compiled memory per remat policy",
        "shapes": "tiny model, 32 px" if reduced else "SD 1.5, 512 px",
        "attention": "auto",
        "platform": jax.default_backend(),
        "machine": _machine(),
        "date": datetime.date.today().isoformat(),
        "runs": {},
    }
    gib = 2.0**30
    for batch in batches:
        for policy in policies:
            r = compile_step(reduced, batch, policy)
            base = result["runs"].get(f"batch{batch}/none")
            rel = f"  flops x{r['flops'] / base['flops']:.2f}" if base and base["flops"] else ""
            print(
                f"batch {batch} remat {policy:<6} peak {r['memory']['peak'] / gib:7.2f} GiB"
                f"  temp {r['memory']['temp'] / gib:7.2f} GiB  args {r['memory']['argument'] / gib:5.2f} GiB"
                f"{rel}  (compile {r['compile_s']} s)",
                flush=True,
            )
            result["runs"][f"batch{batch}/{policy}"] = r
    return result


def chain_check(layers: int = 20, width: int = 1024) -> dict:
    """Whether this compiler keeps rematerialisation at all: a chain of ``tanh(h @ W)`` layers,
    differentiated with and without ``jax.checkpoint`` on every layer. Where the two programs
    compile to the same temporaries and FLOPs, the backend merged the recomputation back into the
    forward pass (XLA:CPU does: it drops the optimisation barriers that keep them apart)."""
    import jax
    import jax.numpy as jnp

    weights = jax.ShapeDtypeStruct((layers, width, width), jnp.float32)
    x = jnp.ones((width, width), jnp.float32)

    def loss(w, checkpoint):
        h = x
        for i in range(layers):
            step = lambda h, w: jnp.tanh(h @ w)  # noqa: E731
            h = (jax.checkpoint(step) if checkpoint else step)(h, w[i])
        return jnp.sum(h * h)

    out = {}
    for checkpoint in (False, True):
        lowered = jax.jit(jax.grad(loss), static_argnums=1).lower(weights, checkpoint)
        compiled = lowered.compile()
        out["per_layer" if checkpoint else "none"] = {
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
            "flops": float(costs_flops(compiled)),
            "barriers_lowered": lowered.as_text().count("optimization_barrier"),
            "barriers_compiled": compiled.as_text().count("opt-barrier"),
        }
        print(f"chain, checkpoint={checkpoint}: {out['per_layer' if checkpoint else 'none']}", flush=True)
    return out


def costs_flops(compiled) -> float:
    sys.path.insert(0, ROOT)
    from hdb_jax.common import costs

    return costs.program_costs(compiled, devices=1)["flops"]


def main(argv=None) -> dict:
    from hdb_jax.sd import remat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="the tiny model at 32 px")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--policies", default=",".join(remat.POLICIES))
    parser.add_argument("--out", default="", help=f"JSON path (default {os.path.relpath(COMMITTED, ROOT)})")
    parser.add_argument("--chain", action="store_true", help="only check that the compiler keeps remat")
    args = parser.parse_args(argv)
    if args.chain:
        return chain_check()
    result = run(
        args.reduced,
        tuple(int(b) for b in args.batches.split(",")),
        tuple(p for p in args.policies.split(",") if p),
    )
    out = args.out or (None if args.reduced else COMMITTED)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    sys.path.insert(0, ROOT)
    main()
