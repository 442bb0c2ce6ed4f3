"""The hypernetwork's batches: dataset rows with their targets, fresh identities without."""

import numpy as np
import pytest

from hdb_jax.data import identities as identities_lib
from hdb_jax.hypernet import data as hdata


def _data(fresh, tokens=True):
    ids = [10, 11, 12, 13, 14]
    source = identities_lib.SyntheticIdentities(tuple(ids), 2, 32)
    targets = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 3, 4), np.float32) + 1
    return hdata.Data(
        source,
        ids,
        targets if tokens else None,
        np.zeros(8, np.int32),
        batch_size=4,
        seed=0,
        token_shape=(3, 4),
        fresh=fresh,
        fresh_source=identities_lib.SyntheticIdentities((), 2, 32) if fresh else None,
    )


def test_fresh_rows_are_new_identities_without_a_target():
    data = _data(fresh=2)
    batches = [data.load(step, np.arange(4)) for step in range(3)]
    for step, b in enumerate(batches):
        np.testing.assert_array_equal(b["has_target"], [1, 1, 0, 0])
        assert not np.any(b["target_tokens"][2:])
        rows = data.rows(step)
        assert rows.shape == (2,)  # two dataset rows per batch, the epoch permutation over 5
        np.testing.assert_array_equal(b["target_tokens"][:2, 0, 0], rows + 1)
    # Dataset rows walk an epoch permutation: steps 0-1 draw 4 distinct identities of the 5.
    seen = np.concatenate([data.rows(s) for s in range(2)])
    assert len(set(seen.tolist())) == 4
    # Fresh identities never repeat across steps (and are none of the dataset's).
    fresh_images = [b["images"][k] for b in batches for k in (2, 3)]
    for i in range(len(fresh_images)):
        for j in range(i + 1, len(fresh_images)):
            assert np.abs(fresh_images[i] - fresh_images[j]).max() > 0.1
    # A process that holds only some positions gets exactly those rows.
    part = data.load(1, np.array([1, 3]))
    np.testing.assert_array_equal(part["images"], batches[1]["images"][[1, 3]])
    np.testing.assert_array_equal(part["has_target"], [1, 0])


def test_fresh_rows_need_a_source_and_fit_the_batch():
    with pytest.raises(ValueError, match="fresh_per_batch=5"):
        _data(fresh=5)
    data = _data(fresh=0)
    np.testing.assert_array_equal(data.load(0, np.arange(4))["has_target"], [1, 1, 1, 1])
