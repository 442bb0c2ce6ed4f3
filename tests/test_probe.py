"""The target-quality probe's measures on hand-made runs whose answers are known."""

import numpy as np
import pytest

from hdb_jax.jobs import probe


def test_consistency_of_hand_made_runs():
    runs = np.array(
        [
            [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]],  # seed 0: identities 0 and 1
            [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]],  # seed 1
        ]
    )
    got = probe.consistency(runs)
    np.testing.assert_allclose(got["within_per_identity"], [1 / np.sqrt(2), 1.0], rtol=1e-12)
    np.testing.assert_allclose(got["within"], (1 / np.sqrt(2) + 1) / 2, rtol=1e-12)
    assert got["between"] == 0.0  # orthogonal identities in both seeds
    # Centred on each seed's mean: seed 0 -> ±(0.5, 0, -0.5, 0), seed 1 -> ±(0.5, 0.5, -1, 0).
    c = (0.25 + 0.5) / (np.sqrt(0.5) * np.sqrt(1.5))
    np.testing.assert_allclose(got["within_centred"], c, rtol=1e-12)


def test_consistency_of_pure_noise_and_of_a_function_of_the_identity():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(6, 4000))  # one vector per identity
    same = np.stack([signal, signal])
    assert probe.consistency(same)["within"] == pytest.approx(1.0)
    noise = rng.normal(size=(2, 6, 4000))
    got = probe.consistency(noise)
    # Independent Gaussian vectors of dimension d have cosine ~ N(0, 1/d): |mean| << 5/sqrt(d).
    assert abs(got["within"]) < 5 / np.sqrt(4000) and abs(got["between"]) < 5 / np.sqrt(4000)
    with pytest.raises(ValueError, match="2 noise seeds"):
        probe.consistency(noise[:1])
