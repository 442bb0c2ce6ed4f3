"""File formats of personal weights: our own file, the diffusers LoRA layout, the webui layout."""
