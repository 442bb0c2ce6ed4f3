"""Low-level utilities every layer uses: images, safetensors files, checkpoints, metrics, meshes."""
