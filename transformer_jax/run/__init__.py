"""A training run on disk: its directory layout (workdir) and orbax checkpoints."""
