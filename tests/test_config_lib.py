"""Typed config knobs and the shared config sections."""

import os

import pytest
from conftest import CONFIGS, load_config

from hdb_jax import config_lib


def test_knobs_cast_to_their_defaults_types():
    k = config_lib.knobs(
        "sd15,steps=20,lr=3e-4,reduced,name=x",
        size=("tiny", "sd15"),
        steps=10,
        lr=1e-3,
        reduced=False,
        name="a",
    )
    assert (k.size, k.steps, k.lr, k.reduced, k.name) == ("sd15", 20, 3e-4, True, "x")
    assert isinstance(k.steps, int) and isinstance(k.lr, float)
    defaults = config_lib.knobs(None, size=("tiny", "sd15"), steps=10, reduced=False)
    assert (defaults.size, defaults.steps, defaults.reduced) == ("tiny", 10, False)
    assert config_lib.knobs("reduced=false", reduced=True).reduced is False


@pytest.mark.parametrize(
    "arg, message",
    [
        ("steps=ten", r"knob steps='ten': expected int"),
        ("size=huge", r"knob size='huge': choose from \['tiny', 'sd15'\]"),
        ("stepz=1", r"unknown config knobs \['stepz=1'\]"),
        ("steps", r"knob 'steps' needs a value"),
        ("steps=1,steps=2", r"knob 'steps' given twice"),
        ("reduced=maybe", r"knob reduced='maybe': expected a boolean"),
    ],
)
def test_bad_knobs_are_named(arg, message):
    with pytest.raises(ValueError, match=message):
        config_lib.knobs(arg, size=("tiny", "sd15"), steps=10, reduced=False)


def test_every_config_loads_without_sys_path_edits():
    from hdb_jax.train import JOBS

    names = sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith(".py"))
    for name in names:
        config = load_config(name)
        assert name == "personalize" or config.job in JOBS, name  # personalize has its own CLI
    assert "sys.path" not in "".join(open(os.path.join(CONFIGS, f"{n}.py")).read() for n in names)


def test_stage_configs_share_sections():
    preopt, hypernet, subject = load_config("preopt"), load_config("hypernet"), load_config("subject")
    assert (
        preopt.adapter.to_dict() == hypernet.adapter.to_dict() == subject.adapter.to_dict()
    )  # same LiDB layout
    assert preopt.model.to_dict() == hypernet.model.to_dict() == {"source": "tiny", "resolution": 32}
    assert "instance" not in hypernet.data and "export" not in preopt  # composed, not copied and deleted
