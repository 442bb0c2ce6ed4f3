"""``python -m hdb_jax.train --config configs/<exp>.py[:knobs] --config.x=y``.

The entry point parses flags and calls an importable job function chosen by ``config.job``;
tests and notebooks call the same functions.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import ml_collections

# config.job -> "module:function"; modules are imported only when their job runs.
JOBS: dict[str, str] = {
    "subject": "hdb_jax.jobs.subject:run",
    "preopt": "hdb_jax.jobs.pretrain:run_preopt",
    "hypernet": "hdb_jax.jobs.pretrain:run_hypernet",
    "base_toy": "hdb_jax.jobs.toy_base:run",
    "identity": "hdb_jax.jobs.toy_identity:run",
    "attributes": "hdb_jax.jobs.toy_attributes:run",
    "sweep": "hdb_jax.jobs.sweep:run",
    "demo": "hdb_jax.jobs.demo:run",
    "probe": "hdb_jax.jobs.probe:run",
}


def job_function(name: str) -> Callable[[ml_collections.ConfigDict], Any]:
    if name not in JOBS:
        raise ValueError(f"config.job={name!r}: choose from {sorted(JOBS)}")
    module, function = JOBS[name].split(":")
    return getattr(importlib.import_module(module), function)


def run(config: ml_collections.ConfigDict):
    """Runs the job ``config.job`` names."""
    return job_function(config.job)(config)


def main(argv=None) -> None:
    """The command line: user errors (a typo in a flag, a bad file) are one ``error:`` line, exit code 2."""
    from absl import flags, logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "configs/<exp>.py[:knobs]", lock_config=True
    )
    flags.mark_flag_as_required("config")

    def _main(_):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        run(config_flag.value)

    from hdb_jax.jobs import cli

    cli.run(_main, argv, configs=[config_flag])


if __name__ == "__main__":
    main()
