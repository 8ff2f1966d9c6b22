"""Training: the sharded train/eval steps and loop, the optimiser, FLOP counts."""
