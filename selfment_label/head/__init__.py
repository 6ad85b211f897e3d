"""The distilled head: model and losses, training, checkpoints, applying it to a folder."""
