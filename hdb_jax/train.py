"""``python -m hdb_jax.train``: the short name of :mod:`hdb_jax.jobs.train`."""

if __name__ == "__main__":  # a command line: PyTorch is never used (see startup.skip_torch)
    from hdb_jax.common.startup import skip_torch

    skip_torch()

from hdb_jax.jobs.train import main  # noqa: E402

if __name__ == "__main__":
    main()
