"""Every stage of the pipeline at Stable Diffusion 1.5 shapes, timed on this machine.

The script writes (or reuses) an SD 1.5-shaped diffusers directory with random weights, saved by
PyTorch diffusers/transformers in the layout of a downloaded checkpoint, and a CLIP vision tower
shaped like OpenCLIP ViT-H/14 (width 1280, 32 layers, 16 heads, MLP 5120, 14 px patches, 224 px).
Each stage then runs through its real command line in its own child process; we record the wall
time, the compile time the stage prints and the child's peak RSS (``os.wait4``'s ``ru_maxrss``):

1. ``load``: ``hdb_jax.blocks.build.base_model`` on the directory (torch-free loading);
2. ``subject``: ``hdb_jax.train`` with ``configs/subject.py:sd15,adapter=lidb`` on a synthetic subject;
3. ``preopt``: batched LiDB pre-optimisation (``configs/preopt.py:sd15``) of two identities;
4. ``hypernet``: hypernetwork training (``configs/hypernet.py:sd15``) on stage 3's targets;
5. ``personalize``: ``hdb_jax.personalize`` on a rendered synthetic face with stage 4's bundle;
6. ``torch_lora``: the exported LoRA loaded by PyTorch diffusers (``pipe.load_lora_weights``): one
   UNet and one text-encoder forward on fixed inputs, compared with our merged model.

Step seconds come from the loop's ``steps_per_s`` in each run's TensorBoard files (the last step
is the steady one), for pre-optimisation from the chunk's seconds over its steps (an upper bound).
Compiles are cold (no persistent compilation cache). SD 1.5's tokenizer is not available offline:
the directory carries our tiny BPE tokenizer, whose ids SD 1.5's 49408-row text embedding covers.
Batches are ``--batch`` (default 1) for the subject run, the hypernetwork and the finetune, two
identities for pre-optimisation: every network has SD 1.5's shapes at 512 px. Tensors that random
init leaves at exactly zero (biases) get small normal values, so no path is off.

Run (from the repository root; needs torch, diffusers and peft):
  python benchmarks/sd15_scale.py                  # SD 1.5 shapes -> benchmarks/results/sd15_scale.json
  python benchmarks/sd15_scale.py --reduced        # the same code path on the tiny model (minutes)
  python benchmarks/sd15_scale.py --work /big/disk --finetune-steps 4 --out my.json
  python benchmarks/sd15_scale.py --resume         # after an interruption: keeps the finished stages
The SD 1.5 run needs ~7 GB of disk in ``--work`` (model and encoder are reused by later runs) and
tens of GB of memory. Nothing here asserts on time: the figures describe one machine at one moment
(the JSON records which); only the PyTorch comparison is a correctness check.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "sd15_scale.json")
STAGES = ("load", "subject", "preopt", "hypernet", "personalize", "torch_lora")
MARKER = "sd15_scale_model.json"  # written last into the model directory: it is complete
TOLERANCE = 1e-3  # PyTorch vs ours: max abs difference over our output's max abs value


# ------------------------------------------------------------------ child stages (own process)
def _child_write(size: str, model_dir: str, encoder_dir: str, face: str) -> dict:
    """Random PyTorch SD-family pipeline and CLIP vision tower, saved as safetensors; a face PNG."""
    import diffusers
    import torch
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    from hdb_jax.hypernet.encoder import ENCODER_CONFIGS
    from hdb_jax.sd import model, tiny, vocab
    from hdb_jax.toy import synthetic

    tokenizer = vocab.tiny_tokenizer()
    configs = model.sd15_configs() if size == "sd15" else tiny.tiny_configs(tokenizer=tokenizer)
    plain = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in configs.items()}
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**plain["unet"])
    vae = diffusers.AutoencoderKL(**plain["vae"])
    text = CLIPTextModel(CLIPTextConfig(**plain["text_encoder"]))
    vision = CLIPVisionModel(CLIPVisionConfig(**ENCODER_CONFIGS[size]))
    with torch.no_grad():
        for net in (unet, vae, text, vision):
            for p in net.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
    scheduler_cls = getattr(diffusers, configs["scheduler"].get("_class_name", "DDPMScheduler"))
    modules = dict(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval())
    modules.update(scheduler=scheduler_cls.from_config(plain["scheduler"]), safety_checker=None)
    pipe = diffusers.StableDiffusionPipeline(**modules, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    vision.eval().save_pretrained(encoder_dir, safe_serialization=True)
    resolution = configs["unet"]["sample_size"] * 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    Image.fromarray(synthetic.render_batch([3_000_000], [0], ["photo"], 0, resolution)[0]).save(face)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in (("unet", unet), ("vision", vision))}
    info = {"size": size, "resolution": resolution, "params": params}
    with open(os.path.join(model_dir, MARKER), "w") as f:
        json.dump(info, f, indent=1)
    return info


def _child_load(model_dir: str) -> dict:
    """Seconds ``build.base_model`` takes to read the directory into device arrays."""
    import jax

    from hdb_jax.blocks import build

    t0 = time.perf_counter()
    sd, params = build.base_model({"source": model_dir, "resolution": 0})
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    count = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return {"load_s": seconds, "parameters": int(count), "resolution": sd.default_resolution}


def _child_compare(model_dir: str, personal_dir: str) -> dict:
    """Our merged UNet and text encoder vs PyTorch diffusers with ``load_lora_weights``, same inputs."""
    import gc

    import jax
    import numpy as np

    from hdb_jax import adapters as A
    from hdb_jax.blocks import build
    from hdb_jax.formats import personal

    files = json.load(open(os.path.join(personal_dir, "timings.json")))["files"]
    personal_file, lora_file = files["personal"], files["lora"]
    sd, params = build.base_model({"source": model_dir, "resolution": 0})
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(sd.latent_shape(sd.default_resolution)).astype(np.float32)
    timesteps = np.array([500], np.int32)
    context = rng.standard_normal((1, sd.max_text_length, sd.text_width)).astype(np.float32)
    ids = np.asarray(sd.tokenize(["a photo of sks face"]))
    adapters, trainable, frozen = personal.load_for_model(personal_file, params)
    merged = A.merge_all(params, adapters, trainable, frozen)
    ours = np.asarray(jax.jit(sd.predict)(merged["unet"], latents, timesteps, context))
    ours_text = np.asarray(jax.jit(sd.encode_text)(merged["text_encoder"], ids))
    del params, merged, trainable, frozen
    gc.collect()

    import torch
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )

    def run():
        with torch.no_grad():
            unet = pipe.unet(
                torch.from_numpy(latents), torch.from_numpy(timesteps).long(), torch.from_numpy(context)
            )
            text = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state
        return unet.sample.numpy(), text.numpy()

    base, _ = run()
    # A folder and a file name: offline, diffusers does not guess the name.
    pipe.load_lora_weights(os.path.dirname(lora_file), weight_name=os.path.basename(lora_file))
    theirs, theirs_text = run()
    injected = sum(isinstance(m, LoraLayer) for net in (pipe.unet, pipe.text_encoder) for m in net.modules())
    scale = float(np.abs(ours).max())
    return {
        "max_abs_diff": float(np.abs(ours - theirs).max()),
        "output_scale": scale,
        "relative": float(np.abs(ours - theirs).max() / max(scale, 1e-30)),
        "lora_effect": float(np.abs(theirs - base).max()),
        "text_max_abs_diff": float(np.abs(ours_text - theirs_text).max()),
        "text_scale": float(np.abs(ours_text).max()),
        "lora_layers": int(injected),
        "our_layers": int(sum(len(a.targets) for a in adapters.values())),
        "lora_file": lora_file,
    }


CHILDREN = {"write": _child_write, "load": _child_load, "compare": _child_compare}


# ------------------------------------------------------------------ the parent: processes and parsing
def _run(argv: list[str], log: str, timeout: float | None) -> dict:
    """Runs one child to completion; its wall seconds, exit code and peak RSS (its own rusage)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # cold compiles: no persistent cache
    env.update(
        XLA_FLAGS="", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    )
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        timer = threading.Timer(timeout or 1e9, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (not the running maximum)
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds, peak = time.perf_counter() - t0, usage.ru_maxrss / 1024.0  # Linux: KiB
    return {"rc": proc.returncode, "seconds": seconds, "peak_rss_mib": peak, "log": log}


def _scalars(logdir: str, tag: str) -> dict[int, float]:
    """``{step: value}`` of one scalar tag in a run's TensorBoard event files (TFRecord of Events)."""
    from tensorboardX.proto import event_pb2

    found = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 16 + length  # length, its crc, the record, its crc
            for value in event.summary.value:
                if value.tag == tag:
                    found[int(event.step)] = float(value.simple_value)
    return found


def _loop_steps(record: dict, workdir: str) -> None:
    """First and last step seconds from the loop's ``steps_per_s`` (one value per step)."""
    rates = _scalars(os.path.join(workdir, "tb"), "steps_per_s")
    if rates:
        record["step_s"] = 1.0 / rates[max(rates)]
        record["first_step_s"] = 1.0 / rates[min(rates)]


def machine() -> dict:
    """What ran the benchmark: CPU model and cores (Linux ``/proc``), memory, library versions, date."""
    read = lambda path: open(path).read() if os.path.exists(path) else ""  # noqa: E731
    cpu = re.search(r"^model name\s*:\s*(.+)$", read("/proc/cpuinfo"), re.M)
    memory = re.search(r"MemTotal:\s+(\d+)", read("/proc/meminfo"))
    installed = {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions()}
    versions = {
        n: installed.get(n) for n in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers", "peft")
    }
    return {
        "cpu": cpu.group(1).strip() if cpu else "unknown",
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory.group(1)) / 2**20, 1) if memory else None,
        "python": sys.version.split()[0],
        "jax": versions["jax"],
        "versions": versions,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()),
    }


def _stage_commands(size: str, p: dict, args) -> dict[str, list[str]]:
    """The command line of every stage (``size``: ``sd15`` or ``tiny``; ``p``: the paths)."""
    src, b = f"--config.model.source={p['model']}", f"{args.batch}"
    script, compare = os.path.abspath(__file__), {"model_dir": p["model"], "personal_dir": p["personal"]}
    return {
        "load": [script, "_child", "load", json.dumps({"model_dir": p["model"]}), p["load_json"]],
        "subject": ["-m", "hdb_jax.train", "--config", f"configs/subject.py:{size},adapter=lidb", src]
        + [f"--config.workdir={p['subject']}", "--config.steps=2", "--config.log_every=1"]
        + ["--config.export.sample_prompts=()", f"--config.data.batch_size={b}"],
        "preopt": ["-m", "hdb_jax.train", "--config", f"configs/preopt.py:{size}", src]
        + [f"--config.workdir={p['preopt']}", "--config.steps=2", "--config.data.identities=(0,1)"]
        + ["--config.chunk_size=2"],
        "hypernet": ["-m", "hdb_jax.train", "--config", f"configs/hypernet.py:{size}", src]
        + [f"--config.workdir={p['hypernet']}", "--config.steps=2", "--config.log_every=1"]
        + [f"--config.batch_size={b}", f"--config.net.encoder_path={p['encoder']}"]
        + [f"--config.data.preopt_dir={p['preopt']}", "--config.data.heldout=()"]
        + [f"--config.adapter.basis_file={os.path.join(p['preopt'], 'lidb_basis.safetensors')}"],
        "personalize": ["-m", "hdb_jax.personalize", "--config", "configs/personalize.py", src]
        + [f"--config.bundle={os.path.join(p['hypernet'], 'hypernet')}", f"--image={p['face']}"]
        + [f"--out={p['personal']}", f"--config.relax.steps={args.finetune_steps}"]
        + [f"--config.relax.batch_size={b}", "--config.compile_cache="],
        "torch_lora": [script, "_child", "compare", json.dumps(compare), p["compare_json"]],
    }


COMPILE_LINES = {"subject": "compiled train step", "preopt": "compiled pre-optimisation step"}


def _finish(name: str, record: dict, p: dict, args) -> None:
    """Adds the stage's own figures (compile seconds, step seconds, results) to its record."""
    text = open(record["log"]).read()
    if name in COMPILE_LINES:
        found = re.search(COMPILE_LINES[name] + r" in ([\d.]+)s", text)
        record["compile_s"] = float(found.group(1)) if found else math.nan
    if name == "load":
        record.update(json.load(open(p["load_json"])))
        record["notes"] = f"base_model {record['load_s']:.1f} s, {record['parameters'] / 1e6:.0f} M params"
    elif name == "subject":
        _loop_steps(record, p["subject"])
        record["notes"] = f"LiDB, batch {args.batch}, 2 steps"
    elif name == "preopt":
        chunk = _scalars(os.path.join(p["preopt"], "tb"), "chunk/seconds")
        record["step_s"] = chunk[max(chunk)] / 2 if chunk else math.nan
        record["notes"] = "2 identities in one chunk, 2 steps"
    elif name == "hypernet":
        found = re.search(r"hypernet step: (\{.*\})", text)
        record["summary"] = summary = json.loads(found.group(1)) if found else {}
        record["compile_s"] = float(summary.get("compile_s", math.nan))
        _loop_steps(record, p["hypernet"])
        temp = summary.get("temp_bytes")
        record["notes"] = f"batch {args.batch}, 2 steps" + (f", temp {temp / 2**20:.0f} MiB" if temp else "")
    elif name == "personalize":
        record["report"] = json.load(open(os.path.join(p["personal"], "timings.json")))
        t = record["report"]["timings_s"]
        record["compile_s"], record["step_s"] = float(t["compile"]), t["finetune"] / args.finetune_steps
        record["notes"] = (
            f"load {t['load']:.1f}, hypernet {t['hypernet']:.1f}, finetune {t['finetune']:.1f} "
            f"({args.finetune_steps} steps, batch {args.batch}), export {t['export']:.1f}"
        )
    elif name == "torch_lora":
        record["comparison"] = c = json.load(open(p["compare_json"]))
        c["within_tolerance"] = c["max_abs_diff"] <= TOLERANCE * c["output_scale"]
        record["notes"] = (
            f"max|diff| {c['max_abs_diff']:.2e} of scale {c['output_scale']:.3g} "
            f"({'ok' if c['within_tolerance'] else 'TOO LARGE'}), LoRA effect {c['lora_effect']:.2e}"
        )
    elif name == "setup":
        record["notes"] = "PyTorch random init + save_pretrained (not a pipeline stage)"


def _table(records: dict) -> str:
    head = f"{'stage':<12}{'seconds':>9}{'compile s':>11}{'step s':>9}{'peak RSS MiB':>14}  notes"
    rows = [head, "-" * len(head)]

    def fmt(v) -> str:
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"

    for name, r in records.items():
        rows.append(
            f"{name:<12}{fmt(r.get('seconds')):>9}{fmt(r.get('compile_s')):>11}{fmt(r.get('step_s')):>9}"
            f"{fmt(r.get('peak_rss_mib')):>14}  {r.get('notes', '')}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":  # _child <name> <json kwargs> <result file>
        sys.path.insert(0, ROOT)
        result = CHILDREN[argv[1]](**json.loads(argv[2]))
        if len(argv) > 3:
            with open(argv[3], "w") as f:
                json.dump(result, f, indent=1)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reduced", action="store_true", help="tiny shapes, same code path (fast)")
    parser.add_argument("--work", help="work directory (model, encoder, runs, logs)")
    parser.add_argument("--out", help="result JSON")
    parser.add_argument("--finetune-steps", type=int, default=2, help="personalisation finetune steps")
    parser.add_argument("--batch", type=int, default=1, help="batch of subject, hypernet and finetune")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per stage (0: none)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the stages an interrupted run of the same settings finished",
    )
    args = parser.parse_args(argv)
    size = "tiny" if args.reduced else "sd15"
    if args.reduced and args.out and os.path.realpath(args.out) == os.path.realpath(COMMITTED):
        parser.error(f"--reduced never writes the committed SD 1.5 results ({COMMITTED}); pick another --out")
    default_work = os.path.join(tempfile.gettempdir(), "hdb_sd15_scale")  # reused: the model stays
    work = os.path.abspath(
        args.work or (tempfile.mkdtemp(prefix="hdb_sd15r_") if args.reduced else default_work)
    )
    out = os.path.abspath(
        args.out or (os.path.join(work, "sd15_scale_reduced.json") if args.reduced else COMMITTED)
    )
    runs = os.path.join(work, "runs")
    done_file = os.path.join(runs, "finished_stages.json")  # each finished stage's record, as it ends
    settings = {"batch": args.batch, "finetune_steps": args.finetune_steps, "steps": 2}
    done = json.load(open(done_file)) if args.resume and os.path.isfile(done_file) else {}
    if done.get("settings") != settings or done.get("shapes") != size:
        done = {"settings": settings, "shapes": size, "stages": {}}
        shutil.rmtree(runs, ignore_errors=True)  # a fresh run: the jobs would otherwise resume or skip
    for d in (runs, os.path.join(work, "logs")):
        os.makedirs(d, exist_ok=True)
    p = {k: os.path.join(work, f"{k}_{size}") for k in ("model", "encoder")}  # the reusable inputs
    p.update({k: os.path.join(runs, k) for k in ("subject", "preopt", "hypernet", "personal")})
    p.update(face=os.path.join(work, f"face_{size}.png"), load_json=os.path.join(runs, "load.json"))
    p["compare_json"] = os.path.join(runs, "compare.json")
    result = {"shapes": size, "reduced": args.reduced, "machine": machine(), "work": work, "order": STAGES}
    result["settings"] = settings
    records, timeout = {}, args.timeout or None
    log = lambda n: os.path.join(work, "logs", f"{n}.log")  # noqa: E731
    marker, commands = os.path.join(p["model"], MARKER), _stage_commands(size, p, args)
    if os.path.exists(marker) and json.load(open(marker)).get("size") == size and os.path.isfile(p["face"]):
        records["setup"] = {"seconds": 0.0, "notes": f"reused {p['model']}"}
    else:
        for d in (p["model"], p["encoder"]):
            shutil.rmtree(d, ignore_errors=True)
        kwargs = {"size": size, "model_dir": p["model"], "encoder_dir": p["encoder"], "face": p["face"]}
        commands = {"setup": [os.path.abspath(__file__), "_child", "write", json.dumps(kwargs)], **commands}
    failed = None
    for name, command in commands.items():
        if name in done["stages"]:  # --resume: finished by an earlier invocation (its record says when)
            records[name] = done["stages"][name]
            print(f"[{name}] finished earlier: {records[name]['seconds']:.1f} s", flush=True)
            continue
        print(f"[{name}] {' '.join(command)}", flush=True)
        stage_dir = p.get("personal" if name == "personalize" else name)
        if stage_dir and stage_dir.startswith(runs):  # what an interrupted attempt left: start clean
            shutil.rmtree(stage_dir, ignore_errors=True)
        records[name] = r = _run(command, log(name), timeout)
        r["command"] = command
        if r["rc"]:
            failed, r["notes"] = name, f"FAILED (rc {r['rc']}), see {log(name)}"
            print(open(log(name)).read()[-4000:], file=sys.stderr)
            break
        _finish(name, r, p, args)
        r["finished_at"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        r["load_average"] = list(os.getloadavg())
        if name != "setup":
            done["stages"][name] = r
            with open(done_file, "w") as f:
                json.dump(done, f, indent=1, default=str)
        print(f"[{name}] {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    if os.path.exists(marker):
        result["model"] = json.load(open(marker))
    result.update(stages=records, failed=failed)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(_table(records))
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
