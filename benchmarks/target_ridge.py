"""How well can a linear map of the frozen image encoder's features predict stage-1 targets?

The ceiling a hypernetwork with the same frozen encoder faces on a weights dataset: ridge
regression (dual form, standardised features, several penalties) from the encoder's features of
each identity's reference view to its pre-optimised weight tokens, fitted on one dataset and
scored (R² of the dense updates, :func:`hdb_jax.hypernet.objective.r_squared`) on another.

  python benchmarks/target_ridge.py --train runs/preopt --heldout runs/preopt_heldout \\
      [--config configs/hypernet.py:toy]

Prints one JSON line per (features, penalty) and the mean-target predictor's R².
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from hdb_jax import adapters as A
from hdb_jax.blocks import build
from hdb_jax.data import identities as identities_lib
from hdb_jax.hypernet import data as hdata
from hdb_jax.hypernet import objective
from hdb_jax.hypernet.encoder import resize_images
from hdb_jax.hypernet.model import build_hypernet
from hdb_jax.jobs import config_lib


def ridge(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, penalty: float) -> np.ndarray:
    """Ridge predictions for ``x_new`` from ``x [N, F] -> y [N, ...]`` (dual form; N < F)."""
    x, x_new = x.reshape(len(x), -1), x_new.reshape(len(x_new), -1)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_new = (x - mu) / sd, (x_new - mu) / sd
    flat = y.reshape(len(y), -1)
    w = x.T @ np.linalg.solve(x @ x.T + penalty * np.eye(len(x)), flat - flat.mean(0))
    return (x_new @ w + flat.mean(0)).reshape((len(x_new),) + y.shape[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="weights dataset the map is fitted on")
    parser.add_argument("--heldout", required=True, help="weights dataset it is scored on")
    parser.add_argument("--config", default="configs/hypernet.py:toy")
    args = parser.parse_args()
    path, _, arg = args.config.partition(":")
    config = config_lib.load(path, arg or None)
    sd, params = build.base_model(config.model)
    adapters = build.adapters(config.adapter, params)
    kind = A.LiDB(**config.adapter.lidb.to_dict())
    net, init = build_hypernet(
        config.net.encoder, adapters, kind, encoder_path=config.net.encoder_path or None
    )
    hyper = init(jax.random.PRNGKey(0))  # the encoder is the frozen, loaded one; the decoder is unused
    encode = lambda refs: np.asarray(  # noqa: E731
        net.apply({"params": hyper}, resize_images(refs, net.image_size), method="encode")
    )
    sets = {}
    for name, directory in (("train", args.train), ("heldout", args.heldout)):
        ids, tokens = hdata.targets(directory, adapters, None)
        source = identities_lib.from_config(config.data, build.resolution(config.model, sd), ids)
        sets[name] = (encode(hdata.reference_views(source, ids)), np.asarray(tokens))
    (x, y), (xh, yh) = sets["train"], sets["heldout"]
    mean = np.broadcast_to(y.mean(0), yh.shape)
    print(json.dumps({"predictor": "mean target", "r2_heldout": objective.r_squared(mean, yh, kind)}))
    for features, sel in (("pooled tokens", slice(-2, None)), ("all tokens", slice(None))):
        for penalty in (1.0, 10.0, 100.0, 1e3, 1e4):
            r2 = objective.r_squared(ridge(x[:, sel], y, xh[:, sel], penalty), yh, kind)
            print(json.dumps({"predictor": f"ridge on {features}", "penalty": penalty, "r2_heldout": r2}))


if __name__ == "__main__":
    main()
