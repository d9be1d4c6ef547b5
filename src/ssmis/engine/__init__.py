"""The training engine: streams, precision, loop, checkpoints, run directories."""
