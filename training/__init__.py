"""Training: data, the synthetic shapes world, validation, stages and the training loop."""
