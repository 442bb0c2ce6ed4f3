"""LAG sampling of Personalized Residuals against merged and base sampling and dense attention."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import adapters as A
from hdb_jax.blocks import lag as lag_lib
from hdb_jax.blocks import sample as S
from hdb_jax.jobs import sample as sample_cli
from hdb_jax.sd import hf


@pytest.fixture(scope="module")
def residual(tiny_params):
    adapter = A.Adapter.create(
        A.Residual(ratio=0.25), tiny_params["unet"], [A.PATTERNS["unet_proj_out"]], "unet"
    )
    leaves, treedef = jax.tree_util.tree_flatten(adapter.init(jax.random.PRNGKey(0)))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return adapter, treedef.unflatten([0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _ids(sd):
    return sd.tokenize(["a sks face", "a photo of a sks face"]), [
        sd.tokenizer.convert_tokens_to_ids(w) for w in ("sks</w>", "face</w>")
    ]


def test_mask_one_is_merged_sampling_and_zero_is_base(tiny_sd, tiny_params, residual):
    adapter, trained = residual
    prompts, seeds = ["a sks face", "a photo of a sks face"], [0, 1]
    _, tokens = _ids(tiny_sd)
    kw = dict(num_steps=3, guidance_scale=3.0, batch_size=2, progress=False)
    merged = S.sample(
        tiny_sd, A.merge_all(tiny_params, {"unet": adapter}, {"unet": trained}), prompts, seeds, **kw
    )
    base = S.sample(tiny_sd, tiny_params, prompts, seeds, **kw)
    one = S.sample(
        tiny_sd, tiny_params, prompts, seeds, lag=(S.LagSpec(adapter, tuple(tokens), 1.0), trained, {}), **kw
    )
    zero = S.sample(
        tiny_sd, tiny_params, prompts, seeds, lag=(S.LagSpec(adapter, tuple(tokens), 0.0), trained, {}), **kw
    )
    lag = S.sample(
        tiny_sd, tiny_params, prompts, seeds, lag=(S.LagSpec(adapter, tuple(tokens)), trained, {}), **kw
    )
    assert (
        np.abs(one.astype(int) - merged).max() <= 1 and np.abs(zero.astype(int) - base).max() <= 1
    )  # uint8 rounding
    assert np.abs(merged.astype(int) - base).max() > 20  # the residual matters
    assert np.abs(lag.astype(int) - merged).max() > 5 and np.abs(lag.astype(int) - base).max() > 5


def test_recorded_maps_are_the_dense_attention_probabilities(tiny_sd, tiny_params, unet_inputs, residual):
    adapter, trained = residual
    latents, timesteps, _ = unet_inputs
    ids, tokens = _ids(tiny_sd)
    context = tiny_sd.encode_text(tiny_params["text_encoder"], ids)
    weights = lag_lib.token_weights(ids, tokens)
    seen = {}

    def capture(next_fun, args, kwargs, ctx):  # the inputs each attn2 really gets
        if ctx.method_name == "__call__" and isinstance(ctx.module, hf.FlaxAttention):
            path = ".".join(ctx.module.scope.path)
            if path.endswith("attn2"):
                seen[path] = (
                    np.asarray(args[0]),
                    np.asarray(args[1] if len(args) > 1 else kwargs["context"]),
                )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture), lag_lib.lag(adapter, trained, {}, weights, jnp.ones((2,))) as rec:
        jax.block_until_ready(tiny_sd.predict(tiny_params["unet"], latents, timesteps, context))
    assert len(rec.scores) == len(adapter.targets) == len(seen)
    for path, (hidden, ctx) in seen.items():
        module_params = tiny_params["unet"]
        for part in path.split("."):
            module_params = module_params[part]
        heads = tiny_sd.unet.attention_head_dim if isinstance(tiny_sd.unet.attention_head_dim, int) else None
        q = hidden.astype(np.float64) @ np.asarray(module_params["to_q"]["kernel"], np.float64)
        k = ctx.astype(np.float64) @ np.asarray(module_params["to_k"]["kernel"], np.float64)
        b, t, inner = q.shape
        d = inner // heads
        qh, kh = q.reshape(b, t, heads, d), k.reshape(b, k.shape[1], heads, d)
        logits = np.einsum("bthd,bshd->bhts", qh, kh) / np.sqrt(d)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        want = np.einsum("bts,bs->bt", probs.mean(1), np.asarray(weights, np.float64))
        np.testing.assert_allclose(np.asarray(rec.scores[lag_lib.block_of(path)]), want, rtol=1e-4, atol=1e-6)
        mask = np.asarray(rec.masks[lag_lib.block_of(path)])
        np.testing.assert_array_equal(mask.mean(axis=1), 0.5)  # the median splits the positions half/half
        np.testing.assert_array_equal(mask, want > np.median(want, axis=1, keepdims=True))


def test_unconditional_rows_use_the_base_weights(tiny_sd, tiny_params, unet_inputs, residual):
    adapter, trained = residual
    latents, timesteps, context = unet_inputs
    ids, tokens = _ids(tiny_sd)
    base = tiny_sd.predict(tiny_params["unet"], latents, timesteps, context)
    with lag_lib.lag(adapter, trained, {}, lag_lib.token_weights(ids, tokens), jnp.array([0.0, 1.0])):
        out = tiny_sd.predict(tiny_params["unet"], latents, timesteps, context)
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(base[0]), atol=1e-5)  # branch 0: base
    assert float(jnp.abs(out[1] - base[1]).max()) > 1e-2  # branch 1: the masked residual


def test_median_mask_splits_half():
    scores = jax.random.uniform(jax.random.PRNGKey(0), (3, 64))
    mask = lag_lib.subject_mask(scores)
    np.testing.assert_array_equal(np.asarray(mask.sum(axis=1)), 32)
    assert dataclasses.is_dataclass(lag_lib.Recording())


def test_command_line_lag_samples_a_residual_file(tiny_sd, tiny_params, residual, tmp_path):
    from PIL import Image

    from hdb_jax.formats import personal
    from hdb_jax.sd.fingerprint import params_fingerprint

    adapter, trained = residual
    path = personal.save_personal(
        tmp_path / "res.safetensors",
        {"unet": adapter},
        {"unet": trained},
        base_fingerprint=params_fingerprint(tiny_params),
    )
    args = ["--model", "tiny", "--weights", str(path), "--prompt", "a sks face", "--seeds", "0,1"]
    args += ["--steps", "3", "--guidance", "3", "--batch-size", "2"]
    sample_cli.main(args + ["--lag", "sks,face", "--out", str(tmp_path / "lag")])
    _, tokens = _ids(tiny_sd)
    want = S.sample(
        tiny_sd,
        tiny_params,
        ["a sks face"] * 2,
        [0, 1],
        num_steps=3,
        guidance_scale=3.0,
        batch_size=2,
        progress=False,
        lag=(S.LagSpec(adapter, tuple(tokens)), trained, {}),
    )
    got = np.stack([np.asarray(Image.open(tmp_path / "lag" / f"p0_s{s}.png")) for s in (0, 1)])
    assert np.abs(got.astype(int) - want).max() <= 1
    with pytest.raises(SystemExit, match="not a single token"):
        sample_cli.main(args + ["--lag", "sks,facexyzzy", "--out", str(tmp_path / "bad")])
    lora = A.Adapter.create(A.LoRA(rank=2), tiny_params["unet"], [A.PATTERNS["unet_attention"]], "unet")
    lora_path = personal.save_personal(
        tmp_path / "lora.safetensors",
        {"unet": lora},
        {"unet": lora.init(jax.random.PRNGKey(0))},
        base_fingerprint=params_fingerprint(tiny_params),
    )
    bad = ["--model", "tiny", "--weights", str(lora_path), "--prompt", "a sks face", "--lag", "sks,face"]
    with pytest.raises(SystemExit, match="Personalized Residuals"):
        sample_cli.main(bad)
