"""Fast personalisation at SD 1.5 shapes on one accelerator: hypernetwork + relaxation + finetune.

What is timed is what ``python -m hdb_jax.personalize`` does per photo, through the same
:class:`hdb_jax.stages.personalize.Personalizer` and its compiled programs, on random weights:

* the base model: SD 1.5's UNet, VAE and CLIP text encoder (``hdb_jax.sd.model.sd15_configs``) at
  512 px, computing in ``--dtype`` (bfloat16) with its frozen weights stored in that dtype too,
  as diffusers' DreamBooth LoRA script keeps them; weights from ``sd.random_params``; attention is
  the model's default (``auto``: cuDNN / XLA fused attention on a GPU, our flash kernel on CPU);
* the hypernetwork of ``configs/hypernet.py:sd15`` (ViT-H/14 encoder, 4 decoder blocks, 4
  refinement steps, 176 weight tokens of LiDB a=100 b=50 r=1), randomly initialised and handed
  to the Personalizer as an in-memory bundle (no 2.5 GB file written and read back); it computes
  in float32, as a bundle loaded by ``hdb_jax.hypernet.bundle.load`` does;
* per identity: ``Personalizer.predict`` (one photo -> LiDB weights), the ``fresh`` relaxation
  into a rank-4 LoRA and ``--steps`` (40) finetune steps on 4 augmented views of the photo, as
  one compiled program (``Personalizer.finetune_many``: relax, the program, fold, per identity).

Batches: ``1`` identity (seconds per identity) and ``4`` identities in one program (identities
per second); the batch-4 program vmaps ``--map_batch`` identities together (``config.relax.
map_batch``), 4 by default: the UNet then sees 16 images per step. Every batch size is its own
compiled program; the prediction program (one photo) is shared. Reported separately: compile
seconds per program (cold: no persistent cache), the first call (eager relaxation ops and
transfers included) and steady-state calls (``--repeats`` - 1 more). Per call: ``predict_s``
(the N predictions), ``finetune_s`` (``finetune_many``: relaxation, the compiled program, fold)
and their sum ``total_s``; ``relax_s`` is the relaxation alone, timed once more on its own (it is
eager, outside any compiled program). Also the compiled memory (``memory_analysis``) and the
device's peak bytes in use. The photos are random pixels (the cost does not depend on them).

The JSON is rewritten after every phase, so a run cut short by a timeout keeps what finished.

Run:
  python benchmarks/gpu_personalize.py --out benchmarks/results/gpu_personalize.json   # one GPU
  python benchmarks/gpu_personalize.py --reduced --steps 3      # tiny model, 32 px, float32, CPU
``benchmarks/gpu.sh`` runs it on a GPU machine with ``benchmarks/finetune_step.py`` and
collects both into ``gpu.json`` (``--collect DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSIONS = ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "peft", "numpy")


def _versions() -> dict:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def _hypernet_config(size: str):
    """``configs/hypernet.py:<size>``: the adapter and network recipe of stage 2."""
    spec = importlib.util.spec_from_file_location(
        "_hdb_hypernet_config", os.path.join(ROOT, "configs", "hypernet.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(size)


def build(args):
    """``(personalizer, info)``: random SD-family weights and hypernetwork, loaded as ``Personalizer.load`` does."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hdb_jax import adapters as A
    from hdb_jax.adapters import basis as basis_io
    from hdb_jax.blocks import build as build_lib
    from hdb_jax.hypernet import bundle as bundle_lib
    from hdb_jax.hypernet.model import build_hypernet
    from hdb_jax.sd import model, tiny, vocab
    from hdb_jax.stages import personalize

    size = "tiny" if args.reduced else "sd15"
    dtype = jnp.dtype(args.dtype)
    if args.reduced:
        sd = tiny.tiny(resolution=args.resolution, dtype=dtype)
    else:  # SD 1.5's tokenizer is not available offline; our tiny BPE ids fit its 49408-row embedding
        sd = model.StableDiffusion.from_configs(
            model.sd15_configs(), vocab.tiny_tokenizer(), name="sd15-random", dtype=dtype
        )
    key = jax.random.PRNGKey(args.seed)
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), sd.random_params(key, args.resolution))

    hc = _hypernet_config(size)
    adapters = build_lib.adapters(hc.adapter, jax.eval_shape(lambda: params))
    kind = A.LiDB(**hc.adapter.lidb.to_dict())
    h = hc.net
    net, init = build_hypernet(
        h.encoder, adapters, kind, iterations=h.iterations, mode=h.mode, num_blocks=h.num_blocks,
        num_heads=h.num_heads, train_encoder=h.train_encoder, width=h.width or None, offset=h.offset,
    )  # fmt: skip
    basis = {c: a.basis(jax.random.fold_in(key, 2)) for c, a in adapters.items()}
    digest = basis_io.basis_hash({f"{c}.{p}": f for c, t in basis.items() for p, f in t.items()})
    arch = {f: h[f] for f in bundle_lib.ARCH_FIELDS}
    bundle = bundle_lib.Bundle(net, init(jax.random.fold_in(key, 1)), adapters, basis, digest, {"arch": arch})

    config = personalize.default_config("fresh")
    config.model.source, config.model.resolution, config.compile_cache = "random", args.resolution, ""
    config.relax.steps = args.steps
    personalize.check_settings(config)
    r = config.relax
    optimizer = build_lib.optimizer(
        dict(learning_rate=r.learning_rate, weight_decay=r.weight_decay, grad_clip=r.grad_clip)
    )
    ids = np.asarray(sd.tokenize([config.prompt]))[0]
    p = personalize.Personalizer(sd, params, bundle, config, "random-" + size, optimizer, ids)
    jax.block_until_ready((params, bundle.params, basis))
    count = lambda t: int(sum(x.size for x in jax.tree_util.tree_leaves(t)))  # noqa: E731
    from hdb_jax.sd import attention as attention_lib

    info = {
        "shapes": size, "resolution": p.resolution, "dtype": str(dtype), "steps": args.steps,
        "views_per_step": int(r.batch_size), "relax": {"variant": r.variant, "rank": int(r.rank)},
        "attention": attention_lib.resolve(sd.attention), "encoder": h.encoder,
        "weight_tokens": sum(len(a.targets) for a in adapters.values()),
        "parameters": {**{c: count(params[c]) for c in params}, "hypernet": count(bundle.params)},
    }  # fmt: skip
    return p, info


def _memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
        return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output")}
    except Exception as err:  # not every backend reports it
        return {"error": repr(err)}


def _peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def time_batch(p, n: int, args, record: dict, save) -> None:
    """Compiles the N-identity programs, then times ``--repeats`` personalisations of N photos."""
    import jax
    import numpy as np

    t0 = time.perf_counter()
    program = p._compiled_run(n, args.steps)  # the Personalizer's own compile (cached per N, K)
    record["compile_s"] = time.perf_counter() - t0
    record["program_bytes"] = _memory(program)
    save()
    rng = np.random.default_rng(args.seed + n)
    photos = rng.integers(0, 256, (n, p.resolution, p.resolution, 3), dtype=np.uint8)
    keys = jax.random.split(jax.random.PRNGKey(args.seed + 100 + n), n)
    record["calls"] = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        predicted = [p.predict(photo) for photo in photos]
        jax.block_until_ready(predicted)
        t1 = time.perf_counter()
        jax.block_until_ready([p._start(pr, k)[1] for pr, k in zip(predicted, keys)])  # relaxation alone
        t2 = time.perf_counter()
        out = p.finetune_many(predicted, photos, keys, args.steps)  # relaxes again, runs, folds
        jax.block_until_ready([tree for _, tree, _ in out])
        t3 = time.perf_counter()
        losses = np.stack([loss for _, _, loss in out])
        norms = [
            float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree_util.tree_leaves(pr))))
            for pr in predicted
        ]
        record["calls"].append({
            "predict_s": t1 - t0, "relax_s": t2 - t1, "finetune_s": t3 - t2, "total_s": (t1 - t0) + (t3 - t2),
            "identities": len(out), "prediction_norms": norms, "loss_shape": list(losses.shape),
            "loss_first": losses[:, 0].tolist(), "loss_last": losses[:, -1].tolist(),
            "finite": bool(np.isfinite(losses).all()),
        })  # fmt: skip
        steady = record["calls"][1:] or record["calls"]
        total = float(np.median([c["total_s"] for c in steady]))
        record.update(steady_total_s=total, seconds_per_identity=total / n, identities_per_s=n / total)
        record["peak_bytes_in_use"] = _peak_bytes()
        save()


def run(args) -> dict:
    import jax

    if args.reduced:
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() == "cpu" and not args.allow_cpu:  # a broken CUDA plugin falls back silently
        sys.exit("gpu_personalize: JAX found no accelerator (use --reduced, or --allow_cpu to insist)")
    result = {
        "benchmark": "gpu_personalize", "reduced": args.reduced, "complete": False, "versions": _versions(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "backend": jax.default_backend(), "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind, "batches": {},
        "settings": {k: getattr(args, k) for k in ("steps", "repeats", "map_batch", "seed")},
    }  # fmt: skip

    def save() -> None:  # the headline figures: steady seconds per identity and identities per second
        result["summary"] = {
            f"batch{n}": {k: r.get(k) for k in ("seconds_per_identity", "identities_per_s")}
            for n, r in result["batches"].items()
        }
        _write(args.out, result)

    t0 = time.perf_counter()
    p, info = build(args)
    result.update(info, setup_s=time.perf_counter() - t0)
    print(f"built {info['shapes']} in {result['setup_s']:.1f}s: {info['parameters']}", flush=True)
    save()
    t0 = time.perf_counter()
    p._compiled_predict(None)
    result["compile_predict_s"] = time.perf_counter() - t0
    save()
    for n in args.batches:
        config = p.config.copy_and_resolve_references()
        config.relax.map_batch = min(args.map_batch, n)
        runner = dataclasses.replace(p, config=config, _predict=p._predict, _run={})  # shares prediction
        record = result["batches"][str(n)] = {"identities": n, "map_batch": config.relax.map_batch}
        print(f"batch {n}: compiling ({args.steps} steps, map_batch {config.relax.map_batch})", flush=True)
        try:
            time_batch(runner, n, args, record, save)
        except Exception as err:  # e.g. out of memory: keep the other batch's figures
            record["error"] = f"{type(err).__name__}: {err}"[:2000]
            print(f"batch {n} failed: {record['error']}", file=sys.stderr, flush=True)
            save()
            continue
        print(
            f"batch {n}: compile {record['compile_s']:.1f}s, steady {record['steady_total_s']:.2f}s",
            flush=True,
        )
    result["complete"] = not any("error" in r for r in result["batches"].values())
    save()
    return result


def _fmt(v, digits=3) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.0f}"


def table(result: dict) -> str:
    """The personalisation rows: one per batch size."""
    head = (
        f"{'batch':>5} {'map':>4} {'compile s':>10} {'first s':>8} {'steady s':>9} {'predict':>8} "
        f"{'relax':>7} {'finetune':>9} {'s/identity':>11} {'ident/s':>8} {'peak GiB':>9}"
    )
    rows = [
        f"{result.get('shapes')} @ {result.get('resolution')} px, {result.get('dtype')}, {result.get('steps')} steps, "
        f"{result.get('device_kind')}; setup {_fmt(result.get('setup_s'))} s, predict compile "
        f"{_fmt(result.get('compile_predict_s'))} s",
        head,
    ]
    for n, r in result.get("batches", {}).items():
        calls = r.get("calls") or [{}]
        last, peak = calls[-1], r.get("peak_bytes_in_use")
        rows.append(
            f"{n:>5} {r.get('map_batch', '-'):>4} {_fmt(r.get('compile_s')):>10} {_fmt(calls[0].get('total_s')):>8} "
            f"{_fmt(r.get('steady_total_s')):>9} {_fmt(last.get('predict_s')):>8} {_fmt(last.get('relax_s')):>7} "
            f"{_fmt(last.get('finetune_s')):>9} {_fmt(r.get('seconds_per_identity')):>11} "
            f"{_fmt(r.get('identities_per_s')):>8} {_fmt(peak / 2**30 if peak else None):>9}"
        )
    for n, r in result.get("batches", {}).items():
        if "error" in r:
            rows.append(f"batch {n} failed: {r['error'][:300]}")
    if not result.get("complete"):
        rows.append("(incomplete: a batch failed or the run was cut short)")
    return "\n".join(rows)


def collect(directory: str) -> dict:
    """``gpu.json`` in ``directory``: the machine, the versions and every part ``gpu.sh`` wrote."""

    def read(name: str) -> str | None:
        path = os.path.join(directory, name)
        return open(path).read() if os.path.exists(path) else None

    parts = {}
    for name in ("gpu_personalize", "gpu_finetune_step"):
        text = read(name + ".json")
        parts[name] = json.loads(text) if text else None
    rcs = read("exit_codes.txt") or ""
    result = {
        "machine": {
            "nvidia_smi": (read("nvidia_smi.csv") or "").strip(),
            "python": sys.version.split()[0], "versions": _versions(), "cpus": os.cpu_count(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        },
        "exit_codes": dict(line.split("=", 1) for line in rcs.split() if "=" in line),
        **parts,
    }  # fmt: skip
    _write(os.path.join(directory, "gpu.json"), result)
    if parts["gpu_personalize"]:
        print(table(parts["gpu_personalize"]))
    for row in (parts["gpu_finetune_step"] or {}).get("rows", []):
        print(f"finetune step {row['config']} {row['label']}: median {row['median_ms']:.1f} ms"
              + (f", ours/torch {row['ratio']:.2f}" if row.get("ratio") else ""))  # fmt: skip
    print(f"wrote {os.path.join(directory, 'gpu.json')}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reduced", action="store_true", help="tiny model and encoder, 32 px, float32, on CPU"
    )
    parser.add_argument(
        "--out", help="result JSON (default: benchmarks/results/gpu_personalize.json; --reduced: a temp file)"
    )
    parser.add_argument(
        "--dtype", help="computation and frozen-weight dtype (default bfloat16; --reduced float32)"
    )
    parser.add_argument("--resolution", type=int, help="pixels (default 512; --reduced 32)")
    parser.add_argument("--steps", type=int, default=40, help="finetune steps per identity")
    parser.add_argument("--batches", default="1,4", help="identities per program, comma list")
    parser.add_argument(
        "--map_batch", type=int, default=4, help="identities vmapped together (config.relax.map_batch)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="calls per batch: the first, then steady ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--allow_cpu", action="store_true", help="run the full shapes even without an accelerator"
    )
    parser.add_argument(
        "--collect", metavar="DIR", help="only write DIR/gpu.json from the parts gpu.sh left there"
    )
    args = parser.parse_args(argv)
    if args.collect:
        collect(args.collect)
        return 0
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtype = args.dtype or ("float32" if args.reduced else "bfloat16")
    args.resolution = args.resolution or (32 if args.reduced else 512)
    default_out = (
        os.path.join(tempfile.gettempdir(), "gpu_personalize_reduced.json") if args.reduced else None
    )
    args.out = args.out or default_out or os.path.join(ROOT, "benchmarks", "results", "gpu_personalize.json")
    result = run(args)
    print(table(result))
    print(f"wrote {args.out}")
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
