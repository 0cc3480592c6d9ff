"""The pretrain script's pieces: flags, process groups and model setup, checkpointing, metrics."""
