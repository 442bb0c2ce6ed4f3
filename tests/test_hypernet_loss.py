"""The hypernetwork's weight-space loss: factorisation-invariant, and the dense distance."""

import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax import adapters as A
from hdb_jax.hypernet import decoder as dec
from hdb_jax.stages import hypernet as ht


def _tokens(key, kind, n=5, batch=3):
    return jax.random.normal(key, (batch, n, dec.token_width(kind)))


def _scale_factors(tokens, kind, c):
    """(A, B) -> (c·A, B/c) on every token."""
    a = kind.a * kind.rank
    return jnp.concatenate([c * tokens[..., :a], tokens[..., a:] / c], axis=-1)


def test_invariant_to_sign_and_scale_of_the_factors():
    kind = A.LiDB(a=6, b=4, rank=2)
    pred, target = _tokens(jax.random.PRNGKey(0), kind), _tokens(jax.random.PRNGKey(1), kind)
    base = ht.weight_distance(pred, target, kind)
    assert base.shape == (3,) and float(base.min()) > 0
    for c in (-1.0, 3.0, -0.25):
        np.testing.assert_allclose(
            ht.weight_distance(_scale_factors(pred, kind, c), target, kind), base, rtol=1e-5
        )
        np.testing.assert_allclose(
            ht.weight_distance(pred, _scale_factors(target, kind, c), kind), base, rtol=1e-5
        )
    np.testing.assert_allclose(
        ht.weight_distance(target, _scale_factors(target, kind, -2.0), kind), 0.0, atol=1e-5
    )
    # A loss on the raw factors is not invariant (why the old one learned the mean of coin flips).
    raw = jnp.sum(jnp.square(pred - target), axis=(1, 2))
    assert float(jnp.abs(jnp.sum(jnp.square(-pred - target), axis=(1, 2)) - raw).max()) > 1.0


def test_equals_the_dense_update_distance_with_orthonormal_bases(tiny_params):
    kind = A.LiDB(a=16, b=8, rank=1)
    adapters = {"unet": A.Adapter.create(kind, tiny_params["unet"], [A.PATTERNS["unet_attention"]], "unet")}
    basis = {"unet": adapters["unet"].basis(jax.random.PRNGKey(2))}
    n = len(dec.token_layout(adapters))
    pred, target = _tokens(jax.random.PRNGKey(3), kind, n, 2), _tokens(jax.random.PRNGKey(4), kind, n, 2)
    got = np.asarray(ht.weight_distance(pred, target, kind))
    for b in range(2):
        trees = [dec.tokens_to_tree(t[b], adapters, kind)["unet"] for t in (pred, target)]
        dense = sum(
            float(
                jnp.sum(
                    jnp.square(
                        adapters["unet"].delta(t, trees[0], basis["unet"])
                        - adapters["unet"].delta(t, trees[1], basis["unet"])
                    )
                )
            )
            for t in adapters["unet"].targets
        )
        np.testing.assert_allclose(got[b], dense, rtol=1e-4)


def test_r_squared_of_known_predictions():
    kind = A.LiDB(a=3, b=2, rank=1)
    target = _tokens(jax.random.PRNGKey(5), kind, 4, 50)
    assert ht.r_squared(np.asarray(target), np.asarray(target), kind) == 1.0
    mean = np.broadcast_to(
        np.asarray(target).mean(0), target.shape
    )  # not the mean product, so R^2 < 0 is possible
    products = ht.weight_products(target, kind)
    mean_pred_r2 = 1 - np.sum((products.mean(0) - products) ** 2) / np.sum((products - products.mean(0)) ** 2)
    assert abs(mean_pred_r2) < 1e-12
    assert ht.r_squared(mean, np.asarray(target), kind) < 0.5


def test_r_squared_equals_the_dense_definition():
    """The factor-space (Gram) computation against the definition on dense float64 products."""
    kind = A.LiDB(a=7, b=5, rank=2)
    rng = np.random.default_rng(0)
    target = rng.normal(size=(9, 3, (kind.a + kind.b) * kind.rank))
    predicted = target + 0.5 * rng.normal(size=target.shape)

    def dense(tokens):
        a = tokens[..., : kind.a * kind.rank].reshape(tokens.shape[:-1] + (kind.a, kind.rank))
        b = tokens[..., kind.a * kind.rank :].reshape(tokens.shape[:-1] + (kind.rank, kind.b))
        return a @ b  # [N, n, a, b]

    p, t = dense(predicted), dense(target)
    expected = 1 - np.sum((p - t) ** 2) / np.sum((t - t.mean(0)) ** 2)
    assert 0.0 < expected < 1.0
    np.testing.assert_allclose(ht.r_squared(predicted, target, kind), expected, rtol=1e-12)


def test_factor_distance_and_the_saddle_of_the_dw_distance_at_zero():
    """The dW distance has zero gradient at a zero prediction (exact saddle); the factor one does not."""
    kind = A.LiDB(a=6, b=4, rank=1)
    target = _tokens(jax.random.PRNGKey(5), kind, n=3, batch=2)
    pred = _tokens(jax.random.PRNGKey(6), kind, n=3, batch=2)
    np.testing.assert_allclose(
        ht.factor_distance(pred, target), jnp.sum(jnp.square(pred - target), axis=(1, 2)), rtol=1e-6
    )
    zero = jnp.zeros_like(target)
    g_dw = jax.grad(lambda p: jnp.sum(ht.weight_distance(p, target, kind)))(zero)
    g_factor = jax.grad(lambda p: jnp.sum(ht.factor_distance(p, target)))(zero)
    assert float(jnp.abs(g_dw).max()) == 0.0
    np.testing.assert_allclose(g_factor, -2 * target, rtol=1e-6)
