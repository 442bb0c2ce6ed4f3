"""``python -m hdb_jax.personalize``: the short name of :mod:`hdb_jax.jobs.personalize`."""

from hdb_jax.jobs.personalize import main

if __name__ == "__main__":
    main()
