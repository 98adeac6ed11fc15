"""The model: config, the one-file backbone, HF conversion, checkpoints."""
