"""What makes it fast: device, precision, torch.compile, BatchNorm folding, recomputation,
the feature cache, and the exported-model engines; and the one forward pass inference runs through."""
