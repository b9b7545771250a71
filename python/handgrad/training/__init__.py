"""Training infrastructure: data, recipes, the loop, checkpoints and plots."""
