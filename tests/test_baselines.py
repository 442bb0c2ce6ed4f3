"""The subject job's other methods: Textual Inversion and DreamBooth, and its TensorBoard output."""

import os

import jax
import numpy as np
import pytest
from conftest import load_config

from hdb_jax.blocks import build, tuning
from hdb_jax.jobs import subject as subject_job
from hdb_jax.stages import subject

needs_torch = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is None, reason="needs torch"
)


def _config(tmp_path, arg, steps=3, **data):
    config = load_config("subject", arg)
    config.workdir, config.steps, config.checkpoint_every, config.log_every = str(tmp_path), steps, 100, 1
    config.export.lora, config.export.sample_prompts = False, ()
    for key, value in data.items():
        config.data[key] = value
    return config


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return build.base_model({"source": os.fspath(tiny_model_dir), "resolution": 32})


@needs_torch
def test_textual_inversion_changes_one_row_and_loads_in_diffusers(base, tiny_model_dir, tmp_path):
    import torch
    from test_export import _torch_pipeline

    sd, params = base
    config = _config(tmp_path / "ti", "tiny,method=textual_inversion")
    config.model.source = os.fspath(tiny_model_dir)
    config.optim.learning_rate = 0.1  # a visible move in three steps
    result = subject.train(config, sd, params)
    written = subject_job.export(config, result)
    t = result.tuning
    assert isinstance(t, tuning.TextualInversionTuning) and result.num_params == sd.text_width
    merged = t.merged(params, jax.device_get(result.state["trainable"]), {})
    table, before = (
        np.asarray(p["text_encoder"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
        for p in (merged, params)
    )
    changed = np.flatnonzero(np.abs(table - before).max(axis=1) > 0)
    assert changed.tolist() == [t.token_id]  # the token's row, and only it
    for path, leaf in jax.tree_util.tree_flatten_with_path(merged)[0]:
        if "token_embedding" not in jax.tree_util.keystr(path):
            ref = params
            for k in path:
                ref = ref[k.key]
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
    # diffusers' own loader takes our file and its text encoder gives our output.
    pipe = _torch_pipeline(tiny_model_dir)
    pipe.load_textual_inversion(written["learned_embeds"], token="<sks>")
    ids = pipe.tokenizer(["a <sks> face"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids).last_hidden_state.numpy()
    ours = np.asarray(sd.encode_text(merged["text_encoder"], sd.tokenize(["a sks face"])))
    base_out = np.asarray(sd.encode_text(params["text_encoder"], sd.tokenize(["a sks face"])))
    assert np.abs(ours - theirs).max() <= 1e-4
    assert np.abs(ours - base_out).max() > 1e-3  # not vacuous: the embedding moved the output


def test_dreambooth_generates_class_images_once_and_trains_the_unet(base, tmp_path):
    sd, params = base
    config = _config(tmp_path / "db", "tiny,method=dreambooth", steps=2, prior_weight=1.0)
    config.data.prior.source, config.data.prior.count, config.data.prior.sample_steps = "generated", 2, 2
    subject.train(config, sd, params)
    folder = tmp_path / "db" / "class_images"
    files = sorted(folder.glob("class_*.png"))
    assert len(files) == 2 and (folder / "manifest.json").is_file()
    stamps = [f.stat().st_mtime_ns for f in files]
    config.steps = 4  # resume: the cached class images are read, not sampled again
    second = subject.train(config, sd, params)
    assert second.loop.start == 2 and [f.stat().st_mtime_ns for f in files] == stamps
    trained = jax.device_get(second.state["trainable"])
    assert set(trained) == {"unet"} and second.num_params == sum(
        x.size for x in jax.tree_util.tree_leaves(params["unet"])
    )
    moved = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree_util.tree_leaves(trained["unet"]), jax.tree_util.tree_leaves(params["unet"]))
    )
    assert moved > 0
    # Another prompt invalidates the cache.
    config.data.class_prompt = "a cartoon of a face"
    subject.load_subject_data(config, sd, params, config.workdir)
    assert [f.stat().st_mtime_ns for f in files] != stamps


def test_reduced_subject_run_writes_scalars_and_a_validation_grid(tmp_path):
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    config = _config(tmp_path / "tb", "tiny,adapter=lora", steps=4)
    config.validate_every, config.export.sample_prompts, config.export.sample_steps = 2, ("a sks face",), 2
    result = subject_job.run(config)
    acc = loader.EventAccumulator(str(tmp_path / "tb" / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/fixed_batch_loss")] == [2, 4]
    grids = acc.Images("val/samples")
    assert [g.step for g in grids] == [2, 4] and (grids[0].width, grids[0].height) == (2 * 32, 2 * 32)
    assert result.loop.validation[4]["fixed_batch_loss"] == pytest.approx(result.eval["end"], rel=1e-5)
