"""Personal weights files (round trip, refusals, size) and LoRA export checked against PyTorch diffusers."""

import dataclasses
import importlib.util
import json
import re

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from hdb_jax import adapters as A
from hdb_jax.adapters import basis as B
from hdb_jax.common import tensorfile
from hdb_jax.formats import lora as E
from hdb_jax.formats import personal as P
from hdb_jax.sd import model
from hdb_jax.sd import tiny as tiny_lib
from hdb_jax.sd.fingerprint import params_fingerprint

needs_torch = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "peft")),
    reason="the PyTorch comparison needs torch and peft",
)


def _adapter(kind, params, component, *names):
    return A.Adapter.create(kind, params[component], [A.PATTERNS[n] for n in names], component)


def _random_trainable(adapters, seed, std=0.1):
    """Random non-zero factors (numpy: no per-shape compiles of eager JAX ops)."""
    rng = np.random.default_rng(seed)
    normal = lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32)  # noqa: E731
    return {
        c: jax.tree_util.tree_map(normal, jax.eval_shape(a.init, jax.random.PRNGKey(0)))
        for c, a in adapters.items()
    }


@pytest.fixture(scope="module")
def tiny_abstract(tiny_sd):
    # Shapes suffice for everything but the PyTorch comparison, and skip compiling the tiny
    # model's init (the slowest step of `tiny_params` on a busy CPU).
    return tiny_sd.abstract_params()


@pytest.fixture(scope="module")
def personal(tiny_abstract):
    """LiDB on the UNet attention and LoRA on the text encoder, with random factors."""
    adapters = {
        "unet": _adapter(A.LiDB(a=16, b=8, rank=2), tiny_abstract, "unet", "unet_attention"),
        "text_encoder": _adapter(
            A.LoRA(rank=3, alpha=6.0), tiny_abstract, "text_encoder", "text_attention", "text_mlp"
        ),
    }
    # The format only records the bases' hash; random stand-ins of the right shapes suffice.
    rng, lidb = np.random.default_rng(2), adapters["unet"].kind
    bases = {
        t.path: {
            "a_aux": rng.standard_normal((t.in_dim, lidb.a)).astype(np.float32),
            "b_aux": rng.standard_normal((lidb.b, t.out_dim)).astype(np.float32),
        }
        for t in adapters["unet"].targets
    }
    base = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype), tiny_abstract)
    return adapters, _random_trainable(adapters, 1), B.basis_hash(bases), params_fingerprint(base)


def _save(personal, path, **kwargs):
    adapters, trainable, basis_hash, fingerprint = personal
    return P.save_personal(
        path, adapters, trainable, base_fingerprint=fingerprint, basis_hash=basis_hash, **kwargs
    )


# -------------------------------------------------------------------- personal weights
def test_personal_round_trip_is_bit_exact(personal, tmp_path):
    adapters, trainable, basis_hash, fingerprint = personal
    extra = {"steps": 400, "lr": 1e-3, "prompt": "a photo of sks face", "shape": np.array([2, 3])}
    path = _save(personal, tmp_path / "me.safetensors", extra=extra)
    loaded = P.load_personal(path, base_fingerprint=fingerprint, basis_hash=basis_hash)
    assert loaded.adapters == adapters  # kinds, hyperparameters and targets, rebuilt from metadata alone
    assert jax.tree_util.tree_structure(loaded.trainable) == jax.tree_util.tree_structure(trainable)
    for got, want in zip(jax.tree_util.tree_leaves(loaded.trainable), jax.tree_util.tree_leaves(trainable)):
        assert got.dtype == np.float32 and got.tobytes() == np.asarray(want).tobytes()
    meta = loaded.metadata
    assert (meta["format"], meta["format_version"], meta["dtype"]) == ("hdb_jax.personal", 2, "float32")
    # LiDB factors have one shape on every layer: stacked. The text encoder's LoRA spans attention
    # and MLP layers of different widths: one tensor per layer.
    assert meta["layout"] == {"unet": "stacked", "text_encoder": "per_layer"}
    assert (meta["base_fingerprint"], meta["basis_hash"]) == (fingerprint, basis_hash)
    assert meta["extra"] == {"steps": 400, "lr": 1e-3, "prompt": "a photo of sks face", "shape": [2, 3]}
    lidb = {"a": 16, "b": 8, "rank": 2, "init_std": 1e-3}
    assert meta["adapters"]["unet"] == {"kind": "lidb", "hparams": lidb}
    first = adapters["unet"].targets[0]
    assert meta["targets"]["unet"][0] == [first.path, first.in_dim, first.out_dim, first.conv]
    n_unet, text_path = len(adapters["unet"].targets), adapters["text_encoder"].paths[0]
    with safe_open(str(path), framework="numpy") as handle:
        keys = set(handle.keys())
        stacked = handle.get_tensor("unet/a_train")
        assert "unet/b_train" in keys and f"unet/{first.path}/a_train" not in keys
        assert f"text_encoder/{text_path}/down" in keys and "text_encoder/down" not in keys
        assert "targets" not in handle.metadata()  # compressed: targets_zlib
    assert stacked.shape == (n_unet, *np.shape(trainable["unet"][first.path]["a_train"]))
    for i, target in enumerate(adapters["unet"].targets):  # rows follow the target list
        assert stacked[i].tobytes() == np.asarray(trainable["unet"][target.path]["a_train"]).tobytes()
    # Inspection without a base model skips the checks.
    assert P.load_personal(path, base_fingerprint=None).adapters == adapters

    half = _save(personal, tmp_path / "half.safetensors", dtype="float16")
    loaded16 = P.load_personal(half, base_fingerprint=fingerprint, basis_hash=basis_hash)
    got = loaded16.trainable["text_encoder"][text_path]["down"]
    want = np.asarray(trainable["text_encoder"][text_path]["down"])
    np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
    assert loaded16.metadata["dtype"] == "float16" and half.stat().st_size < path.stat().st_size


def _assert_same_factors(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.dtype == np.float32 and a.tobytes() == np.asarray(b).tobytes()


def test_lora_layout_depends_on_layer_widths(tiny_abstract, tmp_path):
    equal = _adapter(A.LoRA(rank=3, alpha=6.0), tiny_abstract, "text_encoder", "text_attention")
    mixed = _adapter(A.LoRA(rank=3, alpha=6.0), tiny_abstract, "text_encoder", "text_attention", "text_mlp")
    for adapter, layout in ((equal, "stacked"), (mixed, "per_layer")):
        adapters = {"text_encoder": adapter}
        trainable = _random_trainable(adapters, 8)
        path = P.save_personal(
            tmp_path / f"{layout}.safetensors", adapters, trainable, base_fingerprint="f" * 16
        )
        loaded = P.load_personal(path, base_fingerprint="f" * 16)
        assert loaded.metadata["layout"] == {"text_encoder": layout} and loaded.adapters == adapters
        _assert_same_factors(loaded.trainable, trainable)
        with safe_open(str(path), framework="numpy") as handle:
            assert len(handle.keys()) == (2 if layout == "stacked" else 2 * len(adapter.targets))


def test_version_1_files_still_load(personal, tmp_path):
    """A file as the version 1 writer made it: one tensor per layer, plain-JSON target list."""
    adapters, trainable, basis_hash, fingerprint = personal
    tensors = {
        f"{c}/{m}/{f}": np.asarray(x)
        for c, tree in trainable.items()
        for m, layer in tree.items()
        for f, x in layer.items()
    }
    kinds = {c: {"kind": a.kind.name, "hparams": dataclasses.asdict(a.kind)} for c, a in adapters.items()}
    targets = {c: [[t.path, t.in_dim, t.out_dim, t.conv] for t in a.targets] for c, a in adapters.items()}
    metadata = {
        "format": "hdb_jax.personal",
        "format_version": "1",
        "dtype": "float32",
        "content_hash": tensorfile.content_hash(tensors),
        "base_fingerprint": fingerprint,
        "basis_hash": basis_hash,
        "adapters": json.dumps(kinds),
        "targets": json.dumps(targets),
    }
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=metadata)
    loaded = P.load_personal(tmp_path / "v1.safetensors", base_fingerprint=fingerprint, basis_hash=basis_hash)
    assert loaded.adapters == adapters and loaded.metadata["format_version"] == 1
    assert loaded.metadata["layout"] == {"unet": "per_layer", "text_encoder": "per_layer"}
    assert loaded.metadata["targets"] == targets
    _assert_same_factors(loaded.trainable, trainable)


def test_inconsistent_layout_is_refused(personal, tmp_path):
    adapters, _, _, fingerprint = personal
    path = _save(personal, tmp_path / "me.safetensors")
    with safe_open(str(path), framework="numpy") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}

    def load(layout):
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "layout": json.dumps(layout)})
        return P.load_personal(tmp_path / "bad.safetensors", base_fingerprint=fingerprint)

    with pytest.raises(P.PersonalWeightsError, match="cannot be stacked"):  # LoRA layers of two widths
        load({"unet": "stacked", "text_encoder": "stacked"})
    with pytest.raises(P.PersonalWeightsError, match="missing unet/"):  # stacked tensors, per-layer claim
        load({"unet": "per_layer", "text_encoder": "per_layer"})
    with pytest.raises(P.PersonalWeightsError, match="bad layout"):
        load({"unet": "stacked"})
    with pytest.raises(P.PersonalWeightsError, match="metadata 'targets_zlib' is missing or unreadable"):
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "targets_zlib": "!!"})
        P.load_personal(tmp_path / "bad.safetensors", base_fingerprint=fingerprint)


def test_personal_refuses_another_base_model_or_basis(personal, tmp_path):
    adapters, trainable, basis_hash, fingerprint = personal
    path = _save(personal, tmp_path / "me.safetensors")
    other = "0123456789abcdef"
    where = re.escape(str(path))
    with pytest.raises(
        P.IncompatibleWeightsError,
        match=rf"{where}: made for another base model "
        rf"\(expected base fingerprint {other}, found {fingerprint}\)",
    ):
        P.load_personal(path, base_fingerprint=other, basis_hash=basis_hash)
    with pytest.raises(
        P.IncompatibleWeightsError,
        match=rf"{where}: made for another LiDB basis "
        rf"\(expected basis hash {other}, found {basis_hash}\)",
    ):
        P.load_personal(path, base_fingerprint=fingerprint, basis_hash=other)
    with pytest.raises(ValueError, match="need the basis hash"):
        P.save_personal(tmp_path / "x.safetensors", adapters, trainable, base_fingerprint=fingerprint)
    batched = {c: A.broadcast_batch(t, 2) for c, t in trainable.items()}
    with pytest.raises(ValueError, match="per-sample trees carry a batch axis"):
        P.save_personal(
            tmp_path / "x.safetensors", adapters, batched, base_fingerprint=fingerprint, basis_hash=basis_hash
        )


def test_corrupt_and_foreign_files_are_named(personal, tmp_path):
    adapters, trainable, _, fingerprint = personal
    data = _save(personal, tmp_path / "good.safetensors").read_bytes()

    def load(name, content):
        (tmp_path / name).write_bytes(bytes(content))
        return P.load_personal(tmp_path / name, base_fingerprint=fingerprint)

    unreadable = r"\.safetensors: not a readable safetensors file"
    with pytest.raises(P.PersonalWeightsError, match="garbage" + unreadable):
        load("garbage.safetensors", b"definitely not safetensors")
    with pytest.raises(P.PersonalWeightsError, match="truncated" + unreadable):
        load("truncated.safetensors", data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-3] ^= 0x40  # one bit of the last tensor's payload
    with pytest.raises(P.PersonalWeightsError, match=r"flipped.safetensors: tensors hash to .* corrupt"):
        load("flipped.safetensors", flipped)
    with pytest.raises(P.PersonalWeightsError, match=r"personal weights file not found: .*nope.safetensors"):
        P.load_personal(tmp_path / "nope.safetensors", base_fingerprint=None)
    lora = E.export_lora(tmp_path / "lora", {"text_encoder": adapters["text_encoder"]}, trainable)
    with pytest.raises(P.PersonalWeightsError, match=r"lora_weights.safetensors: format 'pt', expected"):
        P.load_personal(lora.path, base_fingerprint=None)


def test_sd15_lidb_file_is_about_105_kb(tmp_path):
    abstract = model.sd15_shapes().abstract_params()
    kind = A.LiDB(a=100, b=50, rank=1)
    adapters = {
        "unet": _adapter(kind, abstract, "unet", "unet_attention"),
        "text_encoder": _adapter(kind, abstract, "text_encoder", "text_attention"),
    }
    zeros = lambda s: np.zeros(s.shape, s.dtype)  # noqa: E731
    trainable = {
        c: jax.tree_util.tree_map(zeros, jax.eval_shape(a.init, jax.random.PRNGKey(0)))
        for c, a in adapters.items()
    }
    assert sum(len(a.targets) for a in adapters.values()) == 176
    path = P.save_personal(
        tmp_path / "sd15.safetensors",
        adapters,
        trainable,
        base_fingerprint="0" * 16,
        basis_hash="1" * 16,
        extra={"steps": 400},
    )
    payload = 176 * (100 + 50) * 4
    assert payload == 105_600
    size = path.stat().st_size
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert size == 8 + header + payload  # float32 factors only: no bases, no float64
    # Stacked factors (4 tensors, not 352) and the zlib-compressed target list keep the JSON
    # header to a few KB: the paper's "roughly 100KB".
    assert 105_600 < size < 110_000
    with safe_open(str(path), framework="numpy") as handle:
        assert sorted(handle.keys()) == [
            "text_encoder/a_train",
            "text_encoder/b_train",
            "unet/a_train",
            "unet/b_train",
        ]
        assert handle.get_tensor("unet/a_train").shape == (128, 100, 1)
    assert P.load_personal(path, base_fingerprint="0" * 16, basis_hash="1" * 16).adapters == adapters


# -------------------------------------------------------------------- LoRA export vs PyTorch
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny PyTorch diffusers model on disk, its Flax twin, inputs, and jitted Flax functions."""
    from test_sd_reference import _write_pytorch_model

    from hdb_jax.sd import loading, vocab

    root = tmp_path_factory.mktemp("export_model")
    tokenizer = vocab.tiny_tokenizer()
    _write_pytorch_model(root, tiny_lib.tiny_configs(resolution=32, tokenizer=tokenizer), tokenizer)
    sd, params = loading.load_pretrained(root)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    timesteps = np.array([10, 700], np.int32)
    context = rng.standard_normal((2, 77, 32)).astype(np.float32)
    ids = sd.tokenize(["a photo of sks face", "a painting of a face"])
    unet = jax.jit(lambda p: sd.predict(p, latents, timesteps, context))
    text = jax.jit(lambda p: sd.encode_text(p, ids))
    return root, params, (latents, timesteps, context, ids), unet, text


def _torch_pipeline(root):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
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


def _check_against_torch(reference, adapters, trainable, frozen, target):
    """Exports, loads with ``pipe.load_lora_weights`` and compares with our merged Flax model."""
    from peft.tuners.lora import LoraLayer

    root, params, inputs, flax_unet, flax_text = reference
    export = E.export_lora(target, adapters, trainable, frozen)
    pipe = _torch_pipeline(root)
    base_unet, base_text = _torch_outputs(pipe, inputs)
    pipe.load_lora_weights(str(target))
    lora_unet, lora_text = _torch_outputs(pipe, inputs)
    merged = {c: a.merge(params[c], trainable[c], frozen.get(c)) for c, a in adapters.items()}
    ours_unet = np.asarray(flax_unet(merged.get("unet", params["unet"])))
    ours_text = np.asarray(flax_text(merged.get("text_encoder", params["text_encoder"])))
    for component, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        injected = sum(isinstance(m, LoraLayer) for m in module.modules())
        assert injected == (len(adapters[component].targets) if component in adapters else 0)
    assert np.abs(ours_unet - lora_unet).max() <= 1e-4
    assert np.abs(ours_text - lora_text).max() <= 1e-4
    # Not vacuous: every exported component's adapter moves PyTorch's outputs.
    assert np.abs(lora_unet - base_unet).max() > 1e-2
    if "text_encoder" in adapters:
        assert np.abs(lora_text - base_text).max() > 1e-2
    return export


@needs_torch
def test_lora_export_matches_pytorch_diffusers(reference, tmp_path):
    kind = A.LoRA(rank=4, alpha=8.0)  # scale 2, folded into lora_B
    adapters = {"unet": _adapter(kind, reference[1], "unet", "unet_attention")}
    trainable = _random_trainable(adapters, 3)
    export = _check_against_torch(reference, adapters, trainable, {}, tmp_path / "lora.safetensors")
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert f"{block}.to_out.0" in export.ranks and export.max_rel_error == 0.0
    with safe_open(str(export.path), framework="numpy") as handle:
        assert handle.get_tensor(f"{block}.to_q.lora_A.weight").shape == (4, 32)
        assert handle.get_tensor(f"{block}.to_q.lora_B.weight").shape == (32, 4)


@needs_torch
def test_lidb_export_matches_pytorch_diffusers(reference, tmp_path):
    params, kind = reference[1], A.LiDB(a=16, b=8, rank=2)
    adapters = {
        "unet": _adapter(kind, params, "unet", "unet_attention"),
        "text_encoder": _adapter(kind, params, "text_encoder", "text_attention"),
    }
    frozen = {c: a.basis(jax.random.PRNGKey(5)) for c, a in adapters.items()}
    trainable = _random_trainable(adapters, 4, std=0.3)
    export = _check_against_torch(reference, adapters, trainable, frozen, tmp_path / "lidb")
    assert export.path.name == "pytorch_lora_weights.safetensors"
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in export.ranks
    assert set(export.ranks.values()) == {2}


@needs_torch
def test_residual_conv_export_with_mixed_ranks_matches_pytorch(reference, tmp_path):
    kind = A.Residual(ratio=0.05)
    adapters = {"unet": _adapter(kind, reference[1], "unet", "unet_proj_out")}
    assert all(t.conv for t in adapters["unet"].targets)
    # Ranks 2 (32 channels) and 3 (64): PEFT must be told alpha = r per layer.
    assert {kind.layer_rank(t) for t in adapters["unet"].targets} == {2, 3}
    trainable = _random_trainable(adapters, 6, std=0.3)
    export = _check_against_torch(reference, adapters, trainable, {}, tmp_path / "residual.safetensors")
    with safe_open(str(export.path), framework="numpy") as handle:
        assert handle.get_tensor("unet.mid_block.attentions.0.proj_out.lora_A.weight").shape == (3, 64, 1, 1)
        assert handle.get_tensor("unet.mid_block.attentions.0.proj_out.lora_B.weight").shape == (64, 3, 1, 1)


def test_kron_export_refused_or_svd_truncated(tiny_abstract, tmp_path):
    kind = A.Kron(a1=4, a2=8, scale=0.5)
    adapters = {"unet": _adapter(kind, tiny_abstract, "unet", "unet_attention")}
    trainable = _random_trainable(adapters, 7)
    with pytest.raises(E.NotExportableError, match="not exportable as LoRA"):
        E.export_lora(tmp_path / "kron", adapters, trainable)
    export = E.export_lora(tmp_path / "kron", adapters, trainable, kron_svd_rank=6)
    with safe_open(str(export.path), framework="numpy") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    assert float(meta["hdb_jax.kron_svd_max_rel_error"]) == export.max_rel_error > 0
    for target in adapters["unet"].targets:
        name = "unet." + E.torch_module_path("unet", target.path)
        dense = np.asarray(adapters["unet"].delta(target, trainable["unet"]), np.float64).T  # [out, in]
        sigma = np.linalg.svd(dense, compute_uv=False)
        expected = np.sqrt(np.sum(sigma[6:] ** 2) / np.sum(sigma**2))
        assert 0.05 < expected < 1 and export.ranks[name] == 6
        np.testing.assert_allclose(export.rel_errors[name], expected, rtol=1e-4)
        approx = tensors[f"{name}.lora_B.weight"].astype(np.float64) @ tensors[f"{name}.lora_A.weight"]
        actual = np.linalg.norm(dense - approx) / np.linalg.norm(dense)
        np.testing.assert_allclose(actual, expected, rtol=1e-3)
