"""Embedded default job: personalise one synthetic identity on the tiny model with LiDB.

The tiny SD-family model is randomly initialised (no weights can be downloaded here), so the
run shows the machinery end to end -- data, adapters, jitted DreamBooth-loss step, checkpoints,
TensorBoard events, exports -- and prints the adapter parameter tables of this model and of
SD 1.5 (from shapes).

Run:
  python -m hdb_jax.train --config configs/demo.py
  python -m hdb_jax.train --config configs/demo.py:adapter=kron --config.steps=80
Knobs: those of configs/subject.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import subject  # noqa: E402  (configs/subject.py)


def get_config(arg: str | None = None):
    config = subject.get_config(",".join(filter(None, ["tiny", arg])))
    config.workdir = "runs/demo"
    config.print_tables = True
    return config
