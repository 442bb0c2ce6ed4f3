"""The hypernetwork: output trees, zero start, iterative refinement, gradients, sd15 shapes, loading."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import captured_constants_fail_above

from hdb_jax import adapters as A
from hdb_jax import hypernet as H
from hdb_jax.sd.loading import ModelLoadError

# r = 2 so that the [a, r] / [r, b] reshapes of a token are really exercised.
KIND = A.LiDB(a=8, b=4, rank=2)
W = (KIND.a + KIND.b) * KIND.rank  # 24
BLOCKS = 2  # tiny decoders: fewer blocks, faster compiles (the sd15 test checks the default 4)


@pytest.fixture(scope="module")
def adapters(tiny_sd):
    abstract = tiny_sd.abstract_params()
    return {
        "unet": A.Adapter.create(KIND, abstract["unet"], [A.PATTERNS["unet_attention"]], "unet"),
        "text_encoder": A.Adapter.create(
            KIND, abstract["text_encoder"], [A.PATTERNS["text_attention"]], "text_encoder"
        ),
    }


@pytest.fixture(scope="module")
def images():
    """Two different NHWC images in [-1, 1] at the tiny encoder's 32 px."""
    return jax.random.uniform(jax.random.PRNGKey(5), (2, 32, 32, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def hyper(adapters):
    """A tiny cross-mode network with a visibly non-zero head, its params and jitted calls."""
    net, init = H.build_hypernet("tiny", adapters, KIND, num_blocks=BLOCKS, head_std=0.05)
    params = init(jax.random.PRNGKey(0))
    encode = jax.jit(lambda p, x: net.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, f, s: net.apply({"params": p}, f, s, method="decode"), static_argnums=2)
    refine = jax.jit(lambda p, f, e: net.apply({"params": p}, f, e, method="refine"))
    return net, params, encode, decode, refine


def _max(x):
    return float(jnp.abs(x).max())


def test_output_tree_matches_adapter_trees(adapters, images, hyper):
    net, params, encode, decode, _ = hyper
    tree = jax.eval_shape(lambda p, x: net.apply({"params": p}, x), params, images)  # __call__
    expected = {c: A.broadcast_batch(ad.init(jax.random.PRNGKey(1)), 2) for c, ad in adapters.items()}
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(expected)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, tree)
    assert shapes == jax.tree_util.tree_map(lambda x: x.shape, expected)
    assert shapes["unet"][adapters["unet"].paths[0]] == {"a_train": (2, 8, 2), "b_train": (2, 2, 4)}

    # Token order: components sorted by name, then each adapter's sorted targets.
    layout = H.token_layout(adapters)
    assert layout == tuple(("text_encoder", p) for p in adapters["text_encoder"].paths) + tuple(
        ("unet", p) for p in adapters["unet"].paths
    )
    assert net.decoder.num_tokens == len(layout) == 8 + 32 and net.decoder.token_width == W

    # Round trips, both ways, bit-exact; token i holds layer i's a_train then b_train.
    tree = H.tokens_to_tree(decode(params, encode(params, images), 4), adapters, KIND)
    tokens = H.tree_to_tokens(tree, adapters)
    assert tokens.shape == (2, len(layout), W)
    jax.tree_util.tree_map(np.testing.assert_array_equal, H.tokens_to_tree(tokens, adapters, KIND), tree)
    rand = jax.random.normal(jax.random.PRNGKey(3), (2, len(layout), W))
    np.testing.assert_array_equal(H.tree_to_tokens(H.tokens_to_tree(rand, adapters, KIND), adapters), rand)
    component, path = layout[9]
    layer = H.tokens_to_tree(rand, adapters, KIND)[component][path]
    np.testing.assert_array_equal(layer["a_train"][1], rand[1, 9, :16].reshape(8, 2))
    np.testing.assert_array_equal(layer["b_train"][1], rand[1, 9, 16:].reshape(2, 4))

    with pytest.raises(ValueError, match="LiDB"):
        H.tokens_to_tree(rand, adapters, A.LiDB(a=8, b=4, rank=1))


def test_zero_head_predicts_zero_and_leaves_unet_unchanged(
    adapters, images, hyper, tiny_sd, tiny_params, unet_inputs
):
    encoder_params = hyper[1]["encoder"]  # reused: only the decoder is initialised (one compile)
    net, _ = H.build_hypernet("tiny", adapters, KIND, num_blocks=1, zero_init_head=True)
    params = H.init_params(net, jax.random.PRNGKey(0), encoder_params=encoder_params)
    tokens = jax.jit(lambda p, x: net.apply({"params": p}, x, 1, method="predict_tokens"))(params, images)
    assert tokens.shape == (2, 40, W) and not np.any(np.asarray(tokens))  # exactly zero
    tree = H.tokens_to_tree(tokens, adapters, KIND)

    # Per-sample (zero) weights on the tiny UNet: the output is bit-identical, op by op.
    latents, timesteps, context = unet_inputs
    unet = adapters["unet"]
    frozen = unet.basis(jax.random.PRNGKey(4))
    base = tiny_sd.predict(tiny_params["unet"], latents, timesteps, context)
    with unet.attach(tree["unet"], frozen, per_sample=True):
        out = tiny_sd.predict(tiny_params["unet"], latents, timesteps, context)
    np.testing.assert_array_equal(out, base)

    # The default head is N(0, 1e-3), bias zero.
    default_net, _ = H.build_hypernet("tiny", adapters, KIND, num_blocks=1)
    head = H.init_params(default_net, jax.random.PRNGKey(0), encoder_params)["decoder"]["head"]
    assert 0.7e-3 < float(jnp.std(head["kernel"])) < 1.3e-3 and not np.any(np.asarray(head["bias"]))


def test_iterative_refinement(images, hyper):
    _, params, encode, decode, refine = hyper
    features = encode(params, images)
    once, four = decode(params, features, 1), decode(params, features, 4)
    scale = _max(four)
    assert scale > 1e-3
    assert _max(four - once) > 0.05 * scale  # s = 4 is not s = 1 ...
    assert _max(four - 4 * once) > 0.05 * scale  # ... nor 4 times it: each step sees the estimate

    estimate = jnp.zeros_like(four)
    for _ in range(4):  # the same decoder parameters at every step
        estimate = estimate + refine(params, features, estimate)
    np.testing.assert_allclose(estimate, four, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(
        refine(params, features, jnp.zeros_like(four)), once, rtol=1e-5, atol=1e-6 * scale
    )


def test_images_drive_weights_and_encoder_freezing(adapters, images, hyper):
    net, params, encode, decode, _ = hyper
    tokens = decode(params, encode(params, images), 4)
    assert _max(tokens[0] - tokens[1]) > 0.05 * _max(tokens)  # different images, different weights

    def grads(module, p):
        loss = lambda q: jnp.sum(module.apply({"params": q}, images, 1, method="predict_tokens") ** 2)
        return jax.jit(jax.grad(loss))(p)

    g = grads(net, params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(g["encoder"]))
    assert any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(g["decoder"]))
    trainable, frozen = H.split_params(net, params)
    assert set(trainable) == {"decoder"} and set(frozen) == {"encoder"}

    open_net, _ = H.build_hypernet(
        "tiny", adapters, KIND, num_blocks=BLOCKS, head_std=0.05, train_encoder=True
    )
    g = grads(open_net, params)  # same parameter tree, encoder now trains
    assert _max(g["encoder"]["vision_model"]["embeddings"]["patch_embedding"]["kernel"]) > 0
    assert _max(g["encoder"]["vision_model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]) > 0
    trainable, frozen = H.split_params(open_net, params)
    assert set(trainable) == {"encoder", "decoder"} and frozen == {}


def test_concat_mode_differs_from_cross(adapters, images, hyper):
    net, params, encode, decode, _ = hyper
    cat_net, _ = H.build_hypernet("tiny", adapters, KIND, num_blocks=BLOCKS, head_std=0.05, mode="concat")
    cat_params = H.init_params(cat_net, jax.random.PRNGKey(0), encoder_params=params["encoder"])
    assert (
        "cross_attn" in params["decoder"]["blocks_0"]
        and "cross_attn" not in cat_params["decoder"]["blocks_0"]
    )
    features = encode(params, images)
    cat = jax.jit(lambda p, f: cat_net.apply({"params": p}, f, method="decode"))(cat_params, features)
    cross = decode(params, features, 4)
    assert cat.shape == cross.shape == (2, 40, W) and bool(jnp.all(jnp.isfinite(cat)))
    assert _max(cat - cross) > 0.05 * _max(cross)
    assert _max(cat[0] - cat[1]) > 0.05 * _max(cat)  # concat mode sees the image too


def test_sd15_abstract_shapes():
    from hdb_jax.sd import model

    abstract = model.sd15_shapes().abstract_params()
    lidb = A.LiDB()  # a=100, b=50, r=1
    ads = {
        "unet": A.Adapter.create(lidb, abstract["unet"], [A.PATTERNS["unet_attention"]], "unet"),
        "text_encoder": A.Adapter.create(
            lidb, abstract["text_encoder"], [A.PATTERNS["text_attention"]], "text_encoder"
        ),
    }
    net, _ = H.build_hypernet("sd15", ads, lidb)
    shapes = H.abstract_params(net)

    # CLIP ViT-H/14 vision tower by hand: D=1280, MLP 5120, 32 layers, 14 px patches at 224 px.
    d, m, layers, tokens = 1280, 5120, 32, (224 // 14) ** 2 + 1
    embeddings = 3 * 14 * 14 * d + d + tokens * d  # patch conv (no bias), class token, positions
    per_layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 2 * 2 * d  # q k v o, fc1, fc2, 2 LN
    hand = embeddings + 2 * d + layers * per_layer + 2 * d  # + pre- and post-LayerNorm
    count = sum(x.size for x in jax.tree_util.tree_leaves(shapes["encoder"]))
    assert count == hand == 630_766_080

    assert (net.decoder.num_tokens, net.decoder.token_width, net.decoder.width) == (176, 150, 300)
    assert (net.decoder.num_blocks, net.decoder.num_heads, net.iterations) == (4, 2, 4)
    assert shapes["decoder"]["layer_embedding"].shape == (176, 300)
    assert shapes["decoder"]["head"]["kernel"].shape == (300, 150)
    assert sorted(k for k in shapes["decoder"] if k.startswith("blocks_")) == [
        f"blocks_{i}" for i in range(4)
    ]

    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    tree = jax.eval_shape(lambda p, x: net.apply({"params": p}, x), shapes, images)
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    assert len(leaves) == 2 * 176
    assert {x.shape for _, x in leaves} == {(1, 100, 1), (1, 1, 50)}
    assert (len(tree["unet"]), len(tree["text_encoder"])) == (128, 48)


def test_encoder_loads_pytorch_checkpoint(tmp_path, adapters, images):
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    pt = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**H.ENCODER_CONFIGS["tiny"])).eval()
    pt.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    config, enc_params = H.load_encoder_params(tmp_path, H.encoder_config("tiny"))
    ours = H.ImageEncoder(config).apply({"params": enc_params}, images)  # [2, 17, 32]

    mean = torch.tensor(H.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(H.CLIP_STD).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # [2, 3, 32, 32]
    with torch.no_grad():
        ref = pt(pixel_values=((pixels + 1) / 2 - mean) / std).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (2, 17, 32)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    # build_hypernet(encoder_path=...) puts exactly these weights under "encoder".
    _, init = H.build_hypernet("tiny", adapters, KIND, num_blocks=1, encoder_path=tmp_path)
    loaded = init(jax.random.PRNGKey(0))["encoder"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, enc_params)
    # Jitted, the loaded weights go in as an argument, never as constants of the program (ViT-H/14's
    # 2.5 GB captured this way took minutes of compile and three copies of memory).
    key, half = jax.random.PRNGKey(0), sum(x.nbytes for x in jax.tree_util.tree_leaves(enc_params)) // 2
    with captured_constants_fail_above(half):
        jax.jit(lambda k, e: init(k, encoder_params=e)).lower(key, init.load_encoder())
        with pytest.raises(UserWarning, match="constants were captured"):  # what the check catches
            jax.jit(lambda k: init(k)).lower(key)

    with pytest.raises(ModelLoadError, match="hidden_size"):
        H.load_encoder_params(tmp_path, H.encoder_config("sd15"))


def test_offset_is_the_start_of_the_iteration(adapters, images):
    """θ̂_0 = offset: a zero head predicts exactly the offset, and each step adds to it."""
    net, init = H.build_hypernet("tiny", adapters, KIND, num_blocks=1, zero_init_head=True, offset=True)
    params = init(jax.random.PRNGKey(0))
    n = len(H.token_layout(adapters))
    assert params["decoder"]["offset"].shape == (n, W) and not np.any(params["decoder"]["offset"])
    offset = jax.random.normal(jax.random.PRNGKey(3), (n, W))
    params = {**params, "decoder": {**params["decoder"], "offset": offset}}
    predict = lambda p, s: net.apply({"params": p}, images, s, method="predict_tokens")  # noqa: E731
    np.testing.assert_array_equal(predict(params, 2), jnp.broadcast_to(offset, (2, n, W)))
    # With a non-zero head: one step from the offset is offset + refine(context, offset).
    head = jax.random.normal(jax.random.PRNGKey(4), params["decoder"]["head"]["kernel"].shape) * 0.1
    params = {
        **params,
        "decoder": {**params["decoder"], "head": {**params["decoder"]["head"], "kernel": head}},
    }
    features = net.apply({"params": params}, images, method="encode")
    step = net.apply(
        {"params": params},
        net.apply({"params": params}, features, method=lambda m, f: m.decoder.project(f)),
        jnp.broadcast_to(offset, (2, n, W)),
        method=lambda m, c, e: m.decoder.refine(c, e),
    )
    np.testing.assert_allclose(predict(params, 1), offset + step, rtol=1e-6, atol=1e-6)
