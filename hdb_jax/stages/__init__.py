"""The stages, peers that never import each other: ``train(config, sd, params)`` of each."""
