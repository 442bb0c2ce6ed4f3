"""``python -m hdb_jax.train``: the short name of :mod:`hdb_jax.jobs.train`."""

from hdb_jax.jobs.train import main

if __name__ == "__main__":
    main()
