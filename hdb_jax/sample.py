"""``python -m hdb_jax.sample``: the short name of :mod:`hdb_jax.jobs.sample`."""

if __name__ == "__main__":  # a command line: PyTorch is never used (see startup.skip_torch)
    from hdb_jax.common.startup import skip_torch

    skip_torch()

from hdb_jax.jobs.sample import main  # noqa: E402

if __name__ == "__main__":
    main()
