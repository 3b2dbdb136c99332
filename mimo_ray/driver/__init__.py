"""The driver: the training and inference loops, checkpoints, recovery."""
