"""Adapter fine-tuning step: ours (JAX/Flax) against PyTorch diffusers + peft LoRA, on CPU.

Run from the repository root: ``python benchmarks/finetune_step.py`` (see ``--help``). It prints,
per config, compile time, our median step, PyTorch's median step and the ratio. No measurement is
recorded here yet: runs on the shared 2-core development machine were not yet complete.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {"tiny": (32, 64), "medium": (64, 128, 256)}
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# Backs glibc's large mmap'd blocks with transparent huge pages (kernel THP mode "madvise").
# XLA:CPU allocates its temporaries afresh on every call; with 4 KiB pages every step then
# page-faults on each of them (28k faults/step tiny, 80k medium, ~10% of the step).
THP_TUNABLE = "glibc.malloc.hugetlb=1"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


# -------------------------------------------------------------------- ours
def build_jax_step(channels, *, batch, latent, attention, chunk, remat=None, seed=0):
    """Our UNet-only adapter step (same structure as ``hdb_jax.train.make_train_step``).

    Args:
      channels: the UNet's ``block_out_channels``.
      batch: samples per step.
      latent: latent side (the UNet sees ``[batch, 4, latent, latent]``).
      attention: the attention implementation (:mod:`hdb_jax.sd.attention`).
      chunk: queries per attention chunk.
      remat: None, or the name of a ``jax.checkpoint_policies`` policy to rematerialise the
        whole UNet with.
      seed: PRNG seed of the weights and inputs.

    Returns:
      ``(run, compile_seconds, configs)``: ``run()`` performs one step and blocks on its loss.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from hdb_jax import adapters as A
    from hdb_jax import diffusion
    from hdb_jax.sd import model

    sd = model.tiny(
        resolution=2 * latent, unet_channels=channels, attention=attention, attention_chunk=chunk
    )
    key = jax.random.PRNGKey(seed)
    params = sd.init_params(key, resolution=2 * latent)["unet"]
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
def build_torch_step(configs, *, batch, latent, seed=0):
    """diffusers ``UNet2DConditionModel`` + peft LoRA as diffusers' DreamBooth LoRA script does."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    unet = UNet2DConditionModel(**strip(configs["unet"]))
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    unet.train()
    lora = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=1e-4, weight_decay=1e-2)
    scheduler = DDPMScheduler(**strip(configs["scheduler"]))
    latents = torch.randn(batch, 4, latent, latent)
    context = torch.randn(batch, 77, configs["unet"]["cross_attention_dim"])

    def run():
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
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
    print(f"--- {args.cores} core(s): jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, load average {load}", flush=True)
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.cores)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for name in args.configs.split(","):
        channels = CONFIGS[name]
        runs, configs = {}, None
        for spec in specs:
            impl, chunk = _parse_attention(spec, attention_lib.DEFAULT_CHUNK)
            run, compile_s, configs = build_jax_step(
                channels, batch=args.batch, latent=args.latent, attention=impl, chunk=chunk,
                remat=args.remat,
            )
            runs[f"ours[{impl}:{chunk}]"] = run
            print(f"{name} {channels}: ours[{impl}:{chunk}] compiled in {compile_s:.1f}s", flush=True)
        if not args.no_torch:
            runs["torch"] = build_torch_step(configs, batch=args.batch, latent=args.latent)
        times, cpu = time_blocks(runs, warmup=args.warmup, steps=args.steps, blocks=args.blocks)
        torch_ms = 1e3 * statistics.median(times["torch"]) if "torch" in times else None
        for label, ts in times.items():
            ms = 1e3 * statistics.median(ts)
            line = (f"{name:7s} {args.cores}c {label:18s} median {ms:7.1f} ms  min {1e3 * min(ts):7.1f}"
                    f"  cpu {1e3 * cpu[label]:7.1f} ms/step")
            if torch_ms and label != "torch":
                line += f"  ours/torch {ms / torch_ms:.2f} (min {min(ts) / min(times['torch']):.2f})"
            print(line, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,medium", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--attention", default=None,
                        help="comma list of IMPL[:CHUNK]; default: the model's default")
    parser.add_argument("--cores", default=str(len(os.sched_getaffinity(0))),
                        help="comma list of core counts, each run in its own process")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32: 32x32 latents)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per block")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side")
    parser.add_argument("--remat", default=None, help="a jax.checkpoint_policies name for the UNet")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-thp", action="store_true", help=f"do not set GLIBC_TUNABLES={THP_TUNABLE}")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.cores = int(args.cores)
        return run_child(args)
    env = dict(os.environ)
    if not args.no_thp:
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join(tunables + [THP_TUNABLE])
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    for cores in args.cores.split(","):
        # glibc reads its tunables at process start, and JAX sizes its thread pool once: one
        # child process per core count, the two frameworks back to back inside it.
        cmd = [sys.executable, os.path.abspath(__file__), *forwarded, "--child", "--cores", cores]
        subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
