"""Adapters against dense references on the tiny UNet and text encoder."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import adapters as A
from hdb_jax.adapters import basis as B

# (kind, component, pattern names) for every adapter kind, at tiny-model widths.
CASES = {
    "lora": (A.LoRA(rank=3, alpha=6.0), "unet", ["unet_attention"]),
    "lidb": (A.LiDB(a=16, b=8, rank=1), "unet", ["unet_attention"]),
    "lidb_text": (A.LiDB(a=16, b=8, rank=2), "text_encoder", ["text_attention", "text_mlp"]),
    "kron": (A.Kron(a1=4, a2=8), "unet", ["unet_attention"]),
    "residual": (A.Residual(ratio=0.25), "unet", ["unet_proj_out"]),
}


def _random_like(tree, seed):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten([0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _make(case, params):
    kind, component, names = CASES[case]
    adapter = A.Adapter.create(kind, params[component], [A.PATTERNS[n] for n in names], component)
    return adapter, adapter.init(jax.random.PRNGKey(2)), adapter.basis(jax.random.PRNGKey(3))


def _runner(sd, params, unet_inputs, component):
    """A function (component params) -> output, for the UNet or the text encoder."""
    latents, timesteps, context = unet_inputs
    if component == "unet":
        return lambda p: sd.predict(p, latents, timesteps, context)
    ids = sd.tokenize(["a photo of sks face", "a sketch of a face with glasses"])
    return lambda p: sd.encode_text(p, ids)


@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_space_equals_merged(case, tiny_sd, tiny_params, unet_inputs):
    adapter, init, frozen = _make(case, tiny_params)
    component = adapter.component
    run = _runner(tiny_sd, tiny_params, unet_inputs, component)
    base = tiny_params[component]
    trained = _random_like(init, seed=7)

    @jax.jit
    def activation(tr):
        with adapter.attach(tr, frozen):
            return run(base)

    out_act = activation(trained)
    out_merged = jax.jit(run)(adapter.merge(base, trained, frozen))
    out_base = jax.jit(run)(base)
    np.testing.assert_allclose(out_act, out_merged, atol=1e-5, rtol=0)
    assert float(jnp.abs(out_act - out_base).max()) > 1e-3  # the adapter did change the output

    # Zero-initialised adapters leave the output bit-identical, both ways. (Op by op: inside one
    # jitted program XLA may fuse the extra zero add differently and reorder float sums.)
    with adapter.attach(init, frozen):
        out_init = run(base)
    np.testing.assert_array_equal(out_init, run(base))
    merged_init = adapter.merge(base, init, frozen)
    for leaf_a, leaf_b in zip(jax.tree_util.tree_leaves(merged_init), jax.tree_util.tree_leaves(base)):
        np.testing.assert_array_equal(leaf_a, leaf_b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_sample_weights_equal_separate_runs(case, tiny_sd, tiny_params, unet_inputs):
    adapter, init, frozen = _make(case, tiny_params)
    run = _runner(tiny_sd, tiny_params, unet_inputs, adapter.component)
    base = tiny_params[adapter.component]
    first, second = _random_like(init, seed=11), _random_like(init, seed=12)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), first, second)

    @jax.jit
    def batched(tr):
        with adapter.attach(tr, frozen, per_sample=True):
            return run(base)

    @jax.jit
    def single(tr):
        with adapter.attach(tr, frozen):
            return run(base)

    both = batched(stacked)
    np.testing.assert_allclose(both[0], single(first)[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(both[1], single(second)[1], atol=1e-5, rtol=0)
    assert float(jnp.abs(single(first)[1] - both[1]).max()) > 1e-4  # weights really differ per sample


def test_kron_delta_is_numpy_kron_in_flax_orientation():
    target = A.Target("layer", in_dim=24, out_dim=12)
    kind = A.Kron(a1=3, a2=4)
    rng = np.random.default_rng(0)
    p = {
        "a": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal((4, 6)).astype(np.float32),
    }
    delta = np.asarray(kind.delta(p, {}, target))
    # Paper orientation: ΔW_torch [out, in] = A ⊗ B; the Flax kernel [in, out] is its transpose.
    np.testing.assert_allclose(delta, np.kron(p["a"], p["b"]).T, atol=1e-6)
    assert delta.shape == (24, 12)
    x = rng.standard_normal((5, 24)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(kind.apply(p, {}, x)), x @ delta, atol=1e-5)
    with pytest.raises(ValueError, match="does not divide layer 'layer'"):
        A.Kron(a1=5, a2=4).num_params(target)


def test_lidb_bases_orthonormal_and_round_trip(tmp_path, tiny_params):
    adapter = A.Adapter.create(A.LiDB(a=16, b=8), tiny_params["unet"], [A.PATTERNS["unet_attention"]], "unet")
    bases = adapter.basis(jax.random.PRNGKey(0))
    for target in adapter.targets:
        a_aux, b_aux = (np.asarray(bases[target.path][k], np.float64) for k in ("a_aux", "b_aux"))
        assert a_aux.shape == (target.in_dim, 16) and b_aux.shape == (8, target.out_dim)
        np.testing.assert_allclose(a_aux.T @ a_aux, np.eye(16), atol=1e-5)  # orthonormal columns
        np.testing.assert_allclose(b_aux @ b_aux.T, np.eye(8), atol=1e-5)  # orthonormal rows
    # Wider than tall: orthonormal rows instead.
    wide = np.asarray(A.semi_orthogonal(jax.random.PRNGKey(1), 4, 10), np.float64)
    np.testing.assert_allclose(wide @ wide.T, np.eye(4), atol=1e-5)

    path = tmp_path / "basis.safetensors"
    digest = B.save_basis(path, bases, a=16, b=8, component="unet")
    loaded, meta = B.load_basis(path)
    assert meta["hash"] == digest == B.basis_hash(bases) and meta["a"] == "16"
    assert set(loaded) == set(bases)
    for key in bases:
        for factor in ("a_aux", "b_aux"):
            original, back = np.asarray(bases[key][factor]), loaded[key][factor]
            assert back.dtype == original.dtype and back.tobytes() == original.tobytes()
    # Regenerating from the same key is deterministic here, and another key gives another hash.
    assert B.basis_hash(adapter.basis(jax.random.PRNGKey(0))) == digest
    assert B.basis_hash(adapter.basis(jax.random.PRNGKey(1))) != digest


def test_tampered_basis_file_is_refused(tmp_path):
    target = A.Target("x.to_q", 32, 32)
    bases = {target.path: A.LiDB(a=4, b=4).basis(jax.random.PRNGKey(0), target)}
    path = tmp_path / "basis.safetensors"
    B.save_basis(path, bases)
    raw = bytearray(path.read_bytes())
    raw[-8:] = b"\x00" * 8  # overwrite the tail of the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(B.BasisError, match="hash to .* but the file records"):
        B.load_basis(path)
    with pytest.raises(B.BasisError, match="not found"):
        B.load_basis(tmp_path / "missing.safetensors")


def test_bad_targets_name_the_pattern(tiny_sd, tiny_params, unet_inputs):
    with pytest.raises(
        A.TargetError, match=re.escape(r"unet: target pattern '.*\.attn3\.to_q' matches no layer")
    ):
        A.Adapter.create(A.LoRA(), tiny_params["unet"], [r".*\.attn3\.to_q"], "unet")
    with pytest.raises(A.TargetError, match="not a Dense or 1x1 convolution"):
        A.Adapter.create(A.LoRA(), tiny_params["unet"], [r"conv_in"], "unet")
    with pytest.raises(ValueError, match="unknown adapter kind 'dora'"):
        A.kind_from_config("dora")
    # An adapter built for the text encoder but attached around the UNet trains nothing: refused.
    adapter, init, frozen = _make("lidb_text", tiny_params)
    latents, timesteps, context = unet_inputs
    with pytest.raises(RuntimeError, match="no adapter target was called"):
        with adapter.attach(init, frozen):
            tiny_sd.predict(tiny_params["unet"], latents, timesteps, context)


@pytest.mark.parametrize("kind", [A.LiDB(a=16, b=8), A.LoRA(rank=2)], ids=lambda k: k.name)
def test_abstract_basis_has_the_drawn_basis_shapes(kind, tiny_params):
    adapter = A.Adapter.create(kind, tiny_params["unet"], [r".*attn1\.to_q"], "unet")
    drawn, abstract = adapter.basis(jax.random.PRNGKey(0)), adapter.abstract_basis()
    assert jax.tree_util.tree_structure(drawn) == jax.tree_util.tree_structure(abstract)
    pairs = zip(jax.tree_util.tree_leaves(drawn), jax.tree_util.tree_leaves(abstract))
    assert all((x.shape, x.dtype) == (y.shape, y.dtype) for x, y in pairs)
    assert len(jax.tree_util.tree_leaves(abstract)) == (
        2 * len(adapter.targets) if kind.name == "lidb" else 0
    )
    assert adapter.targets
