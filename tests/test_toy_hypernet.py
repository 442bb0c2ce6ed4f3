"""The shipped hypernetwork bundle: its card's held-out figures are reproduced by the training code."""

import jax
import pytest
from conftest import load_config

from hdb_jax.hypernet import bundle
from hdb_jax.sd import loading
from hdb_jax.sd.fingerprint import params_fingerprint
from hdb_jax.stages import hypernet as ht
from hdb_jax.toy import base_model_dir, hypernet_dir

pytestmark = pytest.mark.skipif(
    not (hypernet_dir() / "hypernet.safetensors").is_file(), reason="no shipped hypernetwork bundle"
)


@pytest.fixture(scope="module")
def shipped():
    sd, params = loading.load_pretrained(base_model_dir())
    b = bundle.load(hypernet_dir(), params, base_fingerprint=params_fingerprint(params))
    return sd, params, b


def test_card_and_record_agree(shipped):
    *_, b = shipped
    extra = b.meta["extra"]
    card = (hypernet_dir() / "MODEL_CARD.md").read_text()
    held = extra["heldout"]
    assert f"{held['predicted']:.4g}" in card and f"{held['zero']:.4g}" in card
    assert f"{extra['r2_train']:.3g}" in card and f"{held['r2']:.3g}" in card
    assert f"{extra['steps']} steps" in card and f"{extra['identities']} identities" in card


def test_heldout_losses_are_reproduced_by_the_training_code(shipped):
    sd, params, b = shipped
    held = b.meta["extra"]["heldout"]
    config = load_config("hypernet", "toy")
    assert held["identities"] == len(config.data.heldout) and held["views"] == config.data.heldout_views
    config.data.heldout_preopt_dir = ""  # the held-out targets are not shipped; R² is in the card only
    out = ht.evaluate_heldout(
        config, sd, b.net, b.adapters, params, jax.device_get(b.basis), jax.device_get(b.params)
    )
    # Same renders, same draws, same weights: the recorded figures to float32 summation error.
    assert out["predicted"] == pytest.approx(held["predicted"], rel=1e-4)
    assert out["zero"] == pytest.approx(held["zero"], rel=1e-4)


def test_recorded_heldout_r2_is_reproduced_on_the_shipped_subset(shipped):
    import json

    from hdb_jax.common import tensorfile
    from hdb_jax.data import identities as identities_lib
    from hdb_jax.hypernet import data as hdata

    sd, params, b = shipped
    check = b.meta["extra"]["heldout_check"]
    tensors, meta = tensorfile.read(hypernet_dir() / check["file"])
    ids = json.loads(meta["identities"])
    assert len(ids) == check["identities"] == tensors["tokens"].shape[0]
    config = load_config("hypernet", "toy")
    assert set(ids) <= set(config.data.heldout)  # never trained on
    source = identities_lib.from_config(config.data, sd.default_resolution, ids)
    predicted = hdata.predict_tokens(b.net, jax.device_get(b.params), hdata.reference_views(source, ids))
    r2 = ht.r_squared(predicted, tensors["tokens"], b.net.kind)
    assert r2 == pytest.approx(check["r2"], abs=1e-4)
