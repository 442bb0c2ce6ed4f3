"""The evaluation suite's metrics on hand-made cases whose answers are known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax.blocks import diffusion
from hdb_jax.eval import prdc, report, stats
from hdb_jax.toy import evaluator as toy
from hdb_jax.toy import synthetic


@pytest.fixture(scope="module")
def evaluator():
    return toy.ToyEvaluator.load()


def _renders(ids, index=0, style="photo", **kw):
    return np.stack(
        [
            synthetic.render_face(synthetic.identity(i), synthetic.variation(i, index, style=style, **kw), 32)
            for i in ids
        ]
    )


def test_bootstrap_interval_matches_a_known_distribution():
    rng = np.random.default_rng(0)
    draws = rng.normal(3.0, 2.0, 400)
    out = stats.bootstrap(draws, replicates=2000)
    half = 1.96 * draws.std() / np.sqrt(len(draws))  # the normal-theory 95% half width
    assert out["mean"] == pytest.approx(draws.mean()) and out["n"] == 400
    assert out["ci95"][0] < draws.mean() < out["ci95"][1]
    assert (out["ci95"][1] - out["ci95"][0]) == pytest.approx(2 * half, rel=0.15)
    # Coverage: over 100 fresh samples the interval holds the true mean about 95% of the time.
    covered = 0
    for s in range(100):
        x = rng.normal(3.0, 2.0, 100)
        lo, hi = stats.bootstrap(x, replicates=400, seed=s)["ci95"]
        covered += lo < 3.0 < hi
    assert 88 <= covered <= 99
    # Multi-way: a grid [identities, prompts, seeds]; NaN cells are left out; more sources, wider.
    grid = rng.normal(0, 1, (8, 4, 2)) + rng.normal(0, 1, (8, 1, 1))
    grid[0, 0, 0] = np.nan
    ways = stats.bootstrap(grid)
    assert ways["n"] == 63 and np.isclose(ways["mean"], np.nanmean(grid))
    only_seeds = stats.bootstrap(grid, axes=(2,))
    assert (ways["ci95"][1] - ways["ci95"][0]) > (only_seeds["ci95"][1] - only_seeds["ci95"][0])


def test_precision_recall_on_known_distributions():
    rng = np.random.default_rng(1)
    real = rng.normal(0, 1, (400, 4))
    same = prdc.precision_recall(real, rng.normal(0, 1, (400, 4)), k=3)
    assert same["precision"] > 0.85 and same["recall"] > 0.85
    far = prdc.precision_recall(real, rng.normal(8, 1, (400, 4)), k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # Mode collapse: samples around one real point are realistic but cover none of the variety.
    collapsed = prdc.precision_recall(real, real[:1] + rng.normal(0, 0.02, (40, 4)), k=3)
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.02
    # Hand-made: radii of 1-D points 0, 1, 3 with k=1 are 1, 1, 2.
    np.testing.assert_allclose(prdc.knn_radii(np.array([[0.0], [1.0], [3.0]]), 1), [1.0, 1.0, 2.0])
    # Given radii: points 0, 1, 3 with radii 1, 1, 2 cover 2.5 (|2.5-3| <= 2) but not 6 or -1.5.
    line = np.array([[0.0], [1.0], [3.0]])
    given = prdc.precision_recall(
        line, np.array([[2.5], [6.0], [-1.5]]), k=1, real_radii=np.array([1.0, 1.0, 2.0])
    )
    assert given["precision"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="real_radii has shape"):
        prdc.precision_recall(line, line, k=1, real_radii=np.ones(2))


def test_identity_subject_and_prompt_fidelity_hand_made_cases(evaluator):
    refs = _renders(range(5_100_000, 5_100_004))
    np.testing.assert_allclose(evaluator.identity_scores(refs, refs), 1.0, atol=1e-5)
    assert np.all(evaluator.subject_fidelity(refs, refs) == 1.0)  # identical images agree on every attribute
    # Swapped attributes: another identity that differs in hair colour and skin agrees on fewer.
    ref = synthetic.identity(5_100_000)
    other = next(
        i
        for i in range(5_200_000, 5_300_000)
        if synthetic.identity(i).hair_color != ref.hair_color
        and synthetic.identity(i).hat == ref.hat
        and abs(np.mean(synthetic.identity(i).skin) - np.mean(ref.skin)) > 0.25
    )
    swapped = evaluator.subject_fidelity(_renders([other]), refs[0])
    assert swapped[0] <= 1 - 2 / len(evaluator.subject_labels) + 1e-9
    # Prompt fidelity: a red-background cartoon render shows what "a cartoon ... on a red background" asks.
    cartoon_red = _renders([5_100_010], style="cartoon", background="red")
    assert evaluator.prompt_fidelity(cartoon_red, ["a cartoon of a sks face on a red background"])[0] == 1.0
    assert evaluator.prompt_fidelity(cartoon_red, ["a sketch of a sks face on a blue background"])[0] == 0.0
    assert np.isnan(evaluator.prompt_fidelity(cartoon_red, ["a sks face"])[0])  # nothing asked: not scored
    assert toy.asked("a sks face wearing a hat with glasses") == {"hat": 1, "glasses": 1}


def test_flat_colours_are_not_faces_and_renders_are(evaluator):
    flat = np.broadcast_to(np.random.default_rng(2).integers(0, 256, (16, 1, 1, 3)), (16, 32, 32, 3)).astype(
        np.uint8
    )
    assert not evaluator.face(flat).any()
    renders = toy.real_renders(32, start=6_900_000)
    assert evaluator.face(renders).all()
    realism = evaluator.realism(renders, toy.real_renders(128, start=6_800_000))
    assert realism["precision"] > 0.8 and realism["non_face_fraction"] == 0.0
    assert (
        evaluator.realism(flat, toy.real_renders(128, start=6_800_000))["precision"] <= 0.25
    )  # measured 0.125
    # The real manifold computed once (as the main job does) scores exactly as the renders do.
    real = toy.real_renders(128, start=6_800_000)
    manifold = evaluator.real_manifold(real)
    for samples in (renders, flat):
        once, each = evaluator.realism(samples, manifold), evaluator.realism(samples, real)
        assert once["precision"] == each["precision"] and once["recall"] == each["recall"]
        np.testing.assert_array_equal(once["in_real_manifold"], each["in_real_manifold"])


def test_heldout_loss_refuses_uint8_and_the_toy_recipe_normalises(tiny_sd, tiny_params):
    from conftest import load_config

    from hdb_jax.jobs import toy_base as base

    config = load_config("base_toy", "reduced")
    pixels, ids = base.heldout_set(config, tiny_sd)
    assert pixels.dtype == np.float32 and -1.0 <= pixels.min() < 0 < pixels.max() <= 1.0
    sched = tiny_sd.noise_scheduler.create_state()
    with pytest.raises(TypeError, match="float in \\[-1, 1\\]"):
        diffusion.fixed_draw_loss(
            tiny_sd,
            sched,
            tiny_params,
            jnp.asarray((pixels + 1) * 127.5).astype(jnp.uint8),
            jnp.asarray(ids),
            jax.random.PRNGKey(0),
            draws=2,
        )
    loss = diffusion.make_heldout_loss(tiny_sd, 2)(
        tiny_params, jnp.asarray(pixels), jnp.asarray(ids), jax.random.PRNGKey(0)
    )
    assert 0.2 < float(loss) < 5.0  # the scale of a denoising loss, not of 0-255 pixels


def test_report_rows_have_the_layout_other_tools_read():
    rng = np.random.default_rng(3)
    per_id = {
        i: {
            "identity": rng.uniform(0, 1, (4, 2)),
            "subject_fidelity": rng.uniform(0, 1, (4, 2)),
            "prompt_fidelity": np.where(np.arange(4)[:, None] == 0, np.nan, 1.0) * np.ones((4, 2)),
            "prior_realism": rng.integers(0, 2, 4).astype(float),
            "steps": 40,
            "seconds": 2.0,
            "bytes": 100,
        }
        for i in range(3)
    }
    row = report.summarise("hypernet", per_id, replicates=100)
    assert set(row) == {"row", *report.METRICS, "steps", "seconds_per_identity", "bytes", "identities"}
    assert (
        row["prompt_fidelity"]["mean"] == 1.0 and row["prompt_fidelity"]["n"] == 18
    )  # prompt 0 asks nothing
    assert row["identities"] == 3 and len(row["identity"]["ci95"]) == 2
    table = report.markdown([row])
    assert table.splitlines()[2].startswith("| hypernet | ")


def test_fraction_of_a_reference_row_on_shared_identities():
    scores = {
        "fast": {
            1: {"identity": np.array([[0.2, 0.4]]), "steps": 40},
            2: {"identity": np.array([[0.6, 0.6]]), "steps": 40},
            3: {"identity": np.array([[0.9, 0.9]]), "steps": 40},  # not run by the reference
        },
        "slow": {
            1: {"identity": np.array([[0.5, 0.5]]), "steps": 300},
            2: {"identity": np.array([[0.5, 0.5]]), "steps": 300},
        },
    }
    got = report.fraction_of(scores, "fast", "slow")
    assert got["identities"] == [1, 2]
    assert got["fast"] == pytest.approx(0.45) and got["slow"] == pytest.approx(0.5)
    assert got["fraction"] == pytest.approx(0.9) and got["fewer_steps"] == pytest.approx(7.5)
    assert report.fraction_of(scores, "fast", "missing") == {"available": False}


def test_protocol_orders_samples_and_scores_them_by_prompt_and_seed(evaluator):
    import ml_collections

    from hdb_jax.toy import protocol

    e = ml_collections.ConfigDict(
        dict(prompts=["a sks face", "a cartoon of a sks face"], seeds=2, sample_steps=3, guidance_scale=2.0)
    )
    e.identities, e.prior_seeds = (1, 2), 4  # other fields of an eval section are ignored
    p = protocol.Protocol.from_config(e)
    assert p.subject_prompts == ["a sks face"] * 2 + ["a cartoon of a sks face"] * 2
    assert (p.token, p.prior_prompt, p.prior_seeds) == ("sks", "a face", 4)
    # Hand-made samples: the reference itself twice, then two cartoons of another identity; the prior
    # samples are renders of further identities (all faces, inside the real manifold).
    reference = _renders([5_200_000])[0]
    drawn = np.concatenate(
        [
            np.stack([reference, reference]),
            _renders([5_200_001, 5_200_001], style="cartoon"),
            _renders([6_900_000, 6_900_001, 6_900_002, 6_900_003]),
        ]
    )
    scores = p.score(
        evaluator, drawn, reference, evaluator.real_manifold(toy.real_renders(128, start=6_800_000))
    )
    assert scores["identity"].shape == scores["prompt_fidelity"].shape == (2, 2)
    np.testing.assert_allclose(scores["identity"][0], 1.0, atol=1e-5)  # the reference against itself
    assert (scores["identity"][1] < 0.9).all()  # another identity
    assert np.isnan(scores["prompt_fidelity"][0]).all() and (scores["prompt_fidelity"][1] == 1.0).all()
    assert scores["prior_realism"].shape == scores["face"].shape == (4,) and scores["face"].all()
    with pytest.raises(ValueError, match="drawn has 7 samples; the protocol draws 8"):
        p.score(evaluator, drawn[:7], reference)
