"""A training run: the society, the stage table, the loop, checkpoints, workdir guards, populations."""
