"""Hypernetwork training step: per-sample adapters in activation space vs merged weights; mesh scaling.

Two measurements, each against a reference run in the same process (numbers and ratios only;
nothing here asserts on time):

1. **Formulation** (one device). Our step (``hdb_jax.stages.hypernet.make_step``) runs the UNet
   and the text encoder once on the whole batch and adds each sample's LiDB update
   ``x · ΔW_i`` in activation space (``attach_all(..., per_sample=True)``). The reference is the
   obvious alternative: ``jax.vmap`` over the batch of a function that merges sample i's
   predicted LiDB weights into the base parameters (``Adapter.merge``, every adapted component:
   UNet and text encoder) and runs the text encoder and the UNet on that one sample. The
   hypernetwork, the VAE encoding, the noise, the timesteps, the loss, the optimizer and the
   jit/sharding setup are the same; only how the predicted weights reach the models differs.
   Both steps are checked once to give the same loss and gradient norm (rtol 1e-5) on the same
   state, batch and key before anything is timed.
2. **Mesh scaling**. Our sharded step (``sharded_step``) on meshes ``{"data": n}`` of fake CPU
   devices (``--xla_force_host_platform_device_count=8``), same global batch. The fake devices
   share the machine's real cores, so this measures the overhead of the partitioned program
   (collectives, per-device launch, smaller per-device matmuls), not a real speed-up.

Timing: each step is compiled ahead of time (``lower().compile()``, timed), then the variants of
one comparison run in alternating blocks (``--warmup`` untimed steps, then ``--steps/--blocks``
timed ones per block) so load drifts on a shared machine hit both alike; we report medians.

Run (from the repository root):
  python benchmarks/hypernet_step.py                       # the defaults: ~9 min on 2 busy cores
  python benchmarks/hypernet_step.py --sizes tiny --devices 1,8 --steps 6

The last recorded run, with its machine, load and reading, is in ``benchmarks/results/hypernet_step.md``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hdb_jax.common import sharding  # noqa: E402
from hdb_jax.hypernet import decoder as dec  # noqa: E402
from hdb_jax.hypernet.model import split_params  # noqa: E402
from hdb_jax.sd import tiny as tiny_lib  # noqa: E402
from hdb_jax.stages import hypernet as ht  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hypernet_reference import make_merged_step  # noqa: E402

# name -> (tiny() overrides, image resolution); the VAE halves it, so latents are resolution / 2.
SIZES = {
    "tiny": (dict(unet_channels=(32, 64), vae_channels=(32, 64), text_width=32), 32),
    "medium": (dict(unet_channels=(64, 128, 256), vae_channels=(32, 64), text_width=64), 64),
}


# -------------------------------------------------------------------- setup
def _hypernet_config():
    """``configs/hypernet.py:tiny`` loaded by file path (LiDB a=16, b=8, r=1; tiny CLIP encoder)."""
    configs = os.path.join(ROOT, "configs")
    sys.path.insert(0, configs)
    spec = importlib.util.spec_from_file_location("hypernet_config", os.path.join(configs, "hypernet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


def init_sd_params(sd, key, resolution: int) -> dict:
    """Random SD parameters, like ``sd.init_params`` but with the init programs compiled at XLA -O0.

    The values only need to be a plausible random model; compiling the three init programs
    (a full UNet/VAE/text-encoder trace each) at the default level took ~50 s of a 2-core run.
    """
    fns = sd._init_fns(resolution)  # pylint: disable=protected-access
    keys = jax.random.split(key, len(fns))
    fast = {"xla_backend_optimization_level": 0}
    return {
        name: jax.jit(fn).lower(k).compile(compiler_options=fast)(k)
        for (name, fn), k in zip(sorted(fns.items()), keys)
    }


_BUILT: dict = {}


def build(size: str, batch: int, seed: int = 0) -> dict:
    """Model, adapters, hypernetwork, optimizer, initial state, frozen trees and one host batch (cached)."""
    if (size, batch, seed) not in _BUILT:
        _BUILT[size, batch, seed] = _build(size, batch, seed)
    return _BUILT[size, batch, seed]


def _build(size: str, batch: int, seed: int) -> dict:
    overrides, resolution = SIZES[size]
    config = _hypernet_config()
    config.batch_size = batch
    config.model.resolution = resolution
    sd = tiny_lib.tiny(resolution=resolution, **overrides)
    key = jax.random.PRNGKey(seed)
    params = init_sd_params(sd, jax.random.fold_in(key, 0), resolution)
    adapters = ht.build_adapters(config, params)
    net, init = ht._hypernet(config, adapters)  # pylint: disable=protected-access
    optimizer = ht.make_optimizer(config)
    trainable, frozen_h = split_params(net, init(jax.random.fold_in(key, 1)))
    basis = {c: a.basis(jax.random.fold_in(key, 2)) for c, a in adapters.items()}
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}
    frozen = {"sd": params, "basis": basis, "hyper": frozen_h}
    rng = np.random.default_rng(seed)
    n_tok, width = len(dec.token_layout(adapters)), dec.token_width(net.kind)
    host_batch = {
        "images": rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32),
        "input_ids": np.stack([sd.tokenize(["a sks face"])[0]] * batch).astype(np.int32),
        "target_tokens": rng.normal(0, 0.01, (batch, n_tok, width)).astype(np.float32),
        "has_target": np.ones(batch, np.float32),
    }
    return dict(
        config=config,
        sd=sd,
        adapters=adapters,
        net=net,
        optimizer=optimizer,
        state=state,
        frozen=frozen,
        batch=host_batch,
        tokens=n_tok,
        latent=resolution // sd.vae_scale_factor,
        runs={},
    )


# -------------------------------------------------------------------- compiling and running
def _jit_like_sharded_step(step_fn, config, mesh, abstract_state, abstract_frozen):
    """``step_fn`` jitted with the shardings and donation ``ht.sharded_step`` uses."""
    rules = [tuple(r) for r in config.sharding_rules]
    state_sh = sharding.tree_shardings(abstract_state, mesh, rules)
    frozen_sh = sharding.tree_shardings(abstract_frozen, mesh, rules)
    data_sh = sharding.batch_sharding(mesh)
    step = jax.jit(
        step_fn,
        donate_argnums=(0,),
        in_shardings=(state_sh, frozen_sh, data_sh, None),
        out_shardings=(state_sh, None),
    )
    return step, state_sh, frozen_sh


def compile_on_mesh(parts: dict, n_devices: int, variant: str) -> dict:
    """Places state, frozen trees and batch on a ``{"data": n}`` mesh and compiles ``variant``.

    Cached per ``parts``: the one-device "ours" program of the tiny size serves both benchmarks.

    Returns:
      ``{"compiled", "state", "frozen", "batch", "rng", "compile_s", "temp_mib", "reused"}``;
      ``compiled`` donates the state (see :func:`reset`).
    """
    if (n_devices, variant) in parts["runs"]:
        return {**parts["runs"][n_devices, variant], "reused": True}
    parts["runs"][n_devices, variant] = _compile_on_mesh(parts, n_devices, variant)
    return parts["runs"][n_devices, variant]


def _compile_on_mesh(parts: dict, n_devices: int, variant: str) -> dict:
    c, mesh = parts["config"], sharding.make_mesh({"data": n_devices})
    abstract_state = jax.eval_shape(lambda: parts["state"])
    abstract_frozen = jax.eval_shape(lambda: parts["frozen"])
    alpha, beta = c.loss.alpha, c.loss.beta
    if variant == "ours":
        step, state_sh, frozen_sh, _ = ht.sharded_step(
            c,
            parts["sd"],
            parts["net"],
            parts["adapters"],
            parts["optimizer"],
            mesh,
            abstract_state,
            abstract_frozen,
        )
    else:
        fn = make_merged_step(parts["sd"], parts["net"], parts["adapters"], parts["optimizer"], alpha, beta)
        step, state_sh, frozen_sh = _jit_like_sharded_step(fn, c, mesh, abstract_state, abstract_frozen)
    state = jax.device_put(jax.tree_util.tree_map(jnp.copy, parts["state"]), state_sh)
    frozen = jax.device_put(parts["frozen"], frozen_sh)
    host = parts["batch"]
    batch = sharding.global_batch(
        lambda rows: {k: v[rows] for k, v in host.items()}, len(host["images"]), mesh
    )
    rng = jax.random.PRNGKey(3)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    return {
        "compiled": compiled,
        "state": state,
        "frozen": frozen,
        "batch": batch,
        "rng": rng,
        "state_sh": state_sh,
        "compile_s": compile_s,
        "temp_mib": None if temp is None else temp / 2**20,
        "reused": False,
    }


def reset(run: dict, parts: dict) -> None:
    """Puts a fresh copy of the initial state in ``run`` (the previous one was donated or stepped)."""
    run["state"] = jax.device_put(jax.tree_util.tree_map(jnp.copy, parts["state"]), run["state_sh"])


def runner(run: dict):
    """A callable doing one step (feeding the donated state back) and blocking on its result."""

    def step():
        run["state"], out = run["compiled"](run["state"], run["frozen"], run["batch"], run["rng"])
        return jax.block_until_ready(out)

    return step


def check_same_loss(runs: dict, parts: dict, rtol: float = 1e-5) -> str:
    """First step of every run from the same state/batch/key: loss and gradient norm must agree."""
    for run in runs.values():
        reset(run, parts)
    outs = {name: {k: float(v) for k, v in runner(r)().items()} for name, r in runs.items()}
    ref_name, ref = next(iter(outs.items()))
    worst = 0.0
    for name, out in outs.items():
        for k in ("loss", "grad_norm"):
            err = abs(out[k] - ref[k]) / max(abs(ref[k]), 1e-12)
            worst = max(worst, err)
            if err > rtol:
                raise AssertionError(
                    f"{name} {k}={out[k]!r} vs {ref_name} {ref[k]!r} (rel {err:.2e} > {rtol})"
                )
    return f"loss {ref['loss']:.6f}, grad_norm {ref['grad_norm']:.6f}, max rel diff {worst:.1e}"


def time_blocks(steps: dict, *, warmup: int, timed: int, blocks: int) -> dict[str, list[float]]:
    """Seconds per step of each callable, in alternating blocks (warmup untimed steps per block)."""
    times = {name: [] for name in steps}
    per_block = max(1, timed // blocks)
    for _ in range(blocks):
        for name, step in steps.items():
            for _ in range(warmup):
                step()
            for _ in range(per_block):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return times


# -------------------------------------------------------------------- the two benchmarks
def _row(section, size, what, run, seconds, batch, ref_s):
    ms = 1e3 * statistics.median(seconds)
    return {
        "section": section,
        "size": size,
        "what": what,
        "compile_s": run["compile_s"],
        "temp_mib": run["temp_mib"],
        "ms": ms,
        "min_ms": 1e3 * min(seconds),
        "sps": batch / (ms / 1e3),
        "ratio": ms / (1e3 * statistics.median(ref_s)),
    }


def bench_formulation(size: str, args) -> list[dict]:
    """Our per-sample activation-space step vs the vmapped merged-weights step, one device."""
    parts = build(size, args.batch)
    print(
        f"\n[{size}] UNet {SIZES[size][0]['unet_channels']}, text width {SIZES[size][0]['text_width']}, "
        f"{parts['latent']}x{parts['latent']} latents, batch {args.batch}, {parts['tokens']} weight tokens",
        flush=True,
    )
    runs = {}
    for variant in ("ours", "merged"):
        runs[variant] = compile_on_mesh(parts, 1, variant)
        print(f"  {variant:6s} compiled in {runs[variant]['compile_s']:.1f}s", flush=True)
    print(f"  same numbers: {check_same_loss(runs, parts)}", flush=True)
    times = time_blocks(
        {k: runner(r) for k, r in runs.items()}, warmup=args.warmup, timed=args.steps, blocks=args.blocks
    )
    rows = [
        _row("formulation", size, name, runs[name], ts, args.batch, times["merged"])
        for name, ts in times.items()
    ]
    for r in rows:
        print(
            f"  {r['what']:6s} median {r['ms']:8.1f} ms (min {r['min_ms']:.1f})  {r['sps']:6.2f} samples/s",
            flush=True,
        )
    return rows


def bench_devices(args) -> list[dict]:
    """Our sharded step on ``{"data": n}`` meshes of fake CPU devices, tiny config, same global batch."""
    parts = build("tiny", args.batch)
    counts = [int(n) for n in args.devices.split(",")]
    print(f"\n[devices] tiny, global batch {args.batch}, meshes {{'data': n}} for n in {counts}", flush=True)
    runs = {}
    for n in counts:
        if args.batch % n:
            raise SystemExit(f"--batch {args.batch} is not a multiple of {n} devices")
        runs[n] = compile_on_mesh(parts, n, "ours")
        how = "reusing the formulation run's program, compiled" if runs[n]["reused"] else "compiled"
        print(f"  {n} device(s) {how} in {runs[n]['compile_s']:.1f}s", flush=True)
    print(f"  same numbers: {check_same_loss(runs, parts, rtol=2e-5)}", flush=True)
    times = time_blocks(
        {n: runner(r) for n, r in runs.items()}, warmup=args.warmup, timed=args.steps, blocks=args.blocks
    )
    ref = times[counts[0]]
    for n, ts in times.items():
        print(
            f"  {n} device(s) median {1e3 * statistics.median(ts):8.1f} ms (min {1e3 * min(ts):.1f})",
            flush=True,
        )
    return [
        _row("devices", "tiny", f"ours, {n} dev", runs[n], ts, args.batch, ref) for n, ts in times.items()
    ]


def print_table(rows: list[dict]) -> None:
    head = f"{'section':12s} {'size':7s} {'variant':13s} {'compile s':>9s} {'temp MiB':>8s} {'median ms':>10s} {'min ms':>8s} {'samples/s':>9s} {'ratio':>6s}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        temp = "n/a" if r["temp_mib"] is None else f"{r['temp_mib']:.0f}"
        print(
            f"{r['section']:12s} {r['size']:7s} {r['what']:13s} {r['compile_s']:9.1f} {temp:>8s} {r['ms']:10.1f} "
            f"{r['min_ms']:8.1f} {r['sps']:9.2f} {r['ratio']:6.2f}"
        )
    print(
        "ratio = median step time / the reference's: formulation rows vs 'merged' (same size),"
        " devices rows vs the first device count (< 1 is faster).\n"
        "temp MiB = XLA's temporary buffers of the compiled step (memory_analysis; per device for meshes)."
    )
    print(
        "Fake CPU devices share the same real cores: the devices rows measure the overhead and scaling of the"
        " sharded program, not a real multi-device speed-up."
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,medium", help=f"comma list of {sorted(SIZES)}; empty: skip")
    parser.add_argument("--devices", default="1,2,4,8", help="comma list of fake device counts; empty: skip")
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument(
        "--blocks", type=int, default=2, help="alternating blocks the timed steps are split into"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant per block")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    print(
        f"{datetime.datetime.now().isoformat(timespec='seconds')}  jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, {jax.device_count()} devices, {len(os.sched_getaffinity(0))} cores; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    rows = []
    for size in filter(None, args.sizes.split(",")):
        rows += bench_formulation(size, args)
    if args.devices:
        rows += bench_devices(args)
    print_table(rows)
    print(
        f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"total {time.perf_counter() - started:.0f}s"
    )


if __name__ == "__main__":
    main()
