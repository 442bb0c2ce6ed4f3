"""The toy base model exported for PyTorch diffusers computes what our Flax model computes."""

import importlib.util
import json
import sys
import time

import jax
import numpy as np
import pytest

from hdb_jax import toy
from hdb_jax.jobs import export_base
from hdb_jax.sd import loading

torch = pytest.importorskip("torch")

PROMPTS = ["a photo of sks face", "a cartoon of a face"]


def _max_diff(ours, reference, what):
    """Largest absolute difference, checked against float32 error at the reference's scale.

    A float32 network accumulates relative rounding of ~1e-6 per layer over a few dozen layers and
    the two libraries order their sums differently; 1e-4 of the output scale leaves room for that
    while a single wrong or unconverted weight moves outputs by orders of magnitude more.
    """
    assert ours.shape == reference.shape, what
    scale = max(1.0, float(np.abs(reference).max()))
    diff = float(np.abs(ours - reference).max())
    print(f"{what}: max abs difference {diff:.2e} (output scale {scale:.2f})")
    assert diff <= 1e-4 * scale, f"{what}: {diff} > {1e-4 * scale}"
    return diff


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped toy base exported over a directory with stale model files (and one kept file)."""
    out = tmp_path_factory.mktemp("toy_base_pt")
    (out / "unet").mkdir()
    (out / "unet" / "diffusion_flax_model.msgpack").write_bytes(b"stale")
    (out / "notes.txt").write_text("not ours\n")
    with pytest.raises(export_base.ExportError, match=r"toy_base_pt\d* is not empty; pass --overwrite"):
        export_base.export_pytorch(toy.base_model_dir(), out)
    start = time.perf_counter()
    export_base.export_pytorch(toy.base_model_dir(), out, overwrite=True)
    print(f"export: {time.perf_counter() - start:.1f} s")
    return out


@pytest.fixture(scope="module")
def flax_model():
    return loading.load_pretrained(toy.base_model_dir())


@pytest.fixture(scope="module")
def inputs(flax_model):
    """(latents [2,4,16,16] NCHW, timesteps [2], context [2,77,64], ids [2,77]): fixed draws, two prompts."""
    sd, params = flax_model
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(sd.latent_shape(sd.default_resolution, batch=2)).astype(np.float32)
    ids = sd.tokenize(PROMPTS)
    context = np.asarray(sd.encode_text(params["text_encoder"], ids))
    return latents, np.array([10, 700], np.int32), context, ids


def _pipeline(root):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(root)


def test_layout_is_pytorch_diffusers(exported):
    source = toy.base_model_dir()
    for weights in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (exported / weights).is_file()
    assert (exported / "text_encoder" / "model.safetensors").is_file()
    assert not list(exported.rglob("*.msgpack"))  # the stale Flax file went with the old unet/
    assert (exported / "notes.txt").read_text() == "not ours\n"  # not a model file: left alone
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert not [v for v in index.values() if isinstance(v, list) and str(v[1]).startswith("Flax")]
    scheduler = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (exported / "tokenizer" / name).read_bytes() == (source / "tokenizer" / name).read_bytes()
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(f".{exported.name}-")]


def test_pytorch_pipeline_matches_flax(exported, flax_model, inputs):
    from test_export import _torch_outputs

    sd, params = flax_model
    latents, timesteps, context, ids = inputs
    start = time.perf_counter()
    pipe = _pipeline(exported)
    tokenized = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="np")
    np.testing.assert_array_equal(tokenized["input_ids"], ids)
    ref_unet, ref_text = _torch_outputs(pipe, inputs)
    with torch.no_grad():
        scaled = torch.from_numpy(latents) / pipe.vae.config.scaling_factor
        ref_image = pipe.vae.decode(scaled).sample.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC
    ours_unet = np.asarray(sd.predict(params["unet"], latents, timesteps, context))
    ours_image = np.asarray(sd.decode_latents(params["vae"], latents))

    _max_diff(ours_unet, ref_unet, "unet")
    _max_diff(context, ref_text, "text encoder")
    # The VAE's mid-block attention is the one set of names diffusers' converter misses.
    _max_diff(ours_image, ref_image, "vae decode")
    # Not vacuous: outputs are far from zero and differ per sample.
    for ref in (ref_unet, ref_text, ref_image):
        assert np.abs(ref).mean() > 1e-2 and np.abs(ref[0] - ref[1]).max() > 1e-2
    print(f"pytorch comparison: {time.perf_counter() - start:.1f} s")


def test_our_loader_reads_the_export_bit_exactly(exported, flax_model):
    _, params = flax_model
    _, again = loading.load_pretrained(exported)
    flat = jax.tree_util.tree_leaves_with_path(params)
    assert len(flat) == len(jax.tree_util.tree_leaves(again))
    for (path, leaf), other in zip(flat, jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other), err_msg=jax.tree_util.keystr(path))


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="load_lora_weights needs peft")
def test_exported_lora_loads_onto_the_export(exported, flax_model, inputs, tmp_path):
    """What README promises: the LoRA folder `personalize` writes loads with `pipe.load_lora_weights`."""
    from peft.tuners.lora import LoraLayer
    from test_export import _adapter, _random_trainable, _torch_outputs

    from hdb_jax import adapters as A
    from hdb_jax.formats import lora as export

    sd, params = flax_model
    latents, timesteps, _, ids = inputs
    adapters = {
        "unet": _adapter(A.LoRA(rank=4, alpha=4.0), params, "unet", "unet_attention"),
        "text_encoder": _adapter(A.LoRA(rank=4, alpha=4.0), params, "text_encoder", "text_attention"),
    }
    trainable = _random_trainable(adapters, 3)
    lora = export.export_lora(tmp_path / "lora", adapters, trainable)
    assert lora.path.name == "pytorch_lora_weights.safetensors"

    pipe = _pipeline(exported)
    pipe.load_lora_weights(str(lora.path))  # the file, as README shows
    for component, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        injected = sum(isinstance(m, LoraLayer) for m in module.modules())
        assert injected == len(adapters[component].targets) > 0
    merged = {c: a.merge(params[c], trainable[c], None) for c, a in adapters.items()}
    context = np.asarray(sd.encode_text(merged["text_encoder"], ids))
    ours_unet = np.asarray(sd.predict(merged["unet"], latents, timesteps, context))
    ref_unet, ref_text = _torch_outputs(pipe, (latents, timesteps, context, ids))
    _max_diff(context, ref_text, "text encoder + LoRA")
    _max_diff(ours_unet, ref_unet, "unet + LoRA")
    # Not vacuous: the loaded LoRA moves both networks' PyTorch outputs.
    pipe.disable_lora()
    base_unet, base_text = _torch_outputs(pipe, (latents, timesteps, context, ids))
    assert np.abs(ref_unet - base_unet).max() > 1e-2 and np.abs(ref_text - base_text).max() > 1e-2


def test_refusals_come_before_any_work(exported, tmp_path, monkeypatch, capsys):
    source = toy.base_model_dir()
    with pytest.raises(export_base.ExportError, match=r"model directory .*/nope does not exist"):
        export_base.export_pytorch(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(export_base.ExportError, match=r"empty is not a diffusers-format model: no unet/"):
        export_base.export_pytorch(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(export_base.ExportError, match=r"/unet already holds PyTorch weights"):
        export_base.export_pytorch(exported, tmp_path / "out")
    with pytest.raises(export_base.ExportError, match=r"is the source model itself"):
        export_base.export_pytorch(source, source, overwrite=True)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, find_spec says absent
    with pytest.raises(
        export_base.ExportError, match=r"needs torch, which is not installed: pip install torch"
    ):
        export_base.export_pytorch(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    monkeypatch.delenv("HDB_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        export_base.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model directory") and len(err.splitlines()) == 1
