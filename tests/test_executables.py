"""Stored executables: a warm store traces nothing, a changed key or source compiles again."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax.common import executables


def _program(scale):
    """(calls, lower): ``lower()`` traces and lowers ``tanh(x @ w) * scale``; ``calls`` counts it."""
    calls = []

    def lower():
        calls.append(1)
        args = (jax.ShapeDtypeStruct((3, 4), jnp.float32), jax.ShapeDtypeStruct((4, 2), jnp.float32))
        return jax.jit(lambda x, w: jnp.tanh(x @ w) * scale).lower(*args)

    return calls, lower


def _inputs():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)


def test_second_store_loads_without_tracing_and_computes_the_same(tmp_path):
    x, w = _inputs()
    traces, lower = _program(2.0)
    first = executables.ExecutableStore(tmp_path)
    a = first.get("f", {"scale": 2.0}, lower)
    assert (first.hits, first.misses, len(traces)) == (0, 1, 1)
    assert len(list(tmp_path.glob("f-*" + executables.SUFFIX))) == 1

    second = executables.ExecutableStore(tmp_path)  # another process, as far as the store knows
    b = second.get("f", {"scale": 2.0}, lower)
    assert (second.hits, second.misses, len(traces)) == (1, 0, 1)  # loaded: nothing traced
    np.testing.assert_array_equal(np.asarray(a(x, w)), np.asarray(b(x, w)))
    np.testing.assert_allclose(np.asarray(b(x, w)), np.tanh(x @ w) * 2.0, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError):  # the loaded program checks its arguments as the compiled one does
        b(x[:2], w)

    # Another key is another program: the stale one is never returned.
    traces3, lower3 = _program(3.0)
    c = second.get("f", {"scale": 3.0}, lower3)
    assert (second.misses, len(traces3)) == (1, 1)
    np.testing.assert_allclose(np.asarray(c(x, w)), np.tanh(x @ w) * 3.0, rtol=1e-5, atol=1e-6)


def test_unreadable_entry_is_compiled_again(tmp_path):
    x, w = _inputs()
    traces, lower = _program(2.0)
    store = executables.ExecutableStore(tmp_path)
    store.get("f", {"k": 1}, lower)
    store.path("f", {"k": 1}).write_bytes(b"not an executable")
    with pytest.warns(UserWarning, match="unreadable"):
        again = store.get("f", {"k": 1}, lower)
    assert (store.misses, len(traces)) == (2, 2)
    np.testing.assert_allclose(np.asarray(again(x, w)), np.tanh(x @ w) * 2.0, rtol=1e-5, atol=1e-6)


def test_key_covers_source_shapes_and_environment(tmp_path, monkeypatch):
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "a.py").write_text("x = 1\n")
    before = executables.source_digest(root)
    (root / "a.py").write_text("x = 2\n")
    assert executables.source_digest(root) != before  # an edit of the library changes every key
    tree = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32)}
    assert executables.abstract(tree) != executables.abstract(
        {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)}
    )
    assert executables.abstract(tree) != executables.abstract(
        {"w": jax.ShapeDtypeStruct((4, 2), jnp.bfloat16)}
    )
    store = executables.ExecutableStore(tmp_path / "store")
    digest = store.digest("f", {"k": 1})
    assert store.digest("f", {"k": 2}) != digest and store.digest("g", {"k": 1}) != digest
    with monkeypatch.context() as m:
        m.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")  # another compiler setting
        assert store.digest("f", {"k": 1}) != digest
    with monkeypatch.context() as m:
        m.setattr(executables, "_version", lambda name: "0.0.0")  # another diffusers, flax, ...
        assert store.digest("f", {"k": 1}) != digest
    assert store.digest("f", {"k": 1}) == digest  # and nothing else moved it


def test_only_the_most_recently_used_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(executables, "KEEP", 2)
    store = executables.ExecutableStore(tmp_path)
    for scale in (1.0, 2.0):
        store.get("f", {"scale": scale}, _program(scale)[1])
    store.get("f", {"scale": 1.0}, _program(1.0)[1])  # used again: now the most recent
    store.get("f", {"scale": 3.0}, _program(3.0)[1])
    kept = {p.name for p in tmp_path.glob("f-*" + executables.SUFFIX)}
    assert kept == {store.path("f", {"scale": s}).name for s in (1.0, 3.0)}
    assert (store.hits, store.misses) == (1, 3)
