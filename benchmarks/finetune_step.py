"""Adapter fine-tuning step: ours (JAX/Flax) against PyTorch diffusers + peft LoRA, on CPU.

What is timed, on identical UNet configs (``model.tiny_configs``: block_out_channels ``tiny``
(32, 64) and ``medium`` (64, 128, 256), 4 heads, cross-attention width 32), batch 4 of 32x32
latents, 77 random context tokens, LoRA rank 4 (alpha 4) on every attention to_q/to_k/to_v/to_out:

* ours: a UNet-only variant of ``hdb_jax.stages.subject.make_train_step`` (same structure: adapters
  attached by interception, ``value_and_grad`` w.r.t. the adapter tree only, clip + AdamW,
  state donated, one jitted step). UNet-only because the full step also runs the VAE encoder
  and the text encoder, which diffusers' DreamBooth LoRA script does too but which would
  measure the VAE/CLIP rather than the adapter step; both sides here do the same work: sample
  noise and timesteps, noise the latents (DDPM schedule), UNet forward, MSE to the noise,
  backward, global-norm clip, AdamW.
* torch: ``UNet2DConditionModel`` + ``unet.add_adapter(LoraConfig(r=4, lora_alpha=4,
  init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0]))`` as diffusers'
  DreamBooth LoRA script does, base frozen, ``torch.optim.AdamW`` on the LoRA parameters,
  SDPA attention (its CPU flash kernel), ``torch.set_num_threads`` = the cores JAX gets.

Each core count runs in its own process (``--cores 1,2``), pinned with ``sched_setaffinity``;
both frameworks run back to back in it, in alternating blocks, after untimed warm-up steps.
Reported: compile time, median and min step time, CPU time per step, ours/torch.

Results on the 2-core Xeon (Sapphire Rapids) dev VM, shared with other jobs (load average
1-4 during the runs; 1-core numbers are the stable ones, 2-core ones need a quiet machine;
torch's 2 OpenMP threads slow down up to 10x whenever another process takes a core)::

  change (cumulative unless noted)        tiny 1c      medium 1c    tiny 2c      medium 2c
                                          ms  ratio    ms   ratio   ms  ratio    ms  ratio
  attention "diffusers" (baseline)      1104  4.16   1631  2.88    610  4.01    867  2.57
  "chunked" (lax.map + remat), chunk 64  451  1.70    926  1.63    339  2.23    634  1.88
  "flash" (custom VJP), chunk 64         292  1.10    762  1.35    249  1.64    541  1.60
  "flash", chunk 128                     308  1.16    783  1.38    227  1.49    511  1.52
  flash:64 + THP for both sides          257  1.06    647  1.20    227  1.54    481  1.49
  default: flash:128 + THP for both      260  1.11    640  1.19    206  1.33    445  1.36
  torch (no THP / THP)               266/235       566/538      152/155      337/327

(ms: median step; ratio: ours / torch median in the same process. Rows 1-4:
``--cores 1,2 --attention diffusers,chunked,flash:64,flash:128 --steps 8 --no-thp``; row 5:
``--cores 1,2 --attention flash:64 --steps 8``; row 6: ``--cores 1,2``.)

Inside "flash", one self-attention layer (batch 4 x 4 heads, 1024 tokens, width 8) forward +
backward on one core: first custom-VJP version 85 ms -> no transposed-LHS dots in the backward
(they went to Eigen, 3-5x slower than YNNPACK) 53 ms -> forward on transposed blocks too, scale
folded into q, softmax denominator from a ones column of V 47 ms; torch SDPA 47 ms.

THP: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (set by this script for both sides unless
``--no-thp``) cuts our page faults from 28k to ~100 per step (tiny; 80k -> 600 medium).

Tried and not kept: XLA flags (``xla_cpu_use_onednn``, ``..._onednn_custom_call``, YNNPACK
fusion types off / all on, ``XNN_GRAPH_FUSION_MODE_GREEDY(_SLINKY)``, fast math, 512-bit
vectors, concurrency-optimised scheduler: all within noise or slower); bfloat16 matmuls
(``flash_bf16``: ~30% slower here, the dots are too thin); rematerialising the UNet
(``--remat dots_with_no_batch_dims_saveable``: 276 -> 367 ms, ``nothing_saveable``: 467 ms,
tiny 1 core); unrolling the chunk loops (slower); chunk 32 (slower); running heads in
independent loops for 2-core parallelism (no gain).

Not reached: ours is at 1.1-1.2x torch on one core and 1.33-1.36x on two. What remains: XLA
runs most of the step's ops (1 M elements or fewer) on one thread, so ours uses ~1.6 of the 2
cores where torch uses 2; the backward of every 3x3 conv re-transposes its frozen kernel each
step (~60 ms/step profiled, medium); exact-erf GELU (``model.exact_geglu``) profiles at
~9 ms/step (tiny) vs torch's 2.5; GroupNorm/LayerNorm run as several XLA reductions. None of
these is attention.

On a GPU (``--device cuda --dtype bfloat16 --configs sd15``; ``benchmarks/gpu.sh`` runs it): ``sd15``
is SD 1.5's own UNet config (``model.sd15_configs()["unet"]``: 320-1280 channels, 8 heads,
cross-attention width 768) at its 64x64 latents with 77x768 context, random weights. Ours: JAX on
its default (GPU) backend, the UNet computing in bfloat16 with its frozen weights stored in
bfloat16, the model's default attention (``auto``: ``jax.nn.dot_product_attention``, cuDNN where
it applies). torch: the UNet built on the GPU and cast to bfloat16, peft's LoRA factors cast back
to float32 (as diffusers' ``cast_training_params``), forward under ``torch.autocast(bfloat16)``,
SDPA. Both LoRA trees and AdamW states are float32 and both run in one process (JAX's
preallocation off, so torch gets memory too); a step ends when its loss reaches the host.
``--json`` appends every row to a JSON file. No GPU figure has been recorded yet.

Run: ``python benchmarks/finetune_step.py [--cores 1,2] [--configs tiny,medium]
[--attention flash:128,chunked] [--steps 12]``; on a GPU ``python benchmarks/finetune_step.py
--device cuda --dtype bfloat16 --configs sd15 --steps 10 --json gpu_finetune_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {"tiny": (32, 64), "medium": (64, 128, 256), "sd15": None}  # None: SD 1.5's own UNet config
LATENT = {"sd15": 64}  # default latent side per config (others: 32)
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# Backs glibc's large mmap'd blocks with transparent huge pages (kernel THP mode "madvise").
# XLA:CPU allocates its temporaries afresh on every call; with 4 KiB pages every step then
# page-faults on each of them (28k faults/step tiny, 80k medium, ~10% of the step).
THP_TUNABLE = "glibc.malloc.hugetlb=1"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


# -------------------------------------------------------------------- ours
def build_jax_step(channels, *, batch, latent, attention, chunk, remat=None, seed=0, dtype="float32"):
    """Our UNet-only adapter step (same structure as ``hdb_jax.stages.subject.make_train_step``).

    Args:
      channels: the UNet's ``block_out_channels`` (tiny configs), or None: SD 1.5's UNet.
      batch: samples per step.
      latent: latent side (the UNet sees ``[batch, 4, latent, latent]``).
      attention: the attention implementation (:mod:`hdb_jax.sd.attention`).
      chunk: queries per attention chunk.
      remat: None, or the name of a ``jax.checkpoint_policies`` policy to rematerialise the
        whole UNet with.
      seed: PRNG seed of the weights and inputs.
      dtype: the UNet's computation dtype; its (frozen) weights are stored in it too.

    Returns:
      ``(run, compile_seconds, configs)``: ``run()`` performs one step and blocks on its loss.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from hdb_jax import adapters as A
    from hdb_jax.blocks import diffusion
    from hdb_jax.sd import model
    from hdb_jax.sd import tiny as tiny_lib

    key, dtype = jax.random.PRNGKey(seed), jnp.dtype(dtype)
    if channels is None:  # drawn on the host: seconds, where compiling SD 1.5's init takes longer
        sd = model.StableDiffusion.from_configs(
            model.sd15_configs(), name="sd15", dtype=dtype, attention=attention, attention_chunk=chunk
        )
        params = sd.random_params(key)["unet"]
    else:
        sd = tiny_lib.tiny(
            resolution=2 * latent,
            unet_channels=channels,
            attention=attention,
            attention_chunk=chunk,
            dtype=dtype,
        )
        params = sd.init_params(key, resolution=2 * latent)["unet"]
    if dtype != jnp.float32:
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    adapter = A.Adapter.create(A.LoRA(rank=4, alpha=4), params, [A.PATTERNS["unet_attention"]], "unet")
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=1e-2))
    sched_state = sd.noise_scheduler.create_state()

    def loss_fn(trainable, unet_params, latents, context, rng):
        noisy, timesteps, target = diffusion.noise_and_target(sd, sched_state, latents, rng)

        def predict(trainable, noisy):
            with adapter.attach(trainable):
                return sd.predict(unet_params, noisy, timesteps, context)

        if remat:
            predict = jax.checkpoint(predict, policy=getattr(jax.checkpoint_policies, remat))
        pred = predict(trainable, noisy)
        return jnp.mean(jnp.square(pred - target))

    def step(state, unet_params, latents, context, rng):
        rng = jax.random.fold_in(rng, state["step"])
        loss, grads = jax.value_and_grad(loss_fn)(state["trainable"], unet_params, latents, context, rng)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, loss

    trainable = adapter.init(jax.random.fold_in(key, 1))
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "opt_state": optimizer.init(trainable)}
    latents = jax.random.normal(jax.random.fold_in(key, 2), (batch, 4, latent, latent))
    context = jax.random.normal(jax.random.fold_in(key, 3), (batch, 77, sd.unet.cross_attention_dim))
    args = [state, params, latents, context, jax.random.fold_in(key, 4)]
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(*args).compile()
    compile_s = time.perf_counter() - t0

    def run():
        args[0], loss = compiled(*args)
        return float(loss)  # blocks

    run.compiled = compiled
    return run, compile_s, sd.configs


# -------------------------------------------------------------------- PyTorch
def build_torch_step(configs, *, batch, latent, seed=0, device="cpu", dtype="float32"):
    """diffusers ``UNet2DConditionModel`` + peft LoRA as diffusers' DreamBooth LoRA script does."""
    import contextlib

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    with torch.device(device):  # built where it runs (SD 1.5's 860 M weights never touch the host)
        unet = UNet2DConditionModel(**strip(configs["unet"]))
    unet.requires_grad_(False)
    low = getattr(torch, dtype) if dtype != "float32" else None
    if low is not None:
        unet.to(dtype=low)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    unet.train()
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:  # peft makes them in the base layer's dtype; they train in float32, as ours
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(lora, lr=1e-4, weight_decay=1e-2)
    scheduler = DDPMScheduler(**strip(configs["scheduler"]))
    latents = torch.randn(batch, 4, latent, latent, device=device, dtype=low)
    context = torch.randn(batch, 77, configs["unet"]["cross_attention_dim"], device=device, dtype=low)
    autocast = (
        (lambda: torch.autocast(torch.device(device).type, dtype=low))
        if low is not None
        else contextlib.nullcontext
    )

    def run():
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast():
            pred = unet(noisy, timesteps, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return run


# -------------------------------------------------------------------- timing
def time_blocks(runs: dict, *, warmup: int, steps: int, blocks: int) -> tuple[dict, dict]:
    """Seconds per call and CPU seconds per call of each callable, in alternating blocks.

    Each block runs one callable ``steps / blocks`` times in a row after ``warmup`` untimed calls,
    so slow drifts in machine load hit every callable alike. (Round-robin by single steps made
    each side's idle-spinning thread pools slow the other several-fold.)
    """
    times = {name: [] for name in runs}
    cpu = {name: 0.0 for name in runs}
    per_block = max(1, steps // blocks)
    for _ in range(blocks):
        for name, run in runs.items():
            for _ in range(warmup):
                run()
            c0 = time.process_time()
            for _ in range(per_block):
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
            cpu[name] += time.process_time() - c0
    return times, {name: cpu[name] / len(times[name]) for name in runs}


def _parse_attention(spec: str, default_chunk: int) -> tuple[str, int]:
    impl, _, chunk = spec.partition(":")
    return impl, int(chunk) if chunk else default_chunk


def run_child(args) -> None:
    """Runs every config on ``args.cores`` cores (set before JAX or torch start their pools)."""
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[: args.cores])

    import jax

    from hdb_jax.sd import attention as attention_lib

    specs = args.attention.split(",") if args.attention else [attention_lib.DEFAULT_IMPLEMENTATION]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    if args.device == "cuda" and jax.default_backend() != "gpu":
        sys.exit(f"--device cuda: JAX's default backend is {jax.default_backend()!r}, not a GPU")
    print(
        f"--- {args.cores} core(s): jax {jax.__version__} ({jax.devices()[0].device_kind}), {args.dtype}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, load average {load}",
        flush=True,
    )
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.cores)
        where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"torch {torch.__version__} on {where}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for name in args.configs.split(","):
        channels, latent = CONFIGS[name], args.latent or LATENT.get(name, 32)
        runs, configs, compiled = {}, None, {}
        for spec in specs:
            impl, chunk = _parse_attention(spec, attention_lib.DEFAULT_CHUNK)
            run, compile_s, configs = build_jax_step(
                channels,
                batch=args.batch,
                latent=latent,
                attention=impl,
                chunk=chunk,
                remat=args.remat,
                dtype=args.dtype,
            )
            label = f"ours[{attention_lib.resolve(impl)}:{chunk}]"  # auto: what it means here
            runs[label], compiled[label] = run, compile_s
            print(f"{name} {channels}: {label} compiled in {compile_s:.1f}s", flush=True)
        if not args.no_torch:
            runs["torch"] = build_torch_step(
                configs, batch=args.batch, latent=latent, device=args.device, dtype=args.dtype
            )
        times, cpu = time_blocks(runs, warmup=args.warmup, steps=args.steps, blocks=args.blocks)
        torch_ms = 1e3 * statistics.median(times["torch"]) if "torch" in times else None
        for label, ts in times.items():
            ms = 1e3 * statistics.median(ts)
            line = (
                f"{name:7s} {args.cores}c {label:18s} median {ms:7.1f} ms  min {1e3 * min(ts):7.1f}"
                f"  cpu {1e3 * cpu[label]:7.1f} ms/step"
            )
            if torch_ms and label != "torch":
                line += f"  ours/torch {ms / torch_ms:.2f} (min {min(ts) / min(times['torch']):.2f})"
            print(line, flush=True)
            rows.append(
                dict(config=name, label=label, cores=args.cores, device=args.device, dtype=args.dtype,
                     batch=args.batch, latent=latent, compile_s=compiled.get(label), median_ms=ms,
                     min_ms=1e3 * min(ts), cpu_ms=1e3 * cpu[label], steps=len(ts),
                     ratio=ms / torch_ms if torch_ms and label != "torch" else None)
            )  # fmt: skip
    if args.json:  # one child per core count: each appends its rows
        found = json.load(open(args.json)) if os.path.exists(args.json) else {"rows": []}
        found.update(jax=jax.__version__, device_kind=jax.devices()[0].device_kind)
        found["rows"] += rows
        with open(args.json, "w") as f:
            json.dump(found, f, indent=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,medium", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument(
        "--attention", default=None, help="comma list of IMPL[:CHUNK]; default: the model's default"
    )
    parser.add_argument(
        "--cores",
        default=str(len(os.sched_getaffinity(0))),
        help="comma list of core counts, each run in its own process",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 32; sd15: 64)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per block")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side")
    parser.add_argument("--remat", default=None, help="a jax.checkpoint_policies name for the UNet")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-thp", action="store_true", help=f"do not set GLIBC_TUNABLES={THP_TUNABLE}")
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="cuda: both sides on the GPU"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", help="append every result row to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.cores = int(args.cores)
        return run_child(args)
    env = dict(os.environ)
    if not args.no_thp:
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join(tunables + [THP_TUNABLE])
    if args.device == "cuda":  # torch shares the GPU: JAX takes memory as it needs it
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    else:  # ours on the CPU even where JAX would pick a GPU
        env.setdefault("JAX_PLATFORMS", "cpu")
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    for cores in args.cores.split(","):
        # glibc reads its tunables at process start, and JAX sizes its thread pool once: one
        # child process per core count, the two frameworks back to back inside it.
        cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--child", "--cores", cores]
        subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
