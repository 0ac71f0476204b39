"""What every trainer shares: the step loop, the training log, and the ranks' entry, seeds and RNG state."""
