"""``python -m hdb_jax.export_base``: the short name of :mod:`hdb_jax.jobs.export_base`."""

from hdb_jax.jobs.export_base import main

if __name__ == "__main__":
    main()
