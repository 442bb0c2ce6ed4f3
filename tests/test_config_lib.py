"""Typed config knobs and the shared config sections."""

import os

import pytest
from conftest import CONFIGS, load_config

from hdb_jax.jobs import config_lib


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
    from hdb_jax.jobs.train import JOBS

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
    assert (
        preopt.model.to_dict()
        == hypernet.model.to_dict()
        == {
            "source": "tiny",
            "resolution": 32,
            "attention": "auto",
            "remat": "none",
        }
    )
    assert "instance" not in hypernet.data and "export" not in preopt  # composed, not copied and deleted


def test_the_main_job_states_its_base_model_once():
    """One override of ``model`` reaches every stage the main job runs."""
    c = load_config("demo")
    sections = [c.preopt, c.hypernet, c.personalize, c.oracle, *(c.baselines[k] for k in c.baselines)]
    c.model.source, c.model.resolution = "/models/sd15", 0
    assert all(s.model.source == "/models/sd15" and s.model.resolution == 0 for s in sections)
    assert config_lib.model("toy").resolution == config_lib.model("sd15").resolution == 0  # the model's own
    assert config_lib.model("tiny").resolution == 32


def test_a_stage_trains_at_the_resolution_of_the_model_it_is_given(tiny_sd):
    from hdb_jax.blocks import build

    assert tiny_sd.default_resolution == 32
    assert build.resolution({"resolution": 0}, tiny_sd) == 32  # 0: the model's own
    assert build.resolution({"resolution": 16}, tiny_sd) == 16  # an explicit size wins
    with pytest.raises(ValueError, match="config.model.resolution=33 is not a multiple"):
        build.resolution({"resolution": 33}, tiny_sd)
