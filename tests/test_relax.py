"""Rank-relaxed finetuning against dense merged references on the tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from hdb_jax import adapters as A
from hdb_jax.blocks import relax
from hdb_jax.formats import lora as export

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

LIDB = A.LiDB(a=8, b=4, rank=2)
LORA_RANK, LORA_ALPHA = 4, 8.0  # LoRA scale 2, so a forgotten scale shows
STEPS, BATCH, SHIFT = 3, 2, 2
RNG = jax.random.PRNGKey(11)


def _add(params, deltas):
    """``params`` with dense float64 updates ``{component: {kernel_path: ΔW [in, out]}}`` added."""
    out = dict(params)
    for component, by_kernel in deltas.items():
        flat = traverse_util.flatten_dict(params[component])
        for kernel_path, delta in by_kernel.items():
            kernel = flat[kernel_path]
            flat[kernel_path] = kernel + jnp.asarray(delta.reshape(kernel.shape), jnp.float32)
        out[component] = traverse_util.unflatten_dict(flat)
    return out


def _f64(x):
    return np.asarray(x, np.float64)


def _lidb_deltas(adapters, basis, predicted):
    return {
        c: {
            t.kernel_path: _f64(basis[c][t.path]["a_aux"])
            @ _f64(predicted[c][t.path]["a_train"])
            @ _f64(predicted[c][t.path]["b_train"])
            @ _f64(basis[c][t.path]["b_aux"])
            for t in a.targets
        }
        for c, a in adapters.items()
    }


def _lora_deltas(adapters, trees):
    return {
        c: {
            t.kernel_path: a.kind.scale * _f64(trees[c][t.path]["down"]) @ _f64(trees[c][t.path]["up"])
            for t in a.targets
        }
        for c, a in adapters.items()
    }


@pytest.fixture(scope="module")
def lidb(tiny_params):
    """LiDB adapters on UNet and text attention, their bases, a random prediction, the dense merge."""
    patterns = {"unet": "unet_attention", "text_encoder": "text_attention"}
    adapters = {c: A.Adapter.create(LIDB, tiny_params[c], [A.PATTERNS[n]], c) for c, n in patterns.items()}
    basis = {c: a.basis(jax.random.PRNGKey(3)) for c, a in adapters.items()}
    init = {c: a.init(jax.random.PRNGKey(4)) for c, a in adapters.items()}
    leaves, treedef = jax.tree_util.tree_flatten(init)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    predicted = treedef.unflatten([0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    merged = _add(tiny_params, _lidb_deltas(adapters, basis, predicted))
    return adapters, basis, predicted, merged


@pytest.fixture(scope="module")
def relaxed(tiny_params, lidb):
    adapters, basis, predicted, _ = lidb
    return {
        v: relax.relax(
            v,
            tiny_params,
            adapters,
            basis,
            predicted,
            rank=LORA_RANK,
            alpha=LORA_ALPHA,
            key=jax.random.PRNGKey(6),
        )
        for v in relax.VARIANTS
    }


@pytest.fixture(scope="module")
def forward(tiny_sd, unet_inputs):
    """Jitted ``(adapters, params, trees) -> (text features, UNet output)``; ``adapters`` a tuple."""
    latents, timesteps, _ = unet_inputs
    ids = jnp.asarray(tiny_sd.tokenize(["a photo of sks face", "a painting of a face"]))

    def run(adapters, params, trees):
        with A.attach_all(dict(adapters), trees, {}):
            context = tiny_sd.encode_text(params["text_encoder"], ids)
            return context, tiny_sd.predict(params["unet"], latents, timesteps, context)

    return jax.jit(run, static_argnums=0)


@pytest.fixture(scope="module")
def image():
    return jax.random.uniform(jax.random.PRNGKey(7), (32, 32, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def input_ids(tiny_sd):
    return jnp.asarray(tiny_sd.tokenize(["a sks face"])[0])


@pytest.fixture(scope="module")
def finetune(tiny_sd, relaxed):
    """The compiled functions, and how often the step body was traced (one optimizer update each)."""
    assert relaxed["fresh"].adapters == relaxed["svd"].adapters  # one compiled program serves both
    adam = optax.adam(1e-3)
    traces = []

    def update(*args, **kwargs):
        traces.append(1)
        return adam.update(*args, **kwargs)

    optimizer = optax.GradientTransformation(adam.init, update)
    fns = relax.make_finetune(tiny_sd, relaxed["fresh"].adapters, optimizer, batch_size=BATCH, shift=SHIFT)
    return fns, optimizer, traces


@pytest.fixture(scope="module")
def stepped(relaxed, finetune, image, input_ids):
    """``STEPS`` single ``step`` calls on 'fresh': per step the trainable tree (host copy) and loss."""
    (fns, optimizer, _), r = finetune, relaxed["fresh"]
    state, trees, losses = relax.init_state(r, optimizer), [], []
    for _ in range(STEPS):
        state, metrics = fns.step(state, r.frozen, image, input_ids, RNG)
        trees.append(jax.device_get(state["trainable"]))
        losses.append(float(metrics["loss"]))
    return trees, np.asarray(losses)


@pytest.fixture(scope="module")
def ran(relaxed, finetune, image, input_ids):
    """``run`` of ``STEPS`` steps per variant: ``{variant: (trainable, losses)}``."""
    fns, optimizer, _ = finetune
    out = {}
    for variant, r in relaxed.items():
        state, losses = fns.run(relax.init_state(r, optimizer), r.frozen, image, input_ids, RNG, STEPS)
        out[variant] = jax.device_get(state["trainable"]), np.asarray(losses)
    return out


def test_svd_starts_at_the_prediction(tiny_params, lidb, relaxed, forward):
    adapters, _, _, merged = lidb
    r = relaxed["svd"]
    assert all(a.kind == A.LoRA(LORA_RANK, LORA_ALPHA) for a in r.adapters.values())
    for c, tree in r.trainable.items():
        assert tree.keys() == set(adapters[c].paths)
        for factors in tree.values():  # slots past the LiDB rank: random down, zero up
            assert np.all(np.asarray(factors["up"][LIDB.rank :]) == 0)
            assert np.all(np.abs(np.asarray(factors["down"][:, LIDB.rank :])) > 0)
    ref_text, ref_unet = forward((), merged, {})
    base_text, base_unet = forward((), tiny_params, {})
    text, unet = forward(tuple(r.adapters.items()), r.frozen_params, r.trainable)
    assert np.abs(ref_unet - base_unet).max() > 1e-2 and np.abs(ref_text - base_text).max() > 1e-2
    np.testing.assert_allclose(text, ref_text, atol=1e-5, rtol=0)
    np.testing.assert_allclose(unet, ref_unet, atol=1e-5, rtol=0)


def test_fresh_starts_at_the_prediction_and_trains(lidb, relaxed, forward, stepped, ran):
    merged = lidb[3]
    r = relaxed["fresh"]
    for component in ("unet", "text_encoder"):
        for got, want in zip(*(jax.tree_util.tree_leaves(p[component]) for p in (r.frozen_params, merged))):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert all(np.all(np.asarray(f["up"]) == 0) for t in r.trainable.values() for f in t.values())
    ref_text, ref_unet = forward((), merged, {})
    text, unet = forward(tuple(r.adapters.items()), r.frozen_params, r.trainable)
    np.testing.assert_allclose(text, ref_text, atol=1e-5, rtol=0)
    np.testing.assert_allclose(unet, ref_unet, atol=1e-5, rtol=0)

    # Step 0 trains both variants from the same model on the same batch and noise: equal losses.
    trees, losses = stepped
    np.testing.assert_allclose(losses[0], ran["svd"][1][0], rtol=1e-5)

    for c, tree in trees[0].items():
        for path, factors in tree.items():
            assert np.abs(factors["up"]).min() > 0, (c, path)
            # up was zero, so down had no gradient in the first step
            np.testing.assert_array_equal(factors["down"], r.trainable[c][path]["down"])


def test_scan_program_equals_single_steps(stepped, ran):
    trees, losses = stepped
    run_trees, run_losses = ran["fresh"]
    np.testing.assert_allclose(run_losses, losses, rtol=1e-6, atol=0)
    for got, want, first in zip(*(jax.tree_util.tree_leaves(t) for t in (run_trees, trees[-1], trees[0]))):
        # Two programs, fused differently: float32 reassociation in a gradient, which Adam divides
        # by its own root mean square, moves a factor by parts in a million (5.6e-6 seen at -O0).
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
        assert not np.array_equal(want, first)  # the later steps moved every factor


def test_each_program_is_traced_once(relaxed, finetune, stepped, ran, image, input_ids):
    fns, optimizer, traces = finetune
    r = relaxed["svd"]
    state = relax.init_state(r, optimizer)
    for _ in range(2):
        state, _ = fns.step(state, r.frozen, image, input_ids, RNG)
        state, _ = fns.run(state, r.frozen, image, input_ids, RNG, STEPS)
    assert int(state["step"]) == 2 * (1 + STEPS)
    assert len(traces) == 2  # one trace of ``step``, one of the scanned body in ``run``


@pytest.mark.parametrize("variant", relax.VARIANTS)
def test_fold_is_exact(variant, tiny_params, lidb, relaxed, ran, forward, tmp_path):
    adapters, basis, predicted, _ = lidb
    r, trained = relaxed[variant], ran[variant][0]
    folded, trees = relax.fold(r, trained)
    rank = LORA_RANK + (LIDB.rank if variant == "fresh" else 0)
    assert all(a.kind.rank == rank and a.targets == adapters[c].targets for c, a in folded.items())
    merged = dict(tiny_params)
    for c, adapter in folded.items():
        merged[c] = adapter.merge(tiny_params[c], trees[c])
    want = forward(tuple(r.adapters.items()), r.frozen_params, trained)
    got = forward((), merged, {})
    dense = forward((), _add(tiny_params, _lora_deltas(folded, trees)), {})
    for g, w, d in zip(got, want, dense):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
        np.testing.assert_allclose(d, w, atol=1e-5, rtol=0)
    written = export.export_lora(tmp_path / "lora.safetensors", folded, jax.device_get(trees))
    assert set(written.ranks.values()) == {rank} and written.max_rel_error == 0


def test_svd_of_a_zero_prediction_is_the_lora_init(tiny_params, lidb):
    adapters, basis, predicted, _ = lidb
    text = {"text_encoder": adapters["text_encoder"]}
    zero = {
        "text_encoder": {
            p: {"a_train": f["a_train"], "b_train": jnp.zeros_like(f["b_train"])}
            for p, f in predicted["text_encoder"].items()
        }
    }
    svd, fresh = (
        relax.relax(v, tiny_params, text, basis, zero, rank=LORA_RANK, key=jax.random.PRNGKey(8))
        for v in ("svd", "fresh")
    )
    for got, want in zip(*(jax.tree_util.tree_leaves(r.trainable) for r in (svd, fresh))):
        np.testing.assert_array_equal(got, want)  # no dead slot: every down column stays random


def test_bad_inputs_are_refused(tiny_params, lidb):
    adapters, basis, predicted, _ = lidb
    with pytest.raises(ValueError, match=r"rank 1 .*rank 2"):
        relax.relax("svd", tiny_params, adapters, basis, predicted, rank=1, key=jax.random.PRNGKey(0))
    batched = jax.tree_util.tree_map(lambda x: x[None], predicted)
    with pytest.raises(ValueError, match="no batch axis"):
        relax.relax("fresh", tiny_params, adapters, basis, batched, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="variant"):
        relax.relax("dense", tiny_params, adapters, basis, predicted, key=jax.random.PRNGKey(0))


def test_augment_flips_and_shifts_with_edge_padding(image):
    augment = jax.jit(relax.augment, static_argnums=2, static_argnames=("flip", "shift"))
    views = np.asarray(augment(image, jax.random.PRNGKey(1), 16, flip=True, shift=SHIFT))
    source = np.asarray(image)
    pad = ((SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0))
    padded = [np.pad(im, pad, mode="edge") for im in (source, source[:, ::-1])]
    size, offsets = source.shape[0], range(-SHIFT, SHIFT + 1)
    candidates = {
        (f, dy, dx): p[SHIFT - dy : SHIFT - dy + size, SHIFT - dx : SHIFT - dx + size]
        for f, p in enumerate(padded)
        for dy in offsets
        for dx in offsets
    }
    seen = set()
    for view in views:
        matches = [k for k, c in candidates.items() if np.array_equal(view, c)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len({k[0] for k in seen}) == 2 and len(seen) > 4  # both flips and several offsets drawn
