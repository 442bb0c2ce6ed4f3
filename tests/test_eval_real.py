"""CLIP-I / CLIP-T / DINO (hdb_jax.eval.real) against PyTorch transformers on tiny random models.

The reference models are written by PyTorch transformers (safetensors) into temporary directories and
loaded back by our Flax scorers; both run the same preprocessed pixels, so embeddings and cosines must
agree to float32 round-off. Our JAX preprocessing is compared with the transformers (PIL) image
processors separately.
"""

import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hdb_jax.eval import real  # noqa: E402 (after the torch skip)
from hdb_jax.sd import vocab  # noqa: E402
from hdb_jax.sd.loading import ModelLoadError  # noqa: E402

MODEL_TOL = 1e-4  # float32 Flax vs float32 PyTorch, same inputs
# Preprocessing: PIL resamples in fixed point (22-bit coefficients) and rounds each pass to 8 bits; we
# round the same way in float32, so a pixel whose value sits on a rounding boundary may land one 8-bit
# level away. One level is 1/255/std in normalised units: at most 1/255/0.224 ~= 0.0175.
PIXEL_TOL = 1.0 / 255.0 / min(real.IMAGENET_STD) + 1e-5
PROMPTS = [
    "a sks face wearing a hat",
    "a photo of sks face",
    "a painting of sks face, smiling",
    "a sks face in the forest",
    "a sks face with glasses",
]
COMMON = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _images(seed: int, n: int, height: int, width: int) -> np.ndarray:
    """Random uint8 images [n, height, width, 3]: 4x4-pixel blocks of random colour plus pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, height // 4 + 2, width // 4 + 2, 3))
    smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :height, :width]
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """(directory, PyTorch CLIPModel): a tiny random CLIP with a real CLIPTokenizer and processor config."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    root = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = vocab.tiny_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "max_position_embeddings": 77, **ids, **COMMON},
        vision_config={"image_size": 32, "patch_size": 8, **COMMON},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(root)
    return root, model


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    """(directory, PyTorch ViTModel): a tiny random ViT with a ViTImageProcessor config (square resize)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    root = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(1)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, **COMMON), add_pooling_layer=False).eval()
    model.save_pretrained(root, safe_serialization=True)
    processor = ViTImageProcessor(
        size={"height": 32, "width": 32},
        resample=3,
        image_mean=list(real.IMAGENET_MEAN),
        image_std=list(real.IMAGENET_STD),
    )
    processor.save_pretrained(root)
    return root, model


@pytest.fixture(scope="module")
def clip(clip_dir):
    return real.ClipScorer.load(clip_dir[0], batch_size=4)  # 5 images: two chunks, the last padded


@pytest.fixture(scope="module")
def dino(dino_dir):
    return real.DinoScorer.load(dino_dir[0], batch_size=4)


@pytest.fixture(scope="module")
def images():
    """(generated [5, 32, 32, 3], references [2, 40, 48, 3]): references are non-square and downscaled."""
    return _images(0, 5, 32, 32), _images(1, 2, 40, 48)


def _pixels(scorer, batch: np.ndarray) -> np.ndarray:
    """Our preprocessing of uint8 ``batch [N, H, W, 3]``: float32 [N, 3, h, w] (writable, for torch)."""
    return np.array(scorer.preprocessing(batch))


def _processed(processor, batch: np.ndarray) -> np.ndarray:
    """A transformers (PIL) image processor's pixel values for uint8 ``batch [N, H, W, 3]``: [N, 3, h, w]."""
    return processor(list(batch), return_tensors="np")["pixel_values"]


def _paired_cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _torch_cos(a, b):
    a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    return (a @ b.T).numpy()


# -------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("shape", [(32, 32), (20, 28), (40, 48), (96, 64)])
def test_clip_preprocessing_matches_processor(clip_dir, clip, shape):
    from transformers import CLIPImageProcessor

    batch = _images(2, 2, *shape)
    expected = _processed(CLIPImageProcessor.from_pretrained(clip_dir[0]), batch)
    ours = _pixels(clip, batch)
    assert ours.shape == expected.shape == (2, 3, 32, 32)
    assert np.abs(ours - expected).max() <= PIXEL_TOL
    assert np.mean(np.abs(ours - expected) > 1e-5) < 0.01  # off-by-one levels are rare


@pytest.mark.parametrize("shape", [(32, 32), (20, 28), (96, 64)])
def test_vit_and_dino_preprocessing_match_processors(dino_dir, dino, shape):
    from transformers import CLIPImageProcessor, ViTImageProcessor

    batch = _images(3, 2, *shape)
    expected = _processed(ViTImageProcessor.from_pretrained(dino_dir[0]), batch)
    assert np.abs(_pixels(dino, batch) - expected).max() <= PIXEL_TOL
    # The DreamBooth DINO transform (short side 256/224 of the input, center crop, ImageNet statistics)
    # is CLIP's processor pipeline with those settings.
    protocol = real.Preprocessing.dino_protocol(32)
    assert protocol.shortest_edge == 37 and real.Preprocessing.dino_protocol().shortest_edge == 256
    reference = CLIPImageProcessor(
        size={"shortest_edge": 37},
        crop_size={"height": 32, "width": 32},
        image_mean=list(real.IMAGENET_MEAN),
        image_std=list(real.IMAGENET_STD),
    )
    expected = _processed(reference, batch)
    assert np.abs(np.asarray(protocol(batch)) - expected).max() <= PIXEL_TOL


def test_reads_processor_configs():
    from transformers import CLIPImageProcessor, ViTImageProcessor
    from transformers.image_transforms import get_resize_output_image_size

    # The layout of openai/clip-vit-base-patch32's file (an integer size is CLIP's shortest edge).
    hub_clip = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": list(real.CLIP_MEAN),
        "image_std": list(real.CLIP_STD),
        "resample": 3,
        "size": 224,
    }
    clip_convention = {"int_size_is_shortest_edge": True, "crops_by_default": True}
    fallback = real.Preprocessing.clip_default(32)
    expected = real.Preprocessing.clip_default(224)
    for config in (hub_clip, CLIPImageProcessor().to_dict()):
        assert real.Preprocessing.from_config(config, fallback, **clip_convention) == expected
    # A ViTFeatureExtractor-style file: an integer size is a square resize, and there is no crop.
    hub_vit = {
        "do_normalize": True,
        "do_resize": True,
        "image_mean": list(real.IMAGENET_MEAN),
        "image_std": list(real.IMAGENET_STD),
        "resample": 2,
        "size": 224,
    }
    vit_convention = {"int_size_is_shortest_edge": False, "crops_by_default": False}
    vit = real.Preprocessing.from_config(hub_vit, real.Preprocessing.dino_protocol(), **vit_convention)
    assert (vit.size, vit.shortest_edge, vit.crop, vit.method) == ((224, 224), None, None, "linear")
    assert vit.mean == real.IMAGENET_MEAN
    default_vit = real.Preprocessing.from_config(ViTImageProcessor().to_dict(), vit, **vit_convention)
    assert (default_vit.size, default_vit.crop, default_vit.mean) == ((224, 224), None, (0.5, 0.5, 0.5))
    for shape in [(480, 640), (640, 480), (333, 500), (224, 225), (32, 32)]:
        reference = get_resize_output_image_size(np.zeros(shape + (3,)), 224, default_to_square=False)
        assert expected.resized_size(*shape) == tuple(reference)


def test_flax_and_pickle_weights_load(tmp_path, dino_dir, dino, images):
    """Flax msgpack weights, PyTorch pickles (with torch) and a checkpoint with a pooler load alike."""
    from safetensors import safe_open
    from transformers import ViTModel

    dino.model.save_pretrained(tmp_path / "flax", params=dino.params)
    dino_dir[1].save_pretrained(tmp_path / "pickle", safe_serialization=False)
    with_pooler = ViTModel(dino_dir[1].config, add_pooling_layer=True)  # carries the (unused) pooler
    with_pooler.load_state_dict(dino_dir[1].state_dict(), strict=False)
    with_pooler.save_pretrained(tmp_path / "pooler", safe_serialization=True)
    assert (tmp_path / "flax" / "flax_model.msgpack").is_file()
    assert (tmp_path / "pickle" / "pytorch_model.bin").is_file()
    with safe_open(tmp_path / "pooler" / "model.safetensors", framework="numpy") as handle:
        assert "pooler.dense.weight" in set(handle.keys())
    expected = dino.embeddings(images[0])
    for name in ("flax", "pickle", "pooler"):  # no processor config: keep the same preprocessing
        scorer = real.DinoScorer.load(tmp_path / name, preprocessing=dino.preprocessing, batch_size=4)
        np.testing.assert_allclose(scorer.embeddings(images[0]), expected, rtol=0, atol=1e-6)


_TORCH_FREE = textwrap.dedent(
    """
    import sys

    sys.modules["torch"] = None  # `import torch` now fails and find_spec reports it absent
    import numpy as np
    from hdb_jax.eval import real

    clip_dir, dino_dir, inputs, out = sys.argv[1:5]
    x = dict(np.load(inputs))
    clip, dino = real.ClipScorer.load(clip_dir, batch_size=4), real.DinoScorer.load(dino_dir, batch_size=4)
    assert sys.modules["torch"] is None
    prompts = [str(p) for p in x["prompts"]]
    generated, references = x["generated"], x["references"]
    np.savez(out, clip_i=clip.clip_i(generated, references), clip_t=clip.clip_t(generated, prompts),
             dino=dino.dino(generated, references))
    """
)


def test_safetensors_load_without_torch(tmp_path, clip_dir, dino_dir, clip, dino, images):
    """The scorers load the safetensors directories and give the same scores in a process without torch."""
    generated, references = images
    inputs, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, generated=generated, references=references, prompts=np.array(PROMPTS))
    command = [sys.executable, "-c", _TORCH_FREE, str(clip_dir[0]), str(dino_dir[0]), str(inputs), str(out)]
    subprocess.run(command, check=True, timeout=300)
    out = np.load(out)
    np.testing.assert_allclose(out["clip_i"], clip.clip_i(generated, references), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["clip_t"], clip.clip_t(generated, PROMPTS), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["dino"], dino.dino(generated, references), rtol=0, atol=1e-6)


# -------------------------------------------------------------------- against PyTorch
def test_clip_matches_pytorch(clip_dir, clip, images):
    generated, references = images
    model = clip_dir[1]
    texts = [real.replace_token(p) for p in PROMPTS]
    tokens = clip.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_pt = model.get_image_features(pixel_values=torch.from_numpy(_pixels(clip, generated)))
        ref_pt = model.get_image_features(pixel_values=torch.from_numpy(_pixels(clip, references)))
        text_pt = model.get_text_features(**tokens)
    image_ours, text_ours = clip.image_embeddings(generated), clip.text_embeddings(texts)
    assert image_ours.shape == (5, 16) and text_ours.shape == (5, 16)
    np.testing.assert_allclose(image_ours, image_pt.numpy(), rtol=0, atol=MODEL_TOL)
    np.testing.assert_allclose(text_ours, text_pt.numpy(), rtol=0, atol=MODEL_TOL)
    clip_i = clip.clip_i(generated, references)
    clip_t = clip.clip_t(generated, PROMPTS)
    assert clip_i.shape == clip_t.shape == (5,)
    np.testing.assert_allclose(clip_i, _torch_cos(image_pt, ref_pt).mean(axis=1), rtol=0, atol=MODEL_TOL)
    np.testing.assert_allclose(clip_t, np.diag(_torch_cos(image_pt, text_pt)), rtol=0, atol=MODEL_TOL)
    assert np.ptp(clip_i) > 1e-3 and np.ptp(clip_t) > 1e-3  # the scores tell the images apart


def test_dino_matches_pytorch(dino_dir, dino, images):
    generated, references = images
    with torch.no_grad():
        gen_pt, ref_pt = (
            dino_dir[1](pixel_values=torch.from_numpy(_pixels(dino, x))).last_hidden_state[:, 0]
            for x in (generated, references)
        )
    ours = dino.embeddings(generated)
    assert ours.shape == (5, 32)
    np.testing.assert_allclose(ours, gen_pt.numpy(), rtol=0, atol=MODEL_TOL)
    scores = dino.dino(generated, references)
    np.testing.assert_allclose(scores, _torch_cos(gen_pt, ref_pt).mean(axis=1), rtol=0, atol=MODEL_TOL)
    assert np.ptp(scores) > 1e-3


# -------------------------------------------------------------------- hand-made cases
def test_identical_images_score_one(clip, dino, images):
    generated = images[0]
    for score in (clip.clip_i, dino.dino):
        same = score(generated[:4], generated[:4])  # [4]: mean over 4 refs, one of them the image itself
        np.testing.assert_allclose(score(np.repeat(generated[:1], 4, axis=0), generated[:1]), 1.0, atol=1e-6)
        assert np.all(same < 1 - 1e-4)


def test_clip_t_scores_the_rewritten_prompt(clip, images):
    generated = images[0][:2]
    image = clip.image_embeddings(generated)
    rewritten = clip.text_embeddings(["a face wearing a hat"] * 2)  # the batch shape clip_t uses
    kept = clip.text_embeddings(["a sks face wearing a hat"] * 2)
    scores = clip.clip_t(generated, "a sks face wearing a hat")
    np.testing.assert_allclose(scores, _paired_cosine(image, rewritten), atol=1e-9)
    assert np.abs(scores - _paired_cosine(image, kept)).max() > 1e-4
    as_person = clip.clip_t(generated, ["a sks face"] * 2, replacement="person")
    expected = _paired_cosine(image, clip.text_embeddings(["a person face"] * 2))
    np.testing.assert_allclose(as_person, expected, atol=1e-9)


@pytest.mark.parametrize(
    "prompt, token, replacement, expected",
    [
        ("a sks face wearing a hat", "sks", "", "a face wearing a hat"),
        ("sks face, smiling", "sks", "", "face, smiling"),
        ("a photo of sks, smiling", "sks", "", "a photo of, smiling"),
        ("a photo of sks", "sks", "person", "a photo of person"),
        ("sks and sks", "sks", "a man", "a man and a man"),
        ("a sksy face by tasks", "sks", "", "a sksy face by tasks"),  # whole words only
        ("a v* face", "v*", "", "a face"),  # tokens are literal text
        ("a sks face", "sks face", "person", "a person"),
    ],
)
def test_replace_token(prompt, token, replacement, expected):
    assert real.replace_token(prompt, token, replacement) == expected


def test_load_errors_name_the_path(tmp_path, clip_dir, monkeypatch):
    missing = tmp_path / "no_such_model"
    for loader in (real.ClipScorer.load, real.DinoScorer.load):
        with pytest.raises(ModelLoadError, match=re.escape(str(missing))):
            loader(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=f"{re.escape(str(empty))}.*config.json"):
        real.ClipScorer.load(empty)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors", "merges.txt"):
        shutil.copy(clip_dir[0] / name, no_tokenizer / name)
    with pytest.raises(ModelLoadError, match=f"{re.escape(str(no_tokenizer))}: missing vocab.json"):
        real.ClipScorer.load(no_tokenizer)
    with pytest.raises(ModelLoadError, match="model_type 'clip', expected 'vit'"):
        real.DinoScorer.load(clip_dir[0])
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text('{"model_type": "vit"}')
    (pickles / "pytorch_model.bin").write_bytes(b"")
    monkeypatch.setattr(real, "_torch_available", lambda: False)
    with pytest.raises(ModelLoadError, match=f"{re.escape(str(pickles))}.*needs torch"):
        real.DinoScorer.load(pickles)


def test_wrong_inputs_are_refused(clip, images):
    with pytest.raises(ValueError, match="uint8"):
        clip.image_embeddings(images[0].astype(np.float32))
    with pytest.raises(ValueError, match="2 prompts for 5 images"):
        clip.clip_t(images[0], PROMPTS[:2])
