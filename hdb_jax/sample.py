"""``python -m hdb_jax.sample``: the short name of :mod:`hdb_jax.jobs.sample`."""

if __name__ == "__main__":
    from hdb_jax.common.startup import skip_torch

    skip_torch()  # a command line never uses PyTorch (see hdb_jax.common.startup)
    from hdb_jax.jobs.sample import main

    main()
