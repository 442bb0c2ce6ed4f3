"""Stable Diffusion components (Flax) for hdb_jax."""
