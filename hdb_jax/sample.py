"""``python -m hdb_jax.sample``: the short name of :mod:`hdb_jax.jobs.sample`."""

from hdb_jax.jobs.sample import main

if __name__ == "__main__":
    main()
