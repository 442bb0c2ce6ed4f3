"""The toy world's base model: its recipe trains and resumes; the shipped model draws faces on demand."""

import os

import numpy as np
import pytest
from conftest import load_config

from hdb_jax.blocks import sample
from hdb_jax.jobs import toy_base as base
from hdb_jax.sd import loading
from hdb_jax.toy import base_model_dir, synthetic
from hdb_jax.toy import identity as identity_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SEEDS = list(range(8))
PROMPTS = {
    "face": "a face",
    "red": "a photo of a face on a red background",
    "blue": "a photo of a face on a blue background",
    "sketch": "a sketch of a face",
    "photo": "a photo of a face",
}


def test_recipe_lowers_its_loss_and_resumes(tmp_path):
    config = load_config("base_toy", "reduced")
    config.workdir = os.fspath(tmp_path / "run")
    config.out_dir = ""
    config.stop_after = 8  # the first invocation stops (with a checkpoint) after 8 of 16 steps
    first = base.train(config)
    assert first["step"] == 8 and "heldout_loss" not in first  # unfinished: nothing exported
    config.stop_after = 0
    second = base.train(config)  # the same command again: resumes from step 8
    assert second["steps_run"] == config.vae_steps + config.unet_steps - 8
    vae, unet1, unet2 = first["history"]["vae"], first["history"]["unet"], second["history"]["unet"]
    assert vae[max(vae)] < 0.8 * vae[min(vae)]  # the autoencoder phase learns
    assert unet2[max(unet2)] < 0.9 * unet1[min(unet1)]  # the denoiser keeps learning after the resume
    assert np.isfinite(second["heldout_loss"])
    assert float(second["state"]["scaling_factor"]) == float(first["state"]["scaling_factor"]) != 0.18215


@pytest.fixture(scope="module")
def shipped():
    sd, params = loading.load_pretrained(base_model_dir())  # the loader real SD 1.5 goes through
    names = [k for k in PROMPTS for _ in SEEDS]
    images = sample.sample(
        sd,
        params,
        [PROMPTS[k] for k in names],
        SEEDS * len(PROMPTS),
        num_steps=20,
        guidance_scale=3.0,
        batch_size=len(SEEDS),
        progress=False,
    )
    by_prompt = {k: images[i * len(SEEDS) : (i + 1) * len(SEEDS)] for i, k in enumerate(PROMPTS)}
    return sd, by_prompt


def test_shipped_model_files_and_card():
    root = base_model_dir()
    for name in (
        "model_index.json",
        "MODEL_CARD.md",
        "samples.png",
        "unet/diffusion_flax_model.msgpack",
        "vae/diffusion_flax_model.msgpack",
        "text_encoder/flax_model.msgpack",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ):
        assert (root / name).is_file(), name
    card = (root / "MODEL_CARD.md").read_text()
    assert (
        "python -m hdb_jax.train --config configs/base_toy.py" in card and "Held-out denoising loss" in card
    )
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) < 16 * 2**20  # "a few MB"


def _scrambled(images, block=4):
    """The same pixels in 4x4 blocks shuffled: colours of a face without its structure."""
    n, h, w, c = images.shape
    blocks = (
        images.reshape(n, h // block, block, w // block, block, c)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, -1, block, block, c)
    )
    blocks = blocks[:, np.random.default_rng(1).permutation(blocks.shape[1])]
    return (
        blocks.reshape(n, h // block, w // block, block, block, c)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, h, w, c)
    )


def test_samples_are_faces(shipped):
    sd, by_prompt = shipped
    res = sd.default_resolution
    scorer = identity_lib.load()
    # "Real generator faces": the mean embedding of renders of 200 identities no toy model trained
    # on. Reference points: renders of 16 other unseen identities (faces) and three kinds of
    # non-faces (flat colour fields, smoothed noise, and those same real renders with their 4x4
    # blocks shuffled: a face's colours without its structure). Measured on the shipped encoder:
    # faces about +0.07, non-faces about -0.10 to -0.14. A set of images counts as faces if its mean
    # similarity to the centroid is above the midpoint between the faces' and the non-faces' means.
    gallery = np.asarray(
        scorer.embed(
            identity_lib.render(list(range(7_000_000, 7_000_200)), [0] * 200, ["photo"] * 200, 0, res)
        )
    )
    centroid = gallery.mean(0) / np.linalg.norm(gallery.mean(0))
    score = lambda images: float(np.mean(np.asarray(scorer.embed(images)) @ centroid))  # noqa: E731
    real = identity_lib.render(list(range(7_100_000, 7_100_016)), [1] * 16, ["photo"] * 16, 0, res)
    rng = np.random.default_rng(0)
    flat = np.broadcast_to(rng.integers(0, 256, (8, 1, 1, 3)), (8, res, res, 3)).astype(np.uint8)
    noise = np.repeat(np.repeat(rng.normal(0, 1, (8, res // 4, res // 4, 3)), 4, 1), 4, 2)
    noise = np.clip(128 + 60 * noise, 0, 255).astype(np.uint8)
    non_face = np.mean([score(flat), score(noise), score(_scrambled(real))])
    threshold = 0.5 * (score(real) + non_face)
    assert score(real) > non_face + 0.1
    assert score(by_prompt["face"]) > threshold, (score(by_prompt["face"]), score(real), non_face)


def _border(images):
    x = images.astype(np.float32) / 255.0
    ring = np.concatenate(
        [
            x[:, :2].reshape(len(x), -1, 3),
            x[:, -2:].reshape(len(x), -1, 3),
            x[:, :, :2].reshape(len(x), -1, 3),
            x[:, :, -2:].reshape(len(x), -1, 3),
        ],
        axis=1,
    )
    return ring.mean(axis=1)  # [N, 3] mean colour of the 2-pixel border


def _paired_t(a, b):
    """t statistic of the per-seed differences a - b (same seeds, so paired)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))


def test_prompt_modifiers_change_their_attribute(shipped):
    _, by_prompt = shipped
    # "Measurably": over 8 seeds, each seed sampled with both prompts, the attribute moves in the
    # prompted direction with a paired t statistic above 2 (about p < 0.05 one-sided for 7 degrees
    # of freedom). The effect is small (see the model card's modifier table: the classifier finds
    # the red background in 9% of samples, blue in 41%): the v2 model's border R-B contrast between
    # "red" and "blue" prompts is 0.038 over these seeds, against 1.18 in the renders.
    red, blue = synthetic.BACKGROUNDS["red"], synthetic.BACKGROUNDS["blue"]
    r_minus_b = {k: _border(by_prompt[k])[:, 0] - _border(by_prompt[k])[:, 2] for k in ("red", "blue")}
    assert red[0] - red[2] > 0 > blue[0] - blue[2]
    assert _paired_t(r_minus_b["red"], r_minus_b["blue"]) > 2.0, r_minus_b
    assert (r_minus_b["red"] - r_minus_b["blue"]).mean() > 0.02

    def saturation(images):
        x = images.astype(np.float32) / 255.0
        return (x.max(-1) - x.min(-1)).mean(axis=(1, 2))  # per image

    # Sketches are rendered in grayscale (saturation 0); photos are coloured.
    assert _paired_t(saturation(by_prompt["photo"]), saturation(by_prompt["sketch"])) > 2.0


def test_shipped_record_is_reproduced_by_the_recipe_code():
    import json

    import jax
    import jax.numpy as jnp

    from hdb_jax.blocks import diffusion

    record = json.loads((base_model_dir() / "training.json").read_text())
    for key in (
        "heldout_loss",
        "precision",
        "recall",
        "non_face_fraction",
        "modifiers",
        "render_rates",
        "vae_heldout_psnr",
    ):
        assert key in record, key
    assert set(record["modifiers"]) == set(record["render_rates"]) and len(record["modifiers"]) >= 15
    config = load_config("base_toy")
    config.update_from_flattened_dict(
        {"data.heldout_identities": record["config"]["data"]["heldout_identities"]}
    )
    sd, params = loading.load_pretrained(base_model_dir())
    pixels, ids = base.heldout_set(config, sd)
    loss = diffusion.make_heldout_loss(sd, 8)(
        params, jnp.asarray(pixels), jnp.asarray(ids), jax.random.PRNGKey(config.seed + 1)
    )
    # The recorded figure is the recipe's own evaluation of these very (float16) weights.
    assert float(loss) == pytest.approx(record["heldout_loss"], rel=1e-4)
