"""kohya/A1111/ComfyUI ("webui") export checked against PyTorch: diffusers' own kohya converter, and
a ComfyUI-style LoKr merge (``W += kron(w1, w2).reshape(W.shape)`` on modules found by name)."""

import importlib.util
import json
import re

import jax
import numpy as np
import pytest
from safetensors import safe_open

from hdb_jax import adapters as A
from hdb_jax.formats import webui as W
from hdb_jax.formats.lora import torch_module_path

needs_torch = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "peft", "diffusers")),
    reason="the PyTorch comparison needs torch, peft and diffusers",
)


def _adapter(kind, params, component, *names):
    return A.Adapter.create(kind, params[component], [A.PATTERNS[n] for n in names], component)


def _random_trainable(adapters, seed, std):
    rng = np.random.default_rng(seed)
    normal = lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32)
    return {
        c: jax.tree_util.tree_map(normal, jax.eval_shape(a.init, jax.random.PRNGKey(0)))
        for c, a in adapters.items()
    }


def _read(path):
    with safe_open(str(path), framework="numpy") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Our Flax twin of the tiny PyTorch model, inputs, jitted Flax functions, PyTorch base outputs."""
    from hdb_jax.sd import loading

    sd, params = loading.load_pretrained(tiny_model_dir, components=("unet", "text_encoder"))
    rng = np.random.default_rng(0)
    inputs = (
        rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
        np.array([10, 700], np.int32),
        rng.standard_normal((2, 77, 32)).astype(np.float32),
        sd.tokenize(["a photo of sks face", "a painting of a face"]),
    )
    unet = jax.jit(lambda p: sd.predict(p, *inputs[:3]))
    text = jax.jit(lambda p: sd.encode_text(p, inputs[3]))
    base = _torch_outputs(_torch_pipeline(tiny_model_dir), inputs)
    return tiny_model_dir, params, inputs, unet, text, base


def _torch_pipeline(root):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(root / "vae"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
        unet=UNet2DConditionModel.from_pretrained(root / "unet"),
        scheduler=DDPMScheduler.from_pretrained(root / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _torch_outputs(pipe, inputs):
    import torch

    latents, timesteps, context, ids = map(torch.from_numpy, inputs)
    with torch.no_grad():
        unet = pipe.unet(latents, timesteps.long(), context).sample
        text = pipe.text_encoder(ids.long()).last_hidden_state
    return unet.numpy(), text.numpy()


def _ours(reference, adapters, trainable, frozen):
    _, params, _, flax_unet, flax_text, _ = reference
    merged = {c: a.merge(params[c], trainable[c], frozen.get(c)) for c, a in adapters.items()}
    return (
        np.asarray(flax_unet(merged.get("unet", params["unet"]))),
        np.asarray(flax_text(merged.get("text_encoder", params["text_encoder"]))),
    )


def _compare(reference, adapters, torch_out, ours):
    """Max |PyTorch - ours| and min over adapted components of max |PyTorch - base|."""
    base = reference[5]
    diff = max(float(np.abs(t - o).max()) for t, o in zip(torch_out, ours))
    moved = min(
        float(np.abs(t - b).max())
        for c, t, b in zip(("unet", "text_encoder"), torch_out, base)
        if c in adapters
    )
    return diff, moved


def _by_kohya_name(pipe):
    """ComfyUI/A1111-style name resolution: ``{prefix + torch name with '_' for '.': module}``."""
    return {
        W.PREFIXES[c] + name.replace(".", "_"): module
        for c, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
        for name, module in model.named_modules()
        if getattr(module, "weight", None) is not None
    }


# -------------------------------------------------------------------- kohya LoRA via diffusers
CASES = {  # name: (kind, {component: patterns}, std of the random factors)
    "lidb": (
        A.LiDB(a=16, b=8, rank=2),
        {"unet": ("unet_attention",), "text_encoder": ("text_attention",)},
        0.3,
    ),
    "lora": (
        A.LoRA(rank=4, alpha=8.0),
        {"unet": ("unet_attention",), "text_encoder": ("text_attention", "text_mlp")},
        0.1,
    ),
    "residual": (A.Residual(ratio=0.05), {"unet": ("unet_proj_out",)}, 0.3),
}


@needs_torch
@pytest.mark.parametrize("case", sorted(CASES))
def test_kohya_file_loads_in_diffusers_with_our_outputs(reference, tmp_path, case):
    from peft.tuners.lora import LoraLayer

    kind, patterns, std = CASES[case]
    adapters = {c: _adapter(kind, reference[1], c, *names) for c, names in patterns.items()}
    frozen = {c: a.basis(jax.random.PRNGKey(5)) for c, a in adapters.items()} if case == "lidb" else {}
    trainable = _random_trainable(adapters, 3, std)
    export = W.export_kohya(tmp_path / f"{case}.safetensors", adapters, trainable, frozen)
    pipe = _torch_pipeline(reference[0])
    pipe.load_lora_weights(str(export.path))  # diffusers' kohya -> PEFT conversion
    diff, moved = _compare(
        reference, adapters, _torch_outputs(pipe, reference[2]), _ours(reference, adapters, trainable, frozen)
    )
    print(f"{case}: max |diffusers - ours| = {diff:.3g}, moved from base by >= {moved:.3g}")
    assert diff <= 1e-4 and moved > 1e-2
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        injected = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        paths = adapters[component].paths if component in adapters else ()
        wanted = {torch_module_path(component, p) for p in paths}
        assert injected == wanted  # no module dropped, none added
    # Our names resolve to real modules the way ComfyUI and A1111 look them up.
    assert set(export.modules) <= set(_by_kohya_name(pipe)) and set(export.modules.values()) == {"lora"}
    tensors, meta = _read(export.path)
    for name, rank in export.ranks.items():
        assert tensors[f"{name}.alpha"].shape == () and float(tensors[f"{name}.alpha"]) == rank
    if case == "residual":  # 1x1 convolutions, ranks 2 (32 channels) and 3 (64)
        name = "lora_unet_mid_block_attentions_0_proj_out"
        assert tensors[f"{name}.lora_down.weight"].shape == (3, 64, 1, 1)
        assert tensors[f"{name}.lora_up.weight"].shape == (64, 3, 1, 1)
        assert set(export.ranks.values()) == {2, 3} and meta["ss_network_dim"] == "Dynamic"
    else:
        rank = kind.rank
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(rank), str(rank))
        block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
        assert tensors[f"{block}_to_out_0.lora_down.weight"].shape == (rank, 32)
        assert tensors[f"{block}_to_q.lora_up.weight"].shape == (32, rank)
        te = "lora_te_text_model_encoder_layers_0"
        assert tensors[f"{te}_self_attn_q_proj.lora_down.weight"].shape == (rank, 32)


# -------------------------------------------------------------------- LyCORIS LoKr
def _kron(w1, w2):
    import torch

    w1, w2 = torch.from_numpy(w1), torch.from_numpy(w2)
    if w2.dim() == 4:  # as A1111's make_kron and ComfyUI do
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


@needs_torch
def test_lokr_is_our_kronecker_delta_exactly(reference, tmp_path):
    import torch

    kind, params = A.Kron(a1=4, a2=8, scale=0.3), reference[1]
    adapters = {
        "unet": _adapter(kind, params, "unet", "unet_attention", "unet_proj_out"),
        "text_encoder": _adapter(kind, params, "text_encoder", "text_attention"),
    }
    trainable = _random_trainable(adapters, 7, 0.3)
    export = W.export_kohya(tmp_path / "lokr.safetensors", adapters, trainable)
    tensors, meta = _read(export.path)
    n = sum(len(a.targets) for a in adapters.values())
    assert len(export.modules) == n and set(export.modules.values()) == {"lokr"} and len(tensors) == 3 * n
    worst = 0.0
    for component, adapter in adapters.items():
        for target in adapter.targets:
            name = W.kohya_name(component, target.path)
            w1, w2 = tensors[f"{name}.lokr_w1"], tensors[f"{name}.lokr_w2"]
            assert w1.shape == (4, 8) and w2.shape[:2] == (target.out_dim // 4, target.in_dim // 8)
            assert w2.ndim == (4 if target.conv else 2) and float(tensors[f"{name}.alpha"]) == 1.0
            shape = (target.out_dim, target.in_dim) + ((1, 1) if target.conv else ())
            got = _kron(w1, w2).reshape(shape).numpy().reshape(target.out_dim, target.in_dim)
            want = np.asarray(adapter.delta(target, trainable[component])).T  # [out, in]
            worst = max(worst, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    print(f"lokr: worst relative error of kron(w1, w2) vs our ΔW = {worst:.3g}")
    assert worst <= 1e-6
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
    assert f"{block}_to_q.lokr_w1" in tensors and f"{block}_to_out_0.lokr_w2" in tensors
    assert tensors["lora_unet_mid_block_attentions_0_proj_out.lokr_w2"].shape == (16, 8, 1, 1)
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lokr_w1" in tensors
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "full_matrix": "True"}
    # End to end, as ComfyUI merges LoKr: find each module by its kohya name, add the Kronecker product.
    pipe = _torch_pipeline(reference[0])
    modules = _by_kohya_name(pipe)
    assert set(export.modules) <= set(modules)
    with torch.no_grad():
        for name in export.modules:
            weight = modules[name].weight
            weight += _kron(tensors[f"{name}.lokr_w1"], tensors[f"{name}.lokr_w2"]).reshape(weight.shape)
    diff, moved = _compare(
        reference, adapters, _torch_outputs(pipe, reference[2]), _ours(reference, adapters, trainable, {})
    )
    print(f"lokr: max |ComfyUI-style merge - ours| = {diff:.3g}, moved from base by >= {moved:.3g}")
    assert diff <= 1e-4 and moved > 1e-2


# -------------------------------------------------------------------- storage, metadata, refusals
def test_float16_metadata_and_refusals(tiny_sd, tmp_path):
    abstract = tiny_sd.abstract_params()
    adapters = {
        "unet": _adapter(A.Residual(ratio=0.05), abstract, "unet", "unet_proj_out"),
        "text_encoder": _adapter(A.LoRA(rank=3, alpha=6.0), abstract, "text_encoder", "text_attention"),
    }
    trainable = _random_trainable(adapters, 9, 0.2)
    full = W.export_kohya(tmp_path / "me32.safetensors", adapters, trainable)
    half = W.export_kohya(
        tmp_path / "me16.safetensors",
        adapters,
        trainable,
        dtype="float16",
        trigger="sks face",
        output_name="me",
        base_fingerprint="0123456789abcdef",
        metadata={"ss_sd_model_name": "runwayml/stable-diffusion-v1-5"},
    )
    t32, _ = _read(full.path)
    t16, meta = _read(half.path)
    assert set(t16) == set(t32) and all(x.dtype == np.float16 for x in t16.values())
    for key, x in t32.items():
        assert x.dtype == np.float32
        np.testing.assert_array_equal(t16[key], x.astype(np.float16))
    path = "text_model.encoder.layers.0.self_attn.q_proj"  # scale 2 sits in lora_up, alpha = r
    up = t32[f"{W.kohya_name('text_encoder', path)}.lora_up.weight"]
    np.testing.assert_allclose(up, 2.0 * trainable["text_encoder"][path]["up"].T, rtol=1e-6)
    assert half.path.stat().st_size < full.path.stat().st_size
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "Dynamic",
        "ss_network_alpha": "Dynamic",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": "me",
        "ss_tag_frequency": json.dumps({"me": {"sks face": 1}}),
        "modelspec.trigger_phrase": "sks face",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": "me",
        "hdb_jax.format": "webui",
        "hdb_jax.trigger": "sks face",
        "hdb_jax.dtype": "float16",
        "hdb_jax.base_fingerprint": "0123456789abcdef",
        "ss_sd_model_name": "runwayml/stable-diffusion-v1-5",
    }
    assert {k: meta.get(k) for k in expected} == expected and meta == half.metadata
    kinds = json.loads(meta["hdb_jax.adapters"])
    assert kinds["text_encoder"] == {"kind": "lora", "hparams": {"rank": 3, "alpha": 6.0}}
    assert kinds["unet"]["kind"] == "residual" and kinds["unet"]["hparams"]["ratio"] == 0.05
    assert "ss_tag_frequency" not in _read(full.path)[1]  # no trigger, no tags
    assert (
        W.kohya_name("unet", "down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_q")
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert (
        W.kohya_name("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")
        == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )
    assert all("." not in name for name in full.modules)  # A1111 splits keys at the first dot

    with pytest.raises(ValueError, match=re.escape("dtype 'bfloat16' is not one of ['float16', 'float32']")):
        W.export_kohya(tmp_path / "x.safetensors", adapters, trainable, dtype="bfloat16")
    with pytest.raises(ValueError, match="single '.safetensors' files"):
        W.export_kohya(tmp_path / "folder", adapters, trainable)
    with pytest.raises(ValueError, match=r"may not replace .*\['ss_network_dim'\]"):
        W.export_kohya(tmp_path / "x.safetensors", adapters, trainable, metadata={"ss_network_dim": "8"})
    with pytest.raises(ValueError, match="LiDB export needs the bases"):
        lidb = {"unet": _adapter(A.LiDB(a=16, b=8, rank=1), abstract, "unet", "unet_attention")}
        W.export_kohya(tmp_path / "x.safetensors", lidb, _random_trainable(lidb, 1, 0.1))
    with pytest.raises(ValueError, match="cannot export component 'vae'"):
        W.kohya_name("vae", "decoder.conv_in")
    assert not (tmp_path / "x.safetensors").exists()


def test_sd15_names_parse_as_a1111_maps_them_to_ldm_blocks():
    """A1111 turns SD 1.x kohya names into LDM module names by regex; every SD 1.5 name must parse,
    land in the LDM blocks that hold attention, and stay unique."""
    from hdb_jax.sd import model

    abstract = model.sd15_shapes().abstract_params()
    kind = A.LoRA(rank=1)
    adapters = {
        "unet": _adapter(kind, abstract, "unet", "unet_attention", "unet_proj_out"),
        "text_encoder": _adapter(kind, abstract, "text_encoder", "text_attention", "text_mlp"),
    }
    names = {c: [W.kohya_name(c, p) for p in a.paths] for c, a in adapters.items()}
    assert [len(set(n)) for n in names.values()] == [144, 72]
    inputs, outputs, middle, layers = set(), set(), 0, set()
    rests = {f"transformer_blocks_0_attn{i}_to_{x}" for i in (1, 2) for x in ("q", "k", "v", "out_0")}
    rests.add("proj_out")
    for name in names["unet"]:
        if m := re.fullmatch(r"lora_unet_down_blocks_(\d)_attentions_(\d)_(.+)", name):
            inputs.add(1 + 3 * int(m[1]) + int(m[2]))  # A1111: input_blocks_{1 + 3i + j}_1_<rest>
        elif m := re.fullmatch(r"lora_unet_up_blocks_(\d)_attentions_(\d)_(.+)", name):
            outputs.add(3 * int(m[1]) + int(m[2]))  # output_blocks_{3i + j}_1_<rest>
        elif m := re.fullmatch(r"lora_unet_mid_block_attentions_0_(.+)", name):
            middle += 1  # middle_block_1_<rest>
        assert m is not None and m.groups()[-1] in rests, name
    assert inputs == {1, 2, 4, 5, 7, 8} and outputs == set(range(3, 12)) and middle == 9
    for name in names["text_encoder"]:
        m = re.fullmatch(
            r"lora_te_text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|"
            r"mlp_fc[12])",
            name,
        )
        assert m is not None, name
        layers.add(int(m[1]))
    assert layers == set(range(12))
