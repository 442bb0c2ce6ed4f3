"""Building blocks the stages are made of: base model and optimiser factories, the denoising loss, the one training loop, sampling, LAG, rank relaxation, tuning methods."""
